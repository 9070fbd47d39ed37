"""An interrupted run (Ctrl-C, a SIGKILL at any point, a full disk) rerun with the same command
ends exactly like an uninterrupted one; a different command starts a new run. The main job
runs in subprocesses, so that tests/interrupting.py can stop one with a real signal."""

import signal

import keras
import numpy as np
import pytest

from conftest import interrupt_after_epochs
from main_job import history_of, main_job, metrics_of, predictions_of, runs_in
from vgg_transfer import cli, runs, training
from vgg_transfer.training import TrainingDiverged

# The resumption tests use small batches and a high rate, on which the validation loss soon
# stops falling, so that ReduceLROnPlateau lowers the rate within the first epochs; they kill
# the run when it has done so, and a resumed run that lost the rate or the callbacks' state shows it.
RESUME_COMMAND = ["--batch-size", "16", "--learning-rate", "1e-2", "--epochs", "8"]


@pytest.fixture(scope="module")
def resume_reference(shared_data, tmp_path_factory):
    """(run folder, epoch): an uninterrupted run of the resumption tests' command, and the number
    of epochs after which its rate had first been lowered (where to interrupt)."""
    out_dir = tmp_path_factory.mktemp("resume-reference")
    finished = main_job(shared_data, out_dir, extra=RESUME_COMMAND)
    assert finished.returncode == 0, finished.stderr[-2000:]
    (run_dir,), _ = runs_in(out_dir)
    history = history_of(run_dir)
    lowered = [index for index, row in enumerate(history) if row["learning_rate"] != history[0]["learning_rate"]]
    assert lowered and 2 <= lowered[0] < len(history) - 1, history  # the command does what the tests rely on
    return run_dir, lowered[0]



# What a run's figures are: every one of them must come out the same after an interruption.
FIGURES = ("test_accuracy", "test_loss", "macro_f1", "per_class", "confusion_matrix", "best_val_accuracy",
           "best_val_loss", "best_epoch", "epochs_run")


@pytest.mark.slow
@pytest.mark.parametrize("when, signal_name", [("between", "SIGINT"), ("within", "SIGKILL"), ("full-disk", None)])
def test_an_interrupted_and_rerun_run_ends_exactly_like_an_uninterrupted_one(shared_data, tmp_path,
                                                                            resume_reference, when, signal_name):
    """Stopped by Ctrl-C between the project's state and Keras's backup of an epoch, killed
    within an epoch, or stopped by a full disk while writing the best checkpoint (left half
    written) after its second improvement, so that it resumes from an epoch whose state and
    backup were both saved, then the same command again: the same history (every figure of
    every epoch), saved weights, predictions and test figures as the run left alone."""
    reference, lowered_after = resume_reference
    out_dir = tmp_path / "out"
    if when == "full-disk":
        # ModelCheckpoint writes best.keras in every epoch whose validation loss is the lowest yet.
        losses = [float(row["val_loss"]) for row in history_of(reference)]
        improved = [epoch for epoch, loss in enumerate(losses) if loss < min(losses[:epoch], default=float("inf"))]
        number = improved[1]  # the epochs completed before the second write
        stopped = main_job(shared_data, out_dir, full_disk="best.keras:2", extra=RESUME_COMMAND)
        assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
        (line,) = stopped.stderr.strip().splitlines()
        assert "no space left on the device while writing the run folder" in line and "(best.keras)" in line
        assert "Free some space and run it again" in line and "Earlier runs in out/ are untouched" in line
    else:
        number = lowered_after + (1 if when == "within" else 0)  # within: the epoch after, so the rate is lowered in it
        stopped = main_job(shared_data, out_dir, interrupt=f"{when}:{number}:{signal_name}", extra=RESUME_COMMAND)
    if signal_name == "SIGKILL":
        assert stopped.returncode == -signal.SIGKILL
    elif signal_name == "SIGINT":  # Ctrl-C: one message saying where the best checkpoint is and how to go on
        assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
        assert "Best checkpoint so far:" in stopped.stderr and "best.keras" in stopped.stderr
        assert "Run the same command again" in stopped.stderr
    complete, (partial,) = runs_in(out_dir)
    assert not complete  # an interrupted run never looks complete

    resumed = main_job(shared_data, out_dir, extra=RESUME_COMMAND)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    backed_up = number if when in ("end", "full-disk") else number - 1  # the epochs Keras's backup holds
    assert "Continuing the interrupted run" in resumed.stdout
    assert f"Resuming after epoch {backed_up} of" in resumed.stdout
    (run_dir,), leftover = runs_in(out_dir)
    assert not leftover and run_dir.name == partial.name[1:-len(".partial")]
    assert not (run_dir / "resume").exists()
    assert history_of(run_dir) == history_of(reference)  # every epoch, every figure, before and after
    resumed_metrics, reference_metrics = metrics_of(run_dir), metrics_of(reference)
    for figure in FIGURES:
        assert resumed_metrics[figure] == reference_metrics[figure], figure
    assert predictions_of(run_dir) == predictions_of(reference)
    for resumed_weight, weight in zip(keras.saving.load_model(run_dir / "model.keras").get_weights(),
                                      keras.saving.load_model(reference / "model.keras").get_weights(), strict=True):
        np.testing.assert_array_equal(resumed_weight, weight)


