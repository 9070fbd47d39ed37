"""Two-phase selective fine-tuning of an ImageNet VGG16 on CIFAR-10 (Keras's recommended recipe).

Phase 1 trains a new head on the frozen base (on cached features, as the main job does).
Phase 2 unfreezes the base from a named block boundary (UNFREEZE_FROM), recompiles with a
much lower learning rate so the pretrained weights are adjusted rather than overwritten, and
continues from phase 1's best weights. Both phases use early stopping, learning-rate
reduction and checkpointing on validation figures; the loss plot spans both, with the switch
marked.

With AUGMENT on (the default: random flips and small shifts, in training only), phase 2
trains on images. With --no-augment, the frozen lower blocks see the same images every
epoch, so their activations are computed once and cached, and phase 2 trains only the
unfrozen top on them: on a 2-core CPU, fine-tuning block 5 on all of CIFAR-10 then took 22
minutes (see docs/results.md).

    python src/fine_tune.py                              # augmentation, best on a GPU
    python src/fine_tune.py --no-augment                 # cached lower blocks, fast on a CPU
    python src/fine_tune.py --unfreeze-from block4_conv1 # unfreeze more of the base
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, data, distribute, features, models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
EPOCHS = 8  # phase 1, the head on the frozen base: at most this many epochs
FINE_TUNE_EPOCHS = 10  # phase 2, the unfrozen top of the base and the head
BATCH_SIZE = 128
LEARNING_RATE = 1e-3  # Adam's, in phase 1
FINE_TUNE_LEARNING_RATE = 1e-5  # in phase 2: small, to adjust the pretrained weights, not overwrite them
IMAGE_SIZE = 32  # the side VGG16 sees; images are resized to it inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
SEED = 42
UNFREEZE_FROM = "block5_conv1"  # phase 2 trains this layer and every one after it
AUGMENT = True  # random flips and shifts in phase 2; --no-augment caches the frozen blocks' output
HEAD_UNITS = 512
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3  # epochs without a lower validation loss before a phase stops
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau; "cosine": a cosine decay over each phase
REDUCE_LR_PATIENCE = 1  # epochs without a lower validation loss before the rate is cut
REDUCE_LR_FACTOR = 0.2  # what the rate is multiplied by then


def phase_callbacks(run, config, phase, epochs, learning_rate):
    """The callbacks of one phase, each watching the validation loss, and resumable."""
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.ModelCheckpoint(run.path / "checkpoints" / f"best_{phase}.keras", monitor="val_loss",
                                        save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=config.reduce_lr_factor,
                                          patience=config.reduce_lr_patience, verbose=1)
        if config.lr_schedule == "plateau" else
        keras.callbacks.LearningRateScheduler(training.cosine_decay(learning_rate, epochs)),
        keras.callbacks.TerminateOnNaN(),
    ]
    return [*callbacks, training.ResumeAfterInterruption(run, callbacks, phase)]  # rerun to go on after Ctrl-C


def main(config):
    keras.utils.set_random_seed(config.seed)
    run = runs.Run(config.out, config.script_name, config.resume_key)
    with run.timed("data"):
        dataset = data.load_dataset(config.data, config.validation_split, config.seed, config.subset)

    # VGG16's convolutional base with its ImageNet weights, frozen for phase 1.
    base = keras.applications.VGG16(include_top=False, weights=config.weights,
                                    input_shape=(config.image_size, config.image_size, 3))
    base.trainable = False
    preprocessing = models.vgg16_preprocessing(dataset.image_shape, config.image_size)

    # The custom head: VGG16's block5_pool output in, class probabilities out.
    inputs = keras.Input(shape=base.output.shape[1:], name="vgg16_features")
    x = layers.Flatten()(inputs)
    x = layers.Dense(config.head_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = layers.Dense(dataset.num_classes, activation="softmax", dtype="float32")(x)
    head = keras.Model(inputs, outputs, name="head")

    # Phase 1: the head learns on the frozen base's features, computed once (cached on disk).
    with run.timed("features"):
        cached, _ = features.cached_features(keras.Sequential([preprocessing, base]),
                                             {"train": dataset.x_train, "val": dataset.x_val},
                                             config.batch_size, config.verbose)
    head.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    print(f"Phase 1: training the head on the frozen base ({config.epochs} epochs at most)")
    phase_1 = head.fit(cached["train"], dataset.y_train, validation_data=(cached["val"], dataset.y_val),
                       epochs=config.epochs, batch_size=config.batch_size, verbose=config.verbose,
                       callbacks=phase_callbacks(run, config, "phase_1", config.epochs, config.learning_rate))

    # Phase 2: unfreeze from UNFREEZE_FROM on; the head keeps phase 1's best weights.
    base.trainable = True
    for layer in base.layers[:[layer.name for layer in base.layers].index(config.unfreeze_from)]:
        layer.trainable = False
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    # training=False keeps any normalisation layer of the base in inference mode.
    model = keras.Model(images, head(base(preprocessing(images), training=False)), name="vgg16_fine_tuned")
    if config.augment:  # phase 2 trains on augmented images
        augmented = models.vgg16_preprocessing(dataset.image_shape, config.image_size, augment=True)
        trained = keras.Model(images, head(base(augmented(images), training=False)), name="vgg16_augmented")
        x_train, x_val = dataset.x_train, dataset.x_val
    else:  # the frozen lower blocks give the same activations every epoch: cache them, train the rest
        lower, upper = models.split_at(base, config.unfreeze_from)
        with run.timed("features"):
            activations, _ = features.cached_features(
                keras.Sequential([preprocessing, lower]),
                {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test},
                config.batch_size, config.verbose)
        trained = keras.Sequential([upper, head], name="vgg16_upper_and_head")
        x_train, x_val = activations["train"], activations["val"]
    trained.compile(optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start_loss, start_accuracy = trained.evaluate(x_val, dataset.y_val, batch_size=config.batch_size, verbose=0)
    print(f"Phase 2: fine-tuning from {config.unfreeze_from} (validation loss at the start {start_loss:.4f})")
    phase_2 = trained.fit(x_train, dataset.y_train, validation_data=(x_val, dataset.y_val),
                          epochs=config.fine_tune_epochs, batch_size=config.batch_size, verbose=config.verbose,
                          callbacks=phase_callbacks(run, config, "phase_2", config.fine_tune_epochs,
                                                    config.fine_tune_learning_rate))

    # The saved model: preprocessing, base and head (no augmentation), compiled as phase 2 trained.
    model.compile(optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        if config.augment:
            test_predictions = distribute.predict(model, dataset.x_test, config.batch_size)
        else:  # the trained top on the cached lower activations, checked against the whole model
            test_predictions = features.predict_with_cached_features(model, trained, activations["test"],
                                                                     dataset.x_test, config.batch_size)
    reporting.write_run(run, model, dataset, [phase_1, phase_2], test_predictions, config.settings, notes={
        "api": "functional",
        "strategy": f"two-phase fine-tuning from {config.unfreeze_from}",
        "phase_2_start_val_loss": float(start_loss),
        "phase_2_start_val_accuracy": float(start_accuracy),
        "phase_1_epochs": len(phase_1.history["loss"]),
        "phase_2_cached_lower_activations": not config.augment,
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
