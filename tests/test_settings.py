"""``fsdp_ac.settings``: budgets that cannot be misread, and the config file of ``accelerate launch``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fsdp_ac.settings import launch_config_file, launcher, own_settings, parse_budget

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", 0.5),
        ("1", 1.0),
        ("50%", 0.5),
        ("100%", 1.0),
        ("300MiB", 300 * 2**20),
        ("123B", 123),
        ("1.5GB", 1.5e9),
    ],
)
def test_budgets_read_as_fractions_or_bytes(text: str, expected: float) -> None:
    assert parse_budget(text) == expected
    assert isinstance(parse_budget(text), float if text in ("0.5", "1", "50%", "100%") else int)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "50",
            "'50' is ambiguous: a bare number is a fraction of no AC's activation bytes, at most 1. "
            "Did you mean 50% or 50B?",
        ),
        ("123", "Did you mean 123% or 123B?"),
        ("150%", "above 100%"),
        ("0", "must be positive"),
        ("0%", "must be positive"),
        ("half", "300MiB"),
        ("5 parsecs", "300MiB"),
    ],
)
def test_budgets_that_could_be_misread_are_refused(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        parse_budget(text, "--budget")


def test_the_policy_budget_uses_the_same_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSDP_AC_POLICY", "budget:50%")
    assert own_settings()["policy"] == ("budget:0.5", "FSDP_AC_POLICY")
    for bad, said in [
        ("budget:50", r"Did you mean 50%\?"),
        ("budget:150%", "above 100%"),
        ("budget:2GiB", r"give a fraction of no AC's bytes \(0.5, 50%\)$"),
    ]:
        monkeypatch.setenv("FSDP_AC_POLICY", bad)
        with pytest.raises(ValueError, match=said):
            own_settings()


def test_the_runners_default_policy_gives_way_to_any_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert own_settings("all") == {"policy": ("all", "the default of fsdp_ac.run")}
    assert own_settings() == {}
    monkeypatch.setenv("FSDP_AC_POLICY", "none")
    assert own_settings("all")["policy"] == ("none", "FSDP_AC_POLICY")


def test_the_config_file_of_accelerate_launch_is_found_from_its_command_line(tmp_path: Path) -> None:
    """A child of a process whose command line is accelerate launch's reads its --config_file."""
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "ddp.yaml"
    config.write_text("fsdp_config:\n  fsdp_ac_policy: every:2\n")
    child = textwrap.dedent(
        """
        from fsdp_ac.settings import launch_config_file, launcher, own_settings
        print(launcher(), launch_config_file(), own_settings()["policy"][0])
        """
    )
    # A stand-in launcher: argv[0] ends with "accelerate", as the console script's does.
    launcher_script = tmp_path / "accelerate"
    launcher_script.write_text(
        f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', {child!r}]))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "ACCELERATE_DYNAMO_BACKEND": "NO",
    }
    script_options = ["--config_file", "the_scripts_own.yaml"]  # read by the script, not the launcher
    for flag in (["--config_file", "cfg/ddp.yaml"], ["--config_file=cfg/ddp.yaml"]):
        result = subprocess.run(
            [sys.executable, str(launcher_script), "launch", *flag, "train.py", *script_options],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout.split() == ["accelerate", "launch", str(config), "every:2"], result.stderr
    assert (launcher(), launch_config_file()) == ("torchrun", None)  # this process: not under accelerate
