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


def _package_imports():
    """{module: the package modules it imports} for src/vgg_transfer, read from the source."""
    import ast

    package = PROJECT_ROOT / "src" / "vgg_transfer"
    imports = {}
    for path in sorted(package.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "vgg_transfer":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vgg_transfer."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                scripts = {script.stem for script in (PROJECT_ROOT / "src").glob("*.py")}
                assert not scripts & set(names), f"{path.name} imports a script ({scripts & set(names)})"
        imports[path.stem] = found
    return imports


def test_the_design_notes_list_every_module_of_the_package_and_none_imports_in_a_circle():
    imports = _package_imports()
    design = (PROJECT_ROOT / "docs" / "design.md").read_text()
    table = design.split("| module | what it does | imports |")[1].split("\n\n")[0]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert listed == set(imports) - {"__init__"}, "docs/design.md's module table differs from src/vgg_transfer"
    visiting, done = [], set()

    def visit(module):  # depth-first: a module met again while its own imports are visited closes a circle
        assert module not in visiting, f"import circle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        if module not in done:
            visiting.append(module)
            for imported in imports.get(module, ()):
                visit(imported)
            visiting.pop()
            done.add(module)

    for module in imports:
        visit(module)
