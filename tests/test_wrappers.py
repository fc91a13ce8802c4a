"""Wrappers: torch-compatible API, gradients equal to no AC, policies, FSDP's view of the wrapper.

Every test that trains through a checkpoint wrapper also counts the forward operators recomputed in
backward (``models.ForwardOpsInBackward``), so a wrapper that ran its module without checkpointing
would fail it: equal gradients alone cannot tell.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable

import pytest
import torch
from models import LINEARS_RECOMPUTED_PER_BLOCK, ConvNet, recomputed_in_backward
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.distributed.fsdp.wrap import (
    ModuleWrapPolicy,
    size_based_auto_wrap_policy,
    transformer_auto_wrap_policy,
)

import fsdp_ac
from fsdp_ac import (
    ActivationMemoryMeter,
    ActivationWrapper,
    CheckpointImpl,
    CheckpointWrapper,
    OffloadWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)
from fsdp_ac.reference_model import GPT, MLP, TransformerBlock


def _default_repr(value: object) -> object:
    """Functions compare by name (ours is our own ``checkpoint_wrapper``); other defaults by value."""
    return getattr(value, "__name__", value) if callable(value) else value


@pytest.mark.parametrize("name", ["checkpoint_wrapper", "offload_wrapper", "apply_activation_checkpointing"])
def test_signatures_match_torch(name: str) -> None:
    ours = inspect.signature(getattr(fsdp_ac, name)).parameters
    theirs = inspect.signature(getattr(torch_wrappers, name)).parameters
    shared = [p for p in ours.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in shared] == list(theirs)
    for param in shared:
        expected = theirs[param.name]
        assert param.kind == expected.kind, param.name
        if param.name != "check_fn":  # a lambda in both: compared by behaviour below
            assert _default_repr(param.default) == _default_repr(expected.default), param.name
    if "check_fn" in ours:
        assert ours["check_fn"].default(nn.Linear(1, 1)) is True


def test_checkpoint_impl_is_torchs_enum_and_classes_subclass_torchs() -> None:
    assert CheckpointImpl.REENTRANT is torch_wrappers.CheckpointImpl.REENTRANT
    wrapper = checkpoint_wrapper(nn.Linear(2, 2), torch_wrappers.CheckpointImpl.REENTRANT)
    assert wrapper.checkpoint_impl is CheckpointImpl.REENTRANT
    assert isinstance(wrapper, torch_wrappers.CheckpointWrapper)
    assert isinstance(wrapper, ActivationWrapper)
    assert isinstance(offload_wrapper(nn.Linear(2, 2)), torch_wrappers.OffloadWrapper)


def test_bad_arguments_raise_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"CheckpointImpl\.NO_REENTRANT"):
        checkpoint_wrapper(nn.Linear(2, 2), "no_reentrant")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="instead of use_reentrant"):
        checkpoint_wrapper(nn.Linear(2, 2), use_reentrant=False)
    with pytest.raises(TypeError, match=r"takes an nn\.Module instance"):
        CheckpointWrapper(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_offload_bytes"):
        offload_wrapper(nn.Linear(2, 2), min_offload_bytes=-1)
    with pytest.raises(TypeError, match="auto_wrap_policy"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), auto_wrap_policy=3)


def block_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "no_reentrant": checkpoint_wrapper,
    "reentrant": functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
    "offload": offload_wrapper,
    "offload_around_checkpoint": lambda m: offload_wrapper(checkpoint_wrapper(m)),
}

TORCH_WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "no_reentrant": torch_wrappers.checkpoint_wrapper,
    "reentrant": functools.partial(
        torch_wrappers.checkpoint_wrapper, checkpoint_impl=torch_wrappers.CheckpointImpl.REENTRANT
    ),
    "offload": torch_wrappers.offload_wrapper,
    "offload_around_checkpoint": lambda m: torch_wrappers.offload_wrapper(
        torch_wrappers.checkpoint_wrapper(m)
    ),
}
"""torch's counterpart of each of ``WRAPPERS``."""

CHECKPOINTING: dict[str, CheckpointImpl | None] = {
    "no_reentrant": CheckpointImpl.NO_REENTRANT,
    "reentrant": CheckpointImpl.REENTRANT,
    "offload": None,
    "offload_around_checkpoint": CheckpointImpl.NO_REENTRANT,
}
"""The checkpointing each of ``WRAPPERS`` does: none for offload alone."""


