"""Arrays kept on disk when they do not fit in memory.

Data sets whose decoded images exceed the memory budget (a quarter of the machine's memory,
or VGG_TRANSFER_MEMORY_BUDGET_MB) live in `.npy` files in the cache; a `StoredArray` reads the
rows asked for with plain file reads. Not `np.memmap`: the pages of a memory-mapped file count
as the process's resident memory once touched, so streaming a 15 GB array through a memmap
would show a 15 GB process; file reads leave them to the operating system's cache. Training
reads them through `data.Batches`.
"""

import os

import numpy as np

MEMORY_BUDGET_VARIABLE = "VGG_TRANSFER_MEMORY_BUDGET_MB"


def memory_budget():
    """Bytes that arrays may take in memory: VGG_TRANSFER_MEMORY_BUDGET_MB, else a quarter of RAM."""
    if os.environ.get(MEMORY_BUDGET_VARIABLE):
        return int(float(os.environ[MEMORY_BUDGET_VARIABLE]) * 2**20)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class StoredArray:
    """A read-only array in a `.npy` file: `len`, `shape`, `dtype`, and indexing by an int, a
    slice or an array of row indices, which returns an in-memory `numpy` array of those rows."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(file)
            self.offset = file.tell()
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    @property
    def nbytes(self):
        return len(self) * self.row_bytes

    def _rows(self, start, stop, file=None):
        if file is None:
            with open(self.path, "rb") as file:
                return self._rows(start, stop, file)
        data = os.pread(file.fileno(), (stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:])).copy()

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
    without holding the array; `close()` returns the `StoredArray`."""

    def __init__(self, path, shape, dtype):
        self.path, self.shape, self.dtype = str(path), tuple(shape), np.dtype(dtype)
        self.file = open(self.path, "wb")
        np.lib.format.write_array_header_2_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": self.shape})
        self.offset = self.file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.file.truncate(self.offset + self.shape[0] * self.row_bytes)

    def __setitem__(self, key, value):
        start = (key.start or 0) if isinstance(key, slice) else int(key)
        data = np.ascontiguousarray(value, self.dtype).tobytes()
        os.pwrite(self.file.fileno(), data, self.offset + start * self.row_bytes)

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
