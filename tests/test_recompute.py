"""Correct by default: each case reproduces a silent failure of torch's wrapper, then fsdp_ac's answer.

Tests that train through a checkpoint wrapper count the forward operators it recomputed in backward
(``models.ForwardOpsInBackward``): equal gradients alone would also pass with a wrapper that did not
checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings
from collections import namedtuple

import pytest
import torch
from models import ConvNet, recomputed_in_backward
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from upstream import shows, shows_error

from fsdp_ac import (
    CheckpointImpl,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)
from fsdp_ac.recompute import (
    RandomOpWithoutRngStateError,
    RecomputationMismatchError,
)
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

IMPLS = list(CheckpointImpl)


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in model.named_parameters()}


def assert_same_grads(expected: nn.Module, got: nn.Module) -> None:
    for (name, want), (_, have) in zip(grads(expected).items(), grads(got).items(), strict=True):
        assert have is not None, f"{name} got no gradient"
        assert torch.equal(want, have), name


class FrozenEmbeddingModel(nn.Module):
    """A LoRA-style setup: a frozen embedding in front of a trainable checkpointed block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16).requires_grad_(False)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(tokens))


def test_reentrant_trains_a_region_whose_inputs_need_no_gradient() -> None:
    torch.manual_seed(0)
    plain = FrozenEmbeddingModel()
    tokens = torch.randint(0, 32, (4, 8))
    plain(tokens).square().mean().backward()

    theirs = copy.deepcopy(plain)
    theirs.zero_grad(set_to_none=True)
    theirs.block = torch_wrappers.checkpoint_wrapper(theirs.block, torch_wrappers.CheckpointImpl.REENTRANT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = theirs(tokens).square().mean()
    shows("torch", "reentrant AC of a block with frozen inputs trains nothing", not out.requires_grad)

    ours = copy.deepcopy(plain)
    ours.zero_grad(set_to_none=True)
    ours.block = checkpoint_wrapper(ours.block, CheckpointImpl.REENTRANT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning either
        assert recomputed_in_backward(ours(tokens).square().mean()) == 2  # both Linears rerun
    assert_same_grads(plain.block, ours.block)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_gradients_equal_no_ac_bitwise(impl: CheckpointImpl) -> None:
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_heads=4, n_layers=2, dropout=0.3))
    ours = copy.deepcopy(plain)
    apply_activation_checkpointing(
        ours,
        functools.partial(checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda m: isinstance(m, TransformerBlock),
    )
    tokens = torch.randint(0, 64, (2, 12))
    torch.manual_seed(7)
    plain(tokens).logsumexp(-1).mean().backward()
    torch.manual_seed(7)
    # All 4 Linears of each block rerun: the dropout after mlp.proj saves its mask.
    assert recomputed_in_backward(ours(tokens).logsumexp(-1).mean()) == 4 * 2
    assert_same_grads(plain, ours)


def dropout_block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 16))


def test_random_op_without_rng_state_is_refused_unless_allowed() -> None:
    plain = dropout_block()
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    plain(x).sum().backward()

    theirs = torch_wrappers.checkpoint_wrapper(dropout_block(), preserve_rng_state=False)
    torch.manual_seed(3)
    theirs(x).sum().backward()
    silently_wrong = not torch.equal(theirs[0].weight.grad, plain[0].weight.grad)
    shows("torch", "preserve_rng_state=False with dropout: other gradients, no error", silently_wrong)

    ours = checkpoint_wrapper(dropout_block(), preserve_rng_state=False)
    with pytest.raises(RandomOpWithoutRngStateError, match=r"preserve_rng_state=False.*allow_rng_divergence"):
        ours(x)
    allowed = checkpoint_wrapper(dropout_block(), preserve_rng_state=False, allow_rng_divergence=True)
    torch.manual_seed(3)
    allowed(x).sum().backward()  # allowed: the replay's other mask gives other gradients, as in torch
    assert not torch.equal(allowed[0].weight.grad, plain[0].weight.grad)
    # Without random ops, preserve_rng_state=False is fine and exact.
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 16), nn.GELU())
    deterministic = checkpoint_wrapper(copy.deepcopy(reference), preserve_rng_state=False)
    reference(x).sum().backward()
    assert recomputed_in_backward(deterministic(x).sum()) == 1
    assert_same_grads(reference, deterministic)
    # In eval mode dropout draws nothing, so nothing is refused.
    ours.eval()
    ours(x)


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet()


