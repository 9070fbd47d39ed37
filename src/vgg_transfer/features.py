"""Frozen-base features, computed once per (weights, image size, data) and cached on disk.

With a frozen base and no augmentation, every epoch would push the same images through
the same base; computing the features once turns minutes per epoch into seconds.
"""

import hashlib
import time
import warnings

import keras
import numpy as np

from vgg_transfer import cache, distribute, models, paths

# Bumped whenever what goes into the features changes (e.g. the preprocessing), so that
# old caches are not reused.
CACHE_FORMAT_VERSION = 2


def cached_features(feature_extractor, image_sets, batch_size=256, verbose=1, cache_dir=None):
    """Returns the extractor's outputs for each image set, from the cache when it has them,
    and prints one line saying which.

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
    started = time.perf_counter()
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as stored:
                features = {name: stored[name] for name in image_sets}
            if all(features[name].shape == expected_shapes[name] for name in image_sets):
                print(f"Features {expected_shapes[next(iter(image_sets))][1:]}: read from the cache in "
                      f"{time.perf_counter() - started:.1f} s")
                return features, True
            warnings.warn(f"Feature cache {cache_file} has the wrong shapes; extracting again.")
        except Exception as error:  # Truncated or corrupt: rebuild rather than trust it.
            warnings.warn(f"Ignoring unreadable feature cache {cache_file} ({error}); extracting again.")
    features = {
        name: distribute.predict(feature_extractor, images, batch_size, verbose).astype(np.float32, copy=False)
        for name, images in image_sets.items()
    }
    cache.save_npz_atomically(cache_file, features)
    print(f"Features {expected_shapes[next(iter(image_sets))][1:]}: extracted and cached in "
          f"{time.perf_counter() - started:.1f} s")
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


# How many test images every run pushes through the whole model to prove that the head on
# the cached test features computes what the whole model computes.
VERIFIED_TEST_IMAGES = 256


def predict_with_cached_features(model, head, test_features, x_test, batch_size):
    """The whole model's predictions on the test images, without recomputing its frozen part.

    `model` is `head` applied to the frozen extractor whose outputs `test_features` are, so
    its predictions equal `head`'s on `test_features`. That is checked on every call: the
    whole model predicts VERIFIED_TEST_IMAGES test images itself, and if any output differs
    by more than a tolerance (1e-4; 2e-2 under mixed precision, whose bfloat16 keeps 8 bits of
    mantissa), a warning is given and the whole model predicts every test image itself.

    Returns:
        float64 array (N_test, num_classes), in test-set order.
    """
    tolerance = 1e-4 if keras.config.dtype_policy().compute_dtype == "float32" else 2e-2
    predictions = distribute.predict(head, test_features, batch_size).astype(np.float64)
    sample = x_test[:VERIFIED_TEST_IMAGES]
    direct = distribute.predict(model, sample, batch_size).astype(np.float64)
    difference = float(np.max(np.abs(direct - predictions[: len(sample)])))
    if difference > tolerance:
        warnings.warn(f"The head on cached test features differs from the whole model by {difference:.2g}; "
                      f"predicting every test image with the whole model instead.")
        predictions = distribute.predict(model, x_test, batch_size).astype(np.float64)
    return predictions
