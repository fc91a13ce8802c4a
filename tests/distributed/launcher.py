"""Runs a function on several ranks started by torchrun, for the distributed tests.

``run_on_ranks(fn, cases)`` starts ``FSDP_AC_NPROC`` ranks (default 2) with torchrun, exactly as a
user's job starts::

    python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=N --max-restarts=0 \\
        --log-dir=RUN_DIR/torchrun -m launcher RUN_DIR

Each rank joins the default process group (``env://``: the rendezvous store torchrun set up on a
free port, so launches never collide) and calls ``fn(ctx, case)`` for each case in turn, so one
start-up (the slow part) serves a whole list of configurations. It returns
``results[case_index][rank]``, what ``fn`` returned, for the test to compare.

Failures name the case and the rank:

- a rank that raises: that rank's traceback;
- a rank that exits or dies of a signal (a segfault) without a Python error: its exit code or signal
  and the end of its output, where ``faulthandler`` has written the Python stack of a crash;
- the ranks torchrun stops after the first failure: where each one was (the stack it printed);
- a launch that outlives ``timeout_s`` (a hang, or a desync longer than the collective timeout): the
  case each rank was in and every thread's stack.

Collectives time out after ``FSDP_AC_TIMEOUT_S`` (60 s here unless set), so a rank that skips a
collective fails its peers long before the launch timeout. torchrun and every process the ranks start
are gone when ``run_on_ranks`` returns.

``fn`` and the cases travel by pickle: ``fn`` must be a module-level function, and a case any picklable
value (a frozen dataclass reads best in reports). Return values travel by ``torch.save``; keep them
small (CPU tensors, numbers, strings).
"""

from __future__ import annotations

import contextlib
import importlib
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from suite_settings import collective_timeout, select_backend, suite_nproc

__all__ = [
    "RankContext",
    "exit_with_parent",
    "grid",
    "kill_launch",
    "launch_environment",
    "run_on_ranks",
    "torchrun_arguments",
]

COLLECTIVE_TIMEOUT_S = "60"
"""``FSDP_AC_TIMEOUT_S`` for ranks unless set: well under a test's timeout, so a hang fails fast."""
LOG_TAIL_LINES = 40
STACK_DUMP_WAIT_S = 1.0
"""How long hung ranks get to write their stacks before they are killed."""
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Variables torchrun sets for its ranks (with ``TORCHELASTIC_*``); a launch from inside a rank, e.g.
pytest itself run under torchrun, must not hand them to the torchrun it starts."""


@dataclass(frozen=True)
class RankContext:
    """What a function run by :func:`run_on_ranks` knows about its rank."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    """``cuda:<local rank>`` under NCCL, else the CPU."""


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the given values, as keyword dicts, last axis fastest.

    Example:
        >>> grid(parallel=["ddp", "fsdp2"], ac=[None, "no_reentrant"])[1]
        {'parallel': 'ddp', 'ac': 'no_reentrant'}
    """
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def torchrun_arguments(run_dir: Path, nproc: int) -> list[str]:
    """torchrun's arguments that start ``nproc`` ranks running the job in ``run_dir``."""
    return [
        "--standalone",  # a c10d rendezvous on a free local port
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--max-restarts=0",  # a failed rank fails the launch; a restart would hide it
        f"--log-dir={run_dir / 'torchrun'}",  # else torchrun leaves a directory in /tmp per launch
        "-m",
        __name__,
        str(run_dir),
    ]


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
        nproc: Ranks to start; default ``FSDP_AC_NPROC`` (:func:`fsdp_ac.environment.suite_nproc`).
        timeout_s: Limit for the whole launch, start-up included.

    Raises:
        pytest.fail.Exception: A rank failed (the message names the case and rank and holds its
            traceback or its last output), torchrun failed, or the launch timed out.
        TypeError: ``fn`` is not a module-level function.
    """
    if "<" in getattr(fn, "__qualname__", "<"):
        raise TypeError(f"run_on_ranks needs a module-level function so ranks can import it, got {fn!r}.")
    nproc = suite_nproc() if nproc is None else nproc
    cases = list(cases)
    with tempfile.TemporaryDirectory(prefix="fsdp_ac_ranks_") as tmp:
        run_dir = Path(tmp)
        (run_dir / "job.pkl").write_bytes(pickle.dumps((fn, cases)))
        agent = _start_torchrun(run_dir, nproc)
        try:
            try:
                agent.wait(timeout=timeout_s)
                in_time = True
            except subprocess.TimeoutExpired:
                in_time = False
                _dump_stacks(run_dir, nproc)
        finally:
            _kill(agent, run_dir, nproc)
        if not in_time:
            pytest.fail(_timeout_report(run_dir, nproc, cases, timeout_s), pytrace=False)
        if not any((run_dir / f"rank{rank}.pid").exists() for rank in range(nproc)):
            pytest.fail(
                f"torchrun exited with code {agent.returncode} before starting any rank; its last "
                f"output:\n{_log_tail(run_dir / 'torchrun.log')}",
                pytrace=False,
            )
        exits = _read_json(run_dir / "exits.json") or {}
        reports = [_rank_report(run_dir, rank, exits.get(str(rank)), cases) for rank in range(nproc)]
        failures = sorted(report for report in reports if report is not None)
        if failures:
            first, *rest = (text for _, text in failures)
            pytest.fail(
                "\n\n".join([first, *(f"then (probably as a consequence) {text}" for text in rest)]),
                pytrace=False,
            )
        if agent.returncode != 0:
            pytest.fail(
                f"torchrun exited with code {agent.returncode} although every rank finished; its last "
                f"output:\n{_log_tail(run_dir / 'torchrun.log')}",
                pytrace=False,
            )
        per_rank = [torch.load(run_dir / f"rank{rank}.pt", weights_only=False) for rank in range(nproc)]
    return [[per_rank[rank][index] for rank in range(nproc)] for index in range(len(cases))]


def kill_launch(agent: subprocess.Popen[bytes], run_dir: Path, nproc: int) -> None:
    """Kills a torchrun started in a session of its own and the ranks that wrote ``run_dir/rank<r>.pid``.

    For tests that start torchrun themselves (``test_elastic.py``): a rank counts when its command line
    names ``run_dir``, so a pid reused by another process is never signalled.
    """
    _kill(agent, run_dir, nproc)


def exit_with_parent() -> None:
    """Ends this process, from a watcher thread, once its parent (torchrun) is gone."""
    _exit_with_parent()


# --- the launching (pytest) side ---------------------------------------------------------------------


def launch_environment() -> dict[str, str]:
    """This process's environment for a torchrun it starts: without torchrun's own variables (pytest
    may itself run under torchrun), one thread per rank, and this process's import path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _TORCHRUN_ENV and not key.startswith("TORCHELASTIC_")
    }
    env.update(
        OMP_NUM_THREADS="1",
        # The ranks must import fn's module by the name it was pickled under.
        PYTHONPATH=os.pathsep.join(path or os.getcwd() for path in sys.path),
    )
    return env


