"""Typed strategies: one parser of the spellings, JSON for the options a spelling cannot carry."""

from __future__ import annotations

import copy

import pytest
import torch

from fsdp_ac import ActivationPlan, CheckpointImpl
from fsdp_ac.offload import OffloadOptions
from fsdp_ac.reference_model import GPT, GPTConfig
from fsdp_ac.strategies import (
    STRATEGIES,
    Full,
    NoCheckpoint,
    Offload,
    Selective,
    parse_strategy,
    strategy_from_json,
)

TYPED = [
    NoCheckpoint(),
    Full(),
    Full(CheckpointImpl.REENTRANT),
    Selective(),
    Selective("torchtitan"),
    Selective(("aten.mm.default", "aten.addmm.default")),
    Selective(("aten.addmm.default#0", "aten.mm.default#2")),
    Offload(),
    Offload(Full()),
    Offload(Full(), pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True),
    Offload(Selective("matmul")),
]


def test_every_spelling_parses_and_prints_back() -> None:
    for spelling in STRATEGIES:
        assert str(parse_strategy(f" {spelling.upper()} ", "test")) == spelling.removesuffix(":default")
    assert parse_strategy("full+offload", "test") == Offload(Full())
    with pytest.raises(ValueError, match=r"Unknown strategy 'ful' for FSDP_AC_STRATEGY; .* mean 'full'"):
        parse_strategy("ful", "FSDP_AC_STRATEGY")


@pytest.mark.parametrize("strategy", TYPED, ids=repr)
def test_json_and_plans_keep_every_option(strategy: object) -> None:
    assert strategy_from_json(strategy.to_json()) == strategy  # type: ignore[attr-defined]
    plan = ActivationPlan({"layers.0": strategy})  # type: ignore[dict-item]
    assert ActivationPlan.from_json(plan.to_json()) == plan


def test_invalid_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"Cannot read 'aten.nope' as an operator to save"):
        Selective(("aten.nope",))
    with pytest.raises(ValueError, match=r"for module 'layers.0': Cannot read 'aten.mm.nope#1'"):
        parse_strategy("selective:aten.mm.nope#1", "module 'layers.0'")
    with pytest.raises(ValueError, match="Unknown selective checkpointing preset 'fast'"):
        Selective("fast")
    with pytest.raises(ValueError, match="min_offload_bytes must be >= 0"):
        Offload(min_offload_bytes=-1)
    with pytest.raises(ValueError, match=r"invalid options for strategy 'full'"):
        strategy_from_json({"strategy": "full", "impl": "sideways"})
    with pytest.raises(ValueError, match=r"is no strategy"):
        strategy_from_json({"strategy": "recompute"})


def test_options_reach_the_wrapper_at_construction() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_heads=2, n_layers=3))
    plan = ActivationPlan(
        {
            "layers.0": Offload(Full(), pin_memory=False, min_offload_bytes=0),
            "layers.1": Full(CheckpointImpl.REENTRANT),
            "layers.2": Offload(min_offload_bytes=7),
        }
    )
    plan.apply(copy.deepcopy(model))
    wrapped = plan.apply(model)
    first, second, third = wrapped.layers
    assert first.offload == OffloadOptions(pin_memory=False, min_offload_bytes=0)
    assert second.checkpoint_impl == CheckpointImpl.REENTRANT and second.offload is None
    assert (third.min_offload_bytes, third.pin_memory) == (7, True)


def test_the_planners_per_call_spelling_parses_into_a_selective_strategy_and_back() -> None:
    strategy = parse_strategy("selective:aten.addmm.default#0,aten.mm.default", "the planner")
    assert strategy == Selective(("aten.addmm.default#0", "aten.mm.default"))
    assert parse_strategy(str(strategy), "str") == strategy
    plan = ActivationPlan({"layers.0": str(strategy)})
    assert plan.strategies["layers.0"] == strategy
