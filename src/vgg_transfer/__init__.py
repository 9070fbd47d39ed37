"""What every script of the project would otherwise copy; the Keras calls that are the lesson
(building VGG16, freezing it, the head, compile, the callbacks, fit) stay in the scripts.

- `cli`: flags from a script's constants, the common flags, the checks before any work, one-line errors.
- `data`: find the data, decode it once (cached), split it, and feed it to `fit` (`Batches`).
- `image_files`: read images from folders and archives (any format Pillow reads).
- `cifar_batches`: CIFAR-10's python-format batches, read safely, or Keras's download.
- `stored`: arrays kept on disk when they do not fit in memory.
- `devices`: the kind of machine (its recipe) and the precision it computes fastest in.
- `models`: VGG16's weights and preprocessing (built-in layers), the mirror, the augmentation.
- `saved_models`: loading the models runs saved, for the tools.
- `features`: frozen-base features, cached on disk.
- `training`: the project's callbacks (exact resumption after an interruption, the time estimate) and the cosine schedule.
- `runs`: run folders that are published only when complete; the environment record.
- `reporting`, `pictures`: every file of a run folder (reports, metrics.json, the saved model), and its pictures.
- `distribute`: data-parallel training over every local device (`--distribute`) or several worker processes.
- `activations`, `gradcam`: what a saved model computes inside; Grad-CAM.
- `paths`, `errors`: where things live; the one exception type for bad input.

Importing the package imports Keras, with the backend's start-up lines hidden: TensorFlow 2.21
writes six lines to the process's stderr as it loads (oneDNN's notice, "Could not find cuda
drivers", and absl's warning twice), before any of its log settings apply
(tensorflow/tensorflow#100442). A student's first line should be the project's, so they go to a
temporary file, shown only if loading fails.
"""

import contextlib
import logging
import os
import sys
import tempfile


@contextlib.contextmanager
def _native_stderr_hidden():
    """What C and C++ code writes to stderr (file descriptor 2) goes to a temporary file while
    the block runs, and is written out after all if the block raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (e.g. pythonw on Windows): nothing to hide
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# Also quietens TensorFlow's C++ logging after it loads (on a CPU-only machine it logs a CUDA
# "error" that is none, "failed call to cuInit"); read once, as TensorFlow loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's CPU tensors come from the C library's malloc by default, which maps every large
# one (a batch of features, a layer's gradient) afresh from the operating system and returns it
# after the step: the kernel spent a third of a rerun's CPU time zeroing pages. Its BFC
# allocator keeps the memory and reuses it (docs/results.md measures both); read as TensorFlow
# loads. Set TF_CPU_ALLOCATOR_USE_BFC=false to go back.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# Keras raises a traceback for a backend it does not know or cannot import; these get one line.
KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")
_backend = os.environ.get("KERAS_BACKEND", "tensorflow")
_program = os.path.basename(sys.argv[0]) or "python"
if _backend not in KERAS_BACKENDS:
    print(f"{_program}: error: KERAS_BACKEND={_backend} is not a Keras backend; set it to one of "
          f"{', '.join(KERAS_BACKENDS[:3])}, or unset it for tensorflow", file=sys.stderr)
    raise SystemExit(2)
# On JAX, what XLA compiles is kept in the cache folder, so a rerun with the same shapes loads
# its programs instead of compiling them again (docs/results.md: a rerun 26 -> 17 s on 2 CPU
# cores); all of them, where JAX by default keeps only those that took over a second to compile,
# none of the many small ones here. Read as JAX loads; safe to delete with the rest of the cache.
if _backend == "jax":
    from vgg_transfer import paths

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(paths.jax_compilation_cache()))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
try:
    with _native_stderr_hidden():
        import keras  # noqa: E402,F401  (loads the backend)
except ImportError as error:
    print(f"{_program}: error: Keras cannot load its backend {_backend} ({error}); pip install {_backend}, or "
          f"set KERAS_BACKEND to an installed one", file=sys.stderr)
    raise SystemExit(2) from None
# TensorFlow's Python-side warnings (tf.function retracing when several models predict in turn)
# say nothing a user can act on.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
