"""Data-parallel training over every local device (`--distribute`), or over the devices of
several worker processes, with each backend's own engine.

On JAX, `keras.distribution.DataParallel` replicates the variables on every device and
splits each batch between them; on TensorFlow, `tf.distribute.MirroredStrategy` does the
same (set as the global strategy, so every model built afterwards is mirrored). The
scripts call `fit` and `predict` exactly as on one device. This module keeps no state of its
own: how many devices share a batch, and which worker this process is, are read from the
engine that `configure` set up (Keras's distribution, TensorFlow's strategy, JAX's processes).

Both engines need every batch to split evenly: JAX refuses a batch whose size is not a
multiple of the device count, and TensorFlow gives a replica with an empty share NaN batch
statistics. So with N devices the batch size must be a multiple of N, the training and
validation sets lose their last `len % N` images (at most N - 1; the run prints how many),
and the test set is padded for prediction and the padding's predictions dropped, so the
test figures always cover every test image.

Several worker processes (one per machine, or two on one machine to try it) train as one on
JAX: every worker runs the same command, with Keras's own variables naming the workers:
KERAS_DISTRIBUTION_JOB_ADDRESSES (every worker's host:port, the first one coordinates),
KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID. `connect_workers` (called
by `devices.hardware`, before JAX is asked for its devices) joins them;
`keras.distribution.DataParallel` then spans every worker's devices, and each worker feeds its
own share of every batch (`share_of_batch`). Every worker computes the same figures; worker 0
(the chief) writes the run folder and the caches, the others keep theirs in a folder of their
own that is removed when the run completes (`worker_folder`).
"""

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np

from vgg_transfer.errors import InputError, first_line

# Keras's variable naming every worker process when several train together (JAX).
JOB_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"


def connect_workers():
    """Joins the worker processes that KERAS_DISTRIBUTION_* name (JAX); ends the process with
    one line when they are incomplete or on another backend."""
    try:
        if keras.config.backend() != "jax":
            raise InputError(f"{JOB_ADDRESSES} is set: training across worker processes needs KERAS_BACKEND=jax "
                             f"(the {keras.config.backend()} backend is not supported)")
        missing = [name for name in ("KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")
                   if not os.environ.get(name)]
        if missing:
            raise InputError(f"{JOB_ADDRESSES} is set but {' and '.join(missing)} not: set them on every worker")
        keras.distribution.initialize()  # reads the three variables; waits for every worker to join
    except (ValueError, RuntimeError) as error:  # InputError among them
        sys.exit(f"error: {first_line(error)}")


def worker():
    """(this process's index among the worker processes, their number): (0, 1) for one process."""
    if os.environ.get(JOB_ADDRESSES) and keras.config.backend() == "jax":
        import jax  # JAX-only path: its processes

        return jax.process_index(), jax.process_count()
    return 0, 1


def replicas():
    """How many devices share each batch: 1 unless `configure` set up data parallelism."""
    backend = keras.config.backend()
    if backend == "jax":
        distribution = keras.distribution.distribution()
        return len(distribution.device_mesh.devices.flat) if distribution is not None else 1
    if backend == "tensorflow":
        import tensorflow as tf  # TensorFlow-only path: its strategy

        return tf.distribute.get_strategy().num_replicas_in_sync
    return 1


def configure(enabled, batch_size):
    """Sets up data parallelism over all local devices when `enabled` (the `--distribute` flag),
    and always over every worker's devices when several worker processes are connected; does
    nothing otherwise. Call before any model is built (its variables must be created on every device).

    Returns:
        What metrics.json records: {"engine", "replicas", "devices"}, or None on one device.

    Raises:
        InputError: the torch backend (Keras has no data-parallel engine for it), or a
            batch size that does not split evenly over the devices.
    """
    _, workers = worker()
    if not (enabled or workers > 1):  # several workers: always data-parallel over all their devices
        return None
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
        # Each worker's batches are its share already (share_of_batch): not sharded again.
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices,
                                                                            auto_shard_dataset=False))
        engine = "keras.distribution.DataParallel" + (f", {workers} worker processes" if workers > 1 else "")
    else:
        tf.distribute.experimental_set_strategy(tf.distribute.MirroredStrategy(devices))
        engine = "tf.distribute.MirroredStrategy"
    description = {"engine": engine, "replicas": len(devices), "devices": [str(device) for device in devices]}
    print(f"Data-parallel over {len(devices)} device{'s' if len(devices) > 1 else ''} ({engine}): "
          f"{', '.join(description['devices'])}; {batch_size // len(devices)} images per device and batch")
    return description


