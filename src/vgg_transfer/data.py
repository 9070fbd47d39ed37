"""CIFAR-10 (or any image-folder data set) as uint8 arrays, split into train, validation and test.

Accepted forms, for `--data PATH` or found in `in/` when no path is given:

- `cifar-10-python.tar.gz`, the official python-format archive;
- an extracted `cifar-10-batches-py/` folder;
- an image-folder tree `ROOT/train/<class>/*` and `ROOT/test/<class>/*`, with
  `ROOT/validation/<class>/*` (or `ROOT/val/<class>/*`) used as the validation set when
  present; as a folder or as a `.tar.gz`/`.tgz`/`.tar` archive of one (such as
  `cifar-10-images-jpg.tar.gz`). Any image format Pillow reads, any size and mode; class
  names are the folder names in sorted order.

With nothing local, `keras.datasets.cifar10.load_data()` downloads CIFAR-10.

Decoded arrays are cached (`.npz`, keyed by the source's paths, sizes and modification
times), so a second run starts in about a second instead of decoding 60,000 files again.
"""

import dataclasses
import hashlib
import io
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from vgg_transfer import cache, paths
from vgg_transfer.errors import InputError

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
ACCEPTED_FORMS = (
    "cifar-10-python.tar.gz, an extracted cifar-10-batches-py/ folder, or an image-folder "
    "tree ROOT/train/<class>/* and ROOT/test/<class>/* (a folder or a .tar.gz of one)"
)
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
VALIDATION_FOLDER_NAMES = ("validation", "val")
# Images of mixed sizes are resized to one square size for storage; the model then resizes
# to IMAGE_SIZE itself. The cap keeps a folder of large photos from filling the memory.
MAX_STORED_IMAGE_SIDE = 256
# Bumped whenever the decoding changes, so that old caches are not reused.
CACHE_FORMAT_VERSION = 1


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
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "train_images": int(len(self.y_train)),
            "validation_images": int(len(self.y_val)),
            "test_images": int(len(self.y_test)),
        }


@dataclasses.dataclass
class _Decoded:
    """What a source holds before splitting: train, optional validation, and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    x_val: np.ndarray = None
    y_val: np.ndarray = None


def load_dataset(data_path=None, validation_split=0.1, seed=0, subset=None, cache_dir=None, verbose=True):
    """Finds, decodes (once, then from cache) and splits the data.

    Args:
        data_path: a path in one of the accepted forms (module docstring), or None to look
            in `in/` and then download CIFAR-10 with Keras.
        validation_split: fraction in (0, 1) of each training class held out for validation
            when the data has no validation folder.
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
    from vgg_transfer import distribute  # imports Keras, which loading the data does not need otherwise

    source_path, form = locate(data_path)
    if source_path is None:
        decoded, source = _download_cifar10(), "CIFAR-10 (keras.datasets download)"
    else:
        source = f"{source_path} ({form})"
        decoded = _decode_cached(source_path, form, Path(cache_dir or paths.cache_dir()))
    if verbose:
        print(f"Data: {source}")
    return distribute.whole_batches(_split(decoded, source, validation_split, seed, subset))


# ---------------------------------------------------------------------------------------
# Finding the data


def locate(data_path):
    """Returns (path, form) of the data to use, or (None, None) to download."""
    if data_path is not None:
        path = Path(data_path).expanduser()
        if not path.exists():
            raise InputError(f"--data {data_path}: no such file or folder; pass {ACCEPTED_FORMS}")
        form = _form_of(path)
        if form is None:
            raise InputError(f"--data {data_path} is none of the accepted forms: {ACCEPTED_FORMS}")
        return path, form
    in_dir = paths.in_dir()
    candidates = sorted(in_dir.iterdir()) if in_dir.is_dir() else []
    # Prefer the official archive, then folders, then other archives.
    for wanted in ("cifar-python-archive", "cifar-python-folder", "image-folders", "image-folders-archive"):
        for candidate in candidates:
            if candidate.name.startswith(".") or candidate.name == "README.md":
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
        if (path / "train").is_dir() and (path / "test").is_dir():
            return "image-folders"
        return None
    if path.name.endswith(TARBALL_SUFFIXES):
        return "cifar-python-archive" if "python" in path.name else "image-folders-archive"
    return None


def _download_cifar10():
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # Keras raises plain Exceptions for network failures.
        raise InputError(
            f"no data found in {paths.in_dir()} and the CIFAR-10 download failed "
            f"({_first_line(error)}); put {ACCEPTED_FORMS} into in/, or pass --data PATH"
        ) from None
    return _Decoded(x_train, y_train.reshape(-1).astype(np.int64), x_test,
                    y_test.reshape(-1).astype(np.int64), CIFAR10_CLASS_NAMES)


# ---------------------------------------------------------------------------------------
# Decoding, with a cache


