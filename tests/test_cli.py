"""Flags from constants, validation, and bad input as one line with exit status 2."""

import os
import subprocess
import sys

import keras
import pytest

from vgg_transfer import cli
from vgg_transfer.errors import InputError

from conftest import PROJECT_ROOT

CONSTANTS = {"EPOCHS": 30, "LEARNING_RATE": 1e-3, "IMAGE_SIZE": 32, "VALIDATION_SPLIT": 0.1, "SEED": 42,
             "FEATURE_LAYER": "block4_pool", "HEAD_DROPOUT": 0.5, "AUGMENT": True}


def test_flags_override_the_constants_of_the_same_name():
    values, common = cli.parse("doc", CONSTANTS, ["--epochs", "5", "--learning-rate", "0.01", "--no-augment",
                                                  "--feature-layer", "block5_pool", "--seed", "1"])
    assert (values["EPOCHS"], values["LEARNING_RATE"], values["AUGMENT"], values["FEATURE_LAYER"], values["SEED"]) == (
        5, 0.01, False, "block5_pool", 1)
    assert values["IMAGE_SIZE"] == 32 and set(values) == set(CONSTANTS)
    assert (common["data"], common["weights"], common["subset"], common["quiet"]) == (None, "imagenet", None, False)


def test_help_lists_every_constant_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse("The description.", CONSTANTS, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--learning-rate", "--image-size", "--validation-split", "--seed",
                 "--feature-layer", "--head-dropout", "--data", "--weights", "--out", "--subset", "--quiet"):
        assert flag in text
    assert "(default: 30)" in text and "The description." in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs 0 is out of range"),
        (["--image-size", "16"], "--image-size 16 is out of range"),
        (["--validation-split", "1.0"], "--validation-split 1.0 is out of range"),
        (["--learning-rate", "-0.1"], "--learning-rate -0.1 is out of range"),
        (["--head-dropout", "1.5"], "--head-dropout 1.5 is out of range"),
        (["--epochs", "ten"], "invalid int value"),
        (["--unknown"], "unrecognized arguments"),
        (["--subset", "0"], "--subset 0 is out of range"),
    ],
)
def test_invalid_values_are_rejected_with_the_flag_named(argv, message):
    with pytest.raises(InputError, match=message):
        cli.parse("doc", CONSTANTS, argv)


SCRIPT = '''"""A script as the training scripts are written."""

EPOCHS = 30  # at most; early stopping may end training sooner
LEARNING_RATE = 1e-3  # the rate Adam starts from
REDUCE_LR_PATIENCE = 1
FEATURE_LAYER = "block4_pool"
SEED = 42
PRECISION = "auto"


def main(setup):
    print(EPOCHS, REDUCE_LR_PATIENCE, FEATURE_LAYER, setup.subset)
'''


def _script_globals(tmp_path, source=SCRIPT):
    """What cli.run gets from a script: its globals, with its file (for the comments)."""
    path = tmp_path / "a_script.py"
    path.write_text(source)
    namespace = {"__file__": str(path), "__name__": "a_script"}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace


def test_the_flags_rebind_the_constants_that_main_reads_by_name_for_one_run(tmp_path, capsys):
    script = _script_globals(tmp_path)
    argv = ["--epochs", "5", "--feature-layer", "block3_pool", "--subset", "40", "--out", str(tmp_path)]
    assert cli.run(script["main"], script, argv=[*argv, "--precision", "bfloat16"], pretrained=False) == 0
    assert "5 1 block3_pool 40" in capsys.readouterr().out.splitlines()
    assert (script["EPOCHS"], script["FEATURE_LAYER"]) == (30, "block4_pool")  # the file's values again afterwards
    assert keras.config.dtype_policy().name == "float32"  # the run's precision was the run's alone
    assert cli.run(script["main"], script, argv=["--out", str(tmp_path)], pretrained=False) == 0
    assert "30 1 block4_pool None" in capsys.readouterr().out.splitlines()


