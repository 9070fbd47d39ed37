"""Grad-CAM checked against a reference computed directly with TensorFlow's gradient tape, on a
small nested model whose explained layer sits inside an inner model (as the base does in the
project's models)."""

import keras
import numpy as np
import pytest

from vgg_transfer import gradcam


def _nested_model():
    keras.utils.set_random_seed(3)
    lower = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a"),
        keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_b"),
    ], name="lower")
    upper = keras.Sequential([
        # Flatten, not global pooling: the gradients then vary across the map, as in the main job.
        keras.Input((8, 8, 6)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax"),
    ], name="upper")
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    outputs = upper(lower(keras.ops.cast(inputs, "float32") / 255.0))
    return keras.Model(inputs, outputs), lower, upper


def _reference(lower, upper, images, class_indices):
    """Grad-CAM by the textbook: gradients of the class probability with respect to the
    layer's activations, averaged per channel, weighting the activations; ReLU; scaled to 1."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        activations = lower(tf.cast(images, "float32") / 255.0)
        tape.watch(activations)
        probabilities = upper(activations)
        score = tf.reduce_sum(probabilities * tf.one_hot(class_indices, 3))
    gradients = tape.gradient(score, activations).numpy()
    activations = activations.numpy()
    maps = np.maximum((gradients.mean(axis=(1, 2), keepdims=True) * activations).sum(axis=-1), 0)
    top = maps.max(axis=(1, 2), keepdims=True)
    return np.where(top > 0, maps / np.where(top > 0, top, 1), 0)


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="the reference uses TensorFlow's tape")
def test_heatmaps_equal_a_reference_computed_with_the_gradient_tape():
    model, lower, upper = _nested_model()
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    layer = gradcam.find_layer(model, "conv_b")
    assert gradcam.default_layer(model) is layer  # the last convolution, found inside the inner model
    for classes in (None, np.array([2, 1, 0, 2, 1, 0])):  # the predicted class, then chosen ones
        maps, probabilities = gradcam.heatmaps(model, images, layer, class_indices=classes)
        explained = probabilities.argmax(axis=1) if classes is None else classes
        expected = _reference(lower, upper, images, explained)
        assert (expected.max(axis=(1, 2)) == 1).sum() >= 3  # most maps are not empty: the check has teeth
        np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-6)
