"""The package's modules import one way, and none imports a private name of another.

Layers, lowest first: ``names`` <- the other leaves (``offload``, ``recompute``, ``memory``, ``dcp``,
``reference_model``) <- ``wrappers`` <- ``policies`` <- ``apply`` (the one application path) <-
``selective`` <- ``strategies`` <- ``plan`` <- ``accelerate``. A module imports only from layers below
its own; ``__init__`` gathers the public names from all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fsdp_ac"

LAYERS: dict[str, int] = {
    "names": 0,
    "offload": 1,
    "recompute": 1,
    "memory": 1,
    "dcp": 1,
    "reference_model": 1,
    "wrappers": 2,
    "policies": 3,
    "apply": 4,
    "selective": 5,
    "strategies": 6,
    "plan": 7,
    "accelerate": 8,
    "run": 9,
    "__init__": 10,
}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Each import of an fsdp_ac module in ``path``, lazy ones too: (line, module, imported names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fsdp_ac":
            if node.module == "fsdp_ac":  # `from fsdp_ac import x`: x is a module or a package name
                for alias in node.names:
                    found.append((node.lineno, f"fsdp_ac.{alias.name}", []))
            else:
                found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "fsdp_ac"]
    return found


def violations(path: Path) -> list[str]:
    """What is wrong with the imports of ``path``, one line per offending import."""
    module = path.stem
    problems = []
    for line, imported, names in imports(path):
        target = imported.split(".")[1] if "." in imported else "__init__"
        where = f"fsdp_ac/{path.name}:{line} imports {imported}"
        if target not in LAYERS:
            problems.append(f"{where}, which tests/test_layers.py places in no layer")
        elif module != "__init__" and LAYERS[target] >= LAYERS[module]:
            problems.append(
                f"{where} (layer {LAYERS[target]}), not below {module} (layer {LAYERS[module]}): "
                "imports go one way"
            )
        private = [name for name in names if name.startswith("_")]
        if private:
            problems.append(f"{where}: private name {', '.join(private)}")
    return problems


def test_every_module_has_a_layer() -> None:
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_go_one_way_without_private_names(module: str) -> None:
    assert violations(PACKAGE / f"{module}.py") == []


def test_the_check_names_an_upward_and_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "wrappers.py"
    bad.write_text("from fsdp_ac.policies import _sites, ModulePolicy\n\ndef f():\n    import fsdp_ac.plan\n")
    assert violations(bad) == [
        "fsdp_ac/wrappers.py:1 imports fsdp_ac.policies (layer 3), not below wrappers (layer 2): "
        "imports go one way",
        "fsdp_ac/wrappers.py:1 imports fsdp_ac.policies: private name _sites",
        "fsdp_ac/wrappers.py:4 imports fsdp_ac.plan (layer 7), not below wrappers (layer 2): "
        "imports go one way",
    ]
