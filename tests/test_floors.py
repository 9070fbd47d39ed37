"""The whole path a user takes, small enough for every CI step: a main job stopped by Ctrl-C
and run again, its model in predict.py, exported for LiteRT and run in the stock interpreter
(on a TensorFlow too old for LiteRT: refused in one line, and a SavedModel served instead).
CI runs it on the newest packages and on the lowest versions requirements.txt allows (the
`floors` marker), where the fast tests alone would not train, save, resume or export."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import export
import predict
import transfer_learning
from conftest import interrupt_after_epochs
from main_job import served_predictions
from vgg_transfer import cli, data

pytestmark = [pytest.mark.slow, pytest.mark.floors]
COMMAND = ["--subset", "300", "--epochs", "3", "--batch-size", "64", "--quiet", "--precision", "float32"]


def test_a_run_resumes_predicts_and_exports_for_litert_on_these_versions(shared_data, tmp_path, monkeypatch, capsys):
    archive, weights = shared_data
    argv = ["--data", str(archive), "--weights", str(weights), "--out", str(tmp_path / "out"), *COMMAND]
    with monkeypatch.context() as patch:
        interrupt_after_epochs(patch, 1)
        assert cli.run(transfer_learning.main, vars(transfer_learning), argv) == 130
    assert cli.run(transfer_learning.main, vars(transfer_learning), argv) == 0
    assert "Resuming after epoch 1 of" in capsys.readouterr().out
    (run_dir,) = [path for path in (tmp_path / "out" / "transfer_learning").iterdir() if not path.name.startswith(".")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["test_accuracy"] > 0.25

    values, common = cli.parse("", cli.constants(vars(transfer_learning)), COMMAND)
    test_set = data.load_dataset(archive, values["VALIDATION_SPLIT"], values["TEST_SPLIT"], values["SEED"],
                                 common["subset"], verbose=False)
    with open(run_dir / "predictions.csv") as file:
        rows = list(csv.DictReader(file))[:8]
    images = tmp_path / "images"
    images.mkdir()
    for index in range(8):
        Image.fromarray(test_set.x_test[index]).save(images / f"{index}.png")
    capsys.readouterr()
    assert cli.run_tool(predict.main, predict.parse_arguments, [str(images), "--model", str(run_dir), "--json"]) == 0
    predicted = {Path(entry["path"]).name: entry["top"][0] for entry in json.loads(capsys.readouterr().out)["predictions"]}
    assert [predicted[f"{index}.png"]["class"] for index in range(8)] == [row["predicted_class"] for row in rows]
    np.testing.assert_allclose([predicted[f"{index}.png"]["probability"] for index in range(8)],
                               [float(row["confidence"]) for row in rows], atol=1e-4)

    exported = tmp_path / "litert"
    status = cli.run_tool(export.main, export.parse_arguments, [str(run_dir), "--format", "litert", "--out", str(exported)])
    served_format = "litert"
    if export.tensorflow_too_old_for_litert():  # its converter would abort
        assert status == 2 and "exporting to litert needs TensorFlow 2.20 or later" in capsys.readouterr().err
        served_format, exported = "tf_saved_model", tmp_path / "saved_model"  # what such a TensorFlow exports instead
        status = cli.run_tool(export.main, export.parse_arguments,
                              [str(run_dir), "--format", served_format, "--out", str(exported)])
    assert status == 0
    served = served_predictions(served_format, exported, test_set.x_test[:8])
    np.testing.assert_allclose(served.max(axis=1), [float(row["confidence"]) for row in rows], atol=1e-4)

