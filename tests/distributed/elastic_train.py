"""Trains the reference GPT under torchrun, checkpointing with DCP every step, and survives restarts.

Run by ``test_elastic.py`` and ``tests/tools/soak.py`` exactly as a user's elastic job runs::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 python -m torch.distributed.run --standalone \\
        --nproc_per_node 2 --max-restarts 1 tests/distributed/elastic_train.py --run-dir RUN \\
        --steps 6 --parallel fsdp2 --ac full --fault exit@1:3

Every step trains one Adam step on a fixed global batch (``--seed`` and the step index give it, so the
step index *is* the data position), then saves the model, the optimizer and the data position with
``torch.distributed.checkpoint`` into ``RUN/checkpoints/step_NNNNNN.partial``; once every rank has
written its part and rank 0 the metadata, rank 0 renames it to ``step_NNNNNN``. A rename is atomic,
so a directory without ``.partial`` is always complete, and a save interrupted by a fault leaves only
a ``.partial`` directory, which the next attempt deletes and never loads. At start, rank 0 picks the
newest complete checkpoint, tells the other ranks, and every rank resumes from the step after it.

Each attempt (``TORCHELASTIC_RESTART_COUNT``) may build the model another way: ``--parallel`` and
``--ac`` take comma-separated lists, and attempt ``i`` uses item ``min(i, len - 1)``; DCP loads a
checkpoint saved by any of them into any other (with several agents, whose restart counts may differ,
give one item). ``--fault`` takes a comma-separated schedule of ``KIND@RANK:STEP``: the ``i``-th fault
of the job makes rank ``RANK`` fail at ``STEP``, once ``i`` faults are in ``events.jsonl`` (so each
fault happens once, whatever the agents' restart counts):

- ``exit``: ``os._exit`` after the step's update, before its save (a crash without a Python error);
- ``sigkill``: ``SIGKILL`` at the same point (the OOM killer, a node's agent shooting it);
- ``savekill``: ``os._exit`` inside the save, after this rank wrote its shard and before the metadata
  (the torn checkpoint case);
- ``hang``: sleeps before the step, so its peers' next collective times out (``FSDP_AC_TIMEOUT_S``).

Rank 0 appends one JSON line per event to ``RUN/events.jsonl`` (``start``, ``resume``, ``discard``,
``step``, ``done``; the failing rank its ``fault``) and writes the full final parameters to
``RUN/final.pt``. ``RUN`` must be on a filesystem every node shares, as DCP's file storage needs.
A failed rank's traceback reaches torchrun's report through torch's
:func:`~torch.distributed.elastic.multiprocessing.errors.record`, its error file published by a
rename (:func:`record_atomically`).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from launcher import exit_with_parent
from suite_settings import collective_timeout
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from fsdp_ac import (
    ActivationPlan,
    CheckpointImpl,
    ModulePolicy,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    fully_shard_by_policy,
)
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

SIZES = {
    # The suite's model (tests/distributed/training.py): a step takes milliseconds.
    "tiny": (GPTConfig(vocab_size=128, max_seq_len=16, d_model=64, n_heads=4, n_layers=2, dropout=0.0), 2),
    # scripts/demo.py's defaults, for the soak.
    "demo": (GPTConfig(vocab_size=512, max_seq_len=128, d_model=128, n_heads=4, n_layers=4, dropout=0.0), 4),
}
"""Model configuration and sequences per rank and step, by ``--size``."""
PARALLELS = ("fsdp2", "fsdp1", "ddp")
AC_STRATEGIES = ("none", "full", "selective", "plan")
FAULTS = ("exit", "sigkill", "savekill", "hang")
FAULT_EXIT_CODE = 13
"""Exit code of an injected ``exit`` or ``savekill``, so reports tell it from a real failure."""
LR = 1e-3
CHECKPOINT = re.compile(r"step_(\d{6})")
KEEP_CHECKPOINTS = 2
"""Complete checkpoints kept: the newest, and the one before in case the newest's files are lost."""


