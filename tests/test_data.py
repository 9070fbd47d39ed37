"""Data loading on data the tests make themselves: the python-format tarball written in the
real format, an extracted batches folder, and image-folder trees of mixed formats and sizes."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgg_transfer import data, image_files
from vgg_transfer.errors import InputError

CLASSES = ("cat", "dog", "frog")


def _cifar_batch(labels, seed):
    """A batch dict as in the real files: b'data' is (N, 3072) uint8, channel-major rows."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    images[..., 0] = np.asarray(labels, dtype=np.uint8)[:, None, None] * 50  # red encodes the label
    return {
        b"batch_label": b"testing batch",
        b"labels": list(labels),
        b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))],
    }, images


def write_cifar_python(folder, per_batch=12):
    """Writes cifar-10-batches-py/ like the official archive; returns (folder, train, test)."""
    batches_dir = folder / "cifar-10-batches-py"
    batches_dir.mkdir(parents=True)
    train_images = []
    for index in range(1, 6):
        batch, images = _cifar_batch([i % 3 for i in range(per_batch)], seed=index)
        (batches_dir / f"data_batch_{index}").write_bytes(pickle.dumps(batch))
        train_images.append(images)
    test_batch, test_images = _cifar_batch([i % 3 for i in range(per_batch)], seed=9)
    (batches_dir / "test_batch").write_bytes(pickle.dumps(test_batch))
    meta = {b"label_names": [name.encode() for name in CLASSES], b"num_vis": 3072}
    (batches_dir / "batches.meta").write_bytes(pickle.dumps(meta))
    (batches_dir / "readme.html").write_text("<html></html>")
    return batches_dir, np.concatenate(train_images), test_images


def _image_bytes(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_tree(root, splits=("train", "test"), per_class=4):
    """An image-folder tree whose files vary in format, mode and size."""
    rng = np.random.default_rng(0)
    variants = [
        ("png", lambda a: Image.fromarray(a)),
        ("jpg", lambda a: Image.fromarray(a).resize((40, 30))),
        ("bmp", lambda a: Image.fromarray(a).convert("L")),
        ("png", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)]))),
        ("gif", lambda a: Image.fromarray(a).convert("P")),
        ("png", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257)),
        ("png", lambda a: Image.fromarray(a).resize((16, 16))),
    ]
    for split in splits:
        for class_index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                fmt, make = variants[(i + class_index) % len(variants)]
                (folder / f"{i:04d}.{fmt}").write_bytes(_image_bytes(make(array), {"jpg": "JPEG"}.get(fmt, fmt.upper())))
    return root


