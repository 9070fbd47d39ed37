"""Reproducibility, a full disk, and the remaining bad-input cases."""

import pytest

from vgg_transfer import cli, data, runs
from vgg_transfer.errors import InputError


@pytest.mark.slow
def test_same_seed_gives_identical_figures_on_cpu(uninterrupted):
    first, second = uninterrupted
    for key in ("test_accuracy", "macro_f1", "per_class", "best_val_loss", "best_epoch", "epochs_run"):
        assert first[key] == second[key], key


def test_an_unknown_learning_rate_schedule_is_named():
    constants = {"EPOCHS": 3, "SEED": 0, "LR_SCHEDULE": "plateau"}
    with pytest.raises(InputError, match="--lr-schedule: invalid choice: 'step' \\(choose from .*plateau.*cosine"):
        cli.parse("doc", constants, ["--lr-schedule", "step"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size 0 is out of range"),
        (["--batch-size", "1"], "--batch-size 1 is out of range; it must be at least 2 \\(BatchNormalization needs two images"),
        (["--seed", "99999999999"], "--seed 99999999999 is out of range; it must be between 0 and 4294967295"),
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--learning-rate", "-1e-3"], "--learning-rate -0.001 is out of range"),
        (["--image-size", "31"], "--image-size 31 is out of range"),
    ],
)
def test_invalid_hyperparameters_are_rejected_before_any_work(argv, message):
    constants = {"EPOCHS": 3, "BATCH_SIZE": 32, "LEARNING_RATE": 1e-3, "IMAGE_SIZE": 32, "SEED": 0}
    with pytest.raises(InputError, match=message):
        cli.parse("doc", constants, argv)


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot write to the output folder .*pass --out DIR"):
        runs.check_writable(blocker / "out")


def test_an_empty_training_class_folder_is_named(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for name in ("cat", "dog", "frog"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            if not (split == "train" and name == "dog"):
                Image.new("RGB", (32, 32)).save(tmp_path / "tree" / split / name / "a.png")
    with pytest.raises(InputError, match="test/ has classes that train/ lacks \\(dog\\)"):
        data.load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache", verbose=False)
    # Files in the folder, but none of them an image: the class is named too.
    (tmp_path / "tree" / "train" / "dog" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "tree" / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="Skipped 2 files"):
        with pytest.raises(InputError, match="train/ has no readable images for class dog; add images or remove"):
            data.load_dataset(tmp_path / "tree", cache_dir=tmp_path / "cache", verbose=False)




def test_a_feature_cache_that_cannot_be_written_is_skipped_with_one_warning(tmp_path, monkeypatch):
    """A full disk while the features are written: one warning, the features computed in memory
    all the same, and no half-written file left in the cache."""
    import errno

    import keras
    import numpy as np

    from vgg_transfer import features, stored

    extractor = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    images = np.random.default_rng(0).standard_normal((50, 4)).astype("float32")

    def full_disk(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    monkeypatch.setattr(stored.StoredArrayWriter, "__setitem__", full_disk)
    with pytest.warns(UserWarning, match="Could not write the feature cache .*No space left on device.*kept in "
                                         "memory and the next run extracts them again"):
        computed, from_cache = features.cached_features(extractor, {"train": images}, 16, 0, tmp_path)
    np.testing.assert_allclose(computed["train"], extractor.predict(images, verbose=0), rtol=1e-5, atol=1e-6)  # other batches
    assert not from_cache and not list(tmp_path.iterdir())


def test_a_full_disk_while_writing_the_decoded_data_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """No room for the decoded images: data that fits in memory is used from memory with one
    warning; in a script, ENOSPC anywhere else ends in one line naming the folder being written."""
    import errno

    import numpy as np

    from vgg_transfer import stored
    from test_data import write_image_tree

    root = write_image_tree(tmp_path / "tree")

    def full_disk(file, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.warns(UserWarning, match="Could not write the data cache .*No space left on device.*decodes again"):
        dataset = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    assert len(dataset.y_test) == 12
    monkeypatch.setattr(stored, "memory_budget", lambda: 1)  # too large for memory: the cache is needed
    monkeypatch.setattr(stored.StoredArrayWriter, "__setitem__", lambda *args: full_disk(tmp_path / "cache" / "x"))
    with pytest.raises(OSError) as raised:  # for cli's one line about a full disk (below), status 1
        data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    assert raised.value.errno == errno.ENOSPC and not list((tmp_path / "cache").glob(".decoded-*"))

    def script(setup):
        full_disk(tmp_path / "cache" / "split-1" / "x_train.npy")

    monkeypatch.setenv("VGG_TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    status = cli.run(script, {"__file__": __file__, "__doc__": "", "EPOCHS": 1, "SEED": 0}, ["--out", str(tmp_path)],
                     pretrained=False)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and line.startswith("test_reliability.py: error: no space left on the device while writing "
                                           f"the cache {tmp_path / 'cache' / 'split-1'} (x_train.npy)")


def test_a_run_names_the_commit_of_its_code_and_the_files_a_user_changed(tmp_path):
    import shutil
    import subprocess

    assert runs.code_version(tmp_path) is None  # no clone (a downloaded archive): nothing to name
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "transfer_learning.py").write_text("HEAD_DROPOUT = 0.5\n")
    (tmp_path / "README.md").write_text("read me\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "first"]):
        subprocess.run([*git, *command], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert runs.code_version(tmp_path) == {"commit": commit, "modified": []}
    (tmp_path / "src" / "transfer_learning.py").write_text("HEAD_DROPOUT = 0.3\n")  # a student's edit
    (tmp_path / "src" / "mine.py").write_text("")
    (tmp_path / "README.md").write_text("changed, not code\n")
    assert runs.code_version(tmp_path) == {"commit": commit, "modified": ["src/mine.py", "src/transfer_learning.py"]}
