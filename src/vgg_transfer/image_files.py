"""Images from folders and archives, and CIFAR-10's python batches, decoded into uint8 arrays.

An image-folder tree is ROOT/{train,test}/<class>/<image> (with ROOT/validation/ or val/ used
as the validation set when present), as a folder or as a .tar.gz/.tgz/.tar archive of one, read
in place. Any image format Pillow reads, any size and mode: each image is converted to RGB as a
viewer shows it (`to_rgb`) and resized into one square size for storage; the models resize to
IMAGE_SIZE themselves.
"""

import dataclasses
import io
import os
import pickle
import tarfile
import warnings

import numpy as np
from PIL import Image

from vgg_transfer import stored
from vgg_transfer.errors import InputError, first_line

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


@dataclasses.dataclass
class Decoded:
    """What a source holds before splitting: train, optional validation, and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    x_val: np.ndarray = None
    y_val: np.ndarray = None


class Members:
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
                    f"cannot read the archive {path} ({first_line(error)}); download it again or "
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
                f"the archive {self.path} is truncated or corrupt ({first_line(error)}); download it again"
            ) from None


def decode_cifar_python(path):
    """Reads the pickled batches of the official python-format CIFAR-10."""
    members = Members(path)
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
            raise InputError(f"cannot read the CIFAR-10 batch {name} in {path} ({first_line(error)}); download it again") from None

    train = [read_batch(name) for name in train_names]
    x_test, y_test = read_batch(by_basename["test_batch"])
    class_names = CIFAR10_CLASS_NAMES
    if "batches.meta" in by_basename:
        meta = pickle.loads(members.read(by_basename["batches.meta"]), encoding="bytes")
        class_names = tuple(name.decode() for name in meta[b"label_names"])
    return Decoded(
        np.concatenate([images for images, _ in train]), np.concatenate([labels for _, labels in train]),
        np.ascontiguousarray(x_test), y_test, class_names,
    )


def split_members(members, path):
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


def decode_image_folders(path, folder):
    """Reads ROOT/{train,validation,test}/<class>/<image> from a folder or an archive; arrays
    larger than the memory budget are written straight to `folder` as .npy files."""
    members = Members(path)
    found = split_members(members, path)

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

    # Two passes, so that memory holds the stored arrays and one photo at a time, never every
    # photo at its original size: the files' headers first (for the storage size), then each
    # image decoded, converted and resized straight into its row.
    sizes, skipped = {}, []
    for names in found.values():
        for name in names:
            sizes[name] = header_size(members, name, skipped)
    side = _storage_side([size for size in sizes.values() if size is not None])
    on_disk = sum(size is not None for size in sizes.values()) * side * side * 3 > stored.memory_budget()
    if on_disk:
        print(f"The decoded images take more than the memory budget: they stay on disk, in {folder}")
    arrays = {}
    for split, names in found.items():
        readable = [name for name in names if sizes[name] is not None]
        shape = (len(readable), side, side, 3)
        x = stored.StoredArrayWriter(folder / f"x_{split}.npy", shape, np.uint8) if on_disk else np.empty(shape, np.uint8)
        labels = []
        for name in readable:  # rows that cannot be decoded after all are not written: the next one takes their place
            if _read_into(members, name, x, len(labels), side, skipped):
                labels.append(class_names.index(name.split("/")[-2]))
        if on_disk:
            x = x.close()
            if len(labels) < len(x):  # files that failed to decode left rows at the end
                stored.take(x, np.arange(len(labels)), folder / "compacted.npy")
                os.replace(folder / "compacted.npy", folder / f"x_{split}.npy")
                x = stored.StoredArray(folder / f"x_{split}.npy")
        arrays[split] = (x[:len(labels)] if not on_disk else x, np.array(labels, np.int64))
    if skipped:
        examples = "; ".join(skipped[:3])
        warnings.warn(f"Skipped {len(skipped)} files that are not readable images (e.g. {examples}).")
    for split in ("train", "test"):
        if not len(arrays[split][1]):
            raise InputError(f"{path}: {split}/ holds no readable images")
    empty = [name for index, name in enumerate(class_names) if not np.any(arrays["train"][1] == index)]
    if empty:
        raise InputError(f"{path}: train/ has no readable images for class {', '.join(empty)}; add images or remove the folder")

    decoded = Decoded(*arrays["train"], *arrays["test"], class_names)
    validation = next((name for name in VALIDATION_FOLDER_NAMES if name in arrays and len(arrays[name][1])), None)
    if validation:
        decoded.x_val, decoded.y_val = arrays[validation]
    return decoded


def header_size(members, name, skipped):
    """(width, height) from an image file's header, or None (recorded in `skipped`) when it is none."""
    try:
        with Image.open(io.BytesIO(members.read(name))) as image:
            return image.size
    except InputError:
        raise
    except Exception as error:
        skipped.append(f"{name}: {first_line(error)}")
        return None


def _read_into(members, name, x, row, side, skipped):
    """Decodes one file, converts it to RGB and resizes it into `x[row]`; False (and the file in
    `skipped`) when it cannot be decoded after all."""
    try:
        with Image.open(io.BytesIO(members.read(name))) as image:
            image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale when that is enough
            image.load()
            x[row] = _to_square(to_rgb(image), side)
        return True
    except InputError:
        raise
    except Exception as error:
        skipped.append(f"{name}: {first_line(error)}")
        return False


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


def _storage_side(sizes):
    """One square side for all images, from their (width, height): their common size, else the
    most common longer side, within [32, MAX_STORED_IMAGE_SIDE]."""
    if not sizes:
        return 32
    if len(set(sizes)) == 1:
        width, height = sizes[0]
        if width == height:
            return width
    sides = [max(size) for size in sizes]
    values, counts = np.unique(sides, return_counts=True)
    return int(min(max(values[np.argmax(counts)], 32), MAX_STORED_IMAGE_SIDE))


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
        raise InputError(f"{path}: not a readable image ({first_line(error)})") from None


def _to_square(image, side):
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)
