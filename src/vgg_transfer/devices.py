"""What the backend computes on, the precision it computes fastest in at full accuracy, and
which of a script's recipes suits it.

A script whose best values differ between kinds of machine holds one per kind in its
constants block, chosen by one visible line:

    HARDWARE = devices.hardware()  # "gpu", "cpu_amx" (a CPU with AMX) or "cpu"
    IMAGE_SIZE = {"gpu": 128, "cpu_amx": 64, "cpu": 32}[HARDWARE]

The CPU recipes differ by AMX, not by bfloat16 alone: AMX's matrix units run VGG16's inference
4.9 to 6 times as fast in bfloat16 as in float32, where AVX512-BF16's vector instructions run
it 1.5 to 1.8 times as fast (docs/results.md), which does not make the larger images of the
AMX recipe affordable.

The precision (`PRECISION = "auto"`) is chosen from the device itself (`choose_precision`):
bfloat16 where the device has units for it, float16 with loss scaling on NVIDIA GPUs whose
tensor cores have float16 but not bfloat16, float32 elsewhere. In every mixed precision the
weights, the outputs and the loss stay float32 (Keras's "mixed_*" policies).
"""

import os
import time
from pathlib import Path

import keras
import numpy as np

from vgg_transfer import distribute

# Set to "gpu", "cpu_amx" or "cpu" to choose a recipe whatever the machine has (e.g. the CPU
# recipe on a GPU machine, to compare).
HARDWARE_VARIABLE = "VGG_TRANSFER_HARDWARE"
HARDWARE_CLASSES = ("gpu", "cpu_amx", "cpu")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# Keras's dtype policy for each precision: mixed precisions keep float32 weights.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


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


def gpu_compute_capability():
    """The first GPU's CUDA compute capability as (major, minor), or None (no GPU, or a GPU
    whose backend does not say: an AMD or Apple one)."""
    try:
        backend = keras.config.backend()
        if backend == "tensorflow":
            import tensorflow as tf  # TensorFlow-only branch

            found = tf.config.list_physical_devices("GPU")
            capability = tf.config.experimental.get_device_details(found[0]).get("compute_capability") if found else None
            return tuple(capability) if capability else None
        if backend == "jax":
            import jax  # JAX-only branch

            found = [device for device in jax.devices() if device.platform == "gpu"]
            capability = getattr(found[0], "compute_capability", None) if found else None
            return tuple(int(part) for part in str(capability).split(".")[:2]) if capability else None
        if backend == "torch":
            import torch  # torch-only branch

            return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    except Exception:  # a device that cannot be queried is treated as one without a known capability
        return None
    return None


def cpu_bfloat16_units(cpuinfo=Path("/proc/cpuinfo")):
    """The CPU's bfloat16 units as a name ("AMX-BF16", "AVX512-BF16"), or None.

    Linux lists the CPU's features in /proc/cpuinfo. Elsewhere NumPy's run-time CPU detection
    (CPUID, on every operating system) tells: AVX512-BF16 directly, and AMX by the AVX512-FP16
    group that every Intel CPU with AMX (Sapphire Rapids and later) also has ("AVX512_SPR").
    """
    if cpuinfo.is_file():
        try:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                          if line.startswith(("flags", "Features"))), [])
        except OSError:
            flags = []
        if flags:
            return "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # NumPy 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__  # NumPy 1.26
        except ImportError:
            return None
    if __cpu_features__.get("AVX512_SPR"):
        return "AMX-BF16"
    return "AVX512-BF16" if __cpu_features__.get("AVX512BF16") else None


def hardware():
    """"gpu" where the backend sees a GPU, "cpu_amx" on a CPU with AMX-BF16 (see
    `cpu_bfloat16_units`), else "cpu"; the VGG_TRANSFER_HARDWARE variable, set to one of these,
    chooses instead. With several worker processes (see `distribute`), joins them first: JAX
    must know every worker before it lists its devices."""
    if os.environ.get(distribute.JOB_ADDRESSES):
        distribute.connect_workers()
    chosen = os.environ.get(HARDWARE_VARIABLE, "").lower()
    if chosen in HARDWARE_CLASSES:
        return chosen
    if gpus():
        return "gpu"
    return "cpu_amx" if cpu_bfloat16_units() == "AMX-BF16" else "cpu"


