"""``python -m fsdp_ac profile|plan`` on the reference GPT at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsdp_ac import ActivationPlan
from fsdp_ac.__main__ import main
from fsdp_ac.reference_model import GPT, GPTConfig

TINY = ["--layers", "2", "--d-model", "32", "--heads", "4", "--seq", "16", "--batch", "2", "--vocab", "64"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt() -> GPT:
    """The user model of the import-path test: ``test_cli:tiny_gpt``."""
    return GPT(GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_heads=4, n_layers=2))


def test_budgets_that_cannot_be_misread_are_refused_before_profiling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for budget, said in [("50", "Did you mean 50% or 50B?"), ("150%", "above 100%")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "gpt", *TINY, "--budget", budget])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert said in err and "profiling" not in err, err


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "python -m fsdp_ac plan gpt --budget 50%" in out
    assert "``" not in out and ":meth:" not in out and "::" not in out


def test_profile_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "profile.json"
    assert main(["profile", "gpt", *TINY, "--repeats", "1", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "layers.0" in captured.out and "layers.1" in captured.out and "none_MiB" in captured.out
    assert "profiling [" in captured.err and "steps" in captured.err  # the progress bar
    assert "fsdp_ac:" not in captured.err  # the copies the profile checkpoints say nothing, nor break it
    document = json.loads(out.read_text())
    blocks = document["profile"]["blocks"]
    assert [b["name"] for b in blocks] == ["layers.0", "layers.1"]
    assert document["profile"]["no_ac_bytes"] > sum(b["kept_bytes"] for b in blocks) > 0
    assert "plan" not in document


def test_plan_saves_a_plan_that_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, saved = tmp_path / "plan.json", tmp_path / "activation_plan.json"
    argv = ["plan", "gpt", *TINY, "--repeats", "1", "--quiet", "--budget", "0.8"]
    assert main([*argv, "--json", str(out), "--save-plan", str(saved)]) == 0
    captured = capsys.readouterr()
    assert "predicted time ratio" in captured.out and captured.err == ""
    document = json.loads(out.read_text())
    assert document["plan"]["predicted_memory_ratio"] <= 0.8
    assert document["plan"]["predicted_peak_bytes"] <= document["plan"]["budget_bytes"]
    plan = ActivationPlan.load(saved)
    assert list(plan) == ["layers.0", "layers.1"]
    assert ActivationPlan.from_json(json.dumps(document["plan"]["activation_plan"])) == plan
    plan.apply(tiny_gpt())


def test_an_impossible_budget_exits_2_naming_the_smallest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    assert (
        main(["plan", "gpt", *TINY, "--repeats", "1", "--quiet", "--budget", "1%", "--json", str(out)]) == 2
    )
    assert "even full checkpointing of every block needs" in capsys.readouterr().err
    assert json.loads(out.read_text())["smallest_budget_bytes"] > 0


def test_module_entry_point_with_a_user_model(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "fsdp_ac", "plan", "test_cli:tiny_gpt", "--block", "TransformerBlock"]
    command += ["--shape", "2,8", "--budget", "0.9", "--repeats", "1", "--quiet"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "layers.0" in result.stdout and "predicted time ratio" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "fsdp_ac", "plan", "test_cli:tiny_gpt", "--budget", "0.5"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "--block" in missing.stderr
