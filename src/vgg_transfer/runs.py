"""One folder per run under `out/<script>/`, written so that nothing earlier is ever lost.

A run works in a hidden `.<name>.partial` folder and is renamed to its final name only
when everything is written, so a folder without the dot is always a complete run, a
failed or interrupted run never looks complete, and no run overwrites another.

An interrupted run's partial folder keeps a resume key (a digest of the script, its
hyperparameters and the common flags that change results): rerunning the same command
finds it and continues in it from the last completed epoch (see `training.fit`).
"""

import contextlib
import hashlib
import json
import os
import shutil
import platform
import time
from pathlib import Path

import keras

from vgg_transfer import data, distribute, model as models
from vgg_transfer.errors import InputError


def check_writable(out_dir):
    """Raises InputError unless runs can be written under `out_dir` (checked before any work)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(
            f"cannot write to the output folder {out_dir} ({error.strerror or error}); pass --out DIR with a writable folder"
        ) from None


class Run:
    """A run folder being written: `path` while working, `final_path` once `finish()` is called.

    The folder is made on first use of `path`, so a run that stops on bad input before
    writing anything leaves nothing behind. Also keeps the wall-clock seconds of each
    phase (`timed`) for metrics.json.
    """

    def __init__(self, out_dir, script_name, resume_key=None):
        self.script_name = script_name
        self.resume_key = resume_key
        self.parent = Path(out_dir) / script_name
        self.final_path = None
        self._path = None
        self.seconds = {}
        self._started = time.perf_counter()

    @property
    def started(self):
        """Whether the run folder exists yet."""
        return self._path is not None

    @property
    def path(self):
        if self._path is None:
            self._path, self.final_path = self._claim_name()
        return self._path

    def _claim_name(self):
        """Reserves (partial folder, final folder): an interrupted run of the same command if
        there is one, else a name that no run has taken."""
        self.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_key is not None:
            interrupted = sorted(
                (path for path in self.parent.glob(".*.partial") if _resume_key_of(path) == self.resume_key),
                key=lambda path: path.stat().st_mtime,
            )
            if interrupted:
                partial_path = interrupted[-1]
                print(f"Continuing the interrupted run in {partial_path}")
                return partial_path, self.parent / partial_path.name[1:-len(".partial")]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            name = stamp if attempt == 1 else f"{stamp}-{attempt}"
            final_path, partial_path = self.parent / name, self.parent / f".{name}.partial"
            if final_path.exists():
                continue
            try:
                partial_path.mkdir()
            except FileExistsError:  # Another run took the name between the check and mkdir.
                continue
            if self.resume_key is not None:
                (partial_path / RESUME_KEY_FILE).write_text(json.dumps({"resume_key": self.resume_key}))
            return partial_path, final_path
        raise RuntimeError(f"no free run folder name under {self.parent}")

    @contextlib.contextmanager
    def timed(self, phase):
        """Adds the wall-clock seconds of the `with` block to `seconds[phase]`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def elapsed(self):
        return time.perf_counter() - self._started

    def forget_resume_state(self):
        """Makes a rerun of the same command start afresh instead of continuing this run."""
        (self.path / RESUME_KEY_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.path / "resume", ignore_errors=True)

    def finish(self):
        """Publishes the folder under its final name; call after every file is written."""
        self.forget_resume_state()  # the resume state is only needed while the run is partial
        os.rename(self.path, self.final_path)
        self._path = self.final_path
        return self.final_path


RESUME_KEY_FILE = "resume_key.json"


def _resume_key_of(partial_path):
    try:
        return json.loads((partial_path / RESUME_KEY_FILE).read_text())["resume_key"]
    except (OSError, ValueError, KeyError):
        return None


def resume_key(config, script_name):
    """A digest of what makes two commands the same run: script, backend, hyperparameters,
    data, weights, subset, precision and device count (not --out or --quiet)."""
    same_run = {
        "script": script_name, "backend": keras.config.backend(), "hyperparameters": config.hyperparameters,
        "data": str(config.data), "weights": str(config.weights), "subset": config.subset,
        "mixed_precision": config.mixed_precision, "replicas": distribute.replicas,
    }
    return hashlib.sha1(json.dumps(same_run, sort_keys=True, default=str).encode()).hexdigest()[:20]


# The run in progress, for the Ctrl-C message (see `cli.run`).
current_run = None


def environment():
    """Backend, device and package versions, for metrics.json."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "torch", "numpy", "scikit-learn", "matplotlib", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "backend": keras.config.backend(),
        "device": device_description(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "distribution": distribute.description,
        "versions": versions,
    }


def device_description():
    """What the backend computes on, e.g. "GPU (NVIDIA H100 80GB HBM3)" or "CPU"."""
    backend = keras.config.backend()
    try:
        if backend == "jax":
            import jax

            devices = jax.devices()
            return f"{devices[0].platform.upper()} ({devices[0].device_kind}) x{len(devices)}"
        if backend == "tensorflow":
            import tensorflow as tf  # TensorFlow-only: asks TF which devices it will use.

            gpus = tf.config.list_physical_devices("GPU")
            return f"GPU x{len(gpus)}" if gpus else "CPU"
        if backend == "torch":
            import torch

            return f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"
    except Exception:  # Reporting the device must never stop a run.
        pass
    return "unknown"


def set_precision(mixed_precision):
    """bfloat16 compute with float32 weights, or float32 throughout; call before building models.
    bfloat16 needs no loss scaling, unlike float16."""
    keras.config.set_dtype_policy("mixed_bfloat16" if mixed_precision else "float32")


def prepare(config, script_name):
    """What every script does first: check the output folder and the weights, then load the data.

    Bad input is found here, before anything expensive, and raises `InputError`.

    Returns:
        (run, weights, dataset): the `Run` (its folder appears with its first file), the
        resolved `model.Weights`, and the `data.Dataset` (its loading timed as "data").
    """
    check_writable(config.out)
    data.locate(config.data)  # a data path that is not there is named before any download
    weights = models.resolve_weights(config.weights)
    if weights.keras_argument is not None:  # a bad weights file stops here, before the data loads
        models.build_vgg16_base(weights, models.MIN_IMAGE_SIZE)
    set_precision(config.mixed_precision)
    distribute.configure(config)  # before any model is built
    global current_run
    run = current_run = Run(config.out, script_name, resume_key(config, script_name))
    with run.timed("data"):
        dataset = distribute.whole_batches(
            data.load_dataset(config.data, config.validation_split, config.seed, config.subset)
        )
    return run, weights, dataset
