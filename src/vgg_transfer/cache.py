"""Writing the on-disk caches (decoded images, features) so that a killed run never leaves half a file."""

import os
import warnings

import numpy as np


def save_atomically(path, arrays):
    """Writes `arrays` to `path` via a temporary name and a rename: a dict name -> array as
    .npz, or one array as .npy (which can be read back memory-mapped).

    A failure to write (full disk, read-only folder) is a warning, not an error: the cache
    only saves time, and the next run computes the arrays again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            if isinstance(arrays, dict):
                np.savez(file, **arrays)
            else:
                np.save(file, arrays)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        warnings.warn(f"Could not write the cache {path} ({error}); the next run computes it again.")
