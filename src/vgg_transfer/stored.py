"""Arrays kept on disk when they do not fit in memory.

Data sets whose decoded images exceed the memory budget (a quarter of the machine's memory,
or VGG_TRANSFER_MEMORY_BUDGET_MB) live in `.npy` files in the cache; a `StoredArray` reads the
rows asked for with plain file reads (`seek`, then `np.fromfile`, on every platform). Not `np.memmap`: the pages of a memory-mapped file count
as the process's resident memory once touched, so streaming a 15 GB array through a memmap
would show a 15 GB process; file reads leave them to the operating system's cache. Training
reads them through `data.Batches`.
"""

import os
import sys
from pathlib import Path

import ml_dtypes  # NumPy's bfloat16 dtype, installed with Keras
import numpy as np

MEMORY_BUDGET_VARIABLE = "VGG_TRANSFER_MEMORY_BUDGET_MB"
# NumPy's .npy format has no bfloat16: arrays kept in bfloat16 are stored as their 16-bit
# patterns (uint16) in files whose names end so, and read back as float32, exactly (a bfloat16
# is the top half of a float32).
BFLOAT16_SUFFIX = ".bfloat16.npy"


def memory_budget():
    """Bytes that arrays may take in memory: VGG_TRANSFER_MEMORY_BUDGET_MB, else a quarter of the
    machine's memory (2 GB where the platform does not say how much it has)."""
    if os.environ.get(MEMORY_BUDGET_VARIABLE):
        return int(float(os.environ[MEMORY_BUDGET_VARIABLE]) * 2**20)
    total = total_memory()
    return total // 4 if total else 2 * 2**30


def total_memory():
    """The machine's memory in bytes, from what each platform offers without a library of its
    own (Linux's /proc/meminfo, Windows' GlobalMemoryStatusEx, macOS's hw.memsize), or None."""
    try:
        if Path("/proc/meminfo").is_file():
            line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
            return int(line.split()[1]) * 1024  # in kB
        import ctypes  # the operating system's own calls, below

        if sys.platform == "win32":
            class MemoryStatus(ctypes.Structure):
                _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                            ("available", ctypes.c_ulonglong), *[(name, ctypes.c_ulonglong) for name in
                            ("page_file", "free_page_file", "virtual", "free_virtual", "free_extended")]]

            status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
            return status.total if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) else None
        if sys.platform == "darwin":
            size, length = ctypes.c_uint64(), ctypes.c_size_t(8)
            found = ctypes.CDLL(None).sysctlbyname(b"hw.memsize", ctypes.byref(size), ctypes.byref(length), None, 0)
            return size.value if found == 0 else None
    except (OSError, ValueError, StopIteration, AttributeError):
        return None
    return None


def bfloat16_bits(values):
    """Values rounded to the nearest bfloat16 (ties to even), as uint16 bit patterns."""
    return np.ascontiguousarray(values).astype(ml_dtypes.bfloat16).view(np.uint16)


def _from_bfloat16_bits(bits):
    return bits.view(ml_dtypes.bfloat16).astype(np.float32)


def load(path):
    """A whole .npy file in memory: a NumPy array, or for a *.bfloat16.npy file a `Bfloat16Array`
    (its 16 bits kept, half the memory of float32, read as float32)."""
    array = np.load(path, allow_pickle=False)
    return Bfloat16Array(array) if str(path).endswith(BFLOAT16_SUFFIX) else array


class Bfloat16Array:
    """bfloat16 values in memory as their 16 bits: `len`, `shape`, `nbytes` (the memory they take),
    `chunks`, and indexing as a NumPy array's, which returns float32 rows. NumPy has no bfloat16."""

    dtype = np.dtype(np.float32)

    def __init__(self, bits):
        self.bits, self.shape = bits, bits.shape

    def __len__(self):
        return len(self.bits)

    @property
    def nbytes(self):
        return self.bits.nbytes

    def __getitem__(self, key):
        return _from_bfloat16_bits(self.bits[key])

    def chunks(self, rows=1024):
        """(start, rows start:start+rows as float32), in order."""
        for start in range(0, len(self), rows):
            yield start, self[start:start + rows]


