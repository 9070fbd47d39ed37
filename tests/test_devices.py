"""The precision and the recipe each kind of device gets, decided on simulated devices: NVIDIA
GPUs of every compute capability, CPUs with and without bfloat16 units; and float16 training
with loss scaling, on a toy model on this CPU."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import PROJECT_ROOT
from vgg_transfer import devices


@pytest.mark.parametrize("capability, expected", [
    ((6, 0), "float32"),   # P100: no tensor cores
    ((7, 0), "float16"),   # V100
    ((7, 5), "float16"),   # T4 (Colab's free GPU): bfloat16 only emulated there, slower than float32
    ((8, 0), "bfloat16"),  # A100
    ((8, 9), "bfloat16"),  # RTX 40xx
    ((9, 0), "bfloat16"),  # H100
])
def test_auto_precision_on_an_nvidia_gpu_follows_its_compute_capability(capability, expected):
    precision, reason = devices.choose_precision("auto", gpu_capability=capability, on_gpu=True)
    assert precision == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in reason
    assert ("loss scaling" in reason) == (expected == "float16")
    offered = devices.offered_precisions(gpu_capability=capability, on_gpu=True)
    assert expected in offered and offered[0] == "float32"


@pytest.mark.parametrize("units, expected, reason", [
    ("AMX-BF16", "bfloat16", "the CPU has AMX-BF16"),
    ("AVX512-BF16", "bfloat16", "the CPU has AVX512-BF16"),
    (None, "float32", "the CPU has no bfloat16 units"),
])
def test_auto_precision_on_a_cpu_follows_its_bfloat16_units(units, expected, reason):
    assert devices.choose_precision("auto", cpu_units=units, on_gpu=False) == (expected, reason)
    assert devices.offered_precisions(cpu_units=units, on_gpu=False) == ["float32", *(["bfloat16"] if units else [])]


def test_a_precision_named_outright_is_kept_and_an_unknown_one_refused():
    assert devices.choose_precision("float16", cpu_units=None, on_gpu=False) == (
        "float16", "chosen by PRECISION or --precision")
    with pytest.raises(ValueError, match="'int8' is not one of auto, float32, bfloat16, float16"):
        devices.choose_precision("int8")


@pytest.mark.parametrize("flags, expected", [
    ("fpu vme sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AMX-BF16"),
    ("fpu vme sse avx2 avx512f avx512_bf16", "AVX512-BF16"),
    ("fpu vme sse avx2 fma", None),
])
def test_bfloat16_units_are_read_from_the_cpus_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert devices.cpu_bfloat16_units(cpuinfo) == expected


@pytest.mark.parametrize("gpus, units, forced, expected", [
    ([], None, None, "cpu"), ([], "AVX512-BF16", None, "cpu"), ([], "AMX-BF16", None, "cpu_amx"),
    (["/physical_device:GPU:0"], "AMX-BF16", None, "gpu"), (["/physical_device:GPU:0"], None, "cpu_amx", "cpu_amx"),
])
def test_the_hardware_class_follows_the_devices(monkeypatch, gpus, units, forced, expected):
    monkeypatch.setattr(devices, "gpus", lambda: gpus)
    monkeypatch.setattr(devices, "cpu_bfloat16_units", lambda: units)
    if forced:
        monkeypatch.setenv(devices.HARDWARE_VARIABLE, forced)
    else:
        monkeypatch.delenv(devices.HARDWARE_VARIABLE, raising=False)
    assert devices.hardware() == expected


def test_float16_trains_with_loss_scaling_and_keeps_float32_weights_and_outputs():
    """On this CPU (slow, but the same arithmetic as a T4's): Keras wraps the optimizer in its
    loss scaling when a model is compiled under the float16 policy, and the toy model learns."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64")
    try:
        devices.set_precision("float16")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(2, activation="softmax", dtype="float32")])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        history = model.fit(x, y, batch_size=32, epochs=8, verbose=0)
        assert model.layers[0].compute_dtype == "float16" and model.layers[0].kernel.dtype == "float32"
        assert model.predict(x[:4], verbose=0).dtype == np.float32
        assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
        assert history.history["accuracy"][-1] > 0.9
    finally:
        keras.config.set_dtype_policy("float32")


ALLOCATOR_PROBE = """
import os, vgg_transfer, tensorflow as tf
product = tf.ones((512, 512)) @ tf.ones((512, 512))  # something allocated
try:
    print(os.environ["TF_CPU_ALLOCATOR_USE_BFC"], tf.config.experimental.get_memory_info("CPU:0")["peak"] > 0)
except ValueError:  # the default allocator keeps no statistics
    print(os.environ["TF_CPU_ALLOCATOR_USE_BFC"], "malloc")
"""


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow's CPU allocator")
@pytest.mark.parametrize("setting, expected", [(None, "true True"), ("false", "false malloc")])
def test_tensorflow_takes_its_cpu_memory_from_its_bfc_allocator_unless_the_user_says_otherwise(setting, expected):
    """The package sets TF_CPU_ALLOCATOR_USE_BFC before TensorFlow loads (the C library's malloc
    made the head's training zero fresh pages every step, docs/design.md); a user's own
    setting wins. Only the BFC allocator keeps the statistics read here."""
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPU_ALLOCATOR_USE_BFC"}
    if setting:
        environment["TF_CPU_ALLOCATOR_USE_BFC"] = setting
    finished = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, timeout=300,
                              env={**environment, "PYTHONPATH": str(PROJECT_ROOT / "src")})
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.split("\n")[-2] == expected