def held_and_recomputed(model: nn.Module, tokens: torch.Tensor) -> tuple[int, int]:
    """One training step: activation bytes held after forward, and ``Linear`` forwards rerun in backward."""
    with ActivationMemoryMeter(model) as meter:
        loss = block_loss(model, tokens)
    return meter.held_bytes, recomputed_in_backward(loss)


@pytest.mark.parametrize("wrapper_name", sorted(WRAPPERS))
def test_gradients_equal_no_ac_bitwise(gpt: GPT, tokens: torch.Tensor, wrapper_name: str) -> None:
    """Gradients equal no AC bitwise; the blocks recompute and hold memory as with torch's wrapper."""

    def is_block(module: nn.Module) -> bool:
        return isinstance(module, TransformerBlock)

    wrapped, theirs = copy.deepcopy(gpt), copy.deepcopy(gpt)
    apply_activation_checkpointing(wrapped, WRAPPERS[wrapper_name], check_fn=is_block)
    torch_wrappers.apply_activation_checkpointing(theirs, TORCH_WRAPPERS[wrapper_name], check_fn=is_block)
    assert sum(isinstance(m, ActivationWrapper) for m in wrapped.layers.children()) == len(gpt.layers)
    plain_bytes, plain_recomputed = held_and_recomputed(gpt, tokens)
    held, recomputed = held_and_recomputed(wrapped, tokens)
    torch_held, torch_recomputed = held_and_recomputed(theirs, tokens)
    impl = CHECKPOINTING[wrapper_name]
    assert plain_recomputed == 0
    linears = 0 if impl is None else len(gpt.layers) * LINEARS_RECOMPUTED_PER_BLOCK[impl]
    assert recomputed == torch_recomputed == linears
    if impl is None:
        # On the CPU, where activations already live, fsdp_ac copies nothing (torch's copies them all).
        assert held == plain_bytes < torch_held
    else:
        assert held == torch_held < plain_bytes / 2
    for (name, expected), (_, got) in zip(gpt.named_parameters(), wrapped.named_parameters(), strict=True):
        assert got.grad is not None, name
        assert torch.equal(got.grad, expected.grad), name


class KwargBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return torch.tanh(self.linear(x)) * scale + shift


@pytest.mark.parametrize("impl", list(CheckpointImpl))
def test_keyword_arguments_reach_the_module(impl: CheckpointImpl) -> None:
    torch.manual_seed(0)
    plain = KwargBlock()
    wrapped = checkpoint_wrapper(copy.deepcopy(plain), impl)
    x = torch.randn(3, 4, requires_grad=True)
    scale = torch.randn(4, requires_grad=True)
    expected = plain(x, scale=scale, shift=0.5)
    expected.sum().backward()
    grads = (x.grad.clone(), scale.grad.clone(), plain.linear.weight.grad)
    x.grad = scale.grad = None
    got = wrapped(x, scale=scale, shift=0.5)
    assert recomputed_in_backward(got.sum()) == 1  # the Linear ran again: the call was checkpointed
    assert torch.equal(got, expected)
    assert torch.equal(x.grad, grads[0]) and torch.equal(scale.grad, grads[1])
    assert torch.equal(wrapped.linear.weight.grad, grads[2])


def test_custom_checkpoint_fn_receives_kwargs() -> None:
    calls: list[dict[str, object]] = []

    def my_checkpoint(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return fn(*args)

    wrapper = checkpoint_wrapper(nn.Linear(2, 2), checkpoint_fn=my_checkpoint, tag="x")
    wrapper(torch.randn(1, 2))
    assert calls == [{"tag": "x"}]


def wrapped_paths(model: nn.Module) -> list[str]:
    """Raw attribute paths of every activation wrapper, as the module tree holds them."""
    paths = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, torch_wrappers.ActivationWrapper):
                paths.append(path)
            visit(child, path + ".")

    visit(model, "")
    return paths


POLICIES = {
    "check_fn": {"check_fn": lambda m: isinstance(m, TransformerBlock)},
    "check_fn_nested": {"check_fn": lambda m: isinstance(m, (TransformerBlock, MLP))},
    "module_wrap_policy": {"auto_wrap_policy": ModuleWrapPolicy({TransformerBlock})},
    "transformer_policy": {
        "auto_wrap_policy": functools.partial(
            transformer_auto_wrap_policy, transformer_layer_cls={TransformerBlock}
        )
    },
    "size_policy": {"auto_wrap_policy": functools.partial(size_based_auto_wrap_policy, min_num_params=5000)},
}


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_apply_wraps_the_same_modules_as_torch(gpt: GPT, policy_name: str) -> None:
    ours, theirs = copy.deepcopy(gpt), copy.deepcopy(gpt)
    apply_activation_checkpointing(ours, **POLICIES[policy_name])
    torch_wrappers.apply_activation_checkpointing(theirs, **POLICIES[policy_name])
    assert wrapped_paths(ours) == wrapped_paths(theirs)
    assert wrapped_paths(ours)
    assert not isinstance(ours, ActivationWrapper)