class _StateRecorder(keras.callbacks.Callback):
    """Records, at the start and at the end of every epoch, the state that a resumption must
    restore and what the epoch made of it."""

    def __init__(self, callbacks):
        super().__init__()
        self.early_stopping = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
        self.reduce_lr = next(c for c in callbacks if isinstance(c, keras.callbacks.ReduceLROnPlateau))
        self.checkpoint = next(c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint))
        self.states = {}

    def _state(self):
        return {
            "early_stopping": (self.early_stopping.wait, self.early_stopping.best, self.early_stopping.best_epoch),
            "early_stopping_best_weights": self.early_stopping.best_weights,
            "reduce_lr": (self.reduce_lr.wait, self.reduce_lr.best, self.reduce_lr.cooldown_counter),
            "checkpoint_best": self.checkpoint.best,
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "weights": self.model.get_weights(),
            # Adam's iteration count and moments, and the dropout layer's random generator
            "optimizer": [keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables],
            "random": [keras.ops.convert_to_numpy(v) for v in self.model.variables if v.name == "seed_generator_state"],
        }

    def on_epoch_begin(self, epoch, logs=None):
        self.states[epoch] = {"begin": self._state()}

    def on_epoch_end(self, epoch, logs=None):
        self.states[epoch]["end"] = self._state()


def _toy_fit(model, x, y, validation_data, run, epochs, schedule="plateau", extra=()):
    """`fit` with the callbacks the training scripts use, on a toy model."""
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(run.path / "checkpoints" / "best.keras", monitor="val_loss",
                                        save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1) if schedule == "plateau" else
        keras.callbacks.LearningRateScheduler(training.cosine_decay(1e-2, epochs)),
        keras.callbacks.TerminateOnNaN(),
    ]
    callbacks.append(training.ResumeAfterInterruption(run, callbacks))
    return model.fit(x, y, validation_data=validation_data, epochs=epochs, batch_size=16,
                     callbacks=[*callbacks, *(extra(callbacks) if callable(extra) else extra)], verbose=0)


def _toy_model(learning_rate):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.5),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy")
    return model


