"""The VGG16 base with its ImageNet weights, and the preprocessing that goes inside every model.

Every model of the project takes raw RGB images, uint8 in [0, 255], of the data's stored
size; it resizes them to IMAGE_SIZE and applies VGG16's own `preprocess_input` (RGB to
BGR, minus the ImageNet channel means) itself, so a saved model predicts on raw images.
"""

import hashlib
import json
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


def preprocess(images, image_size, augment=False):
    """Applies VGG16's preprocessing and resizes to `image_size` (a no-op when it already fits).

    Args:
        images: a symbolic Keras tensor of raw RGB images (batch, h, w, 3) in [0, 255].
        image_size: the side that the base expects.
        augment: insert `augmentation()` (active in training only) before the resizing.
    """
    x = VGG16Preprocess(name="vgg16_preprocess")(images)
    if augment:
        x = augmentation()(x)
    if tuple(images.shape[1:3]) != (image_size, image_size):
        # Resizing inside the model: the data set is never stored upscaled.
        x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(x)
    return x


def class_probabilities(num_classes):
    """The last layer of every model: softmax over the classes, computed in float32 even
    under mixed precision, so probabilities and the loss keep full precision."""
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="class_probabilities")


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


def block_boundaries(base):
    """The layer names a base can be unfrozen from: the first convolution of each block it has."""
    return [layer.name for layer in base.layers if layer.name.endswith("_conv1")]


def check_block_boundary(base, layer_name):
    """Raises InputError unless `layer_name` is a block boundary of `base` (checked before training)."""
    boundaries = block_boundaries(base)
    if layer_name not in boundaries:
        raise InputError(
            f"--unfreeze-from {layer_name!r} is not a block boundary of the base; use one of {', '.join(boundaries)}"
        )


def unfreeze_from(base, layer_name):
    """Makes `layer_name` and every layer after it trainable, and every layer before it frozen.

    Args:
        base: a model from `build_vgg16_base`.
        layer_name: a block boundary, e.g. "block5_conv1" (see `block_boundaries`).

    Raises:
        InputError: a name that is not a block boundary of this base.
    """
    check_block_boundary(base, layer_name)
    base.trainable = True
    names = [layer.name for layer in base.layers]
    first_trainable = names.index(layer_name)
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= first_trainable


def split_base(base, layer_name):
    """Splits a sequential VGG16 base before `layer_name` into (lower, upper) models.

    `upper(lower(x))` computes `base(x)` with the same layer objects, so training `upper`
    trains the base. Used to cache the frozen lower part's activations.
    """
    names = [layer.name for layer in base.layers]
    index = names.index(layer_name)
    lower = keras.Model(base.input, base.layers[index - 1].output, name="vgg16_lower")
    upper_input = keras.Input(shape=lower.output.shape[1:], name="lower_activations")
    x = upper_input
    for layer in base.layers[index:]:
        x = layer(x)
    return lower, keras.Model(upper_input, x, name="vgg16_upper")


def augmentation():
    """Random horizontal flips and shifts of up to 4 pixels; active in training only."""
    return RandomFlipAndShift(max_shift=4, name="augmentation")


