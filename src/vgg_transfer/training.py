"""Training with the project's standard callbacks, all of which watch validation figures."""

import keras


def standard_callbacks(run, config, phase=None, monitor="val_loss"):
    """Early stopping (best weights restored), learning-rate reduction, checkpoint, CSV log.

    Args:
        run: the `runs.Run` being written (checkpoint and history go into its folder).
        config: uses `early_stopping_patience`, `reduce_lr_patience` and `reduce_lr_factor`.
        phase: None for one-phase training, else a name ("phase_2") for the checkpoint file;
            history.csv is appended to, so it holds every phase in order.
        monitor: a validation figure; never a test figure.
    """
    checkpoint_dir = run.path / "checkpoints"
    checkpoint_dir.mkdir(exist_ok=True)
    checkpoint_name = "best.keras" if phase is None else f"best_{phase}.keras"
    return [
        keras.callbacks.EarlyStopping(
            monitor=monitor, patience=config.early_stopping_patience, restore_best_weights=True, verbose=1
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, factor=config.reduce_lr_factor, patience=config.reduce_lr_patience, verbose=1
        ),
        keras.callbacks.ModelCheckpoint(checkpoint_dir / checkpoint_name, monitor=monitor, save_best_only=True),
        keras.callbacks.CSVLogger(run.path / "history.csv", append=True),
        keras.callbacks.TerminateOnNaN(),
    ]


def fit(model, x, y, validation_data, run, config, epochs=None, phase=None):
    """Trains `model` (already compiled) with `standard_callbacks`; returns the `History`.

    Args:
        x, y: training inputs and int labels.
        validation_data: (x_val, y_val); required, because every callback watches it.
        config: uses `epochs` (unless `epochs` is given), `batch_size`, `quiet` and what
            `standard_callbacks` uses.
        phase: see `standard_callbacks`.

    The model ends with the weights of its best validation epoch.
    """
    with run.timed("training"):
        return model.fit(
            x, y,
            validation_data=validation_data,
            epochs=epochs or config.epochs,
            batch_size=config.batch_size,
            callbacks=standard_callbacks(run, config, phase),
            verbose=0 if config.quiet else "auto",
        )


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
