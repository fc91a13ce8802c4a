"""``accelerate launch`` with FSDP2, FSDP1 and DDP configs, through ``fsdp_ac.accelerate.prepare``.

Each test runs ``FSDP_AC_NPROC`` processes (default 2) of ``accelerate_train.py`` with one config file
of ``accelerate_configs/`` (gloo on CPU; NCCL where there is a GPU per process) and checks, on every
rank, for the reference GPT with dropout and a tiny ``LlamaForCausalLM`` with attention dropout:

- fsdp_ac's losses, gradients and trained parameters against those of the same run without
  activation checkpointing, bitwise;
- the FSDP units and checkpoint wrappers each block got (exactly one of each), and the recomputation
  itself: each step's backward reruns every checkpointed block's activation once, and no other;
- the names of parameters and of the keys that ``get_state_dict`` gives each rank and ``save_state``
  writes, which a plain model loads, and the parameters each rank holds after ``load_state`` read
  back a plain model's values;
- Accelerate's own activation checkpointing in the same run: the defects fsdp_ac fixes;
- the ranks against each other: the same structure, names, full gradients and parameters (the
  reductions make them equal), and different losses (each rank trains on its own batch).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_train import MODELS, STEPS, build
from suite_settings import suite_nproc
from upstream import shows

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "accelerate_configs"
REPO = HERE.parents[1]
LAUNCH_TIMEOUT_S = 240
LOG_TAIL_CHARS = 6000


def on_gpus() -> bool:
    return torch.cuda.device_count() >= suite_nproc()


def tolerance() -> float:
    """fsdp_ac against no checkpointing: bitwise on CPU; GPU attention backward kernels may use atomics."""
    return 1e-5 if on_gpus() else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    config: str | None,
    out: Path,
    script: Sequence[str] = (),
    script_args: Sequence[str] = (),
    settings: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Runs ``accelerate launch`` with ``config`` (``torchrun`` when None); returns each rank's results.

    ``script``: what the launcher runs, ``accelerate_train.py`` by default (other scripts write
    ``OUT/rank<r>.pt`` alike), e.g. ``["-m", "fsdp_ac.run", "trainer_train.py"]``; ``script_args``
    follow ``OUT``. ``settings``: more environment variables (``FSDP_AC_*``) for the ranks. Under
    ``torchrun`` no ``ACCELERATE_*`` variable or config file is set: the script's ``Accelerator``
    (``Trainer``'s) runs as a plain ``torchrun`` job makes it, DDP.
    """
    nproc = suite_nproc()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.pop("WORLD_SIZE", None)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE.parent), env.get("PYTHONPATH", "")]),
        FSDP_AC_TIMEOUT_S=os.environ.get("FSDP_AC_TIMEOUT_S", "60"),
        **(settings or {}),
    )
    if config is None:
        launcher = "torchrun"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
    else:
        launcher = f"accelerate launch with {config}"
        env["FSDP_AC_CONFIG_FILE"] = str(CONFIGS / config)
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
        ]
    command += [*(script or [str(HERE / "accelerate_train.py")]), str(out), *script_args]
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
        pytest.fail(f"{launcher} {how}; its last output:\n{tail}", pytrace=False)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def max_diff(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert run.keys() == reference.keys()
    return max((run[name] - reference[name]).abs().max().item() for name in run)


def max_grad_diff(run: dict[str, Any], reference: dict[str, Any]) -> float:
    assert len(run["grads"]) == len(reference["grads"]) == STEPS
    return max(
        max_diff(grads, expected) for grads, expected in zip(run["grads"], reference["grads"], strict=True)
    )


def leaks_wrapper(run: dict[str, Any]) -> bool:
    """Whether a run's parameter names carry the checkpoint wrapper's prefix."""
    return any("_checkpoint_wrapped_module" in name for name in run["names"])


def tied_aliases(kind: str) -> set[str]:
    """Keys of a plain model's state dict whose tensor appeared under an earlier key (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for key, value in build(kind).state_dict().items():
        if value.data_ptr() in seen:
            aliases.add(key)
        seen.add(value.data_ptr())
    return aliases


def ranks_of(results: list[dict[str, Any]], phase: str, kind: str) -> list[dict[str, Any]]:
    """What every rank recorded for ``kind`` in ``phase``, by rank."""
    return [rank_results[phase][kind] for rank_results in results]


def check_checkpoints(ranks: list[dict[str, Any]], kind: str, *, fsdp: bool) -> None:
    """Keys on every rank, the file the main process read, and every rank's parameters after a load.

    Accelerate gathers an FSDP state dict on rank 0 only (FSDP1's ``rank0_only``, FSDP2's
    ``cpu_offload``), so the other ranks get an empty one; under DDP every rank gets the whole.
    """
    plain_keys = list(build(kind).state_dict())
    main = ranks[0]["checkpoints"]
    assert main["saved"] and set(main["saved"]) <= set(plain_keys), kind
    assert (main["unexpected"], set(main["missing"]) <= tied_aliases(kind)) == ([], True), kind
    for rank, per_kind in enumerate(ranks):
        saved = per_kind["checkpoints"]
        expected_keys = plain_keys if rank == 0 or not fsdp else []
        assert saved["get_state_dict"] == expected_keys, (kind, rank)
        assert saved["loaded_keys"] == expected_keys, (kind, rank)
        assert list(saved["loaded"]) == plain_keys, (kind, rank)
        for key, value in main["written"].items():  # a plain model's values, read back by load_state
            assert torch.equal(saved["loaded"][key], value), (kind, rank, key)


def check_fsdp_ac(ranks: list[dict[str, Any]], kind: str, regions: list[str], *, fsdp: bool) -> None:
    """fsdp_ac's run on every rank: losses, gradients, parameters, one FSDP unit and one region per
    block, names, checkpoints."""
    for rank, per_kind in enumerate(ranks):
        run, reference = per_kind["fsdp_ac"], per_kind["none"]
        where = (kind, f"rank {rank}")
        torch.testing.assert_close(
            run["losses"], reference["losses"], rtol=0, atol=tolerance(), msg=str(where)
        )
        assert max_grad_diff(run, reference) <= tolerance(), where
        assert max_diff(run["params"], reference["params"]) <= tolerance(), where
        assert run["structure"]["checkpoints"] == dict.fromkeys(regions, 1), where
        assert (run["recomputed"], reference["recomputed"]) == ([len(regions)] * STEPS, [0] * STEPS), where
        if fsdp:
            units = {block: run["structure"]["units"].get(block) for block in per_kind["blocks"]}
            assert units == dict.fromkeys(per_kind["blocks"], 1), where
        assert not leaks_wrapper(run), where
    if "checkpoints" in ranks[0]:
        check_checkpoints(ranks, kind, fsdp=fsdp)


def check_ranks_agree(results: list[dict[str, Any]]) -> None:
    """Every rank against rank 0, in every phase, model and mode.

    The same structure and names; bitwise the same full gradients and trained parameters (DDP's
    all-reduce and FSDP's reduce-scatter and all-gather hand every rank the same values); and other
    losses, since each rank trains on its own batch (equal losses would mean a rank trained on
    another's data, and the agreement above would prove nothing about the reduction).
    """
    for phase, per_phase in results[0].items():
        for kind in set(MODELS) & set(per_phase):
            for mode in set(per_phase[kind]) & {"none", "accelerate", "fsdp_ac"}:
                first = per_phase[kind][mode]
                for rank, rank_results in enumerate(results[1:], start=1):
                    ours, where = rank_results[phase][kind][mode], (phase, kind, mode, f"rank {rank}")
                    assert ours["structure"] == first["structure"], where
                    assert ours["names"] == first["names"], where
                    assert max_grad_diff(ours, first) == 0, where
                    assert max_diff(ours["params"], first["params"]) == 0, where
                    assert not torch.equal(ours["losses"], first["losses"]), where


def fsdp_phase(results: list[dict[str, Any]]) -> str:
    """Checks the DDP run of an FSDP config, where there was one; returns the FSDP run's phase.

    Without GPUs Accelerate ran the FSDP config as DDP first: it dropped checkpointing, fsdp_ac did not.
    """
    check_ranks_agree(results)
    if "fsdp" in results[0]:
        for rank_results in results:
            fallback = rank_results["as_configured"]
            assert (fallback["distributed_type"], "gpt" in fallback) == ("DistributedType.MULTI_CPU", True)
        for kind in set(MODELS) & set(results[0]["as_configured"]):
            ranks = ranks_of(results, "as_configured", kind)
            for rank, per_kind in enumerate(ranks):
                own = per_kind["accelerate"]
                shows(
                    "accelerate",
                    f"an FSDP config run as DDP on CPU drops activation checkpointing ({kind}, rank {rank})",
                    own["structure"]["checkpoints"] == {} and own["recomputed"] == [0] * STEPS,
                )
                warned = " ".join(per_kind["fsdp_ac"]["warnings"])
                assert "fsdp_ac checkpoints the blocks anyway" in warned, (kind, rank)
            check_fsdp_ac(ranks, kind, ranks[0]["blocks"], fsdp=False)
    phase = "fsdp" if "fsdp" in results[0] else "as_configured"
    for rank_results in results:
        assert rank_results[phase]["distributed_type"] == "DistributedType.FSDP"
    return phase


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp2_config_through_fsdp_ac(tmp_path: Path) -> None:
    """FSDP2 with fsdp_activation_checkpointing and its offload flag, the model's _no_split_modules."""
    results = launch("fsdp2.yaml", tmp_path)
    phase = fsdp_phase(results)
    for kind in MODELS:
        ranks = ranks_of(results, phase, kind)
        blocks = ranks[0]["blocks"]
        for rank, per_kind in enumerate(ranks):
            own, where = per_kind["accelerate"], (kind, f"rank {rank}")
            units = {b: own["structure"]["units"].get(b) for b in blocks}
            # Accelerate's own FSDP2 checkpointing, recorded (docs/accelerate.md, "What fsdp_ac fixes").
            shows(
                "accelerate", f"two nested FSDP2 units per block {where}", units == dict.fromkeys(blocks, 2)
            )
            shows(
                "accelerate",
                f"preserve_rng_state=False: dropout gradients differ from no AC {where}",
                max_grad_diff(own, per_kind["none"]) > 1e-3,
            )
            shows("accelerate", f"_checkpoint_wrapped_module in parameter names {where}", leaks_wrapper(own))
            shows("accelerate", f"recomputes every block {where}", own["recomputed"] == [len(blocks)] * STEPS)
            # fsdp_activation_checkpointing_offload: each checkpointed block's input is offloaded.
            assert per_kind["fsdp_ac"]["structure"]["offloads"] == dict.fromkeys(blocks, 1), where
        check_fsdp_ac(ranks, kind, blocks, fsdp=True)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp1_config_with_selective_checkpointing(tmp_path: Path) -> None:
    """FSDP1 with fsdp_activation_checkpointing and fsdp_ac_strategy: selective in the config file."""
    results = launch("fsdp1.yaml", tmp_path)
    phase = fsdp_phase(results)
    for kind in MODELS:
        ranks = ranks_of(results, phase, kind)
        blocks = ranks[0]["blocks"]
        for rank, per_kind in enumerate(ranks):
            where = (kind, f"rank {rank}")
            own = per_kind["accelerate"]
            # Accelerate's FSDP1 checkpointing is placed correctly but leaks the wrapper into names.
            shows(
                "accelerate",
                f"FSDP1: _checkpoint_wrapped_module in parameter names {where}",
                leaks_wrapper(own),
            )
            shows(
                "accelerate",
                f"FSDP1: recomputes every block {where}",
                own["recomputed"] == [len(blocks)] * STEPS,
            )
            assert per_kind["fsdp_ac"]["structure"]["selective"] == dict.fromkeys(blocks, 1), where
        check_fsdp_ac(ranks, kind, blocks, fsdp=True)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_fsdp1_flat_parameters_config_with_offload(tmp_path: Path) -> None:
    """Accelerate's FSDP1 default (use_orig_params off) with offloaded checkpoint inputs
    (fsdp_ac_offload: Accelerate 1.15 and 1.16 allow its own offload flag with FSDP2 only): each block's FSDP1
    flat unit holds one checkpoint wrapper that offloads; training, saving and loading match the run
    without checkpointing."""
    results = launch("fsdp1_offload.yaml", tmp_path)
    phase = fsdp_phase(results)
    for kind in MODELS:
        ranks = ranks_of(results, phase, kind)
        blocks = ranks[0]["blocks"]
        for rank, per_kind in enumerate(ranks):
            where = (kind, f"rank {rank}")
            assert per_kind["fsdp_ac"]["structure"]["offloads"] == dict.fromkeys(blocks, 1), where
        # Includes the saved, gathered and loaded state dicts' keys: a plain model's, no _flat_param.
        check_fsdp_ac(ranks, kind, blocks, fsdp=True)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_ddp_config_checkpoints_every_second_block(tmp_path: Path) -> None:
    """DDP (no FSDP, no Accelerate checkpointing): fsdp_ac_policy: every:2 in the config file."""
    results = launch("ddp.yaml", tmp_path)
    check_ranks_agree(results)
    for rank_results in results:
        ddp = rank_results["as_configured"]
        assert ddp["distributed_type"] in ("DistributedType.MULTI_CPU", "DistributedType.MULTI_GPU")
        assert "accelerate" not in ddp["gpt"] and "accelerate" not in ddp["llama"]
    for kind in MODELS:
        ranks = ranks_of(results, "as_configured", kind)
        check_fsdp_ac(ranks, kind, ranks[0]["blocks"][::2], fsdp=False)


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_ddp_config_with_a_memory_budget(tmp_path: Path) -> None:
    """``budget:0.7`` with a sample shape (the script prepares no DataLoader): rank 0 profiles and
    plans, every rank applies the same plan, and training is bitwise that without checkpointing."""
    settings = {"FSDP_AC_POLICY": "budget:0.7", "FSDP_AC_SAMPLE_SHAPE": "2,12"}
    results = launch("ddp.yaml", tmp_path, settings=settings)
    check_ranks_agree(results)
    for kind in MODELS:
        ranks = ranks_of(results, "as_configured", kind)
        plans = [per_kind["fsdp_ac"]["applied"] for per_kind in ranks]
        assert all(plan == plans[0] for plan in plans), (kind, plans)
        # 0.7 of no AC's bytes: some block is checkpointed, and (two blocks) not every one fully.
        assert plans[0] and list(plans[0].values()) != ["full", "full"], (kind, plans[0])
        check_fsdp_ac(ranks, kind, list(plans[0]), fsdp=False)
