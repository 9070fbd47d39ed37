"""Data as people bring it: zip archives, class folders without a train/test split, phone photos
with an EXIF orientation, the files that tools leave in data folders, and pickles that would
run code."""

import io
import json
import pickle
import shutil
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

import explore_data
from test_data import CLASSES, write_cifar_python, write_image_tree
from vgg_transfer import cifar_batches, cli, data, image_files
from vgg_transfer.errors import InputError


def _zip(folder, archive, top=None):
    """Zips `folder` (its files under `top`/ when given), as a download or Explorer would."""
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                zipped.write(path, f"{top}/{name}" if top else name)
    return archive


def _load(path, tmp_path, **kwargs):
    return data.load_dataset(path, cache_dir=tmp_path / "cache", verbose=False, **kwargs)


def _class_folders(root, per_class=10):
    """ROOT/<class>/* alone, each image's red channel its class and green its number."""
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for number in range(per_class):
            image = np.zeros((32, 32, 3), np.uint8)
            image[..., 0], image[..., 1] = 50 * label, number
            Image.fromarray(image).save(root / name / f"{number:03d}.png")
    return root


def test_a_zip_archive_reads_like_the_folder_it_holds(tmp_path):
    root = write_image_tree(tmp_path / "my-images")
    from_zip = _load(_zip(root, tmp_path / "my-images.zip", top="my-images"), tmp_path, seed=1)
    from_folder = _load(root, tmp_path, seed=1)
    assert "image-folders-archive" in from_zip.source and from_zip.class_names == CLASSES
    np.testing.assert_array_equal(from_zip.x_test, from_folder.x_test)
    np.testing.assert_array_equal(from_zip.x_train, from_folder.x_train)
    np.testing.assert_array_equal(from_zip.y_val, from_folder.y_val)

    batches, _, test_images = write_cifar_python(tmp_path / "python")  # the python batches zipped
    cifar = _load(_zip(batches, tmp_path / "cifar.zip", top="cifar-10-batches-py"), tmp_path)
    assert "cifar-python-archive" in cifar.source
    np.testing.assert_array_equal(cifar.x_test, test_images)


@pytest.mark.parametrize("name", ["../escape.png", "/etc/escape.png"])
def test_an_archive_naming_a_path_outside_itself_is_refused(tmp_path, name):
    root = write_image_tree(tmp_path / "tree", per_class=2)
    archive = _zip(root, tmp_path / "images.zip")
    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr(zipfile.ZipInfo(name), b"x")
    tarball = tmp_path / "images.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(root, arcname="tree")
        tar.addfile(tarfile.TarInfo(name), io.BytesIO())
    for path in (archive, tarball):
        with pytest.raises(InputError, match=f"holds a file named '{name}', outside the archive's own folder"):
            _load(path, tmp_path)
    assert not (tmp_path / "escape.png").exists()


def test_class_folders_alone_are_split_stratified_and_the_same_test_set_in_every_run(tmp_path):
    root = _class_folders(tmp_path / "photos")
    first = _load(root, tmp_path, seed=1)
    second = _load(root, tmp_path, seed=2)
    assert first.class_names == CLASSES
    summary = first.summary()
    assert summary["test"].startswith("stratified 20% of each class") and "the same in every run" in summary["test"]
    assert summary["images_per_class"]["test"] == {name: 2 for name in CLASSES}
    assert summary["images_per_class"]["validation"] == {name: 1 for name in CLASSES}
    assert summary["images_per_class"]["train"] == {name: 7 for name in CLASSES}
    for dataset in (first, second):  # every image in one split only, with its own label
        images = np.concatenate([dataset.x_train, dataset.x_val, dataset.x_test])
        labels = np.concatenate([dataset.y_train, dataset.y_val, dataset.y_test])
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels * 50)
        assert len({(int(label), int(number)) for label, number in zip(labels, images[:, 0, 0, 1])}) == 30
    np.testing.assert_array_equal(first.x_test, second.x_test)  # the test set does not move with the seed
    assert not np.array_equal(first.x_val, second.x_val)  # the validation slice does
    other = _load(root, tmp_path, seed=1, test_split=0.5)
    assert len(other.y_test) == 15


def test_class_folders_in_a_zip_with_a_top_folder_and_loose_files(tmp_path):
    """As Kaggle hands out data: PetImages/<class>/..., a licence file beside, images in subfolders."""
    root = _class_folders(tmp_path / "unpacked" / "PetImages", per_class=5)
    (root / "frog" / "more").mkdir()
    shutil.move(root / "frog" / "004.png", root / "frog" / "more" / "004.png")
    (root / "LICENSE.txt").write_text("CC BY")
    dataset = _load(_zip(tmp_path / "unpacked", tmp_path / "kaggle.zip"), tmp_path)
    assert dataset.class_names == CLASSES
    assert dataset.summary()["images_per_class"]["test"] == {name: 1 for name in CLASSES}
    assert len(dataset.y_train) + len(dataset.y_val) + len(dataset.y_test) == 15