def _start_torchrun(run_dir: Path, nproc: int) -> subprocess.Popen[bytes]:
    env = launch_environment()
    env.setdefault("FSDP_AC_TIMEOUT_S", COLLECTIVE_TIMEOUT_S)
    code = f"from {__name__} import _torchrun_main; _torchrun_main({str(run_dir)!r}, {nproc})"
    with open(run_dir / "torchrun.log", "wb") as log:
        # A session of its own, so that _kill reaches torchrun and nothing else.
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _rank_pids(run_dir: Path, nproc: int) -> Iterator[int]:
    """Pids of this launch's ranks that are still running (each leads a session torchrun made)."""
    for rank in range(nproc):
        try:
            pid = int((run_dir / f"rank{rank}.pid").read_text())
        except (FileNotFoundError, ValueError):
            continue
        try:
            # The command line names run_dir: never signal a process that reused a finished rank's pid.
            if str(run_dir) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                yield pid
        except FileNotFoundError:
            if not Path("/proc").is_dir():  # no /proc to check (macOS): trust the pid if it runs
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, 0)
                    yield pid


def _dump_stacks(run_dir: Path, nproc: int) -> None:
    for pid in _rank_pids(run_dir, nproc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)  # faulthandler in the rank writes every thread's stack
    time.sleep(STACK_DUMP_WAIT_S)


def _kill(agent: subprocess.Popen[bytes], run_dir: Path, nproc: int) -> None:
    """Kills each rank's session (compile workers and other children included), then torchrun.

    Ranks first: a rank exits by itself once torchrun is gone, and a rank that has exited can no
    longer be told from a process that reused its pid, so its children would be left running.
    """
    for pid in _rank_pids(run_dir, nproc):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _case_label(run_dir: Path, rank: int, cases: list[Any], index: int | None = None) -> str:
    """The case ``index``, by default the one the rank last started."""
    progress = run_dir / f"rank{rank}.case"
    if index is None and progress.exists():
        index = int(progress.read_text())
    if index is None:
        return "set-up or tear-down (outside any case)"
    return f"case {index + 1}/{len(cases)} ({cases[index]!r})"


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-LOG_TAIL_LINES:]) or "(no output)"


