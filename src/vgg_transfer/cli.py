"""The command line of every script: its constants become flags, the flags every script shares,
the checks made before any work, and bad input reported as one line.

Each training script keeps its hyperparameters as UPPERCASE constants; every constant becomes
a flag of the same name in kebab case (`EPOCHS` -> `--epochs`), with the constant's comment
as its help, so a user edits the file or overrides on the command line. The script's `main`
receives the resolved values as `config` (`config.epochs`).
"""

import argparse
import ast
import difflib
import importlib.util
import io
import math
import os
import shutil
import sys
import tempfile
import tokenize
import warnings
from pathlib import Path

from vgg_transfer import JOB_ADDRESSES, paths
from vgg_transfer.errors import InputError, first_line

# Checks shared by every script, by constant name. Each takes the value and returns None
# when it is fine, else the accepted range in words.
_RULES = {
    "EPOCHS": lambda v: None if v >= 1 else "at least 1",
    "BATCH_SIZE": lambda v: None if v >= 1 else "at least 1",
    "IMAGE_SIZE": lambda v: None if 32 <= v <= 1024 else "between 32 (VGG16's minimum) and 1024",
    "VALIDATION_SPLIT": lambda v: None if 0 < v < 1 else "strictly between 0 and 1, e.g. 0.1",
    "SEED": lambda v: None if v >= 0 else "0 or more",
}
_SUFFIX_RULES = {
    "EPOCHS": lambda v: None if v >= 1 else "at least 1",
    "LEARNING_RATE": lambda v: None if math.isfinite(v) and v > 0 else "a positive number, e.g. 1e-3",
    "DROPOUT": lambda v: None if 0 <= v < 1 else "in [0, 1)",
    "PATIENCE": lambda v: None if v >= 1 else "at least 1",
    "UNITS": lambda v: None if v >= 1 else "at least 1",
    "FACTOR": lambda v: None if 0 < v < 1 else "strictly between 0 and 1",
    "SMOOTHING": lambda v: None if 0 <= v < 1 else "in [0, 1)",
    "DECAY": lambda v: None if v >= 0 else "0 or more",
}

# String constants with a fixed set of values: anything else is refused with the choices named.
_VGG16_LAYERS = ("block1_conv1", "block1_conv2", "block1_pool", "block2_conv1", "block2_conv2", "block2_pool",
                 "block3_conv1", "block3_conv2", "block3_conv3", "block3_pool", "block4_conv1", "block4_conv2",
                 "block4_conv3", "block4_pool", "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")
CHOICES = {
    "LR_SCHEDULE": ("plateau", "cosine"),
    "FEATURE_LAYER": _VGG16_LAYERS,
    "UNFREEZE_FROM": tuple(name for name in _VGG16_LAYERS if "_conv" in name),
}

# What `config` holds besides the constants: the common flags, and what `run` adds.
COMMON = ("data", "weights", "weights_source", "out", "subset", "quiet", "mixed_precision", "distribute",
          "tensorboard", "verbose", "hyperparameters", "settings", "resume_key", "script_name")
# Constants that are no flags: HARDWARE ("gpu" or "cpu", see devices.hardware) has already chosen
# the other constants' values when the flags are read; the VGG_TRANSFER_HARDWARE variable sets it.
NOT_FLAGS = ("HARDWARE",)


def constants(namespace):
    """The UPPERCASE int, float, str and bool constants of a module's `globals()`."""
    return {
        name: value for name, value in namespace.items()
        if name.isupper() and not name.startswith("_") and type(value) in (int, float, str, bool)
    }


