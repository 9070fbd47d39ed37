"""The README and the scripts keep their promises: CI runs the README's own lines, the pictures
it shows exist, and every training script shows its Keras story within 170 lines."""

import re

import pytest

from conftest import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
TRAINING_SCRIPTS = ["transfer_learning.py", "transfer_learning_subclassed.py", "transfer_learning_sequential.py",
                    "fine_tune.py", "baselines.py"]


def _code_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readmes_install_line_and_test_command():
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    tests_block = next(block for block in _code_blocks(README) if "pytest" in block)
    for line in tests_block.strip().splitlines():
        assert line in ci, f"CI does not run the README's line {line!r}"


def test_the_readme_is_short_and_its_pictures_and_links_exist():
    assert len(README.splitlines()) <= 170
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (PROJECT_ROOT / target).exists(), target


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_each_training_script_shows_its_keras_story(script):
    text = (PROJECT_ROOT / "src" / script).read_text()
    assert len(text.splitlines()) <= 170
    for call in (".compile(", ".fit(", "keras.callbacks.EarlyStopping(", "keras.callbacks.ReduceLROnPlateau(",
                 "keras.callbacks.ModelCheckpoint(", "reporting.write_run("):
        assert call in text, f"{script} does not show {call}"
    if script != "baselines.py":  # trained from scratch
        assert "keras.applications.VGG16(" in text and "trainable = " in text
