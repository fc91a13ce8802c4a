"""Checkpoint portability: DCP saves from every configuration load into every other (2 ranks).

Every configuration (:data:`CONFIGURATIONS`: no parallel wrapper, DDP, FSDP1 with and without
``use_orig_params``, FSDP2; no AC, AC before and AC after the parallel wrapper; FSDP1 with
``fsdp_ac.ModulePolicy`` and with torch's recipe; FSDP2 with offload around checkpoint) trains the
reference GPT for two Adam steps and saves its model and optimizer state with
``torch.distributed.checkpoint`` (DCP), through ``get_model_state_dict`` and
``get_optimizer_state_dict``. Then every configuration, the source's own included, builds a fresh
model and optimizer, loads that checkpoint with ``dcp.load`` and ``set_model_state_dict`` /
``set_optimizer_state_dict``, and must hold exactly the saved tensors: parameters, Adam's step,
first and second moments, bitwise. Finally this process loads each checkpoint into a plain
unwrapped model and optimizer, without any process group (``dcp.load(..., no_dist=True)``), as a
user would to inspect or fine-tune it.

torch's FSDP1 recipe, AC before FSDP1's auto-wrap with torch's ``ModuleWrapPolicy``, gives
``CheckpointWrapper(FSDP(block))``, which torch's DCP cannot restore by itself ("Missing optimizer
state"); with fsdp_ac's wrapper it can (:mod:`fsdp_ac.dcp`). It is here once, with FSDP1's default
``use_orig_params=False``; ``test_fsdp1_ac_first.py`` has both settings and torch's wrapper.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from launcher import RankContext, run_on_ranks
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from training import (
    CONFIG,
    Setup,
    adam,
    build,
    full_optimizer_state,
    full_parameters,
    optimizer_tensors,
    train,
)

from fsdp_ac.reference_model import GPT

pytestmark = pytest.mark.distributed

SOURCE_STEPS = 2
"""Training steps before the save: Adam's state is non-empty and its step count is not the default."""

CONFIGURATIONS = {
    "plain": [Setup("plain"), Setup("plain", ac="no_reentrant")],
    "ddp": [Setup("ddp"), Setup("ddp", ac="no_reentrant"), Setup("ddp", ac="no_reentrant", ac_first=False)],
    "fsdp1": [
        # AC before FSDP1 with fsdp_ac's policy, which gives FSDP(CheckpointWrapper(block)).
        *(
            Setup(
                "fsdp1",
                use_orig_params=orig,
                ac=ac,
                ac_first=first,
                fsdp1_policy="fsdp_ac" if ac else "torch",
            )
            for orig in (True, False)
            for ac, first in ((None, True), ("no_reentrant", True), ("no_reentrant", False))
        ),
        # torch's recipe: AC before FSDP1 with torch's policy, CheckpointWrapper(FSDP(block)).
        Setup("fsdp1", use_orig_params=False, ac="no_reentrant"),
    ],
    "fsdp2": [
        Setup("fsdp2"),
        Setup("fsdp2", ac="no_reentrant"),
        Setup("fsdp2", ac="no_reentrant", ac_first=False),
        Setup("fsdp2", ac="offload_checkpoint"),
    ],
}
"""Every configuration a checkpoint is saved from and loaded into, by parallel wrapper."""
TARGETS = [setup for family in CONFIGURATIONS.values() for setup in family]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Save from ``source`` into ``directory``, then load into each of ``targets``."""

    source: Setup
    targets: tuple[Setup, ...]
    directory: str

    def __repr__(self) -> str:
        return f"Transfer(from {self.source!r} into {len(self.targets)} targets)"


def load_into(ctx: RankContext, target: Setup, directory: str) -> dict[str, torch.Tensor]:
    """A fresh ``target`` loaded, model and optimizer, from the DCP checkpoint in ``directory``."""
    model = build(ctx, target)
    optimizer = adam(model)
    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    tensors = {f"model.{name}": value for name, value in full_parameters(model).items()}
    optim = optimizer_tensors(full_optimizer_state(model, optimizer))
    tensors.update({f"optim.{name}": value for name, value in optim.items()})
    return tensors


def mismatches(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """What differs between two sets of tensors, in words; empty when they are bitwise equal."""
    missing = [f"missing {name}" for name in expected if name not in actual]
    extra = [f"unexpected {name}" for name in actual if name not in expected]
    different = [
        f"{name} differs by {(value.double() - expected[name].double()).abs().max().item():g}"
        for name, value in actual.items()
        if name in expected and not torch.equal(value, expected[name])
    ]
    return missing + extra + different


def transfer_on_rank(ctx: RankContext, transfer: Transfer) -> dict[str, Any]:
    trained = train(ctx, transfer.source, steps=SOURCE_STEPS)
    model, optimizer = trained.model, trained.optimizer
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=transfer.directory,
    )
    saved = {f"model.{name}": value for name, value in full_parameters(model).items()}
    optim = optimizer_tensors(full_optimizer_state(model, optimizer))
    saved.update({f"optim.{name}": value for name, value in optim.items()})
    outcomes = {}
    for target in transfer.targets:
        try:
            loaded = load_into(ctx, target, transfer.directory)
        except RuntimeError as error:  # every rank raises alike: the planning is collective
            outcomes[repr(target)] = [f"{type(error).__name__}: {error}"]
            continue
        outcomes[repr(target)] = mismatches(loaded, saved)
    return {"outcomes": outcomes, "saved": saved if ctx.rank == 0 else None}


def load_without_process_group(directory: str) -> dict[str, torch.Tensor]:
    """A plain GPT and Adam in this process, loaded from a DCP checkpoint; their tensors."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = adam(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    tensors = {f"model.{name}": value.detach() for name, value in model.state_dict().items()}
    optim = optimizer_tensors(get_optimizer_state_dict(model, optimizer))
    tensors.update({f"optim.{name}": value for name, value in optim.items()})
    return tensors


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # no_dist=True, on purpose
@pytest.mark.parametrize("family", CONFIGURATIONS)
def test_dcp_checkpoints_load_into_every_configuration(family: str, tmp_path: Path) -> None:
    transfers = [
        Transfer(source, tuple(TARGETS), str(tmp_path / f"checkpoint{index}"))
        for index, source in enumerate(CONFIGURATIONS[family])
    ]
    results = run_on_ranks(transfer_on_rank, transfers, timeout_s=500)
    failures = []
    for transfer, per_rank in zip(transfers, results, strict=True):
        for rank, result in enumerate(per_rank):
            for target, problems in result["outcomes"].items():
                if problems:
                    failures.append(f"{transfer.source!r} -> {target} on rank {rank}: {problems[:3]}")
        problems = mismatches(load_without_process_group(transfer.directory), per_rank[0]["saved"])
        if problems:
            failures.append(f"{transfer.source!r} -> plain model without a process group: {problems[:3]}")
    assert not failures, f"{len(failures)} loads failed:\n" + "\n".join(failures)
