"""Data-parallel training over every local device (`--distribute`), with each backend's own engine.

On JAX, `keras.distribution.DataParallel` replicates the variables on every device and
splits each batch between them; on TensorFlow, `tf.distribute.MirroredStrategy` does the
same (set as the global strategy, so every model built afterwards is mirrored). The
scripts call `fit` and `predict` exactly as on one device.

Both engines need every batch to split evenly: JAX refuses a batch whose size is not a
multiple of the device count, and TensorFlow gives a replica with an empty share NaN batch
statistics. So with N devices the batch size must be a multiple of N, the training and
validation sets lose their last `len % N` images (at most N - 1; the run prints how many),
and the test set is padded for prediction and the padding's predictions dropped, so the
test figures always cover every test image.
"""

import dataclasses

import keras
import numpy as np

from vgg_transfer.errors import InputError

# How many devices share each batch; 1 unless `configure` set up data parallelism.
replicas = 1
# What metrics.json records: engine and devices, or None on one device.
description = None


def configure(enabled, batch_size):
    """Sets up data parallelism over all local devices when `enabled` (the `--distribute` flag).

    Call before any model is built (its variables must be created on every device).

    Raises:
        InputError: the torch backend (Keras has no data-parallel engine for it), or a
            batch size that does not split evenly over the devices.
    """
    global replicas, description
    replicas, description = 1, None
    if not enabled:
        return
    backend = keras.config.backend()
    if backend == "jax":
        devices = keras.distribution.list_devices()  # the accelerators if any, else the CPU devices
    elif backend == "tensorflow":
        import tensorflow as tf  # TensorFlow-only path: its own data-parallel engine

        devices = ([device.name for device in tf.config.list_logical_devices("GPU")]
                   or [device.name for device in tf.config.list_logical_devices("CPU")])
    else:
        raise InputError(f"--distribute needs KERAS_BACKEND=jax or tensorflow; Keras has no data-parallel "
                         f"training for the {backend} backend")
    if batch_size % len(devices):
        raise InputError(f"--batch-size {batch_size} does not split evenly over {len(devices)} devices; "
                         f"pass a multiple of {len(devices)}")
    if backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        engine = "keras.distribution.DataParallel"
    else:
        tf.distribute.experimental_set_strategy(tf.distribute.MirroredStrategy(devices))
        engine = "tf.distribute.MirroredStrategy"
    replicas = len(devices)
    description = {"engine": engine, "replicas": replicas, "devices": [str(device) for device in devices]}
    print(f"Data-parallel over {replicas} device{'s' if replicas > 1 else ''} ({engine}): "
          f"{', '.join(description['devices'])}; {batch_size // replicas} images per device and batch")


def variable_placement(model):
    """Where the model's variables live, read from the backend: {"variables": N, "replicated_on":
    the fewest devices any variable has a full copy on}, or None without --distribute. A check
    that data parallelism really replicated the weights, recorded in metrics.json."""
    if replicas == 1:
        return None
    copies = []
    for variable in model.weights:
        value = variable.value
        if keras.config.backend() == "jax":
            sharding = value.sharding
            copies.append(len(sharding.device_set) if sharding.is_fully_replicated else 1)
        else:  # TensorFlow: a MirroredVariable holds one value per replica
            copies.append(len(getattr(value, "values", (value,))))
    return {"variables": len(copies), "replicated_on": min(copies)}


def whole_batches(dataset):
    """The dataset with as many training and validation images as split evenly over the
    devices (the rest, fewer than `replicas` per set, dropped); the test set stays whole."""
    if replicas == 1:
        return dataset
    kept = {name: len(getattr(dataset, f"y_{name}")) // replicas * replicas for name in ("train", "val")}
    dropped = {name: len(getattr(dataset, f"y_{name}")) - count for name, count in kept.items()}
    if any(dropped.values()):
        print(f"Dropped {dropped['train']} training and {dropped['val']} validation images so that every "
              f"batch splits evenly over {replicas} devices")
    return dataclasses.replace(dataset, **{
        f"{array}_{name}": getattr(dataset, f"{array}_{name}")[:count]
        for name, count in kept.items() for array in ("x", "y")
    })


def predict(model, x, batch_size, verbose=0):
    """`model.predict(x)` as a NumPy array (`len(x)` rows, in order), on any number of devices:
    the inputs are padded with copies of the last one to split evenly, and the padding's
    outputs dropped. An array stored on disk is read a chunk at a time."""
    if not isinstance(x, np.ndarray):  # a stored.StoredArray
        return np.concatenate([predict(model, chunk, batch_size, verbose) for _, chunk in x.chunks(8192)])
    padding = -len(x) % replicas
    if padding:
        x = np.concatenate([x, np.repeat(x[-1:], padding, axis=0)])
    outputs = np.asarray(model.predict(x, batch_size=batch_size, verbose=verbose))
    return outputs[: len(outputs) - padding]
