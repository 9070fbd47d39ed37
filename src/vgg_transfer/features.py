"""Frozen-base features, computed once per (weights, image size, data) and cached on disk.

With a frozen base and no augmentation, every epoch would push the same images through
the same base; computing the features once turns minutes per epoch into seconds.
"""

import hashlib
import os
import time
import warnings
from pathlib import Path

import keras
import numpy as np

from vgg_transfer import distribute, models, paths, stored
from vgg_transfer.errors import first_line

# Bumped whenever what goes into the features changes (e.g. the preprocessing), so that
# old caches are not reused.
CACHE_FORMAT_VERSION = 3


def cached_features(feature_extractor, image_sets, batch_size=256, verbose=1, cache_dir=None):
    """Returns the extractor's outputs for each image set, from the cache when it has them,
    and prints one line saying which. Each set is cached on its own, so a run that adds a set
    (the mirror images of the test set, say) extracts only that one. Features are computed and
    written a chunk of images at a time; those larger than the memory budget stay on disk.

    Args:
        feature_extractor: a Keras model from images (or earlier activations) to features; its
            weights, input and output shapes and the precision are part of the cache key.
        image_sets: dict name -> array or `stored.StoredArray` (N, ...), e.g. {"train": x_train}.
        batch_size: extraction batch size.
        verbose: Keras progress-bar verbosity while extracting.
        cache_dir: default `paths.cache_dir()`.

    Returns:
        (features, from_cache): dict name -> features (N, *feature_shape), and whether every set
        was read from the cache. The features are kept in the dtype they were computed in (see
        `storage_dtype`), in memory as long as all the sets together fit the memory budget
        (a NumPy array, or a `stored.Bfloat16Array`), the rest on disk (`stored.StoredArray`);
        each reads as float32 (float16) arrays.
    """
    cache_dir = Path(cache_dir or paths.cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    budget = [stored.memory_budget()]  # shared by the sets: together they stay within it
    extractor_key = _extractor_key(feature_extractor)
    feature_shape = tuple(feature_extractor.outputs[0].shape[1:])
    started, features, extracted = time.perf_counter(), {}, []
    storage = storage_dtype(feature_extractor)
    suffix = stored.BFLOAT16_SUFFIX if storage == "bfloat16" else ".npy"
    cache_files = {name: cache_dir / f"features-{extractor_key}-{_array_key(images)}{suffix}"
                   for name, images in image_sets.items()}
    for name, images in image_sets.items():
        features[name] = _read(cache_files[name], (len(images), *feature_shape), budget)
        if not distribute.every_worker(features[name] is not None):  # worker processes extract together
            features[name] = None
    missing = [name for name in image_sets if features[name] is None]
    if missing and verbose:
        sets = ", ".join(f"{name} ({len(image_sets[name]):,} images)" for name in missing)
        side = _image_side(feature_extractor)
        print(f"Extracting features {feature_shape} of {sets}{f' at {side} px' if side else ''}, in "
              f"{keras.config.dtype_policy().compute_dtype}:")
    for name in missing:
        if verbose:
            print(f"  {name}", flush=True)  # labels the progress bar below it
        features[name] = _extract(feature_extractor, image_sets[name], feature_shape, batch_size, verbose,
                                  cache_files[name], storage, budget)
        extracted.append(name)
    how = f"extracted ({', '.join(extracted)}) and cached" if extracted else "read from the cache"
    print(f"Features {feature_shape}: {how} in {time.perf_counter() - started:.1f} s")
    return features, not extracted


# Images pushed through the extractor at a time, then written out: at most this many, and at
# most EXTRACTION_CHUNK_BYTES of them (8,192 CIFAR-10 images are 25 MB; 224 px photos, 1.2 GB).
EXTRACTION_CHUNK = 8192
EXTRACTION_CHUNK_BYTES = 256 * 2**20


def storage_dtype(feature_extractor):
    """The dtype the features are cached in: the one the extractor computes them in, so the
    cache holds exactly what it computed ("float32", or under mixed precision "bfloat16" or
    "float16", half the disk)."""
    computed = str(keras.backend.standardize_dtype(feature_extractor.outputs[0].dtype))
    return computed if computed in ("bfloat16", "float16") else "float32"


def _extract(feature_extractor, images, feature_shape, batch_size, verbose, cache_file, storage, budget):
    """The features of `images`, written to `cache_file` a chunk at a time, then read back (in
    memory if they fit what is left of the budget); computed in memory when the cache cannot be written."""
    temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    rows = max(batch_size, min(EXTRACTION_CHUNK, EXTRACTION_CHUNK_BYTES // max(1, images[:1].nbytes)))
    features = writer = None
    try:
        writer = stored.StoredArrayWriter(temporary, (len(images), *feature_shape), storage)
        for start in range(0, len(images), rows):
            features = distribute.predict(feature_extractor, images[start:start + rows], batch_size, verbose)
            writer[start:start + len(features)] = features
        writer.close()
        os.replace(temporary, cache_file)
    except OSError as error:  # a full disk, a read-only folder: the cache only saves time
        if writer is not None:
            writer.file.close()
        temporary.unlink(missing_ok=True)
        warnings.warn(f"Could not write the feature cache {cache_file} ({first_line(error)}); the features are "
                      f"kept in memory and the next run extracts them again.")
        if features is not None and len(features) == len(images):  # all in one chunk: computed already
            return features.astype(np.float32)
        return distribute.predict(feature_extractor, images, batch_size, verbose).astype(np.float32)
    return _read(cache_file, (len(images), *feature_shape), budget)


def _read(cache_file, shape, budget):
    """The cached array (in memory if it fits what is left of `budget`, a one-item list of
    bytes, which it then takes from; else a `StoredArray`), or None when there is none or it is
    unreadable or of the wrong shape."""
    if not cache_file.is_file():
        return None
    try:
        array = stored.StoredArray(cache_file)
        if array.shape == shape:
            if array.nbytes > budget[0]:
                return array
            budget[0] -= array.nbytes
            return stored.load(cache_file)
        warnings.warn(f"Feature cache {cache_file} has the wrong shape; extracting again.")
    except Exception as error:  # Truncated or corrupt: rebuild rather than trust it.
        warnings.warn(f"Ignoring unreadable feature cache {cache_file} ({error}); extracting again.")
    return None


def _image_side(feature_extractor):
    """The side of the images VGG16 sees: that of the preprocessing's "resize" layer, else of the
    extractor's input when it takes images (3 channels), else None (it takes activations)."""
    layers = list(feature_extractor.layers)
    while layers:
        layer = layers.pop()
        if layer.name == "resize":
            return layer.height
        layers += getattr(layer, "layers", [])
    shape = feature_extractor.inputs[0].shape
    return shape[1] if len(shape) == 4 and shape[-1] == 3 else None


def _extractor_key(feature_extractor):
    """Weights (values and shapes) and input and output shapes pin down the extractor: the
    base's cut shows in its weights and output shape, the image size in the output shape."""
    digest = hashlib.sha1(f"v{CACHE_FORMAT_VERSION}".encode())
    digest.update(models.weights_fingerprint(feature_extractor).encode())
    digest.update(f"{feature_extractor.inputs[0].shape}->{feature_extractor.outputs[0].shape}".encode())
    digest.update(keras.config.dtype_policy().name.encode())  # bfloat16 features differ from float32 ones
    return digest.hexdigest()[:16]


def _array_key(array):
    digest = hashlib.sha1(f"{tuple(array.shape)}:{array.dtype}".encode())
    if not isinstance(array, np.ndarray):  # a StoredArray or a Bfloat16Array
        for _, chunk in array.chunks():
            digest.update(memoryview(chunk).cast("B"))
    else:
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()[:16]


# How many test images every run pushes through the whole model to prove that the head on
# the cached test features computes what the whole model computes. A stale cache or a changed
# preprocessing shows on every image; 64 cost a rerun 1.3 s where 256 cost 2.8 s (32 px, float32).
VERIFIED_TEST_IMAGES = 64


def predict_with_cached_features(model, head, test_features, x_test, batch_size, run=None):
    """The whole model's predictions on the test images, without recomputing its frozen part.

    `model` is `head` applied to the frozen extractor whose outputs `test_features` are, so
    its predictions equal `head`'s on `test_features`; with a list of feature arrays (those of
    the test images and of their mirror images), `model` averages over them and so does this.
    That is checked on every call: the
    whole model predicts VERIFIED_TEST_IMAGES test images itself, and if any output differs
    by more than a tolerance (1e-4; 2e-2 under mixed precision, whose bfloat16 keeps 8 bits of
    mantissa), a warning is given and the whole model predicts every test image itself. The
    largest difference is recorded in `run.checks` (metrics.json) when a run is given.

    Returns:
        float64 array (N_test, num_classes), in test-set order.
    """
    tolerance = 1e-4 if keras.config.dtype_policy().compute_dtype == "float32" else 2e-2
    feature_sets = test_features if isinstance(test_features, list) else [test_features]
    predictions = np.mean([distribute.predict(head, features, batch_size) for features in feature_sets],
                          axis=0, dtype=np.float64)
    sample = x_test[:VERIFIED_TEST_IMAGES]
    direct = distribute.predict(model, sample, batch_size).astype(np.float64)
    difference = float(np.max(np.abs(direct - predictions[: len(sample)])))
    if run is not None:
        run.checks["cached_features"] = {"test_images_checked": len(sample), "largest_difference": difference,
                                         "tolerance": tolerance, "within_tolerance": difference <= tolerance}
    if difference > tolerance:
        warnings.warn(f"The head on cached test features differs from the whole model by {difference:.2g}; "
                      f"predicting every test image with the whole model instead.")
        predictions = distribute.predict(model, x_test, batch_size).astype(np.float64)
    return predictions
