"""CIFAR-10's official python format: its pickled batches, read without running code, whether
in an archive (known by its content, not its name) or a folder.

A pickle may name any function to call while it loads, so a tampered batch could run code:
`ArraysOnlyUnpickler` loads only what the real batches hold (dicts, lists, bytes, strings,
numbers and NumPy arrays).
"""

import codecs
import io
import pickle
import tarfile

import keras
import numpy as np

from vgg_transfer import image_files, paths
from vgg_transfer.errors import InputError, first_line

# The files of CIFAR-10's python-format archive, whatever the archive is called.
CIFAR_BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                     "batches.meta", "readme.html")


def is_python_archive(path):
    """Whether a tar archive is CIFAR-10's python format, by its content: its first file is one
    of CIFAR_BATCH_FILES (only the archive's start is read). An unreadable archive is not: the
    image-folder reader names what is wrong with it, once the weights are checked."""
    try:
        with tarfile.open(path) as archive:
            first = next((member for member in archive if member.isfile() and not image_files.left_by_tools(member.name)), None)
    except (tarfile.TarError, OSError, EOFError):
        return False
    return first is not None and first.name.rsplit("/", 1)[-1] in CIFAR_BATCH_FILES


def decode(path):
    """Reads the pickled batches of the official python-format CIFAR-10."""
    members = image_files.Members(path)
    by_basename = {}
    for name in members.names():
        by_basename.setdefault(name.rsplit("/", 1)[-1], name)
    train_names = [by_basename.get(f"data_batch_{index}") for index in range(1, 6)]
    if None in train_names or "test_batch" not in by_basename:
        raise InputError(
            f"{path} does not hold the CIFAR-10 python batches data_batch_1..5 and test_batch; "
            f"pass {image_files.ACCEPTED_FORMS}"
        )

    def read_batch(name):
        try:
            batch = unpickle(members.read(name), name, path)
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return images, np.asarray(batch[b"labels"], dtype=np.int64)
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"cannot read the CIFAR-10 batch {name} in {path} ({first_line(error)}); download it again") from None

    train = [read_batch(name) for name in train_names]
    x_test, y_test = read_batch(by_basename["test_batch"])
    class_names = image_files.CIFAR10_CLASS_NAMES
    if "batches.meta" in by_basename:
        meta = unpickle(members.read(by_basename["batches.meta"]), by_basename["batches.meta"], path)
        class_names = tuple(name.decode() for name in meta[b"label_names"])
    return image_files.Decoded(x_train=np.concatenate([images for images, _ in train]),
                   y_train=np.concatenate([labels for _, labels in train]),
                   x_test=np.ascontiguousarray(x_test), y_test=y_test, class_names=class_names)


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's batches hold (dicts, lists, bytes, strings, numbers and
    NumPy arrays): a pickle may name any function to call, so a tampered batch could run code."""

    ALLOWED = {
        # (module, name) as NumPy 1 and 2 and Python 3's protocol 2 write them -> what they may load
        **{(module, "_reconstruct"): np.zeros(1).__reduce__()[0]
           for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(module, "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0]
           for module in ("numpy.core.numeric", "numpy._core.numeric")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 in protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks to load {module}.{name}")
        return self.ALLOWED[(module, name)]


def unpickle(content, name, path):
    try:
        return ArraysOnlyUnpickler(io.BytesIO(content), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise InputError(f"{name} in {path} is not a plain CIFAR-10 batch ({error}); it was not loaded, as it could "
                         f"run code: download cifar-10-python.tar.gz again from its source") from None


def download():
    """CIFAR-10 from `keras.datasets.cifar10.load_data()`'s download (kept by Keras in
    ~/.keras/datasets/, or KERAS_HOME), as `image_files.Decoded`."""
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # Keras raises plain Exceptions for network failures.
        raise InputError(
            f"no data found in {paths.in_dir()} and the CIFAR-10 download failed "
            f"({first_line(error)}); put {image_files.ACCEPTED_FORMS} into in/, or pass --data PATH"
        ) from None
    return image_files.Decoded(x_train=x_train, y_train=y_train.reshape(-1).astype(np.int64), x_test=x_test,
                               y_test=y_test.reshape(-1).astype(np.int64), class_names=image_files.CIFAR10_CLASS_NAMES)