def test_train_or_validation_folders_without_test_are_named(tmp_path):
    root = write_image_tree(tmp_path / "tree", splits=("train", "val"), per_class=2)
    with pytest.raises(InputError, match="has train/, val/ but not both train/ and test/"):
        _load(root, tmp_path)


def test_files_left_by_tools_are_neither_classes_nor_images(tmp_path):
    clean = write_image_tree(tmp_path / "clean")
    messy = write_image_tree(tmp_path / "messy")
    image = (messy / "train" / "cat" / "0000.png").read_bytes()
    (messy / "train" / ".ipynb_checkpoints").mkdir()
    (messy / "train" / ".ipynb_checkpoints" / "0000-checkpoint.png").write_bytes(image)
    (messy / "__MACOSX" / "train" / "cat").mkdir(parents=True)
    (messy / "__MACOSX" / "train" / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (messy / "train" / "dog" / "._0001.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (messy / "test" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (messy / "train" / "frog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (messy / "test" / "desktop.ini").write_text("[.ShellClassInfo]")
    for source in (messy, _zip(messy, tmp_path / "messy.zip", top="messy")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not even "skipped files": they are not data at all
            dataset = _load(source, tmp_path, seed=3)
        reference = _load(clean, tmp_path, seed=3)
        assert dataset.class_names == CLASSES
        for name in ("x_train", "y_train", "x_val", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(dataset, name), getattr(reference, name))


def _sideways_photo(path, orientation=6):
    """An asymmetric image stored turned, with the EXIF tag saying how to show it (orientation 6:
    turn 90 degrees clockwise, as a phone held upright writes it); returns what a viewer shows."""
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:8, :, 0] = 255  # a red band along the stored top
    stored[:, :4, 2] = 255  # a blue band along the stored left
    exif = Image.Exif()
    exif[image_files.ORIENTATION_TAG] = orientation
    Image.fromarray(stored).save(path, exif=exif)
    return np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))  # 90 degrees clockwise


def test_phone_photos_are_read_as_a_viewer_shows_them(tmp_path):
    """The loader and the one-image reader of predict.py and the picture tools
    (`image_files.read_image_file`) apply the EXIF orientation."""
    root = write_image_tree(tmp_path / "tree", per_class=1)
    shown = _sideways_photo(root / "test" / "cat" / "0000.png")
    assert not np.array_equal(shown, np.asarray(Image.open(root / "test" / "cat" / "0000.png")))
    dataset = _load(root, tmp_path)
    np.testing.assert_array_equal(dataset.x_test[0], shown)
    np.testing.assert_array_equal(image_files.read_image_file(root / "test" / "cat" / "0000.png", 32), shown)

    tall = Image.new("RGB", (40, 80))  # stored 40 wide and 80 high, shown 80 wide and 40 high
    exif = Image.Exif()
    exif[image_files.ORIENTATION_TAG] = 8
    tall.save(root / "test" / "dog" / "0000.png", exif=exif)
    assert (80, 40) in data.original_image_sizes(root)


def _pickle_that_runs(command):
    class RunsCode:
        def __reduce__(self):
            import os

            return os.system, (command,)

    return pickle.dumps({b"data": RunsCode(), b"labels": [0]})


@pytest.mark.parametrize("batch", ["data_batch_1", "batches.meta"])
def test_a_tampered_cifar_pickle_is_refused_and_runs_nothing(tmp_path, batch):
    batches, _, _ = write_cifar_python(tmp_path / "python")
    marker = tmp_path / "code-ran"
    (batches / batch).write_bytes(_pickle_that_runs(f"touch {marker}"))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    for source in (batches, archive):
        with pytest.raises(InputError, match=f"{batch} in .* is not a plain CIFAR-10 batch \\(it asks to load "
                                             f".*system\\); it was not loaded, as it could run code"):
            _load(source, tmp_path)
    assert not marker.exists()


def _pickle_calling(function, *arguments):
    """A pickle whose loading calls `function(*arguments)`, as a tampered batch would."""
    class Calls:
        def __reduce__(self):
            return function, arguments

    return pickle.dumps({b"data": Calls(), b"labels": [0]}, protocol=2)


