"""Transfer learning on CIFAR-10 with a frozen ImageNet VGG16, as a subclassed keras.Model.

The same job as transfer_learning.py, with the subclassing API: the whole model is a
`VGG16Classifier`, a `keras.Model` subclass defined below that holds the preprocessing, the
frozen base and a head, and defines `call`, `get_config` and `from_config`. Its head pools
the base's features globally (average and max) instead of flattening them. The head trains on
cached features of the frozen base, as in the main job.

The run folder holds the subclassed model as `subclassed_model.keras` (it reloads where this
class is defined: `custom_objects={"VGG16Classifier": VGG16Classifier}`) and the same layers
as a functional graph in `model.keras`, which plain Keras loads anywhere.

    python src/transfer_learning_subclassed.py
"""

import sys

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import cli, data, devices, features, models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
HARDWARE = devices.hardware()  # "gpu", "cpu_amx" (a CPU with AMX) or "cpu": picks the values that differ
PRECISION = "auto"  # "auto" (the device's fastest at full accuracy), "float32", "bfloat16" or "float16"
EPOCHS = 8  # at most; early stopping may end training sooner
BATCH_SIZE = 512
LEARNING_RATE = 1e-3  # Adam's
IMAGE_SIZE = 32  # the side VGG16 sees; images are resized to it inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
TEST_SPLIT = 0.2  # share of each class held out for the test report, for class folders without test/
SEED = 42
FEATURE_LAYER = "block4_pool"  # where VGG16 is cut; at 32 px block 5 pools each image to 1x1
HEAD_UNITS = 512
HEAD_DROPOUT = 0.5
EARLY_STOPPING_PATIENCE = 3  # epochs without a lower validation loss before training stops
LR_SCHEDULE = "plateau"  # "plateau": ReduceLROnPlateau; "cosine": a cosine decay over EPOCHS
REDUCE_LR_PATIENCE = 1  # epochs without a lower validation loss before the rate is cut
REDUCE_LR_FACTOR = 0.2  # what the rate is multiplied by then


@keras.saving.register_keras_serializable(package="transfer_learning_subclassed")
class VGG16Classifier(keras.Model):
    """Raw uint8 images -> VGG16's preprocessing and resize -> VGG16 base -> head, by subclassing."""

    def __init__(self, preprocessing, base, head, **kwargs):
        super().__init__(**kwargs)
        self.preprocessing, self.base, self.head = preprocessing, base, head

    def call(self, images, training=False):
        # The base stays in inference mode; the head's dropout and normalisation follow `training`.
        return self.head(self.base(self.preprocessing(images), training=False), training=training)

    def get_config(self):
        parts = {name: keras.saving.serialize_keras_object(getattr(self, name))
                 for name in ("preprocessing", "base", "head")}
        return {**super().get_config(), **parts}

    @classmethod
    def from_config(cls, config):
        parts = {name: keras.saving.deserialize_keras_object(config.pop(name))
                 for name in ("preprocessing", "base", "head")}
        return cls(**parts, **config)


def main(setup):
    keras.utils.set_random_seed(SEED)
    run = runs.Run(setup)
    with run.timed("data"):
        dataset = data.load_dataset(setup.data, VALIDATION_SPLIT, TEST_SPLIT, SEED, setup.subset)

    # VGG16 with its ImageNet weights, cut after FEATURE_LAYER and frozen.
    vgg16 = keras.applications.VGG16(include_top=False, weights=setup.weights,
                                     input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    base = keras.Model(vgg16.input, vgg16.get_layer(FEATURE_LAYER).output, name="vgg16_base")
    base.trainable = False
    preprocessing = models.vgg16_preprocessing(dataset.image_shape, IMAGE_SIZE)

    # The frozen base gives the same features every epoch: compute them once (cached on disk).
    feature_extractor = keras.Sequential([preprocessing, base], name="feature_extractor")
    with run.timed("features"):
        cached, from_cache = features.cached_features(
            feature_extractor, {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test},
            BATCH_SIZE, setup.verbose)

    # The custom head: global average and max pooling side by side, then a dense layer.
    inputs = keras.Input(shape=base.output.shape[1:], name="vgg16_features")
    pooled = layers.Concatenate()([layers.GlobalAveragePooling2D()(inputs), layers.GlobalMaxPooling2D()(inputs)])
    x = layers.Dense(HEAD_UNITS, use_bias=False)(pooled)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(HEAD_DROPOUT)(x)
    outputs = layers.Dense(dataset.num_classes, activation="softmax", dtype="float32")(x)
    head = keras.Model(inputs, outputs, name="head")

    head.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
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
    training_batches = data.Batches(cached["train"], dataset.y_train, BATCH_SIZE, shuffle=True,
                                    seed=SEED)
    callbacks += training.project_callbacks(run, callbacks, training_batches)
    history = head.fit(training_batches, validation_data=data.Batches(cached["val"], dataset.y_val, BATCH_SIZE),
                       epochs=EPOCHS, callbacks=callbacks, verbose=setup.verbose, shuffle=False)

    # The whole model, by subclassing, with the trained head.
    classifier = VGG16Classifier(preprocessing, base, head, name="vgg16_subclassed")
    classifier.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                       loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        test_predictions = features.predict_with_cached_features(classifier, head, cached["test"],
                                                                 dataset.x_test, BATCH_SIZE, run)
    classifier.save(run.path / "subclassed_model.keras")
    # What model.keras holds: the same layers as a functional graph, which loads without this class.
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    model = keras.Model(images, classifier.call(images), name="vgg16_subclassed_functional")
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    reporting.write_run(run, model, dataset, history, test_predictions,
                        notes={"api": "subclassing", "strategy": "frozen", "features_from_cache": from_cache},
                        head_on_features=(head, cached["test"]))


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
