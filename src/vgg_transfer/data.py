"""CIFAR-10 (or any image-folder data set) as uint8 arrays, split into train, validation and test.

The data comes from `--data PATH` or from `in/` in one of `image_files.ACCEPTED_FORMS` (read
by `image_files` and `cifar_batches`), else from Keras's CIFAR-10 download. Class folders alone
are split here: a seeded, stratified TEST_SPLIT of each class is the test set, the same in every
run. Decoded arrays are cached (`.npy` files, keyed by the source's paths, sizes and modification
times), so a second run starts in a second instead of decoding 60,000 files again.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np

from vgg_transfer import cifar_batches, distribute, image_files, paths, stored
from vgg_transfer.errors import FULL_DISK_ERRORS, InputError, first_line

# Bumped whenever the decoding changes, so that old caches are not reused.
CACHE_FORMAT_VERSION = 4


@dataclasses.dataclass
class Dataset:
    """Images as uint8 arrays of shape (N, H, W, 3) in [0, 255], labels as int64 of shape (N,).

    `x_val`/`y_val` come from the data's own validation folder or from a stratified,
    seeded slice of the training images; the test arrays are in their original,
    unshuffled order and are only for the final report.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str
    validation_source: str
    test_source: str = "the data's test set"

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])

    def summary(self):
        return {
            "source": self.source,
            "validation": self.validation_source,
            "test": self.test_source,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "train_images": int(len(self.y_train)),
            "validation_images": int(len(self.y_val)),
            "test_images": int(len(self.y_test)),
            "images_per_class": self.images_per_class(),
        }

    def images_per_class(self):
        """{"train": {class name: count}, "validation": ..., "test": ...}."""
        return {split: dict(zip(self.class_names, np.bincount(labels, minlength=self.num_classes).tolist()))
                for split, labels in (("train", self.y_train), ("validation", self.y_val), ("test", self.y_test))}


def load_dataset(data_path=None, validation_split=0.1, test_split=0.2, seed=0, subset=None, cache_dir=None,
                 verbose=True):
    """Finds, decodes (once, then from cache) and splits the data.

    Args:
        data_path: a path in one of the accepted forms (module docstring), or None to look
            in `in/` and then download CIFAR-10 with Keras.
        validation_split: fraction in (0, 1) of each training class held out for validation
            when the data has no validation folder.
        test_split: fraction in (0, 1) of each class held out as the test set when the data is
            class folders alone; drawn with TEST_SPLIT_SEED, not `seed`, so that runs with
            different seeds are tested on the same images.
        seed: seeds the validation slice and the subset, so both are reproducible.
        subset: None for all images, or N to keep N training images and N // 5 test images,
            both stratified by class, for quick runs.
        cache_dir: where decoded arrays are cached; default `paths.cache_dir()`.
        verbose: print one line saying which data is used.

    Returns:
        A `Dataset`. With `--distribute` over N devices, the training and validation sets
        drop their last `len % N` images, so that every batch splits evenly.

    Raises:
        InputError: no data found, a path of no accepted form, an unreadable archive, or
            class folders that do not fit together.
    """
    source_path, form = locate(data_path)
    cache_dir = Path(cache_dir or paths.cache_dir())
    if source_path is None:
        decoded, source, key = cifar_batches.download(), "CIFAR-10 (keras.datasets download)", "download"
    else:
        source, key = f"{source_path} ({form})", _source_key(source_path)
        decoded = _decode_cached(source_path, form, cache_dir)
    if verbose:
        print(f"Data: {source}")
    split_folder = cache_dir / f"split-{key}-{seed}-{validation_split}-{test_split}-{subset}"  # for stored arrays only
    dataset = _split(decoded, source, validation_split, test_split, seed, subset, split_folder)
    return distribute.whole_batches(dataset)  # the dataset itself without data parallelism


# ---------------------------------------------------------------------------------------
# Finding the data


