"""The models that runs saved, loaded for the tools (predict, Grad-CAM, feature maps, export).

Every run folder holds its whole model as `model.keras` (raw uint8 images in, class
probabilities out), which plain `keras.saving.load_model` loads anywhere; its metrics.json
names the classes. The subclassed model's `subclassed_model.keras` needs its class, which
transfer_learning_subclassed.py defines and registers: a tool passes `importlib.import_module`,
and it is called with that script's name only when a model file names a class registered under
it, so a tool that loads another model imports no training script (nor probes the devices).
"""

import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np

from vgg_transfer.errors import InputError, first_line

# On the torch backend Keras saves its optimizers under torch-only class paths, which other
# backends cannot import; a model's nested parts keep the optimizer they were compiled with.
# These names make a model saved on any backend load on any other.
PORTABLE_OPTIMIZERS = {"Adam": keras.optimizers.Adam, "AdamW": keras.optimizers.AdamW}

# What a run folder calls its whole model.
MODEL_FILE_NAME = "model.keras"


def saved_run_metrics(model_path):
    """The metrics.json of the run a saved model belongs to (a run folder, or a .keras file
    in one), or {} when there is none."""
    path = Path(model_path)
    metrics_file = (path if path.is_dir() else path.parent) / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def load_saved_classifier(model_path, import_script=None):
    """(model, class names, image side) from a run folder (its model.keras and metrics.json)
    or a .keras file; images given to the model must be (side, side, 3) uint8.

    Loads what plain Keras loads, also saved on another backend (see PORTABLE_OPTIMIZERS), and
    models of classes that a script registers (`keras.saving.register_keras_serializable(package=
    the script's name)`): `import_script(name)` is called first for each such package the file
    names (the tools pass `importlib.import_module`).

    Raises:
        InputError: no model there, or a file that is not a model this project saved.
    """
    path = Path(model_path)
    model_file = path / MODEL_FILE_NAME if path.is_dir() else path
    if not model_file.is_file():
        raise InputError(f"--model {model_path}: no model.keras there; pass a run folder or a .keras file")
    try:
        if import_script is not None:
            for package in registered_packages(model_file) - {"vgg_transfer"}:
                import_script(package)
        model = keras.saving.load_model(model_file, compile=False, custom_objects=PORTABLE_OPTIMIZERS)
    except Exception as error:
        raise InputError(f"--model {model_file} is not a Keras model this project saved ({error})") from None
    try:
        input_shape = tuple(model.input_shape)
    except AttributeError:  # a subclassed model has no symbolic input: the shape it was built for
        input_shape = tuple((model.get_build_config() or {}).get("input_shape") or ())
    if len(input_shape) != 4 or input_shape[1] != input_shape[2] or input_shape[3] != 3:
        raise InputError(f"--model {model_file} takes inputs of shape {input_shape[1:]}, not square RGB images "
                         f"(side, side, 3); pass a model that a training script of this project saved")
    side = input_shape[1]
    try:
        num_classes = model(np.zeros((1, side, side, 3), np.uint8), training=False).shape[-1]
    except Exception as error:
        raise InputError(f"--model {model_file} does not classify uint8 images ({first_line(error)}); pass a model "
                         f"that a training script of this project saved") from None
    names = saved_run_metrics(model_file).get("data", {}).get("class_names", [])
    class_names = names if len(names) == num_classes else [f"class {index}" for index in range(num_classes)]
    return model, class_names, side


def registered_packages(model_file):
    """The packages under which the classes a .keras file names were registered, e.g.
    {"transfer_learning_subclassed"}; empty for a file that is not a .keras archive."""
    try:
        with zipfile.ZipFile(model_file) as archive:
            config = archive.read("config.json").decode()
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError):
        return set()  # Keras's own load names what is wrong with it
    return set(re.findall(r'"registered_name": "(\w+)>', config))


def float32_twin(model):
    """The same model computing in float32 throughout: built from its configuration with every
    mixed precision policy ("mixed_bfloat16", "mixed_float16") replaced by "float32", with its
    weights (float32 under mixed precision too). Serving runtimes need it: LiteRT's stock
    interpreter has no kernel for a bfloat16 or float16 addition (only the Flex delegate does),
    and ONNX runtimes lack many. A float32 model is returned as it is."""
    def float32_policies(config):
        if isinstance(config, list):
            return [float32_policies(item) for item in config]
        if not isinstance(config, dict):
            return config
        return {key: "float32" if key == "dtype" and _is_mixed_policy(value) else float32_policies(value)
                for key, value in config.items()}

    config = keras.saving.serialize_keras_object(model)
    if float32_policies(config) == config:
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # layers a subclassed model builds itself take the global policy
    try:
        twin = keras.saving.deserialize_keras_object(float32_policies(config), custom_objects=PORTABLE_OPTIMIZERS)
    finally:
        keras.config.set_dtype_policy(previous)
    twin.set_weights(model.get_weights())
    return twin


def _is_mixed_policy(dtype):
    """Whether a layer configuration's "dtype" (a policy's name or its serialized form) is mixed."""
    name = dtype.get("config", {}).get("name", "") if isinstance(dtype, dict) else dtype
    return isinstance(name, str) and name.startswith("mixed_")


def images_to_show(files, model_path, side, num_classes, data_path=None, per_class=1):
    """The images a picture of a saved model shows, as (uint8 array (N, side, side, 3), captions):
    the image files given, else the first `per_class` test images of each class of the run's data
    (from its metrics.json), or of `data_path`.

    Raises:
        InputError: an unreadable file, or data whose images are not of the model's size.
    """
    from vgg_transfer import data, image_files  # the loader, only for the tools that show images

    if files:
        return (np.stack([image_files.read_image_file(path, side) for path in files]),
                [Path(path).name for path in files])
    source = saved_run_metrics(model_path).get("data", {}).get("source", "")
    run_data = Path(source.rsplit(" (", 1)[0])
    dataset = data.load_dataset(data_path or (run_data if source and run_data.exists() else None), verbose=False)
    picks = [index for label in range(num_classes) for index in np.flatnonzero(dataset.y_test == label)[:per_class]]
    images = dataset.x_test[picks]
    if images.shape[1] != side:
        raise InputError(f"the model takes {side}-pixel images but {dataset.source} holds "
                         f"{images.shape[1]}-pixel ones; pass the run's data with --data, or image files")
    return images, [f"test #{index}, true: {dataset.class_names[dataset.y_test[index]]}" for index in picks]