def _decode_cached(path, form, cache_dir):
    cache_file = cache_dir / f"decoded-{_source_key(path)}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
            class_names = tuple(str(name) for name in arrays.pop("class_names"))
            return _Decoded(class_names=class_names, **arrays)
        except Exception as error:  # A corrupt or truncated cache is rebuilt, not trusted.
            warnings.warn(f"Ignoring unreadable data cache {cache_file} ({_first_line(error)}); decoding again.")
    decode = {
        "cifar-python-archive": _decode_cifar_python,
        "cifar-python-folder": _decode_cifar_python,
        "image-folders": _decode_image_folders,
        "image-folders-archive": _decode_image_folders,
    }[form]
    decoded = decode(path)
    arrays = {
        field.name: getattr(decoded, field.name)
        for field in dataclasses.fields(decoded)
        if getattr(decoded, field.name) is not None and field.name != "class_names"
    }
    cache.save_atomically(cache_file, {"class_names": np.array(decoded.class_names), **arrays})
    return decoded


def _source_key(path):
    """A digest of the source's identity: resolved path, and size and mtime of every file."""
    digest = hashlib.sha1(f"v{CACHE_FORMAT_VERSION}:{path.resolve()}".encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else ''}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class _Members:
    """Uniform read access to the files of a folder or of a tar archive, by relative path."""

    def __init__(self, path):
        self.path = path
        self._tar = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path)
                self._members = {
                    member.name.lstrip("./"): member for member in self._tar.getmembers() if member.isfile()
                }
            except (tarfile.TarError, OSError, EOFError, ValueError) as error:
                raise InputError(
                    f"cannot read the archive {path} ({_first_line(error)}); download it again or "
                    f"unpack it and pass the folder with --data"
                ) from None
        else:
            self._members = {str(p.relative_to(path)): p for p in path.rglob("*") if p.is_file()}

    def names(self):
        return sorted(self._members)

    def read(self, name):
        member = self._members[name]
        if self._tar is None:
            return member.read_bytes()
        try:
            return self._tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            raise InputError(
                f"the archive {self.path} is truncated or corrupt ({_first_line(error)}); download it again"
            ) from None


def _decode_cifar_python(path):
    """Reads the pickled batches of the official python-format CIFAR-10."""
    members = _Members(path)
    by_basename = {}
    for name in members.names():
        by_basename.setdefault(name.rsplit("/", 1)[-1], name)
    train_names = [by_basename.get(f"data_batch_{index}") for index in range(1, 6)]
    if None in train_names or "test_batch" not in by_basename:
        raise InputError(
            f"{path} does not hold the CIFAR-10 python batches data_batch_1..5 and test_batch; "
            f"pass {ACCEPTED_FORMS}"
        )

    def read_batch(name):
        try:
            batch = pickle.loads(members.read(name), encoding="bytes")
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return images, np.asarray(batch[b"labels"], dtype=np.int64)
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"cannot read the CIFAR-10 batch {name} in {path} ({_first_line(error)}); download it again") from None

    train = [read_batch(name) for name in train_names]
    x_test, y_test = read_batch(by_basename["test_batch"])
    class_names = CIFAR10_CLASS_NAMES
    if "batches.meta" in by_basename:
        meta = pickle.loads(members.read(by_basename["batches.meta"]), encoding="bytes")
        class_names = tuple(name.decode() for name in meta[b"label_names"])
    return _Decoded(
        np.concatenate([images for images, _ in train]), np.concatenate([labels for _, labels in train]),
        np.ascontiguousarray(x_test), y_test, class_names,
    )


def _split_members(members, path):
    """The image-folder files by split: {"train": [...], "test": [...], maybe "validation"},
    under ROOT, the folder that holds train/ and test/ (an archive usually adds one level)."""
    splits = {}
    for name in members.names():
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] in ("train", "test", *VALIDATION_FOLDER_NAMES):
            root = "/".join(parts[:-3])
            splits.setdefault(root, {}).setdefault(parts[-3], []).append(name)
    roots = [root for root, found in splits.items() if "train" in found and "test" in found]
    if not roots:
        raise InputError(f"{path} holds no train/<class>/ and test/<class>/ image folders; pass {ACCEPTED_FORMS}")
    return splits[min(roots, key=len)]