def test_a_resumed_training_restores_every_callbacks_state(tmp_path, monkeypatch):
    """In process, on a toy model with dropout whose validation loss rises from epoch 2 (its
    validation labels are the training labels flipped): the state at the start of the first
    epoch after an interruption, and what that epoch makes of it (weights, Adam's moments and
    step count, the dropout's random generator), equal the uninterrupted run's."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")

    def train(run_name):
        recorders = []
        run = _run_folder(tmp_path / run_name, "toy", "toy")
        _toy_fit(_toy_model(0.1), x, y, (x, 1 - y), run, epochs=6,
                 extra=lambda callbacks: recorders.append(_StateRecorder(callbacks)) or recorders)
        return recorders[0].states

    uninterrupted = train("uninterrupted")
    with monkeypatch.context() as patch:
        interrupt_after_epochs(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train("interrupted")
    resumed = train("interrupted")  # the same command again: continues after epoch 3

    assert sorted(resumed) == [3, 4, 5]
    before = uninterrupted[3]["begin"]
    assert before["reduce_lr"][0] == 0 and before["early_stopping"][0] == 2  # the rate was cut; waiting
    assert before["learning_rate"] < 0.1
    for moment in ("begin", "end"):
        before, after = uninterrupted[3][moment], resumed[3][moment]
        for key in ("early_stopping", "reduce_lr", "checkpoint_best", "learning_rate"):
            np.testing.assert_allclose(after[key], before[key], rtol=1e-6, err_msg=f"{key} at the {moment}")
        # The last epoch's weights, the best epoch's, the optimizer's state and the random generator's.
        for name in ("weights", "early_stopping_best_weights", "optimizer", "random"):
            for resumed_value, value in zip(after[name], before[name], strict=True):
                np.testing.assert_array_equal(resumed_value, value, err_msg=f"{name} at the {moment}")


def _run_folder(out_dir, script_name, resume_key):
    """A `runs.Run` of `script_name` under `out_dir`, as a script's start-up makes it."""
    return runs.Run(cli.Setup(script_name=script_name, hyperparameters={}, out=str(out_dir), resume_key=resume_key))


def test_a_different_command_starts_a_new_run_instead_of_continuing(tmp_path, monkeypatch):
    def key(argv, script="transfer_learning"):
        values, common = cli.parse("", {"EPOCHS": 6, "SEED": 0, "PRECISION": "float32"}, argv)
        setup = cli.Setup(script_name=script, hyperparameters=values, data=common["data"], subset=common["subset"])
        return runs.resume_key(setup.settings())

    command = ["--subset", "1000"]
    interrupted = _run_folder(tmp_path, "transfer_learning", key(command)).path  # a partial run of this command
    others = [key([*command, "--epochs", "5"]), key(["--subset", "2000"]), key(command, "fine_tune"),
              key([*command, "--precision", "bfloat16"])]
    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    others.append(key(command))
    monkeypatch.undo()
    assert len(set(others)) == len(others) and key(command) not in others
    for other in others:
        new = _run_folder(tmp_path, "transfer_learning", other).path
        assert new != interrupted and new.name.endswith(".partial")
    assert _run_folder(tmp_path, "transfer_learning", key(command)).path == interrupted  # the same command continues it



class _PoisonAfter(keras.callbacks.Callback):
    """Makes every weight infinite at the end of an epoch, so the next epoch's loss is NaN."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            for weight in self.model.weights:
                weight.assign(keras.ops.full(weight.shape, np.inf, weight.dtype))


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_best_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)).astype("float32"), rng.integers(0, 2, 64)
    run = _run_folder(tmp_path / "out", "toy", "toy")
    with pytest.raises(TrainingDiverged, match="epoch 3: the loss became NaN or infinite; lower --learning-rate"):
        _toy_fit(_toy_model(1e-2), x, y, (x, y), run, epochs=5, extra=[_PoisonAfter(2)])
    best = keras.saving.load_model(run.path / "checkpoints" / "best.keras")  # from epochs 1-2
    assert all(np.isfinite(weight).all() for weight in best.get_weights())
    assert run.path.name.endswith(".partial")
    assert not (run.path / "resume").exists()  # a rerun starts afresh


def test_the_cosine_schedule_follows_its_curve_across_an_interruption(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 4)).astype("float32"), rng.integers(0, 2, 64)
    run = _run_folder(tmp_path / "out", "toy", "toy")
    with monkeypatch.context() as patch:
        interrupt_after_epochs(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _toy_fit(_toy_model(1e-2), x, y, (x, y), run, epochs=5, schedule="cosine")
    history = _toy_fit(_toy_model(1e-2), x, y, (x, y), run, epochs=5, schedule="cosine")  # the same command again
    expected = [1e-2 * (1 + np.cos(np.pi * epoch / 5)) / 2 for epoch in range(5)]  # 1e-2 down to 9.5e-4
    np.testing.assert_allclose(history.history["learning_rate"], expected, rtol=1e-5)