@pytest.mark.parametrize("impl", IMPLS)
def test_batchnorm_statistics_update_once_per_step(impl: CheckpointImpl) -> None:
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    plain = batchnorm_model()
    plain(x).sum().backward()

    convolution = torch.ops.aten.convolution.default  # forward only: its backward is convolution_backward
    theirs = batchnorm_model()
    theirs.block = torch_wrappers.checkpoint_wrapper(theirs.block, impl)
    torch_recomputed = recomputed_in_backward(theirs(x).sum(), convolution)
    shows(
        "torch",
        "BatchNorm's num_batches_tracked counted twice",
        theirs.block[1].num_batches_tracked.item() == 2,
    )

    ours = batchnorm_model()
    ours.block = checkpoint_wrapper(ours.block, impl)
    assert recomputed_in_backward(ours(x).sum(), convolution) == 1
    shows("torch", "the BatchNorm block's convolution is recomputed once", torch_recomputed == 1)
    for (name, want), (_, have) in zip(plain.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(want, have), name
    assert_same_grads(plain, ours)


def test_wrapping_twice_is_idempotent() -> None:
    linear = nn.Linear(4, 4)
    once = checkpoint_wrapper(linear)
    assert checkpoint_wrapper(once) is once
    nested = torch_wrappers.checkpoint_wrapper(torch_wrappers.checkpoint_wrapper(nn.Linear(4, 4)))
    shows(
        "torch",
        "checkpoint_wrapper twice nests",
        isinstance(nested._checkpoint_wrapped_module, torch_wrappers.CheckpointWrapper),
    )
    offloaded = torch_wrappers.offload_wrapper(once)
    assert checkpoint_wrapper(offloaded) is offloaded
    with pytest.raises(ValueError, match=r"other settings.*fsdp_ac\.unwrap"):
        checkpoint_wrapper(once, CheckpointImpl.REENTRANT)
    torch_twice = torch_wrappers.offload_wrapper(torch_wrappers.offload_wrapper(nn.Linear(4, 4)))
    shows(
        "torch",
        "offload_wrapper twice nests",
        isinstance(torch_twice._checkpoint_wrapped_module, torch_wrappers.OffloadWrapper),
    )
    ours_offloaded = offload_wrapper(nn.Linear(4, 4), min_offload_bytes=0)
    assert offload_wrapper(ours_offloaded, min_offload_bytes=0) is ours_offloaded
    with pytest.raises(ValueError, match=r"offloading with other settings.*fsdp_ac\.unwrap"):
        offload_wrapper(ours_offloaded)  # another min_offload_bytes: not silently ignored
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_heads=2, n_layers=2))
    for _ in range(2):
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))
    assert all(isinstance(layer._checkpoint_wrapped_module, TransformerBlock) for layer in model.layers)


def test_hugging_face_gradient_checkpointing_is_refused() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(config)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"gradient_checkpointing_disable\(\)"):
        apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "LlamaDecoderLayer")
    with pytest.raises(ValueError, match=r"model\.layers\.0|LlamaDecoderLayer"):
        checkpoint_wrapper(model.model.layers[0])
    model.gradient_checkpointing_disable()
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "LlamaDecoderLayer")
    tokens = torch.randint(0, 64, (1, 6))
    # Each decoder layer's MLP activation (SiLU, forward only) reruns once: fsdp_ac checkpointed them.
    loss = model(input_ids=tokens, labels=tokens).loss
    assert recomputed_in_backward(loss, torch.ops.aten.silu.default) == 2
    assert all(p.grad is not None for p in model.parameters())


Pair = namedtuple("Pair", ["main", "aux"])


@dataclasses.dataclass
class Output:
    hidden: torch.Tensor
    extra: dict[str, torch.Tensor]
    label: str = "ok"