def test_apply_never_wraps_a_wrapper_or_the_module_it_wraps() -> None:
    model = ConvNet()
    model.block = checkpoint_wrapper(model.block)
    apply_activation_checkpointing(
        model, check_fn=lambda m: isinstance(m, (nn.Sequential, ActivationWrapper))
    )
    assert wrapped_paths(model) == ["block"]


def test_apply_wraps_a_shared_module_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
    assert model[0] is model[2]
    assert isinstance(model[0], CheckpointWrapper)


def test_attribute_reads_and_indexing_reach_the_wrapped_module() -> None:
    inner = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    wrapper = checkpoint_wrapper(inner)
    assert wrapper[0] is inner[0]
    linear = checkpoint_wrapper(nn.Linear(2, 3))
    assert linear.out_features == 3


class _LabelledWrapper(CheckpointWrapper):
    """A subclass with an option of its own, listed nowhere: it is set while the wrapper is built."""

    def __init__(self, mod: nn.Module, label: str) -> None:
        super().__init__(mod)
        self.label = label


def test_attributes_set_while_building_stay_and_later_new_ones_reach_the_wrapped_module() -> None:
    inner = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
    inner.p_drop = 0.5
    wrapper = _LabelledWrapper(inner, "first")
    assert wrapper.__dict__["label"] == "first" and not hasattr(inner, "label")
    wrapper.label = "second"  # owned: stays on the wrapper after construction too
    wrapper.region_name = "layers.3"
    wrapper.checkpoint_impl = CheckpointImpl.REENTRANT
    assert (wrapper.__dict__["label"], wrapper.__dict__["region_name"]) == ("second", "layers.3")
    assert wrapper.__dict__["checkpoint_impl"] == CheckpointImpl.REENTRANT
    assert not {"label", "region_name", "checkpoint_impl"} & set(vars(inner))
    wrapper.p_drop = 0.1  # the wrapped module's attribute
    wrapper.tag = "new"  # new after construction: forwarded, as before
    assert (inner.p_drop, inner.tag) == (0.1, "new")
    assert "p_drop" not in vars(wrapper) and "tag" not in vars(wrapper)
    assert (wrapper.p_drop, wrapper.tag) == (0.1, "new")
    offload = OffloadWrapper(nn.Linear(2, 2), pin_memory=False)
    offload.min_offload_bytes = 7
    assert (offload.__dict__["min_offload_bytes"], offload.__dict__["pin_memory"]) == (7, False)
    assert not hasattr(offload._checkpoint_wrapped_module, "min_offload_bytes")
    copied = copy.deepcopy(wrapper)
    copied.tag = "copy"  # a copy is constructed already: it forwards too
    assert copied._checkpoint_wrapped_module.tag == "copy" and inner.tag == "new"


