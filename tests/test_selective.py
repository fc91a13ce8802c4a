"""Selective activation checkpointing: gradients, exact held bytes, recomputed FLOPs, learning, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hf_models import tiny_llama
from models import SMALL_GPT
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils.flop_counter import FlopCounterMode

from fsdp_ac import (
    ActivationMemoryMeter,
    CheckpointImpl,
    CheckpointWrapper,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
)
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

BATCH, SEQ = 2, 12
"""Shape of the ``tokens`` fixture."""
UNIT = BATCH * SEQ * SMALL_GPT.d_model * 4
"""Bytes of one fp32 activation of width d_model."""
LSE = BATCH * SMALL_GPT.n_heads * SEQ * 4
"""Bytes of the log-sum-exp the attention kernel saves besides its output."""
SAVED_PER_BLOCK = {
    "default": 3 * UNIT + UNIT + LSE + 4 * UNIT,  # QKV, attention (+ LSE), first MLP matmul
    "torchtitan": 3 * UNIT + UNIT + LSE + 4 * UNIT,  # matmuls 1 and 3 of 4: the same ones here
    "matmul": 3 * UNIT + UNIT + LSE + UNIT + 4 * UNIT + UNIT,  # and both output projections
    "attention": UNIT + LSE,
}
"""Bytes a block holds beyond its input under each preset (pre-LN block, fused QKV, 4x MLP)."""

CUSTOM_POLICIES: dict[str, Any] = {
    "op_list": [torch.ops.aten.addmm.default],
    "policy_fn": lambda ctx, op, *args, **kwargs: CheckpointPolicy.PREFER_RECOMPUTE,
}


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def step(model: nn.Module, tokens: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """One forward and backward; returns the bytes held for backward and the gradients."""
    with ActivationMemoryMeter(model) as meter:
        loss = loss_of(model, tokens)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return meter.held_bytes, grads


def selective(model: nn.Module, save: Any = "default", **kwargs: Any) -> SelectiveCheckpoint:
    wrapper_fn = SelectiveCheckpoint(save, **kwargs)
    apply_activation_checkpointing(model, wrapper_fn, auto_wrap_policy={TransformerBlock})
    return wrapper_fn


@pytest.mark.parametrize("save", [*SelectiveCheckpoint.PRESETS, *CUSTOM_POLICIES])
def test_gradients_equal_no_ac_bitwise(gpt: GPT, tokens: torch.Tensor, save: str) -> None:
    wrapped = copy.deepcopy(gpt)
    selective(wrapped, CUSTOM_POLICIES.get(save, save))
    _, expected = step(gpt, tokens)
    for _ in range(2):  # the default preset learns on the first call and uses what it learned after
        _, grads = step(wrapped, tokens)
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)


def test_random_ops_replay_the_same_numbers(tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**{**SMALL_GPT.__dict__, "dropout": 0.3}))
    wrapped = copy.deepcopy(plain)
    selective(wrapped)
    for _ in range(2):
        torch.manual_seed(1)
        _, expected = step(plain, tokens)
        torch.manual_seed(1)
        _, grads = step(wrapped, tokens)
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("save", SelectiveCheckpoint.PRESETS)
def test_held_bytes_are_exactly_the_saved_outputs(gpt: GPT, tokens: torch.Tensor, save: str) -> None:
    full = copy.deepcopy(gpt)
    apply_activation_checkpointing(full, auto_wrap_policy={TransformerBlock})
    full_bytes, _ = step(full, tokens)
    wrapped = copy.deepcopy(gpt)
    selective(wrapped, save)
    first, _ = step(wrapped, tokens)
    second, _ = step(wrapped, tokens)
    assert second - full_bytes == SMALL_GPT.n_layers * SAVED_PER_BLOCK[save]
    # Learning costs the first block of the first step its two output projections, once.
    assert first - second == (2 * UNIT if save == "default" else 0)


def test_blocks_learn_separately_without_a_shared_object(gpt: GPT, tokens: torch.Tensor) -> None:
    shared, separate = copy.deepcopy(gpt), copy.deepcopy(gpt)
    selective(shared)
    for layer in separate.layers:
        apply_activation_checkpointing(layer, SelectiveCheckpoint(), auto_wrap_policy={"Attention", "MLP"})
    # Sub-blocks: each Attention and MLP is its own region and learns its own plan.
    first, _ = step(separate, tokens)
    second, _ = step(separate, tokens)
    assert first - second == SMALL_GPT.n_layers * 2 * UNIT
    assert step(shared, tokens)[0] - step(shared, tokens)[0] == 2 * UNIT


def recomputed_matmul_flops(model: nn.Module, tokens: torch.Tensor) -> int:
    """Matmul FLOPs of the backward pass (gradients plus any recomputation)."""
    loss = loss_of(model, tokens)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()["Global"]
    return int(counts.get(torch.ops.aten.addmm, 0) + counts.get(torch.ops.aten.mm, 0))


@pytest.mark.parametrize(
    ("save", "recomputed_per_block"),
    [
        ("default", 1),  # the attention output projection (d x d)
        ("torchtitan", 1),
        ("matmul", 0),
        ("attention", 8),  # QKV (3), projection (1), MLP in (4); the last matmul is never replayed
        (None, 8),  # full checkpointing
    ],
)
def test_recomputed_flops_are_counted(
    gpt: GPT, tokens: torch.Tensor, save: str | None, recomputed_per_block: int
) -> None:
    wrapped = copy.deepcopy(gpt)
    if save is None:
        apply_activation_checkpointing(wrapped, auto_wrap_policy={TransformerBlock})
    else:
        selective(wrapped, save)
    step(wrapped, tokens)  # learn
    extra = recomputed_matmul_flops(wrapped, tokens) - recomputed_matmul_flops(gpt, tokens)
    d_model = SMALL_GPT.d_model
    assert extra == SMALL_GPT.n_layers * recomputed_per_block * 2 * BATCH * SEQ * d_model * d_model


def test_learned_plan_names_the_saved_matmuls(gpt: GPT, tokens: torch.Tensor) -> None:
    wrapper_fn = selective(gpt)
    assert wrapper_fn.learned(gpt.layers[0]) is None
    step(gpt, tokens)
    # QKV (#0) and the MLP's first matmul (#2); the output projections (#1, #3) feed residual adds.
    expected = ["aten.addmm.default #0", "aten.addmm.default #2"]
    assert wrapper_fn.learned(gpt.layers[0]) == wrapper_fn.learned(gpt.layers[1]) == expected
    assert repr(wrapper_fn) == "SelectiveCheckpoint('default')"


class Branchy(nn.Module):
    """Runs an extra matmul for long inputs: the op sequence depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.extra = nn.Linear(8, 8)
        self.last = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if x.shape[0] > 4:
            h = torch.tanh(self.extra(h))
        return x + self.last(h)


