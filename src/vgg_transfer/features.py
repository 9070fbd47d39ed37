"""Frozen-base features, computed once per (weights, image size, data) and cached on disk.

With a frozen base and no augmentation, every epoch would push the same images through
the same base; computing the features once turns minutes per epoch into seconds.
"""

import hashlib
import warnings

import keras
import numpy as np

from vgg_transfer import model as models
from vgg_transfer import cache, distribute, paths, training

# Bumped whenever what goes into the features changes (e.g. the preprocessing), so that
# old caches are not reused.
CACHE_FORMAT_VERSION = 1


def cached_features(feature_extractor, image_sets, batch_size=256, verbose=1, cache_dir=None):
    """Returns the extractor's outputs for each image set, from the cache when it has them.

    Args:
        feature_extractor: a Keras model from raw uint8 images to features (its weights,
            input shape and configuration are part of the cache key).
        image_sets: dict name -> uint8 array (N, H, W, 3), e.g. {"train": ..., "val": ...}.
        batch_size: extraction batch size.
        verbose: Keras progress-bar verbosity while extracting.
        cache_dir: default `paths.cache_dir()`.

    Returns:
        (features, from_cache): dict name -> float32 array (N, *feature_shape), and whether
        they were read from the cache.
    """
    cache_dir = cache_dir or paths.cache_dir()
    cache_file = cache_dir / f"features-{_cache_key(feature_extractor, image_sets)}.npz"
    expected_shapes = {
        name: (len(images), *feature_extractor.outputs[0].shape[1:]) for name, images in image_sets.items()
    }
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as stored:
                features = {name: stored[name] for name in image_sets}
            if all(features[name].shape == expected_shapes[name] for name in image_sets):
                return features, True
            warnings.warn(f"Feature cache {cache_file} has the wrong shapes; extracting again.")
        except Exception as error:  # Truncated or corrupt: rebuild rather than trust it.
            warnings.warn(f"Ignoring unreadable feature cache {cache_file} ({error}); extracting again.")
    features = {
        name: distribute.predict(feature_extractor, images, batch_size, verbose).astype(np.float32, copy=False)
        for name, images in image_sets.items()
    }
    cache.save_npz_atomically(cache_file, features)
    return features, False


def _cache_key(feature_extractor, image_sets):
    """Weights (values and shapes) and input and output shapes pin down the extractor: the
    base's cut shows in its weights and output shape, the image size in the output shape."""
    digest = hashlib.sha1(f"v{CACHE_FORMAT_VERSION}".encode())
    digest.update(models.weights_fingerprint(feature_extractor).encode())
    digest.update(f"{feature_extractor.inputs[0].shape}->{feature_extractor.outputs[0].shape}".encode())
    digest.update(keras.config.dtype_policy().name.encode())  # bfloat16 features differ from float32 ones
    for name in sorted(image_sets):
        images = np.ascontiguousarray(image_sets[name])
        digest.update(f"{name}:{images.shape}:{images.dtype}".encode())
        digest.update(memoryview(images).cast("B"))
    return digest.hexdigest()[:24]


def fit_head_on_cached_features(feature_extractor, head, dataset, run, config, include_test=True):
    """Trains a compiled `head` on the frozen extractor's cached features.

    With `include_test`, the test images' features are cached too (never used in training):
    the whole model's test predictions are the head's predictions on them (see
    `whole_model_test_probabilities`). Callers whose final model differs from this
    extractor and head (two-phase fine-tuning) pass False.

    Returns:
        (history, cached): the Keras `History`, and a dict with the "train" and "val" (and
        "test") features and "from_cache" (whether they were read from the cache). The
        extraction is timed as "features", the training as "training".
    """
    verbose = 0 if config.quiet else "auto"
    image_sets = {"train": dataset.x_train, "val": dataset.x_val}
    if include_test:
        image_sets["test"] = dataset.x_test
    with run.timed("features"):
        cached, from_cache = cached_features(feature_extractor, image_sets, config.batch_size, verbose)
    print(f"Features {tuple(feature_extractor.outputs[0].shape[1:])}: "
          f"{'read from the cache' if from_cache else 'extracted and cached'} in {run.seconds['features']:.1f} s")
    history = training.fit(head, cached["train"], dataset.y_train, (cached["val"], dataset.y_val), run, config)
    return history, {**cached, "from_cache": from_cache}


# How many test images every run pushes through the whole model to prove that the head on
# the cached test features computes what the whole model computes.
VERIFIED_TEST_IMAGES = 256


def whole_model_test_probabilities(classifier, head, test_features, dataset, run, config, tolerance=None):
    """The whole model's class probabilities on the test images, without recomputing its frozen part.

    `classifier` is `head` applied to the frozen extractor whose outputs `test_features`
    are, so its predictions equal `head`'s on `test_features`. That is checked on every
    call: the whole model predicts VERIFIED_TEST_IMAGES test images itself, and if any
    probability differs by more than `tolerance`, a warning is given and the whole model
    predicts every test image itself.

    Returns:
        float64 array (N_test, num_classes), in test-set order; the time is added to the
        run's "evaluation" seconds.
    """
    if tolerance is None:
        # bfloat16 keeps 8 bits of mantissa: the same model, fused differently, differs in the 3rd digit.
        tolerance = 2e-2 if config.mixed_precision else 1e-4
    with run.timed("evaluation"):
        probabilities = distribute.predict(head, test_features, config.batch_size).astype(np.float64)
        sample = dataset.x_test[:VERIFIED_TEST_IMAGES]
        direct = distribute.predict(classifier, sample, config.batch_size).astype(np.float64)
        difference = float(np.max(np.abs(direct - probabilities[: len(sample)])))
        if difference > tolerance:
            warnings.warn(f"The head on cached test features differs from the whole model by {difference:.2g}; "
                          f"predicting every test image with the whole model instead.")
            probabilities = distribute.predict(classifier, dataset.x_test, config.batch_size).astype(np.float64)
    return probabilities
