"""Frozen-base features, computed once per (weights, image size, data) and cached on disk.

With a frozen base and no augmentation, every epoch would push the same images through
the same base; computing the features once turns minutes per epoch into seconds.
"""

import hashlib
import os
import warnings

import numpy as np

from vgg_transfer import model as models
from vgg_transfer import paths

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
        name: (len(images), *feature_extractor.output.shape[1:]) for name, images in image_sets.items()
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
        name: np.asarray(feature_extractor.predict(images, batch_size=batch_size, verbose=verbose), dtype=np.float32)
        for name, images in image_sets.items()
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            np.savez(file, **features)
        os.replace(temporary, cache_file)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        warnings.warn(f"Could not write the feature cache {cache_file} ({error}); the next run extracts again.")
    return features, False


def _cache_key(feature_extractor, image_sets):
    """Weights (values and shapes) and input and output shapes pin down the extractor: the
    base's cut shows in its weights and output shape, the image size in the output shape."""
    digest = hashlib.sha1(f"v{CACHE_FORMAT_VERSION}".encode())
    digest.update(models.weights_fingerprint(feature_extractor).encode())
    digest.update(f"{feature_extractor.input.shape}->{feature_extractor.output.shape}".encode())
    for name in sorted(image_sets):
        images = np.ascontiguousarray(image_sets[name])
        digest.update(f"{name}:{images.shape}:{images.dtype}".encode())
        digest.update(memoryview(images).cast("B"))
    return digest.hexdigest()[:24]
