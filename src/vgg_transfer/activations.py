"""What a saved model computes inside: its layers (nested ones included) and what they receive
and return during a forward pass, for the feature maps, the embedding and Grad-CAM.

A layer can sit deep inside nested models, and in a model with test-time flip averaging it is
called twice per pass (the image, then its mirror image): what is recorded is its first call,
the image's own. The model itself is not rebuilt: the layer's `call` is wrapped for one pass.
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
def watched(layer, state, offset=None):
    """While active, `layer`'s first call in each pass (until `state` is cleared) stores what it
    received in `state["input"]` and what it returned in `state["output"]`; `offset(output)`,
    when given, replaces that output (Grad-CAM adds a zero offset to differentiate)."""
    original = layer.call

    def call(*args, **kwargs):
        output = original(*args, **kwargs)
        if "output" in state:  # a later call of the same pass: the mirror image's
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