class StoredArray:
    """A read-only array in a `.npy` file: `len`, `shape`, `dtype`, and indexing by an int, a
    slice or an array of row indices, which returns an in-memory `numpy` array of those rows
    (float32 for a *.bfloat16.npy file)."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(file)
            self.offset = file.tell()
        self.shape, self.file_dtype = tuple(shape), np.dtype(dtype)
        self.bfloat16 = self.path.endswith(BFLOAT16_SUFFIX)
        self.dtype = np.dtype(np.float32) if self.bfloat16 else self.file_dtype
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.file_dtype.itemsize

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        """The bytes the array takes in memory once read with `load`."""
        return len(self) * self.row_bytes

    def _rows(self, start, stop, file=None):
        if file is None:
            with open(self.path, "rb") as file:
                return self._rows(start, stop, file)
        file.seek(self.offset + start * self.row_bytes)
        values = (stop - start) * self.row_bytes // self.file_dtype.itemsize
        rows = np.fromfile(file, self.file_dtype, count=values).reshape((stop - start, *self.shape[1:]))
        return _from_bfloat16_bits(rows) if self.bfloat16 else rows.astype(self.dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            return self._rows(index, index + 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._rows(start, max(start, stop)) if step == 1 else self[np.arange(start, stop, step)]
        indices = np.asarray(key)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"a StoredArray takes an int, a slice or row indices, not {key!r}")
        out = np.empty((len(indices), *self.shape[1:]), self.dtype)
        order = np.argsort(indices, kind="stable")  # read in file order, the file opened once
        with open(self.path, "rb") as file:
            for position, index in zip(order, indices[order]):
                out[position] = self._rows(int(index), int(index) + 1, file)[0]
        return out

    def chunks(self, rows=1024):
        """(start, rows start:start+rows as an array), in order."""
        for start in range(0, len(self), rows):
            yield start, self._rows(start, min(start + rows, len(self)))


class StoredArrayWriter:
    """Writes a `.npy` file row by row (`writer[row] = value`, or `writer[start:stop] = rows`),
    without holding the array; `close()` returns the `StoredArray`. With `dtype="bfloat16"` it
    stores the values rounded to bfloat16, for a file to be named *.bfloat16.npy."""

    def __init__(self, path, shape, dtype):
        self.path, self.shape = str(path), tuple(shape)
        self.bfloat16 = dtype == "bfloat16"
        self.dtype = np.dtype(np.uint16) if self.bfloat16 else np.dtype(dtype)
        self.file = open(self.path, "wb")
        np.lib.format.write_array_header_2_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": self.shape})
        self.offset = self.file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.file.truncate(self.offset + self.shape[0] * self.row_bytes)

    def __setitem__(self, key, value):
        start = (key.start or 0) if isinstance(key, slice) else int(key)
        self.file.seek(self.offset + start * self.row_bytes)
        self.file.write((bfloat16_bits(value) if self.bfloat16 else np.ascontiguousarray(value, self.dtype)).tobytes())

    def close(self):
        self.file.close()
        return StoredArray(self.path)


def mirrored(array):
    """Each image of (N, height, width, channels) flipped left to right: a view of an in-memory
    array; for a StoredArray, a stored copy written once next to it (`<name>.mirrored.npy`)."""
    if not isinstance(array, StoredArray):
        return array[:, :, ::-1]
    path = array.path[:-len(".npy")] + ".mirrored.npy"
    if not os.path.isfile(path):
        writer = StoredArrayWriter(path + ".tmp", array.shape, array.dtype)
        for start, chunk in array.chunks():
            writer[start:start + len(chunk)] = chunk[:, :, ::-1]
        writer.close()
        os.replace(path + ".tmp", path)
    return StoredArray(path)


def take(array, indices, path):
    """Rows `indices` of `array`: in memory for an in-memory array, else written to `path` and
    returned as a `StoredArray`, a chunk at a time."""
    if not isinstance(array, StoredArray):
        return np.ascontiguousarray(array[indices])
    writer = StoredArrayWriter(path, (len(indices), *array.shape[1:]), array.dtype)
    for start in range(0, len(indices), 1024):
        writer[start:start + 1024] = array[indices[start:start + 1024]]
    return writer.close()
