"""The command line of every script: a flag for each of a training script's constants, the flags
every script shares, the checks made before any work, and bad input reported as one line.

A training script keeps its hyperparameters as UPPERCASE constants at its top and uses them
by name (`epochs=EPOCHS`), as a keras-io example does. It ends with

    if __name__ == "__main__":
        sys.exit(cli.run(main, globals()))

`run` makes each constant a flag of the same name in kebab case (`EPOCHS` -> `--epochs`), with
the comment on the constant's line as its help; binds each constant to the value the command
line gives it, so `main` reads the resolved values by name; and calls `main(setup)`, where
`setup` holds what the common flags chose (the data, the weights, the output folder...).
"""

import argparse
import builtins
import dataclasses
import difflib
import dis
import importlib.util
import io
import math
import os
import shutil
import sys
import tokenize
import types
import warnings
from pathlib import Path

from vgg_transfer import distribute, image_files, paths
from vgg_transfer.errors import FULL_DISK_ERRORS, InputError, first_line

# The accepted values of the scripts' numeric constants, by name: (check, the range in words).
ACCEPTED = {
    "EPOCHS": (lambda value: value >= 1, "at least 1"),
    "FINE_TUNE_EPOCHS": (lambda value: value >= 1, "at least 1"),
    # BatchNormalization normalises each feature over the batch: one image normalises to zeros,
    # and the head learns nothing (measured: docs/results.md).
    "BATCH_SIZE": (lambda value: value >= 2, "at least 2 (BatchNormalization needs two images to normalise)"),
    "LEARNING_RATE": (lambda value: math.isfinite(value) and value > 0, "a positive number, e.g. 1e-3"),
    "FINE_TUNE_LEARNING_RATE": (lambda value: math.isfinite(value) and value > 0, "a positive number, e.g. 1e-4"),
    "WEIGHT_DECAY": (lambda value: math.isfinite(value) and value >= 0, "0 or more"),
    "IMAGE_SIZE": (lambda value: 32 <= value <= 1024, "between 32 (VGG16's minimum) and 1024"),
    "VALIDATION_SPLIT": (lambda value: 0 < value < 1, "strictly between 0 and 1, e.g. 0.1"),
    "TEST_SPLIT": (lambda value: 0 < value < 1, "strictly between 0 and 1, e.g. 0.2"),
    "SEED": (lambda value: 0 <= value < 2**32, "between 0 and 4294967295 (NumPy's and Keras's range)"),
    "HEAD_UNITS": (lambda value: value >= 1, "at least 1"),
    "INPUT_DROPOUT": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "HEAD_DROPOUT": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "CONV_DROPOUT": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "EARLY_STOPPING_PATIENCE": (lambda value: value >= 1, "at least 1"),
    "REDUCE_LR_PATIENCE": (lambda value: value >= 1, "at least 1"),
    "REDUCE_LR_FACTOR": (lambda value: 0 < value < 1, "strictly between 0 and 1"),
}
# String constants with a fixed set of values: anything else is refused with the choices named.
_VGG16_LAYERS = ("block1_conv1", "block1_conv2", "block1_pool", "block2_conv1", "block2_conv2", "block2_pool",
                 "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool", "block4_conv1", "block4_conv2",
                 "block4_conv3", "block4_pool", "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")
CHOICES = {
    "LR_SCHEDULE": ("plateau", "cosine"),
    "FEATURE_LAYER": _VGG16_LAYERS,
    "UNFREEZE_FROM": tuple(name for name in _VGG16_LAYERS if "_conv" in name),
    "PRECISION": ("auto", "float32", "bfloat16", "float16"),
    "MODEL": ("small_cnn", "vgg11_bn", "vgg16_bn"),
}
# Constants that are no flags: HARDWARE has chosen the other constants' values before the flags
# are read; the VGG_TRANSFER_HARDWARE variable sets it.
NOT_FLAGS = ("HARDWARE",)


