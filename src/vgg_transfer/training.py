"""Training with the project's standard callbacks, all of which watch validation figures,
resumable after an interruption (Ctrl-C, SIGKILL, a power cut) from the last completed epoch."""

import json
import math
import os
import signal

import keras

from vgg_transfer.errors import InputError


def standard_callbacks(run, config, phase=None, monitor="val_loss", epochs=None, initial_learning_rate=None):
    """Early stopping (best weights restored), checkpoint, learning-rate reduction, CSV log.

    Args:
        run: the `runs.Run` being written (checkpoint and history go into its folder).
        config: uses `early_stopping_patience`, `lr_schedule`, and for the "plateau"
            schedule `reduce_lr_patience` and `reduce_lr_factor`.
        phase: None for one-phase training, else a name ("phase_2") for the checkpoint file;
            history.csv is appended to, so it holds every phase in order.
        monitor: a validation figure; never a test figure.
        epochs, initial_learning_rate: the phase's length and starting rate, for "cosine".

    Returns:
        The callbacks in this order: early stopping, checkpoint, learning-rate callback,
        CSV logger, NaN guard (`fit` relies on the first three).
    """
    checkpoint_dir = run.path / "checkpoints"
    checkpoint_dir.mkdir(exist_ok=True)
    checkpoint_name = "best.keras" if phase is None else f"best_{phase}.keras"
    return [
        keras.callbacks.EarlyStopping(
            monitor=monitor, patience=config.early_stopping_patience, restore_best_weights=True, verbose=1
        ),
        keras.callbacks.ModelCheckpoint(checkpoint_dir / checkpoint_name, monitor=monitor, save_best_only=True),
        learning_rate_callback(config, monitor, epochs, initial_learning_rate),
        keras.callbacks.CSVLogger(run.path / "history.csv", append=True),
        keras.callbacks.TerminateOnNaN(),
    ]


def learning_rate_callback(config, monitor, epochs, initial_learning_rate):
    """How the learning rate falls during a phase, by `config.lr_schedule` (see cli.CHOICES):

    - "plateau": ReduceLROnPlateau multiplies it by `reduce_lr_factor` after `reduce_lr_patience`
      epochs without a better validation figure;
    - "cosine": it falls every epoch along half a cosine, from the compiled rate towards 0 at
      the end of the phase's `epochs`, whatever the validation figures do. Steadier than
      "plateau" when the validation loss is noisy, and it uses the whole epoch budget.
    """
    if config.lr_schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(
            lambda epoch, _current: cosine_decay(initial_learning_rate, epoch, epochs)
        )
    return keras.callbacks.ReduceLROnPlateau(
        monitor=monitor, factor=config.reduce_lr_factor, patience=config.reduce_lr_patience, verbose=1
    )


def cosine_decay(initial_learning_rate, epoch, epochs):
    """The rate for `epoch` (0-based) of `epochs`: the initial rate at epoch 0, falling along
    half a cosine towards 0 (reached one epoch after the last, so the last epoch still learns)."""
    return float(initial_learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))


def fit(model, x, y, validation_data, run, config, epochs=None, phase=None):
    """Trains `model` (already compiled) with `standard_callbacks`; returns the `History`.

    Args:
        x, y: training inputs and int labels.
        validation_data: (x_val, y_val); required, because every callback watches it.
        config: uses `epochs` (unless `epochs` is given), `batch_size`, `quiet` and what
            `standard_callbacks` uses.
        phase: see `standard_callbacks`.

    The model ends with the weights of its best validation epoch. The state after every
    epoch is kept in the run folder's resume/ (weights and optimizer by Keras's
    BackupAndRestore; the epochs' figures and the callbacks' state by `ResumeState`), so
    that rerunning the same command after an interruption continues from the last
    completed epoch, and a phase that had completed is not trained again.

    Raises:
        TrainingDiverged: the loss became NaN or infinite (the best checkpoint is kept).
    """
    state_dir = run.path / "resume" / (phase or "training")
    done_file = state_dir / "done.json"
    if done_file.is_file():  # this phase completed before the interruption
        model.load_weights(state_dir / "final.weights.h5")
        print(f"{phase or 'Training'}: completed before the interruption; its best weights are restored")
        history = keras.callbacks.History()
        history.history = json.loads(done_file.read_text())
        return history
    epochs = epochs or config.epochs
    # Read before training: on a resumed run, BackupAndRestore then restores a decayed rate.
    initial_learning_rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    callbacks = standard_callbacks(run, config, phase, epochs=epochs, initial_learning_rate=initial_learning_rate)
    resume_state = ResumeState(state_dir, *callbacks[:3])
    callbacks += [resume_state, keras.callbacks.BackupAndRestore(state_dir / "backup", delete_checkpoint=False)]
    if os.environ.get(SIMULATED_INTERRUPTION):
        callbacks.append(_SimulatedInterruption(os.environ[SIMULATED_INTERRUPTION]))
    with run.timed("training"):
        history = model.fit(
            x, y,
            validation_data=validation_data,
            epochs=epochs,
            batch_size=config.batch_size,
            callbacks=callbacks,
            verbose=0 if config.quiet else "auto",
        )
    # Every epoch of this phase, the ones before an interruption included.
    history.history = {key: [epoch[key] for epoch in resume_state.epochs if key in epoch]
                       for key in resume_state.epochs[-1]} if resume_state.epochs else history.history
    losses = history.history.get("loss", [])
    if not all(math.isfinite(loss) for loss in losses):
        run.forget_resume_state()  # a rerun must start afresh, not from the diverged weights
        raise TrainingDiverged(
            f"training stopped in epoch {len(losses)}: the loss became NaN or infinite; lower --learning-rate "
            f"(now {float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)):.3g}) and run again. "
            f"The best checkpoint so far is kept in {run.path / 'checkpoints'}"
        )
    model.save_weights(state_dir / "final.weights.h5")
    done_file.write_text(json.dumps(history.history))
    return history