def _decode_image_folders(path):
    """Reads ROOT/{train,validation,test}/<class>/<image> from a folder or an archive."""
    members = _Members(path)
    found = _split_members(members, path)

    class_names = tuple(sorted({name.split("/")[-2] for name in found["train"]}))
    if len(class_names) < 2:
        raise InputError(f"{path}: train/ has {len(class_names)} class folder; at least two classes are needed")
    for split in ("test", *VALIDATION_FOLDER_NAMES):
        if split in found:
            split_classes = set(name.split("/")[-2] for name in found[split])
            if not split_classes <= set(class_names):
                extra = ", ".join(sorted(split_classes - set(class_names)))
                raise InputError(
                    f"{path}: {split}/ has classes that train/ lacks ({extra}); use the same class folders in both"
                )

    images, skipped = {}, []
    for split, names in found.items():
        decoded = [(_read_image(members, name, skipped), class_names.index(name.split("/")[-2])) for name in names]
        images[split] = [(image, label) for image, label in decoded if image is not None]
    if skipped:
        examples = "; ".join(skipped[:3])
        warnings.warn(f"Skipped {len(skipped)} files that are not readable images (e.g. {examples}).")
    for split in ("train", "test"):
        if not images[split]:
            raise InputError(f"{path}: {split}/ holds no readable images")
    empty = [name for name in class_names if not any(class_names[label] == name for _, label in images["train"])]
    if empty:
        raise InputError(f"{path}: train/ has no readable images for class {', '.join(empty)}; add images or remove the folder")

    side = _storage_side([image for split in images.values() for image, _ in split])

    def stack(pairs):
        x = np.stack([_to_square(image, side) for image, _ in pairs])
        return x, np.array([label for _, label in pairs], dtype=np.int64)

    x_train, y_train = stack(images["train"])
    x_test, y_test = stack(images["test"])
    decoded = _Decoded(x_train, y_train, x_test, y_test, class_names)
    validation = next((images[name] for name in VALIDATION_FOLDER_NAMES if images.get(name)), None)
    if validation:
        decoded.x_val, decoded.y_val = stack(validation)
    return decoded


def _read_image(members, name, skipped):
    """Decodes one file as an RGB uint8 Pillow image, or records it in `skipped` and returns None."""
    try:
        with Image.open(io.BytesIO(members.read(name))) as image:
            image.load()
            return to_rgb(image)
    except InputError:
        raise
    except Exception as error:
        skipped.append(f"{name}: {_first_line(error)}")
        return None


def to_rgb(image):
    """Converts a Pillow image of any mode to 8-bit RGB.

    Transparent images are put on a white background (what a viewer shows), and 16-bit or
    32-bit grey images are scaled to 8 bits instead of being clipped to white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _storage_side(images):
    """One square side for all images: their common size, else the most common longer side."""
    sizes = {image.size for image in images}
    if len(sizes) == 1:
        width, height = sizes.pop()
        if width == height:
            return width
    sides = [max(image.size) for image in images]
    values, counts = np.unique(sides, return_counts=True)
    return int(min(max(values[np.argmax(counts)], 32), MAX_STORED_IMAGE_SIDE))


def original_image_sizes(data_path=None):
    """(width, height) of every image of image-folder data, read from the file headers;
    an empty list for the python-format CIFAR-10 (all 32x32) or a download."""
    source_path, form = locate(data_path)
    if source_path is None or form not in ("image-folders", "image-folders-archive"):
        return []
    members = _Members(source_path)
    sizes = []
    for names in _split_members(members, source_path).values():
        for name in names:
            try:
                with Image.open(io.BytesIO(members.read(name))) as image:
                    sizes.append(image.size)
            except InputError:
                raise
            except Exception:  # not an image: the loader skips it too
                continue
    return sizes


def read_image_file(path, side):
    """One image file of any format, size and mode as an RGB uint8 array (side, side, 3),
    converted as the data loader converts (see `to_rgb`) and resized bilinearly.

    Raises:
        InputError: the file cannot be read as an image.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_square(to_rgb(image), side)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path}: not a readable image ({_first_line(error)})") from None


def _to_square(image, side):
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# Splitting


def _split(decoded, source, validation_split, seed, subset):
    rng = np.random.default_rng(seed)
    x_train, y_train, x_test, y_test = decoded.x_train, decoded.y_train, decoded.x_test, decoded.y_test
    num_classes = len(decoded.class_names)
    if subset is not None:
        if subset < 2 * num_classes:
            raise InputError(f"--subset {subset} is too small for {num_classes} classes; pass at least {2 * num_classes}")
        keep = stratified_sample(y_train, subset, rng)
        x_train, y_train = x_train[keep], y_train[keep]
        keep_test = stratified_sample(y_test, max(subset // 5, num_classes), rng)
        x_test, y_test = x_test[keep_test], y_test[keep_test]
    if decoded.x_val is not None:
        x_val, y_val, validation_source = decoded.x_val, decoded.y_val, "the data's validation folder"
        if subset is not None:
            keep_val = stratified_sample(y_val, max(subset // 10, num_classes), rng)
            x_val, y_val = x_val[keep_val], y_val[keep_val]
    else:
        train_indices, val_indices = stratified_split(y_train, validation_split, rng)
        x_val, y_val = x_train[val_indices], y_train[val_indices]
        x_train, y_train = x_train[train_indices], y_train[train_indices]
        validation_source = f"stratified {validation_split:.0%} of the training images (seed {seed})"
    return Dataset(
        np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_val), y_val,
        np.ascontiguousarray(x_test), y_test, tuple(decoded.class_names), source, validation_source,
    )


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


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
