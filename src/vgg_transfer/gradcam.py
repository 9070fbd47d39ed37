"""Grad-CAM (Selvaraju et al., 2017): where in an image a convolution layer's evidence for a
class lies, for any model this project saves (functional, Sequential or subclassed).

The gradient of the class probability with respect to the layer's activations comes from
the backend's own automatic differentiation (TensorFlow's GradientTape, `jax.grad` or torch.autograd); the
model itself is not rebuilt. The chosen layer's output is given a zero offset during one
forward pass, and the gradient with respect to that offset is the gradient with respect to
the activations, wherever the layer sits (nested models included; in a model with test-time
flip averaging, those of the image's own pass, see `activations.own_image_only`).
"""

import keras
import numpy as np

from vgg_transfer.activations import all_layers, own_image_only, watched
from vgg_transfer.errors import InputError


def default_layer(model):
    """The last VGG16 convolution the model uses (the base's last), else its last Conv2D."""
    convolutions = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.Conv2D)]
    if not convolutions:
        raise InputError(f"model {model.name} has no Conv2D layer for Grad-CAM")
    vgg16 = [layer for layer in convolutions if layer.name.startswith("block")]
    return (vgg16 or convolutions)[-1]


def find_layer(model, name):
    for layer in all_layers(model):
        if layer.name == name and isinstance(layer, keras.layers.Conv2D):
            return layer
    names = ", ".join(layer.name for layer in all_layers(model) if isinstance(layer, keras.layers.Conv2D))
    raise InputError(f"--layer {name!r} is not a convolution layer of the model; use one of {names}")


def heatmaps(model, images, layer=None, class_indices=None):
    """Grad-CAM heatmaps for a batch of raw uint8 images.

    Args:
        model: a classifier (images in, class probabilities out).
        images: uint8 array (N, H, W, 3) of the size the model takes.
        layer: a Conv2D layer inside the model (default `default_layer(model)`).
        class_indices: the class explained for each image (default: the predicted one).

    Returns:
        (maps, probabilities): float32 array (N, H, W) in [0, 1], the heatmaps resized to the
        images' size; and the model's class probabilities (N, num_classes).
    """
    layer = layer or default_layer(model)
    images = keras.ops.convert_to_tensor(np.asarray(images))
    state = {}
    with own_image_only(model), watched(layer, state):
        model(images, training=False)  # the shape of the layer's output
    probabilities = keras.ops.convert_to_numpy(model(images, training=False))
    if class_indices is None:
        class_indices = probabilities.argmax(axis=1)
    chosen = keras.ops.one_hot(np.asarray(class_indices), probabilities.shape[1])
    zeros = np.zeros(tuple(state["output"].shape), np.float32)

    def score(offset):  # the offset on the image's own pass (its mirror image's, if any, stays as it is)
        state.clear()
        with own_image_only(model), watched(layer, state, offset=lambda output: output + keras.ops.cast(
                offset, output.dtype)):
            outputs = keras.ops.cast(model(images, training=False), "float32")
        return keras.ops.sum(outputs * chosen), state["output"]

    gradients, activations = _gradient(score, zeros)
    gradients = np.asarray(keras.ops.convert_to_numpy(gradients), np.float32)
    activations = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(activations, "float32")), np.float32)
    channel_weights = gradients.mean(axis=(1, 2), keepdims=True)  # global-average-pooled gradients
    maps = np.maximum((channel_weights * activations).sum(axis=-1), 0)
    height, width = images.shape[1:3]
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(maps[..., None], (height, width)))[..., 0]
    resized = np.maximum(resized, 0)
    top = resized.max(axis=(1, 2), keepdims=True)
    return np.where(top > 0, resized / np.where(top > 0, top, 1), 0).astype(np.float32), probabilities


def _gradient(score, zeros):
    """(d score / d offset at zeros, the activation recorded), with the backend's autodiff."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # TensorFlow-only branch: its gradient tape

        offset = tf.Variable(zeros)
        with tf.GradientTape() as tape:
            value, activation = score(offset)
        return tape.gradient(value, offset), activation
    if backend == "jax":
        import jax  # JAX-only branch: its grad transform

        (_, activation), gradient = jax.value_and_grad(score, has_aux=True)(zeros)
        return gradient, activation
    if backend == "torch":
        import torch  # torch-only branch: its autograd

        offset = keras.ops.convert_to_tensor(zeros).requires_grad_()
        value, activation = score(offset)
        (gradient,) = torch.autograd.grad(value, offset)
        return gradient.detach(), activation.detach()
    raise InputError(f"Grad-CAM needs the tensorflow, jax or torch backend, not {backend}; set KERAS_BACKEND")
