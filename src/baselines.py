"""Baselines trained from scratch on CIFAR-10: a small CNN, VGG11 and VGG16 with batch normalisation.

What transfer learning is measured against. MODEL picks the network:

- "small_cnn": three Conv-BN-Conv-BN-pool-dropout stages (32, 64, 128 filters) and a
  Dense 512 head, in the style of the reference projects (one reports 80%);
- "vgg11_bn", "vgg16_bn": VGG's convolution stacks with batch normalisation after every
  convolution, sized for 32x32 inputs (a reference reports 81.6% and 84.7%).

No pretrained weights are used (`--weights` is ignored). Images go in raw (uint8); the
model scales them to [-1, 1] itself, and augments them (random flips and translations)
in training when AUGMENT is on.

    python src/baselines.py                       # the small CNN
    python src/baselines.py --model vgg16_bn      # slow without a GPU
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, model as models, reporting, runs, training
from vgg_transfer.errors import InputError

import keras
from keras import layers

MODEL = "small_cnn"
EPOCHS = 30
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
# AdamW's decoupled decay shrinks each kernel by LEARNING_RATE * WEIGHT_DECAY a step: an
# SGD-style 5e-4 would be 5e-7 a step here, next to nothing (see the README's figures).
WEIGHT_DECAY = 0.05
IMAGE_SIZE = 32
VALIDATION_SPLIT = 0.1
SEED = 42
AUGMENT = True
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 6
LR_SCHEDULE = "plateau"  # the two below; or "cosine" (see training.learning_rate_callback)
REDUCE_LR_PATIENCE = 3
REDUCE_LR_FACTOR = 0.2

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


def build_model(image_shape, num_classes, config):
    """Raw uint8 images in, class probabilities out; MODEL chooses the network."""
    inputs = models.image_input(image_shape)
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(inputs)
    if config.augment:
        x = models.augmentation()(x)
    if tuple(image_shape[:2]) != (config.image_size, config.image_size):
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
    outputs = models.class_probabilities(num_classes)(x)
    return keras.Model(inputs, outputs, name=config.model)


def decoupled_weight_decay(classifier, config):
    """AdamW that decays the kernels only: biases and batch-normalisation scales and offsets
    are left alone (as timm does), since shrinking them only limits what they can express."""
    optimizer = keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
    optimizer.exclude_from_weight_decay(var_list=[v for v in classifier.trainable_variables if len(v.shape) < 2])
    return optimizer


def main(config):
    keras.utils.set_random_seed(config.seed)
    if config.model not in ("small_cnn", *VGG_LAYOUTS):
        raise InputError(f"--model {config.model!r} is not a baseline; use small_cnn, vgg11_bn or vgg16_bn")
    config.weights = "none"  # trained from scratch, whatever --weights says
    run, weights, dataset = runs.prepare(config, "baselines")
    weights.source = "none (trained from scratch)"
    classifier = build_model(dataset.image_shape, dataset.num_classes, config)
    training.compile_classifier(classifier, optimizer=decoupled_weight_decay(classifier, config))
    history = training.fit(classifier, dataset.x_train, dataset.y_train, (dataset.x_val, dataset.y_val), run, config)
    reporting.finish_run(run, classifier, dataset, history, config, weights, extra={
        "api": "functional",
        "strategy": f"{config.model} from scratch" + (" with augmentation" if config.augment else ""),
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, __doc__, cli.constants(globals())))
