"""Two-phase selective fine-tuning of an ImageNet VGG16 on CIFAR-10 (Keras's recommended recipe).

Phase 1 trains a new head on the frozen base. Phase 2 unfreezes the base from UNFREEZE_FROM and
recompiles at a 10x lower rate: the pretrained weights are adjusted, not overwritten.

Two recipes: `on_images` (a GPU's) and `on_cached_activations` (a CPU's, CACHE_FROZEN_BLOCKS); on a
CPU the head sits on block 4, which keeps more of a small image than block 5.

    python src/fine_tune.py    # this machine's recipe; --help lists every flag
"""

import sys

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import cli, data, devices, distribute, features, models, reporting, runs, training

import keras
import numpy as np
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
HARDWARE = devices.hardware()  # "gpu", "cpu_amx" (a CPU with AMX) or "cpu": picks the values that differ
PRECISION = "auto"  # "auto" (the device's fastest at full accuracy), "float32", "bfloat16" or "float16"
EPOCHS = 3 if HARDWARE == "gpu" else 10  # phase 1, the head on the frozen base: at most this many epochs
FINE_TUNE_EPOCHS = 8 if HARDWARE == "gpu" else 6  # phase 2, the unfrozen top of the base and the head
BATCH_SIZE = 250 if HARDWARE == "gpu" else 128
LEARNING_RATE = 1e-3  # Adam's, in phase 1
FINE_TUNE_LEARNING_RATE = 1e-4  # in phase 2: small, to adjust the pretrained weights, not overwrite them
IMAGE_SIZE = {"gpu": 128, "cpu_amx": 64, "cpu": 32}[HARDWARE]  # the side VGG16 sees; resized inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
TEST_SPLIT = 0.2  # share of each class held out for the test report, for class folders without test/
SEED = 42
FEATURE_LAYER = "block5_pool" if HARDWARE == "gpu" else "block4_pool"  # the head's input: where VGG16 is cut
UNFREEZE_FROM = "block1_conv1" if HARDWARE == "gpu" else "block4_conv3"  # phase 2 trains it and all after it
CACHE_FROZEN_BLOCKS = False if HARDWARE == "gpu" else True  # cache the frozen blocks' output (fast on a CPU)
AUGMENT = True  # random flips and shifts of images; with cached blocks, each image and its mirror image
TEST_TIME_FLIP = False if HARDWARE == "gpu" else True  # predict each test image and its mirror image; average
HEAD_UNITS = 512
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3  # epochs without a lower validation loss before a phase stops
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau; "cosine": a cosine decay over each phase
REDUCE_LR_PATIENCE = 1  # epochs without a lower validation loss before the rate is cut
REDUCE_LR_FACTOR = 0.2  # what the rate is multiplied by then