def locate(data_path):
    """Returns (path, form) of the data to use, or (None, None) to download."""
    if data_path is not None:
        if not str(data_path).strip():  # Path("") is the working folder, which is no data set
            raise InputError(f"--data is empty; pass {image_files.ACCEPTED_FORMS}, or leave --data out to look in "
                             f"in/ and then download CIFAR-10")
        path = Path(data_path).expanduser()
        if not path.exists():
            raise InputError(f"--data {data_path}: no such file or folder; pass {image_files.ACCEPTED_FORMS}")
        form = _form_of(path)
        if form is None:
            raise InputError(f"--data {data_path} is none of the accepted forms: {image_files.ACCEPTED_FORMS}")
        return path, form
    in_dir = paths.in_dir()
    candidates = sorted(in_dir.iterdir()) if in_dir.is_dir() else []
    # Prefer the official archive, then folders, then other archives.
    for wanted in ("cifar-python-archive", "cifar-python-folder", "image-folders", "image-folders-archive"):
        for candidate in candidates:
            if image_files.left_by_tools(candidate.name) or candidate.name == "README.md":
                continue
            if _form_of(candidate) == wanted:
                return candidate, wanted
    if in_dir.is_dir() and _form_of(in_dir) == "image-folders":
        return in_dir, "image-folders"
    return None, None


def _form_of(path):
    """Names the form of `path`, or None when it is none of the accepted ones."""
    if path.is_dir():
        if (path / "data_batch_1").is_file() and (path / "test_batch").is_file():
            return "cifar-python-folder"
        if (path / "cifar-10-batches-py").is_dir():
            return _form_of(path / "cifar-10-batches-py")
        return "image-folders" if _holds_class_folders(path) else None
    if path.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as archive:  # its table of contents is quick to read
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise InputError(f"cannot read the archive {path} ({first_line(error)}); download it again") from None
        return "cifar-python-archive" if any(name.endswith("data_batch_1") for name in names) else "image-folders-archive"
    if path.name.lower().endswith(image_files.ARCHIVE_SUFFIXES):
        return "cifar-python-archive" if cifar_batches.is_python_archive(path) else "image-folders-archive"
    return None


def _holds_class_folders(path, depth=2):
    """Whether a folder looks like image folders: train/ and test/, two or more class folders, or
    one folder (such as an unpacked archive's) that does. `image_files.split_members` decides."""
    folders = [child for child in path.iterdir() if child.is_dir() and not image_files.left_by_tools(child.name)]
    names = {folder.name for folder in folders}
    if {"train", "test"} <= names or len(folders) >= 2:
        return True
    return len(folders) == 1 and depth > 0 and _holds_class_folders(folders[0], depth - 1)


# ---------------------------------------------------------------------------------------
# Decoding, with a cache


def _decode_cached(path, form, cache_dir):
    """The decoded arrays, from the cache (a folder of .npy files, one per array) or decoded and
    cached. Arrays larger than the memory budget stay on disk as `StoredArray`s."""
    folder = cache_dir / f"decoded-{_source_key(path)}"
    if (folder / "class_names.json").is_file():
        try:
            return _read_decoded(folder)
        except Exception as error:  # A corrupt or truncated cache is rebuilt, not trusted.
            warnings.warn(f"Ignoring unreadable data cache {folder} ({first_line(error)}); decoding again.")
    temporary = cache_dir / f".{folder.name}.{os.getpid()}.tmp"
    decoded = None
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        if form in ("image-folders", "image-folders-archive"):
            decoded = image_files.decode_image_folders(path, temporary)
        else:
            decoded = cifar_batches.decode(path)
        for field in dataclasses.fields(decoded):
            array = getattr(decoded, field.name)
            if isinstance(array, np.ndarray):
                np.save(temporary / f"{field.name}.npy", array)
        (temporary / "class_names.json").write_text(json.dumps(list(decoded.class_names)))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if error.errno in FULL_DISK_ERRORS and (decoded is None or isinstance(decoded.x_train, stored.StoredArray)):
            raise  # one line from cli, as for any full disk (status 1)
        if decoded is None or isinstance(decoded.x_train, stored.StoredArray):
            raise InputError(f"cannot write the decoded images to {cache_dir} ({error}); free some disk space "
                             f"or set VGG_TRANSFER_CACHE_DIR to a folder with room") from None
        warnings.warn(f"Could not write the data cache {folder} ({error}); the next run decodes again.")
        return decoded  # in memory: the cache only saves time
    return _read_decoded(folder)


