"""Transfer learning on CIFAR-10 with a frozen ImageNet VGG16, as a subclassed keras.Model.

The same job as transfer_learning.py, with the subclassing API: the whole model is a
`vgg_transfer.model.VGG16Classifier`, a `keras.Model` subclass that holds the base and a
head of its own and defines `call`, `get_config` and `from_config`, so its saved `.keras`
file reloads. This script's head pools the base's features globally (average and max)
instead of flattening them. The head trains on cached features of the frozen base, as in
the main job; the test figures come from the whole subclassed model.

    python src/transfer_learning_subclassed.py
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, features, model as models, reporting, runs, training

import keras
from keras import layers

EPOCHS = 8
BATCH_SIZE = 512
LEARNING_RATE = 1e-3
IMAGE_SIZE = 32
VALIDATION_SPLIT = 0.1
SEED = 42
FEATURE_LAYER = "block4_pool"
HEAD_UNITS = 512
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3
LR_SCHEDULE = "plateau"  # the two below; or "cosine" (see training.learning_rate_callback)
REDUCE_LR_PATIENCE = 1
REDUCE_LR_FACTOR = 0.2


def build_head(feature_shape, num_classes, config):
    """Global average and max pooling side by side, then a dense layer: fewer weights than Flatten."""
    inputs = keras.Input(shape=feature_shape, name="vgg16_features")
    pooled = layers.Concatenate()([layers.GlobalAveragePooling2D()(inputs), layers.GlobalMaxPooling2D()(inputs)])
    x = layers.Dense(config.head_units, use_bias=False)(pooled)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = models.class_probabilities(num_classes)(x)
    return keras.Model(inputs, outputs, name="head")


def main(config):
    keras.utils.set_random_seed(config.seed)
    models.validate_layer_name(config.feature_layer, "--feature-layer")
    run, weights, dataset = runs.prepare(config, "transfer_learning_subclassed")
    base = models.build_vgg16_base(weights, config.image_size, output_layer=config.feature_layer)

    feature_extractor = models.frozen_feature_extractor(base, dataset.image_shape, config.image_size)
    head = build_head(feature_extractor.output.shape[1:], dataset.num_classes, config)
    training.compile_classifier(head, config.learning_rate)
    history, cached = features.fit_head_on_cached_features(feature_extractor, head, dataset, run, config)

    # The whole model, by subclassing: the same base and the trained head.
    classifier = models.VGG16Classifier(base, head, config.image_size, name="vgg16_subclassed")
    training.compile_classifier(classifier, config.learning_rate)
    classifier(dataset.x_test[:1])  # builds the subclassed model, so it can be saved
    test_probabilities = features.whole_model_test_probabilities(
        classifier, head, cached["test"], dataset, run, config
    )
    reporting.finish_run(run, classifier, dataset, history, config, weights, test_probabilities=test_probabilities,
                         extra={"features_from_cache": cached["from_cache"], "api": "subclassing", "strategy": "frozen"})

if __name__ == "__main__":
    sys.exit(cli.run(main, __doc__, cli.constants(globals())))
