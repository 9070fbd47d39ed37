"""Transfer learning on CIFAR-10 with an ImageNet VGG16 and a convolutional head (Sequential API).

The whole model is one `keras.Sequential`: raw uint8 images, VGG16's preprocessing, the
resize to IMAGE_SIZE, the VGG16 base, and a convolutional head in the style of the
reference project (two Conv2D-BN pairs, pooling and dropout, twice; then Dense 512).

The head's two poolings need a base output of at least 4x4. The adjustment: the base is
cut after block 4 (FEATURE_LAYER) and images are upscaled to 64 px inside the model, which
gives 4x4x512; the full base would need 128 px for the same room, four times the compute.

TRAIN_BASE chooses between the two policies the reference compares: False (default)
freezes the base and trains the head on cached features; True trains base and head
together on images, with augmentation, at LEARNING_RATE (slow without a GPU).

    python src/transfer_learning_sequential.py
    python src/transfer_learning_sequential.py --train-base
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, features, model as models, reporting, runs, training
from vgg_transfer.errors import InputError

import keras
from keras import layers

EPOCHS = 10
BATCH_SIZE = 256
LEARNING_RATE = 1e-3
IMAGE_SIZE = 64
VALIDATION_SPLIT = 0.1
SEED = 42
FEATURE_LAYER = "block4_pool"
TRAIN_BASE = False
HEAD_UNITS = 512
CONV_DROPOUT = 0.25
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3
LR_SCHEDULE = "plateau"  # the two below; or "cosine" (see training.learning_rate_callback)
REDUCE_LR_PATIENCE = 1
REDUCE_LR_FACTOR = 0.2


def build_head(feature_shape, num_classes, config):
    """The reference's convolutional head, as a Sequential model on the base's features."""
    return keras.Sequential([
        keras.Input(shape=feature_shape, name="vgg16_features"),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.MaxPooling2D(),
        layers.Dropout(config.conv_dropout),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.BatchNormalization(),
        layers.MaxPooling2D(),
        layers.Dropout(config.conv_dropout),
        layers.Flatten(),
        layers.Dense(config.head_units, activation="relu"),
        layers.BatchNormalization(),
        layers.Dropout(config.head_dropout),
        models.class_probabilities(num_classes),
    ], name="head")


def main(config):
    keras.utils.set_random_seed(config.seed)
    models.validate_layer_name(config.feature_layer, "--feature-layer")
    run, weights, dataset = runs.prepare(config, "transfer_learning_sequential")
    base = models.build_vgg16_base(weights, config.image_size, output_layer=config.feature_layer)
    if min(base.output.shape[1:3]) < 4:
        raise InputError(
            f"the convolutional head needs a base output of at least 4x4, and {config.feature_layer} at "
            f"--image-size {config.image_size} gives {base.output.shape[1]}x{base.output.shape[2]}; "
            f"raise --image-size or cut the base earlier with --feature-layer"
        )
    head = build_head(base.output.shape[1:], dataset.num_classes, config)
    from_cache, test_probabilities = None, None
    base.trainable = config.train_base

    def raw_images_to_base(augment):
        """Input, preprocessing (with augmentation when the base trains), resize, base."""
        return [
            models.image_input(dataset.image_shape),
            models.VGG16Preprocess(name="vgg16_preprocess"),
            *([models.augmentation()] if augment else []),
            layers.Resizing(config.image_size, config.image_size, interpolation="bilinear", name="resize"),
            base,
        ]

    classifier = keras.Sequential([*raw_images_to_base(config.train_base), head], name="vgg16_sequential")
    if config.train_base:
        # Base and head learn together on images; augmentation is on because the base trains.
        training.compile_classifier(classifier, config.learning_rate)
        history = training.fit(classifier, dataset.x_train, dataset.y_train, (dataset.x_val, dataset.y_val), run, config)
    else:
        # Frozen base: the head trains on cached features of everything before it.
        feature_extractor = keras.Sequential(raw_images_to_base(False), name="feature_extractor")
        training.compile_classifier(head, config.learning_rate)
        history, cached = features.fit_head_on_cached_features(feature_extractor, head, dataset, run, config)
        training.compile_classifier(classifier, config.learning_rate)
        from_cache = cached["from_cache"]
        test_probabilities = features.whole_model_test_probabilities(
            classifier, head, cached["test"], dataset, run, config
        )
    reporting.finish_run(run, classifier, dataset, history, config, weights, test_probabilities=test_probabilities, extra={
        "features_from_cache": from_cache,
        "api": "sequential",
        "strategy": "trainable base" if config.train_base else "frozen",
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, __doc__, cli.constants(globals())))
