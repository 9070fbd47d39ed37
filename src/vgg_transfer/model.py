"""The VGG16 base with its ImageNet weights, and the preprocessing that goes inside every model.

Every model of the project takes raw RGB images, uint8 in [0, 255], of the data's stored
size; it resizes them to IMAGE_SIZE and applies VGG16's own `preprocess_input` (RGB to
BGR, minus the ImageNet channel means) itself, so a saved model predicts on raw images.
"""

import hashlib
from pathlib import Path

import keras
import numpy as np

from vgg_transfer import paths
from vgg_transfer.errors import InputError

WEIGHTS_FILE_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
# VGG16's layers below the classifier, in order; a base can end at any of them.
VGG16_LAYER_NAMES = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)
MIN_IMAGE_SIZE = 32  # VGG16's five poolings need at least 32 px.


class Weights:
    """Where the base's weights come from.

    `keras_argument` is what `keras.applications.VGG16(weights=...)` takes ("imagenet",
    None, or a file path); `source` says it in words for reports.
    """

    def __init__(self, keras_argument, source):
        self.keras_argument = keras_argument
        self.source = source


def resolve_weights(weights):
    """Turns the `--weights` value into `Weights`.

    Args:
        weights: "imagenet" (a `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` in `in/`
            if there is one, else Keras's download), "none" (random initialisation), or the
            path of a Keras VGG16 notop weights file.

    Raises:
        InputError: a path that does not exist or is not a file.
    """
    if weights == "imagenet":
        local = paths.in_dir() / WEIGHTS_FILE_NAME
        if local.is_file():
            return Weights(str(local), f"ImageNet ({local})")
        return Weights("imagenet", "ImageNet (Keras download)")
    if weights in ("none", "None", "random"):
        return Weights(None, "none (random initialisation)")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise InputError(
            f"--weights {weights}: no such file; pass 'imagenet', 'none', or the path of {WEIGHTS_FILE_NAME}"
        )
    return Weights(str(path), f"ImageNet ({path})" if path.name == WEIGHTS_FILE_NAME else f"file {path}")


def build_vgg16_base(weights, image_size, output_layer="block5_pool"):
    """Builds VGG16's convolutional base for square `image_size` inputs.

    Args:
        weights: a `Weights` from `resolve_weights`.
        image_size: input side in pixels, at least 32.
        output_layer: the last VGG16 layer kept (one of `VGG16_LAYER_NAMES`); the base's
            output is that layer's activation, of shape (batch, h, w, channels).

    Returns:
        A `keras.Model` named "vgg16_base" taking preprocessed float images of shape
        (batch, image_size, image_size, 3).

    Raises:
        InputError: weights that cannot be downloaded or are not a VGG16 notop file, an
            image size below 32, or an unknown layer name.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size {image_size} is below VGG16's minimum; pass at least {MIN_IMAGE_SIZE}")
    validate_layer_name(output_layer, "the base's output layer")
    try:
        vgg16 = keras.applications.VGG16(
            include_top=False, weights=weights.keras_argument, input_shape=(image_size, image_size, 3)
        )
    except Exception as error:  # Download failures are plain Exceptions; bad files raise many kinds.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if weights.keras_argument == "imagenet":
            raise InputError(
                f"could not download the ImageNet weights ({reason}); put {WEIGHTS_FILE_NAME} "
                f"into {paths.in_dir()} or pass --weights PATH"
            ) from None
        raise InputError(
            f"--weights {weights.keras_argument} is not a Keras VGG16 notop weights file ({reason}); "
            f"pass the path of {WEIGHTS_FILE_NAME}"
        ) from None
    return keras.Model(vgg16.input, vgg16.get_layer(output_layer).output, name="vgg16_base")


def validate_layer_name(layer_name, role):
    if layer_name not in VGG16_LAYER_NAMES:
        raise InputError(f"{role} {layer_name!r} is not a VGG16 layer; use one of {', '.join(VGG16_LAYER_NAMES)}")


@keras.saving.register_keras_serializable(package="vgg_transfer")
class VGG16Preprocess(keras.layers.Layer):
    """VGG16's `preprocess_input` as a layer: RGB in [0, 255] to BGR minus the ImageNet means.

    Takes any numeric dtype (uint8 images included) and returns floats of the layer's dtype.
    A layer rather than a `Lambda`, so saved models reload without unsafe deserialisation.
    """

    BGR_MEANS = (103.939, 116.779, 123.68)

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        return keras.ops.flip(images, axis=-1) - keras.ops.convert_to_tensor(self.BGR_MEANS, self.compute_dtype)


def preprocess(images, image_size):
    """Applies VGG16's preprocessing and resizes to `image_size` (a no-op when it already fits).

    Args:
        images: a symbolic Keras tensor of raw RGB images (batch, h, w, 3) in [0, 255].
        image_size: the side that the base expects.
    """
    x = VGG16Preprocess(name="vgg16_preprocess")(images)
    if tuple(images.shape[1:3]) != (image_size, image_size):
        # Resizing inside the model: the data set is never stored upscaled.
        x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(x)
    return x


def image_input(image_shape):
    """The input of every model: raw uint8 RGB images of the data's stored shape (h, w, 3)."""
    return keras.Input(shape=tuple(image_shape), dtype="uint8", name="image")


def frozen_feature_extractor(base, image_shape, image_size):
    """Raw uint8 images in, the frozen base's features out.

    The base is set `trainable=False` and called with `training=False`, so no weight of it
    changes and any normalisation layer in it stays in inference mode.
    """
    base.trainable = False
    inputs = image_input(image_shape)
    features = base(preprocess(inputs, image_size), training=False)
    return keras.Model(inputs, features, name="feature_extractor")


def weights_fingerprint(model):
    """A digest of a model's weight values and shapes, in order (layer names play no part,
    since Keras numbers unnamed layers differently from one model to the next)."""
    digest = hashlib.sha1()
    for weight in model.weights:
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:20]


def count_parameters(model):
    """Returns (trainable, total) parameter counts."""
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    total = sum(int(np.prod(weight.shape)) for weight in model.weights)
    return trainable, total
