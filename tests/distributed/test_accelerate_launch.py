"""``accelerate launch`` with FSDP2, FSDP1 and DDP configs, through ``fsdp_ac.accelerate.prepare``.

Each test runs ``FSDP_AC_NPROC`` processes (default 2) of ``accelerate_train.py`` with one config file
of ``accelerate_configs/`` (gloo on CPU; NCCL where there is a GPU per process) and compares, for the
reference GPT with dropout and a tiny ``LlamaForCausalLM`` with attention dropout:

- fsdp_ac's gradients with those of the same run without activation checkpointing, bitwise;
- the FSDP units and checkpoint wrappers each block got (exactly one of each);
- the names of parameters and of the keys that ``get_state_dict`` and ``save_state`` write, which a
  plain model loads, and what ``load_state`` reads back after a plain model's values were written;
- Accelerate's own activation checkpointing in the same run: the defects fsdp_ac fixes.

Without GPUs Accelerate runs an FSDP config as DDP; the script records that run and then runs
Accelerate's FSDP path on CPU (see ``accelerate_train.use_fsdp_on_cpu``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_train import MODELS, STEPS, build

from fsdp_ac.environment import suite_nproc

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "accelerate_configs"
REPO = HERE.parents[1]
LAUNCH_TIMEOUT_S = 240
LOG_TAIL_CHARS = 6000


def on_gpus() -> bool:
    return torch.cuda.device_count() >= suite_nproc()


def grad_tolerance() -> float:
    """fsdp_ac against no checkpointing: bitwise on CPU; GPU attention backward kernels may use atomics."""
    return 1e-5 if on_gpus() else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(config: str, out: Path) -> list[dict[str, Any]]:
    """Runs ``accelerate launch`` with ``config``; returns each rank's results."""
    nproc = suite_nproc()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.pop("WORLD_SIZE", None)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        FSDP_AC_CONFIG_FILE=str(CONFIGS / config),
        FSDP_AC_TIMEOUT_S=os.environ.get("FSDP_AC_TIMEOUT_S", "60"),
    )
    if not on_gpus():
        env["ACCELERATE_USE_CPU"] = "true"  # else each process would run alone (docs/accelerate.md)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        str(HERE / "accelerate_train.py"),
        str(out),
    ]
    log_path = out / "launch.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the launcher and every rank it started
            process.wait()
    if timed_out or process.returncode != 0 or not all((out / f"rank{r}.pt").exists() for r in range(nproc)):
        how = (
            f"timed out after {LAUNCH_TIMEOUT_S} s"
            if timed_out
            else f"failed (exit code {process.returncode})"
        )
        tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        pytest.fail(f"accelerate launch with {config} {how}; its last output:\n{tail}", pytrace=False)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def max_grad_diff(run: dict[str, Any], reference: dict[str, Any]) -> float:
    assert len(run["grads"]) == len(reference["grads"]) == STEPS
    diffs = []
    for grads, expected in zip(run["grads"], reference["grads"], strict=True):
        assert grads.keys() == expected.keys()
        diffs += [(grads[name] - expected[name]).abs().max().item() for name in grads]
    return max(diffs)


def tied_aliases(kind: str) -> set[str]:
    """Keys of a plain model's state dict whose tensor appeared under an earlier key (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for key, value in build(kind).state_dict().items():
        if value.data_ptr() in seen:
            aliases.add(key)
        seen.add(value.data_ptr())
    return aliases


def check_fsdp_ac(per_kind: dict[str, Any], kind: str, regions: list[str], *, fsdp: bool) -> None:
    """fsdp_ac's run: gradients, one FSDP unit and one region per block, names, checkpoints."""
    run, reference = per_kind["fsdp_ac"], per_kind["none"]
    assert max_grad_diff(run, reference) <= grad_tolerance(), kind
    assert run["structure"]["checkpoints"] == dict.fromkeys(regions, 1), kind
    if fsdp:
        assert {block: run["structure"]["units"].get(block) for block in per_kind["blocks"]} == dict.fromkeys(
            per_kind["blocks"], 1
        ), kind
    assert not [name for name in run["names"] if "_checkpoint_wrapped_module" in name], kind
    if "checkpoints" not in per_kind:
        return
    saved = per_kind["checkpoints"]
    plain_keys = list(build(kind).state_dict())
    assert saved["get_state_dict"] == plain_keys, kind
    assert set(saved["saved"]) <= set(plain_keys), kind
    assert (saved["unexpected"], set(saved["missing"]) <= tied_aliases(kind)) == ([], True), kind
    assert list(saved["loaded"]) == plain_keys, kind
    for key, value in saved["written"].items():  # a plain model's values, read back by load_state
        assert torch.equal(saved["loaded"][key], value), (kind, key)