def _read_decoded(folder):
    """The arrays of a decoded-data cache folder: in memory if they fit the budget, else stored."""
    files = {file.stem: file for file in folder.glob("*.npy")}
    stored_arrays = {name: stored.StoredArray(file) for name, file in files.items()}
    in_memory = sum(array.nbytes for array in stored_arrays.values()) <= stored.memory_budget()
    arrays = {name: np.load(files[name]) if in_memory or name.startswith("y_") else array
              for name, array in stored_arrays.items()}
    return image_files.Decoded(class_names=tuple(json.loads((folder / "class_names.json").read_text())), **arrays)


def _source_key(path):
    """A digest of the source's identity: resolved path, and size and mtime of every file."""
    digest = hashlib.sha1(f"v{CACHE_FORMAT_VERSION}:{path.resolve()}".encode())
    files = [path] if path.is_file() else image_files.files_in(path)
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else ''}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def original_image_sizes(data_path=None):
    """(width, height) of every image of image-folder data, read from the file headers;
    an empty list for the python-format CIFAR-10 (all 32x32) or a download."""
    source_path, form = locate(data_path)
    if source_path is None or form not in ("image-folders", "image-folders-archive"):
        return []
    members = image_files.Members(source_path)
    sizes = [image_files.header_size(members, name, skipped=[])
             for files in image_files.split_members(members, source_path).values() for name, _ in files]
    return [size for size in sizes if size is not None]  # not images: the loader skips them too


# ---------------------------------------------------------------------------------------
# Splitting


# Seeds the test set split off class folders alone: fixed, so every run tests on the same images.
TEST_SPLIT_SEED = 0


