"""What every script of the project does the same way.

- `data`: find, decode (once, cached) and split CIFAR-10 or any image-folder data set.
- `model`: the VGG16 base with its weights, and the preprocessing inside every model.
- `features`: frozen-base features, cached on disk.
- `training`: `fit` with early stopping, learning-rate reduction, checkpoint and CSV log.
- `reporting`: test-set evaluation and every file of a run folder.
- `runs`: run folders that are published only when complete; the environment record.
- `cli`: flags from a script's constants, the common flags, one-line errors.
"""

import os

# Quieten TensorFlow's C++ logging (on a CPU-only machine it logs a CUDA "error" that is
# none, "failed call to cuInit"). TensorFlow reads this once, as it loads, so every script
# imports this package before Keras. Python exceptions are unaffected. TensorFlow 2.21
# still prints six lines while it loads (oneDNN, "Could not find cuda drivers"), before its
# logging reads any setting (tensorflow/tensorflow#100442): they are harmless.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
