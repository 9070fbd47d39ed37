"""VGG16's weights and input conventions as built-in layers: the preprocessing, the mirror, the
split into frozen and trained parts, and the training-only augmentation layer.

Every model of the project takes raw RGB images, uint8 in [0, 255], of the data's stored
size, and does VGG16's own `preprocess_input` (minus the ImageNet channel means, RGB to BGR)
and the resizing to IMAGE_SIZE itself, with built-in Keras layers only: a saved model
predicts on raw images and loads with plain `keras.saving.load_model`, without this package.
"""

import hashlib
from pathlib import Path

import keras
import numpy as np

from vgg_transfer import paths
from vgg_transfer.errors import InputError

WEIGHTS_FILE_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
# VGG16's layers below the classifier, in order; a base can be cut after any of them.
VGG16_LAYER_NAMES = (
    "block1_conv1", "block1_conv2", "block1_pool",
    "block2_conv1", "block2_conv2", "block2_pool",
    "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool",
    "block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
    "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool",
)
# Where a block starts: the layers a base can be unfrozen from.
BLOCK_BOUNDARIES = tuple(name for name in VGG16_LAYER_NAMES if name.endswith("_conv1"))
MIN_IMAGE_SIZE = 32  # VGG16's five poolings need at least 32 px.
IMAGENET_RGB_MEANS = (123.68, 116.779, 103.939)  # what VGG16's preprocess_input subtracts


def resolve_weights(weights):
    """The `--weights` value as (what `keras.applications.VGG16(weights=...)` takes, the source in words).

    Args:
        weights: "imagenet" (a `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` in `in/` if
            there is one, else Keras's download), "none" (random initialisation), or the path
            of a VGG16 notop weights file.

    Raises:
        InputError: a path that is not a file, a file that is not VGG16 notop weights, or an
            ImageNet download that failed. Checked by loading the weights into a 32-pixel
            VGG16, so a bad file stops a run before its data loads.
    """
    if weights in ("none", "None", "random"):
        return None, "none (random initialisation)"
    if weights == "imagenet":
        local = paths.in_dir() / WEIGHTS_FILE_NAME
        argument, source = (str(local), f"ImageNet ({local})") if local.is_file() else ("imagenet", "ImageNet (Keras download)")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(
                f"--weights {weights}: no such file; pass 'imagenet', 'none', or the path of {WEIGHTS_FILE_NAME}"
            )
        argument, source = str(path), (f"ImageNet ({path})" if path.name == WEIGHTS_FILE_NAME else f"file {path}")
    try:
        keras.applications.VGG16(include_top=False, weights=argument, input_shape=(MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3))
    except Exception as error:  # Download failures are plain Exceptions; bad files raise many kinds.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if argument == "imagenet":
            raise InputError(
                f"could not download the ImageNet weights ({reason}); put {WEIGHTS_FILE_NAME} "
                f"into {paths.in_dir()} or pass --weights PATH"
            ) from None
        raise InputError(
            f"--weights {argument} is not a Keras VGG16 notop weights file ({reason}); pass the path of {WEIGHTS_FILE_NAME}"
        ) from None
    return argument, source


def vgg16_preprocessing(image_shape, image_size, augment=False):
    """VGG16's `preprocess_input` and the resize to `image_size`, as a model of built-in layers.

    Args:
        image_shape: the stored images' shape (h, w, 3); they come in raw, uint8 in [0, 255].
        image_size: the side VGG16 is to see; no resizing when the images already have it.
        augment: add the training-only `augmentation()` before the resizing. The scripts train
            with this and save the model without it.

    Returns:
        A `keras.Sequential` named "vgg16_preprocessing" whose output is float images
        (image_size, image_size, 3), BGR, minus the ImageNet means: exactly what
        `keras.applications.vgg16.preprocess_input` gives.
    """
    if not augment:  # the augmented twin of a model says nothing: its plain model does
        note_downscaling(image_shape, image_size)
    # Rescaling casts to float and subtracts each channel's mean; a fixed 1x1 convolution then
    # reverses the channels (RGB to BGR), which no other built-in layer does.
    rgb_to_bgr = keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="rgb_to_bgr")
    preprocessing = keras.Sequential([
        keras.Input(shape=tuple(image_shape), dtype="uint8", name="image"),
        keras.layers.Rescaling(1.0, offset=[-mean for mean in IMAGENET_RGB_MEANS], name="minus_imagenet_means"),
        rgb_to_bgr,
        *([augmentation()] if augment else []),
        # Resized inside the model: the data set is never stored upscaled.
        *([keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")]
          if tuple(image_shape[:2]) != (image_size, image_size) else []),
    ], name="vgg16_preprocessing_augmented" if augment else "vgg16_preprocessing")
    rgb_to_bgr.kernel.assign(np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3))
    return preprocessing


def note_downscaling(image_shape, image_size):
    """Says in one line when the model shrinks the stored images: photos stored at 256 px and
    IMAGE_SIZE left at CIFAR-10's 32 would be classified from thumbnails."""
    stored = max(image_shape[:2])
    if stored > image_size:
        closer = min(stored, 4 * image_size)
        print(f"Note: the images are stored at {stored} px and the network sees them at {image_size} px "
              f"(IMAGE_SIZE); --image-size {closer} shows it more detail, at {(closer / image_size) ** 2:.0f} "
              f"times the compute")


def mirror(image_shape):
    """A model that flips float images (h, w, c) left to right, with built-in layers only: the
    width axis moved last (`Permute`), multiplied by the reversal matrix (a fixed `Dense`, exact:
    ones and zeros), and moved back. For test-time flip averaging inside a saved model."""
    height, width, channels = image_shape
    reverse = keras.layers.Dense(width, use_bias=False, trainable=False, name="reverse_columns")
    flip = keras.Sequential([keras.Input(shape=(height, width, channels)), keras.layers.Permute((1, 3, 2)), reverse,
                             keras.layers.Permute((1, 3, 2))], name="mirror")
    reverse.kernel.assign(np.eye(width, dtype="float32")[::-1])
    return flip


def split_at(base, layer_name):
    """Splits a sequential VGG16 base before `layer_name` into (lower, upper) models that share
    its layers: `upper(lower(x))` computes `base(x)`, so training `upper` trains the base."""
    names = [layer.name for layer in base.layers]
    index = names.index(layer_name)
    lower = keras.Model(base.input, base.layers[index - 1].output, name="vgg16_lower")
    upper_input = keras.Input(shape=lower.output.shape[1:], name="lower_activations")
    x = upper_input
    for layer in base.layers[index:]:
        x = layer(x)
    return lower, keras.Model(upper_input, x, name="vgg16_upper")


def weights_fingerprint(model):
    """A digest of a model's weight values and shapes, in order (layer names play no part,
    since Keras numbers unnamed layers differently from one model to the next)."""
    digest = hashlib.sha1()
    for weight in model.weights:
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:20]


def augmentation():
    """Random horizontal flips and shifts of up to 4 pixels; active in training only."""
    return RandomFlipAndShift(max_shift=4, name="augmentation")


@keras.saving.register_keras_serializable(package="vgg_transfer")
class RandomFlipAndShift(keras.layers.Layer):
    """Random horizontal flips and shifts by up to `max_shift` pixels (edges reflected), in training only.

    The project's own layer because Keras's RandomTranslation took 0.35 s per batch of 250
    images on an H100 with JAX, longer than VGG16's training step: this one uses dense
    `keras.ops` (one-hot shift matrices multiplied in, no gathers) and is fast everywhere.
    Training-only, so the scripts leave it out of the models they save.
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