@dataclasses.dataclass
class Setup:
    """What a training script's `main` gets besides its constants: the common flags, resolved.

    `weights` is what `keras.applications.VGG16(weights=...)` takes (a path, "imagenet" or None);
    `verbose` what `fit` takes; `distribution` describes data parallelism (None on one device);
    `run` is set by the `runs.Run` that the script makes, for the message on Ctrl-C.
    """

    script_name: str
    hyperparameters: dict
    data: str = None
    weights: str = "imagenet"
    weights_source: str = "ImageNet"
    out: str = str(paths.out_dir())
    subset: int = None
    verbose: object = "auto"
    tensorboard: bool = False
    distribute: bool = False
    precision_reason: str = ""
    distribution: dict = None
    resume_key: str = None
    run: object = None

    def settings(self):
        """What makes a run what it is, for metrics.json and the resume key."""
        import keras  # the backend's name; Keras is loaded by then

        return {"script": self.script_name, "hyperparameters": self.hyperparameters, "data": str(self.data),
                "weights": self.weights_source, "subset": self.subset, "precision_reason": self.precision_reason,
                "backend": keras.config.backend(),
                "replicas": self.distribution["replicas"] if self.distribution else 1}


def constants(namespace):
    """The UPPERCASE int, float, str and bool constants of a module's `globals()`."""
    return {name: value for name, value in namespace.items()
            if name.isupper() and not name.startswith("_") and type(value) in (int, float, str, bool)}


