"""The project's own training callbacks (exact resumption after an interruption, the time
estimate) and the cosine schedule.

Keras's `BackupAndRestore` keeps the weights, the optimizer and the epoch number after every
epoch; `ResumeAfterInterruption` adds what it does not keep, so that rerunning the same
command after Ctrl-C, a SIGKILL or a power cut continues the run as if nothing had happened.
"""

import json
import math
import os
import sys
import time

import keras
import numpy as np

from vgg_transfer import distribute
from vgg_transfer.errors import InputError


def cosine_decay(initial_learning_rate, epochs):
    """For `keras.callbacks.LearningRateScheduler`: the rate falls every epoch along half a
    cosine, from `initial_learning_rate` at the first epoch towards 0 one epoch after the last
    (so the last epoch still learns). It depends on the epoch number alone, so a resumed run
    stays on its curve."""
    return lambda epoch: float(initial_learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))


class WallTimeEstimate(keras.callbacks.Callback):
    """Prints, once the first training steps are timed, about how long this `fit` will take:
    "Training: about 12 min for 10 epochs on this CPU (0.51 s a step, 141 steps an epoch)".
    The first step is left out (it includes compiling) and validation counted as 5% more. An
    epoch under half a minute is timed whole instead, when the next one begins: beside so few
    steps, what every epoch adds (validation, the checkpoint, the backup) is not small. Above
    2 hours it names what shortens it."""

    PROBE_STEPS = 10
    PROBE_SECONDS = 30
    LONG = 2 * 3600

    def __init__(self, label="Training"):
        super().__init__()
        self.label = label

    def on_train_begin(self, logs=None):
        self.first_epoch, self.epoch_started, self.after_first_step = None, None, None
        self.timed_steps, self.per_step, self.printed = 0, None, False

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch, self.epoch_started = epoch, time.perf_counter()
        elif not self.printed:
            self._report_first_epoch_whole()

    def on_train_batch_end(self, batch, logs=None):
        if self.printed or self.per_step is not None:
            return
        now = time.perf_counter()
        if self.after_first_step is None:
            self.after_first_step = now
            return
        self.timed_steps += 1
        steps, elapsed = self.params.get("steps") or 1, now - self.after_first_step
        if self.timed_steps >= min(self.PROBE_STEPS, steps - 1) or elapsed >= self.PROBE_SECONDS:
            self.per_step = elapsed / self.timed_steps
            if self.per_step * steps >= self.PROBE_SECONDS:
                self._report(self.per_step * steps * 1.05, f"{self.per_step:.2g} s a step, {steps} steps an epoch",
                             mid_epoch=True)

    def on_train_end(self, logs=None):
        if not self.printed and self.first_epoch is not None:  # a single epoch, or stopped after the first
            self._report_first_epoch_whole()

    def _report_first_epoch_whole(self):
        # From the end of the first step (compiling) to now, with the step's share added back.
        started = self.epoch_started if self.per_step is None else self.after_first_step - self.per_step
        seconds = time.perf_counter() - started
        self._report(seconds, f"the first epoch timed whole: {seconds:.2g} s")

    def _report(self, seconds_per_epoch, detail, mid_epoch=False):
        from vgg_transfer import devices  # the backend's device list, only once it is needed

        epochs = self.params["epochs"] - self.first_epoch
        seconds = seconds_per_epoch * epochs
        estimate = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
        longer = "; --subset N (fewer images) or fewer epochs make it shorter" if seconds > self.LONG else ""
        # Keras's progress bar redraws its line in a terminal: a mid-epoch estimate starts a line of its own.
        terminal_bar = self.params.get("verbose") in (1, "auto") and sys.stdout.isatty()
        own_line = "\n" if mid_epoch and terminal_bar else ""
        print(f"{own_line}{self.label}: about {estimate} for {epochs} epochs on this {devices.description()} "
              f"({detail}){longer}", flush=True)
        self.printed = True


