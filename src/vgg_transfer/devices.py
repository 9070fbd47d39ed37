"""What the backend computes on, and which of a script's two recipes suits it.

A script whose best values differ between a GPU and a CPU holds both in its constants block,
chosen by one visible line:

    HARDWARE = devices.hardware()  # "gpu" where Keras sees one, else "cpu"
    IMAGE_SIZE = 128 if HARDWARE == "gpu" else 32
"""

import os

import keras

# Set to "cpu" or "gpu" to choose the recipe whatever the machine has (e.g. the CPU recipe on a
# GPU machine, to compare).
HARDWARE_VARIABLE = "VGG_TRANSFER_HARDWARE"


def gpus():
    """The GPUs the backend would compute on, as names (an empty list on a CPU-only machine)."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # TensorFlow-only branch: its device list

        return [device.name for device in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax  # JAX-only branch: its device list

        return [str(device) for device in jax.devices() if device.platform == "gpu"]
    if backend == "torch":
        import torch  # torch-only branch: its device list

        return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return []


def hardware():
    """"gpu" where the backend sees a GPU, else "cpu"; the VGG_TRANSFER_HARDWARE variable, when
    set to either, chooses instead."""
    chosen = os.environ.get(HARDWARE_VARIABLE, "").lower()
    if chosen in ("cpu", "gpu"):
        return chosen
    return "gpu" if gpus() else "cpu"


def description():
    """What the backend computes on, e.g. "GPU (NVIDIA H100 80GB HBM3) x1" or "CPU"."""
    try:
        if keras.config.backend() == "jax":
            import jax

            devices = jax.devices()
            return f"{devices[0].platform.upper()} ({devices[0].device_kind}) x{len(devices)}"
        found = gpus()
        return f"GPU ({found[0]}) x{len(found)}" if found else "CPU"
    except Exception:  # Reporting the device must never stop a run.
        return "unknown"