def check_ranks_agree(results: list[dict[str, Any]]) -> None:
    for rank_results in results[1:]:
        for phase, per_phase in results[0].items():
            for kind in set(MODELS) & set(per_phase):
                for mode in ("none", "accelerate", "fsdp_ac"):
                    if mode in per_phase[kind]:
                        ours = rank_results[phase][kind][mode]
                        assert ours["structure"] == per_phase[kind][mode]["structure"], (phase, kind, mode)


def fsdp_phase(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Checks the DDP run of an FSDP config, where there was one; returns the FSDP run's results.

    Without GPUs Accelerate ran the FSDP config as DDP first: it dropped checkpointing, fsdp_ac did not.
    """
    check_ranks_agree(results)
    phases = results[0]
    if "fsdp" in phases:
        fallback = phases["as_configured"]
        assert (fallback["distributed_type"], "gpt" in fallback) == ("DistributedType.MULTI_CPU", True)
        for kind in set(MODELS) & set(fallback):
            assert fallback[kind]["accelerate"]["structure"]["checkpoints"] == {}, kind
            check_fsdp_ac(fallback[kind], kind, fallback[kind]["blocks"], fsdp=False)
            assert "fsdp_ac checkpoints the blocks anyway" in " ".join(fallback[kind]["fsdp_ac"]["warnings"])
    fsdp = phases.get("fsdp", phases["as_configured"])
    assert fsdp["distributed_type"] == "DistributedType.FSDP"
    return dict(fsdp)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_config_through_fsdp_ac(tmp_path: Path) -> None:
    """FSDP2 with fsdp_activation_checkpointing and its offload flag, the model's _no_split_modules."""
    fsdp = fsdp_phase(launch("fsdp2.yaml", tmp_path))
    for kind in MODELS:
        blocks = fsdp[kind]["blocks"]
        own = fsdp[kind]["accelerate"]
        # Accelerate's own: two nested FSDP units per block, other gradients (preserve_rng_state=False
        # with dropout), wrapper names in parameter names.
        assert {b: own["structure"]["units"][b] for b in blocks} == dict.fromkeys(blocks, 2), kind
        assert max_grad_diff(own, fsdp[kind]["none"]) > 1e-3, kind
        assert any("_checkpoint_wrapped_module" in name for name in own["names"]), kind
        check_fsdp_ac(fsdp[kind], kind, blocks, fsdp=True)
        # fsdp_activation_checkpointing_offload: each checkpointed block's input is offloaded.
        assert fsdp[kind]["fsdp_ac"]["structure"]["offloads"] == dict.fromkeys(blocks, 1), kind


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp1_config_with_selective_checkpointing(tmp_path: Path) -> None:
    """FSDP1 with fsdp_activation_checkpointing and fsdp_ac_strategy: selective in the config file."""
    fsdp = fsdp_phase(launch("fsdp1.yaml", tmp_path))
    for kind in MODELS:
        blocks = fsdp[kind]["blocks"]
        # Accelerate's FSDP1 checkpointing is placed correctly but leaks the wrapper into names.
        assert any("_checkpoint_wrapped_module" in name for name in fsdp[kind]["accelerate"]["names"]), kind
        check_fsdp_ac(fsdp[kind], kind, blocks, fsdp=True)
        assert fsdp[kind]["fsdp_ac"]["structure"]["selective"] == dict.fromkeys(blocks, 1), kind


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_ddp_config_checkpoints_every_second_block(tmp_path: Path) -> None:
    """DDP (no FSDP, no Accelerate checkpointing): fsdp_ac_policy: every:2 in the config file."""
    results = launch("ddp.yaml", tmp_path)
    check_ranks_agree(results)
    ddp = results[0]["as_configured"]
    assert ddp["distributed_type"] in ("DistributedType.MULTI_CPU", "DistributedType.MULTI_GPU")
    for kind in MODELS:
        assert "accelerate" not in ddp[kind]
        check_fsdp_ac(ddp[kind], kind, ddp[kind]["blocks"][::2], fsdp=False)
