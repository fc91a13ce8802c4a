"""PEFT LoRA on a frozen tiny Llama, reentrant checkpointing: torch's wrapper next to fsdp_ac's.

With the base frozen, no decoder layer's input needs a gradient (PEFT's ``enable_input_require_grads``
hook is the usual workaround, not used here). Measured with torch 2.13 and PEFT 0.21: torch's
``CheckpointImpl.REENTRANT`` region returns an output that needs no gradient, with only a warning
("None of the inputs have requires_grad=True"). With every layer checkpointed the loss needs no
gradient and ``backward`` raises; with the first layer only, ``backward`` runs and that layer's
adapters silently get no gradient. fsdp_ac's reentrant wrapper gives every adapter the gradient of
the run without checkpointing, bitwise, and backward recomputes each checkpointed layer (its SiLU).
The 2-rank FSDP2 and DDP runs are in ``tests/distributed/test_peft.py``.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hf_models import tiny_llama
from models import recomputed_in_backward
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from upstream import shows, shows_error

import fsdp_ac

pytest.importorskip("peft")
pytestmark = pytest.mark.timeout(120)

SILU = torch.ops.aten.silu.default
NO_INPUT_GRAD = "None of the inputs have requires_grad=True"


def lora_llama() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.model.model.layers  # type: ignore[no-any-return]


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name.replace("._checkpoint_wrapped_module", ""): p.grad
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def loss_of(model: nn.Module) -> tuple[torch.Tensor, bool]:
    """The loss of a fixed batch, and whether the forward warned that no region input needs a gradient."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(input_ids=tokens, labels=tokens).loss
    return loss, any(NO_INPUT_GRAD in str(w.message) for w in caught)


def checkpoint(model: nn.Module, wrappers: object, count: int) -> None:
    """Checkpoints the first ``count`` decoder layers with ``wrappers``' reentrant implementation."""
    chosen = set(map(id, layers(model)[:count]))
    wrapper = functools.partial(
        wrappers.checkpoint_wrapper,  # type: ignore[attr-defined]
        checkpoint_impl=wrappers.CheckpointImpl.REENTRANT,  # type: ignore[attr-defined]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fsdp_ac's note that it set use_cache = False
        wrappers.apply_activation_checkpointing(  # type: ignore[attr-defined]
            model, checkpoint_wrapper_fn=wrapper, check_fn=lambda module: id(module) in chosen
        )


@pytest.mark.parametrize("count", [2, 1], ids=["every_layer", "first_layer"])
def test_torch_reentrant_leaves_lora_adapters_untrained_where_fsdp_ac_trains_them(count: int) -> None:
    plain = lora_llama()
    loss, _ = loss_of(plain)
    loss.backward()
    expected = adapter_grads(plain)
    assert len(expected) == 2 * 2 * 2 and all(g is not None and g.abs().sum() > 0 for g in expected.values())
    embeddings = plain.get_input_embeddings()
    assert not embeddings.weight.requires_grad and not embeddings._forward_hooks  # no input-grad hook
    inside = [f"layers.{i}." for i in range(count)]

    theirs = lora_llama()
    checkpoint(theirs, torch_wrappers, count)
    loss, warned = loss_of(theirs)
    shows("torch", "reentrant AC of frozen-input LoRA layers warns (its only signal)", warned)
    if count == len(layers(theirs)):
        shows("torch", "reentrant AC of every LoRA layer: a loss without grad", not loss.requires_grad)
        with shows_error("torch", "that loss's backward fails", RuntimeError, "does not require grad"):
            loss.backward()
    else:
        loss.backward()
        got = adapter_grads(theirs)
        untrained = all(got[name] is None for name in expected if any(prefix in name for prefix in inside))
        shows("torch", f"reentrant AC leaves the LoRA adapters of {count} layers untrained", untrained)

    ours = lora_llama()
    checkpoint(ours, fsdp_ac, count)
    loss, warned = loss_of(ours)
    assert not warned
    assert recomputed_in_backward(loss, SILU) == count
    got = adapter_grads(ours)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert got[name] is not None and torch.equal(got[name], grad), name
