"""Transfer learning on CIFAR-10 with a frozen ImageNet VGG16 (Keras functional API).

The main job. VGG16's convolutional base, with its ImageNet weights and frozen, turns each
image into features; a small custom head learns to classify them. Because the base never
changes, its features are computed once and cached: the head trains in seconds, a rerun
skips the extraction, and the saved model is still the whole model (raw images in, class
probabilities out), which is what the test figures are computed with.

The base is cut after block 4 (FEATURE_LAYER): block 5 pools a 32 px image down to a single
1x1 cell, and its features classify CIFAR-10 worse than block 4's (see docs/results.md).

    python src/transfer_learning.py                 # the full run, reports in out/
    python src/transfer_learning.py --subset 2000   # a quick look
    python src/transfer_learning.py --help          # every hyperparameter and flag
"""

import sys

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import cli, data, devices, features, models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
HARDWARE = devices.hardware()  # "gpu", "cpu_amx" (a CPU with AMX) or "cpu": picks the values that differ
PRECISION = "auto"  # "auto" (the device's fastest at full accuracy), "float32", "bfloat16" or "float16"
EPOCHS = 20 if HARDWARE == "gpu" else 8  # at most; early stopping may end training sooner
BATCH_SIZE = 512
LEARNING_RATE = 1e-3  # Adam's
IMAGE_SIZE = {"gpu": 128, "cpu_amx": 64, "cpu": 32}[HARDWARE]  # the side VGG16 sees; resized inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
TEST_SPLIT = 0.2  # share of each class held out for the test report, for class folders without test/
SEED = 42
FEATURE_LAYER = "block4_pool"  # where VGG16 is cut; block 5 pools a 32 px image to 1x1
HEAD_UNITS = 512
INPUT_DROPOUT = 0.2  # dropout on the flattened features
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 4 if HARDWARE == "gpu" else 3  # epochs without a lower validation loss before stopping
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau; "cosine": a cosine decay over EPOCHS
REDUCE_LR_PATIENCE = 1  # epochs without a lower validation loss before the rate is cut
REDUCE_LR_FACTOR = 0.2  # what the rate is multiplied by then
TEST_TIME_FLIP = True  # also predict each test image's mirror image and average (its features cached too)


def main(setup):
    keras.utils.set_random_seed(SEED)
    run = runs.Run(setup)
    with run.timed("data"):
        dataset = data.load_dataset(setup.data, VALIDATION_SPLIT, TEST_SPLIT, SEED, setup.subset)

    # VGG16 with its ImageNet weights, cut after FEATURE_LAYER and frozen.
    vgg16 = keras.applications.VGG16(include_top=False, weights=setup.weights, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    base = keras.Model(vgg16.input, vgg16.get_layer(FEATURE_LAYER).output, name="vgg16_base")
    base.trainable = False

    # Raw uint8 images in; VGG16's preprocessing and the resize inside; features out.
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    preprocessed = models.vgg16_preprocessing(dataset.image_shape, IMAGE_SIZE)(images)
    vgg16_features = base(preprocessed, training=False)  # inference mode for the frozen base, also in training
    feature_extractor = keras.Model(images, vgg16_features, name="feature_extractor")

    # The frozen base gives the same features every epoch: compute them once (cached on disk).
    image_sets = {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test}
    if TEST_TIME_FLIP:
        image_sets["test_mirrored"] = data.mirrored(dataset.x_test)
    with run.timed("features"):
        cached, from_cache = features.cached_features(feature_extractor, image_sets, BATCH_SIZE, setup.verbose)

    # The custom head, trained on the features.
    inputs = keras.Input(shape=vgg16_features.shape[1:], name="vgg16_features")
    x = layers.Flatten()(inputs)
    x = layers.Dropout(INPUT_DROPOUT)(x)
    x = layers.Dense(HEAD_UNITS, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(HEAD_DROPOUT)(x)
    # float32 even under mixed precision, so the probabilities and the loss keep full precision.
    outputs = layers.Dense(dataset.num_classes, activation="softmax", dtype="float32")(x)
    head = keras.Model(inputs, outputs, name="head")

    head.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    if LR_SCHEDULE == "plateau":
        schedule = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=REDUCE_LR_FACTOR,
                                                     patience=REDUCE_LR_PATIENCE, verbose=1)
    else:  # "cosine"
        schedule = keras.callbacks.LearningRateScheduler(training.cosine_decay(LEARNING_RATE, EPOCHS))
    # Every callback watches the validation loss; the test set is used once, at the end.
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=EARLY_STOPPING_PATIENCE,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.ModelCheckpoint(run.path / "checkpoints" / "best.keras", monitor="val_loss",
                                        save_best_only=True),
        schedule,
    ]
    # Batches shuffles every epoch in an order drawn from SEED and the epoch (so fit must not):
    # with the project's callbacks, a run stopped by Ctrl-C or a crash continues exactly.
    training_batches = data.Batches(cached["train"], dataset.y_train, BATCH_SIZE, shuffle=True, seed=SEED)
    callbacks += training.project_callbacks(run, callbacks, training_batches)
    history = head.fit(training_batches, validation_data=data.Batches(cached["val"], dataset.y_val, BATCH_SIZE),
                       epochs=EPOCHS, callbacks=callbacks, shuffle=False, verbose=setup.verbose)

    # The whole model: raw images -> preprocessing -> frozen VGG16 -> trained head (with
    # TEST_TIME_FLIP, averaged with the same for the mirror image). Compiled with the head's loss
    # and metric, so the saved model evaluates as is.
    predictions = head(vgg16_features)
    if TEST_TIME_FLIP:
        mirrored = models.mirror(preprocessed.shape[1:])(preprocessed)
        predictions = layers.Average(dtype="float32")([predictions, head(base(mirrored, training=False))])
    model = keras.Model(images, predictions, name="vgg16_frozen_functional")
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    # Its test predictions are the head's on the cached test features (checked against the
    # whole model on a sample), so a rerun does not push 10,000 images through VGG16 again.
    with run.timed("evaluation"):
        test_features = [cached[name] for name in ("test", "test_mirrored") if name in cached]
        test_predictions = features.predict_with_cached_features(model, head, test_features, dataset.x_test,
                                                                 BATCH_SIZE, run)
    reporting.write_run(run, model, dataset, history, test_predictions,
                        notes={"api": "functional", "strategy": "frozen", "features_from_cache": from_cache},
                        head_on_features=(head, cached["test"]))


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