def variable_placement(model):
    """Where the model's variables live, read from the backend: {"variables": N, "replicated_on":
    the fewest devices any variable has a full copy on}, or None on one device. A check that
    data parallelism really replicated the weights, recorded in metrics.json."""
    if replicas() == 1:
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
    devices (the rest, fewer than the device count per set, dropped); the test set stays whole."""
    count = replicas()
    if count == 1:
        return dataset
    kept = {name: len(getattr(dataset, f"y_{name}")) // count * count for name in ("train", "val")}
    dropped = {name: len(getattr(dataset, f"y_{name}")) - size for name, size in kept.items()}
    if any(dropped.values()):
        print(f"Dropped {dropped['train']} training and {dropped['val']} validation images so that every "
              f"batch splits evenly over {count} devices")
    return dataclasses.replace(dataset, **{
        f"{array}_{name}": getattr(dataset, f"{array}_{name}")[:size]
        for name, size in kept.items() for array in ("x", "y")
    })


def predict(model, x, batch_size, verbose=0):
    """`model.predict(x)` as a NumPy array (`len(x)` rows, in order), on any number of devices:
    the inputs are padded with copies of the last one to split evenly, and the padding's
    outputs dropped. An array stored on disk is read a chunk at a time."""
    if not isinstance(x, np.ndarray):  # a stored.StoredArray or Bfloat16Array
        return np.concatenate([predict(model, chunk, batch_size, verbose) for _, chunk in x.chunks(8192)])
    if worker()[1] > 1:
        return _predict_across_workers(model, x, batch_size)
    padding = -len(x) % replicas()
    if padding:
        x = np.concatenate([x, np.repeat(x[-1:], padding, axis=0)])
    outputs = np.asarray(model.predict(x, batch_size=batch_size, verbose=verbose))
    return outputs[: len(outputs) - padding]


def share_of_batch(rows):
    """This worker's share of a batch's rows (all of them with one worker process): the
    workers together feed the whole batch, each its own contiguous part."""
    index, workers = worker()
    if workers == 1:
        return rows
    share = len(rows) // workers
    return rows[index * share:(index + 1) * share]


def _gathered(value):
    """`value` (an integer) from every worker process, in their order."""
    from jax.experimental import multihost_utils  # JAX-only path: the workers' collective

    return np.asarray(multihost_utils.process_allgather(np.array([int(value)]))).ravel().tolist()


def every_worker(flag):
    """Whether `flag` is true on every worker process (it is with one): for choices that must
    be the same everywhere, such as reading a cache that one worker may lack."""
    return bool(flag) if worker()[1] == 1 else all(_gathered(bool(flag)))


def check_workers_agree(value, what):
    """Raises InputError when the worker processes hold different integers `value`, e.g. the
    epoch each would resume after."""
    if worker()[1] == 1:
        return
    values = _gathered(value)
    if len(set(values)) > 1:
        raise InputError(f"the workers disagree on {what} ({', '.join(map(str, values))} for workers 0 to "
                         f"{len(values) - 1}); delete the interrupted run's folders on every worker to start afresh")


def _predict_across_workers(model, x, batch_size):
    """`model`'s outputs for `x` (the same on every worker), each worker computing its share of
    every batch and all of them gathered: Keras's `predict` cannot bring back outputs spread
    over other processes' devices."""
    import jax  # JAX-only path
    from jax.experimental import multihost_utils

    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("batch",)),
                                          jax.sharding.PartitionSpec("batch"))
    if not model.built:  # a subclassed model creates its variables on its first call
        model(x[:1], training=False)
    forward = jax.jit(lambda trainable, non_trainable, batch: model.stateless_call(
        trainable, non_trainable, batch, training=False)[0])
    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]
    count = replicas()
    batch_size = -(-batch_size // count) * count
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        local = jax.make_array_from_process_local_data(sharding, share_of_batch(padded))
        gathered = multihost_utils.process_allgather(forward(trainable, non_trainable, local), tiled=True)
        outputs.append(np.asarray(gathered, dtype=np.float32)[:len(batch)])
    return np.concatenate(outputs)


def refuse_tensorflow_workers():
    """TF_CONFIG names TensorFlow's worker processes; rather than train a separate copy on every
    worker, say that training across workers needs JAX."""
    if os.environ.get("TF_CONFIG") and not os.environ.get(JOB_ADDRESSES) and keras.config.backend() == "tensorflow":
        raise InputError("TF_CONFIG is set, but training across TensorFlow workers (MultiWorkerMirroredStrategy) "
                         "is not supported; train across workers on JAX (docs/design.md, 'Training on several "
                         "machines')")


def worker_folder(arguments):
    """With several worker processes, the run folder and caches of a worker other than the
    chief (worker 0): a folder of its own, the same for a rerun (which resumes from it) and
    removed when the run completes; `arguments["out"]` and the cache are moved there. Else None."""
    index, _ = worker()
    if index == 0:
        return None
    port = os.environ[JOB_ADDRESSES].split(",")[0].rsplit(":", 1)[-1]
    folder = Path(tempfile.gettempdir()) / f"vgg-transfer-worker-{port}-{index}"
    arguments["out"] = str(folder / "out")
    os.environ["VGG_TRANSFER_CACHE_DIR"] = str(folder / "cache")
    return folder


def exit_status(status):
    """`status` to return; with several worker processes, the process ends here instead: JAX's
    shutdown would wait minutes for workers that stopped, then abort with a stack trace."""
    if os.environ.get(JOB_ADDRESSES):
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)
    return status