def test_cifar_python_tarball_decodes_like_the_real_format(tmp_path):
    batches_dir, train_images, test_images = write_cifar_python(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")

    dataset = data.load_dataset(archive, validation_split=0.25, seed=0, cache_dir=tmp_path / "cache", verbose=False)

    assert dataset.class_names == CLASSES
    assert dataset.x_test.shape == (12, 32, 32, 3) and dataset.x_test.dtype == np.uint8
    np.testing.assert_array_equal(dataset.x_test, test_images)  # test order and pixels preserved
    assert len(dataset.y_train) + len(dataset.y_val) == 60
    for x, y in ((dataset.x_train, dataset.y_train), (dataset.x_val, dataset.y_val)):
        np.testing.assert_array_equal(x[:, 0, 0, 0], y * 50)  # every image still has its own label


def test_extracted_batches_folder_gives_the_same_arrays_as_the_tarball(tmp_path):
    batches_dir, _, _ = write_cifar_python(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    from_folder = data.load_dataset(batches_dir, seed=3, cache_dir=tmp_path / "c1", verbose=False)
    from_parent = data.load_dataset(batches_dir.parent, seed=3, cache_dir=tmp_path / "c2", verbose=False)
    from_archive = data.load_dataset(archive, seed=3, cache_dir=tmp_path / "c3", verbose=False)
    for other in (from_parent, from_archive):
        np.testing.assert_array_equal(from_folder.x_train, other.x_train)
        np.testing.assert_array_equal(from_folder.y_val, other.y_val)


def test_image_tree_of_mixed_formats_and_sizes_becomes_one_rgb_array(tmp_path):
    root = write_image_tree(tmp_path / "tree")
    dataset = data.load_dataset(root, validation_split=0.25, seed=0, cache_dir=tmp_path / "cache", verbose=False)
    assert dataset.class_names == CLASSES
    assert dataset.x_train.shape[1:] == (32, 32, 3) and dataset.x_train.dtype == np.uint8
    assert len(dataset.y_train) == 9 and len(dataset.y_val) == 3 and len(dataset.y_test) == 12
    assert sorted(np.bincount(dataset.y_test)) == [4, 4, 4]
    # The test set keeps the files' order: test/frog/0003.png, the last, is the 16-bit grey one,
    # scaled to 8 bits (65535 -> 255), not clipped to white.
    with Image.open(root / "test" / "frog" / "0003.png") as sixteen_bit:
        assert sixteen_bit.mode.startswith("I")
        grey = np.asarray(sixteen_bit, dtype=np.float64) / 257
    assert grey.max() > 200 and grey.min() < 50
    np.testing.assert_array_equal(dataset.x_test[-1], np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, -1))


def test_image_tree_in_an_archive_with_a_top_folder(tmp_path):
    root = write_image_tree(tmp_path / "my-images")
    archive = tmp_path / "my-images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="my-images")
    from_archive = data.load_dataset(archive, seed=1, cache_dir=tmp_path / "c1", verbose=False)
    from_folder = data.load_dataset(root, seed=1, cache_dir=tmp_path / "c2", verbose=False)
    np.testing.assert_array_equal(from_archive.x_test, from_folder.x_test)
    np.testing.assert_array_equal(from_archive.y_train, from_folder.y_train)


@pytest.mark.parametrize("folder_name", ["validation", "val"])
def test_validation_folder_is_used_when_present(tmp_path, folder_name):
    root = write_image_tree(tmp_path / "tree", splits=("train", folder_name, "test"), per_class=3)
    dataset = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    assert len(dataset.y_train) == 9 and len(dataset.y_val) == 9
    assert "validation folder" in dataset.validation_source
    with Image.open(root / folder_name / "cat" / "0000.png") as first:  # in file order: cat's first file
        np.testing.assert_array_equal(dataset.x_val[0], np.asarray(first.convert("RGB")))


def test_unreadable_and_non_image_files_are_skipped_with_a_count(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="Skipped 2 files") as warned:
        dataset = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    assert len(dataset.y_train) + len(dataset.y_val) == 9
    note = str(next(item.message for item in warned if "Skipped" in str(item.message)))
    assert "train/dog/notes.txt: not an image, or in a format Pillow cannot read" in note and "BytesIO" not in note


def test_decoded_images_are_cached(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    first = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    assert list((tmp_path / "cache").glob("decoded-*/x_train.npy"))

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(image_files, "decode_image_folders", no_decoding)
    second = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    assert first.class_names == second.class_names


def test_a_changed_image_file_is_decoded_again(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    first = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "test" / "cat" / "0000.png")  # the first test image
    second = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    assert not np.array_equal(first.x_test[0], second.x_test[0])
    np.testing.assert_array_equal(second.x_test[0], np.full((32, 32, 3), (1, 2, 3), np.uint8))
    np.testing.assert_array_equal(first.x_test[1:], second.x_test[1:])
    assert len(list((tmp_path / "cache").glob("decoded-*"))) == 2


def test_a_corrupt_cache_is_rebuilt(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=3)
    first = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    (cache_file,) = (tmp_path / "cache").glob("decoded-*/x_test.npy")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable data cache"):
        second = data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)
    np.testing.assert_array_equal(first.x_test, second.x_test)


def test_stratified_split_is_disjoint_proportional_and_seeded():
    labels = np.repeat(np.arange(4), [100, 50, 20, 10])
    kept, held = data.stratified_split(labels, 0.1, np.random.default_rng(7))
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[held]), [10, 5, 2, 1])
    again, _ = data.stratified_split(labels, 0.1, np.random.default_rng(7))
    other, _ = data.stratified_split(labels, 0.1, np.random.default_rng(8))
    np.testing.assert_array_equal(kept, again)
    assert not np.array_equal(kept, other)


