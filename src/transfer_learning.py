"""Transfer learning on CIFAR-10 with a frozen ImageNet VGG16 (Keras functional API).

The main job. VGG16's convolutional base, with its ImageNet weights and frozen, turns each
image into features; a small custom head learns to classify them. Because the base never
changes, its features are computed once and cached: the head trains in seconds, a rerun
skips the extraction, and the saved model is still the whole model (raw images in, class
probabilities out), which is what the test figures are computed with.

At CIFAR-10's 32x32 the base is cut after block 4 (FEATURE_LAYER): block 5 pools the
image down to a single 1x1 cell, and its features classify CIFAR-10 worse than block 4's
2x2x512 (see the README for the measured figures).

    python src/transfer_learning.py                 # the full run, reports in out/
    python src/transfer_learning.py --subset 2000   # a quick look
    python src/transfer_learning.py --help          # every hyperparameter and flag
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, features, model as models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit here, or override with the flag of the same name (--epochs 5).
# The short schedule keeps a rerun well under a minute on a 2-core CPU; --epochs 40
# --early-stopping-patience 4 measured 81.1% instead of 79.7%, for 72 s of head training
# instead of 19 s (see the README).
EPOCHS = 8
BATCH_SIZE = 512
LEARNING_RATE = 1e-3
IMAGE_SIZE = 32
VALIDATION_SPLIT = 0.1
SEED = 42
FEATURE_LAYER = "block4_pool"
HEAD_UNITS = 512
INPUT_DROPOUT = 0.2
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3
LR_SCHEDULE = "plateau"  # the two below; or "cosine" (see training.learning_rate_callback)
REDUCE_LR_PATIENCE = 1
REDUCE_LR_FACTOR = 0.2


def build_head(feature_shape, num_classes, config):
    """The custom head: VGG16 features (h, w, channels) in, class probabilities out."""
    inputs = keras.Input(shape=feature_shape, name="vgg16_features")
    x = layers.Flatten()(inputs)
    x = layers.Dropout(config.input_dropout)(x)
    x = layers.Dense(config.head_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = models.class_probabilities(num_classes)(x)
    return keras.Model(inputs, outputs, name="head")


def main(config):
    keras.utils.set_random_seed(config.seed)
    # Everything that can be wrong with the input is checked before the expensive part.
    models.validate_layer_name(config.feature_layer, "--feature-layer")
    run, weights, dataset = runs.prepare(config, "transfer_learning")
    base = models.build_vgg16_base(weights, config.image_size, output_layer=config.feature_layer)

    # Frozen base: its features are computed once (or read from the cache), and the head
    # trains on them, with validation figures driving every callback.
    feature_extractor = models.frozen_feature_extractor(base, dataset.image_shape, config.image_size)
    head = build_head(feature_extractor.output.shape[1:], dataset.num_classes, config)
    training.compile_classifier(head, config.learning_rate)
    history, cached = features.fit_head_on_cached_features(feature_extractor, head, dataset, run, config)

    # The whole model: raw uint8 images -> preprocessing -> frozen VGG16 -> trained head.
    classifier = keras.Model(
        feature_extractor.input, head(feature_extractor.output), name="vgg16_frozen_functional"
    )
    # Compiled with the head's loss and metric, so the saved model's evaluate() works as is.
    training.compile_classifier(classifier, config.learning_rate)
    # Its test predictions: the head on the cached test features, checked against the whole
    # model on a sample, so a rerun does not push 10,000 images through VGG16 again.
    test_probabilities = features.whole_model_test_probabilities(
        classifier, head, cached["test"], dataset, run, config
    )
    reporting.finish_run(run, classifier, dataset, history, config, weights, test_probabilities=test_probabilities,
                         extra={"features_from_cache": cached["from_cache"], "api": "functional", "strategy": "frozen"})

if __name__ == "__main__":
    sys.exit(cli.run(main, __doc__, cli.constants(globals())))
