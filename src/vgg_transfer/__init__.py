"""What every script of the project would otherwise copy; the Keras calls that are the lesson
(building VGG16, freezing it, the head, compile, the callbacks, fit) stay in the scripts.

- `cli`: flags from a script's constants, the common flags, the checks before any work, one-line errors.
- `data`: find, decode (once, cached) and split CIFAR-10 or any image-folder data set.
- `models`: VGG16's weights and preprocessing (built-in layers), augmentation, loading saved models.
- `features`: frozen-base features, cached on disk.
- `training`: the resume-after-interruption callback and the cosine schedule.
- `reporting`: every file of a run folder (reports, pictures, the saved model).
- `runs`: run folders that are published only when complete; the environment record.
- `distribute`: data-parallel training over every local device (`--distribute`) or several worker processes.
- `gradcam`, `legacy`, `cache`, `paths`, `errors`: Grad-CAM, old saved models, helpers.
"""

import logging
import os
import sys

# Quieten TensorFlow's C++ logging (on a CPU-only machine it logs a CUDA "error" that is
# none, "failed call to cuInit"). TensorFlow reads this once, as it loads, so every script
# imports this package before Keras. Python exceptions are unaffected. TensorFlow 2.21
# still prints six lines while it loads (oneDNN, "Could not find cuda drivers"), before its
# logging reads any setting (tensorflow/tensorflow#100442): they are harmless.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's Python-side warnings (tf.function retracing when several models predict in turn)
# say nothing a user can act on.
logging.getLogger("tensorflow").setLevel(logging.ERROR)

# Keras's variable naming every worker process; set, the scripts train across them (JAX).
JOB_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"

# Training across worker processes: they must connect before anything lists JAX's devices,
# which every script's constants do (HARDWARE), so it happens as the package loads.
if os.environ.get(JOB_ADDRESSES):
    from vgg_transfer import distribute
    from vgg_transfer.errors import first_line

    try:
        distribute.connect_workers()
    except (ValueError, RuntimeError) as error:  # InputError among them: variables missing or wrong
        sys.exit(f"error: {first_line(error)}")
elif os.environ.get("TF_CONFIG"):
    import keras

    if keras.config.backend() == "tensorflow":  # rather than train a separate copy on every worker
        sys.exit("error: TF_CONFIG is set, but training across TensorFlow workers (MultiWorkerMirroredStrategy) "
                 "is not supported yet; train across workers on JAX (docs/design.md, 'Training on several machines')")
