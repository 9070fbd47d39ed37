"""Baselines trained from scratch on CIFAR-10: a small CNN, VGG11 and VGG16 with batch normalisation.

What transfer learning is measured against. MODEL picks the network:

- "small_cnn": three Conv-BN-Conv-BN-pool-dropout stages (32, 64, 128 filters) and a
  Dense 512 head, in the style of the reference projects (one reports 80%);
- "vgg11_bn", "vgg16_bn": VGG's convolution stacks with batch normalisation after every
  convolution, sized for 32x32 inputs (a reference reports 81.6% and 84.7%).

No pretrained weights are used (`--weights` is ignored). Images go in raw (uint8); the model
scales them to [-1, 1] itself and, in training, augments them (random flips and translations)
when AUGMENT is on; the saved model leaves the augmentation out.

    python src/baselines.py                       # the small CNN
    python src/baselines.py --model vgg16_bn      # slow without a GPU
"""

import sys

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import cli, data, devices, distribute, models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
HARDWARE = devices.hardware()  # "gpu", "cpu_amx" (a CPU with AMX) or "cpu": picks the values that differ
PRECISION = "auto"  # "auto" (the device's fastest at full accuracy), "float32", "bfloat16" or "float16"
MODEL = "small_cnn"  # or "vgg11_bn", "vgg16_bn"
EPOCHS = 30  # at most; early stopping may end training sooner
BATCH_SIZE = 128
LEARNING_RATE = 1e-3  # AdamW's
# AdamW's decoupled decay shrinks each kernel by LEARNING_RATE * WEIGHT_DECAY a step: an
# SGD-style 5e-4 would be 5e-7 a step here, next to nothing (see docs/results.md).
WEIGHT_DECAY = 0.05  # AdamW's, on the kernels only
IMAGE_SIZE = 32  # the side the network sees; images are resized to it inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
TEST_SPLIT = 0.2  # share of each class held out for the test report, for class folders without test/
SEED = 42
AUGMENT = True  # random flips and shifts of up to 4 pixels, in training only
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 6  # epochs without a lower validation loss before training stops
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau; "cosine": a cosine decay over EPOCHS
REDUCE_LR_PATIENCE = 3  # epochs without a lower validation loss before the rate is cut
REDUCE_LR_FACTOR = 0.2  # what the rate is multiplied by then

# Filters per convolution, "M" for 2x2 max pooling (Simonyan & Zisserman's configurations A and D).
VGG_LAYOUTS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
SMALL_CNN_LAYOUT = [32, 32, "M", "D", 64, 64, "M", "D", 128, 128, "M", "D"]


def convolution_stack(x, layout, dropout=0.25):
    """Conv(3x3)-BN-ReLU for each number in `layout`, 2x2 max pooling for "M", dropout for "D"."""
    for item in layout:
        if item == "M":
            x = layers.MaxPooling2D()(x)
        elif item == "D":
            x = layers.Dropout(dropout)(x)
        else:
            x = layers.Conv2D(item, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
    return x


def build_network(image_shape, num_classes):
    """Images scaled to [-1, 1] in, class probabilities out; MODEL chooses the network."""
    inputs = keras.Input(shape=image_shape, name="scaled_images")
    x = inputs
    if tuple(image_shape[:2]) != (IMAGE_SIZE, IMAGE_SIZE):
        models.note_downscaling(image_shape, IMAGE_SIZE)
        x = layers.Resizing(IMAGE_SIZE, IMAGE_SIZE, name="resize")(x)
    if MODEL == "small_cnn":
        x = convolution_stack(x, SMALL_CNN_LAYOUT)
        x = layers.Flatten()(x)
        x = layers.Dense(512, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    else:
        x = convolution_stack(x, VGG_LAYOUTS[MODEL])
        x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(HEAD_DROPOUT)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="network")


def decoupled_weight_decay(model, learning_rate, weight_decay):
    """AdamW that decays the kernels only: biases and batch-normalisation scales and offsets
    are left alone (as timm does), since shrinking them only limits what they can express."""
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) < 2])
    return optimizer


def main(setup):
    keras.utils.set_random_seed(SEED)
    run = runs.Run(setup)
    with run.timed("data"):
        dataset = data.load_dataset(setup.data, VALIDATION_SPLIT, TEST_SPLIT, SEED, setup.subset)

    # Raw uint8 images, scaled to [-1, 1]; augmented in training only; then the network.
    network = build_network(dataset.image_shape, dataset.num_classes)
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    scaled = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(images)
    model = keras.Model(images, network(scaled), name=MODEL)
    augmented = models.augmentation()(scaled) if AUGMENT else scaled
    trained = keras.Model(images, network(augmented), name=f"{MODEL}_augmented")

    trained.compile(optimizer=decoupled_weight_decay(trained, LEARNING_RATE, WEIGHT_DECAY),
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
    training_batches = data.Batches(dataset.x_train, dataset.y_train, BATCH_SIZE, shuffle=True,
                                    seed=SEED)
    callbacks += training.project_callbacks(run, callbacks, training_batches)
    validation_batches = data.Batches(dataset.x_val, dataset.y_val, BATCH_SIZE)
    history = trained.fit(training_batches, validation_data=validation_batches, epochs=EPOCHS,
                          callbacks=callbacks, verbose=setup.verbose, shuffle=False)

    # The saved model: the same layers without the augmentation, compiled as it was trained.
    model.compile(optimizer=decoupled_weight_decay(model, LEARNING_RATE, WEIGHT_DECAY),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        test_predictions = distribute.predict(model, dataset.x_test, BATCH_SIZE)
    reporting.write_run(run, model, dataset, history, test_predictions, notes={
        "api": "functional",
        "strategy": f"{MODEL} from scratch" + (" with augmentation" if AUGMENT else ""),
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, globals(), pretrained=False))
