"""Every strategy through every entry point: one application path, the same wrappers and guards.

The entry points are ``apply_activation_checkpointing`` (with the strategy's wrapper as
``checkpoint_wrapper_fn``), ``ActivationPlan.apply`` and the Accelerate integration (a one-process
``prepare`` driven by ``FSDP_AC_*`` variables). Each must give the same structure and gradients equal
to those without activation checkpointing, and run the same guards (:mod:`fsdp_ac.apply`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hf_models import tiny_llama
from models import ForwardOpsInBackward, chain_of
from torch import nn

import fsdp_ac.accelerate
from fsdp_ac import ActivationPlan, apply_activation_checkpointing
from fsdp_ac.offload import OffloadOptions
from fsdp_ac.reference_model import GPT, GPTConfig
from fsdp_ac.strategies import parse_strategy

accelerate = pytest.importorskip("accelerate")

STRATEGIES = ["none", "full", "selective", "selective:torchtitan", "offload", "full+offload"]
ACTIVE = STRATEGIES[1:]
CHAIN = {
    "none": "TransformerBlock",
    "full": "CheckpointWrapper>TransformerBlock",
    "selective": "CheckpointWrapper>TransformerBlock",
    "selective:torchtitan": "CheckpointWrapper>TransformerBlock",
    "offload": "OffloadWrapper>TransformerBlock",
    "full+offload": "CheckpointWrapper>TransformerBlock",
}
RECOMPUTES_GELU = {"full", "selective", "selective:torchtitan", "full+offload"}
CONFIG = GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_heads=2, n_layers=2, dropout=0.1)

EntryPoint = Callable[[nn.Module, str, set[str]], nn.Module]


def through_apply(model: nn.Module, strategy: str, blocks: set[str]) -> nn.Module:
    wrap = parse_strategy(strategy, "the test").wrapper()
    apply_activation_checkpointing(model, wrap, auto_wrap_policy=blocks)
    return model


def through_plan(model: nn.Module, strategy: str, blocks: set[str]) -> nn.Module:
    return ActivationPlan.from_policy(model, blocks, strategy).apply(model)


def through_accelerate(model: nn.Module, strategy: str, blocks: set[str]) -> nn.Module:
    os.environ["FSDP_AC_BLOCKS"] = ",".join(sorted(blocks))
    os.environ["FSDP_AC_STRATEGY" if strategy != "none" else "FSDP_AC_POLICY"] = strategy
    accelerator = SimpleNamespace(
        distributed_type=accelerate.utils.DistributedType.NO,
        num_processes=1,
        is_main_process=True,
        prepare=lambda *args, device_placement=None: args[0],
    )
    prepared: nn.Module = fsdp_ac.accelerate.prepare(accelerator, model)
    return prepared


ENTRY_POINTS: dict[str, EntryPoint] = {
    "apply_activation_checkpointing": through_apply,
    "ActivationPlan.apply": through_plan,
    "accelerate.prepare": through_accelerate,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No FSDP_AC_* or Accelerate setting leaks in from the shell, or out of a test."""
    for key in list(os.environ):
        if key.startswith(("FSDP_", "ACCELERATE_")) or key == "WORLD_SIZE":
            monkeypatch.delenv(key)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def step(model: nn.Module, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """One step's gradients (dropout seeded), and the GELUs its backward reran."""
    torch.manual_seed(1)
    logits = model(tokens)
    with ForwardOpsInBackward(torch.ops.aten.gelu.default) as gelus:
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    return {name: p.grad for name, p in model.named_parameters()}, gelus.count


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_strategy_through_every_entry_point(entry: str, strategy: str) -> None:
    torch.manual_seed(0)
    plain = GPT(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model = ENTRY_POINTS[entry](copy.deepcopy(plain), strategy, {"TransformerBlock"})
    layers = list(model.layers._modules.values())
    assert [chain_of(layer) for layer in layers] == [CHAIN[strategy]] * CONFIG.n_layers
    if strategy != "none":
        assert [layer.region_name for layer in layers] == ["layers.0", "layers.1"]
    offload = OffloadOptions() if strategy == "full+offload" else None
    assert [getattr(layer, "offload", None) for layer in layers] == [offload] * CONFIG.n_layers
    expected, _ = step(plain, tokens)
    for _ in range(2):  # the selective default preset learns in the first step
        got, gelus = step(model, tokens)
        assert gelus == (CONFIG.n_layers if strategy in RECOMPUTES_GELU else 0)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            assert torch.equal(got[name], grad), name
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("strategy", ACTIVE)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_the_same_guards_fire_through_every_entry_point(
    entry: str, strategy: str, capfd: pytest.CaptureFixture[str]
) -> None:
    apply = ENTRY_POINTS[entry]
    llama = tiny_llama()
    blocks = {"LlamaDecoderLayer"}
    # A policy that matches nothing names the model's classes, and nothing is wrapped.
    with pytest.raises(ValueError, match=r"matched no submodule of LlamaForCausalLM.*LlamaDecoderLayer"):
        apply(llama, strategy, {"NoSuchBlock"})
    assert not any(hasattr(m, "region_name") for m in llama.modules())
    # Hugging Face's own gradient checkpointing would recompute every layer twice.
    model = copy.deepcopy(llama)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"Hugging Face gradient checkpointing is enabled on .* inside"):
        apply(model, strategy, blocks)
    # The key/value cache is turned off, and the account line says so.
    assert llama.config.use_cache is True
    capfd.readouterr()
    apply(llama, strategy, blocks)
    assert llama.config.use_cache is False
    assert capfd.readouterr().err.endswith("; set LlamaForCausalLM.config.use_cache = False\n")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_writes_one_account_line_on_rank_0(
    entry: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Seen without configuring logging; FSDP_AC_VERBOSITY=warning and the other ranks write nothing."""
    apply = ENTRY_POINTS[entry]
    capfd.readouterr()
    apply(tiny_llama(), "full", {"LlamaDecoderLayer"})
    settings = "; policy all from FSDP_AC_STRATEGY" if entry == "accelerate.prepare" else ""
    assert capfd.readouterr().err == (
        f"fsdp_ac: 2/2 LlamaDecoderLayer checkpointed (full{settings}); "
        "set LlamaForCausalLM.config.use_cache = False\n"
    )
    apply(GPT(CONFIG), "selective", {"TransformerBlock"})
    assert "fsdp_ac: 2/2 TransformerBlock checkpointed (selective" in capfd.readouterr().err
    for variable, value in [("FSDP_AC_VERBOSITY", "warning"), ("RANK", "1")]:
        os.environ[variable] = value
        apply(GPT(CONFIG), "full", {"TransformerBlock"})
        assert capfd.readouterr().err == "", variable
        del os.environ[variable]
    # Where logging shows fsdp_ac's INFO records, the line goes there instead.
    with caplog.at_level("INFO", logger="fsdp_ac"):
        apply(GPT(CONFIG), "full", {"TransformerBlock"})
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name == "fsdp_ac"] == [
        f"fsdp_ac: 2/2 TransformerBlock checkpointed (full{settings})"
    ]
    os.environ["FSDP_AC_VERBOSITY"] = "loud"
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match=r"FSDP_AC_VERBOSITY must be info .* or warning"):
        apply(model, "full", {"TransformerBlock"})
    assert not any(hasattr(m, "region_name") for m in model.modules())  # refused before any change


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_warnings_point_at_the_line_that_called_fsdp_ac(single_rank_group: None, entry: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from fsdp_ac import ModulePolicy

    model = FSDP(GPT(CONFIG), auto_wrap_policy=ModulePolicy({"MLP"}), device_id=torch.device("cpu"))
    with pytest.warns(UserWarning, match="splits AC region") as record:
        ENTRY_POINTS[entry](model, "full", {"TransformerBlock"})
    assert {w.filename for w in record if "splits AC region" in str(w.message)} == {__file__}


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("entry", ["apply_activation_checkpointing", "ActivationPlan.apply"])
def test_full_offload_in_an_fsdp1_flat_unit_trains_through_every_entry_point(
    single_rank_group: None, entry: str
) -> None:
    """The nesting Accelerate's FSDP1 default with offload makes (after ``prepare``); the Accelerate
    path itself runs under ``accelerate launch`` in tests/distributed/test_accelerate_launch.py."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from fsdp_ac import ModulePolicy

    torch.manual_seed(0)
    plain = GPT(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    baseline, model = (
        FSDP(
            copy.deepcopy(plain),
            auto_wrap_policy=ModulePolicy({"TransformerBlock"}),
            use_orig_params=False,
            device_id=torch.device("cpu"),
        )
        for _ in range(2)
    )
    ENTRY_POINTS[entry](model, "full+offload", {"TransformerBlock"})
    chains = [chain_of(layer) for layer in model._fsdp_wrapped_module.layers]
    assert chains == ["FullyShardedDataParallel>CheckpointWrapper>TransformerBlock"] * CONFIG.n_layers
    expected, _ = step(baseline, tokens)
    got, gelus = step(model, tokens)
    assert gelus == CONFIG.n_layers
    for name, grad in expected.items():  # flat parameters: the same layout in both
        assert torch.equal(got[name], grad), name
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    assert set(get_model_state_dict(model)) == set(plain.state_dict())
