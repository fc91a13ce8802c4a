"""Starts torchrun agents on ``elastic_train.py`` and collects what they left, for tests and the soak.

:func:`torchrun` runs one job: one agent with ``nproc`` ranks (``--standalone``), or one agent per
"node" with one rank each meeting through a c10d rendezvous on a free local port, as separate machines
would. It waits, kills whatever is left (agents and ranks), checks that no process naming the run
directory survives, and returns a :class:`Launch`: the agents' exit codes and output, the events the
script logged, and its final parameters.

Every agent runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` unless told otherwise: by default the
ranks of every restart meet through the one TCP store the agent opened for the first attempt, whose
gloo keys (the previous attempt's addresses) are still there, and restarts then fail in
``connectFullMesh`` about half the time (docs/testing.md, "Elastic restarts").
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from launcher import exit_description, kill_launch, launch_environment  # the harness's wording of exit codes

__all__ = ["SCRIPT", "Launch", "mismatches", "torchrun"]

SCRIPT = Path(__file__).with_name("elastic_train.py")
COLLECTIVE_TIMEOUT_S = "30"
"""``FSDP_AC_TIMEOUT_S`` of the ranks unless given: a peer lost mid-collective fails them quickly."""


@dataclass
class Launch:
    """What a finished launch left."""

    returncodes: list[int]
    """Exit code of each agent; negative for a signal (the launch timed out and was killed)."""
    output: str
    """Every agent's output (its ranks' output included), one after the other."""
    events: list[dict[str, Any]]
    """The script's ``events.jsonl``, in order."""
    final: dict[str, torch.Tensor] | None = field(repr=False)
    """The full final parameters; None when the run did not finish."""
    seconds: float = 0.0
    """Wall time of the launch."""

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events named ``kind`` (``start``, ``resume``, ``discard``, ``fault``, ``step``, ``done``)."""
        return [event for event in self.events if event["event"] == kind]

    def diagnosis(self) -> str:
        """What went wrong, in words: injected faults, failed ranks and their causes, known traps.

        Reads the event log and torchrun's output: each "failed (exitcode: ...)" line of an agent (a
        restart followed), the "Root Cause" of a launch that failed (rank, exit code or signal, the
        error's last line), a rendezvous that timed out, and gloo's stale-address failure.
        """
        lines = [
            f"injected {f['kind']} on rank {f['rank']} at step {f['step']} of attempt {f['attempt']}"
            for f in self.of("fault")
        ]
        for exitcode, local_rank in re.findall(
            r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)", self.output
        ):
            lines.append(f"torchrun saw local rank {local_rank} fail: {exit_description(int(exitcode))}")
        for block in re.findall(r"Root Cause \(first observed failure\):(.*?)\n=+", self.output, re.DOTALL):
            rank = re.search(r"rank\s+: (\d+)", block)
            exitcode = re.search(r"exitcode\s+: (-?\d+)", block)
            errors = re.findall(r"^\s*((?:\w+\.)*\w*(?:Error|Exception|Signal)\b.*)$", block, re.MULTILINE)
            lines.append(
                f"the job failed: rank {rank[1] if rank else '?'} "
                f"{exit_description(int(exitcode[1])) if exitcode else ''}"
                f"{': ' + errors[-1].strip() if errors else ''}"
            )
        if "RendezvousTimeoutError" in self.output:
            lines.append(
                "the rendezvous timed out: not every node joined within join_timeout; check that every "
                "agent started, with the same --rdzv-endpoint, --rdzv-id and --nnodes"
            )
        if "Failed to parse reply file" in self.output:
            lines.append(
                "torchrun's agent died reading a truncated error file of a rank it was stopping, so it "
                "did not restart the group: write error files by a rename (elastic_train.record_atomically)"
            )
        if "connectFullMesh" in self.output:
            lines.append(
                "gloo could not connect the restarted ranks (stale peer addresses in torchrun's shared "
                "store): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every agent (docs/testing.md)"
            )
        return "\n".join(lines) or "no fault, failed rank or known cause found in the events and output"

    def report(self) -> str:
        """The diagnosis, exit codes, events (without the steps) and the end of the output."""
        events = "\n".join(json.dumps(event) for event in self.events if event["event"] != "step")
        return (
            f"{self.diagnosis()}\nagents exited {self.returncodes}; events:\n{events}\n"
            f"last output:\n{self.output[-6000:]}"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def torchrun(
    run_dir: Path,
    *script_args: str,
    nproc: int = 2,
    max_restarts: int = 1,
    nodes: int = 1,
    started_nodes: int | None = None,
    rdzv_conf: str = "",
    env: dict[str, str] | None = None,
    timeout_s: float = 150.0,
) -> Launch:
    """Runs ``elastic_train.py --run-dir run_dir *script_args`` under torchrun and waits for it.

    Args:
        run_dir: Where the script keeps its checkpoints, events and agents' logs; created.
        *script_args: The script's other arguments.
        nproc: Ranks in all; with several nodes, one per node.
        max_restarts: torchrun's ``--max-restarts``.
        nodes: Agents the rendezvous waits for; more than one uses a c10d rendezvous.
        started_nodes: Agents actually started (fewer than ``nodes``: a node that never joins).
        rdzv_conf: torchrun's ``--rdzv-conf`` (e.g. ``join_timeout=5``).
        env: Extra environment of the agents (and so of the ranks).
        timeout_s: The whole launch; past it every agent and rank is killed.

    Raises:
        RuntimeError: A process of this launch survived the clean-up.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    options = [f"--max-restarts={max_restarts}", "--monitor-interval=0.5"]
    if nodes == 1:
        options += ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        options += [
            f"--nnodes={nodes}",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=localhost:{_free_port()}",
            f"--rdzv-id={run_dir.name}",
        ]
    if rdzv_conf:
        options.append(f"--rdzv-conf={rdzv_conf}")
    launch_env = launch_environment()
    launch_env.update(FSDP_AC_TIMEOUT_S=COLLECTIVE_TIMEOUT_S, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    launch_env.update(env or {})
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *options,
        str(SCRIPT),
        "--run-dir",
        str(run_dir),
    ]
    logs = [run_dir / f"agent{index}.log" for index in range(started_nodes or nodes)]
    started = time.monotonic()
    agents = []
    for log in logs:
        with open(log, "wb") as out:
            agents.append(
                subprocess.Popen(
                    [*command, *script_args],
                    env=launch_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # so that kill_launch reaches this agent and nothing else
                )
            )
    try:
        for agent in agents:
            agent.wait(timeout=max(started + timeout_s - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for agent in agents:
            kill_launch(agent, run_dir, nproc)
    output = "\n".join(
        f"--- agent {index} ---\n{log.read_text(errors='replace')}" for index, log in enumerate(logs)
    )
    events_file = run_dir / "events.jsonl"
    events = (
        [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    )
    final = torch.load(run_dir / "final.pt") if (run_dir / "final.pt").exists() else None
    launch = Launch([agent.returncode for agent in agents], output, events, final, time.monotonic() - started)
    leftovers = _processes_naming(run_dir)
    if leftovers:
        raise RuntimeError(
            f"Processes of the launch in {run_dir} survived it: {leftovers}\n{launch.report()}"
        )
    return launch


def _processes_naming(run_dir: Path) -> list[str]:
    """Command lines of running processes that name ``run_dir`` (an agent or a rank of the launch)."""
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
    """How two sets of parameters differ, in words; empty when they are bitwise equal."""
    if actual is None:
        return ["no final parameters (the run did not finish)"]
    if sorted(actual) != sorted(expected):
        return [f"names differ: {sorted(set(actual) ^ set(expected))}"]
    return [
        f"{name} differs by {(value - expected[name]).abs().max().item():g}"
        for name, value in actual.items()
        if not torch.equal(value, expected[name])
    ]
