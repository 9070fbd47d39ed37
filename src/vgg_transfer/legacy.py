"""Layers and models that earlier versions of the project saved, kept so that their runs still
load (`models.load_saved_classifier` imports this module). New models use built-in layers only."""

import keras

from vgg_transfer import models


@keras.saving.register_keras_serializable(package="vgg_transfer")
class VGG16Preprocess(keras.layers.Layer):
    """VGG16's `preprocess_input` as one layer: RGB in [0, 255] to BGR minus the ImageNet means."""

    def call(self, images):
        means = keras.ops.convert_to_tensor(models.IMAGENET_RGB_MEANS[::-1], self.compute_dtype)
        return keras.ops.flip(keras.ops.cast(images, self.compute_dtype), axis=-1) - means


@keras.saving.register_keras_serializable(package="vgg_transfer")
class VGG16Classifier(keras.Model):
    """The subclassed classifier of earlier versions: raw uint8 images -> preprocessing ->
    resize -> base -> head (the new one is defined in transfer_learning_subclassed.py)."""

    def __init__(self, base, head, image_size, augment=False, **kwargs):
        super().__init__(**kwargs)
        self.base, self.head, self.image_size, self.augment = base, head, image_size, augment
        self.preprocess = VGG16Preprocess(name="vgg16_preprocess")
        self.augmentation = models.augmentation() if augment else None
        self.resize = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")

    def call(self, images, training=False):
        x = self.preprocess(images)
        if self.augmentation is not None:
            x = self.augmentation(x, training=training)
        if tuple(x.shape[1:3]) != (self.image_size, self.image_size):
            x = self.resize(x)
        return self.head(self.base(x, training=False), training=training)

    def get_config(self):
        parts = {name: keras.saving.serialize_keras_object(getattr(self, name)) for name in ("base", "head")}
        return {**super().get_config(), **parts, "image_size": self.image_size, "augment": self.augment}

    @classmethod
    def from_config(cls, config):
        parts = {name: keras.saving.deserialize_keras_object(config.pop(name)) for name in ("base", "head")}
        return cls(**parts, **config)
