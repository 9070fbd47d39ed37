"""Fixtures shared by the tests: isolated in/ and cache folders, the shared offline data.

The shared data (`../shared/data`: CIFAR-10 as JPEG folders and VGG16's ImageNet notop
weights) is needed by the end-to-end tests. Where it is absent they are skipped, unless
REQUIRE_SHARED_DATA=1 (as CI sets), where its absence is a failure.
"""

import os
from pathlib import Path

import pytest

# The tests run the plain CPU recipe (32 px) on every machine, so their time does not depend on
# the machine's kind (a CPU with AMX would otherwise take its 64 px recipe); the recipes of the
# other kinds are tested with the kind forced. Set before the scripts are imported.
os.environ.setdefault("VGG_TRANSFER_HARDWARE", "cpu")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VGG_TRANSFER_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
CIFAR_JPEG_ARCHIVE = SHARED_DATA / "cifar-10-images-jpg.tar.gz"
IMAGENET_WEIGHTS = SHARED_DATA / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="session", autouse=True)
def isolated_folders(tmp_path_factory):
    """An empty in/ and one cache for the whole session, so the user's in/ never leaks in
    and the shared JPEG archive is decoded once for all tests (and on JAX, what XLA compiled:
    the JAX runs repeat the same programs in new processes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VGG_TRANSFER_IN_DIR", str(tmp_path_factory.mktemp("in")))
        patch.setenv("VGG_TRANSFER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def shared_data():
    """(cifar archive, imagenet weights) paths from ../shared/data."""
    if not (CIFAR_JPEG_ARCHIVE.is_file() and IMAGENET_WEIGHTS.is_file()):
        message = f"the shared data is not at {SHARED_DATA} (set VGG_TRANSFER_SHARED_DATA)"
        if os.environ.get("REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return CIFAR_JPEG_ARCHIVE, IMAGENET_WEIGHTS


def interrupt_after_epochs(monkeypatch, count):
    """Ctrl-C (KeyboardInterrupt) in this process at the end of the `count`-th epoch from now,
    counted over every phase, once the resumption state of that epoch is saved."""
    from vgg_transfer import training

    ended = []
    original = training.ResumeAfterInterruption.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        ended.append(epoch)
        if len(ended) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.ResumeAfterInterruption, "on_epoch_end", on_epoch_end)


@pytest.fixture(scope="session")
def uninterrupted(shared_data, tmp_path_factory):
    """Two uninterrupted runs of the main job's test command (main_job.COMMAND), same seed: the
    reference of the reproducibility, backend, precision and data-parallelism tests."""
    from main_job import main_job, metrics_of, runs_in

    out_dir = tmp_path_factory.mktemp("uninterrupted")
    for _ in range(2):
        finished = main_job(shared_data, out_dir)
        assert finished.returncode == 0, finished.stderr[-2000:]
        # TensorFlow's C++ warnings and errors (a CUDA "error" on a CPU machine) stay quiet:
        # the log level is set before TensorFlow loads.
        logged = [line for line in finished.stderr.splitlines() if line[:5] in ("W0000", "E0000")]
        assert not logged, logged
    complete, partial = runs_in(out_dir)
    assert len(complete) == 2 and not partial
    return [metrics_of(run_dir) for run_dir in complete]
