"""The other backends (JAX, torch), data parallelism over devices and over worker processes:
each against the TensorFlow float32 run on one device."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT_ROOT
from main_job import (COMMAND, EPOCHS, INTERRUPTING, NOISE, history_of, main_job, metrics_of, predictions_of,
                      runs_in)
from vgg_transfer import data, paths


def _require_jax():
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("REQUIRE_SHARED_DATA") == "1":
            pytest.fail("jax is not installed; CI installs jax[cpu] for this test")
        pytest.skip("jax is not installed (pip install 'jax[cpu]')")


@pytest.fixture(scope="module")
def jax_run(shared_data, tmp_path_factory):
    """The main job's test command on the JAX backend: its run folder."""
    _require_jax()
    out_dir = tmp_path_factory.mktemp("jax")
    finished = main_job(shared_data, out_dir, backend="jax")
    assert finished.returncode == 0, finished.stderr
    (run_dir,), _ = runs_in(out_dir)
    return run_dir


@pytest.mark.slow
def test_the_jax_backend_gives_the_same_result_within_noise(jax_run, uninterrupted):
    metrics = metrics_of(jax_run)
    # The head trains on JAX; the whole model's check on 64 test images runs VGG16 on JAX
    # against the features cached by the TensorFlow runs above: the same function, to float32's rounding.
    check = metrics["checks"]["cached_features"]
    assert check["test_images_checked"] == 64 and check["largest_difference"] <= 1e-5, check
    assert metrics["environment"]["backend"] == "jax" and metrics["epochs_run"] == EPOCHS
    assert metrics["test_accuracy"] == pytest.approx(uninterrupted[0]["test_accuracy"], abs=NOISE)
    # What XLA compiled is kept in the cache folder, for the next JAX run to load.
    assert len(list(paths.jax_compilation_cache().iterdir())) >= 10


