"""fsdp_ac.dcp: torch DCP restores ``CheckpointWrapper(FSDP1(block))`` with fsdp_ac's wrapper (1 rank).

The 2-rank version, with training, DCP saves and loads across nestings, is
``tests/distributed/test_fsdp1_ac_first.py``.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.distributed.checkpoint import state_dict as dcp_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from upstream import shows

import fsdp_ac
from fsdp_ac.reference_model import GPT, TransformerBlock

pytestmark = pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")

APPLY: dict[str, Callable[..., None]] = {
    "fsdp_ac": fsdp_ac.apply_activation_checkpointing,
    "torch": torch_wrappers.apply_activation_checkpointing,
}


def recipe(gpt: GPT, api: str | None, use_orig_params: bool = True, policy: Any = None) -> FSDP:
    """torch's FSDP1 recipe: AC on every block by ``api``'s function (None: no AC), then FSDP1's
    auto-wrap (torch's ``ModuleWrapPolicy`` unless ``policy`` is given)."""
    model = copy.deepcopy(gpt)
    if api is not None:
        APPLY[api](model, check_fn=lambda m: isinstance(m, TransformerBlock))
    return FSDP(
        model,
        auto_wrap_policy=policy or ModuleWrapPolicy({TransformerBlock}),
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )


def dcp_names(model: nn.Module) -> set[str]:
    """Every FQN that DCP maps the model's parameters and buffers to."""
    names = (name for name, _ in dcp_state_dict._iterate_valid_model_state(model))
    return set().union(*(dcp_state_dict._get_fqns(model, name) for name in names))


def restore_optimizer(api: str, gpt: GPT, tokens: torch.Tensor, use_orig_params: bool) -> str:
    """One Adam step on the recipe, then its optimizer state set into a fresh one: what happened."""
    model = recipe(gpt, api, use_orig_params)
    optimizer = torch.optim.Adam(model.parameters())
    model(tokens).sum().backward()
    optimizer.step()
    full = StateDictOptions(full_state_dict=True)  # whole tensors, to compare
    saved = get_optimizer_state_dict(model, optimizer, options=full)["state"]
    fresh = recipe(gpt, api, use_orig_params)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    try:
        set_optimizer_state_dict(fresh, fresh_optimizer, get_optimizer_state_dict(model, optimizer))
    except RuntimeError as error:
        return str(error)
    loaded = get_optimizer_state_dict(fresh, fresh_optimizer, options=full)["state"]
    assert sorted(saved) == sorted(name for name, _ in gpt.named_parameters())
    assert loaded.keys() == saved.keys()
    for name, moments in saved.items():
        assert moments["step"] == 1, name  # the state of one step, not a fresh one
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(loaded[name][key]), torch.as_tensor(value)), (name, key)
    return "restored"


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_the_recipe_restores_its_optimizer_state_with_fsdp_ac_and_not_with_torch(
    single_rank_group: None, gpt: GPT, tokens: torch.Tensor, use_orig_params: bool
) -> None:
    outcomes = {api: restore_optimizer(api, gpt, tokens, use_orig_params) for api in ("torch", "fsdp_ac")}
    assert re.match(
        r"Missing optimizer state for parameter 'layers\.0\._fsdp_wrapped_module\.", outcomes["torch"]
    )
    assert outcomes["fsdp_ac"] == "restored"


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_dcp_names_the_recipe_as_fsdp1_without_ac(
    single_rank_group: None, gpt: GPT, use_orig_params: bool
) -> None:
    assert dcp_names(recipe(gpt, "fsdp_ac", use_orig_params)) == dcp_names(recipe(gpt, None, use_orig_params))
    # torch's names of the same nesting, with torch's wrapper, the defect adapted for fsdp_ac's.
    torch_names = dcp_names(recipe(gpt, "torch", use_orig_params))
    leaked = any("._fsdp_wrapped_module." in name for name in torch_names)
    shows("torch", "DCP names of AC-then-FSDP1 carry _fsdp_wrapped_module", leaked)


def test_every_other_name_goes_to_torchs_walk_unchanged(single_rank_group: None, gpt: GPT) -> None:
    recipe(gpt, "fsdp_ac")  # installs the adaptation
    walk = dcp_state_dict._get_fqns
    assert walk is not walk.__wrapped__
    others = [
        recipe(gpt, "torch"),
        recipe(gpt, "torch", use_orig_params=False),
        recipe(gpt, "fsdp_ac", policy=fsdp_ac.ModulePolicy({TransformerBlock})),  # FSDP(CheckpointWrapper)
        recipe(gpt, None),
    ]
    for model in others:
        for name, _ in dcp_state_dict._iterate_valid_model_state(model):
            assert walk(model, name) == walk.__wrapped__(model, name), name
        for key in model.state_dict():
            assert walk(model, key) == walk.__wrapped__(model, key), key


def test_a_torch_with_another_name_walk_refuses_the_nesting(
    single_rank_group: None, gpt: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dcp_state_dict, "_get_fqns", lambda model, name: {name})
    with pytest.raises(ValueError, match=r"checked on torch 2\.13.*fsdp_ac\.ModulePolicy"):
        recipe(gpt, "fsdp_ac")
    nested = recipe(gpt, "fsdp_ac", policy=fsdp_ac.ModulePolicy({TransformerBlock}))  # needs no adaptation
    assert isinstance(nested.module.layers[0], FSDP)


def test_importing_and_wrapping_without_fsdp1_leave_torch_alone() -> None:
    code = (
        "import torch, fsdp_ac\n"
        "from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock\n"
        "model = GPT(GPTConfig(n_layers=2))\n"
        "fsdp_ac.apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))\n"
        "from torch.distributed.checkpoint import state_dict\n"
        "print(state_dict._get_fqns.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torch.distributed.checkpoint.state_dict"
