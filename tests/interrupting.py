"""Runs a training script and stops it at a chosen point with a real signal, for the
resumption tests (the hook lives here, in the tests, not in the project):

    python tests/interrupting.py WHEN SIGNAL SCRIPT [ARGS...]

WHEN, with N counted over every phase of the run, from 1:
- "end:N": at the end of the N-th epoch, once its state and Keras's backup are saved;
- "between:N": at the end of the N-th epoch, after the project's state is saved and before
  Keras's backup (`BackupAndRestore`) is;
- "within:N": in the N-th epoch, after its second training step.

SIGNAL: a signal's name, e.g. SIGKILL (a crash) or SIGINT (Ctrl-C).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

when, signal_name, script = sys.argv[1:4]
kind, number = when.split(":")
number = int(number)
sys.argv = sys.argv[3:]
sys.path.insert(0, str(Path(script).resolve().parent))

import keras  # noqa: E402  (after the script's folder is on the path, as when it runs itself)

from vgg_transfer import training  # noqa: E402

epochs = {"begun": 0, "ended": 0}


def stop():
    sys.stdout.flush()
    os.kill(os.getpid(), getattr(signal, signal_name))


resume = training.ResumeAfterInterruption
original = {"epoch_begin": resume.on_epoch_begin, "epoch_end": resume.on_epoch_end,
            "batch_end": resume.on_train_batch_end, "backup": keras.callbacks.BackupAndRestore.on_epoch_end}


def on_epoch_begin(self, epoch, logs=None):
    epochs["begun"] += 1
    original["epoch_begin"](self, epoch, logs)


def on_epoch_end(self, epoch, logs=None):
    epochs["ended"] += 1
    original["epoch_end"](self, epoch, logs)
    if kind == "end" and epochs["ended"] == number:
        stop()


def backup(self, epoch, logs=None):
    if kind == "between" and epochs["ended"] == number:
        stop()
    original["backup"](self, epoch, logs)


def on_train_batch_end(self, batch, logs=None):
    original["batch_end"](self, batch, logs)
    if kind == "within" and epochs["begun"] == number and batch == 1:
        stop()


resume.on_epoch_begin, resume.on_epoch_end, resume.on_train_batch_end = on_epoch_begin, on_epoch_end, on_train_batch_end
keras.callbacks.BackupAndRestore.on_epoch_end = backup
runpy.run_path(script, run_name="__main__")
