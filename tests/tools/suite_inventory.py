"""Writes the suite's inventory, and a run's results, into docs/testing.md between marker comments.

    python tests/tools/suite_inventory.py                  # rewrite the inventory blocks (make docs-testing)
    python tests/tools/suite_inventory.py --check          # exit 1 when docs/testing.md is out of date
    python tests/tools/suite_inventory.py --results JUNIT  # rewrite the Results block from a run's JUnit XML

Nothing is counted by hand. The inventory comes from the code: pytest's own collection of ``tests/``
(every test, by file, so a new test file or case appears by itself), the rows and cells of the
correctness matrix (``PARALLEL_SETUPS``, ``row``, ``compile_row``, ``AGREEING_ROWS`` in
``tests/distributed/test_matrix.py``) and the checkpoint portability configurations
(``CONFIGURATIONS`` in ``tests/distributed/test_checkpoint_portability.py``). The Results block comes
from the JUnit XML of a real run (``make docs-testing-results`` runs the suite and writes it).

Each block sits between ``<!-- BEGIN GENERATED name ... -->`` and ``<!-- END GENERATED name -->``;
the text outside the blocks is left as it is. ``tests/test_docs_testing.py`` runs ``--check``, so CI
fails when the suite changes and the document does not.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "testing.md"
TESTS = REPO / "tests"
INVENTORY_BLOCKS = ("tests", "matrix", "portability")
"""The blocks that ``make docs-testing`` writes from the code (the Results block needs a run)."""


# --- the blocks in the document -------------------------------------------------------------------


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED {name}: written by tests/tools/suite_inventory.py, do not edit -->"


def end_marker(name: str) -> str:
    return f"<!-- END GENERATED {name} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block ``name`` holding ``body``.

    Raises:
        ValueError: The document lacks the block's markers, or holds them more than once.
    """
    begin, end = begin_marker(name), end_marker(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(
            f"{DOC} needs the block {name!r} exactly once: a line {begin!r}, then a "
            f"line {end!r}. Add both where the block belongs and run `make docs-testing`."
        )
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body.strip()}\n{end}{tail}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- the inventory, from the code ------------------------------------------------------------------


@dataclass(frozen=True)
class CollectedTest:
    """One test as pytest collected it."""

    nodeid: str
    gpu: bool
    """Marked ``gpu``: runs only with a GPU per rank."""

    @property
    def file(self) -> str:
        return self.nodeid.split("::")[0]


class _Collector:
    """A pytest plugin that keeps the collected items (a plain class: pytest hashes its plugins)."""

    def __init__(self) -> None:
        self.tests: list[CollectedTest] = []

    def pytest_collection_finish(self, session: Any) -> None:
        self.tests = [
            CollectedTest(item.nodeid, item.get_closest_marker("gpu") is not None) for item in session.items
        ]


def collect() -> list[CollectedTest]:
    """Every test in ``tests/``, collected by pytest in this process (as ``pytest --collect-only``).

    Raises:
        RuntimeError: Collection failed (an import error in a test file, say); pytest's output says why.
    """
    import pytest

    collector = _Collector()
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        status = pytest.main(
            ["--collect-only", "-q", f"--rootdir={REPO}", str(TESTS)],
            plugins=[collector],
        )
    if status != 0:
        raise RuntimeError(f"pytest could not collect {TESTS} (exit status {status}):\n{output.getvalue()}")
    return collector.tests


def tests_block(tests: Sequence[CollectedTest]) -> str:
    per_file = Counter(test.file for test in tests)
    gpu = Counter(test.file for test in tests if test.gpu)
    rows: list[tuple[object, ...]] = [
        (f"`{file}`", per_file[file], gpu[file] or "") for file in sorted(per_file)
    ]
    rows.append(("**all**", f"**{len(tests)}**", sum(gpu.values())))
    multi_rank = sum(count for file, count in per_file.items() if file.startswith("tests/distributed/"))
    return (
        f"{len(tests)} tests: {len(tests) - multi_rank} in single-process files, {multi_rank} in "
        f"`tests/distributed/`; {sum(gpu.values())} need a GPU per rank (marked `gpu`, skipped without). "
        "A parametrized test counts once per parameter set, as pytest reports it.\n\n"
        + table(("file", "tests", "GPU only"), rows)
    )


def _import_suite_module(name: str) -> ModuleType:
    """A module of ``tests/distributed``, imported as pytest imports it (by its bare name)."""
    for path in (TESTS / "distributed", TESTS):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return importlib.import_module(name)


def matrix_block() -> str:
    matrix = _import_suite_module("test_matrix")
    training = _import_suite_module("training")
    full_row = 1 + 2 * len(training.AC_WRAPPERS)  # the baseline, then each wrapper after and before
    rows, cells, left_out = [], 0, 0
    for name, setup in matrix.PARALLEL_SETUPS.items():
        count = len(matrix.row(setup))
        rows.append((f"`{name}`", f"`{setup!r}`", count))
        cells += count
        left_out += full_row - count
    compile_cells = sum(
        len(matrix.compile_row(matrix.PARALLEL_SETUPS[name])) for name in matrix.COMPILE_PARALLEL
    )
    wrappers = ", ".join(f"`{name}`" for name in training.AC_WRAPPERS)
    agreeing = ", ".join(f"`{name}`" for name in matrix.AGREEING_ROWS)
    return (
        table(("row", "setup", "cells"), rows)
        + f"\n\n**{len(rows)} rows, {cells} cells**: in each row the baseline without AC, then each "
        f"activation wrapper ({wrappers}) applied after and before the parallel wrapper; {left_out} "
        "cells that torch cannot run are left out (`torch_limitation`, refused by fsdp_ac at wrap time). "
        f"`test_matrix_with_torch_compile`: {len(matrix.COMPILE_PARALLEL)} rows, {compile_cells} cells. "
        f"`test_ddp_fsdp1_fsdp2_agree`: the baselines of {len(matrix.AGREEING_ROWS)} rows ({agreeing}) "
        "against DDP's."
    )


