"""Transfer learning on CIFAR-10 with an ImageNet VGG16 and a convolutional head (Sequential API).

The whole model is one `keras.Sequential`: VGG16's preprocessing and the resize to IMAGE_SIZE
(raw uint8 images in), the VGG16 base, and a convolutional head in the style of the reference
project (two Conv2D-BN pairs, pooling and dropout, twice; then Dense 512).

The head's two poolings need a base output of at least 4x4. The adjustment: the base is cut
after block 4 (FEATURE_LAYER) and images are upscaled to 64 px inside the model, which gives
4x4x512; the full base would need 128 px for the same room, four times the compute.

TRAIN_BASE chooses between the two policies the reference compares: False (default) freezes
the base and trains the head on cached features; True trains base and head together on
augmented images, at LEARNING_RATE (slow without a GPU).

    python src/transfer_learning_sequential.py
    python src/transfer_learning_sequential.py --train-base
"""

import sys

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import cli, data, devices, distribute, features, models, reporting, runs, training
from vgg_transfer.errors import InputError

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
HARDWARE = devices.hardware()  # "gpu", "cpu_amx" (a CPU with AMX) or "cpu": picks the values that differ
PRECISION = "auto"  # "auto" (the device's fastest at full accuracy), "float32", "bfloat16" or "float16"
EPOCHS = 10  # at most; early stopping may end training sooner
BATCH_SIZE = 256
LEARNING_RATE = 1e-3  # Adam's
IMAGE_SIZE = 64  # the side VGG16 sees; 64 px leaves block 4 a 4x4 output for the head's poolings
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
TEST_SPLIT = 0.2  # share of each class held out for the test report, for class folders without test/
SEED = 42
FEATURE_LAYER = "block4_pool"  # where VGG16 is cut
TRAIN_BASE = False  # False: frozen base, cached features; True: base and head trained together
HEAD_UNITS = 512
CONV_DROPOUT = 0.25
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3  # epochs without a lower validation loss before training stops
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau; "cosine": a cosine decay over EPOCHS
REDUCE_LR_PATIENCE = 1  # epochs without a lower validation loss before the rate is cut
REDUCE_LR_FACTOR = 0.2  # what the rate is multiplied by then


def main(setup):
    keras.utils.set_random_seed(SEED)
    run = runs.Run(setup)
    with run.timed("data"):
        dataset = data.load_dataset(setup.data, VALIDATION_SPLIT, TEST_SPLIT, SEED, setup.subset)

    # VGG16 with its ImageNet weights, cut after FEATURE_LAYER; frozen unless TRAIN_BASE.
    vgg16 = keras.applications.VGG16(include_top=False, weights=setup.weights,
                                     input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    base = keras.Model(vgg16.input, vgg16.get_layer(FEATURE_LAYER).output, name="vgg16_base")
    if min(base.output.shape[1:3]) < 4:
        raise InputError(
            f"the convolutional head needs a base output of at least 4x4, and {FEATURE_LAYER} at "
            f"--image-size {IMAGE_SIZE} gives {base.output.shape[1]}x{base.output.shape[2]}; "
            f"raise --image-size or cut the base earlier with --feature-layer"
        )
    base.trainable = TRAIN_BASE

    # The reference's convolutional head, on the base's features.
    head = keras.Sequential([
        keras.Input(shape=base.output.shape[1:], name="vgg16_features"),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.MaxPooling2D(),
        layers.Dropout(CONV_DROPOUT),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.MaxPooling2D(),
        layers.Dropout(CONV_DROPOUT),
        layers.Flatten(),
        layers.Dense(HEAD_UNITS, activation="relu"),
        layers.BatchNormalization(),
        layers.Dropout(HEAD_DROPOUT),
        layers.Dense(dataset.num_classes, activation="softmax", dtype="float32"),
    ], name="head")
    preprocessing = models.vgg16_preprocessing(dataset.image_shape, IMAGE_SIZE)
    model = keras.Sequential([preprocessing, base, head], name="vgg16_sequential")

    if TRAIN_BASE:  # base and head learn together, on augmented images
        augmented = models.vgg16_preprocessing(dataset.image_shape, IMAGE_SIZE, augment=True)
        trained = keras.Sequential([augmented, base, head], name="vgg16_sequential_augmented")
        x_train, x_val = dataset.x_train, dataset.x_val
    else:  # frozen base: the head learns on its features, the same every epoch, so computed once
        trained = head
        with run.timed("features"):
            cached, _ = features.cached_features(
                keras.Sequential([preprocessing, base]),
                {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test},
                BATCH_SIZE, setup.verbose)
        x_train, x_val = cached["train"], cached["val"]

    trained.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if LR_SCHEDULE == "plateau":
        schedule = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=REDUCE_LR_FACTOR,
                                                     patience=REDUCE_LR_PATIENCE, verbose=1)
    else:  # "cosine"
        schedule = keras.callbacks.LearningRateScheduler(training.cosine_decay(LEARNING_RATE, EPOCHS))
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=EARLY_STOPPING_PATIENCE,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.ModelCheckpoint(run.path / "checkpoints" / "best.keras", monitor="val_loss",
                                        save_best_only=True),
        schedule,
    ]
    # Batches shuffles every epoch in an order drawn from SEED and the epoch (so fit must not):
    # with the project's callbacks, a run stopped by Ctrl-C or a crash continues exactly.
    training_batches = data.Batches(x_train, dataset.y_train, BATCH_SIZE, shuffle=True, seed=SEED)
    callbacks += training.project_callbacks(run, callbacks, training_batches)
    history = trained.fit(training_batches, validation_data=data.Batches(x_val, dataset.y_val, BATCH_SIZE),
                          epochs=EPOCHS, callbacks=callbacks, verbose=setup.verbose, shuffle=False)

    # The saved model: preprocessing, base, head (no augmentation), compiled as it was trained.
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        if TRAIN_BASE:
            test_predictions = distribute.predict(model, dataset.x_test, BATCH_SIZE)
        else:  # the head on the cached test features, checked against the whole model
            test_predictions = features.predict_with_cached_features(model, head, cached["test"], dataset.x_test,
                                                                     BATCH_SIZE, run)
    reporting.write_run(run, model, dataset, history, test_predictions, notes={
        "api": "sequential", "strategy": "trainable base" if TRAIN_BASE else "frozen",
    }, head_on_features=None if TRAIN_BASE else (head, cached["test"]))


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
