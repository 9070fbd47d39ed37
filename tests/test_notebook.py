"""The Colab notebook: generated from its percent-format source and committed without outputs,
with a GPU asked for and the same address in its setup cell and in the README's badge; and,
executed in a fresh kernel on the CPU with its parameters cell overridden, it runs the scripts
top to bottom, shows their pictures inline and writes a run folder."""

import importlib.util
import json
import os
import re

import pytest

from conftest import PROJECT_ROOT

SOURCE = PROJECT_ROOT / "notebooks" / "transfer_learning.py"
NOTEBOOK = PROJECT_ROOT / "notebooks" / "transfer_learning.ipynb"
REGENERATE = "jupytext --to ipynb notebooks/transfer_learning.py"


def _require(module):
    if importlib.util.find_spec(module) is None:
        if os.environ.get("VGG_TRANSFER_FLOORS") == "1":  # the floors install requirements.txt alone
            pytest.skip(f"{module} is not part of requirements.txt")
        pytest.fail(f"{module} is not installed; pip install -r requirements-dev.txt")
    return importlib.import_module(module)


def test_the_committed_notebook_is_what_its_source_generates():
    jupytext = _require("jupytext")
    generated = json.loads(jupytext.writes(jupytext.read(SOURCE), fmt="ipynb"))
    committed = json.loads(NOTEBOOK.read_text())
    for notebook in (generated, committed):
        for cell in notebook["cells"]:
            cell.pop("id", None)  # random in every generation
    assert committed == generated, f"notebooks/transfer_learning.ipynb is out of date: run {REGENERATE}"


def test_the_notebook_asks_for_a_gpu_has_no_outputs_and_the_readme_links_it():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["metadata"]["accelerator"] == "GPU"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code)
    (parameters,) = [cell for cell in code if "parameters" in cell["metadata"].get("tags", [])]
    names = set(re.findall(r"^([A-Z_]+) = ", "".join(parameters["source"]), re.M))
    assert {"DATA", "WEIGHTS", "SUBSET", "EPOCHS", "BATCH_SIZE", "IMAGE"} <= names
    (repository,) = re.findall(r'^REPOSITORY = "https://github\.com/([^"]+)"', SOURCE.read_text(), re.M)
    badge = f"https://colab.research.google.com/github/{repository}/blob/main/notebooks/transfer_learning.ipynb"
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert badge in readme and badge in SOURCE.read_text(), "the README's and the notebook's Colab link differ"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_a_fresh_kernel(shared_data, tmp_path):
    nbformat, nbclient = _require("nbformat"), _require("nbclient")
    _require("ipykernel")
    archive, weights = shared_data
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = {"DATA": str(archive), "WEIGHTS": str(weights), "SUBSET": 1000, "EPOCHS": 1, "FINE_TUNE_EPOCHS": 1,
                 "BATCH_SIZE": 64, "OUT": str(tmp_path / "out")}
    injected = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(PROJECT_ROOT / "notebooks")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    pictures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(pictures) >= 5  # loss curves, confusion matrix, mistakes, Grad-CAM, fine-tuning's curves, the image
    (run_dir,) = (tmp_path / "out" / "transfer_learning").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["test_accuracy"] >= 0.3
    text = "".join(output.get("text", "") for output in outputs)
    assert "Precision: " in text and "test_image.png: " in text
