"""Exports a run's model for serving, through Keras's `model.export`.

The exported model computes in float32, whatever precision the run trained in (LiteRT's stock
interpreter runs no bfloat16 or float16 arithmetic), and takes raw RGB images, uint8 (batch, side, side, 3) with the side the run's
model takes, and returns class probabilities (batch, classes): VGG16's preprocessing and the
resizing are inside it. Its folder also holds `class_names.json` (the probabilities' order)
and `README.md` (how to call it). Nothing is written into the run folder.

    python src/export.py out/transfer_learning/20261125-090235 --format tf_saved_model
    python src/export.py RUN_DIR --format onnx --out exported/model-onnx
    python src/export.py RUN_DIR --format litert

Formats: `tf_saved_model` (needs TensorFlow), `onnx` (needs tf2onnx on the TensorFlow backend,
jax2onnx on JAX, onnxscript on torch), `litert` (needs TensorFlow, and the TensorFlow or torch
backend; TensorFlow 2.20 or later). A converter that is not installed, or too old, gets one line
naming the package to install.
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from vgg_transfer import cli, paths, runs, saved_models
from vgg_transfer.errors import InputError

FORMATS = {  # format: (file or folder name, packages its converter needs)
    "tf_saved_model": ("saved_model", "tensorflow"),
    "onnx": ("model.onnx", "tf2onnx (TensorFlow backend), jax2onnx (JAX) or onnxscript (torch)"),
    "litert": ("model.tflite", "tensorflow"),
}
# TensorFlow's LiteRT converter before 2.20 aborts the whole process on Keras 3's models, with no
# Python error to catch (measured: TensorFlow 2.16.1 with Keras 3.13, "LLVM ERROR: Failed to infer
# result type(s)"; 2.20.0 and 2.21 export and run; 2.17 to 2.19 not tried).
LITERT_MINIMUM_TENSORFLOW = (2, 20)
HOW_TO_CALL = {
    "tf_saved_model": """```python
import numpy as np, tensorflow as tf
served = tf.saved_model.load("{folder}/saved_model")
probabilities = served.signatures["serving_default"](tf.constant(images))  # uint8 (n, {side}, {side}, 3)
probabilities = next(iter(probabilities.values())).numpy()
```""",
    "onnx": """```python
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession("{folder}/model.onnx")
probabilities = session.run(None, {{session.get_inputs()[0].name: images}})[0]  # uint8 (n, {side}, {side}, 3)
```""",
    "litert": """```python
import numpy as np, tensorflow as tf  # or ai_edge_litert.interpreter
interpreter = tf.lite.Interpreter("{folder}/model.tflite")
runner = interpreter.get_signature_runner()
probabilities = next(iter(runner(**{{runner.get_input_details().popitem()[0]: images}}).values()))
```""",
}


def parse_arguments(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder (with model.keras and metrics.json)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="the folder to write (default: out/export/<run>-<format>-<timestamp>)")
    return parser.parse_args(argv)


def main(arguments):
    if arguments.format == "litert":  # before any work: such a converter would end the process
        _check_litert_converter()
    run_dir = Path(arguments.run)
    model, class_names, side = saved_models.load_saved_classifier(run_dir, import_script=importlib.import_module)
    model = saved_models.float32_twin(model)
    default = paths.out_dir() / "export" / f"{run_dir.name}-{arguments.format}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = Path(arguments.out or default)
    if run_dir.is_dir() and folder.resolve().is_relative_to(run_dir.resolve()):
        raise InputError(f"--out {folder} is inside the run folder {run_dir}, which stays as the run wrote it; "
                         f"pass --out DIR elsewhere")
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"--out {folder} is not empty; pass a new folder")
    runs.check_writable(folder)
    name, packages = FORMATS[arguments.format]
    import keras

    signature = [keras.InputSpec(shape=(None, side, side, 3), dtype="uint8")]
    try:
        model.export(str(folder / name), format=arguments.format, input_signature=signature, verbose=False)
    except ImportError as error:
        raise InputError(f"exporting to {arguments.format} needs {packages}, which is not installed "
                         f"({error}); pip install it and run again") from None
    except ValueError as error:  # Keras exports LiteRT on TensorFlow and torch only
        if "backend" not in str(error):
            raise
        raise InputError(f"exporting to {arguments.format} needs the TensorFlow or torch backend; run it with "
                         f"KERAS_BACKEND=tensorflow") from None
    (folder / "class_names.json").write_text(json.dumps(class_names, indent=2) + "\n")
    (folder / "README.md").write_text(
        f"# {run_dir.name} as {arguments.format}\n\nExported from `{run_dir}` with `python src/export.py`. Input: "
        f"raw RGB images, uint8, shape (n, {side}, {side}, 3), values 0 to 255 (resize your images to {side}x{side} "
        f"first); VGG16's preprocessing is inside. Output: class probabilities (n, {len(class_names)}), in the "
        f"order of `class_names.json`.\n\n" + HOW_TO_CALL[arguments.format].format(folder=folder, side=side) + "\n")
    print(f"Exported {run_dir} as {arguments.format} to {folder / name}")


def tensorflow_too_old_for_litert():
    """TensorFlow's version when it is older than LITERT_MINIMUM_TENSORFLOW, else None (also
    without TensorFlow: then model.export names the missing package)."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    version = tuple(int(part) for part in tf.__version__.split(".")[:2] if part.isdigit())
    return tf.__version__ if version < LITERT_MINIMUM_TENSORFLOW else None


def _check_litert_converter():
    """One line instead of the converter's abort on a TensorFlow older than LITERT_MINIMUM_TENSORFLOW."""
    too_old = tensorflow_too_old_for_litert()
    if too_old:
        minimum = ".".join(map(str, LITERT_MINIMUM_TENSORFLOW))
        raise InputError(f"exporting to litert needs TensorFlow {minimum} or later (this is {too_old}, whose "
                         f"converter aborts on Keras 3 models); pip install -U tensorflow, or export tf_saved_model "
                         f"or onnx")


if __name__ == "__main__":
    sys.exit(cli.run_tool(main, parse_arguments))
