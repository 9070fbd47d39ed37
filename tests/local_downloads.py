"""Runs a script with Keras's two downloads (CIFAR-10's python archive, VGG16's ImageNet notop
weights) fetched from a local HTTP server instead of their real origins, for the test of the
download path (the hook lives here, in the tests, not in the project):

    python tests/local_downloads.py BASE_URL SERVED_FOLDER SCRIPT [ARGS...]

Keras's own `keras.utils.get_file` still does the work: it downloads over HTTP, checks the
file's hash and unpacks the archive into KERAS_HOME. Only the origin and the expected hash
change (the files served are the local ones, so the hash is theirs).
"""

import hashlib
import os
import runpy
import sys
from pathlib import Path

base_url, served, script = sys.argv[1:4]
sys.argv = sys.argv[3:]
sys.path.insert(0, str(Path(script).resolve().parent))

import vgg_transfer  # noqa: E402,F401  (loads Keras as the scripts do)
from keras.src.datasets import cifar10  # noqa: E402
from keras.src.utils import file_utils  # noqa: E402

real_get_file = file_utils.get_file


def local_get_file(fname=None, origin=None, *arguments, file_hash=None, **keywords):
    name = origin.rsplit("/", 1)[-1]
    digest = hashlib.sha256((Path(served) / name).read_bytes()).hexdigest()
    return real_get_file(fname, f"{base_url}/{name}", *arguments, file_hash=digest, **keywords)


file_utils.get_file = cifar10.get_file = local_get_file
os.environ.pop("VGG_TRANSFER_SHARED_DATA", None)
runpy.run_path(script, run_name="__main__")
