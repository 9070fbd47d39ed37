"""Two-phase selective fine-tuning of an ImageNet VGG16 on CIFAR-10 (Keras's recommended recipe).

Phase 1 trains a new head on the frozen base (on cached features, as the main job does).
Phase 2 unfreezes the base from a named block boundary (UNFREEZE_FROM), recompiles with a
much lower learning rate so the pretrained weights are adjusted rather than overwritten,
and continues from phase 1's best weights. Both phases use early stopping, learning-rate
reduction and checkpointing on validation figures; the loss plot spans both, with the
switch marked.

With AUGMENT on (the default: random flips and small translations inside the model,
active in training only), phase 2 trains on images. With --no-augment, the frozen lower
blocks see the same images every epoch, so their activations are computed once and
cached, and phase 2 trains only the unfrozen top on them: on a 2-core CPU, fine-tuning
block 5 on all of CIFAR-10 then took 22 minutes (see the README).

    python src/fine_tune.py                              # augmentation, best on a GPU
    python src/fine_tune.py --no-augment                 # cached lower blocks, fast on a CPU
    python src/fine_tune.py --unfreeze-from block4_conv1 # unfreeze more of the base
"""

import sys

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, features, model as models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit here, or override with the flag of the same name.
EPOCHS = 8  # phase 1: the head on the frozen base
FINE_TUNE_EPOCHS = 10  # phase 2: the unfrozen top of the base and the head
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
FINE_TUNE_LEARNING_RATE = 1e-5
IMAGE_SIZE = 32
VALIDATION_SPLIT = 0.1
SEED = 42
UNFREEZE_FROM = "block5_conv1"
AUGMENT = True
HEAD_UNITS = 512
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3
LR_SCHEDULE = "plateau"  # the two below; or "cosine" (see training.learning_rate_callback)
REDUCE_LR_PATIENCE = 1
REDUCE_LR_FACTOR = 0.2


def build_head(feature_shape, num_classes, config):
    """The custom head: VGG16's block5_pool output in, class probabilities out."""
    inputs = keras.Input(shape=feature_shape, name="vgg16_features")
    x = layers.Flatten()(inputs)
    x = layers.Dense(config.head_units, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = models.class_probabilities(num_classes)(x)
    return keras.Model(inputs, outputs, name="head")


def main(config):
    keras.utils.set_random_seed(config.seed)
    verbose = 0 if config.quiet else "auto"
    run, weights, dataset = runs.prepare(config, "fine_tune")
    base = models.build_vgg16_base(weights, config.image_size, output_layer="block5_pool")
    models.check_block_boundary(base, config.unfreeze_from)  # before any training

    # Phase 1: the head learns on the frozen base's cached features.
    feature_extractor = models.frozen_feature_extractor(base, dataset.image_shape, config.image_size)
    head = build_head(feature_extractor.output.shape[1:], dataset.num_classes, config)
    training.compile_classifier(head, config.learning_rate)
    print(f"Phase 1: training the head on the frozen base ({config.epochs} epochs at most)")
    phase_1, _ = features.fit_head_on_cached_features(
        feature_extractor, head, dataset, run, config, include_test=False  # phase 2 changes the base
    )

    # Phase 2: unfreeze from UNFREEZE_FROM; the head keeps phase 1's best weights.
    models.unfreeze_from(base, config.unfreeze_from)
    inputs = models.image_input(dataset.image_shape)
    if config.augment:
        x = models.preprocess(inputs, config.image_size, augment=True)
        # training=False keeps any normalisation layers of the base in inference mode.
        classifier = keras.Model(inputs, head(base(x, training=False)), name="vgg16_fine_tuned")
        trained, x_train, x_val = classifier, dataset.x_train, dataset.x_val
    else:
        # The frozen lower blocks compute the same activations every epoch: cache them.
        lower, upper = models.split_base(base, config.unfreeze_from)
        lower_extractor = models.frozen_feature_extractor(lower, dataset.image_shape, config.image_size)
        with run.timed("features"):
            activations, _ = features.cached_features(
                lower_extractor, {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test},
                config.batch_size, verbose,
            )
        lower_activations = keras.Input(shape=lower.output.shape[1:], name="lower_activations")
        trained = keras.Model(lower_activations, head(upper(lower_activations)), name="vgg16_upper_and_head")
        classifier = keras.Model(lower_extractor.input, trained(lower_extractor.output), name="vgg16_fine_tuned")
        x_train, x_val = activations["train"], activations["val"]
    training.compile_classifier(trained, config.fine_tune_learning_rate)
    start_val_loss, start_val_accuracy = trained.evaluate(x_val, dataset.y_val, batch_size=config.batch_size, verbose=0)
    print(f"Phase 2: fine-tuning from {config.unfreeze_from} (validation loss at the start {start_val_loss:.4f})")
    phase_2 = training.fit(trained, x_train, dataset.y_train, (x_val, dataset.y_val), run, config,
                           epochs=config.fine_tune_epochs, phase="phase_2")

    training.compile_classifier(classifier, config.fine_tune_learning_rate)
    test_probabilities = None
    if not config.augment:  # the lower blocks' test activations are cached too
        test_probabilities = features.whole_model_test_probabilities(
            classifier, trained, activations["test"], dataset, run, config
        )
    trainable, _ = models.count_parameters(classifier)
    reporting.finish_run(run, classifier, dataset, [phase_1, phase_2], config, weights,
                         test_probabilities=test_probabilities, extra={
        "api": "functional",
        "strategy": f"two-phase fine-tuning from {config.unfreeze_from}",
        "phase_2_start_val_loss": float(start_val_loss),
        "phase_2_start_val_accuracy": float(start_val_accuracy),
        "phase_1_epochs": len(phase_1.history["loss"]),
        "phase_2_trainable_parameters": trainable,
        "phase_2_cached_lower_activations": not config.augment,
    })


if __name__ == "__main__":
    sys.exit(cli.run(main, __doc__, cli.constants(globals())))