def test_a_block_that_changes_path_learns_again() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(Branchy(), Branchy())
    wrapped = copy.deepcopy(plain)
    wrapper_fn = SelectiveCheckpoint()
    apply_activation_checkpointing(wrapped, wrapper_fn, auto_wrap_policy={Branchy})
    for rows in (6, 2, 2, 6, 6):
        x = torch.randn(rows, 8)
        plain(x).sum().backward()
        wrapped(x).sum().backward()
        for got, want in zip(wrapped.parameters(), plain.parameters(), strict=True):
            assert (got.grad is None and want.grad is None) or torch.equal(got.grad, want.grad)
            got.grad = want.grad = None
        saved = ["aten.addmm.default #0", "aten.addmm.default #1"] if rows > 4 else ["aten.addmm.default #0"]
        assert wrapper_fn.learned(wrapped[0]) == saved


def test_wrapping_again_is_idempotent_only_for_the_same_object(gpt: GPT) -> None:
    wrapper_fn = selective(gpt)
    apply_activation_checkpointing(gpt, wrapper_fn, auto_wrap_policy={TransformerBlock})
    assert all(type(layer._checkpoint_wrapped_module) is TransformerBlock for layer in gpt.layers)
    assert wrapper_fn(gpt.layers[0]) is gpt.layers[0]
    with pytest.raises(ValueError, match="already wrapped for activation checkpointing with other settings"):
        SelectiveCheckpoint("matmul")(gpt.layers[0])


def test_bad_arguments_raise_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"Unknown selective checkpointing preset 'titan'; use one of"):
        SelectiveCheckpoint("titan")
    with pytest.raises(TypeError, match=r"Use aten\.mm\.default"):
        SelectiveCheckpoint([torch.ops.aten.mm])
    with pytest.raises(ValueError, match="no operators to save"):
        SelectiveCheckpoint([])
    with pytest.raises(TypeError, match=r"needs CheckpointImpl\.NO_REENTRANT"):
        SelectiveCheckpoint(checkpoint_impl=CheckpointImpl.REENTRANT)
    with pytest.raises(TypeError, match="sets context_fn itself"):
        SelectiveCheckpoint(context_fn=lambda: None)


def test_checkpoint_arguments_reach_the_wrapper() -> None:
    block = SelectiveCheckpoint("matmul", preserve_rng_state=False, allow_rng_divergence=True)(
        nn.Linear(2, 2)
    )
    assert isinstance(block, CheckpointWrapper)
    assert block.checkpoint_fn.keywords["preserve_rng_state"] is False
    assert block.allow_rng_divergence is True


def test_hugging_face_llama(tokens: torch.Tensor) -> None:
    """Separate Q/K/V and a gated MLP: the default preset saves what backward reads, not every other."""
    model = tiny_llama()

    def llama_step(m: nn.Module) -> tuple[int, list[torch.Tensor]]:
        # use_cache=False as with any checkpointing: a cache filled by the forward changes the replay.
        with ActivationMemoryMeter(m) as meter:
            loss = m(tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        grads = [p.grad for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        return meter.held_bytes, grads

    _, expected = llama_step(model)
    held = {}
    for save in ("default", "torchtitan", "matmul"):
        wrapped = copy.deepcopy(model)
        wrapper_fn = SelectiveCheckpoint(save)
        apply_activation_checkpointing(wrapped, wrapper_fn, auto_wrap_policy=model._no_split_modules)
        llama_step(wrapped)
        held[save], grads = llama_step(wrapped)
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)
        if save == "default":
            # q, k, v (#0-2), gate and up (#4, #5); o_proj (#3) and down_proj (#6) feed residual adds.
            assert wrapper_fn.learned(wrapped.model.layers[0]) == [
                f"aten.mm.default #{i}" for i in (0, 1, 2, 4, 5)
            ]
    # torchtitan's alternation recomputes k_proj and up_proj (cheaper memory, more recompute here).
    assert held["torchtitan"] < held["default"] < held["matmul"]
