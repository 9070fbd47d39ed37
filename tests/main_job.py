"""The main job run in a subprocess, as a user runs it, for the tests that stop it with a real
signal (tests/interrupting.py), fill its disk (tests/full_disk.py), or run it on another backend
or over several devices; and readers of the run folders it writes and of their exports."""

import csv
import json
import os
import signal
import subprocess
import sys

from conftest import PROJECT_ROOT

INTERRUPTING = PROJECT_ROOT / "tests" / "interrupting.py"
FULL_DISK = PROJECT_ROOT / "tests" / "full_disk.py"

EPOCHS = 6
# "Within noise" at this scale (900 training and 200 test images, 6 epochs), measured on the
# 2-core CPU: seeds 1, 2 and 3 gave 39.5%, 50.0% and 56.5% test accuracy on TensorFlow and
# 42.5%, 50.0% and 56.5% on JAX; the default seed gave 52.0% and 46.5%. Same-seed runs that
# differ only in random draws (another backend, or dropout after a resumption) must agree
# within 8 points.
NOISE = 0.08
COMMAND = ["--subset", "1000", "--epochs", str(EPOCHS), "--early-stopping-patience", "10", "--quiet",
           "--precision", "float32"]


def main_job(shared_data, out_dir, interrupt=None, full_disk=None, backend="tensorflow", devices=1, extra=(), data=None,
             command=COMMAND, environment=None, started=False):
    """Runs the main job's `command`; `interrupt` ("WHEN:N:SIGNAL") stops it, `full_disk` (a file
    name pattern) fills the disk when a matching file is written, `devices` > 1 splits the CPU
    into that many virtual devices; `environment` adds variables. Returns the finished process,
    or with `started` the running one (`communicate` with it), so that two can run side by side."""
    archive, weights = shared_data
    archive = data or archive
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": backend, **(environment or {})}
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)  # TensorFlow set it in this process; a terminal has none
    python = [sys.executable]
    if interrupt:  # "WHEN:N:SIGNAL", see tests/interrupting.py
        when, number, signal_name = interrupt.split(":")
        python += [str(INTERRUPTING), f"{when}:{number}", signal_name]
    if full_disk:
        python += [str(FULL_DISK), full_disk]
    if devices > 1 and backend == "jax":
        environment["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    elif devices > 1:
        python += ["-c", TENSORFLOW_LOGICAL_DEVICES.format(devices=devices)]
    process = subprocess.Popen(
        [*python, str(PROJECT_ROOT / "src" / "transfer_learning.py"), "--data", str(archive),
         "--weights", str(weights), "--out", str(out_dir), *command, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        # A shell's background jobs start with Ctrl-C (SIGINT) ignored, and Python keeps it
        # ignored; give the child the default, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    if started:
        return process
    output, errors = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, output, errors)


# Runs the script named by the first argument after the CPU is split into logical devices,
# which TensorFlow allows only before it first uses a device.
TENSORFLOW_LOGICAL_DEVICES = """
import os, runpy, sys
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * {devices})
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def runs_in(out_dir):
    folder = out_dir / "transfer_learning"
    complete = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    partial = sorted(p for p in folder.iterdir() if p.name.endswith(".partial"))
    return complete, partial


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())



def history_of(run_dir):
    with open(run_dir / "history.csv") as file:
        return list(csv.DictReader(file))


def predictions_of(run_dir):
    with open(run_dir / "predictions.csv") as file:
        return list(csv.DictReader(file))


def served_predictions(format_name, out_dir, images):
    """What the model that export.py wrote to `out_dir` gives for `images`, in its own runtime."""
    if format_name == "tf_saved_model":
        import tensorflow as tf

        served = tf.saved_model.load(str(out_dir / "saved_model")).signatures["serving_default"]
        return next(iter(served(tf.constant(images)).values())).numpy()
    if format_name == "litert":  # through the LiteRT interpreter, as on a phone
        import tensorflow as tf

        runner = tf.lite.Interpreter(str(out_dir / "model.tflite")).get_signature_runner()
        (input_name,) = runner.get_input_details()
        return next(iter(runner(**{input_name: images}).values()))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"))
    return session.run(None, {session.get_inputs()[0].name: images})[0]
