"""Two-phase selective fine-tuning of an ImageNet VGG16 on CIFAR-10 (Keras's recommended recipe).

Phase 1 trains a new head on the frozen base. Phase 2 unfreezes the base from a named layer
(UNFREEZE_FROM) and recompiles with a much lower learning rate, so the pretrained weights are
adjusted rather than overwritten, from phase 1's best weights. The loss plot spans both.

Two recipes, chosen by the hardware (see HARDWARE):

- on a GPU, phase 2 trains the whole model on images upscaled to IMAGE_SIZE, randomly
  flipped and shifted (AUGMENT);
- on a CPU (CACHE_FROZEN_BLOCKS), the blocks that stay frozen see the same images every epoch,
  so their activations, for every image and for its mirror image (the augmentation that
  survives caching), are computed once and cached; phase 1 trains the head and phase 2 the
  unfrozen top of the base and the head on them, in minutes. The head sits on block 4, whose
  2x2 output at 32 px keeps more than block 5's 1x1 (see docs/results.md).

    python src/fine_tune.py                                # this machine's recipe
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, data, devices, distribute, features, models, reporting, runs, training

import keras
import numpy as np
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
# Where a GPU and a CPU want different values, HARDWARE chooses: "gpu" where Keras sees a GPU.
HARDWARE = devices.hardware()
EPOCHS = 3 if HARDWARE == "gpu" else 10  # phase 1, the head on the frozen base: at most this many epochs
FINE_TUNE_EPOCHS = 8 if HARDWARE == "gpu" else 6  # phase 2, the unfrozen top of the base and the head
BATCH_SIZE = 250 if HARDWARE == "gpu" else 128
LEARNING_RATE = 1e-3  # Adam's, in phase 1
FINE_TUNE_LEARNING_RATE = 1e-4  # in phase 2: small, to adjust the pretrained weights, not overwrite them
IMAGE_SIZE = 128 if HARDWARE == "gpu" else 32  # the side VGG16 sees; images are resized to it inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
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
        training.WallTimeEstimate(phase),  # prints about how long the phase will take
        *training.tensorboard(run, config.tensorboard),  # with --tensorboard: logs in the run folder
    ]
    return [*callbacks, training.ResumeAfterInterruption(run, callbacks, phase)]  # rerun to go on after Ctrl-C


def main(config):
    keras.utils.set_random_seed(config.seed)
    run = runs.Run(config.out, config.script_name, config.resume_key)
    with run.timed("data"):
        dataset = data.load_dataset(config.data, config.validation_split, config.seed, config.subset)

    # VGG16 with its ImageNet weights, cut after FEATURE_LAYER, frozen for phase 1.
    vgg16 = keras.applications.VGG16(include_top=False, weights=config.weights,
                                     input_shape=(config.image_size, config.image_size, 3))
    base = keras.Model(vgg16.input, vgg16.get_layer(config.feature_layer).output, name="vgg16_base")
    base.trainable = False
    preprocessing = models.vgg16_preprocessing(dataset.image_shape, config.image_size)
    lower, upper = models.split_at(base, config.unfreeze_from)  # what stays frozen; what phase 2 trains

    # The custom head: the base's output in, class probabilities out.
    inputs = keras.Input(shape=base.output.shape[1:], name="vgg16_features")
    x = layers.Flatten()(inputs)
    x = layers.Dense(config.head_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = layers.Dense(dataset.num_classes, activation="softmax", dtype="float32")(x)
    head = keras.Model(inputs, outputs, name="head")

    # Phase 1: the head learns on the frozen base's output, computed once (cached on disk); with
    # CACHE_FROZEN_BLOCKS, from the lower blocks' cached activations, which phase 2 reuses.
    images, training_sets = {"train": dataset.x_train, "val": dataset.x_val}, ["train"]
    with run.timed("features"):
        if config.cache_frozen_blocks:
            if config.augment:  # the mirror images too: twice the training set
                images["train_mirrored"], training_sets = data.mirrored(dataset.x_train), ["train", "train_mirrored"]
            images["test"] = dataset.x_test
            if config.test_time_flip:
                images["test_mirrored"] = data.mirrored(dataset.x_test)
            activations, _ = features.cached_features(keras.Sequential([preprocessing, lower]), images,
                                                      config.batch_size, config.verbose)
            cached, _ = features.cached_features(upper, {name: activations[name] for name in [*training_sets, "val"]},
                                                 config.batch_size, config.verbose)
        else:
            cached, _ = features.cached_features(keras.Sequential([preprocessing, base]), images,
                                                 config.batch_size, config.verbose)
    y_train = np.tile(dataset.y_train, len(training_sets))
    head.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                 loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    phase_1 = head.fit(data.Batches([cached[name] for name in training_sets], y_train, config.batch_size,
                                    shuffle=True, seed=config.seed),
                       validation_data=data.Batches(cached["val"], dataset.y_val, config.batch_size),
                       epochs=config.epochs, verbose=config.verbose,
                       callbacks=phase_callbacks(run, config, "phase_1", config.epochs, config.learning_rate))

    # Phase 2: unfreeze from UNFREEZE_FROM on; the head keeps phase 1's best weights.
    base.trainable = True
    for layer in lower.layers:
        layer.trainable = False
    if config.cache_frozen_blocks:  # the trainable top learns on the cached activations
        trained = keras.Sequential([upper, head], name="vgg16_upper_and_head")
        x_train, x_val = [activations[name] for name in training_sets], activations["val"]
    else:  # the whole model learns on images, augmented in training when AUGMENT is on
        training_images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
        augmented = models.vgg16_preprocessing(dataset.image_shape, config.image_size, augment=config.augment)
        trained = keras.Model(training_images, head(base(augmented(training_images))), name="vgg16_training")
        x_train, x_val = dataset.x_train, dataset.x_val
    trained.compile(optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    validation = data.Batches(x_val, dataset.y_val, config.batch_size)
    start_loss, start_accuracy = trained.evaluate(validation, verbose=0)
    print(f"Phase 2: fine-tuning from {config.unfreeze_from} (validation loss at the start {start_loss:.4f})")
    phase_2 = trained.fit(data.Batches(x_train, y_train, config.batch_size, shuffle=True, seed=config.seed),
                          validation_data=validation, epochs=config.fine_tune_epochs, verbose=config.verbose,
                          callbacks=phase_callbacks(run, config, "phase_2", config.fine_tune_epochs,
                                                    config.fine_tune_learning_rate))

    # The saved model: raw images -> preprocessing -> base -> head (no augmentation); with
    # TEST_TIME_FLIP, the average over each image and its mirror image.
    test_images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    x = preprocessing(test_images)
    predictions = head(base(x))
    if config.test_time_flip:
        predictions = layers.Average(dtype="float32")([predictions, head(base(models.mirror(x.shape[1:])(x)))])
    model = keras.Model(test_images, predictions, name="vgg16_fine_tuned")
    model.compile(optimizer=keras.optimizers.Adam(config.fine_tune_learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        if config.cache_frozen_blocks:  # the trained top on the cached test activations, checked
            test_activations = [activations[name] for name in ("test", "test_mirrored") if name in activations]
            test_predictions = features.predict_with_cached_features(model, trained, test_activations,
                                                                     dataset.x_test, config.batch_size)
        else:
            test_predictions = distribute.predict(model, dataset.x_test, config.batch_size)
    reporting.write_run(run, model, dataset, [phase_1, phase_2], test_predictions, config.settings, notes={
        "api": "functional",
        "strategy": f"two-phase fine-tuning from {config.unfreeze_from}",
        "phase_2_start_val_loss": float(start_loss),
        "phase_2_start_val_accuracy": float(start_accuracy),
        "phase_1_epochs": len(phase_1.history["loss"]),
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