@dataclass(frozen=True)
class Fault:
    """A failure to inject: ``kind`` on ``rank`` at ``step`` (0-based) of one attempt."""

    kind: str
    rank: int
    step: int

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``KIND@RANK:STEP``, e.g. ``sigkill@1:3``."""
        match = re.fullmatch(r"(\w+)@(\d+):(\d+)", text)
        if match is None or match[1] not in FAULTS:
            raise ValueError(f"--fault items are KIND@RANK:STEP with KIND in {FAULTS}; got {text!r}.")
        return cls(match[1], int(match[2]), int(match[3]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints, events and results")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps in all (default: 6)")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument("--parallel", default="fsdp2", help=f"per attempt, comma-separated, of {PARALLELS}")
    parser.add_argument("--ac", default="full", help=f"per attempt, comma-separated, of {AC_STRATEGIES}")
    parser.add_argument(
        "--fault", default="", help="the job's faults in turn, comma-separated KIND@RANK:STEP"
    )
    args = parser.parse_args(argv)
    for option, allowed in (("parallel", PARALLELS), ("ac", AC_STRATEGIES)):
        values = getattr(args, option).split(",")
        unknown = [value for value in values if value not in allowed]
        if unknown:
            parser.error(f"--{option} takes items of {allowed}, got {unknown}.")
        setattr(args, option, values)
    try:
        args.fault = [Fault.parse(item) for item in args.fault.split(",") if item]
    except ValueError as error:
        parser.error(str(error))
    return args


def for_attempt(values: Sequence[Any], attempt: int) -> Any:
    """The item of a per-attempt list for ``attempt``: the last one once the list runs out."""
    return values[min(attempt, len(values) - 1)]


# --- the model ---------------------------------------------------------------------------------------


def build(size: str, seed: int, parallel: str, ac: str, world_size: int) -> nn.Module:
    """The reference GPT from ``seed``, with activation checkpointing ``ac`` applied before ``parallel``."""
    torch.manual_seed(seed)
    config, _ = SIZES[size]
    model = GPT(config)
    blocks = ModulePolicy({TransformerBlock})
    if ac == "full":
        wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, auto_wrap_policy=blocks)
    elif ac == "selective":
        apply_activation_checkpointing(model, SelectiveCheckpoint("default"), auto_wrap_policy=blocks)
    elif ac == "plan":
        # Full, selective and none in turn: a plan mixes strategies, which the others do not.
        strategies = ("full", "selective", "none")
        ActivationPlan({name: strategies[i % 3] for i, name in enumerate(blocks.names(model))}).apply(model)
    if parallel == "ddp":
        return DistributedDataParallel(model)
    if parallel == "fsdp1":
        return FullyShardedDataParallel(
            model, auto_wrap_policy=blocks, use_orig_params=True, device_id=torch.device("cpu")
        )
    return fully_shard_by_policy(model, blocks, mesh=init_device_mesh("cpu", (world_size,)))


def batch(size: str, seed: int, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's tokens at ``step``: a slice of a global batch that depends on the seed and step only."""
    config, per_rank = SIZES[size]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.randint(
        0, config.vocab_size, (world_size * per_rank, config.max_seq_len + 1), generator=generator
    )
    return tokens[rank * per_rank : (rank + 1) * per_rank]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


# --- checkpoints -------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints whose save finished, oldest first (a ``.partial`` one never counts)."""
    root = run_dir / "checkpoints"
    names = [path.name for path in root.iterdir()] if root.is_dir() else []
    return sorted(int(match[1]) for name in names if (match := CHECKPOINT.fullmatch(name)))


class KillingWriter(dcp.FileSystemWriter):
    """Writes this rank's shard, then exits: the rank dies inside ``dcp.save`` before the metadata."""

    def write_data(self, plan: Any, planner: Any) -> Any:
        written = super().write_data(plan, planner)
        written.wait()
        os._exit(FAULT_EXIT_CODE)


