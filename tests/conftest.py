"""Fixtures: a small GPT, its input, and a one-rank process group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