# The default of the device arguments below: this machine's, detected.
DETECT = "detect"


def choose_precision(requested="auto", gpu_capability=DETECT, cpu_units=DETECT, on_gpu=DETECT):
    """The precision to compute in, and why, in words.

    Args:
        requested: "auto", or "float32", "bfloat16" or "float16" to choose it outright.
        gpu_capability, cpu_units, on_gpu: the device, by default (DETECT) this machine's (see
            `gpu_compute_capability`, `cpu_bfloat16_units`, `gpus`); the tests pass others.

    Returns:
        (precision, reason): "float32", "bfloat16" or "float16", and e.g. "the CPU has AMX-BF16".
        With "auto": on an NVIDIA GPU of compute capability 8.0 or more (A100, H100, RTX 30xx
        and 40xx) bfloat16; 7.x (V100, T4, RTX 20xx) float16, their tensor cores' type, which
        trains with Keras's loss scaling (bfloat16 is emulated there and slower than float32);
        below 7.0 float32. On a CPU with bfloat16 units bfloat16, on other CPUs float32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, "chosen by PRECISION or --precision"
    on_gpu = bool(gpus()) if on_gpu == DETECT else on_gpu
    if on_gpu:
        capability = gpu_compute_capability() if gpu_capability == DETECT else gpu_capability
        if capability is None:
            return "float32", "the GPU's compute capability is unknown (not an NVIDIA GPU?)"
        version = ".".join(map(str, capability))
        if capability >= (8, 0):
            return "bfloat16", f"the GPU (compute capability {version}) has bfloat16 tensor cores"
        if capability >= (7, 0):
            return "float16", (f"the GPU (compute capability {version}) has float16 tensor cores but no bfloat16 "
                               f"ones; trained with loss scaling")
        return "float32", f"the GPU (compute capability {version}) has no tensor cores"
    units = cpu_bfloat16_units() if cpu_units == DETECT else cpu_units
    if units:
        return "bfloat16", f"the CPU has {units}"
    return "float32", "the CPU has no bfloat16 units"


def offered_precisions(gpu_capability=DETECT, cpu_units=DETECT, on_gpu=DETECT):
    """The precisions this device computes natively: float32 always; bfloat16 on a CPU with
    bfloat16 units or a GPU of compute capability 8.0 or more; float16 on a GPU of 7.0 or more."""
    on_gpu = bool(gpus()) if on_gpu == DETECT else on_gpu
    if on_gpu:
        capability = (gpu_compute_capability() if gpu_capability == DETECT else gpu_capability) or (0, 0)
        return ["float32", *(["float16"] if capability >= (7, 0) else []), *(["bfloat16"] if capability >= (8, 0) else [])]
    units = cpu_bfloat16_units() if cpu_units == DETECT else cpu_units
    return ["float32", *(["bfloat16"] if units else [])]


def set_precision(precision):
    """Sets Keras's global dtype policy for "float32", "bfloat16" or "float16" (mixed: float32
    weights; a model compiled under "float16" gets Keras's loss scaling). Call before building
    models."""
    keras.config.set_dtype_policy(DTYPE_POLICIES[precision])


def matmul_peak(size=4096, min_seconds=3.0):
    """FLOP/s of a square matrix product of side `size` in the compute dtype of Keras's dtype
    policy, timed for at least `min_seconds` after a warm-up: the device's practical peak."""
    dtype = keras.config.dtype_policy().compute_dtype
    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((size, size), np.float32), dtype)
    b = keras.ops.convert_to_tensor(rng.standard_normal((size, size), np.float32), dtype)

    def products(count):
        c = a
        for _ in range(count):
            c = keras.ops.matmul(a, b)
        keras.ops.convert_to_numpy(keras.ops.cast(c[0, 0], "float32"))  # waits for asynchronous backends (JAX)

    products(2)
    start = time.perf_counter()
    products(1)
    count = max(3, int(np.ceil(min_seconds / max(time.perf_counter() - start, 1e-6))))
    start = time.perf_counter()
    products(count)
    return count * 2 * size**3 / (time.perf_counter() - start)


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
