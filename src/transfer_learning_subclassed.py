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

# The project's package first: it sets TensorFlow's log level, read once as TensorFlow loads.
from vgg_transfer import cli, data, devices, features, models, reporting, runs, training

import keras
from keras import layers

# Hyperparameters: edit them here, or override one with the flag of the same name (--epochs 5).
# Where a GPU and a CPU want different values, HARDWARE chooses: "gpu" where Keras sees a GPU.
HARDWARE = devices.hardware()
EPOCHS = 8  # at most; early stopping may end training sooner
BATCH_SIZE = 512
LEARNING_RATE = 1e-3  # Adam's
IMAGE_SIZE = 32  # the side VGG16 sees; images are resized to it inside the model
VALIDATION_SPLIT = 0.1  # share of the training images held out to steer the callbacks
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


def main(config):
    keras.utils.set_random_seed(config.seed)
    run = runs.Run(config.out, config.script_name, config.resume_key)
    with run.timed("data"):
        dataset = data.load_dataset(config.data, config.validation_split, config.seed, config.subset)

    # VGG16 with its ImageNet weights, cut after FEATURE_LAYER and frozen.
    vgg16 = keras.applications.VGG16(include_top=False, weights=config.weights,
                                     input_shape=(config.image_size, config.image_size, 3))
    base = keras.Model(vgg16.input, vgg16.get_layer(config.feature_layer).output, name="vgg16_base")
    base.trainable = False
    preprocessing = models.vgg16_preprocessing(dataset.image_shape, config.image_size)

    # The frozen base gives the same features every epoch: compute them once (cached on disk).
    feature_extractor = keras.Sequential([preprocessing, base], name="feature_extractor")
    with run.timed("features"):
        cached, from_cache = features.cached_features(
            feature_extractor, {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test},
            config.batch_size, config.verbose)

    # The custom head: global average and max pooling side by side, then a dense layer.
    inputs = keras.Input(shape=base.output.shape[1:], name="vgg16_features")
    pooled = layers.Concatenate()([layers.GlobalAveragePooling2D()(inputs), layers.GlobalMaxPooling2D()(inputs)])
    x = layers.Dense(config.head_units, use_bias=False)(pooled)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.Dropout(config.head_dropout)(x)
    outputs = layers.Dense(dataset.num_classes, activation="softmax", dtype="float32")(x)
    head = keras.Model(inputs, outputs, name="head")

    head.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
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
    training_batches = data.Batches(cached["train"], dataset.y_train, config.batch_size, shuffle=True,
                                    seed=config.seed)
    history = head.fit(training_batches, validation_data=data.Batches(cached["val"], dataset.y_val, config.batch_size),
                       epochs=config.epochs, callbacks=callbacks, verbose=config.verbose)

    # The whole model, by subclassing, with the trained head.
    classifier = VGG16Classifier(preprocessing, base, head, name="vgg16_subclassed")
    classifier.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                       loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with run.timed("evaluation"):
        test_predictions = features.predict_with_cached_features(classifier, head, cached["test"],
                                                                 dataset.x_test, config.batch_size)
    classifier.save(run.path / "subclassed_model.keras")
    # What model.keras holds: the same layers as a functional graph, which loads without this class.
    images = keras.Input(shape=dataset.image_shape, dtype="uint8", name="image")
    model = keras.Model(images, classifier.call(images), name="vgg16_subclassed_functional")
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    reporting.write_run(run, model, dataset, history, test_predictions, config.settings,
                        notes={"api": "subclassing", "strategy": "frozen", "features_from_cache": from_cache})


if __name__ == "__main__":
    sys.exit(cli.run(main, globals()))
