"""The recipe each kind of machine gets is the one the docs show: every constant whose value
depends on HARDWARE, read from the scripts themselves with each kind forced, equals the table
in docs/design.md ("Recipes and precision per machine"), and no other constant differs."""

import ast
import builtins
import types

from conftest import PROJECT_ROOT
from vgg_transfer import cli, devices

SCRIPTS = ["transfer_learning.py", "transfer_learning_subclassed.py", "transfer_learning_sequential.py",
           "fine_tune.py", "baselines.py"]


def script_constants(script, hardware):
    """The UPPERCASE constants of src/`script` as its top level sets them with HARDWARE forced:
    each constant's line evaluated in order, `devices.hardware()` giving `hardware`. The script is
    not imported (it would register its Keras classes again, under another module's name)."""
    forced = types.SimpleNamespace(hardware=lambda: hardware)
    namespace = {"devices": forced, "__builtins__": builtins}
    for node in ast.parse((PROJECT_ROOT / "src" / script).read_text()).body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            value = eval(compile(ast.Expression(node.value), script, "eval"), namespace)
            namespace.update({target.id: value for target in node.targets})
    return cli.constants(namespace)


def documented_recipes():
    """{(script, constant): {kind: value}} from docs/design.md's recipe table."""
    design = (PROJECT_ROOT / "docs" / "design.md").read_text()
    table = design.split("| script | constant | gpu | cpu_amx | cpu |")[1].split("\n\n")[0]
    recipes = {}
    for row in table.strip().splitlines()[1:]:
        script, constant, *values = [cell.strip().strip("`") for cell in row.strip("|").split("|")]
        recipes[(script, constant)] = dict(zip(devices.HARDWARE_CLASSES, map(ast.literal_eval, values), strict=True))
    return recipes


def test_every_constant_that_differs_per_kind_of_machine_is_the_documented_one():
    found = {}
    for script in SCRIPTS:
        per_kind = {hardware: script_constants(script, hardware) for hardware in devices.HARDWARE_CLASSES}
        for name in per_kind["cpu"]:
            values = {hardware: per_kind[hardware][name] for hardware in devices.HARDWARE_CLASSES}
            if name != "HARDWARE" and len(set(map(repr, values.values()))) > 1:
                found[(script, name)] = values
    documented = documented_recipes()
    assert found == documented, {key: (found.get(key), documented.get(key))
                                 for key in set(found) | set(documented) if found.get(key) != documented.get(key)}
    assert {script for script, _ in found} == {"transfer_learning.py", "fine_tune.py"}

