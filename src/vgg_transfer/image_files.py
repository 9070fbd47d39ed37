"""Images from folders and archives, and CIFAR-10's python batches, decoded into uint8 arrays.

An image-folder tree is ROOT/{train,test}/<class>/<image> (with ROOT/validation/ or val/ used
as the validation set when present), or ROOT/<class>/... alone (split by `data`), as a folder or
as a .zip/.tar.gz/.tgz/.tar archive of one, read in place. Hidden files and folders and those
that tools leave behind (`left_by_tools`) are ignored. Any image format Pillow reads, any size
and mode: each image is turned as its EXIF orientation says and converted to RGB as a viewer
shows it (`as_shown`, `to_rgb`), and resized into one square size for storage; the models
resize to IMAGE_SIZE themselves.
"""

import dataclasses
import io
import os
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vgg_transfer import stored
from vgg_transfer.errors import InputError, first_line

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
ACCEPTED_FORMS = (
    "cifar-10-python.tar.gz, an extracted cifar-10-batches-py/ folder, or image folders "
    "ROOT/train/<class>/* and ROOT/test/<class>/*, or ROOT/<class>/* alone (a folder, or a .zip or .tar.gz of one)"
)
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
VALIDATION_FOLDER_NAMES = ("validation", "val")
SPLIT_FOLDER_NAMES = ("train", "test", *VALIDATION_FOLDER_NAMES)
# Images of mixed sizes are resized to one square size for storage; the model then resizes
# to IMAGE_SIZE itself. The cap keeps a folder of large photos from filling the memory.
MAX_STORED_IMAGE_SIDE = 256