class TrainingDiverged(InputError):
    """The loss became NaN or infinite: a hyperparameter (usually the learning rate) is off."""


class ResumeState(keras.callbacks.Callback):
    """What BackupAndRestore does not keep, kept after every epoch and restored on resume:
    every epoch's figures, and the state of early stopping, the best-only checkpoint and
    ReduceLROnPlateau (so a resumed run still knows its best epoch and weights). A cosine
    schedule has no state: it depends on the epoch number alone, which BackupAndRestore keeps.

    Place it after those callbacks and before BackupAndRestore (see `fit`).
    """

    def __init__(self, state_dir, early_stopping, checkpoint, learning_rate_callback):
        super().__init__()
        self.state_file = state_dir / "state.json"
        self.backup_metadata = state_dir / "backup" / "training_metadata.json"  # written by BackupAndRestore
        # Each callback with the attributes that make up its state.
        self.kept = [(early_stopping, ("wait", "best", "best_epoch")), (checkpoint, ("best",))]
        if isinstance(learning_rate_callback, keras.callbacks.ReduceLROnPlateau):
            self.kept.append((learning_rate_callback, ("wait", "best", "cooldown_counter")))
        self.early_stopping, self.checkpoint = early_stopping, checkpoint
        self.epochs = []

    def on_train_begin(self, logs=None):
        if not (self.state_file.is_file() and self.backup_metadata.is_file()):
            return
        state = json.loads(self.state_file.read_text())
        completed = json.loads(self.backup_metadata.read_text())["epoch"]  # what the weights are from
        if len(state["epochs"]) != completed:
            return  # killed between the two saves: start the bookkeeping afresh rather than guess
        self.epochs = state["epochs"]
        for callback, names in self.kept:
            for name in names:
                setattr(callback, name, state[type(callback).__name__][name])
        if self.checkpoint.filepath and os.path.isfile(self.checkpoint.filepath):
            best = keras.saving.load_model(self.checkpoint.filepath, compile=False)
            self.early_stopping.best_weights = best.get_weights()
        print(f"Resuming after epoch {completed} of the interrupted run")

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({key: float(value) for key, value in (logs or {}).items()})
        state = {"epochs": self.epochs}
        for callback, names in self.kept:
            state[type(callback).__name__] = {name: _plain(getattr(callback, name)) for name in names}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self.state_file)


def _plain(value):
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


# For the interruption tests: "EPOCH:SIGNAL" (e.g. "2:SIGKILL") sends the signal to this
# process at the end of its EPOCH-th epoch (counted over every phase, so "3:SIGINT" with a
# 2-epoch phase 1 interrupts phase 2's first epoch), once the epoch's state is saved.
SIMULATED_INTERRUPTION = "VGG_TRANSFER_INTERRUPT_AFTER_EPOCH"


class _SimulatedInterruption(keras.callbacks.Callback):
    epochs_completed = 0  # in this process, over every phase

    def __init__(self, spec):
        super().__init__()
        epoch, name = spec.split(":")
        self.epoch, self.signal = int(epoch), getattr(signal, name)

    def on_epoch_end(self, epoch, logs=None):
        _SimulatedInterruption.epochs_completed += 1
        if _SimulatedInterruption.epochs_completed == self.epoch:
            os.kill(os.getpid(), self.signal)


def compile_classifier(model, learning_rate=1e-3, optimizer=None):
    """Compiles a softmax classifier on integer labels: cross-entropy loss, accuracy metric.

    Args:
        learning_rate: for the default optimizer, Adam.
        optimizer: another optimizer instance instead of Adam.

    Every model of the project is compiled here, so every saved model evaluates the same way.
    """
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
