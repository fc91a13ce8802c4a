"""The package's modules import one way, none imports a private name of another, and only
``_compat`` reaches torch's and Accelerate's internals.

Layers, lowest first: ``_compat`` (every private torch and Accelerate internal) <- ``names`` <- the
other leaves (``offload``, ``recompute``, ``memory``, ``dcp``, ``reference_model``) <- ``wrappers`` <-
``policies`` <- ``apply`` (the one application path) <- ``selective`` <- ``strategies`` <- ``plan`` <-
``accelerate``. A module imports only from layers below its own; ``__init__`` gathers the public names
from all of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fsdp_ac"

LAYERS: dict[str, int] = {
    "_compat": 0,
    "names": 1,
    "offload": 2,
    "recompute": 2,
    "memory": 2,
    "dcp": 2,
    "report": 2,
    "reference_model": 2,
    "wrappers": 3,
    "policies": 4,
    "apply": 5,
    "selective": 6,
    "strategies": 7,
    "plan": 8,
    "profiler": 9,
    "planner": 10,
    "settings": 10,
    "accelerate": 11,
    "run": 12,
    "__main__": 12,
    "__init__": 13,
}

THIRD_PARTY = ("torch", "accelerate", "transformers")
"""Projects whose private modules and names only ``_compat`` may use."""

PRIVATE_INTERNALS = frozenset(
    {
        "_checkpoint_internal",
        "_checkpoint_wrapped_module",
        "_fsdp_wrapped_module",
        "_get_active_ddp_module",
        "_get_fqns",
        "_lambda_fn",
        "_new_with_weak_ptr",
        "_no_split_modules",
        "_orig_mod",
        "_param_infos",
        "_run_policy",
        "_shared_param_infos",
        "_top_saved_tensors_default_hooks",
        "_use_orig_params",
        "_user_hooks",
    }
)
"""Private attributes of torch and Hugging Face objects (read, written, overridden or named in a
string) that only ``_compat`` may touch; private modules and ``torch._x`` are caught by their form."""


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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")  # torch.__version__ is public


def private_accesses(path: Path) -> list[str]:
    """Where ``path`` reaches a private torch, Accelerate or Hugging Face internal, one line each."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        what = None
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in THIRD_PARTY:
            names = [a.name for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")):
                what = f"imports the private module {node.module}"
            elif names:
                what = f"imports the private name {', '.join(names)} from {node.module}"
        elif isinstance(node, ast.Import):
            hidden = [
                a.name
                for a in node.names
                if a.name.split(".")[0] in THIRD_PARTY and any(p.startswith("_") for p in a.name.split("."))
            ]
            what = f"imports the private module {', '.join(hidden)}" if hidden else None
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "torch" and _private(node.attr):
                what = f"uses torch.{node.attr}"
            elif node.attr in PRIVATE_INTERNALS:
                what = f"uses .{node.attr}"
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_INTERNALS:
            what = f"names {node.value!r}"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in PRIVATE_INTERNALS:
            what = f"defines {node.name}"
        if what is not None:
            found.append(f"fsdp_ac/{path.name}:{node.lineno} {what}: go through fsdp_ac/_compat.py")
    return sorted(found, key=lambda line: int(line.split(":")[1].split(" ")[0]))


def test_every_module_has_a_layer() -> None:
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_go_one_way_without_private_names(module: str) -> None:
    assert violations(PACKAGE / f"{module}.py") == []


@pytest.mark.parametrize("module", [m for m in sorted(LAYERS) if m != "_compat"])
def test_only_compat_reaches_torch_and_accelerate_internals(module: str) -> None:
    assert private_accesses(PACKAGE / f"{module}.py") == []


def test_the_internals_check_names_each_kind_of_access(tmp_path: Path) -> None:
    bad = tmp_path / "apply.py"
    bad.write_text(
        "import torch.utils._pytree\n"
        "from torch.distributed.fsdp.wrap import _Policy\n"
        "from torch._ops import OpOverload\n"
        "def f(unit, model):\n"
        "    torch._C._autograd\n"
        "    return unit._use_orig_params, getattr(model, '_orig_mod', None)\n"
        "class P:\n"
        "    def _run_policy(self): ...\n"
    )
    fix = ": go through fsdp_ac/_compat.py"
    assert private_accesses(bad) == [
        f"fsdp_ac/apply.py:1 imports the private module torch.utils._pytree{fix}",
        f"fsdp_ac/apply.py:2 imports the private name _Policy from torch.distributed.fsdp.wrap{fix}",
        f"fsdp_ac/apply.py:3 imports the private module torch._ops{fix}",
        f"fsdp_ac/apply.py:5 uses torch._C{fix}",
        f"fsdp_ac/apply.py:6 uses ._use_orig_params{fix}",
        f"fsdp_ac/apply.py:6 names '_orig_mod'{fix}",
        f"fsdp_ac/apply.py:8 defines _run_policy{fix}",
    ]


def test_the_check_names_an_upward_and_a_private_import(tmp_path: Path) -> None:
    bad = tmp_path / "wrappers.py"
    bad.write_text("from fsdp_ac.policies import _sites, ModulePolicy\n\ndef f():\n    import fsdp_ac.plan\n")
    assert violations(bad) == [
        "fsdp_ac/wrappers.py:1 imports fsdp_ac.policies (layer 4), not below wrappers (layer 3): "
        "imports go one way",
        "fsdp_ac/wrappers.py:1 imports fsdp_ac.policies: private name _sites",
        "fsdp_ac/wrappers.py:4 imports fsdp_ac.plan (layer 8), not below wrappers (layer 3): "
        "imports go one way",
    ]
