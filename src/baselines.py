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

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, data, devices, distribute, models, reporting, runs, training
from vgg_transfer.errors import InputError

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
# Where a GPU and a CPU want different values, HARDWARE chooses: "gpu" where Keras sees a GPU.
HARDWARE = devices.hardware()
MODEL = "small_cnn"  # or "vgg11_bn", "vgg16_bn"
EPOCHS = 30  # at most; early stopping may end training sooner
BATCH_SIZE = 128
LEARNING_RATE = 1e-3  # AdamW's
# AdamW's decoupled decay shrinks each kernel by LEARNING_RATE * WEIGHT_DECAY a step: an
# SGD-style 5e-4 would be 5e-7 a step here, next to nothing (see docs/results.md).
WEIGHT_DECAY = 0.05
IMAGE_SIZE = 32  # the side the network sees; images are resized to it inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
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


def build_network(image_shape, num_classes, config):
    """Images scaled to [-1, 1] in, class probabilities out; MODEL chooses the network."""
    inputs = keras.Input(shape=image_shape, name="scaled_images")
    x = inputs
    if tuple(image_shape[:2]) != (config.image_size, config.image_size):
        models.note_downscaling(image_shape, config.image_size)
        x = layers.Resizing(config.image_size, config.image_size, name="resize")(x)
    if config.model == "small_cnn":
        x = convolution_stack(x, SMALL_CNN_LAYOUT)
        x = layers.Flatten()(x)
        x = layers.Dense(512, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    else:
        x = convolution_stack(x, VGG_LAYOUTS[config.model])
        x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="network")


def decoupled_weight_decay(model, learning_rate, weight_decay):
    """AdamW that decays the kernels only: biases and batch-normalisation scales and offsets
    are left alone (as timm does), since shrinking them only limits what they can express."""
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) < 2])
    return optimizer


def main(config):
    if config.model not in ("small_cnn", *VGG_LAYOUTS):
        raise InputError(f"--model {config.model!r} is not a baseline; use small_cnn, vgg11_bn or vgg16_bn")
    keras.utils.set_random_seed(config.seed)
    run = runs.Run(config.out, config.script_name, config.resume_key)
    with run.timed("data"):
        dataset = data.load_dataset(config.data, config.validation_split, config.seed, config.subset)

    # Raw uint8 images, scaled to [-1, 1]; augmented in training only; then the network.
    network = build_network(dataset.image_shape, dataset.num_classes, config)
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    scaled = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(images)
    model = keras.Model(images, network(scaled), name=config.model)
    augmented = models.augmentation()(scaled) if config.augment else scaled
    trained = keras.Model(images, network(augmented), name=f"{config.model}_augmented")

    trained.compile(optimizer=decoupled_weight_decay(trained, config.learning_rate, config.weight_decay),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience,
                                      restore_best_weights=True, verbose=1),
        keras.callbacks.ModelCheckpoint(run.path / "checkpoints" / "best.keras", monitor="val_loss",
                                        save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=config.reduce_lr_factor,
                                          patience=config.reduce_lr_patience, verbose=1)
        if config.lr_schedule == "plateau" else
        keras.callbacks.LearningRateScheduler(training.cosine_decay(config.learning_rate, config.epochs)),
        keras.callbacks.TerminateOnNaN(),
        training.WallTimeEstimate(),  # prints about how long training will take
        *training.tensorboard(run, config.tensorboard),  # with --tensorboard: logs in the run folder
    ]
    callbacks.append(training.ResumeAfterInterruption(run, callbacks))  # after Ctrl-C or a kill: rerun to go on
    training_batches = data.Batches(dataset.x_train, dataset.y_train, config.batch_size, shuffle=True,
                                    seed=config.seed)
    validation_batches = data.Batches(dataset.x_val, dataset.y_val, config.batch_size)
    history = trained.fit(training_batches, validation_data=validation_batches, epochs=config.epochs,
                          callbacks=callbacks, verbose=config.verbose)

    # The saved model: the same layers without the augmentation, compiled as it was trained.
    model.compile(optimizer=decoupled_weight_decay(model, config.learning_rate, config.weight_decay),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        test_predictions = distribute.predict(model, dataset.x_test, config.batch_size)
    reporting.write_run(run, model, dataset, history, test_predictions, config.settings, notes={
        "api": "functional",
        "strategy": f"{config.model} from scratch" + (" with augmentation" if config.augment else ""),
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