def test_replacing_the_wrapped_module_through_setattr_keeps_the_wrapper() -> None:
    """FSDP1's auto-wrap puts its unit in place of the wrapped module by ``setattr``."""
    wrapper = checkpoint_wrapper(nn.Linear(2, 2))
    replacement = nn.Linear(2, 2)
    wrapper._checkpoint_wrapped_module = replacement
    assert wrapper._modules["_checkpoint_wrapped_module"] is replacement
    assert [p for p in wrapper.parameters()] == [replacement.weight, replacement.bias]


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp_unwraps_our_wrapper_like_torchs(single_rank_group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    inner = nn.Linear(4, 4)
    fsdp = FSDP(checkpoint_wrapper(inner), device_id=torch.device("cpu"), use_orig_params=True)
    assert fsdp.module is inner
    plain = FSDP(nn.Linear(4, 4), device_id=torch.device("cpu"), use_orig_params=True)
    # FSDP's own prefix is FSDP's to strip; ours never appears on top of it.
    assert [n for n, _ in fsdp.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(fsdp.state_dict()) == ["weight", "bias"]
    assert isinstance(OffloadWrapper(nn.Linear(1, 1)), ActivationWrapper)


def test_fsdp2_shards_our_wrappers_like_torchs(
    single_rank_group: None, gpt: GPT, tokens: torch.Tensor
) -> None:
    """torchtitan's order: wrap the blocks, then ``fully_shard`` each wrapper and the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    wrapped = copy.deepcopy(gpt)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, TransformerBlock))
    for layer in wrapped.layers:
        assert isinstance(layer, CheckpointWrapper)
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapped, mesh=mesh)
    block_loss(gpt, tokens).backward()
    linears = len(gpt.layers) * LINEARS_RECOMPUTED_PER_BLOCK[CheckpointImpl.NO_REENTRANT]
    assert recomputed_in_backward(block_loss(wrapped, tokens)) == linears
    for (name, expected), (got_name, got) in zip(
        gpt.named_parameters(), wrapped.named_parameters(), strict=True
    ):
        assert name == got_name
        assert torch.equal(got.grad.full_tensor(), expected.grad), name
    assert list(wrapped.state_dict()) == list(gpt.state_dict())


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_auto_wrap_after_ac_nests_the_unit_inside_and_fsdp_ac_policy_nests_it_outside(
    single_rank_group: None, gpt: GPT
) -> None:
    """torch's recipe (AC, then FSDP1 with ModuleWrapPolicy) is accepted: CheckpointWrapper(FSDP(block)).

    tests/test_dcp.py checks that DCP restores it; fsdp_ac.ModulePolicy wraps the checkpoint wrapper.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def ac_then_fsdp1(policy: object) -> nn.Module:
        model = copy.deepcopy(gpt)
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))
        return FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))

    layer = ac_then_fsdp1(ModuleWrapPolicy({TransformerBlock})).module.layers[0]
    assert isinstance(layer, CheckpointWrapper) and layer.region_name == "layers.0"
    assert isinstance(layer._checkpoint_wrapped_module, FSDP)
    assert isinstance(layer._checkpoint_wrapped_module.module, TransformerBlock)
    layer = ac_then_fsdp1(fsdp_ac.ModulePolicy({TransformerBlock})).module.layers[0]
    assert isinstance(layer, FSDP) and isinstance(layer.module, TransformerBlock)
    assert isinstance(layer._fsdp_wrapped_module, CheckpointWrapper)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_two_wrappers_inside_an_fsdp1_flat_unit_are_refused(single_rank_group: None, gpt: GPT) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(
        copy.deepcopy(gpt),
        auto_wrap_policy=ModuleWrapPolicy({TransformerBlock}),
        use_orig_params=False,
        device_id=torch.device("cpu"),
    )
    with pytest.raises(ValueError, match=r"use_orig_params=True"):
        apply_activation_checkpointing(
            model, WRAPPERS["offload_around_checkpoint"], check_fn=lambda m: isinstance(m, TransformerBlock)
        )
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))  # one: fine


def test_compiles_into_one_graph_with_correct_gradients(gpt: GPT, tokens: torch.Tensor) -> None:
    """Compiled, the block is recomputed inside the compiled backward, as with torch's wrapper."""
    from torch._dynamo.utils import counters

    def compiled_step(wrap: Callable[[nn.Module], nn.Module] | None) -> tuple[nn.Module, int]:
        torch._dynamo.reset()
        counters.clear()
        block = copy.deepcopy(gpt.layers[0])
        model = wrap(block) if wrap is not None else block
        model.compile(backend="aot_eager")
        x = torch.randn(2, 8, gpt.config.d_model, generator=torch.Generator().manual_seed(0))
        recomputed = recomputed_in_backward(model(x.requires_grad_()).sum())
        assert counters["stats"]["unique_graphs"] == 1
        assert sum(counters["graph_break"].values()) == 0
        return block, recomputed

    block, recomputed = compiled_step(checkpoint_wrapper)
    _, torch_recomputed = compiled_step(torch_wrappers.checkpoint_wrapper)
    _, plain_recomputed = compiled_step(None)
    linears = LINEARS_RECOMPUTED_PER_BLOCK[CheckpointImpl.NO_REENTRANT]
    assert recomputed == torch_recomputed == linears and plain_recomputed == 0
    reference = copy.deepcopy(gpt.layers[0])
    x = torch.randn(2, 8, gpt.config.d_model, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reference(x).sum().backward()
    for (name, want), got in zip(reference.named_parameters(), block.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=1e-7, msg=name)
    torch._dynamo.reset()