@keras.saving.register_keras_serializable(package="vgg_transfer")
class RandomFlipAndShift(keras.layers.Layer):
    """Random horizontal flips and shifts by up to `max_shift` pixels (edges reflected), in training only.

    Written with dense `keras.ops` (one-hot shift matrices multiplied in, no gathers), so it
    runs fast on every backend and device: Keras's RandomTranslation took 0.35 s per batch
    of 250 images on an H100 with JAX, longer than VGG16's training step itself.
    """

    def __init__(self, max_shift=4, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.max_shift = max_shift
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        shift = self.max_shift
        batch, height, width = keras.ops.shape(images)[0], images.shape[1], images.shape[2]
        padded = keras.ops.pad(images, [[0, 0], [shift, shift], [shift, shift], [0, 0]], mode="reflect")
        offsets = keras.random.randint((batch, 2), 0, 2 * shift + 1, seed=self.seed_generator)
        # rows[b, h, i] = 1 where i = h + offset: multiplying picks the shifted window exactly.
        rows = keras.ops.one_hot(offsets[:, 0:1] + keras.ops.arange(height)[None, :], height + 2 * shift,
                                 dtype=images.dtype)
        columns = keras.ops.one_hot(offsets[:, 1:2] + keras.ops.arange(width)[None, :], width + 2 * shift,
                                    dtype=images.dtype)
        x = keras.ops.einsum("bhi,biwc->bhwc", rows, padded)
        x = keras.ops.einsum("bwj,bhjc->bhwc", columns, x)
        flip = keras.random.uniform((batch, 1, 1, 1), seed=self.seed_generator) < 0.5
        return keras.ops.where(flip, keras.ops.flip(x, axis=2), x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_shift": self.max_shift, "seed": self.seed}


@keras.saving.register_keras_serializable(package="vgg_transfer")
class VGG16Classifier(keras.Model):
    """A whole classifier by subclassing: raw uint8 images -> preprocessing -> base -> head.

    Args:
        base: a VGG16 base from `build_vgg16_base` (frozen or not, as the caller set it).
        head: a Keras model from the base's output to class probabilities.
        image_size: the side the base expects; images are resized to it inside `call`.
        augment: apply `augmentation()` in training.

    `get_config`/`from_config` serialise base and head, so a saved `.keras` file reloads
    (after `import vgg_transfer`, which registers this class).
    """

    def __init__(self, base, head, image_size, augment=False, **kwargs):
        super().__init__(**kwargs)
        self.base = base
        self.head = head
        self.image_size = image_size
        self.augment = augment
        self.preprocess = VGG16Preprocess(name="vgg16_preprocess")
        self.augmentation = augmentation() if augment else None
        self.resize = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")

    def call(self, images, training=False):
        x = self.preprocess(images)
        if self.augmentation is not None:
            x = self.augmentation(x, training=training)
        if tuple(x.shape[1:3]) != (self.image_size, self.image_size):
            x = self.resize(x)
        # training=False keeps any normalisation layers of the base in inference mode.
        return self.head(self.base(x, training=False), training=training)

    def get_config(self):
        return {
            **super().get_config(),
            "base": keras.saving.serialize_keras_object(self.base),
            "head": keras.saving.serialize_keras_object(self.head),
            "image_size": self.image_size,
            "augment": self.augment,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["base"] = keras.saving.deserialize_keras_object(config["base"])
        config["head"] = keras.saving.deserialize_keras_object(config["head"])
        return cls(**config)


# On the torch backend Keras saves its optimizers under torch-only class paths, which other
# backends cannot import; a model's nested parts keep the optimizer they were compiled with.
# These names make a model saved on any backend load on any other.
PORTABLE_OPTIMIZERS = {"Adam": keras.optimizers.Adam, "AdamW": keras.optimizers.AdamW}

# What a run folder calls its whole model.
MODEL_FILE_NAME = "model.keras"


def saved_run_metrics(model_path):
    """The metrics.json of the run a saved model belongs to (a run folder, or a .keras file
    in one), or {} when there is none."""
    path = Path(model_path)
    metrics_file = (path if path.is_dir() else path.parent) / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def load_saved_classifier(model_path):
    """(model, class names, image side) from a run folder (its model.keras and metrics.json)
    or a .keras file; images given to the model must be (side, side, 3) uint8.

    Raises:
        InputError: no model there, or a file that is not a model this project saved.
    """
    path = Path(model_path)
    model_file = path / MODEL_FILE_NAME if path.is_dir() else path
    if not model_file.is_file():
        raise InputError(f"--model {model_path}: no model.keras there; pass a run folder or a .keras file")
    try:
        model = keras.saving.load_model(model_file, compile=False, custom_objects=PORTABLE_OPTIMIZERS)
    except Exception as error:
        raise InputError(f"--model {model_file} is not a Keras model this project saved ({error})") from None
    try:
        side = model.input_shape[1]
    except AttributeError:  # a subclassed model has no fixed input; VGG16Classifier resizes inside
        side = model.image_size
    num_classes = model(np.zeros((1, side, side, 3), np.uint8), training=False).shape[-1]
    names = saved_run_metrics(model_file).get("data", {}).get("class_names", [])
    class_names = names if len(names) == num_classes else [f"class {index}" for index in range(num_classes)]
    return model, class_names, side