def _split(decoded, source, validation_split, test_split, seed, subset, folder):
    """Test set, subset and validation split; the rows of stored arrays are copied into stored
    arrays in `folder`, a chunk at a time (and reused when that folder is complete)."""
    complete = folder / "complete"

    def rows(array, indices, name):
        if isinstance(array, stored.StoredArray):
            if complete.is_file():
                return stored.StoredArray(folder / f"{name}.npy")
            folder.mkdir(parents=True, exist_ok=True)
        return stored.take(array, indices, folder / f"{name}.npy")

    rng = np.random.default_rng(seed)
    num_classes = len(decoded.class_names)
    x_train, y_train = decoded.x_train, decoded.y_train
    if decoded.x_test is None:  # class folders alone
        train_rows, test_rows = stratified_split(y_train, test_split, np.random.default_rng(TEST_SPLIT_SEED))
        x_test, y_test = x_train, y_train
        test_source = f"stratified {test_split:.0%} of each class (split seed {TEST_SPLIT_SEED}, the same in every run)"
    else:
        train_rows, test_rows = np.arange(len(y_train)), np.arange(len(decoded.y_test))
        x_test, y_test = decoded.x_test, decoded.y_test
        test_source = "the data's test set"
    if subset is not None:
        if subset < 2 * num_classes:
            raise InputError(f"--subset {subset} is too small for {num_classes} classes; pass at least {2 * num_classes}")
        train_rows = train_rows[stratified_sample(y_train[train_rows], subset, rng)]
        test_rows = test_rows[stratified_sample(y_test[test_rows], max(subset // 5, num_classes), rng)]
    if decoded.x_val is not None:
        val_rows = np.arange(len(decoded.y_val))
        if subset is not None:
            val_rows = stratified_sample(decoded.y_val, max(subset // 10, num_classes), rng)
        x_val, y_val = rows(decoded.x_val, val_rows, "x_val"), decoded.y_val[val_rows]
        validation_source = "the data's validation folder"
    else:
        kept, held_out = stratified_split(y_train[train_rows], validation_split, rng)
        train_rows, val_rows = train_rows[kept], train_rows[held_out]
        x_val, y_val = rows(x_train, val_rows, "x_val"), y_train[val_rows]
        validation_source = f"stratified {validation_split:.0%} of the training images (seed {seed})"
    x_train_rows, y_train = rows(x_train, train_rows, "x_train"), y_train[train_rows]
    x_test, y_test = rows(x_test, test_rows, "x_test"), y_test[test_rows]
    if isinstance(x_train_rows, stored.StoredArray):
        complete.touch()
    _warn_of_unsplit_classes(decoded.class_names, y_train, y_val, y_test)
    return Dataset(x_train_rows, y_train, x_val, y_val, x_test, y_test, tuple(decoded.class_names), source,
                   validation_source, test_source)


def _warn_of_unsplit_classes(class_names, y_train, y_val, y_test):
    """One warning naming every class without a validation or a test image (one image cannot be split)."""
    counts = [np.bincount(labels, minlength=len(class_names)) for labels in (y_train, y_val, y_test)]
    lacking = [f"{name} ({train} training, {val} validation, {test} test)"
               for name, train, val, test in zip(class_names, *counts) if train and not (val and test)]
    if lacking:
        warnings.warn(f"Too few images to hold some out for validation and test in class {'; '.join(lacking)}: "
                      f"it is trained on but not fully validated or tested; add images to it")


def stratified_split(labels, fraction, rng):
    """Splits indices into (kept, held_out), holding out `fraction` of every class.

    Each class with two or more images keeps at least one and holds out at least one.
    Both index arrays are sorted, so the kept images stay in their original order.
    """
    kept, held_out = [], []
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(fraction * len(indices)))
        if len(indices) >= 2:
            count = min(max(count, 1), len(indices) - 1)
        held_out.append(indices[:count])
        kept.append(indices[count:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held_out))


def stratified_sample(labels, size, rng):
    """Returns `size` sorted indices drawn without replacement, in proportion to each class."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, sample = stratified_split(labels, size / len(labels), rng)
    return sample


def mirrored(images):
    """The images flipped left to right (see `stored.mirrored`): test-time flip averaging and the
    mirror images that augment cached activations."""
    return stored.mirrored(images)


class Batches(keras.utils.PyDataset):
    """Batches of `x` (and `y`) for `fit`, `evaluate` and `predict`, from arrays in memory or
    stored on disk (a `keras.utils.PyDataset`, so on every backend). With `shuffle`, in a new
    order every epoch, drawn from `seed` and the epoch's number, so that two runs with the same
    seed see the same batches.

    Args:
        x: an array or `StoredArray` (N, ...), or a list of them read as one after the other
            (N the sum of their lengths), e.g. the activations of images and of their mirror images.
        y: the labels (N,), or None for prediction.
        batch_size: images per batch (the last batch takes the rest).
        shuffle: draw a new order every epoch (for training).
        seed: seeds the orders.
    """

    def __init__(self, x, y=None, batch_size=32, shuffle=False, seed=0):
        super().__init__()
        self.parts = x if isinstance(x, list) else [x]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        self.y, self.batch_size, self.shuffle, self.seed = y, batch_size, shuffle, seed
        self.epoch = 0
        self.order = self._order()

    def _order(self):
        if not self.shuffle:
            return np.arange(self.starts[-1])
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.starts[-1])

    def __len__(self):
        return math.ceil(self.starts[-1] / self.batch_size)

    def _rows(self, rows):
        if len(self.parts) == 1:  # in order, one contiguous read; else the rows asked for
            return self.parts[0][slice(rows[0], rows[-1] + 1) if not self.shuffle else rows]
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        batch = np.empty((len(rows), *self.parts[0].shape[1:]), self.parts[0].dtype)
        for part in np.unique(part_of):
            batch[part_of == part] = self.parts[part][rows[part_of == part] - self.starts[part]]
        return batch

    def __getitem__(self, index):
        # With several worker processes, each feeds its own share of every batch.
        rows = distribute.share_of_batch(self.order[index * self.batch_size:(index + 1) * self.batch_size])
        return self._rows(rows) if self.y is None else (self._rows(rows), self.y[rows])

    def set_epoch(self, epoch):
        """Draws the order of epoch number `epoch` (counted from 0), e.g. to continue after an
        interruption in the order the uninterrupted run had."""
        self.epoch = epoch
        self.order = self._order()

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)
