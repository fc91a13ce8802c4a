"""Elastic restarts: killed ranks, torchrun's restart, resume from DCP, bitwise (2 ranks).

Each test starts real ``torchrun`` agents on ``elastic_train.py`` (its docstring has the checkpoint
protocol and the fault kinds) and compares the final parameters with one uninterrupted run of the same
seed and data. On 2 gloo ranks FSDP2, FSDP1 and DDP, with or without activation checkpointing of any
kind, end bitwise equal (a sum of two gradients is exact in either order, and halving is exact), so one
reference serves every test; a resumed run must match it bitwise, whatever the plan it resumed with.

Every agent runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default the restarted ranks meet
through the agent's store of the first attempt, whose gloo addresses are stale, and about half the
restarts fail in ``connectFullMesh`` (docs/testing.md, "Elastic restarts").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from elastic_train import Fault, complete_checkpoints
from launcher import kill_launch

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("elastic_train.py")
NPROC = 2
STEPS = 5
LAUNCH_TIMEOUT_S = 150.0
COLLECTIVE_TIMEOUT_S = "30"
"""``FSDP_AC_TIMEOUT_S`` of the ranks: a peer lost mid-collective fails them well within the launch."""
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Launch:
    """What a finished launch left: exit codes of the agents, their output and the script's events."""

    returncodes: list[int]
    output: str
    events: list[dict[str, Any]]
    final: dict[str, torch.Tensor] | None = field(repr=False)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def report(self) -> str:
        events = "\n".join(json.dumps(event) for event in self.events)
        return f"agents exited {self.returncodes}; events:\n{events}\nlast output:\n{self.output[-6000:]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def torchrun(
    run_dir: Path,
    *script_args: str,
    max_restarts: int = 1,
    nodes: int = 1,
    started_nodes: int | None = None,
    rdzv_conf: str = "",
    env: dict[str, str] | None = None,
    timeout_s: float = LAUNCH_TIMEOUT_S,
) -> Launch:
    """Runs ``elastic_train.py`` under ``started_nodes`` torchrun agents of ``nodes`` expected; waits.

    One node: one agent with ``NPROC`` ranks (``--standalone``). Several: one agent per node with one
    rank each, meeting through a c10d rendezvous on a free local port, as on separate machines.
    Whatever happens, every agent and rank is gone on return, and the test fails if one is not.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    common = [f"--max-restarts={max_restarts}", "--monitor-interval=0.5"]
    if nodes == 1:
        common += ["--standalone", f"--nproc_per_node={NPROC}"]
    else:
        common += [
            f"--nnodes={nodes}",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=localhost:{free_port()}",
            f"--rdzv-id={run_dir.name}",
        ]
    if rdzv_conf:
        common.append(f"--rdzv-conf={rdzv_conf}")
    launch_env = {
        key: value
        for key, value in os.environ.items()
        if key not in TORCHRUN_ENV and not key.startswith("TORCHELASTIC_")
    }
    launch_env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(path or os.getcwd() for path in sys.path),
        FSDP_AC_TIMEOUT_S=COLLECTIVE_TIMEOUT_S,
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    launch_env.update(env or {})
    command = [sys.executable, "-m", "torch.distributed.run", *common, str(SCRIPT), "--run-dir", str(run_dir)]
    logs = [run_dir / f"agent{index}.log" for index in range(started_nodes or nodes)]
    agents = []
    for log in logs:
        with open(log, "wb") as out:
            agents.append(
                subprocess.Popen(
                    [*command, *script_args],
                    env=launch_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # so kill_launch reaches this agent and nothing else
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        for agent in agents:
            agent.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for agent in agents:
            kill_launch(agent, run_dir, NPROC)
    output = "\n".join(
        f"--- agent {index} ---\n{log.read_text(errors='replace')}" for index, log in enumerate(logs)
    )
    events_file = run_dir / "events.jsonl"
    events = (
        [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    )
    final = torch.load(run_dir / "final.pt") if (run_dir / "final.pt").exists() else None
    launch = Launch([agent.returncode for agent in agents], output, events, final)
    leftovers = processes_naming(run_dir)
    assert not leftovers, f"processes left behind: {leftovers}\n{launch.report()}"
    return launch


def processes_naming(run_dir: Path) -> list[str]:
    """Command lines of running processes that name ``run_dir`` (an agent or a rank of this launch)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def mismatches(actual: dict[str, torch.Tensor] | None, expected: dict[str, torch.Tensor]) -> list[str]:
    if actual is None:
        return ["no final parameters"]
    if sorted(actual) != sorted(expected):
        return [f"names differ: {sorted(set(actual) ^ set(expected))}"]
    return [
        f"{name} differs by {(value - expected[name]).abs().max().item():g}"
        for name, value in actual.items()
        if not torch.equal(value, expected[name])
    ]


