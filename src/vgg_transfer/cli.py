"""Flags from a script's constants, the flags every script shares, and one-line errors.

Each script keeps its hyperparameters as UPPERCASE constants; every constant becomes a
flag of the same name in kebab case (`EPOCHS` -> `--epochs`), so a user edits the file or
overrides on the command line. The resolved values come back as an `argparse.Namespace`
with lowercase names (`config.epochs`).
"""

import argparse
import math
import sys
import warnings
from pathlib import Path

from vgg_transfer import paths
from vgg_transfer.errors import InputError

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
    "LEARNING_RATE": lambda v: None if math.isfinite(v) and v > 0 else "a positive number, e.g. 1e-3",
    "DROPOUT": lambda v: None if 0 <= v < 1 else "in [0, 1)",
    "PATIENCE": lambda v: None if v >= 1 else "at least 1",
    "UNITS": lambda v: None if v >= 1 else "at least 1",
    "FACTOR": lambda v: None if 0 < v < 1 else "strictly between 0 and 1",
}

# String constants with a fixed set of values: the flag accepts only these.
CHOICES = {
    "LR_SCHEDULE": ("plateau", "cosine"),  # see training.learning_rate_callback
}


def constants(namespace):
    """The UPPERCASE int, float, str and bool constants of a module's `globals()`."""
    return {
        name: value for name, value in namespace.items()
        if name.isupper() and not name.startswith("_") and type(value) in (int, float, str, bool)
    }


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not usage plus message) and exit status 2."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")


def parse_config(description, script_constants, argv=None, prog=None):
    """Parses the command line into the resolved configuration.

    Args:
        description: the script's docstring, shown by --help.
        script_constants: `constants(globals())` of the script; must include SEED.
        argv: the arguments (default `sys.argv[1:]`).

    Returns:
        Namespace with one lowercase attribute per constant plus the common flags `data`,
        `weights`, `out`, `subset`, `quiet`, `mixed_precision` and `distribute`; `config.hyperparameters` maps the constant
        names to their resolved values.

    Raises:
        InputError: an unknown flag, a value of the wrong type, or one out of range.
    """
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
    common.add_argument("--mixed-precision", action="store_true",
                        help="compute in bfloat16 with float32 weights and outputs (fast on recent GPUs, "
                             "slow on most CPUs)")
    common.add_argument("--distribute", action="store_true",
                        help="train data-parallel over every local device (all GPUs, or the CPU devices): "
                             "DataParallel on JAX, MirroredStrategy on TensorFlow; BATCH_SIZE is split "
                             "between the devices")

    hyper = parser.add_argument_group("hyperparameters (the constants at the top of the script)")
    for name, default in script_constants.items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(default, bool):
            hyper.add_argument(flag, dest=name.lower(), action=argparse.BooleanOptionalAction, default=default,
                               help=f"(default: {default})")
        else:
            kind = float if isinstance(default, float) else type(default)
            choices = CHOICES.get(name)
            hyper.add_argument(flag, dest=name.lower(), type=kind, default=default, choices=choices,
                               metavar="{" + ",".join(choices) + "}" if choices else name,
                               help=f"(default: {default})")
    config = parser.parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else argv))
    config.hyperparameters = {name: getattr(config, name.lower()) for name in script_constants}
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
        rule = _RULES.get(name) or next(
            (rule for suffix, rule in _SUFFIX_RULES.items() if name.endswith(suffix)), None
        )
        if rule is None or isinstance(value, (bool, str)):
            continue
        accepted = rule(value)
        if accepted is not None:
            flag = "--" + name.lower().replace("_", "-")
            raise InputError(f"{flag} {value} is out of range; it must be {accepted}")
    if config.subset is not None and config.subset < 1:
        raise InputError(f"--subset {config.subset} is out of range; pass a positive number of images")


def _interrupted_run_summary():
    """Where the interrupted run's best checkpoint is, and how to continue it."""
    from vgg_transfer import runs  # runs imports Keras, which this module does not need

    run = runs.current_run
    if run is None or not run.started:
        return ""
    checkpoints = sorted((run.path / "checkpoints").glob("*.keras"))
    best = f"Best checkpoint so far: {', '.join(map(str, checkpoints))}. " if checkpoints else "No checkpoint yet. "
    return best + "Run the same command again to continue from the last completed epoch. "


def run(main, description, script_constants, argv=None):
    """Parses the flags, runs `main(config)` and turns bad input into one line and status 2.

    Returns the process exit status: 0 on success, 2 on bad input, 130 on Ctrl-C.
    """
    prog = Path(sys.argv[0]).name if argv is None else None
    try:
        config = parse_config(description, script_constants, argv, prog=prog)
        if config.quiet:
            warnings.filterwarnings("ignore", category=UserWarning, module="keras")
        main(config)
    except InputError as error:
        print(f"{prog or 'error'}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog or 'run'}: interrupted. {_interrupted_run_summary()}"
              "Earlier runs in out/ are untouched.", file=sys.stderr)
        return 130
    return 0


def run_tool(main, parse_arguments, argv=None):
    """For the tools with arguments of their own (predict, gradcam, explore_data): runs
    `main(parse_arguments(argv))`; bad input gives one line and status 2.

    Returns the exit status: what `main` returns (None counts as 0), or 2.
    """
    prog = Path(sys.argv[0]).name
    try:
        return main(parse_arguments(argv)) or 0
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