def test_every_name_a_pickle_may_load_is_listed_and_every_other_refused(tmp_path):
    """Attacks through Python's and NumPy's own helpers (NumPy's `runstring` executes a string,
    `numpy.load` would unpickle a file of its own) are refused before anything runs, and what
    loads is exactly what the unpickler lists: NumPy's array reconstructors, not all of NumPy."""
    import builtins
    import os

    import numpy.testing._private.utils as numpy_test_utilities

    marker = tmp_path / "code-ran"
    attacks = {
        "builtins.exec": _pickle_calling(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "builtins.eval": _pickle_calling(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "os.system": _pickle_calling(os.system, f"touch {marker}"),
        "runstring": _pickle_calling(numpy_test_utilities.runstring, f"open({str(marker)!r}, 'w')", {}),
        "numpy.load": _pickle_calling(np.load, str(marker), None, True),
    }
    for name, content in attacks.items():
        with pytest.raises(InputError, match="is not a plain CIFAR-10 batch \\(it asks to load "):
            cifar_batches.unpickle(content, "data_batch_1", tmp_path)
        assert not marker.exists(), name
    listed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    assert set(cifar_batches.ArraysOnlyUnpickler.ALLOWED) == listed
    unpickler = cifar_batches.ArraysOnlyUnpickler(io.BytesIO(b""))
    for module, name in [("numpy", "load"), ("numpy", "frombuffer"), ("numpy.testing._private.utils", "runstring"),
                         ("numpy.core.multiarray", "scalar"), ("numpy.lib.npyio", "load"), ("builtins", "getattr")]:
        with pytest.raises(pickle.UnpicklingError, match=f"it asks to load {module}.{name}"):
            unpickler.find_class(module, name)

def test_the_real_batches_pickle_format_still_loads(tmp_path):
    """The real batches were pickled by Python 2 (protocol 2 or lower), naming NumPy's
    `numpy.core.multiarray._reconstruct`; the same pickle with that name loads."""
    labels = [0, 1, 2, 1]
    images = np.arange(4 * 3072, dtype=np.uint32).astype(np.uint8).reshape(4, 3072)
    for protocol in (0, 2):
        content = pickle.dumps({b"data": images, b"labels": labels}, protocol=protocol)
        content = content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in content
        batch = cifar_batches.unpickle(content, "data_batch_1", tmp_path)
        np.testing.assert_array_equal(batch[b"data"], images)
        assert batch[b"labels"] == labels


def test_explore_data_shows_the_split_of_class_folders(tmp_path, capsys):
    root = _class_folders(tmp_path / "photos")
    assert cli.run_tool(explore_data.main, explore_data.parse_arguments,
                        ["--data", str(root), "--out", str(tmp_path / "out"), "--samples-per-class", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["cat", "7", "1", "2"] for line in printed), printed
    assert any(line.split() == ["all", "21", "3", "6"] for line in printed), printed
    assert any("Test: stratified 20% of each class" in line for line in printed), printed


@pytest.mark.slow
def test_the_main_job_trains_on_a_zip_of_class_folders_with_tool_files(shared_data, tmp_path):
    """CIFAR-10 images as PNGs in a zip of class folders alone (with __MACOSX/ and a Jupyter
    checkpoint folder inside): the main job finds the ten classes, splits off a fifth of each
    as its test set, and learns (a tenth is chance)."""
    import transfer_learning

    dataset = data.load_dataset(shared_data[0], subset=600, verbose=False)
    archive = tmp_path / "my-cifar.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for index, (image, label) in enumerate(zip(dataset.x_train, dataset.y_train)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            zipped.writestr(f"my-cifar/{dataset.class_names[label]}/{index:04d}.png", buffer.getvalue())
            if index < 5:
                zipped.writestr(f"__MACOSX/my-cifar/{dataset.class_names[label]}/._{index:04d}.png", b"\x00\x05")
                zipped.writestr(f"my-cifar/.ipynb_checkpoints/{index:04d}-checkpoint.png", buffer.getvalue())
    argv = ["--data", str(archive), "--weights", str(shared_data[1]), "--out", str(tmp_path / "out"), "--quiet",
            "--precision", "float32", "--epochs", "8"]
    assert cli.run(transfer_learning.main, vars(transfer_learning), argv) == 0
    (run_dir,) = (tmp_path / "out" / "transfer_learning").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["class_names"] == list(dataset.class_names)
    assert metrics["data"]["test"].startswith("stratified 20% of each class")
    per_class = np.bincount(dataset.y_train)
    assert metrics["data"]["images_per_class"]["test"] == {
        name: round(0.2 * count) for name, count in zip(dataset.class_names, per_class)}
    assert metrics["test_accuracy"] > 0.3
