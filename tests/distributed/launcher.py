"""Runs a function on several ranks, each a fresh process, for the distributed tests.

``run_on_ranks(fn, cases)`` starts ``FSDP_AC_NPROC`` ranks (default 2), joins them in one process
group and calls ``fn(ctx, case)`` on every rank for each case in turn, so one process start-up (the
slow part) serves a whole list of configurations. It returns ``results[case_index][rank]``, what
``fn`` returned, for the test to compare. If a rank raises, the test fails with the case, the rank and
that rank's traceback; if the launch outlives ``timeout_s``, it fails with the case each rank was in
and their Python stacks. Ranks never outlive the call.

Ranks meet through a ``FileStore`` in a fresh temporary directory, never a port, so any number of
launches (pytest-xdist workers) run side by side. ``fn`` and the cases travel by pickle: ``fn`` must be
a module-level function, and a case any picklable value (a frozen dataclass reads best in reports).
Return values travel by ``torch.save``; keep them small (CPU tensors, numbers, strings).
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from fsdp_ac.environment import collective_timeout, select_backend

__all__ = ["RankContext", "grid", "run_on_ranks", "world_size"]

DEFAULT_NPROC = 2
COLLECTIVE_TIMEOUT_S = "60"
"""``FSDP_AC_TIMEOUT_S`` for ranks unless set: well under a test's timeout, so a hang fails fast."""
GRACE_S = 10.0
"""How long the other ranks get to report their own errors after one rank fails."""
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class RankContext:
    """What a function run by :func:`run_on_ranks` knows about its rank."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    """``cuda:<rank>`` under NCCL, else the CPU."""


def world_size() -> int:
    """Ranks per launch: ``FSDP_AC_NPROC``, default 2."""
    raw = os.environ.get("FSDP_AC_NPROC", str(DEFAULT_NPROC))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"FSDP_AC_NPROC must be a positive integer, got {raw!r}.")
    return int(raw)


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the given values, as keyword dicts, last axis fastest.

    Example:
        >>> grid(parallel=["ddp", "fsdp2"], ac=[None, "no_reentrant"])[1]
        {'parallel': 'ddp', 'ac': 'no_reentrant'}
    """
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def run_on_ranks(
    fn: Callable[[RankContext, Any], Any],
    cases: Sequence[Any],
    *,
    nproc: int | None = None,
    timeout_s: float = 120.0,
) -> list[list[Any]]:
    """Runs ``fn(ctx, case)`` for each case, in order, on every rank; returns ``[case][rank]`` results.

    Args:
        fn: A module-level function (it is pickled by name into fresh processes).
        cases: The configurations; all ranks run case ``i`` together, with a barrier after each.
        nproc: Ranks to start; default :func:`world_size`.
        timeout_s: Limit for the whole launch, start-up included.

    Raises:
        pytest.fail.Exception: A rank failed (the message names the case and rank and holds its
            traceback), exited without a result, or the launch timed out.
        TypeError: ``fn`` is not a module-level function.
    """
    if "<" in getattr(fn, "__qualname__", "<"):
        raise TypeError(f"run_on_ranks needs a module-level function so ranks can import it, got {fn!r}.")
    nproc = world_size() if nproc is None else nproc
    cases = list(cases)
    with tempfile.TemporaryDirectory(prefix="fsdp_ac_ranks_") as tmp:
        run_dir = Path(tmp)
        (run_dir / "job.pkl").write_bytes(pickle.dumps((fn, cases)))
        procs = [_start_rank(run_dir, rank, nproc) for rank in range(nproc)]
        try:
            in_time = _wait(procs, time.monotonic() + timeout_s)
            stuck = [proc.poll() is None for proc in procs]
            if any(stuck):
                _dump_stacks(procs)
        finally:
            _kill(procs)
        if not in_time:
            pytest.fail(_timeout_report(run_dir, nproc, cases, timeout_s), pytrace=False)
        reports = [
            _rank_report(run_dir, rank, proc.returncode, stuck[rank], cases)
            for rank, proc in enumerate(procs)
        ]
        failures = sorted(report for report in reports if report is not None)
        if failures:
            first, *rest = (text for _, text in failures)
            pytest.fail(
                "\n\n".join([first, *(f"then (probably as a consequence) {text}" for text in rest)]),
                pytrace=False,
            )
        per_rank = [torch.load(run_dir / f"rank{rank}.pt", weights_only=False) for rank in range(nproc)]
    return [[per_rank[rank][index] for rank in range(nproc)] for index in range(len(cases))]


# --- parent side -------------------------------------------------------------------------------------


