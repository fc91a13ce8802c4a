"""torch's standard FSDP1 recipe: activation checkpointing first, then FSDP1's auto-wrap (2 ranks).

``apply_activation_checkpointing(model, check_fn=is_block)``, then ``FSDP(model,
auto_wrap_policy=ModuleWrapPolicy({Block}))``, gives ``CheckpointWrapper(FSDP(block))``. One launch
runs every sub-case, for ``use_orig_params`` True and False, with fsdp_ac's wrapper and with torch's:

- training: the nesting is the recipe's, backward recomputes every block, and losses, first-step
  gradients, parameters and Adam's state equal FSDP1 without AC bitwise, on every rank. With fsdp_ac's
  wrapper every state dict the setup offers (DCP's, FSDP1's FULL and SHARDED ``state_dict()`` and
  ``FSDP.optim_state_dict``) also holds exactly the unwrapped model's keys (the matrix's checks).
- DCP: checkpoints saved from the recipe with either wrapper, and from FSDP1 without AC, load, model
  and optimizer, into the recipe with fsdp_ac's wrapper, into the other ``use_orig_params``, into
  ``FSDP(CheckpointWrapper(block))``, FSDP1 without AC and a plain model on each rank, and into a plain
  model without any process group; every loaded tensor equals the saved one bitwise and no saved key
  holds a wrapper's name. Side by side, torch's wrapper cannot load any of them: torch's DCP names its
  parameters ``layers.0._fsdp_wrapped_module.*`` and raises "Missing optimizer state" (fsdp_ac's
  answer: :mod:`fsdp_ac.dcp`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch.distributed.checkpoint as dcp
from launcher import RankContext, run_on_ranks
from test_checkpoint_portability import Transfer, load_without_process_group, mismatches, transfer_on_rank
from test_matrix import cell_on_rank, check_row, check_training
from training import WRAPPER_SEGMENTS, Setup

pytestmark = pytest.mark.distributed

TORCH_FAILURE = re.compile(
    r"RuntimeError: Missing optimizer state for parameter 'layers\.0\._fsdp_wrapped_module\."
)
"""How torch's wrapper fails to load any checkpoint into the recipe (torch 2.13)."""


def recipe(use_orig_params: bool, api: str = "fsdp_ac") -> Setup:
    """AC applied to every block by ``api``'s functions, then FSDP1 with torch's ``ModuleWrapPolicy``."""
    return Setup("fsdp1", use_orig_params=use_orig_params, ac="no_reentrant", ac_api=api)


def training_row(use_orig_params: bool) -> list[Setup]:
    """FSDP1 without AC (the baseline), then the recipe with fsdp_ac's wrapper and with torch's."""
    return [
        Setup("fsdp1", use_orig_params=use_orig_params),
        *(recipe(use_orig_params, api) for api in ("fsdp_ac", "torch")),
    ]


def transfers(use_orig_params: bool, directory: Path) -> list[Transfer]:
    """Saves from the recipe (both wrappers) and from FSDP1 without AC, each loaded into every target."""
    orig = use_orig_params
    sources = [recipe(orig), recipe(orig, "torch"), Setup("fsdp1", use_orig_params=orig)]
    targets = (
        recipe(orig),
        recipe(not orig),
        Setup("fsdp1", use_orig_params=orig, ac="no_reentrant", fsdp1_policy="fsdp_ac"),
        Setup("fsdp1", use_orig_params=orig),
        Setup("plain"),
        recipe(orig, "torch"),
    )
    return [
        Transfer(source, targets, str(directory / f"orig{int(orig)}-{index}"))
        for index, source in enumerate(sources)
    ]


def case_on_rank(ctx: RankContext, case: Setup | Transfer) -> dict[str, Any]:
    if isinstance(case, Transfer):
        return transfer_on_rank(ctx, case)
    return cell_on_rank(ctx, case)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp1_ac_first")


@pytest.fixture(scope="module")
def launch(checkpoints: Path) -> dict[Setup | Transfer, list[dict[str, Any]]]:
    """Every sub-case of this file, run in one launch; each case's results by rank."""
    cases: list[Setup | Transfer] = []
    for orig in (True, False):
        cases += [*training_row(orig), *transfers(orig, checkpoints)]
    return dict(zip(cases, run_on_ranks(case_on_rank, cases, timeout_s=550), strict=True))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_recipe_trains_like_no_ac_with_either_wrapper(
    launch: dict[Setup | Transfer, list[dict[str, Any]]], use_orig_params: bool
) -> None:
    baseline, ours, torchs = training_row(use_orig_params)
    for setup in (ours, torchs):
        assert launch[setup][0]["nesting"] == "CheckpointWrapper>FullyShardedDataParallel>TransformerBlock"
    check_row([baseline, ours], [launch[baseline], launch[ours]])
    # torch's wrapper leaks its prefix into named_parameters() (docs/names.md): training only.
    check_training(torchs, launch[torchs], launch[baseline])


def load_problems(target: Setup, problems: list[str]) -> list[str]:
    """What is wrong with one load: fsdp_ac's wrapper loads exactly, torch's fails as torch does."""
    if target.ac_api != "torch":
        return problems
    if len(problems) == 1 and TORCH_FAILURE.match(problems[0]):
        return []
    return [f"expected torch's 'Missing optimizer state' failure, got {problems[:3] or 'a load'}"]


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # no_dist=True, on purpose
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_dcp_restores_the_recipe_with_fsdp_ac_wrapper_and_not_with_torchs(
    launch: dict[Setup | Transfer, list[dict[str, Any]]], checkpoints: Path, use_orig_params: bool
) -> None:
    failures = []
    for transfer in transfers(use_orig_params, checkpoints):
        per_rank = launch[transfer]
        for rank, result in enumerate(per_rank):
            for target, outcome in zip(transfer.targets, result["outcomes"].values(), strict=True):
                problems = load_problems(target, outcome)
                if problems:
                    failures.append(f"{transfer.source!r} -> {target!r} on rank {rank}: {problems[:3]}")
        problems = mismatches(load_without_process_group(transfer.directory), per_rank[0]["saved"])
        if problems:
            failures.append(f"{transfer.source!r} -> plain model without a process group: {problems[:3]}")
        keys = dcp.FileSystemReader(transfer.directory).read_metadata().state_dict_metadata
        leaked = [key for key in keys if any(segment in key for segment in WRAPPER_SEGMENTS)]
        if leaked:
            failures.append(f"{transfer.source!r} saved keys with wrapper names: {leaked[:3]}")
    assert not failures, f"{len(failures)} checks failed:\n" + "\n".join(failures)