def test_run_turns_bad_input_into_one_line_and_status_2(tmp_path, capsys):
    def main(setup):
        raise InputError("the data is missing; put it in in/")

    script = _script_globals(tmp_path)
    assert cli.run(main, script, argv=["--out", str(tmp_path)], pretrained=False) == 2
    assert cli.run(main, script, argv=["--epochs", "0"], pretrained=False) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "the data is missing" in lines[0] and "--epochs 0" in lines[1]


def test_help_shows_each_constants_comment(tmp_path, capsys):
    script = _script_globals(tmp_path)
    with pytest.raises(SystemExit):
        cli.run(script["main"], script, argv=["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--epochs EPOCHS at most; early stopping may end training sooner (default: 30)" in text
    assert "--learning-rate LEARNING_RATE the rate Adam starts from (default: 0.001)" in text


def test_a_constant_that_the_script_lacks_is_named_at_start_up(tmp_path, capsys):
    renamed = SCRIPT.replace("REDUCE_LR_PATIENCE = 1", "REDUCE_LR_PATIENCES = 1")
    script = _script_globals(tmp_path, renamed)
    ran = []
    assert cli.run(lambda setup: ran.append(setup) or script["main"](setup), script, argv=["--out", str(tmp_path)],
                   pretrained=False) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert not ran  # before any work
    assert line == ("a_script.py: error: a_script.py uses REDUCE_LR_PATIENCE, which it does not define (is "
                    "REDUCE_LR_PATIENCES meant?); add REDUCE_LR_PATIENCE = ... to the constants at its top")


def test_a_constant_with_a_fixed_set_of_values_is_checked_in_the_file_too(tmp_path, capsys):
    script = _script_globals(tmp_path, SCRIPT.replace('"block4_pool"', '"block4_pol"'))
    assert cli.run(script["main"], script, argv=["--out", str(tmp_path)], pretrained=False) == 2
    assert "FEATURE_LAYER = 'block4_pol' is not one of block1_conv1" in capsys.readouterr().err
    with pytest.raises(InputError, match="--feature-layer: invalid choice: 'block9_pool'"):
        cli.parse("doc", {"FEATURE_LAYER": "block4_pool", "SEED": 0}, ["--feature-layer", "block9_pool"])


def _script(*args, out_dir):
    """The main job started with `args` (a process, to `communicate` with)."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "src" / "transfer_learning.py"), *args,
                             "--out", str(out_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment)


@pytest.mark.slow
def test_main_script_bad_input_exits_2_with_one_line_and_leaves_earlier_runs(tmp_path):
    earlier = tmp_path / "out" / "transfer_learning" / "20250101-000000"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text("{}")
    blocked_out = tmp_path / "a-file"
    blocked_out.write_text("")
    bad_archive = tmp_path / "images.tar.gz"
    bad_archive.write_bytes(b"not a tarball")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    cases = [
        (["--epochs", "0"], tmp_path / "out", "--epochs 0"),
        (["--data", str(tmp_path / "nowhere")], tmp_path / "out", "no such file"),
        (["--weights", str(tmp_path / "none.h5")], tmp_path / "out", "no such file"),
        (["--feature-layer", "block9_pool"], tmp_path / "out", "invalid choice: 'block9_pool'"),
        # The weights are checked before the data loads: this archive is not readable either.
        (["--weights", str(corrupt), "--data", str(bad_archive)], tmp_path / "out",
         "is not a Keras VGG16 notop weights file"),
        ([], blocked_out / "sub", "cannot write to the output folder"),
    ]
    started = [(args, message, _script(*args, out_dir=out_dir)) for args, out_dir, message in cases]  # side by side
    for args, message, process in started:
        _, errors = process.communicate(timeout=300)
        error_lines = [line for line in errors.splitlines() if line.startswith("transfer_learning.py: error:")]
        assert process.returncode == 2, (args, errors[-2000:])
        assert "Traceback" not in errors, args
        assert len(error_lines) == 1 and message in error_lines[0], (args, errors[-2000:])
    assert sorted(p.name for p in (tmp_path / "out" / "transfer_learning").iterdir()) == ["20250101-000000"]
    assert (earlier / "metrics.json").read_text() == "{}"