def _rank_output(run_dir: Path, rank: int) -> str:
    log = run_dir / f"rank{rank}.log"
    if log.exists():
        return f"its last output:\n{_log_tail(log)}"
    # The rank died before it could redirect its output: whatever it printed went to torchrun's log.
    return f"it wrote no log; torchrun's last output:\n{_log_tail(run_dir / 'torchrun.log')}"


def exit_description(exitcode: int) -> str:
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _rank_report(
    run_dir: Path, rank: int, exitcode: int | None, cases: list[Any]
) -> tuple[tuple[int, float], str] | None:
    """(sort key, report) for a rank that failed, None for one that finished cleanly.

    ``exitcode`` is what torchrun saw when the launch failed, None for a rank it did not report. A
    rank that died by itself without a Python error (an exit, a crash) comes first: peers of a failed
    rank fail with Python errors. Then Python errors by time, then the ranks torchrun stopped.
    """
    error = _read_json(run_dir / f"rank{rank}.error.json")
    if error is not None:
        where = _case_label(run_dir, rank, cases, error["case"])
        return (1, error["time"]), f"{where} failed on rank {rank}:\n{error['traceback']}"
    if (run_dir / f"rank{rank}.pt").exists() and not exitcode:
        return None
    if not (run_dir / f"rank{rank}.pid").exists():
        return (3, 0.0), (
            f"rank {rank} never started; torchrun's last output:\n{_log_tail(run_dir / 'torchrun.log')}"
        )
    where = _case_label(run_dir, rank, cases)
    if exitcode is None or exitcode == -signal.SIGTERM:
        return (2, 0.0), (
            f"rank {rank} was stopped by torchrun in {where} after another rank failed; "
            f"{_rank_output(run_dir, rank)}"
        )
    return (0, 0.0), (
        f"rank {rank} {exit_description(exitcode)} in {where} without a Python error; "
        f"{_rank_output(run_dir, rank)}"
    )


def _timeout_report(run_dir: Path, nproc: int, cases: list[Any], timeout_s: float) -> str:
    reports = [
        f"rank {rank} was in {_case_label(run_dir, rank, cases)}; {_rank_output(run_dir, rank)}"
        for rank in range(nproc)
    ]
    return f"The launch of {nproc} ranks timed out after {timeout_s:.0f} s.\n\n" + "\n\n".join(reports)


# --- torchrun's side ---------------------------------------------------------------------------------


def _torchrun_main(run_dir_name: str, nproc: int) -> None:
    """Runs torchrun's own entry point; records the exit code of each rank it saw fail.

    torchrun reports failed ranks only in text; the launcher needs their exit codes (a rank killed by
    a signal has no Python error to report), which its ``ChildFailedError`` holds.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    _exit_with_parent()
    run_dir = Path(run_dir_name)
    try:
        main(torchrun_arguments(run_dir, nproc))
    except ChildFailedError as error:
        exits = {rank: failure.exitcode for rank, failure in error.failures.items()}
        (run_dir / "exits.json").write_text(json.dumps(exits))
        sys.exit(1)


# --- the ranks' side ---------------------------------------------------------------------------------


def _rank_main(run_dir_name: str) -> None:
    """Entry point of a rank: runs every case, then saves the results or the error."""
    import faulthandler

    run_dir = Path(run_dir_name)
    rank = int(os.environ["RANK"])
    (run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    _redirect_output(run_dir / f"rank{rank}.log")
    faulthandler.enable(all_threads=True)  # the Python stack of a segfault, into the log
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the stacks of a hung rank
    # Where a rank was when torchrun stopped it after another rank failed; then it dies of SIGTERM.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    _exit_with_parent()
    torch.set_num_threads(1)
    index: int | None = None
    failed_at: float | None = None
    try:
        fn, cases = pickle.loads((run_dir / "job.pkl").read_bytes())
        nproc = int(os.environ["WORLD_SIZE"])
        backend = select_backend(int(os.environ["LOCAL_WORLD_SIZE"]))
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=collective_timeout())
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


def _redirect_output(path: Path) -> None:
    """Sends this process's stdout and stderr, C++ and faulthandler output included, to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _reset_compile_caches() -> None:
    # Otherwise the compiled frames of many cases pile up until dynamo's recompile limit silently
    # falls back to eager for the later ones.
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _exit_with_parent() -> None:
    """Ends this process if its parent dies without cleaning up (e.g. a hard pytest kill)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    # torchrun runs this file as __main__; run the rank from the module under its importable name,
    # so that whatever the job pickles refers to that module and not to __main__.
    importlib.import_module(__spec__.name)._rank_main(sys.argv[1])
