"""The multi-rank harness itself: results, failure reports, timeouts and clean-up.

Each test launches ``FSDP_AC_NPROC`` ranks (default 2) with torchrun, on any backend. The faults are
the ones a real job meets: a rank that raises, exits, segfaults, hangs, or skips a collective.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launcher import RankContext, grid, run_on_ranks
from suite_settings import select_backend, suite_nproc

pytestmark = pytest.mark.distributed


def report_rank(ctx: RankContext, case: dict[str, int]) -> dict[str, object]:
    total = torch.tensor([float(ctx.rank + case["offset"])], device=ctx.device)
    dist.all_reduce(total)
    return {
        "rank": ctx.rank,
        "world_size": dist.get_world_size(),
        "sum": total.item(),
        "threads": torch.get_num_threads(),
        "omp": os.environ["OMP_NUM_THREADS"],
        "timeout_s": os.environ["FSDP_AC_TIMEOUT_S"],
        "backend": (ctx.backend, dist.get_backend()),
        "torchrun": "TORCHELASTIC_RUN_ID" in os.environ,
    }


@pytest.mark.timeout(120)
def test_results_come_back_per_case_and_rank() -> None:
    nproc = suite_nproc()
    results = run_on_ranks(report_rank, grid(offset=[0, 10]))
    assert len(results) == 2
    for offset, per_rank in zip([0, 10], results, strict=True):
        assert [r["rank"] for r in per_rank] == list(range(nproc))
        for result in per_rank:
            assert result["world_size"] == nproc
            assert result["sum"] == sum(range(nproc)) + offset * nproc
            assert (result["threads"], result["omp"]) == (1, "1")
            assert result["timeout_s"] == os.environ.get("FSDP_AC_TIMEOUT_S", "60")
            assert result["backend"] == (select_backend(nproc), select_backend(nproc))
            assert result["torchrun"]


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.device_count() >= suite_nproc(), reason="needs fewer GPUs than ranks")
def test_backend_override_reaches_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSDP_AC_BACKEND", "nccl")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(report_rank, [{"offset": 0}])
    message = str(failure.value)
    assert message.startswith("set-up or tear-down (outside any case) failed on rank"), message
    assert "ValueError: FSDP_AC_BACKEND=nccl needs" in message


def fail_on_last_rank(ctx: RankContext, case: int) -> int:
    dist.barrier()
    if case == 1:
        if ctx.rank == ctx.world_size - 1:
            raise ValueError(f"boom in case {case}")
        time.sleep(600)  # outside any collective: only torchrun can stop these ranks
    dist.barrier()
    return case


@pytest.mark.timeout(120)
def test_rank_error_names_case_and_rank_with_traceback() -> None:
    last = suite_nproc() - 1
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(fail_on_last_rank, [0, 1, 2])
    assert time.monotonic() - started < 60  # torchrun stops the other ranks at once
    message = str(failure.value)
    assert message.startswith(f"case 2/3 (1) failed on rank {last}:\nTraceback"), message
    assert "ValueError: boom in case 1" in message
    assert 'in fail_on_last_rank\n    raise ValueError(f"boom in case {case}")' in message
    if last > 0:  # the others are reported where torchrun stopped them, with the stack they printed
        assert "then (probably as a consequence) rank 0 was stopped by torchrun in case 2/3 (1)" in message
        assert "in fail_on_last_rank" in message.split("stopped by torchrun")[1]
    assert "case 3/3" not in message  # nothing runs after a failed case


def exit_without_error(ctx: RankContext, case: None) -> None:
    if ctx.rank == 0:
        os._exit(3)
    dist.barrier()


@pytest.mark.timeout(120)
def test_rank_that_dies_silently_is_reported() -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(exit_without_error, [None])
    # Listed first although its peers' Python errors were written before it was seen to exit.
    assert str(failure.value).startswith(
        "rank 0 exited with code 3 in case 1/1 (None) without a Python error"
    )


def segfault_on_last_rank(ctx: RankContext, case: int) -> None:
    dist.barrier()
    if case == 1 and ctx.rank == ctx.world_size - 1:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    dist.barrier()


@pytest.mark.timeout(120)
def test_rank_that_segfaults_is_reported_with_its_python_stack() -> None:
    last = suite_nproc() - 1
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(segfault_on_last_rank, [0, 1, 2])
    message = str(failure.value)
    assert message.startswith(
        f"rank {last} was killed by signal SIGSEGV in case 2/3 (1) without a Python error"
    )
    assert "Fatal Python error: Segmentation fault" in message
    assert "in segfault_on_last_rank" in message  # faulthandler's stack of the crashing thread


def skip_a_collective(ctx: RankContext, case: None) -> None:
    if ctx.rank == 0:
        dist.all_reduce(torch.ones(1, device=ctx.device))  # the other ranks never join this one


@pytest.mark.timeout(120)
@pytest.mark.skipif(suite_nproc() < 2, reason="a desync needs two ranks")
def test_desync_fails_by_the_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSDP_AC_TIMEOUT_S", "5")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_on_ranks(skip_a_collective, [None], timeout_s=100)
    assert time.monotonic() - started < 60  # the collective timeout, far from the launch timeout
    message = str(failure.value)
    assert "case 1/1 (None) failed on rank" in message
    assert "Timed out" in message


def hang_with_a_child(ctx: RankContext, pid_dir: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_dir, f"{ctx.rank}.pid").write_text(str(child.pid))
    if ctx.rank == 0:
        time.sleep(600)
    dist.barrier()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (init here) has yet to reap it


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_timeout_reports_where_ranks_hang_and_leaves_no_process(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        # Long enough for torchrun and the ranks to start on a loaded 2-core machine.
        run_on_ranks(hang_with_a_child, [str(tmp_path)], timeout_s=25)
    assert time.monotonic() - started < 45
    message = str(failure.value)
    assert "timed out after 25 s" in message
    assert "rank 0 was in case 1/1" in message
    assert "in hang_with_a_child" in message  # the stack dumped from the hung rank
    pids = [int(path.read_text()) for path in tmp_path.glob("*.pid")]
    assert len(pids) == suite_nproc()
    deadline = time.monotonic() + 5
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, pids)), "a rank's child process outlived the launch"


def test_local_function_is_refused() -> None:
    def local(ctx: RankContext, case: None) -> None:
        del ctx, case

    with pytest.raises(TypeError, match="module-level function"):
        run_on_ranks(local, [None])