def assert_finished_like(launch: Launch, reference: dict[str, torch.Tensor]) -> None:
    assert launch.returncodes == [0] * len(launch.returncodes), launch.report()
    problems = mismatches(launch.final, reference)
    assert not problems, f"{problems[:3]}\n{launch.report()}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final parameters of one uninterrupted run (FSDP2, no AC) on one agent with 2 ranks."""
    launch = torchrun(tmp_path_factory.mktemp("reference"), "--steps", str(STEPS), "--ac", "none")
    assert launch.returncodes == [0] and launch.final is not None, launch.report()
    assert not launch.of("resume"), launch.report()
    return launch.final


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("parallel", "ac", "fault", "resumed_at"),
    [
        # A crash without a Python error after step 2's update: step 2 is lost, redone from step 1's
        # save, with the same plan.
        ("fsdp2", "full", "exit@1:2", 2),
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
    assert "failed (exitcode" in launch.output, "torchrun reports the failed rank before restarting"


@pytest.mark.timeout(300)
def test_two_agents_with_c10d_rendezvous_match_one_agent(
    tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    # Two "nodes" of one rank each, with a restart: both agents must meet again in a new round.
    launch = torchrun(tmp_path / "run", "--steps", str(STEPS), "--fault", "exit@1:2", nodes=2)
    assert_finished_like(launch, reference)
    assert [event["step"] for event in launch.of("resume")] == [2], launch.report()


@pytest.mark.timeout(120)
def test_node_that_never_joins_fails_fast_naming_the_rendezvous(tmp_path: Path) -> None:
    started = time.monotonic()
    launch = torchrun(tmp_path / "run", nodes=2, started_nodes=1, rdzv_conf="join_timeout=5")
    assert launch.returncodes != [0], launch.report()
    assert time.monotonic() - started < 60, launch.report()
    assert "RendezvousTimeoutError" in launch.output, launch.report()
    assert not launch.events, "no rank may start without its peers"


@pytest.mark.timeout(120)
def test_hang_ends_in_a_report_naming_the_rank_and_the_timeout(tmp_path: Path) -> None:
    # Rank 0 hangs before step 2; rank 1's next collective times out after FSDP_AC_TIMEOUT_S, and
    # without restarts left torchrun's report names rank 1 and the timeout; the event log names the
    # hung rank.
    launch = torchrun(
        tmp_path / "run",
        *("--steps", str(STEPS), "--fault", "hang@0:2"),
        max_restarts=0,
        env={"FSDP_AC_TIMEOUT_S": "8"},
    )
    assert launch.returncodes == [1], launch.report()
    assert launch.final is None
    hung = [(event["kind"], event["rank"], event["step"]) for event in launch.of("fault")]
    assert hung == [("hang", 0, 2)], launch.report()
    summary = launch.output[launch.output.rindex("Root Cause") :]
    assert "rank      : 1" in summary and "timed out" in summary.lower(), summary


def test_only_renamed_checkpoints_count_and_bad_faults_are_refused(tmp_path: Path) -> None:
    for name in ("step_000001", "step_000003", "step_000004.partial", "notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert complete_checkpoints(tmp_path) == [1, 3]
    assert Fault.parse("savekill@1:3") == Fault("savekill", 1, 3)
    with pytest.raises(ValueError, match="KIND@RANK:STEP"):
        Fault.parse("kill@1")