def save(state: dict[str, Any], run_dir: Path, step: int, rank: int, die_inside: bool) -> None:
    """Saves ``state`` as the checkpoint of ``step``, atomically: complete, or only a ``.partial``."""
    final = checkpoint_dir(run_dir, step)
    partial_dir = final.with_name(final.name + ".partial")
    writer = (KillingWriter if die_inside else dcp.FileSystemWriter)(partial_dir)
    # Returns on every rank once rank 0 has written the metadata, which lists every rank's files.
    dcp.save(state, storage_writer=writer)
    if rank == 0:
        partial_dir.rename(final)
        _fsync_dir(final.parent)
        # A fault during this leaves an older checkpoint partly deleted; it is never loaded, as a
        # newer complete one exists, and the next save deletes the rest.
        for old in complete_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(checkpoint_dir(run_dir, old))


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resume_step(run_dir: Path, rank: int, log: Callable[..., None]) -> int | None:
    """The step of the newest complete checkpoint, agreed by all ranks (rank 0 decides); None if none.

    Rank 0 also deletes the ``.partial`` directories a fault left behind, before anyone loads.
    """
    choice: list[int | None] = [None]
    if rank == 0:
        root = run_dir / "checkpoints"
        for torn in sorted(root.glob("*.partial")) if root.is_dir() else []:
            log("discard", checkpoint=torn.name, had_metadata=(torn / ".metadata").exists())
            shutil.rmtree(torn)
        steps = complete_checkpoints(run_dir)
        choice = [steps[-1] if steps else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


# --- faults ------------------------------------------------------------------------------------------


def inject(fault: Fault, log: Callable[..., None]) -> None:
    """Logs ``fault`` and makes this rank fail as it says; a ``savekill`` then happens in :func:`save`."""
    log("fault", kind=fault.kind, rank=fault.rank, step=fault.step)
    if fault.kind == "exit":
        os._exit(FAULT_EXIT_CODE)
    if fault.kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "hang":
        while True:  # until torchrun stops the group after the peers' collective timed out
            time.sleep(60)


def next_fault(schedule: Sequence[Fault], events: Path, rank: int) -> Fault | None:
    """This rank's fault in this attempt: the first of ``schedule`` not yet in the event log, if ours."""
    lines = events.read_text().splitlines() if events.exists() else []
    done = sum(json.loads(line)["event"] == "fault" for line in lines)
    fault = schedule[done] if done < len(schedule) else None
    return fault if fault is not None and fault.rank == rank else None


# --- the run -----------------------------------------------------------------------------------------


class EventLog:
    """Appends JSON lines to ``events.jsonl``; any rank may write (a fault), each line in one write."""

    def __init__(self, path: Path, rank: int, attempt: int) -> None:
        self.path, self.rank, self.attempt = path, rank, attempt

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps(
            {"event": event, "rank": self.rank, "attempt": self.attempt, "time": time.time(), **fields}
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)  # it must survive the fault that follows
        finally:
            os.close(fd)
        print(f"[rank {self.rank}, attempt {self.attempt}] {line}", flush=True)


def record_atomically(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch's ``record`` (a failed rank's traceback into torchrun's report), published by a rename.

    ``record`` writes the error file in place. When one rank fails, torchrun stops the others and
    reads their error files; one stopped (or read) half-way through writing leaves a truncated file,
    on which torch 2.13's agent raises ("Failed to parse reply file", a ``JSONDecodeError``) and dies
    instead of restarting the group (seen once in 30 minutes of soak). A rename makes the file
    appear whole or not at all.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        final = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if final is None:  # not under torchrun
            return fn(*args, **kwargs)
        writing = f"{final}.writing"
        os.environ["TORCHELASTIC_ERROR_FILE"] = writing
        try:
            return record(fn)(*args, **kwargs)
        finally:
            if os.path.exists(writing):
                os.replace(writing, final)

    return wrapper


@record_atomically
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    run_dir: Path = args.run_dir
    (run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    exit_with_parent()  # a torchrun killed without stopping its ranks leaves none behind
    faulthandler.enable(all_threads=True)  # the Python stack of a segfault, into torchrun's log
    torch.set_num_threads(1)
    log = EventLog(run_dir / "events.jsonl", rank, attempt)
    parallel, ac = for_attempt(args.parallel, attempt), for_attempt(args.ac, attempt)
    fault = next_fault(args.fault, run_dir / "events.jsonl", rank)
    dist.init_process_group("gloo", timeout=collective_timeout())
    try:
        model = build(args.size, args.seed, parallel, ac, world_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        state: dict[str, Any] = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "data": {"next_step": 0},
        }
        last = resume_step(run_dir, rank, log)
        if last is not None:
            dcp.load(state, checkpoint_id=checkpoint_dir(run_dir, last))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, optimizer, state["optim"])
        start = state["data"]["next_step"]
        if rank == 0:
            log("resume" if last is not None else "start", step=start, parallel=parallel, ac=ac)
        for step in range(start, args.steps):
            now = fault if fault is not None and fault.step == step else None
            if now is not None and now.kind == "hang":
                inject(now, log)
            loss = train_step(model, optimizer, batch(args.size, args.seed, step, rank, world_size))
            if now is not None and now.kind != "hang":
                inject(now, log)
            state = {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, optimizer),
                "data": {"next_step": step + 1},
            }
            save(state, run_dir, step, rank, die_inside=now is not None and now.kind == "savekill")
            if rank == 0:
                log("step", step=step, loss=loss)
        # Not cpu_offload=True: with FSDP1 on a CPU-only run it segfaults in torch 2.13 (FSDP1's
        # full-state-dict hook clones a freed unsharded parameter).
        final = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            torch.save(final, run_dir / "final.pt")
            log("done", steps=args.steps)
        # Tear down together: a rank that closes its gloo pairs while a peer still uses them can
        # make that peer abort (seen once in the soak: SIGABRT after the final parameters were saved).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
