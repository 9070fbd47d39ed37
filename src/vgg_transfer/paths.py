"""Where the project keeps things: `in/` (data a user brings), `out/` (runs), the caches.

Paths are relative to the project, not to the working directory, so the scripts work from
anywhere. Environment variables move them (the tests use this to stay in temporary
folders): VGG_TRANSFER_IN_DIR, VGG_TRANSFER_CACHE_DIR.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def in_dir():
    return Path(os.environ.get("VGG_TRANSFER_IN_DIR", PROJECT_ROOT / "in"))


def out_dir():
    return PROJECT_ROOT / "out"


def cache_dir():
    """Decoded images, extracted features and on JAX compiled programs; safe to delete at any time."""
    return Path(os.environ.get("VGG_TRANSFER_CACHE_DIR", in_dir() / ".cache"))


def jax_compilation_cache():
    """The programs XLA compiled on the JAX backend, loaded again by a rerun."""
    return cache_dir() / "jax-compiled"