@pytest.mark.slow
def test_predict_gradcam_and_export_run_on_jax(jax_run, shared_data, tmp_path):
    """The tools on the JAX backend, with the model trained there: predict.py gives what the run
    predicted, Grad-CAM draws its picture, a SavedModel export serves the same probabilities, and
    LiteRT (which Keras exports on TensorFlow and torch only) is refused in one line."""
    import csv
    import json

    import tensorflow as tf

    environment = {**os.environ, "KERAS_BACKEND": "jax", "CUDA_VISIBLE_DEVICES": ""}
    test_images = data.load_dataset(shared_data[0], seed=42, subset=1000, verbose=False).x_test[:6]  # the run's
    for index, image in enumerate(test_images):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    commands = {
        "predict": ("predict.py", *[str(tmp_path / f"{index}.png") for index in range(6)], "--model", str(jax_run), "--json"),
        "gradcam": ("gradcam.py", "--model", str(jax_run), "--images-per-class", "1", "--data", str(shared_data[0]),
                    "--out", str(tmp_path / "gradcam")),
        "saved_model": ("export.py", str(jax_run), "--format", "tf_saved_model", "--out", str(tmp_path / "saved")),
        "litert": ("export.py", str(jax_run), "--format", "litert", "--out", str(tmp_path / "litert")),
    }
    finished = {}
    for pair in (("predict", "gradcam"), ("saved_model", "litert")):  # two at a time, on two cores
        started = {name: subprocess.Popen([sys.executable, str(PROJECT_ROOT / "src" / commands[name][0]),
                                           *commands[name][1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=environment) for name in pair}
        for name, process in started.items():
            output, errors = process.communicate(timeout=600)
            finished[name] = (process.returncode, output, errors)
    with open(jax_run / "predictions.csv") as file:
        expected = list(csv.DictReader(file))[:6]
    status, output, errors = finished["predict"]
    assert status == 0, errors[-2000:]
    predicted = [entry["top"][0] for entry in json.loads(output)["predictions"]]
    assert [entry["class"] for entry in predicted] == [row["predicted_class"] for row in expected]
    assert finished["gradcam"][0] == 0, finished["gradcam"][2][-2000:]
    (picture,) = (tmp_path / "gradcam").rglob("gradcam.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert finished["saved_model"][0] == 0, finished["saved_model"][2][-2000:]
    served = tf.saved_model.load(str(tmp_path / "saved" / "saved_model")).signatures["serving_default"]
    probabilities = next(iter(served(tf.constant(test_images)).values())).numpy()
    np.testing.assert_allclose(probabilities.max(axis=1), [float(row["confidence"]) for row in expected], atol=1e-4)
    status, _, errors = finished["litert"]
    assert status == 2 and "Traceback" not in errors
    assert errors.strip().endswith("exporting to litert needs the TensorFlow or torch backend; run it with "
                                   "KERAS_BACKEND=tensorflow")


@pytest.mark.slow
def test_the_torch_backend_gives_the_same_result_within_noise(shared_data, tmp_path, uninterrupted):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (pip install torch); the TensorFlow and JAX backends are tested")
    finished = main_job(shared_data, tmp_path / "out", backend="torch")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "differs from the whole model" not in finished.stderr  # VGG16 on torch computes TF's features
    (run_dir,), _ = runs_in(tmp_path / "out")
    metrics = metrics_of(run_dir)
    assert metrics["environment"]["backend"] == "torch" and metrics["epochs_run"] == EPOCHS
    assert metrics["test_accuracy"] == pytest.approx(uninterrupted[0]["test_accuracy"], abs=NOISE)


@pytest.mark.slow
def test_data_parallel_training_on_two_tensorflow_devices_matches_one_device_within_noise(
        shared_data, tmp_path, uninterrupted):
    """MirroredStrategy normalises each replica's share of a batch on its own, so its figures
    differ from one device's within noise, not exactly (JAX's are exact: the test below)."""
    finished = main_job(shared_data, tmp_path / "out", devices=2, extra=["--distribute"])
    assert finished.returncode == 0, finished.stderr
    assert "Data-parallel over 2 devices" in finished.stdout
    (run_dir,), _ = runs_in(tmp_path / "out")
    metrics = metrics_of(run_dir)
    distribution = metrics["environment"]["distribution"]
    assert distribution["engine"] == "tf.distribute.MirroredStrategy"
    assert len(distribution["devices"]) == distribution["replicas"] == 2
    assert metrics["environment"]["variable_placement"]["replicated_on"] == 2  # a copy on each device
    assert metrics["data"]["test_images"] == 200 and metrics["epochs_run"] == EPOCHS
    assert metrics["test_accuracy"] == pytest.approx(uninterrupted[0]["test_accuracy"], abs=NOISE)


def _write_image_tree(root, dataset, counts):
    """An image-folder tree (PNG, lossless) with counts[split] images of each split, drawn at random."""
    from PIL import Image

    arrays = {"train": (dataset.x_train, dataset.y_train), "validation": (dataset.x_val, dataset.y_val),
              "test": (dataset.x_test, dataset.y_test)}
    for split, count in counts.items():
        images, labels = arrays[split]
        for index in np.random.default_rng(0).permutation(len(labels))[:count]:
            folder = root / split / dataset.class_names[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return root


def _without_the_last(tree, copy, counts):
    """A copy of `tree` without the last counts[split] files of each split in the order the
    loader reads them (class folders, then file names, sorted): what data parallelism drops."""
    import shutil

    shutil.copytree(tree, copy)
    for split, count in counts.items():
        for path in sorted((copy / split).glob("*/*"), key=lambda p: p.relative_to(copy).as_posix())[-count:]:
            path.unlink()
    return copy


@pytest.mark.slow
def test_data_parallel_training_on_three_jax_devices_equals_one_device(shared_data, tmp_path):
    """JAX's split is exact: batch normalisation sees the whole batch and the random draws are
    the same. 301 training, 50 validation and 101 test images on 3 devices: the run drops 1
    training and 2 validation images and pads the test set by 2 for prediction, so it must
    equal a one-device run on the same data without those three images."""
    _require_jax()
    dataset = data.load_dataset(shared_data[0], subset=600, verbose=False)
    three = _write_image_tree(tmp_path / "three", dataset, {"train": 301, "validation": 50, "test": 101})
    one = _without_the_last(three, tmp_path / "one", {"train": 1, "validation": 2})
    command = ["--epochs", "2", "--batch-size", "150", "--quiet", "--precision", "float32"]
    runs_by_devices = {}
    started = {devices: main_job(shared_data, tmp_path / f"out-{devices}", backend="jax", devices=devices, data=tree,
                                 command=command, extra=extra, started=True)  # side by side
               for devices, tree, extra in ((3, three, ["--distribute"]), (1, one, []))}
    for devices, process in started.items():
        output, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors[-3000:]
        assert devices == 1 or "Dropped 1 training and 2 validation images" in output
        (runs_by_devices[devices],), _ = runs_in(tmp_path / f"out-{devices}")
    split = metrics_of(runs_by_devices[3])
    assert split["environment"]["distribution"]["replicas"] == 3
    assert split["environment"]["variable_placement"]["replicated_on"] == 3  # every variable on every device
    assert (split["data"]["train_images"], split["data"]["validation_images"], split["data"]["test_images"]) == (
        300, 48, 101)
    whole = metrics_of(runs_by_devices[1])
    assert split["test_accuracy"] == whole["test_accuracy"] and split["epochs_run"] == whole["epochs_run"]
    predictions = [predictions_of(runs_by_devices[devices]) for devices in (3, 1)]
    assert [row["predicted_class"] for row in predictions[0]] == [row["predicted_class"] for row in predictions[1]]
    np.testing.assert_allclose([float(row["confidence"]) for row in predictions[0]],
                               [float(row["confidence"]) for row in predictions[1]], atol=1e-5)
    for split_epoch, whole_epoch in zip(history_of(runs_by_devices[3]), history_of(runs_by_devices[1]), strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert float(split_epoch[key]) == pytest.approx(float(whole_epoch[key]), rel=1e-5), key



@pytest.mark.slow
def test_a_batch_size_that_does_not_split_over_the_devices_is_named(shared_data, tmp_path):
    _require_jax()
    finished = main_job(shared_data, tmp_path / "out", backend="jax", devices=2,
                         extra=["--distribute", "--batch-size", "511"])
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert "--batch-size 511 does not split evenly over 2 devices; pass a multiple of 2" in finished.stderr
    assert not (tmp_path / "out" / "transfer_learning").exists()



def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Three epochs, enough to kill a worker after the second and resume in the third, on 400 images
# (JAX's convolutions are slow on a CPU, and every worker extracts its own features).
WORKERS_EPOCHS = 3
WORKERS_COMMAND = [*COMMAND, "--epochs", str(WORKERS_EPOCHS), "--subset", "400"]


def _two_workers(shared_data, out_dir, port, interrupt_worker_1=None):
    """The main job's WORKERS_COMMAND as two JAX worker processes on 127.0.0.1 (each its own process,
    as on two machines; the same --out, as the same command would give). Returns both
    finished processes: (returncode, stdout, stderr) each."""
    archive, weights = shared_data
    workers = []
    for index in range(2):
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": "jax",
                       "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port},127.0.0.1:{port + 1}",
                       "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}
        python = [sys.executable]
        if index == 1 and interrupt_worker_1:  # "WHEN:N:SIGNAL", see tests/interrupting.py
            when, number, signal_name = interrupt_worker_1.split(":")
            python += [str(INTERRUPTING), f"{when}:{number}", signal_name]
        workers.append(subprocess.Popen(
            [*python, str(PROJECT_ROOT / "src" / "transfer_learning.py"), "--data", str(archive),
             "--weights", str(weights), "--out", str(out_dir), *WORKERS_COMMAND],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment))
    finished = []
    for worker in workers:
        try:
            stdout, stderr = worker.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail("a worker did not finish within 300 s")
        finished.append((worker.returncode, stdout, stderr))
    return finished


def _test_accuracy_line(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("Test accuracy: "))


@pytest.mark.slow
def test_two_worker_processes_train_as_one_stop_together_and_resume(shared_data, tmp_path):
    """Two JAX worker processes on 127.0.0.1 (keras.distribution.DataParallel over both, each
    feeding half of every batch). Worker 1 is killed (SIGKILL) after epoch 2: worker 0 stops
    with one line instead of waiting. The same two commands again resume after epoch 2 on both,
    finish with the same figures, and only worker 0 (the chief) leaves a run folder. Those
    figures are the ones of one process splitting every batch over two devices, epoch by epoch
    (workers feeding the same half, or a resumption that lost anything, would differ)."""
    _require_jax()
    out_dir, port = tmp_path / "out", _free_port()
    worker_folder = Path(tempfile.gettempdir()) / f"vgg-transfer-worker-{port}-1"
    (chief_status, _, chief_errors), (killed_status, _, _) = _two_workers(shared_data, out_dir, port,
                                                                          interrupt_worker_1="end:2:SIGKILL")
    assert killed_status == -signal.SIGKILL
    assert chief_status == 1 and "Traceback" not in chief_errors, chief_errors[-3000:]
    assert "this worker stopped" in chief_errors.strip().splitlines()[-1]
    assert not runs_in(out_dir)[0] and len(runs_in(out_dir)[1]) == 1  # the chief's interrupted run, kept to resume

    (chief_status, chief_output, chief_errors), (status, output, errors) = _two_workers(shared_data, out_dir, port)
    assert chief_status == 0 and status == 0, (chief_errors[-3000:], errors[-3000:])
    assert "Resuming after epoch 2" in chief_output and "Resuming after epoch 2" in output
    assert _test_accuracy_line(chief_output).split(",")[0] == _test_accuracy_line(output).split(",")[0]
    (run_dir,), partial = runs_in(out_dir)
    assert not partial and not worker_folder.exists()
    metrics = metrics_of(run_dir)
    assert metrics["environment"]["distribution"]["engine"].endswith("2 worker processes")
    assert metrics["epochs_run"] == WORKERS_EPOCHS

    one_process = main_job(shared_data, tmp_path / "one-process", backend="jax", devices=2, command=WORKERS_COMMAND,
                           extra=["--distribute"])
    assert one_process.returncode == 0, one_process.stderr[-3000:]
    (single_run,), _ = runs_in(tmp_path / "one-process")
    assert metrics["test_accuracy"] == metrics_of(single_run)["test_accuracy"]
    for worker_epoch, single_epoch in zip(history_of(run_dir), history_of(single_run), strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
            assert float(worker_epoch[key]) == pytest.approx(float(single_epoch[key]), rel=1e-5), key
    assert [row["predicted_class"] for row in predictions_of(run_dir)] == [
        row["predicted_class"] for row in predictions_of(single_run)]


@pytest.mark.slow
def test_tf_config_on_tensorflow_is_refused_in_one_line(shared_data, tmp_path):
    archive, weights = shared_data
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CONFIG": '{"cluster": {}, "task": {}}'}
    finished = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "transfer_learning.py"), "--data",
                               str(archive), "--weights", str(weights), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, env=environment, timeout=120)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith("transfer_learning.py: error: TF_CONFIG is set") and "train across workers on JAX" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_incomplete_worker_variables_are_named_in_one_line(shared_data, tmp_path):
    _require_jax()
    archive, weights = shared_data
    environment = {**os.environ, "KERAS_BACKEND": "jax", "KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1"}
    environment.pop("KERAS_DISTRIBUTION_NUM_PROCESSES", None)
    finished = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "transfer_learning.py"), "--data",
                               str(archive), "--weights", str(weights), "--out", str(tmp_path)],
                              capture_output=True, text=True, env=environment, timeout=120)
    assert finished.returncode != 0 and "Traceback" not in finished.stderr
    assert "KERAS_DISTRIBUTION_NUM_PROCESSES" in finished.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())
