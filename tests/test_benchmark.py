"""The benchmark script runs end to end on a tiny model and writes valid records (nothing is timed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
TINY = ["--layers", "2", "--d-model", "32", "--heads", "4", "--seq", "16", "--batch", "2", "--vocab", "64"]
REQUIRED = [
    "no_ac",
    "torch_full",
    "fsdp_ac_full",
    "fsdp_ac_every_2",
    "torchtitan_op_sac",
    "fsdp_ac_selective",
]


@pytest.fixture(scope="module")
def bench_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp_ac_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_the_records(
    bench_script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert bench_script.main([*TINY, "--repeats", "1", "--warmup", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["name"] for r in records] == REQUIRED
    for record in records:
        assert set(record) == {"name", "time_ratio", "memory_ratio", "step_ms", "activation_bytes"}
        assert isinstance(record["activation_bytes"], int) and record["activation_bytes"] > 0
        assert record["step_ms"] > 0 and record["time_ratio"] > 0
    by_name = {r["name"]: r for r in records}
    assert by_name["no_ac"]["time_ratio"] == by_name["no_ac"]["memory_ratio"] == 1.0
    # Memory is deterministic: the same for both full variants, and ordered by how much is saved.
    assert by_name["fsdp_ac_full"]["activation_bytes"] == by_name["torch_full"]["activation_bytes"]
    full, selective = by_name["fsdp_ac_full"]["memory_ratio"], by_name["fsdp_ac_selective"]["memory_ratio"]
    assert full < by_name["fsdp_ac_every_2"]["memory_ratio"] < 1.0
    assert full < selective == by_name["torchtitan_op_sac"]["memory_ratio"] < 1.0
    table = capsys.readouterr().out
    assert "bitwise equal" in table and "DIFFER" not in table
    assert "target met: fsdp_ac_full memory" in table


def test_subset_and_unknown_variants(bench_script: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        bench_script.main([*TINY, "--repeats", "1", "--warmup", "0", "--variants", "fsdp_ac_matmul_sac"]) == 0
    )
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:5]] == [
        "no_ac",
        "fsdp_ac_matmul_sac",
    ]
    with pytest.raises(SystemExit):
        bench_script.parse_args(["--variants", "fsdp_ac_fast"])