class StructuredBlock(nn.Module):
    """Takes keyword and nested inputs, returns nested and non-tensor outputs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, *, bias: dict[str, torch.Tensor]) -> object:
        h = torch.tanh(self.a(x) + bias["value"])
        y = self.b(h)
        if self.kind == "dict":
            return {"main": y, "aux": h, "count": 3}
        if self.kind == "namedtuple":
            return Pair(y, h)
        if self.kind == "dataclass":
            return Output(y, {"aux": h})
        return (y, None, "text")


def output_loss(out: object) -> torch.Tensor:
    if isinstance(out, dict):
        assert out["count"] == 3
        return out["main"].sum() + out["aux"].square().sum()
    if isinstance(out, Pair):
        return out.main.sum() + out.aux.square().sum()
    if isinstance(out, Output):
        assert out.label == "ok"
        return out.hidden.sum() + out.extra["aux"].square().sum()
    assert isinstance(out, tuple) and out[1] is None and out[2] == "text"
    return out[0].sum()


@pytest.mark.parametrize("kind", ["dict", "namedtuple", "dataclass", "tuple_with_non_tensors"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nested_inputs_and_outputs(kind: str, impl: CheckpointImpl) -> None:
    torch.manual_seed(0)
    plain = StructuredBlock(kind)
    x = torch.randn(3, 6, requires_grad=True)
    bias = {"value": torch.randn(6, requires_grad=True)}
    output_loss(plain(x, bias=bias)).backward()
    expected = (x.grad.clone(), bias["value"].grad.clone())
    x.grad = bias["value"].grad = None

    ours = checkpoint_wrapper(copy.deepcopy(plain), impl)
    ours.zero_grad(set_to_none=True)
    out = ours(x, bias=bias)
    assert type(out) is type(plain(x, bias=bias))
    # Non-reentrant recomputation stops after ``a``: ``b``'s output is saved by nothing.
    assert recomputed_in_backward(output_loss(out)) == (2 if impl is CheckpointImpl.REENTRANT else 1)
    assert_same_grads(plain, ours)
    assert torch.equal(x.grad, expected[0]) and torch.equal(bias["value"].grad, expected[1])


def test_torch_reentrant_loses_gradients_of_dict_outputs() -> None:
    torch.manual_seed(0)
    theirs = torch_wrappers.checkpoint_wrapper(
        StructuredBlock("dict"), torch_wrappers.CheckpointImpl.REENTRANT
    )
    out = theirs(torch.randn(3, 6, requires_grad=True), bias={"value": torch.randn(6)})
    assert not out["main"].requires_grad  # the silent failure fsdp_ac fixes


def test_attributes_len_iteration_and_indexing_reach_the_wrapped_module() -> None:
    inner = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    wrapper = checkpoint_wrapper(inner)
    assert len(wrapper) == 3
    assert list(wrapper) == list(inner)
    assert wrapper[2] is inner[2]
    replacement = nn.Linear(3, 1)
    wrapper.head = replacement
    assert inner.head is replacement
    assert "head" not in wrapper._modules
    wrapper.note = "kept"
    assert inner.note == "kept"
    assert wrapper.checkpoint_impl is CheckpointImpl.NO_REENTRANT
    assert not hasattr(inner, "checkpoint_impl")


def test_remove_activation_checkpointing_restores_the_original_model(gpt: GPT) -> None:
    from fsdp_ac import remove_activation_checkpointing, unwrap
    from fsdp_ac.wrappers import offload_wrapper

    original = copy.deepcopy(gpt)
    apply_activation_checkpointing(
        gpt,
        lambda m: offload_wrapper(checkpoint_wrapper(m)),
        check_fn=lambda m: isinstance(m, TransformerBlock),
    )
    block = unwrap(gpt.layers[0])
    assert isinstance(block, TransformerBlock)
    assert remove_activation_checkpointing(gpt) is gpt
    assert gpt.layers[0] is block
    assert [(n, type(m)) for n, m in gpt.named_modules()] == [
        (n, type(m)) for n, m in original.named_modules()
    ]
    assert list(gpt.state_dict()) == list(original.state_dict())
    root = checkpoint_wrapper(nn.Linear(2, 2))
    assert isinstance(remove_activation_checkpointing(root), nn.Linear)
    hooked = nn.Sequential(checkpoint_wrapper(nn.Linear(2, 2)))
    hooked[0].register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(ValueError, match="before sharding"):
        remove_activation_checkpointing(hooked)


class StatefulBlock(nn.Module):
    """A forward that depends on a mutable attribute: the replay differs from the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.width = 8
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x)[..., : self.width] * self.scale)


def test_a_replay_with_other_shapes_names_the_region() -> None:
    theirs = torch_wrappers.checkpoint_wrapper(StatefulBlock())
    loss = theirs(torch.randn(2, 8)).sum()
    theirs._checkpoint_wrapped_module.width = 4  # torch's wrapper does not forward attribute writes
    with shows_error("torch", "a replay with other shapes fails", Exception) as torch_error:
        loss.backward()
    shows("torch", "its replay error does not name the module", "StatefulBlock" not in str(torch_error.value))

    model = nn.Sequential(nn.Linear(8, 8), StatefulBlock())
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, StatefulBlock))
    loss = model(torch.randn(2, 8)).sum()
    model[1].width = 4
    with pytest.raises(RecomputationMismatchError, match=r"region '1'.*Likely cause"):
        loss.backward()