def constant_comments(source):
    """{NAME: the comment on the line of `NAME = ...`} from a script's source."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and not token.line.startswith((" ", "#")) and "=" in token.line:
            name = token.line.split("=", 1)[0].strip()
            if name.isupper() and name.isidentifier():
                comments[name] = token.string.lstrip("#").strip()
    return comments


def undefined_constants(script_globals):
    """The UPPERCASE global names that the script's functions and methods read but that the
    script does not define (a constant removed, renamed or misspelled), from their bytecode."""
    used = set()

    def read(code):
        used.update(instruction.argval for instruction in dis.get_instructions(code)
                    if instruction.opname == "LOAD_GLOBAL")
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):
                read(constant)

    for value in list(script_globals.values()):
        functions = [value] if isinstance(value, types.FunctionType) else (
            vars(value).values() if isinstance(value, type) else [])
        for function in functions:
            if isinstance(function, types.FunctionType) and function.__globals__ is script_globals:
                read(function.__code__)
    return sorted(name for name in used
                  if name.isupper() and name not in script_globals and not hasattr(builtins, name))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage plus message) and exit status 2."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def parse(description, script_constants, argv=None, prog=None, comments=None):
    """Parses the command line: (the constants' resolved values by name, the common flags).

    Raises:
        InputError: an unknown flag, a value of the wrong type, or one out of range.
    """
    comments = comments or {}
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = parser.add_argument_group("common to every script")
    common.add_argument("--data", metavar="PATH", default=None,
                        help=f"{image_files.ACCEPTED_FORMS}; default: look in in/, then download CIFAR-10")
    common.add_argument("--weights", default="imagenet",
                        help="'imagenet' (in/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 if present, "
                             "else Keras's download), 'none', or a weights file path (default: imagenet)")
    common.add_argument("--out", metavar="DIR", default=str(paths.out_dir()),
                        help="parent folder of the run folders (default: out/)")
    common.add_argument("--subset", metavar="N", type=int, default=None,
                        help="use N training and N/5 test images, stratified, for quick runs")
    common.add_argument("--quiet", action="store_true", help="hide Keras's progress output")
    common.add_argument("--tensorboard", action="store_true",
                        help="log every epoch for TensorBoard into the run folder's tensorboard/ "
                             "(needs TensorFlow and TensorBoard)")
    common.add_argument("--distribute", action="store_true",
                        help="train data-parallel over every local device (all GPUs, or the CPU devices): "
                             "DataParallel on JAX, MirroredStrategy on TensorFlow; BATCH_SIZE is split "
                             "between the devices")
    hyper = parser.add_argument_group("hyperparameters (the constants at the top of the script)")
    for name, default in script_constants.items():
        if name in NOT_FLAGS:
            continue
        flag = "--" + name.lower().replace("_", "-")
        note = f"{comments[name]} " if comments.get(name) else ""
        if isinstance(default, bool):
            hyper.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{note}(default: {default})")
            continue
        choices = CHOICES.get(name)
        hyper.add_argument(flag, dest=name, type=type(default), default=default, choices=choices,
                           metavar="{" + ",".join(choices) + "}" if choices and len(choices) < 5 else name,
                           help=f"{note}(default: {default})")
    arguments = vars(parser.parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else argv)))
    values = {name: arguments.pop(name, value) for name, value in script_constants.items()}
    _check(values, arguments["subset"])
    return values, arguments


def _join_negative_numbers(argv):
    """`--learning-rate -1e-3` -> `--learning-rate=-1e-3`: argparse takes "-1e-3" for a flag
    and would report a missing value instead of the negative number that the range check names."""
    joined = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _is_negative_number(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def _is_negative_number(token):
    try:
        return token.startswith("-") and float(token) < 0
    except ValueError:
        return False


def _check(values, subset):
    for name, value in values.items():
        flag = "--" + name.lower().replace("_", "-")
        if name in CHOICES and value not in CHOICES[name]:  # a constant edited in the file; flags are checked by argparse
            raise InputError(f"{name} = {value!r} is not one of {', '.join(CHOICES[name])}; change it at the top of "
                             f"the script or pass {flag}")
        if name in ACCEPTED and not isinstance(value, bool):
            accepted, words = ACCEPTED[name]
            if not accepted(value):
                raise InputError(f"{flag} {value} is out of range; it must be {words}")
    if subset is not None and subset < 1:
        raise InputError(f"--subset {subset} is out of range; pass a positive number of images")


def prepare(values, arguments, script_name, loads_weights):
    """The checks and settings every training script needs before its own work, in order of
    cost: the output folder, TensorBoard, the data path, the weights (loaded once to check them,
    for scripts that use them), the precision ("auto" resolved, see `devices.choose_precision`),
    the devices, the resume key. Returns the `Setup`."""
    from vgg_transfer import data, devices, models, runs

    runs.check_writable(arguments["out"])
    if arguments["tensorboard"]:
        missing = [name for name in ("tensorflow", "tensorboard") if importlib.util.find_spec(name) is None]
        if missing:
            raise InputError(f"--tensorboard needs {' and '.join(missing)}, which writes TensorBoard's logs: "
                             f"pip install {' '.join(missing)}")
    data.locate(arguments["data"])  # a data path that is not there is named before any download
    weights, weights_source = (models.resolve_weights(arguments["weights"]) if loads_weights
                               else (None, "none (trained from scratch)"))
    precision, reason = devices.choose_precision(values.get("PRECISION", "auto"))
    if "PRECISION" in values:
        values["PRECISION"] = precision  # what "auto" chose: the script, metrics.json and the resume key see it
    devices.set_precision(precision)
    print(f"Precision: {precision} ({reason})")
    setup = Setup(script_name=script_name, hyperparameters=values, data=arguments["data"], weights=weights,
                  weights_source=weights_source, out=arguments["out"], subset=arguments["subset"],
                  verbose=0 if arguments["quiet"] else "auto", tensorboard=arguments["tensorboard"],
                  distribute=arguments["distribute"], precision_reason=reason)
    # Before any model is built: its variables must be created on every device.
    setup.distribution = distribute.configure(arguments["distribute"], values.get("BATCH_SIZE", 1))
    setup.resume_key = runs.resume_key(setup.settings())
    return setup


def run(main, script_globals, argv=None, pretrained=True):
    """Parses the flags, checks them, binds the script's constants to the values they give, runs
    `main(setup)`, and turns bad input into one line. The constants and Keras's dtype policy are put
    back afterwards, so a script run twice in one process (as the tests do) starts afresh each time.

    Args:
        main: the script's `main(setup)`.
        script_globals: the script's `globals()` (its docstring, constants and file).
        argv: the arguments (default `sys.argv[1:]`).
        pretrained: whether the script loads VGG16's weights (`--weights`, checked before the
            data loads); False for networks trained from scratch.

    Returns:
        The process exit status: 0 on success, 2 on bad input, 1 on a full disk, 130 on Ctrl-C.
    """
    import keras

    script_file = Path(script_globals["__file__"])
    prog = script_file.name
    original, policy = constants(script_globals), keras.config.dtype_policy()
    setup = None
    _one_line_warnings()
    try:
        distribute.refuse_tensorflow_workers()
        undefined = undefined_constants(script_globals)
        if undefined:
            close = difflib.get_close_matches(undefined[0], list(original), n=1)
            hint = f" (is {close[0]} meant?)" if close else ""
            raise InputError(f"{prog} uses {undefined[0]}, which it does not define{hint}; add "
                             f"{undefined[0]} = ... to the constants at its top")
        values, arguments = parse(script_globals.get("__doc__"), original, argv, prog,
                                  constant_comments(script_file.read_text()))
        if "HARDWARE" in values:
            print(f"Recipe for {values['HARDWARE']} (VGG_TRANSFER_HARDWARE=gpu, cpu_amx or cpu chooses another): "
                  + ", ".join(f"{name}={value}" for name, value in values.items() if name not in NOT_FLAGS))
        worker_folder = distribute.worker_folder(arguments)
        setup = prepare(values, arguments, script_file.stem, pretrained)
        script_globals.update(values)
        if arguments["quiet"]:
            warnings.filterwarnings("ignore", category=UserWarning, module="keras")
        main(setup)
        if worker_folder:
            shutil.rmtree(worker_folder, ignore_errors=True)
            print(f"This worker's run folder and caches ({worker_folder}) are removed: worker 0 wrote the run")
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return distribute.exit_status(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted. {_interrupted_run_summary(setup)}"
              "Earlier runs in out/ are untouched.", file=sys.stderr)
        return distribute.exit_status(130)
    except OSError as error:
        if error.errno not in FULL_DISK_ERRORS:
            raise
        print(f"{prog}: error: {_full_disk(error, setup)}", file=sys.stderr)
        return distribute.exit_status(1)
    except Exception as error:
        if not os.environ.get(distribute.JOB_ADDRESSES):
            raise
        # Usually another worker stopped: its connection closed in the middle of a collective.
        print(f"{prog}: error: this worker stopped ({first_line(error)}); probably another worker stopped first. "
              f"{_interrupted_run_summary(setup)}Every worker runs its command again.", file=sys.stderr)
        return distribute.exit_status(1)
    finally:
        script_globals.update(original)
        keras.config.set_dtype_policy(policy)  # the precision, like the constants, is the run's alone
    return 0


def _full_disk(error, setup):
    """One line for a full disk: what was being written, in which folder, and what to do."""
    written = Path(error.filename) if error.filename else None
    run = setup.run if setup else None
    if run is not None and run.started and (written is None or run.path in written.parents):
        what = f"the run folder {run.path}" + (f" ({written.name})" if written else "")
        advice = _interrupted_run_summary(setup, unfinished=written).replace("Run the same command",
                                                                             "Free some space and run it")
        return f"no space left on the device while writing {what}. {advice}Earlier runs in out/ are untouched."
    if written is not None and paths.cache_dir() in written.parents:
        return (f"no space left on the device while writing the cache {written.parent} ({written.name}); free some "
                f"space, or set VGG_TRANSFER_CACHE_DIR to a folder on a disk with room. Earlier runs are untouched.")
    return f"no space left on the device while writing {written or 'a file'}; free some space and run it again."


def _interrupted_run_summary(setup, unfinished=None):
    """Where the interrupted run's best checkpoint is (not `unfinished`, a file being written
    when the run stopped), and how to continue it."""
    run = setup.run if setup else None
    if run is None or not run.started:
        return ""
    checkpoints = sorted(set((run.path / "checkpoints").glob("*.keras")) - {unfinished})
    best = f"Best checkpoint so far: {', '.join(map(str, checkpoints))}. " if checkpoints else "No checkpoint yet. "
    return best + "Run the same command again to continue from the last completed epoch. "


def _one_line_warnings():
    """Warnings print as `warning: <message>`, not as a source location and a line of code."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def run_tool(main, parse_arguments, argv=None):
    """For the tools with arguments of their own (predict, gradcam, explore_data...): runs
    `main(parse_arguments(argv))`; bad input gives one line and status 2.

    Returns the exit status: what `main` returns (None counts as 0), or 2.
    """
    prog = Path(sys.argv[0]).name
    _one_line_warnings()
    try:
        return main(parse_arguments(argv)) or 0
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
