"""What a saved model computes inside: its layers (nested ones included) and what they receive
and return during a forward pass, for the feature maps, the embedding and Grad-CAM.

A layer can sit deep inside nested models, and in a model with test-time flip averaging it is
called twice per pass, for the image and for its mirror image, in an order Keras chooses (the
two branches are at the same depth of the graph). While recording, the model's `mirror` layer
(see `models.mirror`) lets the image through unflipped (`own_image_only`): both calls then see
the image itself, and the first call recorded is the image's own. The model itself is not
rebuilt: a layer's `call` is wrapped for one pass.
"""

import contextlib

import keras
import numpy as np


def all_layers(layer):
    """The layer and, recursively, every layer inside it, in order."""
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from all_layers(inner)


@contextlib.contextmanager
def own_image_only(model):
    """While active, the model's `mirror` layers (test-time flip averaging) pass the images
    through as they are, so that every branch of a pass sees the image itself."""
    mirrors = [layer for layer in all_layers(model) if layer.name == "mirror"]
    for mirror in mirrors:
        mirror.call = lambda images, *args, **kwargs: images
    try:
        yield
    finally:
        for mirror in mirrors:
            del mirror.call  # back to the class's method


@contextlib.contextmanager
def watched(layer, state, offset=None):
    """While active, `layer`'s first call in each pass (until `state` is cleared) stores what it
    received in `state["input"]` and what it returned in `state["output"]`; `offset(output)`,
    when given, replaces that output (Grad-CAM adds a zero offset to differentiate)."""
    original = layer.call

    def call(*args, **kwargs):
        output = original(*args, **kwargs)
        if "output" in state:  # a later call of the same pass: the other branch's
            return output
        state["input"], state["output"] = args[0], output
        return output if offset is None else offset(output)

    layer.call = call
    try:
        yield
    finally:
        del layer.call  # back to the class's method


def first_calls(model, layers, images, batch_size=256, received=False):
    """Runs `model` on `images` batch by batch and returns, for each of `layers`, a NumPy array of
    what its first call returned (or received, with `received=True`) for every image."""
    collected = [[] for _ in layers]
    for start in range(0, len(images), batch_size):
        states = [{} for _ in layers]
        with contextlib.ExitStack() as stack:
            stack.enter_context(own_image_only(model))
            for layer, state in zip(layers, states):
                stack.enter_context(watched(layer, state))
            model(keras.ops.convert_to_tensor(images[start:start + batch_size]), training=False)
        for arrays, state in zip(collected, states):
            value = state["input" if received else "output"]
            arrays.append(np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(value, "float32"))))
    return [np.concatenate(arrays) for arrays in collected]


def output_shape(layer):
    """A layer's output shape in the model it was built in, also for a layer called more than once."""
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):  # several calls: the first one's
        return tuple(layer._inbound_nodes[0].output_tensors[0].shape)