def constant_comments(source):
    """{NAME: the comment on the line of `NAME = ...`, or the comment lines just above it}."""
    comments, above = {}, []
    lines = source.splitlines()
    inline = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            inline[token.start[0]] = token.string.lstrip("#").strip()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(inline.get(number, ""))
            continue
        name = stripped.split("=", 1)[0].strip() if "=" in stripped and not line.startswith(" ") else ""
        if name.isupper() and name.isidentifier():
            comments[name] = inline.get(number) or " ".join(above)
        above = []
    return comments


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage plus message) and exit status 2."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def parse_config(description, script_constants, argv=None, prog=None, comments=None):
    """Parses the command line into the resolved configuration.

    Args:
        description: the script's docstring, shown by --help.
        script_constants: `constants(globals())` of the script; must include SEED.
        argv: the arguments (default `sys.argv[1:]`).
        comments: {NAME: help text} for the constants' flags (see `constant_comments`).

    Returns:
        Namespace with one lowercase attribute per constant plus the common flags `data`,
        `weights`, `out`, `subset`, `quiet`, `mixed_precision` and `distribute`, `verbose`
        (Keras's progress-bar setting), and `hyperparameters` (constant name -> resolved value).

    Raises:
        InputError: an unknown flag, a value of the wrong type, or one out of range.
    """
    comments = comments or {}
    parser = OneLineParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = parser.add_argument_group("common to every script")
    common.add_argument("--data", metavar="PATH", default=None,
                        help="cifar-10-python.tar.gz, a cifar-10-batches-py/ folder, or an image-folder tree "
                             "ROOT/{train,test}/<class>/ (folder or .tar.gz); default: look in in/, then download")
    common.add_argument("--weights", default="imagenet",
                        help="'imagenet' (in/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 if present, "
                             "else Keras's download), 'none', or a weights file path (default: imagenet)")
    common.add_argument("--out", metavar="DIR", default=str(paths.out_dir()),
                        help="parent folder of the run folders (default: out/)")
    common.add_argument("--subset", metavar="N", type=int, default=None,
                        help="use N training and N/5 test images, stratified, for quick runs")
    common.add_argument("--quiet", action="store_true", help="hide Keras's progress output")
    on_a_gpu = script_constants.get("HARDWARE") == "gpu"
    common.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=on_a_gpu,
                        help="compute in bfloat16 with float32 weights and outputs (fast on recent GPUs, "
                             f"slow on most CPUs; default: on with a GPU's recipe, so {on_a_gpu} here)")
    common.add_argument("--tensorboard", action="store_true",
                        help="log every epoch for TensorBoard into the run folder's tensorboard/ (needs TensorFlow)")
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
            hyper.add_argument(flag, dest=name.lower(), action=argparse.BooleanOptionalAction, default=default,
                               help=f"{note}(default: {default})")
        else:
            kind = float if isinstance(default, float) else type(default)
            choices = CHOICES.get(name)
            hyper.add_argument(flag, dest=name.lower(), type=kind, default=default, choices=choices,
                               metavar="{" + ",".join(choices) + "}" if choices and len(choices) < 5 else name,
                               help=f"{note}(default: {default})")
    config = parser.parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else argv))
    for name in NOT_FLAGS:
        if name in script_constants:
            setattr(config, name.lower(), script_constants[name])
    config.hyperparameters = {name: getattr(config, name.lower()) for name in script_constants}
    config.verbose = 0 if config.quiet else "auto"
    _validate(config)
    return config


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


def _validate(config):
    for name, value in config.hyperparameters.items():
        flag = "--" + name.lower().replace("_", "-")
        if name in CHOICES and value not in CHOICES[name]:  # a constant edited in the file; flags are checked by argparse
            raise InputError(f"{name} = {value!r} is not one of {', '.join(CHOICES[name])}; change it at the top of "
                             f"the script or pass {flag}")
        rule = _RULES.get(name) or next(
            (rule for suffix, rule in _SUFFIX_RULES.items() if name.endswith(suffix)), None
        )
        if rule is None or isinstance(value, (bool, str)):
            continue
        accepted = rule(value)
        if accepted is not None:
            raise InputError(f"{flag} {value} is out of range; it must be {accepted}")
    if config.subset is not None and config.subset < 1:
        raise InputError(f"--subset {config.subset} is out of range; pass a positive number of images")


def config_names_used(source):
    """The attribute names that the script's functions (not its classes' methods) read from
    their `config` argument."""
    functions = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
                 and "config" in [argument.arg for argument in node.args.args]]
    return {node.attr for function in functions for node in ast.walk(function)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config"}


def check_config_names(used, script_constants, prog):
    """Raises InputError, naming it, for the first `config.<name>` that the script reads but
    whose constant it lacks (removed, renamed or misspelled): found at start-up, not mid-run."""
    known = {name.lower() for name in script_constants} | set(COMMON)
    for name in sorted(used - known):
        close = difflib.get_close_matches(name.upper(), list(script_constants), n=1)
        hint = f" (is {close[0]} meant?)" if close else ""
        raise InputError(f"{prog} uses config.{name}, but has no constant {name.upper()}{hint}; add "
                         f"{name.upper()} = ... to the constants at its top")


def hardware_choice(source, script_constants):
    """One line saying which recipe the run uses: the constants whose value depends on HARDWARE
    (written `NAME = ... if HARDWARE == ... else ...`), or None for a script with one recipe."""
    if "HARDWARE" not in script_constants:
        return None
    chosen = [node.targets[0].id for node in ast.parse(source).body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.IfExp)
              and "HARDWARE" in {name.id for name in ast.walk(node.value.test) if isinstance(name, ast.Name)}]
    hardware = script_constants["HARDWARE"]
    if not chosen:
        return f"Recipe: the same values on a CPU and a GPU (this machine: {hardware.upper()})"
    other = "gpu" if hardware == "cpu" else "cpu"
    return (f"Recipe for a {hardware.upper()}: {', '.join(f'{name}={script_constants[name]}' for name in chosen)} "
            f"(VGG_TRANSFER_HARDWARE={other} chooses the {other.upper()} values; flags override either)")


