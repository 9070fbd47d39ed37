"""The estimate of the training time that every `fit` prints (`training.WallTimeEstimate`),
on a toy model whose steps and epoch ends take known times."""

import re
import time

import keras
import numpy as np
import pytest

from vgg_transfer import training


class Sleep(keras.callbacks.Callback):
    """Stands in for the time a real run spends in each step, and at each epoch's end
    (validation, the checkpoint, the backup); notes when the first step (compiling) ended."""

    def __init__(self, per_step, per_epoch):
        super().__init__()
        self.per_step, self.per_epoch, self.first_step_ended = per_step, per_epoch, None

    def on_train_batch_end(self, batch, logs=None):
        self.first_step_ended = self.first_step_ended or time.perf_counter()
        time.sleep(self.per_step)

    def on_epoch_end(self, epoch, logs=None):
        time.sleep(self.per_epoch)


@pytest.mark.parametrize(
    "per_step, per_epoch, detail",
    [
        # Over 1.6 s of steps an epoch, over the threshold (lowered to 1 s): timed from its first steps.
        (0.04, 0.0, r"[\d.]+ s a step, 40 steps an epoch"),
        # The toy's own steps (0.1 s an epoch; 0.7 s on a machine busy with another run) and
        # 1 s at each epoch's end: timed whole, or the estimate would be under 1 s.
        (0.0, 1.0, r"the first epoch timed whole: [\d.]+ s"),
    ],
)
def test_the_estimate_is_close_to_the_time_fit_takes(per_step, per_epoch, detail, monkeypatch, capsys):
    monkeypatch.setattr(training.WallTimeEstimate, "PROBE_SECONDS", 1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    images, labels = np.zeros((320, 4), "float32"), np.zeros((320, 2), "float32")
    sleep = Sleep(per_step, per_epoch)
    model.fit(images, labels, batch_size=8, epochs=4, verbose=0, callbacks=[sleep, training.WallTimeEstimate()])
    # What the estimate covers: from the first step's end (compiling, a share of a real run
    # too small to count, can take seconds on a busy machine) to the end, with that step.
    took = time.perf_counter() - sleep.first_step_ended + per_step
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Training: about")]
    estimate, printed_detail = re.fullmatch(r"Training: about (\d+) s for 4 epochs on this .+ \((.+)\)", line).groups()
    assert re.fullmatch(detail, printed_detail), line
    assert took / 2 <= int(estimate) <= took * 2, (line, took)