@dataclasses.dataclass
class Decoded:
    """What a source holds before splitting: train, optional validation, and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    class_names: tuple
    x_test: np.ndarray = None  # None for class folders alone: `data` then splits a test set off
    y_test: np.ndarray = None
    x_val: np.ndarray = None
    y_val: np.ndarray = None


# Left in data folders by tools, never classes or images: macOS archives' resource forks and
# Windows Explorer's files (names starting with "." - .DS_Store, ._*, .ipynb_checkpoints/ - too).
TOOL_FILE_NAMES = ("__macosx", "thumbs.db", "desktop.ini")


def left_by_tools(name):
    """Whether a relative path lies in or is a hidden or tool-made file or folder (`TOOL_FILE_NAMES`)."""
    return any(part.startswith(".") or part.lower() in TOOL_FILE_NAMES for part in name.split("/"))


def files_in(folder):
    """Every file under `folder`, at any depth, following symlinked folders as a file browser
    does (Python 3.11's `Path.rglob` does not), each real folder once, so a link to a folder
    above it ends instead of looping; in a stable order."""
    found, visited = [], set()
    for top, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in visited:
            folders[:] = []
            continue
        visited.add(real)
        folders.sort()
        found += [Path(top) / name for name in sorted(files) if os.path.isfile(os.path.join(top, name))]
    return found


class Members:
    """Uniform read access to the files of a folder, a tar archive or a zip archive (read in
    place, nothing extracted), by relative path with "/" separators; hidden and tool-made files
    (`left_by_tools`) are left out."""

    def __init__(self, path):
        self.path = path
        self._tar = self._zip = None
        if path.is_dir():
            found = {file.relative_to(path).as_posix(): file for file in files_in(path)}
        else:
            try:
                if zipfile.is_zipfile(path):
                    self._zip = zipfile.ZipFile(path)
                    found = {member.filename: member for member in self._zip.infolist() if not member.is_dir()}
                else:
                    self._tar = tarfile.open(path)
                    found = {member.name: member for member in self._tar.getmembers() if member.isfile()}
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
                raise InputError(
                    f"cannot read the archive {path} ({first_line(error)}); download it again or "
                    f"unpack it and pass the folder with --data"
                ) from None
            found = {self._checked(name): member for name, member in found.items()}
        self._members = {name: member for name, member in found.items() if not left_by_tools(name)}

    def _checked(self, name):
        """An archive member's name relative to the archive's root; names that point outside it
        (absolute, or with "..") are refused, though nothing is ever extracted, as a sign of a
        tampered archive."""
        name = name.replace("\\", "/")
        while name.startswith("./"):
            name = name[2:]
        if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
            raise InputError(f"the archive {self.path} holds a file named {name!r}, outside the archive's own "
                             f"folder; this archive is not safe to use, download it again from its source")
        return name

    def names(self):
        return sorted(self._members)

    def read(self, name):
        member = self._members[name]
        try:
            if self._zip is not None:
                return self._zip.read(member)
            if self._tar is not None:
                return self._tar.extractfile(member).read()
            return member.read_bytes()
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            if self._tar is None and self._zip is None:
                raise InputError(f"cannot read {member} ({first_line(error)})") from None
            raise InputError(
                f"the archive {self.path} is truncated or corrupt ({first_line(error)}); download it again"
            ) from None


def split_members(members, path):
    """The image files as {split: [(name, class name), ...]}: "train", "test" and maybe
    "validation" for ROOT/{train,test}/<class>/*, or "all" for ROOT/<class>/** (any depth under
    the class folder, as `keras.utils.image_dataset_from_directory` reads it), which the project
    then splits. ROOT is the shallowest folder holding such a tree (an archive often adds one)."""
    splits, flat = {}, {}
    for name in members.names():
        parts = name.split("/")
        # ROOT/<split>/<class>/**: any depth under the class folder, as for class folders alone
        split_at = next((index for index, part in enumerate(parts[:-2]) if part in SPLIT_FOLDER_NAMES), None)
        if split_at is not None:
            splits.setdefault(tuple(parts[:split_at]), {}).setdefault(parts[split_at], []).append(
                (name, parts[split_at + 1]))
        for depth in range(len(parts) - 1):
            flat.setdefault(tuple(parts[:depth]), {}).setdefault(parts[depth], []).append(name)
    roots = [root for root, found in splits.items() if "train" in found and "test" in found]
    if roots:
        root = min(roots, key=len)
        chosen = splits[root]
    else:
        flat_roots = [root for root, classes in flat.items() if len(classes) >= 2]
        if not flat_roots:
            raise InputError(f"{path} holds no class folders of images; pass {ACCEPTED_FORMS}")
        root = min(flat_roots, key=len)
        classes = flat[root]
        if set(classes) <= set(SPLIT_FOLDER_NAMES):
            raise InputError(f"{path} has {'/, '.join(sorted(classes))}/ but not both train/ and test/; add "
                             f"test/<class>/ folders, or pass one folder of class folders for the project to split")
        chosen = {"all": [(name, class_name) for class_name, names in classes.items() for name in names]}
    used = {name for files in chosen.values() for name, _ in files}
    left_out = [name for name in members.names() if tuple(name.split("/")[:len(root)]) == root and name not in used]
    if left_out:
        warnings.warn(f"Left out {len(left_out)} file{'s' if len(left_out) > 1 else ''} of {path} that are in no class folder "
                      f"(e.g. {', '.join(left_out[:3])}); put them into <class>/ folders to use them")
    return chosen


def decode_image_folders(path, folder):
    """Reads the image files of a folder or an archive (see `split_members`); arrays larger than
    the memory budget are written straight to `folder` as .npy files. A tree of class folders
    alone comes back as training images only (`Decoded.x_test` None), for `data` to split."""
    members = Members(path)
    found = split_members(members, path)
    everything = "train" if "train" in found else "all"

    class_names = tuple(sorted({class_name for _, class_name in found[everything]}))
    if len(class_names) < 2:
        raise InputError(f"{path}: train/ has {len(class_names)} class folder; at least two classes are needed")
    for split in ("test", *VALIDATION_FOLDER_NAMES):
        if split in found:
            split_classes = {class_name for _, class_name in found[split]}
            if not split_classes <= set(class_names):
                extra = ", ".join(sorted(split_classes - set(class_names)))
                raise InputError(
                    f"{path}: {split}/ has classes that train/ lacks ({extra}); use the same class folders in both"
                )

    # Two passes, so that memory holds the stored arrays and one photo at a time, never every
    # photo at its original size: the files' headers first (for the storage size), then each
    # image decoded, converted and resized straight into its row.
    sizes, skipped = {}, []
    for files in found.values():
        for name, _ in files:
            sizes[name] = header_size(members, name, skipped)
    side = _storage_side([size for size in sizes.values() if size is not None])
    on_disk = sum(size is not None for size in sizes.values()) * side * side * 3 > stored.memory_budget()
    if on_disk:
        print(f"The decoded images take more than the memory budget: they stay on disk, in {folder}")
    arrays = {}
    for split, files in found.items():
        readable = [(name, class_name) for name, class_name in files if sizes[name] is not None]
        shape = (len(readable), side, side, 3)
        x = stored.StoredArrayWriter(folder / f"x_{split}.npy", shape, np.uint8) if on_disk else np.empty(shape, np.uint8)
        labels = []
        for name, class_name in readable:  # rows that cannot be decoded after all are not written: the next one takes their place
            if _read_into(members, name, x, len(labels), side, skipped):
                labels.append(class_names.index(class_name))
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
    for split in arrays:
        if split not in VALIDATION_FOLDER_NAMES and not len(arrays[split][1]):
            raise InputError(f"{path}: {'the class folders hold' if split == 'all' else split + '/ holds'} "
                             f"no readable images")
    empty = [name for index, name in enumerate(class_names) if not np.any(arrays[everything][1] == index)]
    if empty:
        where = "train/ has" if everything == "train" else "the class folders have"
        raise InputError(f"{path}: {where} no readable images for class {', '.join(empty)}; add images or remove "
                         f"the folder")

    x_train, y_train = arrays[everything]
    x_test, y_test = arrays.get("test", (None, None))
    decoded = Decoded(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=class_names)
    validation = next((name for name in VALIDATION_FOLDER_NAMES if name in arrays and len(arrays[name][1])), None)
    if validation:
        decoded.x_val, decoded.y_val = arrays[validation]
    return decoded


def header_size(members, name, skipped):
    """(width, height) from an image file's header, or None (recorded in `skipped`) when it is none."""
    try:
        with Image.open(io.BytesIO(members.read(name))) as image:
            width, height = image.size
            # EXIF orientations 5-8 turn the image by 90 degrees: a viewer shows it height x width.
            return (height, width) if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8) else (width, height)
    except InputError:
        raise
    except Exception as error:
        skipped.append(f"{name}: {why_unreadable(error)}")
        return None


def _read_into(members, name, x, row, side, skipped):
    """Decodes one file, converts it to RGB and resizes it into `x[row]`; False (and the file in
    `skipped`) when it cannot be decoded after all."""
    try:
        with Image.open(io.BytesIO(members.read(name))) as image:
            image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale when that is enough
            image.load()
            square = _to_square(to_rgb(as_shown(image)), side)
    except InputError:
        raise
    except Exception as error:
        skipped.append(f"{name}: {why_unreadable(error)}")
        return False
    x[row] = square  # outside the `try`: a full disk is not an unreadable image
    return True


def why_unreadable(error):
    """What is wrong with a file Pillow could not read, in words: Pillow's own message for a file
    of no image format names an in-memory buffer ("<_io.BytesIO object at 0x...>"), not the file."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image, or in a format Pillow cannot read"
    return first_line(error)


ORIENTATION_TAG = 0x0112  # EXIF: how the camera was held, i.e. how to turn the stored pixels


def as_shown(image):
    """The image turned and mirrored as its EXIF orientation says (phone photos are often stored
    sideways with a tag saying so), i.e. as a viewer shows it."""
    return ImageOps.exif_transpose(image)


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
            return _to_square(to_rgb(as_shown(image)), side)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path}: not a readable image ({why_unreadable(error)})") from None


def _to_square(image, side):
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)