def _interrupted_run_summary():
    """Where the interrupted run's best checkpoint is, and how to continue it."""
    from vgg_transfer import runs  # runs imports Keras, which this module does not need

    run = runs.current_run
    if run is None or not run.started:
        return ""
    checkpoints = sorted((run.path / "checkpoints").glob("*.keras"))
    best = f"Best checkpoint so far: {', '.join(map(str, checkpoints))}. " if checkpoints else "No checkpoint yet. "
    return best + "Run the same command again to continue from the last completed epoch. "


def _one_line_warnings():
    """Warnings print as `warning: <message>`, not as a source location and a line of code."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def prepare(config, used, script_name):
    """The checks and settings every training script needs before its own work, in order of
    cost: the output folder, the data path, the weights (loaded once to check them, and only
    for scripts that read `config.weights`), precision, devices, the resume key."""
    from vgg_transfer import data, distribute, models, runs  # Keras loads here, after the flags are fine

    runs.check_writable(config.out)
    if config.tensorboard and importlib.util.find_spec("tensorflow") is None:
        raise InputError("--tensorboard needs TensorFlow, which writes TensorBoard's logs: pip install tensorflow")
    data.locate(config.data)  # a data path that is not there is named before any download
    config.weights, config.weights_source = (models.resolve_weights(config.weights) if "weights" in used
                                             else (None, "none (trained from scratch)"))
    runs.set_precision(config.mixed_precision)
    distribute.configure(config.distribute, getattr(config, "batch_size", 1))  # before any model is built
    config.script_name = script_name
    config.settings = runs.settings(script_name, config.hyperparameters, config.data, config.weights_source,
                                    config.subset, config.mixed_precision)
    config.resume_key = runs.resume_key(config.settings)


def run(main, script_globals, argv=None):
    """Parses the flags, checks them, runs `main(config)`, and turns bad input into one line.

    Args:
        main: the script's `main(config)`.
        script_globals: the script's `globals()` (its docstring, constants and file).
        argv: the arguments (default `sys.argv[1:]`).

    Returns:
        The process exit status: 0 on success, 2 on bad input, 130 on Ctrl-C.
    """
    script_file = Path(script_globals["__file__"])
    prog = script_file.name
    source = script_file.read_text()
    script_constants = constants(script_globals)
    _one_line_warnings()
    try:
        config = parse_config(script_globals.get("__doc__"), script_constants, argv, prog=prog,
                              comments=constant_comments(source))
        used = config_names_used(source)
        check_config_names(used, script_constants, prog)
        choice = hardware_choice(source, script_constants)
        if choice:
            print(choice)
        worker_folder = _worker_folder(config)
        prepare(config, used, script_file.stem)
        if config.quiet:
            warnings.filterwarnings("ignore", category=UserWarning, module="keras")
        main(config)
        if worker_folder:
            shutil.rmtree(worker_folder, ignore_errors=True)
            print(f"This worker's run folder and caches ({worker_folder}) are removed: worker 0 wrote the run")
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return _exit(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted. {_interrupted_run_summary()}"
              "Earlier runs in out/ are untouched.", file=sys.stderr)
        return _exit(130)
    except Exception as error:
        if not os.environ.get(JOB_ADDRESSES):
            raise
        # Usually another worker stopped: its connection closed in the middle of a collective.
        print(f"{prog}: error: this worker stopped ({first_line(error)}); probably another worker stopped first. "
              f"{_interrupted_run_summary()}Every worker runs its command again.", file=sys.stderr)
        return _exit(1)
    return 0


def _worker_folder(config):
    """With several worker processes, the run folder and caches of a worker other than the
    chief (worker 0): a folder of its own, the same for a rerun (which resumes from it) and
    removed when the run completes; `config.out` and the cache are moved there. Else None."""
    distribute = sys.modules.get("vgg_transfer.distribute")
    if not os.environ.get(JOB_ADDRESSES) or distribute is None or distribute.worker_index == 0:
        return None
    port = os.environ[JOB_ADDRESSES].split(",")[0].rsplit(":", 1)[-1]
    folder = Path(tempfile.gettempdir()) / f"vgg-transfer-worker-{port}-{distribute.worker_index}"
    config.out = str(folder / "out")
    os.environ["VGG_TRANSFER_CACHE_DIR"] = str(folder / "cache")
    return folder


def _exit(status):
    """`status` to return; with several worker processes, the process ends here instead: JAX's
    shutdown would wait minutes for workers that stopped, then abort with a stack trace."""
    if os.environ.get(JOB_ADDRESSES):
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)
    return status


def run_tool(main, parse_arguments, argv=None):
    """For the tools with arguments of their own (predict, gradcam, explore_data): runs
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
