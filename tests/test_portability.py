"""Runs where students are: nothing POSIX-only on a run's path (Windows emulated by taking the
calls away), the memory the machine has read on every platform, and every script's first line
of output its own, not the backend's."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from vgg_transfer import stored

# Runs the script named by the first argument with the POSIX-only calls that Windows lacks
# taken out of `os`, after NumPy and Keras have loaded (as on Windows, where they never existed).
WITHOUT_POSIX_CALLS = """
import os, runpy, sys
import numpy, keras
for name in ("sysconf", "pread", "pwrite", "fork"):
    if hasattr(os, name):
        delattr(os, name)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_the_main_job_runs_where_os_has_no_sysconf_pread_or_pwrite(shared_data, tmp_path):
    """With a 1 MB memory budget the decoded images and the features go through the stored
    arrays (written and read at offsets), the code that used os.pwrite and os.pread."""
    archive, weights = shared_data
    environment = {**os.environ, stored.MEMORY_BUDGET_VARIABLE: "1", "VGG_TRANSFER_CACHE_DIR": str(tmp_path / "cache")}
    finished = subprocess.run(
        [sys.executable, "-c", WITHOUT_POSIX_CALLS, str(PROJECT_ROOT / "src" / "transfer_learning.py"), "--data",
         str(archive), "--weights", str(weights), "--out", str(tmp_path / "out"), "--subset", "500", "--epochs", "2",
         "--quiet", "--precision", "float32"], capture_output=True, text=True, env=environment, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert list((tmp_path / "cache").glob("split-*/x_train.npy"))  # the stored arrays' path was taken
    (run_dir,) = (tmp_path / "out" / "transfer_learning").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.25  # chance is 0.1


def test_the_machines_memory_is_read_without_sysconf(monkeypatch):
    if sys.platform != "linux":
        pytest.skip("reads Linux's /proc/meminfo; Windows and macOS take their own branch")
    with open("/proc/meminfo") as file:
        expected = int(next(line for line in file if line.startswith("MemTotal:")).split()[1]) * 1024
    monkeypatch.delattr(os, "sysconf", raising=False)
    monkeypatch.delenv(stored.MEMORY_BUDGET_VARIABLE, raising=False)
    assert stored.total_memory() == expected and stored.memory_budget() == expected // 4


# Each script and tool, with arguments that end it early (bad input) or at once (--help).
COMMANDS = [
    ["transfer_learning.py", "--epochs", "0"], ["transfer_learning_subclassed.py", "--data", "nowhere"],
    ["transfer_learning_sequential.py", "--subset", "0"], ["fine_tune.py", "--image-size", "8"],
    ["baselines.py", "--model", "resnet"], ["benchmark.py", "--image-sizes", "8"], ["predict.py", "a.jpg", "--model",
                                                                                   "nowhere"],
    ["gradcam.py", "--model", "nowhere"], ["feature_maps.py", "--model", "nowhere"],
    ["export.py", "nowhere", "--format", "onnx"], ["explore_data.py", "--data", "nowhere"],
    ["compare.py", "--out", "nowhere"], ["benchmark_main_job.py", "--help"], ["benchmark_memory.py", "--help"],
]


@pytest.mark.slow
def test_the_first_line_every_script_prints_is_its_own(tmp_path):
    """TensorFlow 2.21 writes six lines to stderr as it loads (oneDNN's notice, "Could not find
    cuda drivers", absl's warning); none of them reaches the terminal, before or after ours."""
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    processes = [(command, subprocess.Popen([sys.executable, str(PROJECT_ROOT / "src" / command[0]), *command[1:]],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                            env=environment, cwd=tmp_path)) for command in COMMANDS]
    for command, process in processes:
        output, _ = process.communicate(timeout=300)
        lines = output.strip().splitlines()
        assert lines, command
        first = lines[0]
        assert first.startswith((f"{command[0]}: error:", "usage:", "Recipe for ", "Precision: ")), (command, output)
        assert f"{command[0]}: error:" in output or first.startswith("usage:"), (command, output)
        assert not [line for line in lines if line.startswith(("WARNING: All log", "I0000", "W0000", "E0000"))], (
            command, output[:2000])