def portability_block() -> str:
    portability = _import_suite_module("test_checkpoint_portability")
    families = portability.CONFIGURATIONS
    rows = [
        (f"`{family}`", ", ".join(f"`{setup!r}`" for setup in setups)) for family, setups in families.items()
    ]
    count = len(portability.TARGETS)
    return (
        table(("family (one test each)", "configurations"), rows)
        + f"\n\n**{count} configurations**: each saves a checkpoint that every configuration loads, "
        f"its own included (**{count * count} DCP loads**), and that this process loads without a "
        f"process group (**{count} loads**)."
    )


def inventory_blocks() -> dict[str, str]:
    """The body of every inventory block, from the code."""
    tests = collect()
    return {"tests": tests_block(tests), "matrix": matrix_block(), "portability": portability_block()}


# --- the results, from a run -----------------------------------------------------------------------


@dataclass
class FileResults:
    """The outcome of one test file's tests in a run."""

    passed: int = 0
    skipped: int = 0
    failed: int = 0
    times: list[float] = field(default_factory=list)
    """Seconds per test that ran (not skipped)."""


def _seconds(value: float) -> str:
    if value >= 59.5:
        whole = round(value)
        return f"{whole // 60} min {whole % 60} s"
    return f"{value:.0f} s" if value >= 9.95 else f"{value:.1f} s"


def read_junit(path: Path) -> tuple[dict[str, FileResults], dict[str, str]]:
    """Per test file, what a run's JUnit XML (``-o junit_family=xunit1``) says; and the suite's attributes.

    Raises:
        ValueError: A test case has no ``file`` attribute (the XML was not written with xunit1).
    """
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise ValueError(f"{path} holds no <testsuite>.")
    results: dict[str, FileResults] = {}
    for case in suite.iter("testcase"):
        file = case.get("file")
        if file is None:
            raise ValueError(
                f"{path}: test case {case.get('name')!r} has no file attribute; write the XML with "
                "pytest -o junit_family=xunit1 --junitxml=PATH (as make docs-testing-results does)."
            )
        per_file = results.setdefault(file, FileResults())
        if case.find("failure") is not None or case.find("error") is not None:
            per_file.failed += 1
        elif case.find("skipped") is not None:
            per_file.skipped += 1
            continue
        else:
            per_file.passed += 1
        per_file.times.append(float(case.get("time", 0)))
    return results, dict(suite.attrib)


def _git(*args: str) -> str:
    """What ``git args`` prints in the repository, or nothing where git or the repository is missing."""
    with contextlib.suppress(OSError):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    return ""


def environment_line(command: str, suite: dict[str, str]) -> str:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from suite_settings import suite_nproc

    gpus = torch.cuda.device_count()
    device = f"{gpus} CUDA GPUs, NCCL" if gpus >= suite_nproc() else "CPU, gloo"
    commit = f"`{_git('rev-parse', '--short', 'HEAD') or 'unknown'}`"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    return (
        f"`{command}` at commit {commit}, {suite.get('timestamp', '')[:10]}: torch "
        f"{torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, {device}, "
        f"{suite_nproc()} ranks per multi-rank test; wall time {_seconds(float(suite.get('time', 0)))}."
    )


def results_block(path: Path, command: str) -> str:
    results, suite = read_junit(path)
    rows: list[tuple[object, ...]] = []
    for file in sorted(results):
        per_file = results[file]
        times = per_file.times
        spread = f"{_seconds(min(times))} - {_seconds(max(times))}" if times else ""
        total = per_file.passed + per_file.skipped + per_file.failed
        rows.append(
            (
                f"`{file}`",
                total,
                per_file.passed,
                per_file.skipped or "",
                per_file.failed or "",
                spread,
                _seconds(sum(times)),
            )
        )
    passed, skipped, failed = (
        sum(getattr(r, key) for r in results.values()) for key in ("passed", "skipped", "failed")
    )
    rows.append(
        (
            "**all**",
            f"**{passed + skipped + failed}**",
            passed,
            skipped,
            failed,
            "",
            _seconds(sum(sum(r.times) for r in results.values())),
        )
    )
    header = ("file", "tests", "passed", "skipped", "failed", "time per test", "test time in all")
    return environment_line(command, suite) + "\n\n" + table(header, rows)


# --- the command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/testing.md is out of date")
    parser.add_argument("--results", type=Path, metavar="JUNIT", help="write the Results block from this run")
    parser.add_argument("--command", default="pytest tests", help="the command that wrote the JUnit XML")
    args = parser.parse_args(argv)
    old = DOC.read_text()
    new = old
    if args.results is not None:
        new = replace_block(new, "results", results_block(args.results, args.command))
    else:
        for name, body in inventory_blocks().items():
            new = replace_block(new, name, body)
    if args.check:
        if new != old:
            diff = difflib.unified_diff(
                old.splitlines(), new.splitlines(), "docs/testing.md", "from the code", lineterm=""
            )
            print("\n".join(diff))
            print(f"{DOC} is out of date with the suite: run `make docs-testing` and commit it.")
            return 1
        return 0
    if new != old:
        DOC.write_text(new)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
