"""docs/testing.md matches the suite: its generated counts and tables are those the code gives today.

``tests/tools/suite_inventory.py`` writes them (``make docs-testing``); these tests fail when a test,
test file, matrix cell or portability configuration is added or removed and the document is not
regenerated, and check the script's own block and JUnit handling on small inputs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "tools" / "suite_inventory.py"


@pytest.fixture(scope="module")
def inventory() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))
        yield importlib.import_module("suite_inventory")


@pytest.mark.timeout(300)
def test_docs_testing_md_is_up_to_date_with_the_suite() -> None:
    """The whole check, in a process of its own: pytest's collection of tests/ and the case lists."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def doc_with(inventory: ModuleType, name: str, body: str) -> str:
    return f"# Title\n\nbefore\n{inventory.begin_marker(name)}\n{body}\n{inventory.end_marker(name)}\nafter\n"


def test_check_reports_a_stale_block_and_writing_fixes_it(
    inventory: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "testing.md"
    doc.write_text(doc_with(inventory, "tests", "250 tests"))
    monkeypatch.setattr(inventory, "DOC", doc)
    monkeypatch.setattr(inventory, "inventory_blocks", lambda: {"tests": "251 tests"})
    assert inventory.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "-250 tests\n+251 tests" in out and "make docs-testing" in out
    assert doc.read_text() == doc_with(inventory, "tests", "250 tests")  # --check writes nothing
    assert inventory.main([]) == 0
    assert doc.read_text() == doc_with(inventory, "tests", "251 tests")  # only the block changed
    assert inventory.main(["--check"]) == 0


def test_a_missing_block_names_its_markers_and_the_fix(inventory: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"needs the block 'matrix' exactly once.*make docs-testing"):
        inventory.replace_block(doc_with(inventory, "tests", "x"), "matrix", "y")


def test_results_block_counts_each_files_outcomes(inventory: ModuleType, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" tests="4" time="75.2" timestamp="2025-01-02T03:04:05">'
        '<testcase file="tests/test_a.py" name="test_one" time="1.25"/>'
        '<testcase file="tests/test_a.py" name="test_two" time="12.0"><failure message="no"/></testcase>'
        '<testcase file="tests/distributed/test_b.py" name="test_gpu" time="0.01"><skipped/></testcase>'
        '<testcase file="tests/distributed/test_b.py" name="test_rank" time="30.4"/>'
        "</testsuite></testsuites>"
    )
    block = inventory.results_block(junit, "pytest -n 2 tests")
    assert "`pytest -n 2 tests`" in block and "2025-01-02" in block and "wall time 1 min 15 s" in block
    rows = block.split("\n\n")[1].splitlines()[2:]
    assert rows == [
        "| `tests/distributed/test_b.py` | 2 | 1 | 1 |  | 30 s - 30 s | 30 s |",
        "| `tests/test_a.py` | 2 | 1 |  | 1 | 1.2 s - 12 s | 13 s |",
        "| **all** | **4** | 2 | 1 | 1 |  | 44 s |",
    ]


def test_results_need_the_file_of_each_test(inventory: ModuleType, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuite><testcase classname="tests.test_a" name="test_one" time="1"/></testsuite>')
    with pytest.raises(ValueError, match="junit_family=xunit1"):
        inventory.read_junit(junit)