def fit_phase(run, phase, model, learning_rate, epochs, x_train, y_train, x_val, y_val):
    """Compiles `model` at `learning_rate` and fits it, every callback watching the validation loss."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    if LR_SCHEDULE == "plateau":
        schedule = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=REDUCE_LR_FACTOR,
                                                     patience=REDUCE_LR_PATIENCE, verbose=1)
    else:  # "cosine"
        schedule = keras.callbacks.LearningRateScheduler(training.cosine_decay(learning_rate, epochs))
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=EARLY_STOPPING_PATIENCE,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.ModelCheckpoint(run.path / "checkpoints" / f"best_{phase}.keras", monitor="val_loss",
                                        save_best_only=True),
        schedule,
    ]
    # Batches shuffles in an order drawn from SEED and the epoch (so fit must not): a resumed run continues exactly.
    training_batches = data.Batches(x_train, y_train, BATCH_SIZE, shuffle=True, seed=SEED)
    callbacks += training.project_callbacks(run, callbacks, training_batches, phase)
    validation = data.Batches(x_val, y_val, BATCH_SIZE)
    run.checks[f"{phase}_start_val_loss"] = model.evaluate(validation, verbose=0)[0]  # phase 2: phase 1's best
    return model.fit(training_batches, validation_data=validation, epochs=epochs, callbacks=callbacks,
                     shuffle=False, verbose=run.setup.verbose)


def on_images(run, dataset, preprocessing, base, head):
    """Keras's recipe (GPU): the head on the frozen base's features, computed once; then, after
    unfreezing from UNFREEZE_FROM, the base and the head together on augmented images."""
    with run.timed("features"):
        cached, _ = features.cached_features(keras.Sequential([preprocessing, base]),
                                             {"train": dataset.x_train, "val": dataset.x_val}, BATCH_SIZE,
                                             run.setup.verbose)
    phase_1 = fit_phase(run, "phase_1", head, LEARNING_RATE, EPOCHS, cached["train"], dataset.y_train,
                        cached["val"], dataset.y_val)
    # Unfreeze from UNFREEZE_FROM on, recompile at a low rate and fit again, from phase 1's best weights.
    unfreeze_from(base, UNFREEZE_FROM)
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    augmented = models.vgg16_preprocessing(dataset.image_shape, IMAGE_SIZE, augment=AUGMENT)(images)
    trained = keras.Model(images, head(base(augmented)), name="vgg16_training")
    phase_2 = fit_phase(run, "phase_2", trained, FINE_TUNE_LEARNING_RATE, FINE_TUNE_EPOCHS, dataset.x_train,
                        dataset.y_train, dataset.x_val, dataset.y_val)
    model = whole_model(dataset, preprocessing, base, head)
    with run.timed("evaluation"):
        return [phase_1, phase_2], model, distribute.predict(model, dataset.x_test, BATCH_SIZE)


def on_cached_activations(run, dataset, preprocessing, base, head):
    """The CPU recipe: the blocks below UNFREEZE_FROM stay frozen in both phases, so their
    activations of every image and of its mirror image (AUGMENT) are computed once and cached;
    phase 1 trains the head, phase 2 the blocks from UNFREEZE_FROM on and the head, on them."""
    lower, upper = models.split_at(base, UNFREEZE_FROM)  # what stays frozen; what phase 2 trains
    training_sets = ["train", "train_mirrored"] if AUGMENT else ["train"]
    test_sets = ["test", "test_mirrored"] if TEST_TIME_FLIP else ["test"]
    mirror_images_of = {"train_mirrored": dataset.x_train, "test_mirrored": dataset.x_test}
    images = {name: data.mirrored(mirror_images_of[name]) if name in mirror_images_of else getattr(dataset, f"x_{name}")
              for name in [*training_sets, "val", *test_sets]}
    y_train = np.tile(dataset.y_train, len(training_sets))
    with run.timed("features"):
        activations, _ = features.cached_features(keras.Sequential([preprocessing, lower]), images, BATCH_SIZE,
                                                  run.setup.verbose)
        cached, _ = features.cached_features(upper, {name: activations[name] for name in [*training_sets, "val"]},
                                             BATCH_SIZE, run.setup.verbose)
    phase_1 = fit_phase(run, "phase_1", head, LEARNING_RATE, EPOCHS, [cached[name] for name in training_sets],
                        y_train, cached["val"], dataset.y_val)
    unfreeze_from(base, UNFREEZE_FROM)  # the unfrozen blocks and the head learn on the cached activations
    trained = keras.Sequential([upper, head], name="vgg16_upper_and_head")
    phase_2 = fit_phase(run, "phase_2", trained, FINE_TUNE_LEARNING_RATE, FINE_TUNE_EPOCHS,
                        [activations[name] for name in training_sets], y_train, activations["val"], dataset.y_val)
    model = whole_model(dataset, preprocessing, base, head)
    with run.timed("evaluation"):  # the trained top on the cached test activations, checked
        return [phase_1, phase_2], model, features.predict_with_cached_features(
            model, trained, [activations[name] for name in test_sets], dataset.x_test, BATCH_SIZE, run)


def unfreeze_from(base, layer_name):
    """Makes the base trainable from `layer_name` on; the layers below it stay frozen."""
    base.trainable = True
    for layer in base.layers[:[layer.name for layer in base.layers].index(layer_name)]:
        layer.trainable = False


def whole_model(dataset, preprocessing, base, head):
    """The saved model: raw images, preprocessing, base, head; with TEST_TIME_FLIP, also the mirror image's."""
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    x = preprocessing(images)
    predictions = head(base(x))
    if TEST_TIME_FLIP:
        predictions = layers.Average(dtype="float32")([predictions, head(base(models.mirror(x.shape[1:])(x)))])
    model = keras.Model(images, predictions, name="vgg16_fine_tuned")
    model.compile(optimizer=keras.optimizers.Adam(FINE_TUNE_LEARNING_RATE), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def main(setup):
    keras.utils.set_random_seed(SEED)
    run = runs.Run(setup)
    with run.timed("data"):
        dataset = data.load_dataset(setup.data, VALIDATION_SPLIT, TEST_SPLIT, SEED, setup.subset)

    # VGG16 with its ImageNet weights, cut after FEATURE_LAYER, frozen for phase 1.
    vgg16 = keras.applications.VGG16(include_top=False, weights=setup.weights, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    base = keras.Model(vgg16.input, vgg16.get_layer(FEATURE_LAYER).output, name="vgg16_base")
    base.trainable = False
    preprocessing = models.vgg16_preprocessing(dataset.image_shape, IMAGE_SIZE)

    # The custom head: the base's output in, class probabilities out.
    inputs = keras.Input(shape=base.output.shape[1:], name="vgg16_features")
    x = layers.Flatten()(inputs)
    x = layers.Dense(HEAD_UNITS, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(HEAD_DROPOUT)(x)
    outputs = layers.Dense(dataset.num_classes, activation="softmax", dtype="float32")(x)
    head = keras.Model(inputs, outputs, name="head")

    recipe = on_cached_activations if CACHE_FROZEN_BLOCKS else on_images
    phases, model, test_predictions = recipe(run, dataset, preprocessing, base, head)
    reporting.write_run(run, model, dataset, phases, test_predictions, notes={
        "api": "functional", "strategy": f"two-phase fine-tuning from {UNFREEZE_FROM} ({recipe.__name__})",
        "phase_1_epochs": len(phases[0].history["loss"])})


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
