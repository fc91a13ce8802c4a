"""Elastic restarts: killed ranks, torchrun's restart, resume from DCP, bitwise (2 ranks).

Each test starts real ``torchrun`` agents on ``elastic_train.py`` (its docstring has the checkpoint
protocol and the fault kinds) and compares the final parameters with one uninterrupted run of the same
seed and data. On 2 gloo ranks FSDP2, FSDP1 and DDP, with or without activation checkpointing of any
kind, end bitwise equal (a sum of two gradients is exact in either order, and halving is exact), so one
reference serves every test; a resumed run must match it bitwise, whatever the plan it resumed with.

The launching side, and why every agent runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, is in
``elastic_launch.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from elastic_launch import Launch, mismatches, torchrun
from elastic_train import Fault, complete_checkpoints
from filelock import FileLock

pytestmark = pytest.mark.distributed

STEPS = 5


def assert_finished_like(launch: Launch, reference: dict[str, torch.Tensor]) -> None:
    assert launch.returncodes == [0] * len(launch.returncodes), launch.report()
    problems = mismatches(launch.final, reference)
    assert not problems, f"{problems[:3]}\n{launch.report()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final parameters of one uninterrupted run (FSDP2, no AC) on one agent with 2 ranks.

    Run once per session: pytest-xdist's workers share the parent of their base temporary directories
    (``pytest-N/popen-gwK``), and a file lock (filelock comes with torch) lets the first one run it and
    the others read it. Without xdist the parent is shared by every session, so the base itself serves.
    """
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent
    with FileLock(shared / "elastic_reference.lock"):
        saved = shared / "elastic_reference.pt"
        if not saved.exists():
            launch = torchrun(shared / "elastic_reference", "--steps", str(STEPS), "--ac", "none")
            assert launch.returncodes == [0] and launch.final is not None, launch.report()
            assert not launch.of("resume"), launch.report()
            torch.save(launch.final, saved)
        return torch.load(saved)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("parallel", "ac", "fault", "resumed_at"),
    [
        # SIGKILL of rank 0, the rank that commits checkpoints; resumed as FSDP1 with selective AC.
        ("fsdp2,fsdp1", "full,selective", "sigkill@0:3", 3),
        # Death inside step 3's save, after this rank's shard: the torn checkpoint is never loaded;
        # resumed from FSDP1 with a plan (full, selective, none) as DDP without AC.
        ("fsdp1,ddp", "plan,none", "savekill@1:3", 3),
    ],
)
def test_killed_rank_restarts_and_resumes_bitwise(
    parallel: str, ac: str, fault: str, resumed_at: int, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    launch = torchrun(
        tmp_path / "run", "--steps", str(STEPS), "--parallel", parallel, "--ac", ac, "--fault", fault
    )
    assert_finished_like(launch, reference)
    assert len(launch.of("fault")) == 1, launch.report()
    resumed = [(event["parallel"], event["ac"], event["step"]) for event in launch.of("resume")]
    assert resumed == [(parallel.split(",")[-1], ac.split(",")[-1], resumed_at)], launch.report()
    torn = [(event["checkpoint"], event["had_metadata"]) for event in launch.of("discard")]
    if fault.startswith("savekill"):
        # The interrupted save left its directory, without the metadata that makes it loadable.
        assert torn == [("step_000003.partial", False)], launch.report()
    assert f"injected {fault.split(':')[0].replace('@', ' on rank ')} at step" in launch.diagnosis()
    assert "torchrun saw local rank" in launch.diagnosis(), "torchrun reports a failed rank before restarting"


@pytest.mark.timeout(300)
def test_two_agents_with_c10d_rendezvous_match_one_agent(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    # Two "nodes" of one rank each; rank 1 crashes without a Python error after step 2's update, so
    # step 2 is lost and redone from step 1's save with the same plan (FSDP2, full AC): both agents
    # must meet again in a new round, where restart counts may differ between them.
    launch = torchrun(tmp_path / "run", "--steps", str(STEPS), "--fault", "exit@1:2", nodes=2)
    assert_finished_like(launch, reference)
    assert [event["step"] for event in launch.of("resume")] == [2], launch.report()


@pytest.mark.timeout(300)
def test_node_that_never_joins_fails_fast_naming_the_rendezvous(tmp_path: Path) -> None:
    started = time.monotonic()
    launch = torchrun(tmp_path / "run", nodes=2, started_nodes=1, rdzv_conf="join_timeout=5")
    assert launch.returncodes != [0], launch.report()
    assert time.monotonic() - started < 60, launch.report()
    assert "the rendezvous timed out: not every node joined" in launch.diagnosis(), launch.report()
    assert not launch.events, "no rank may start without its peers"


@pytest.mark.timeout(300)
def test_hang_ends_in_a_report_naming_the_rank_and_the_timeout(tmp_path: Path) -> None:
    # Rank 0 hangs before step 2; rank 1's next collective times out after FSDP_AC_TIMEOUT_S, and
    # without restarts left the diagnosis names rank 1 and the timeout (torchrun's root cause) and the
    # hung rank.
    launch = torchrun(
        tmp_path / "run",
        *("--steps", str(STEPS), "--fault", "hang@0:2"),
        max_restarts=0,
        env={"FSDP_AC_TIMEOUT_S": "8"},
    )
    assert launch.returncodes == [1], launch.report()
    assert launch.final is None
    diagnosis = launch.diagnosis().splitlines()
    assert diagnosis[0] == "injected hang on rank 0 at step 2 of attempt 0", launch.report()
    assert diagnosis[-1].startswith("the job failed: rank 1 exited with code 1: RuntimeError"), (
        launch.report()
    )
    assert "Timed out waiting 8000ms" in diagnosis[-1], launch.report()


def test_only_renamed_checkpoints_count_and_bad_faults_are_refused(tmp_path: Path) -> None:
    for name in ("step_000001", "step_000003", "step_000004.partial", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert complete_checkpoints(tmp_path) == [1, 3]
    assert Fault.parse("savekill@1:3") == Fault("savekill", 1, 3)
    with pytest.raises(ValueError, match="KIND@RANK:STEP"):
        Fault.parse("kill@1")
