"""Runs a script on a disk that fills up at a chosen file, for the full-disk tests (no small
filesystem is needed, nor the rights to make one):

    python tests/full_disk.py PATTERN[:N] SCRIPT [ARGS...]

From the N-th time (default 1) a file whose name matches PATTERN (shell-style, e.g.
"best.keras") is opened for writing, every write to it fails as on a full disk: `OSError(ENOSPC, "No space left on device", path)`, the file left as far as it got
(empty), as the operating system leaves it. The writes covered are those through Python's
`open` (builtins and io), which NumPy's `save`, `zipfile` (Keras's `.keras` files) and the
project use; HDF5 files written by h5py's C library are not.
"""

import builtins
import errno
import fnmatch
import io
import os
import runpy
import sys
from pathlib import Path

pattern, script = sys.argv[1:3]
pattern, _, first = pattern.partition(":")
first = int(first or 1)
opened_for_writing = []
sys.argv = sys.argv[2:]
sys.path.insert(0, str(Path(script).resolve().parent))
real_open = io.open


class FullDiskFile:
    """A file open for writing whose writes fail with ENOSPC; everything else is the real file's."""

    def __init__(self, file, name):
        self._file, self._name = file, name

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    writelines = write

    def __getattr__(self, attribute):
        return getattr(self._file, attribute)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self._file.close()

    def __iter__(self):
        return iter(self._file)


def open_on_a_full_disk(file, mode="r", *args, **kwargs):
    opened = real_open(file, mode, *args, **kwargs)
    writing = any(flag in mode for flag in "wax+")
    if writing and isinstance(file, (str, os.PathLike)) and fnmatch.fnmatch(os.path.basename(file), pattern):
        opened_for_writing.append(file)
        if len(opened_for_writing) >= first:
            return FullDiskFile(opened, os.fspath(file))
    return opened


builtins.open = io.open = open_on_a_full_disk
runpy.run_path(script, run_name="__main__")