def _start_rank(run_dir: Path, rank: int, nproc: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        OMP_NUM_THREADS="1",
        # The child must import fn's module by the name it was pickled under.
        PYTHONPATH=os.pathsep.join(path or os.getcwd() for path in sys.path),
    )
    env.setdefault("FSDP_AC_TIMEOUT_S", COLLECTIVE_TIMEOUT_S)
    code = f"from {__name__} import _rank_main; _rank_main({str(run_dir)!r})"
    with open(run_dir / f"rank{rank}.log", "wb") as log:
        # A session of its own lets _kill reach whatever the rank started (e.g. compile workers).
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(procs: list[subprocess.Popen[bytes]], deadline: float) -> bool:
    """Waits for all ranks, or GRACE_S after the first failure; False if the deadline came first."""
    failed_at: float | None = None
    while any(proc.poll() is None for proc in procs):
        now = time.monotonic()
        if failed_at is None and any(proc.returncode for proc in procs):
            failed_at = now
        if failed_at is not None and now > failed_at + GRACE_S:
            return True  # the others are stuck behind the failed rank, whose error is the report
        if now > deadline:
            return False
        time.sleep(0.05)
    return True


def _dump_stacks(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)  # faulthandler in the rank writes every thread's stack
    time.sleep(1.0)


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the rank and everything it started are gone already
        proc.wait()


def _case_label(run_dir: Path, rank: int, cases: list[Any], index: int | None = None) -> str:
    """The case ``index``, by default the one the rank last started."""
    progress = run_dir / f"rank{rank}.case"
    if index is None and progress.exists():
        index = int(progress.read_text())
    if index is None:
        return "set-up or tear-down (outside any case)"
    return f"case {index + 1}/{len(cases)} ({cases[index]!r})"


def _log_tail(run_dir: Path, rank: int) -> str:
    lines = (run_dir / f"rank{rank}.log").read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(no output)"


def _rank_report(
    run_dir: Path, rank: int, returncode: int, stuck: bool, cases: list[Any]
) -> tuple[tuple[int, float], str] | None:
    """(sort key, report) for a rank that failed, None for one that finished cleanly.

    A rank that died by itself without a Python error (a crash, a signal) comes first: peers of a
    failed rank fail with Python errors. Then Python errors by time, then ranks stopped while stuck.
    """
    error_file = run_dir / f"rank{rank}.error.json"
    if error_file.exists():
        error = json.loads(error_file.read_text())
        where = _case_label(run_dir, rank, cases, error["case"])
        return (1, error["time"]), f"{where} failed on rank {rank}:\n{error['traceback']}"
    if stuck:
        return (2, 0.0), (
            f"rank {rank} was still in {_case_label(run_dir, rank, cases)} {GRACE_S:.0f} s after the "
            f"first failure and was stopped; its last output:\n{_log_tail(run_dir, rank)}"
        )
    if returncode == 0 and (run_dir / f"rank{rank}.pt").exists():
        return None
    return (0, 0.0), (
        f"rank {rank} exited with code {returncode} in {_case_label(run_dir, rank, cases)} without a "
        f"Python error; its last output:\n{_log_tail(run_dir, rank)}"
    )


def _timeout_report(run_dir: Path, nproc: int, cases: list[Any], timeout_s: float) -> str:
    reports = [
        f"rank {rank} was in {_case_label(run_dir, rank, cases)}; its last output:\n"
        f"{_log_tail(run_dir, rank)}"
        for rank in range(nproc)
    ]
    return f"The launch of {nproc} ranks timed out after {timeout_s:.0f} s.\n\n" + "\n\n".join(reports)


# --- rank side ---------------------------------------------------------------------------------------


def _rank_main(run_dir_name: str) -> None:
    """Entry point of a rank process: runs every case, then saves the results or the error."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _exit_with_parent()
    torch.set_num_threads(1)
    run_dir = Path(run_dir_name)
    rank, nproc = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    index: int | None = None
    failed_at: float | None = None
    try:
        fn, cases = pickle.loads((run_dir / "job.pkl").read_bytes())
        backend = select_backend(nproc)
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        store = dist.FileStore(str(run_dir / "store"), nproc)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=nproc, timeout=collective_timeout()
        )
        try:
            ctx = RankContext(rank=rank, world_size=nproc, backend=backend, device=device)
            results = []
            for index, case in enumerate(cases):
                (run_dir / f"rank{rank}.case").write_text(str(index))
                results.append(fn(ctx, case))
                _reset_compile_caches()
                dist.barrier()
            index = None
        except BaseException:
            failed_at = time.time()  # before tearing down, which may wait on the other ranks
            raise
        finally:
            dist.destroy_process_group()
        torch.save(results, run_dir / f"rank{rank}.pt")
    except BaseException:
        error = {"case": index, "time": failed_at or time.time(), "traceback": traceback.format_exc()}
        (run_dir / f"rank{rank}.error.json").write_text(json.dumps(error))
        sys.exit(1)


def _reset_compile_caches() -> None:
    # Otherwise the compiled frames of many cases pile up until dynamo's recompile limit silently
    # falls back to eager for the later ones.
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _exit_with_parent() -> None:
    """Ends this rank if the launching process dies without cleaning up (e.g. a hard pytest kill)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
