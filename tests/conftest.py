"""Fixtures: a small GPT, its input, a one-rank process group, a clean environment and a real Accelerator."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from models import SMALL_GPT
from suite_settings import collective_timeout

from fsdp_ac.reference_model import GPT


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(SMALL_GPT)


@pytest.fixture
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, SMALL_GPT.vocab_size, (2, 12), generator=generator)


@pytest.fixture
def single_rank_group(tmp_path: Path) -> Iterator[None]:
    """A gloo process group of world size 1 that meets through a FileStore (no port)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=collective_timeout())
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No setting of Accelerate, torchrun or fsdp_ac leaks in from the shell, or out to other tests.

    Accelerate writes some variables itself, so the whole environment is restored afterwards. Not
    autouse: the distributed tests read ``FSDP_AC_NPROC`` and ``FSDP_AC_TIMEOUT_S`` from the shell.
    """
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("FSDP_", "ACCELERATE_")) or key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(key)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def real_accelerator(clean_environment: None) -> Iterator[Any]:
    """A real one-process CPU Accelerator, made in a clean environment; Accelerate's shared state is
    reset afterwards. Skips without ``accelerate``."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
