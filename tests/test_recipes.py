"""The recipe each kind of machine gets is the one the docs show: every constant whose value
depends on HARDWARE, read from the scripts themselves with each kind forced, equals the table
in docs/design.md ("Recipes and precision per machine"), and no other constant differs."""

import ast
import importlib.util

from conftest import PROJECT_ROOT
from vgg_transfer import cli, devices

SCRIPTS = ["transfer_learning.py", "transfer_learning_subclassed.py", "transfer_learning_sequential.py",
           "fine_tune.py", "baselines.py"]


def script_constants(script, hardware, monkeypatch):
    """The UPPERCASE constants of src/`script` as its top level sets them with HARDWARE forced."""
    monkeypatch.setenv(devices.HARDWARE_VARIABLE, hardware)
    path = PROJECT_ROOT / "src" / script
    spec = importlib.util.spec_from_file_location(f"recipe_of_{path.stem}_{hardware}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines constants and functions; main runs only as __main__
    return cli.constants(vars(module))


def documented_recipes():
    """{(script, constant): {kind: value}} from docs/design.md's recipe table."""
    design = (PROJECT_ROOT / "docs" / "design.md").read_text()
    table = design.split("| script | constant | gpu | cpu_amx | cpu |")[1].split("\n\n")[0]
    recipes = {}
    for row in table.strip().splitlines()[1:]:
        script, constant, *values = [cell.strip().strip("`") for cell in row.strip("|").split("|")]
        recipes[(script, constant)] = dict(zip(devices.HARDWARE_CLASSES, map(ast.literal_eval, values), strict=True))
    return recipes


def test_every_constant_that_differs_per_kind_of_machine_is_the_documented_one(monkeypatch):
    found = {}
    for script in SCRIPTS:
        per_kind = {hardware: script_constants(script, hardware, monkeypatch) for hardware in devices.HARDWARE_CLASSES}
        for name in per_kind["cpu"]:
            values = {hardware: per_kind[hardware][name] for hardware in devices.HARDWARE_CLASSES}
            if name != "HARDWARE" and len(set(map(repr, values.values()))) > 1:
                found[(script, name)] = values
    documented = documented_recipes()
    assert found == documented, {key: (found.get(key), documented.get(key))
                                 for key in set(found) | set(documented) if found.get(key) != documented.get(key)}
    assert {script for script, _ in found} == {"transfer_learning.py", "fine_tune.py"}