def test_subset_is_stratified_in_train_and_test(tmp_path):
    batches_dir, _, _ = write_cifar_python(tmp_path / "src", per_batch=60)  # 300 train, 60 test
    dataset = data.load_dataset(batches_dir, validation_split=0.2, subset=90, cache_dir=tmp_path / "c", verbose=False)
    assert len(dataset.y_train) + len(dataset.y_val) == 90
    np.testing.assert_array_equal(np.bincount(dataset.y_test), [6, 6, 6])
    np.testing.assert_array_equal(np.bincount(dataset.y_val), [6, 6, 6])


def test_data_found_in_the_in_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_TRANSFER_IN_DIR", str(tmp_path / "in"))
    write_cifar_python(tmp_path / "in")
    dataset = data.load_dataset(cache_dir=tmp_path / "cache", verbose=False)
    assert "cifar-10-batches-py" in dataset.source and dataset.class_names == CLASSES


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "no such file or folder"),
        (lambda tmp: (tmp / "x.tar.gz").write_bytes(b"not a tarball at all") and tmp / "x.tar.gz", "cannot read the archive"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "none of the accepted forms"),
        (lambda tmp: (tmp / "a.txt").write_text("x") and tmp / "a.txt", "none of the accepted forms"),
    ],
    ids=["missing", "corrupt-tarball", "empty-folder", "other-file"],
)
def test_bad_data_paths_raise_one_clear_error(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        data.load_dataset(make(tmp_path), cache_dir=tmp_path / "cache", verbose=False)


def test_truncated_tarball_is_reported(tmp_path):
    batches_dir, _, _ = write_cifar_python(tmp_path / "src", per_batch=200)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(InputError, match="archive"):
        data.load_dataset(archive, cache_dir=tmp_path / "cache", verbose=False)


def test_one_class_and_mismatched_test_classes_are_rejected(tmp_path):
    root = write_image_tree(tmp_path / "tree", per_class=2)
    (root / "test" / "horse").mkdir()
    (root / "test" / "horse" / "a.png").write_bytes((root / "test" / "cat" / "0000.png").read_bytes())
    with pytest.raises(InputError, match="classes that train/ lacks"):
        data.load_dataset(root, cache_dir=tmp_path / "cache", verbose=False)

    single = tmp_path / "single"
    for split in ("train", "test"):
        (single / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(single / split / "cat" / "a.png")
    with pytest.raises(InputError, match="at least two classes"):
        data.load_dataset(single, cache_dir=tmp_path / "cache", verbose=False)


def test_nothing_local_and_no_download_names_the_accepted_forms(tmp_path, monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/...: None -- no network")

    monkeypatch.setenv("VGG_TRANSFER_IN_DIR", str(tmp_path / "empty-in"))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(InputError, match="CIFAR-10 download failed .*cifar-10-python.tar.gz.*--data PATH"):
        data.load_dataset(cache_dir=tmp_path / "cache", verbose=False)


# Loads an image-folder tree in a fresh process and prints its peak resident memory during the
# loading alone (KiB): the high-water mark (VmHWM) is reset just before, once everything is
# imported, so that the imports' own peak (TensorFlow's is larger than these loads) hides nothing.
PEAK_MEMORY = """
import sys
from pathlib import Path
from vgg_transfer import data
def status(name):
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(name + ":")).split()[1])
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
assert status("VmHWM") <= status("VmRSS") + 1024
before = status("VmRSS")
dataset = data.load_dataset(sys.argv[1], cache_dir=sys.argv[2], verbose=False)
print(status("VmHWM") - before, dataset.image_shape[0])
"""


def _peak_memory_growth(root, cache_dir):
    import os
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(root), str(cache_dir)], capture_output=True,
                            text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth_kib, side = map(int, result.stdout.split()[-2:])
    return growth_kib * 1024, side


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak memory the Linux way")
def test_large_photos_are_decoded_one_at_a_time(tmp_path):
    """24 photos of 1600x1200 (5.8 MB each decoded, 138 MB together) against the same photos
    shrunk first to the 256 px the loader stores: the peak resident memory of the loading alone
    (from a reset high-water mark). The loader holds the stored arrays (24 x 256 x 256 x 3 bytes,
    4.7 MB) and one photo at a time (5.8 MB decoded); one that held every decoded photo before
    resizing would need 138 MB more. The test allows 40 MB more than the shrunk set's peak."""
    from benchmark_memory import photo

    rng = np.random.default_rng(0)
    large, small = tmp_path / "large", tmp_path / "small"
    for split, count in (("train", 6), ("test", 6)):
        for name in ("cat", "dog"):
            for index in range(count):
                image = photo(rng, 1600, 1200)
                for root, picture in ((large, image), (small, image.resize((256, 192), Image.Resampling.BILINEAR))):
                    (root / split / name).mkdir(parents=True, exist_ok=True)
                    picture.save(root / split / name / f"{index}.png", compress_level=1)
    large_growth, large_side = _peak_memory_growth(large, tmp_path / "cache-large")
    small_growth, small_side = _peak_memory_growth(small, tmp_path / "cache-small")
    assert large_side == small_side == 256
    assert large_growth <= small_growth + 40 * 2**20, (large_growth / 2**20, small_growth / 2**20)


def test_a_stored_array_reads_what_numpy_holds(tmp_path):
    from vgg_transfer import stored

    array = np.random.default_rng(0).integers(0, 256, (37, 4, 5, 3), dtype=np.uint8)
    writer = stored.StoredArrayWriter(tmp_path / "a.npy", array.shape, array.dtype)
    writer[0:20] = array[:20]
    for row in range(20, 37):
        writer[row] = array[row]
    on_disk = writer.close()
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)  # a plain .npy file
    assert (len(on_disk), on_disk.shape, on_disk.dtype, on_disk.nbytes) == (37, array.shape, np.uint8, array.nbytes)
    for key in (5, -1, slice(3, 9), slice(None), slice(30, 99), np.array([7, 2, 2, 30]), array[:, 0, 0, 0] > 128):
        np.testing.assert_array_equal(on_disk[key], array[key])
    assert np.concatenate([chunk for _, chunk in on_disk.chunks(10)]).tobytes() == array.tobytes()
    with pytest.raises(TypeError, match="row indices"):
        on_disk[:, :, ::-1]



def test_bfloat16_arrays_read_back_as_the_float32_values_they_round_to_in_memory_and_on_disk(tmp_path):
    """Features cached in bfloat16 (16 bits a value, `*.bfloat16.npy`) read back as float32 by
    every reader: a whole file in memory (`stored.load`), rows read from disk (`StoredArray`, the
    path of caches over the memory budget), chunks, and the batches `fit` gets."""
    import ml_dtypes

    from vgg_transfer import stored

    values = np.random.default_rng(0).standard_normal((37, 3, 4)).astype(np.float32) * 100
    rounded = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert not np.array_equal(rounded, values)  # the rounding shows
    path = tmp_path / f"features{stored.BFLOAT16_SUFFIX}"
    writer = stored.StoredArrayWriter(path, values.shape, "bfloat16")
    writer[0:30] = values[:30]
    writer[30:37] = values[30:]
    on_disk = writer.close()
    assert path.stat().st_size < values.nbytes / 2 + 256  # 16 bits a value on disk
    in_memory = stored.load(path)
    assert isinstance(in_memory, stored.Bfloat16Array) and in_memory.nbytes == values.nbytes // 2
    for array in (on_disk, in_memory):
        assert array.shape == values.shape and array.dtype == np.float32
        for key in (5, slice(3, 9), slice(None), np.array([7, 2, 2, 30])):
            if isinstance(key, int) and array is in_memory:
                continue
            np.testing.assert_array_equal(array[key], rounded[key])
        np.testing.assert_array_equal(np.concatenate([chunk for _, chunk in array.chunks(8)]), rounded)
        batches = data.Batches(array, np.arange(37), batch_size=10, shuffle=True, seed=3)
        rows = np.concatenate([batches[index][0] for index in range(len(batches))])
        np.testing.assert_array_equal(np.sort(rows.reshape(37, -1), axis=0), np.sort(rounded.reshape(37, -1), axis=0))


def test_batches_come_in_a_new_order_every_epoch_drawn_from_the_seed_and_the_epoch():
    """Every epoch a new order of all the rows; the same (seed, epoch) the same order in any
    Batches; `set_epoch(k)` the order that k epochs' ends lead to; without shuffle, in order."""
    x, y = np.arange(100).reshape(100, 1), np.arange(100)

    def epoch_order(batches):
        return np.concatenate([batches[index][1] for index in range(len(batches))])

    batches = data.Batches(x, y, batch_size=16, shuffle=True, seed=7)
    orders = []
    for _ in range(4):
        orders.append(epoch_order(batches))
        batches.on_epoch_end()
    for order in orders:
        assert sorted(order) == list(range(100)) and not np.array_equal(order, np.arange(100))
    assert len({order.tobytes() for order in orders}) == 4  # no epoch repeats another's order
    again = data.Batches(x, y, batch_size=16, shuffle=True, seed=7)
    assert np.array_equal(epoch_order(again), orders[0])
    again.set_epoch(2)
    assert np.array_equal(epoch_order(again), orders[2])
    other_seed = data.Batches(x, y, batch_size=16, shuffle=True, seed=8)
    assert not np.array_equal(epoch_order(other_seed), orders[0])
    in_order = data.Batches(x, y, batch_size=16)
    in_order.on_epoch_end()
    assert np.array_equal(epoch_order(in_order), np.arange(100))

@pytest.mark.slow
def test_data_larger_than_the_memory_budget_stays_on_disk_and_trains_the_same(tmp_path, monkeypatch, shared_data):
    """The main job on 48x48 images with a memory budget of 1 MB, which the images (2.1 MB) and
    their features (3.1 MB at 64 px) exceed: both stay on disk as StoredArrays and are read a
    batch at a time, and the run gives the same figures as with the images in memory."""
    import json

    import transfer_learning
    from vgg_transfer import cli, stored

    rng = np.random.default_rng(0)
    for split, count in (("train", 80), ("test", 20)):
        for index, name in enumerate(CLASSES):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
                pixels[..., index] = 255  # one colour channel per class: something to learn
                Image.fromarray(pixels).save(folder / f"{number:03d}.png")
    argv = ["--data", str(tmp_path / "tree"), "--weights", str(shared_data[1]), "--image-size", "64",
            "--epochs", "3", "--batch-size", "32", "--quiet", "--precision", "float32"]
    metrics, trained_on = {}, {}
    original_batches = data.Batches.__init__

    def recording_batches(self, x, y=None, batch_size=32, shuffle=False, seed=0):  # what each fit reads
        if shuffle:  # training
            trained_on.setdefault(budget, []).extend(type(part).__name__ for part in (x if isinstance(x, list) else [x]))
        original_batches(self, x, y, batch_size, shuffle, seed)

    monkeypatch.setattr(data.Batches, "__init__", recording_batches)
    for budget in ("1", ""):
        monkeypatch.setenv(stored.MEMORY_BUDGET_VARIABLE, budget)
        monkeypatch.setenv("VGG_TRANSFER_CACHE_DIR", str(tmp_path / f"cache-{budget or 'memory'}"))
        dataset = data.load_dataset(tmp_path / "tree", seed=42, verbose=False)
        assert isinstance(dataset.x_train, stored.StoredArray) is (budget == "1")
        out = tmp_path / f"out-{budget or 'memory'}"
        assert cli.run(transfer_learning.main, vars(transfer_learning), [*argv, "--out", str(out)]) == 0
        (run_dir,) = (out / "transfer_learning").iterdir()
        metrics[budget] = json.loads((run_dir / "metrics.json").read_text())
    assert list((tmp_path / "cache-1").glob("features-*.npy")) and list((tmp_path / "cache-1").glob("split-*"))
    # Over the budget, training reads the features from disk, batch by batch.
    assert set(trained_on["1"]) == {"StoredArray"} and set(trained_on[""]) == {"ndarray"}
    for key in ("test_accuracy", "test_loss", "best_val_loss", "per_class"):
        assert metrics["1"][key] == metrics[""][key], key
    assert metrics["1"]["test_accuracy"] > 0.5  # three colours: well above chance (one in three)
