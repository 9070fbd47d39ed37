"""Every `python src/...` command of the README runs as written: read from its code blocks and
inline code, placeholders filled (RUN_DIR: the folder the main job's run named; my_photo.jpg:
a test image; a|b|c: each choice once), on a tiny subset (only --data, --weights, --subset,
--epochs, --fine-tune-epochs and --out appended, where the script takes them). The first, `python src/transfer_learning.py`,
takes the README's default data path: no --data and no --weights, so Keras downloads CIFAR-10
and the weights, here from a local HTTP server (tests/local_downloads.py).

Left untested by the download: the real origins and their hashes (the files served are local:
a python-format archive of the JPEG copy's test images, and the converted weights)."""

import concurrent.futures
import functools
import http.server
import io
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import tarfile
import threading

import pytest
from PIL import Image

from conftest import PROJECT_ROOT
from vgg_transfer import data, devices, image_files

pytestmark = pytest.mark.slow
README = (PROJECT_ROOT / "README.md").read_text()
TRAINING = {"transfer_learning.py", "transfer_learning_subclassed.py", "transfer_learning_sequential.py",
            "fine_tune.py", "baselines.py", "benchmark_main_job.py"}
# What each tool takes of the flags the test appends.
TOOL_FLAGS = {"explore_data.py": ("--data", "--out"), "gradcam.py": ("--data", "--out"), "feature_maps.py": ("--data", "--out"),
              "export.py": ("--out",), "compare.py": ("--out",), "predict.py": ()}


def readme_commands(text=README):
    """Every `python src/...` command in `text`: code blocks' lines and inline code (which may
    break across lines), in order, each once, with a|b|c choices expanded."""
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
    found = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if "python src/" in line]
    inline = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", inline) if "python src/" in span]
    commands = []
    for command in dict.fromkeys(found):
        if "src/..." in command:
            continue  # "python src/..." names every script, not one command
        choices = next((token for token in command.split() if "|" in token), None)
        commands += [command.replace(choices, choice) for choice in choices.split("|")] if choices else [command]
    return commands


def test_the_readmes_commands_are_found():
    commands = readme_commands()
    assert commands[0] == "python src/transfer_learning.py"
    assert {"python src/export.py RUN_DIR --format litert", "python src/transfer_learning.py --help",
            "KERAS_BACKEND=jax python src/fine_tune.py"} <= set(commands)
    assert readme_commands("a `python src/x.py\n--model RUN_DIR` b\n```bash\npython src/y.py a|b  # c\n```") == [
        "python src/y.py a", "python src/y.py b", "python src/x.py --model RUN_DIR"]


def _cifar_python_archive(dataset, path):
    """A python-format CIFAR-10 archive of the JPEG copy's 10,000 test images: as every one of
    the five training batches (keras.datasets reads 50,000 training images) and as the test batch."""
    rows = dataset.x_test.transpose(0, 3, 1, 2).reshape(len(dataset.x_test), -1)
    # Protocol 4: bytes stored as bytes, arrays through numpy's _reconstruct, which keras.datasets' unpickler
    # admits (the real batches, pickled by Python 2, hold the same).
    batch = pickle.dumps({b"data": rows, b"labels": dataset.y_test.tolist()}, protocol=4)
    meta = pickle.dumps({b"label_names": [name.encode() for name in dataset.class_names]}, protocol=4)
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for name, content in [*((f"data_batch_{i}", batch) for i in range(1, 6)), ("test_batch", batch),
                              ("batches.meta", meta)]:
            member = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *arguments):
        self.server.requested.append(self.path)


@pytest.fixture(scope="module")
def download_server(shared_data, tmp_path_factory):
    """(base URL, served folder, requested paths): CIFAR-10's python archive and VGG16's notop
    weights on http://127.0.0.1 for the duration of the module."""
    archive, weights = shared_data
    served = tmp_path_factory.mktemp("served")
    _cifar_python_archive(data.load_dataset(archive, verbose=False), served / "cifar-10-python.tar.gz")
    (served / weights.name).symlink_to(weights)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=served))
    server.requested = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served, server.requested
    server.shutdown()
    server.server_close()


def _run(command, server, workspace, shared_data, run_dir=None, photo=None, downloads=False, terminal=False):
    """Runs one README command as written, with placeholders filled and the test's flags appended."""
    base_url, served, _ = server
    words = shlex.split(command.replace("RUN_DIR", str(run_dir)).replace("my_photo.jpg", str(photo)))
    environment = {**os.environ, "KERAS_HOME": str(workspace / "keras"), "CUDA_VISIBLE_DEVICES": ""}
    if downloads:  # an empty cache, as on a first run: every feature set is extracted and shown
        environment["VGG_TRANSFER_CACHE_DIR"] = str(workspace / "first-run-cache")
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        environment[name] = value
    assert words[0] == "python" and words[1].startswith("src/"), command
    script = words[1].split("/")[-1]
    arguments = words[2:]
    out = workspace / "out"
    if "--help" not in arguments:
        archive, weights = shared_data
        if script in TRAINING:
            subset = "2000" if terminal else "200"  # a terminal's run: several steps an epoch, for the estimate
            # The benchmark's fresh cache would decode the 60,000 JPEGs again (half a minute on 2
            # cores): it reads the python-format archive served for the download, unpickled in a second.
            source = served / "cifar-10-python.tar.gz" if script == "benchmark_main_job.py" else archive
            local = [] if downloads else ["--data", str(source), "--weights", str(weights)]
            arguments += [*local, "--subset", subset, "--epochs", "2", "--out", str(out)]
            if script == "fine_tune.py":
                arguments += ["--fine-tune-epochs", "1"]  # its second phase's epochs: as short as the first's
        else:
            flags = {"--data": str(archive), "--out": str(out)}
            if script == "export.py":
                flags["--out"] = str(workspace / "exported" / arguments[-1])
            for flag in TOOL_FLAGS[script]:
                arguments += [flag, flags[flag]]
    command = [sys.executable, str(PROJECT_ROOT / "tests" / "local_downloads.py"), base_url, str(served),
               str(PROJECT_ROOT / "src" / script), *arguments]
    if terminal:
        return _in_a_terminal(command, environment, workspace)
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=workspace, timeout=900)


