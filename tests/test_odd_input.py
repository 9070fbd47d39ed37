"""Odd folders and flags as users bring them: nothing dropped without a word, and one line
naming the problem instead of a traceback."""

import os
import shutil
import subprocess
import sys
import tarfile

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT_ROOT
from test_data import CLASSES, write_cifar_python, write_image_tree
from vgg_transfer import data, saved_models
from vgg_transfer.errors import InputError


def _load(path, tmp_path, **kwargs):
    return data.load_dataset(path, cache_dir=tmp_path / "cache", verbose=False, **kwargs)


def test_symlinked_class_folders_are_read_and_a_link_loop_ends(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(root / "train" / CLASSES[1], elsewhere)
    (root / "train" / CLASSES[1]).symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)  # a link to a folder above it
    dataset = _load(root, tmp_path)
    counts = np.bincount(np.concatenate([dataset.y_train, dataset.y_val]), minlength=len(CLASSES))
    assert counts.tolist() == [3] * len(CLASSES)  # the linked class is there, its images once


def test_images_in_subfolders_of_a_class_count_in_both_layouts_and_loose_files_are_named(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    batch = root / "train" / CLASSES[0] / "batch2"
    batch.mkdir()
    for number in range(2):
        Image.new("RGB", (32, 32), (number, 0, 0)).save(batch / f"{number}.png")
    Image.new("RGB", (32, 32)).save(root / "train" / "stray.png")  # in train/, in no class folder
    with pytest.warns(UserWarning, match=r"Left out 1 file of .* in no class folder \(e\.g\. train/stray\.png\)"):
        dataset = _load(root, tmp_path)
    counts = np.bincount(np.concatenate([dataset.y_train, dataset.y_val]), minlength=len(CLASSES))
    assert counts.tolist() == [5] + [3] * (len(CLASSES) - 1)


def test_a_class_too_small_to_split_is_named_with_its_counts(tmp_path):
    root = tmp_path / "classes"
    for name, count in (("cat", 10), ("dog", 10), ("emu", 1)):
        (root / name).mkdir(parents=True)
        for number in range(count):
            Image.new("RGB", (32, 32), (number, 0, 0)).save(root / name / f"{number}.png")
    with pytest.warns(UserWarning, match=r"Too few images .* class emu \(1 training, 0 validation, 0 test\)"):
        dataset = _load(root, tmp_path)
    assert dataset.class_names == ("cat", "dog", "emu") and 2 in dataset.y_train


def test_an_archive_is_known_by_its_content_not_its_name(tmp_path):
    tree = write_image_tree(tmp_path / "tree", per_class=2)
    photos = tmp_path / "my_python_photos.tar.gz"
    with tarfile.open(photos, "w:gz") as archive:
        archive.add(tree, arcname="photos")
    assert data.locate(photos)[1] == "image-folders-archive"
    assert _load(photos, tmp_path).class_names == tuple(sorted(CLASSES))
    batches, _, _ = write_cifar_python(tmp_path / "python")
    renamed = tmp_path / "cifar.tar.gz"
    with tarfile.open(renamed, "w:gz") as archive:
        archive.add(batches, arcname="cifar-10-batches-py")
    assert data.locate(renamed)[1] == "cifar-python-archive"


def test_an_empty_data_path_is_refused_not_taken_for_the_working_folder(tmp_path):
    with pytest.raises(InputError, match="--data is empty; pass .* or leave --data out"):
        _load("", tmp_path)


def test_a_model_this_project_did_not_make_is_named_in_one_line(tmp_path):
    digits = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    digits.save(tmp_path / "digits.keras")
    with pytest.raises(InputError, match=r"digits\.keras takes inputs of shape \(28, 28, 1\), not square RGB images"):
        saved_models.load_saved_classifier(tmp_path / "digits.keras")
    finished = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "predict.py"), str(tmp_path / "x.jpg"),
                               "--model", str(tmp_path / "digits.keras")], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert finished.stderr.strip().endswith("pass a model that a training script of this project saved")


@pytest.mark.parametrize("backend, message", [("tensorflw", "KERAS_BACKEND=tensorflw is not a Keras backend"),
                                              ("openvino", "Keras cannot load its backend openvino")])
def test_a_misspelt_or_missing_backend_is_named_in_one_line(backend, message):
    if backend == "openvino" and __import__("importlib").util.find_spec("openvino"):
        pytest.skip("openvino is installed")
    finished = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "transfer_learning.py"), "--help"],
                              capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": backend}, timeout=300)
    assert finished.returncode == 2 and not finished.stdout
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith("transfer_learning.py: error: ") and message in line


def test_the_tools_import_no_training_script_for_help_or_for_a_model_that_needs_none(tmp_path):
    """predict.py --help, and predict.py with a model whose classes are Keras's own, never import
    transfer_learning_subclassed.py (which would probe the devices before the tool's arguments
    are parsed); a subclassed model file names its script, and only then is it imported."""
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "plain.keras")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    check = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, {src!r})\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('imported' if 'transfer_learning_subclassed' in sys.modules else 'not imported')")
    for arguments in (["--help"], [str(tmp_path / "a.png"), "--model", str(tmp_path / "plain.keras")]):
        finished = subprocess.run([sys.executable, "-c", check.format(src=str(PROJECT_ROOT / "src")),
                                   str(PROJECT_ROOT / "src" / "predict.py"), *arguments],
                                  capture_output=True, text=True, timeout=300)
        assert finished.stdout.strip().endswith("not imported"), (arguments, finished.stdout, finished.stderr[-2000:])
    assert saved_models.registered_packages(tmp_path / "plain.keras") == set()