def test_optional_value_check_catches_a_replay_with_other_values() -> None:
    silent = checkpoint_wrapper(StatefulBlock())
    loss = silent(torch.randn(2, 8)).sum()
    silent.scale = 2.0
    loss.backward()  # same shapes: the default metadata check cannot see it (nor can torch's)

    checked = checkpoint_wrapper(StatefulBlock(), check_recomputed_values=True)
    loss = checked(torch.randn(2, 8)).sum()
    checked.scale = 2.0
    with pytest.raises(RecomputationMismatchError, match="recomputed different values"):
        loss.backward()
    exact = checkpoint_wrapper(StatefulBlock(), check_recomputed_values=True)
    exact(torch.randn(2, 8)).sum().backward()


@pytest.mark.parametrize("kind", ["dict", "dataclass", "tuple_with_non_tensors"])
def test_reentrant_outputs_are_freed_as_soon_as_dropped(kind: str) -> None:
    """No reference cycle keeps a region's outputs (and their graph) alive until a GC pass."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    wrapped = checkpoint_wrapper(StructuredBlock(kind), CheckpointImpl.REENTRANT)
    gc.disable()
    try:
        out = wrapped(torch.randn(3, 6, requires_grad=True), bias={"value": torch.randn(6)})
        first = out["main"] if isinstance(out, dict) else out.hidden if isinstance(out, Output) else out[0]
        assert type(first.grad_fn).__name__ == "CheckpointFunctionBackward"  # reentrant checkpointing ran
        ref = StorageWeakRef(first.untyped_storage())
        del out, first
        assert ref.expired()
    finally:
        gc.enable()


def test_hugging_face_cache_in_training_is_refused() -> None:
    from hf_models import tiny_llama

    model = tiny_llama()
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "LlamaDecoderLayer")
    tokens = torch.randint(0, 64, (1, 6))
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=tokens, use_cache=True)
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    assert recomputed_in_backward(loss, torch.ops.aten.silu.default) == 2  # both layers recomputed


def test_a_wrapper_is_truthy() -> None:
    assert checkpoint_wrapper(nn.Linear(2, 2))
    assert checkpoint_wrapper(nn.Sequential())


SAC_ROUTES_SAVES_THROUGH_HOOKS = (
    "respect_saved_tensors_hooks" in inspect.signature(torch.utils.checkpoint.checkpoint).parameters
)
"""torch 2.14 and later: selective checkpointing can hand the outputs it saves to the user's hooks."""


def _selective_step_under_hooks(**checkpoint_kwargs: object) -> tuple[nn.Module, int, int]:
    """One step of a selective ("matmul") block inside the user's saved-tensor hooks.

    Returns:
        The block, how many tensors the user's hooks packed, and how many ``addmm``/``relu`` the
        backward recomputed (1: the relu only, the selection saved the matmuls).
    """
    torch.manual_seed(0)
    block = SelectiveCheckpoint("matmul", **checkpoint_kwargs)(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    )
    packed: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packed.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = block(torch.randn(4, 8, requires_grad=True)).sum()
    rerun = recomputed_in_backward(loss, torch.ops.aten.addmm.default, torch.ops.aten.relu.default)
    return block, len(packed), rerun


def test_the_replay_audit_is_not_taken_for_the_users_saved_tensor_hooks() -> None:
    """torch 2.14 warns that selective checkpointing bypasses the user's hooks whenever any are pushed
    inside its region; the audit's are fsdp_ac's own and must not make every selective block warn."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    block = SelectiveCheckpoint("matmul")(copy.deepcopy(reference))
    x = torch.randn(4, 8)
    reference(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loss = block(x).sum()
        rerun = recomputed_in_backward(loss, torch.ops.aten.addmm.default, torch.ops.aten.relu.default)
    assert rerun == 1  # relu recomputed, the matmuls saved: the selection applied
    assert_same_grads(reference, block)


@pytest.mark.skipif(not SAC_ROUTES_SAVES_THROUGH_HOOKS, reason="torch < 2.14: no respect_saved_tensors_hooks")
def test_selective_saves_reach_the_users_hooks_through_the_replay_audit() -> None:
    """With ``respect_saved_tensors_hooks=True`` (torch's announced default) the outputs the selection
    saves go to the user's hooks (e.g. offloading) as without the audit, and backward still works."""
    unaudited, packed_unaudited, _ = _selective_step_under_hooks(
        respect_saved_tensors_hooks=True, determinism_check="none"
    )
    audited, packed, rerun = _selective_step_under_hooks(respect_saved_tensors_hooks=True)
    _, packed_bypassing, _ = _selective_step_under_hooks(respect_saved_tensors_hooks=False)
    assert rerun == 1
    assert packed == packed_unaudited > packed_bypassing
    assert_same_grads(unaudited, audited)