def _in_a_terminal(command, environment, workspace):
    """Runs `command` with a pseudo-terminal as its stdin, stdout and stderr, as a user's shell
    does (Keras then redraws its progress bars in place); what it wrote comes back as stdout."""
    import pty

    terminal, child_side = pty.openpty()
    process = subprocess.Popen(command, stdin=child_side, stdout=child_side, stderr=child_side, env=environment,
                               cwd=workspace)
    os.close(child_side)
    written = bytearray()
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(terminal)
    return subprocess.CompletedProcess(command, process.wait(timeout=900), written.decode(errors="replace"), "")


def test_every_readme_command_runs_as_written_the_first_with_keras_downloads(shared_data, download_server, tmp_path,
                                                                           monkeypatch):
    archive, weights = shared_data
    monkeypatch.setenv("VGG_TRANSFER_IN_DIR", str(tmp_path / "in"))  # nothing local: the default path downloads
    first, *others = readme_commands()
    finished = _run(first, download_server, tmp_path, shared_data, downloads=True, terminal=True)
    assert finished.returncode == 0, finished.stdout[-3000:]
    assert "Data: CIFAR-10 (keras.datasets download)" in finished.stdout
    # In the terminal: the extraction announced, each set's progress bar labelled, and the
    # training estimate on a line of its own, never inside a progress bar.
    lines = [line.split("\r")[-1] for line in re.split(r"\r?\n", finished.stdout)]
    precision, _ = devices.choose_precision("auto")  # what the run's PRECISION = "auto" takes here
    assert any(re.fullmatch(r"Extracting features \(2, 2, 512\) of train \(1,800 images\), val \(200 images\), "
                            rf"test \(400 images\), test_mirrored \(400 images\) at 32 px, in {precision}:", line)
               for line in lines), finished.stdout[:3000]
    assert {line.strip() for line in lines if line.startswith("  ")} >= {"train", "val", "test", "test_mirrored"}
    estimates = [line for line in re.split(r"\r?\n", finished.stdout) if "Training: about" in line]
    assert len(estimates) == 1 and estimates[0].startswith("Training: about"), estimates
    run_dir = next(line.split(": ", 1)[1] for line in finished.stdout.splitlines() if line.startswith("Run folder: "))
    metrics = json.loads((PROJECT_ROOT / run_dir / "metrics.json").read_text())
    assert metrics["weights"] == "ImageNet (Keras download)" and metrics["test_accuracy"] > 0.4
    assert sorted(download_server[2]) == ["/cifar-10-python.tar.gz", f"/{weights.name}"]  # each fetched once
    assert (tmp_path / "keras" / "models" / weights.name).is_file()
    photo = tmp_path / "my_photo.jpg"
    Image.fromarray(image_files.read_image_file(_first_test_image(archive, tmp_path), 32)).save(photo)

    def run(command):
        return command, _run(command, download_server, tmp_path, shared_data, run_dir=PROJECT_ROOT / run_dir,
                             photo=photo)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time, on two cores
        results = list(pool.map(run, others))
    for command, result in results:
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr[-3000:])
        output = result.stdout
        if "--help" in command:
            assert output.startswith("usage:"), command
        elif "benchmark_main_job.py" in command:  # the head's speed beside the peak, e.g. "0.051 (43%)"
            assert "matrix-product peak in" in output and re.search(r"\| \d\.\d{3} \(\d+%\) \|", output), output
        elif command.split("python src/")[1].split()[0] in TRAINING:
            trained = next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("Run folder: "))
            assert json.loads((PROJECT_ROOT / trained / "metrics.json").read_text())["test_accuracy"] > 0.2, command
    assert sorted(download_server[2]) == ["/cifar-10-python.tar.gz", f"/{weights.name}"]  # nothing downloaded again
    exported = {path.parent.name for path in (tmp_path / "exported").glob("*/*") if path.name.startswith(("model", "saved"))}
    assert exported == {"tf_saved_model", "onnx", "litert"}
    prediction = next(result.stdout for command, result in results if "predict.py" in command)
    assert "my_photo.jpg" in prediction and any(name in prediction for name in metrics["data"]["class_names"])


def _first_test_image(archive, tmp_path):
    """The first test image of the shared archive, as a file."""
    with tarfile.open(archive) as tar:
        member = next(member for member in tar if member.isfile() and "/test/" in member.name)
        path = tmp_path / "test_image.jpg"
        path.write_bytes(tar.extractfile(member).read())
    return path
