"""Flags from constants, validation, and bad input as one line with exit status 2."""

import os
import subprocess
import sys

import pytest

from vgg_transfer import cli
from vgg_transfer.errors import InputError

from conftest import PROJECT_ROOT

CONSTANTS = {"EPOCHS": 30, "LEARNING_RATE": 1e-3, "IMAGE_SIZE": 32, "VALIDATION_SPLIT": 0.1, "SEED": 42,
             "FEATURE_LAYER": "block4_pool", "HEAD_DROPOUT": 0.5, "AUGMENT": True}


def test_flags_override_the_constants_of_the_same_name():
    config = cli.parse_config("doc", CONSTANTS, ["--epochs", "5", "--learning-rate", "0.01", "--no-augment",
                                                 "--feature-layer", "block5_pool", "--seed", "1"])
    assert (config.epochs, config.learning_rate, config.augment, config.feature_layer, config.seed) == (
        5, 0.01, False, "block5_pool", 1)
    assert config.hyperparameters["EPOCHS"] == 5 and config.hyperparameters["IMAGE_SIZE"] == 32
    assert (config.data, config.weights, config.subset, config.quiet) == (None, "imagenet", None, False)


def test_help_lists_every_constant_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_config("The description.", CONSTANTS, ["--help"])
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
        cli.parse_config("doc", CONSTANTS, argv)


def test_run_turns_bad_input_into_one_line_and_status_2(capsys):
    def main(config):
        raise InputError("the data is missing; put it in in/")

    assert cli.run(main, "doc", CONSTANTS, argv=[]) == 2
    assert cli.run(main, "doc", CONSTANTS, argv=["--epochs", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "the data is missing" in lines[0] and "--epochs 0" in lines[1]


def _script(*args, out_dir):
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "transfer_learning.py"), *args,
                           "--out", str(out_dir)], capture_output=True, text=True, env=environment, timeout=300)


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
        (["--feature-layer", "block9_pool"], tmp_path / "out", "not a VGG16 layer"),
        # The weights are checked before the data loads: this archive is not readable either.
        (["--weights", str(corrupt), "--data", str(bad_archive)], tmp_path / "out",
         "is not a Keras VGG16 notop weights file"),
        ([], blocked_out / "sub", "cannot write to the output folder"),
    ]
    for args, out_dir, message in cases:
        result = _script(*args, out_dir=out_dir)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("transfer_learning.py: error:")]
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, args
        assert len(error_lines) == 1 and message in error_lines[0], (args, result.stderr[-2000:])
    assert sorted(p.name for p in (tmp_path / "out" / "transfer_learning").iterdir()) == ["20250101-000000"]
    assert (earlier / "metrics.json").read_text() == "{}"