def project_callbacks(run, callbacks, training_batches, phase="training"):
    """The project's own callbacks, to add after a script's `callbacks` (EarlyStopping,
    ModelCheckpoint, the schedule): Keras's `TerminateOnNaN`; `WallTimeEstimate`; Keras's
    `TensorBoard` writing into the run folder's tensorboard/ with `--tensorboard`; and, last so
    that it saves what the others hold at the end of each epoch, `ResumeAfterInterruption`.

    Args:
        run: the `runs.Run`.
        callbacks: the script's callbacks of this `fit`.
        training_batches: the `data.Batches` that `fit` trains on.
        phase: a name for the phase, for scripts that train in several.
    """
    ours = [keras.callbacks.TerminateOnNaN(), WallTimeEstimate("Training" if phase == "training" else phase)]
    if run.setup.tensorboard:
        ours.append(keras.callbacks.TensorBoard(log_dir=str(run.path / "tensorboard" / phase)))
    return [*ours, ResumeAfterInterruption(run, [*callbacks, *ours], training_batches, phase)]


class TrainingDiverged(InputError):
    """The loss became NaN or infinite: a hyperparameter (usually the learning rate) is off."""


class ResumeAfterInterruption(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore`, plus what it leaves out, so that a run interrupted at any point
    (Ctrl-C, a SIGKILL, a power cut) and run again with the same command ends exactly as if
    nothing had happened: the same history, weights and test figures. Kept in the run folder
    after every epoch and restored when the same command runs again:

    - the state of the `EarlyStopping`, `ModelCheckpoint` and `ReduceLROnPlateau` callbacks in
      `callbacks` (best figure, epochs waited, best weights: kept here, not read back from the
      checkpoint, which a full disk may have left half written), so a resumed run still knows
      its best epoch and when to stop or lower the rate;
    - the state of every random generator in the model (dropout, augmentation), so the resumed
      epochs draw what the uninterrupted run drew (Keras's backup keeps weights only);
    - the epoch `training_batches` shuffles for, so they continue in the uninterrupted run's order;
    - every epoch's figures, so the `History` that `fit` returns covers the whole phase;
    - that a phase completed: rerunning it restores its final weights and trains nothing.

    The state of each epoch is written before Keras's backup of it: a run stopped between the
    two resumes from the backup's epoch, with that epoch's state. A run stopped within an epoch
    repeats that epoch from its start.

    Also: a NaN or infinite loss (see `TerminateOnNaN`) raises `TrainingDiverged` with one
    line and makes a rerun start afresh; the training time goes into `run.seconds`.

    Args:
        run: the `runs.Run`; the state lives in its `resume/<phase>/` folder.
        callbacks: the other callbacks of this `fit`; put this one after them.
        training_batches: the `data.Batches` that `fit` trains on (shuffled), or None.
        phase: a name for the phase, for runs that train in several.
    """

    def __init__(self, run, callbacks, training_batches=None, phase="training"):
        self.state_dir = run.path / "resume" / phase
        super().__init__(str(self.state_dir / "backup"), delete_checkpoint=False)
        self.run, self.phase, self.training_batches = run, phase, training_batches
        self.kept = []  # (callback, the attributes that make up its state)
        for callback in callbacks:
            if isinstance(callback, keras.callbacks.EarlyStopping):
                self.kept.append((callback, ("wait", "best", "best_epoch")))
            elif isinstance(callback, keras.callbacks.ModelCheckpoint):
                self.kept.append((callback, ("best",)))
            elif isinstance(callback, keras.callbacks.ReduceLROnPlateau):
                self.kept.append((callback, ("wait", "best", "cooldown_counter")))
        self.early_stopping = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
        self.checkpoint = next((c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint)), None)
        self.epochs = []  # per completed epoch: {"logs", "callbacks", "random_states"}
        self.completed_before = None

    @property
    def _state_file(self):
        return self.state_dir / "state.json"

    @property
    def _done_file(self):
        return self.state_dir / "done.json"

    def _random_generators(self):
        """The state variables of the model's random generators (Keras's `SeedGenerator`s), in order."""
        return [variable for variable in self.model.variables if variable.name == "seed_generator_state"]

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()
        distribute.check_workers_agree(self._done_file.is_file(), f"whether {self.phase} completed")
        if self._done_file.is_file():  # this phase completed before the interruption
            self.model.load_weights(self.state_dir / "final.weights.h5")
            self.completed_before = json.loads(self._done_file.read_text())
            self.model._initial_epoch = self.params["epochs"]  # as BackupAndRestore does: no epoch left
            print(f"{self.phase}: completed before the interruption; its final weights are restored")
            return
        super().on_train_begin(logs)  # the weights, the optimizer and the epoch to continue from
        completed = self.model._initial_epoch or 0
        distribute.check_workers_agree(completed, "the epoch to resume after")
        if not completed:
            return
        saved = json.loads(self._state_file.read_text())["epochs"] if self._state_file.is_file() else []
        if len(saved) < completed:  # written before each backup, so only lost or edited by hand
            raise RuntimeError(f"the resume state in {self.state_dir} lacks epochs the backup has; delete the "
                               f"interrupted run's folder {self.run.path} to start afresh")
        self.epochs = saved[:completed]  # a state written after the last backup is dropped: that epoch reruns
        last = self.epochs[-1]
        for callback, names in self.kept:
            for name in names:
                setattr(callback, name, last["callbacks"][type(callback).__name__][name])
        for variable, value in zip(self._random_generators(), last["random_states"], strict=True):
            variable.assign(value)
        best_weights = self.state_dir / f"best-{self.early_stopping.best_epoch}.npz" if self.early_stopping else None
        if best_weights and best_weights.is_file():
            with np.load(best_weights) as saved:
                self.early_stopping.best_weights = [saved[f"arr_{index}"] for index in range(len(saved.files))]
        if self.early_stopping and self.early_stopping.wait >= self.early_stopping.patience:
            self.model._initial_epoch = self.params["epochs"]  # it had stopped early: no epoch left
        print(f"Resuming after epoch {completed} of the interrupted run")

    def on_epoch_begin(self, epoch, logs=None):
        if self.training_batches is not None:
            self.training_batches.set_epoch(epoch)  # its order for this epoch, also after a resumption

    def on_epoch_end(self, epoch, logs=None):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # EarlyStopping's best weights, which it keeps in memory only, kept here by epoch rather than
        # read back from ModelCheckpoint's file, which a full disk or a kill may have left half written.
        best = bool(self.early_stopping and self.early_stopping.best_epoch == epoch and self.early_stopping.best_weights)
        if best:  # exactly what EarlyStopping holds (a model's weights file would also hold the optimizer)
            np.savez(self.state_dir / f"best-{epoch}.npz", *self.early_stopping.best_weights)
        self.epochs.append({
            "logs": {key: float(value) for key, value in (logs or {}).items()},
            "callbacks": {type(callback).__name__: {name: _plain(getattr(callback, name)) for name in names}
                          for callback, names in self.kept},
            "random_states": [keras.ops.convert_to_numpy(variable).tolist() for variable in self._random_generators()],
        })
        temporary = self._state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({"epochs": self.epochs}))
        os.replace(temporary, self._state_file)
        if best:  # the state now names this epoch as the best: earlier best weights are not needed
            for earlier in self.state_dir.glob("best-*.npz"):
                if earlier.name != f"best-{epoch}.npz":
                    earlier.unlink()
        super().on_epoch_end(epoch, logs)  # the weights and the optimizer, then the epoch number

    def on_train_end(self, logs=None):
        self.run.seconds["training"] = self.run.seconds.get("training", 0.0) + time.perf_counter() - self._started
        logs = [epoch["logs"] for epoch in self.epochs]
        history = self.completed_before or {key: [entry[key] for entry in logs if key in entry]
                                            for key in (logs[-1] if logs else {})}
        # What fit returns: every epoch of the phase, the ones before an interruption too.
        self.model.history = keras.callbacks.History()
        self.model.history.history, self.model.history.params = history, self.params
        if self.completed_before is not None:
            return
        losses = history.get("loss", [])
        if not all(math.isfinite(loss) for loss in losses):
            self.run.forget_resume_state()  # a rerun must start afresh, not from the diverged weights
            rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            raise TrainingDiverged(
                f"training stopped in epoch {len(losses)}: the loss became NaN or infinite; lower --learning-rate "
                f"(now {rate:.3g}) and run again. The best checkpoint so far is kept in {self.run.path / 'checkpoints'}"
            )
        self.model.save_weights(self.state_dir / "final.weights.h5")  # the best epoch's, after EarlyStopping
        self._done_file.write_text(json.dumps(history))


def _plain(value):
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value
