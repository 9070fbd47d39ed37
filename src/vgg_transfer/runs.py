"""One folder per run under `out/<script>/`, written so that nothing earlier is ever lost.

A run works in a hidden `.<name>.partial` folder and is renamed to its final name only
when everything is written, so a folder without the dot is always a complete run, a
failed or interrupted run never looks complete, and no run overwrites another.

An interrupted run's partial folder keeps a resume key (a digest of the script, its
hyperparameters and the common flags that change results): rerunning the same command
finds it and continues in it from the last completed epoch (see
`training.ResumeAfterInterruption`).
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

from vgg_transfer import devices, paths
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
    phase (`timed`) and what the run checked about itself (`checks`), for metrics.json.

    Args:
        setup: the script's `cli.Setup` (output folder, script name, resume key and the rest,
            for metrics.json); it learns of this run, for the message on Ctrl-C.
    """

    def __init__(self, setup):
        setup.run = self
        self.setup = setup
        self.script_name = setup.script_name
        self.resume_key = setup.resume_key
        self.parent = Path(setup.out) / setup.script_name
        self.final_path = None
        self._path = None
        self.seconds = {}
        self.checks = {}  # what the run verified about itself, for metrics.json
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


def resume_key(run_settings):
    """A digest of `cli.Setup.settings()`: two commands with the same settings are the same run
    (--out and --quiet play no part), so the second continues the first if it was interrupted."""
    return hashlib.sha1(json.dumps(run_settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def environment(distribution=None):
    """Backend, device, data parallelism (`cli.Setup.distribution`) and package versions, for metrics.json."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for package in ("keras", "tensorflow", "jax", "torch", "numpy", "scikit-learn", "matplotlib", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "backend": keras.config.backend(),
        "device": devices.description(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "cpu_bfloat16_units": devices.cpu_bfloat16_units(),
        "distribution": distribution,
        "versions": versions,
        "code": code_version(),
    }


def code_version(root=paths.PROJECT_ROOT):
    """The code a run ran, as airbench keeps its code with its results: {"commit": the git
    commit, "modified": the files under src/ that differ from it (a student's edits)}, or None
    outside a git clone (a downloaded archive) or without git."""
    import subprocess

    def git(*arguments):
        return subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=all", "--", "src").splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": sorted(line[3:] for line in changed)}

