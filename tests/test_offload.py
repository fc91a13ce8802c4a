"""Offload: which saved tensors move, that backward reads the copies, and that gradients are unchanged.

On the CPU, ``copy_cpu_tensors=True`` makes offloading copy activations into separate CPU memory,
so every test here runs the real decisions and copies without an accelerator.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.testing._internal.two_tensor import TwoTensor
from upstream import shows_error

from fsdp_ac import apply_activation_checkpointing, checkpoint_wrapper, offload_wrapper
from fsdp_ac import offload as offload_module
from fsdp_ac.offload import (
    Decision,
    FlattenedCopy,
    HostCopy,
    OffloadOptions,
    Packed,
    decide,
    offload_saved_tensors,
    owned_storages,
    pack_saved_tensor,
    pins,
    unpack_saved_tensor,
)
from fsdp_ac.reference_model import GPT, TransformerBlock

COPY_ALL = OffloadOptions(pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True)
"""The test mode at its widest: every saved activation is copied, whatever its size."""

Saved = list[tuple[torch.Tensor, Packed]]


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> Saved:
    """Every tensor the offload hooks receive, with what their pack hook returned."""
    return record_saved(monkeypatch)


def record_saved(monkeypatch: pytest.MonkeyPatch) -> Saved:
    """Makes the offload hooks record every tensor they receive, with what the pack hook returned."""
    records: Saved = []
    install = offload_module.saved_tensors_hooks

    def recording(pack: Callable[[torch.Tensor], Packed], unpack: Callable[[Packed], torch.Tensor]) -> Any:
        def pack_and_record(tensor: torch.Tensor) -> Packed:
            packed = pack(tensor)
            records.append((tensor, packed))
            return packed

        return install(pack_and_record, unpack)

    monkeypatch.setattr(offload_module, "saved_tensors_hooks", recording)
    return records


def copied(records: Saved) -> list[torch.Tensor]:
    return [tensor for tensor, packed in records if packed is not tensor]


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad for name, param in module.named_parameters() if param.grad is not None}


def assert_grads_bitwise(actual: nn.Module, expected: nn.Module) -> None:
    actual_grads, expected_grads = grads(actual), grads(expected)
    assert list(actual_grads) == list(expected_grads) and actual_grads
    for name, grad in actual_grads.items():
        reference = expected_grads[name]
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        torch.testing.assert_close(grad, reference, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def activation(*shape: int) -> torch.Tensor:
    """A tensor as a layer's output is: it needs a gradient, and it is no leaf."""
    return torch.randn(*shape, requires_grad=True) * 1.0


# --- the decision --------------------------------------------------------------------------------


class Block(nn.Module):
    """Saves one tensor of every kind; ``forward`` keeps its activations in ``self.activations``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.frozen = nn.Parameter(torch.full((16,), 0.5), requires_grad=False)
        self.register_buffer("scale", torch.full((16,), 2.0))
        self.activations: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear(x)  # saves x and a view of the weight (x needs a gradient)
        scaled = hidden * self.scale.view(1, 16)  # saves a view of the buffer
        wave = scaled.sin()  # saves scaled, 8 * 16 * 4 = 512 bytes
        frozen = wave * self.frozen  # saves the frozen parameter
        small = frozen.sum(0).tanh()  # saves its output, 16 * 4 = 64 bytes
        self.activations = {"x": x, "scaled": scaled, "small": small}
        return small


def saved_kinds(block: Block, records: Saved) -> list[tuple[str, bool]]:
    """Names what each record is, with whether it was copied."""
    known = {
        "weight": block.linear.weight,
        "frozen parameter": block.frozen,
        "buffer": block.scale,
        **block.activations,
    }
    kinds = []
    for tensor, packed in records:
        (name,) = [
            n
            for n, t in known.items()
            if t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        ]
        kinds.append((name, packed is not tensor))
    return sorted(kinds)


def assert_decision(
    tensor: torch.Tensor,
    expected: Decision,
    options: OffloadOptions = COPY_ALL,
    owned: frozenset[int] = frozenset(),
) -> None:
    """:func:`decide` says ``expected``, and packing copies ``tensor`` exactly when that is COPY."""
    assert decide(tensor, options, owned) is expected
    packed = pack_saved_tensor(tensor, options, owned)
    assert (packed is not tensor) is (expected is Decision.COPY)


def test_exactly_the_activations_above_the_threshold_are_copied(saved: Saved) -> None:
    block = Block()
    with offload_saved_tensors(block, pin_memory=False, min_offload_bytes=65, copy_cpu_tensors=True):
        block(activation(8, 16))
    assert saved_kinds(block, saved) == [
        ("buffer", False),
        ("frozen parameter", False),
        ("scaled", True),
        ("small", False),  # 64 bytes, under the threshold of 65
        ("weight", False),
        ("x", True),
    ]
    owned = owned_storages(block)
    options = OffloadOptions(pin_memory=False, min_offload_bytes=65, copy_cpu_tensors=True)
    reasons = {decide(tensor, options, owned) for tensor, packed in saved if packed is tensor}
    assert reasons == {Decision.PARAMETER, Decision.MODULE_STATE, Decision.SMALL}


def test_the_threshold_counts_the_bytes_of_the_storage(saved: Saved) -> None:
    block = Block()
    with offload_saved_tensors(block, pin_memory=False, min_offload_bytes=64, copy_cpu_tensors=True):
        block(activation(8, 16))
    assert ("small", True) in saved_kinds(block, saved)  # 64 bytes, at the threshold
    view = activation(64)[:2]  # 8 bytes of a 256-byte storage: copying it lets the storage go
    assert_decision(view, Decision.COPY, OffloadOptions(min_offload_bytes=256, copy_cpu_tensors=True))
    assert_decision(view, Decision.SMALL, OffloadOptions(min_offload_bytes=257, copy_cpu_tensors=True))


def test_tensors_already_on_the_cpu_stay_without_the_test_mode(saved: Saved) -> None:
    block = Block()
    with offload_saved_tensors(block, pin_memory=False, min_offload_bytes=0):
        out = block(activation(8, 16))
    assert len(saved) == 6 and not copied(saved)
    # Unpacking returns the very storage that was saved.
    assert out.grad_fn._saved_result.data_ptr() == out.data_ptr()
    x = block.activations["x"]
    assert_decision(x, Decision.ON_HOST, OffloadOptions(min_offload_bytes=0))
    assert_decision(x, Decision.COPY, OffloadOptions(min_offload_bytes=0, copy_cpu_tensors=True))


def test_parameters_buffers_and_their_views_are_recognised() -> None:
    module = nn.BatchNorm1d(4)
    owned = owned_storages(module)
    assert_decision(module.weight, Decision.PARAMETER, owned=owned)
    assert_decision(module.weight.view(2, 2), Decision.PARAMETER, owned=owned)
    assert_decision(module.running_mean, Decision.MODULE_STATE, owned=owned)
    assert_decision(module.running_mean[1:], Decision.MODULE_STATE, owned=owned)
    assert_decision(module.running_mean.clone(), Decision.COPY, owned=owned)
    assert_decision(activation(4), Decision.COPY, owned=owned)
    # A leaf that requires grad is held by whoever reads its .grad.
    assert_decision(torch.randn(4, requires_grad=True), Decision.PARAMETER, owned=owned)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["trained", "frozen"])
def test_views_of_a_flat_parameter_are_recognised(requires_grad: bool) -> None:
    """FSDP1 without use_orig_params gives modules views of a flat parameter that they do not own."""
    flat = nn.Parameter(torch.randn(40), requires_grad=requires_grad)
    weight = flat[:16].view(4, 4)
    assert_decision(weight, Decision.PARAMETER)
    assert_decision(weight.t(), Decision.PARAMETER)
    assert_decision(weight * 1.0, Decision.COPY)


def test_sparse_tensors_stay_and_other_subclasses_are_refused() -> None:
    dense = activation(4, 4)
    assert_decision(dense.to_sparse(), Decision.NOT_STRIDED)
    assert_decision(dense, Decision.COPY)

    class Tagged(torch.Tensor):
        pass

    tagged = torch.randn(8, 16).as_subclass(Tagged).requires_grad_()
    assert_decision(tagged * 2, Decision.SMALL, OffloadOptions(min_offload_bytes=513, copy_cpu_tensors=True))
    with (
        pytest.raises(TypeError, match=r"Tagged.*__tensor_flatten__"),
        offload_saved_tensors(nn.Identity(), pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True),
    ):
        (tagged * 2).sin()


def test_pinning_only_for_copies_from_cuda_when_asked() -> None:
    cuda = torch.device("cuda", 0)
    assert pins(cuda, pin_memory=True)
    assert not pins(cuda, pin_memory=False)
    assert not pins(torch.device("cpu"), pin_memory=True)
    packed = pack_saved_tensor(
        torch.randn(512), OffloadOptions(pin_memory=True, copy_cpu_tensors=True), frozenset()
    )
    assert isinstance(packed, HostCopy) and not packed.pinned and not packed.host.is_pinned()


def test_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="min_offload_bytes"):
        OffloadOptions(min_offload_bytes=-1)
    with (
        pytest.raises(ValueError, match="min_offload_bytes"),
        offload_saved_tensors(nn.Linear(1, 1), min_offload_bytes=-1),
    ):
        pass


# --- backward reads the copies -------------------------------------------------------------------


def test_unpacked_copies_equal_the_originals_bitwise_in_their_own_memory(saved: Saved) -> None:
    block = Block()
    with offload_saved_tensors(block, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True):
        block(activation(16, 8).t())  # a transposed input keeps its strides
    assert len(copied(saved)) == 3
    for tensor, packed in saved:
        if packed is tensor:
            continue
        assert isinstance(packed, HostCopy)
        unpacked = unpack_saved_tensor(packed)
        assert unpacked.data_ptr() == packed.host.data_ptr() != tensor.data_ptr()
        assert unpacked.stride() == tensor.stride()
        torch.testing.assert_close(unpacked, tensor, rtol=0, atol=0)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))


def test_the_original_activation_is_freed_after_forward() -> None:
    """Autograd holds the copy, so nothing holds the first layer's output once forward is done."""
    model = mlp()
    outputs: list[weakref.ref[torch.Tensor]] = []
    model[0].register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    x = torch.randn(8, 32)
    kept = model(x)
    assert outputs[-1]() is not None  # without offload, GELU's saved input is that output
    with offload_saved_tensors(model, pin_memory=False, copy_cpu_tensors=True):
        offloaded = model(x)
    assert outputs[-1]() is None
    assert kept.grad_fn is not None and offloaded.grad_fn is not None  # both graphs are alive


def test_backward_reads_the_copy_not_the_original() -> None:
    """Changing the original activation after forward changes nothing: backward reads the copy."""
    plain, offloaded = mlp(), mlp()
    outputs: list[torch.Tensor] = []
    for model in (plain, offloaded):
        model[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(8, 32)
    reference = mlp()
    reference(x).square().sum().backward()
    loss = plain(x).square().sum()
    with offload_saved_tensors(offloaded, pin_memory=False, copy_cpu_tensors=True):
        offloaded_loss = offloaded(x).square().sum()
    for output in outputs:
        output.data.zero_()  # .data: out of autograd's sight, as a reuse of the memory would be
    loss.backward()
    offloaded_loss.backward()
    assert not torch.equal(plain[0].weight.grad, reference[0].weight.grad)  # the premise
    assert_grads_bitwise(offloaded, reference)


@pytest.mark.parametrize(
    "wrap",
    [
        partial(offload_wrapper, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True),
        lambda m: offload_wrapper(
            checkpoint_wrapper(m), pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True
        ),
    ],
    ids=["offload", "offload_around_checkpoint"],
)
def test_gradients_equal_without_offload_bitwise(
    wrap: Callable[[nn.Module], nn.Module], gpt: GPT, tokens: torch.Tensor, saved: Saved
) -> None:
    reference = copy.deepcopy(gpt)
    apply_activation_checkpointing(
        gpt, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, TransformerBlock)
    )
    gpt(tokens).square().mean().backward()
    reference(tokens).square().mean().backward()
    assert copied(saved)
    assert_grads_bitwise(gpt, reference)


def test_the_wrapper_owns_its_options_and_copies_in_test_mode(saved: Saved) -> None:
    inner = Block()
    wrapper = offload_wrapper(inner, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True)
    assert wrapper.copy_cpu_tensors is True and "copy_cpu_tensors" not in vars(inner)
    wrapper(activation(8, 16))
    assert len(copied(saved)) == 3
    saved.clear()
    default = offload_wrapper(Block())
    assert default.copy_cpu_tensors is False
    default(activation(8, 16))
    assert len(saved) == 6 and not copied(saved)


# --- parallel wrappers and tensor subclasses (one rank) -------------------------------------------


@pytest.mark.usefixtures("single_rank_group")
def test_fully_sharded_parameters_are_never_copied(saved: Saved) -> None:
    """The wrapper's forward sees FSDP2's sharded DTensor parameters, which have no storage."""
    module = mlp()
    reference = copy.deepcopy(module)
    fully_shard(module)
    wrapped = offload_wrapper(module, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True)
    x = torch.randn(4, 32, requires_grad=True)
    wrapped(x * 1.0).sum().backward()
    reference(x * 1.0).sum().backward()
    # Saved: x, the first weight, the first output, GELU's output, the second weight.
    assert [packed is not tensor for tensor, packed in saved] == [True, False, True, True, False]
    kept = [tensor for tensor, packed in saved if packed is tensor]
    assert all(isinstance(tensor._base, nn.Parameter) for tensor in kept)
    assert_grads_bitwise(module, reference)


@pytest.mark.usefixtures("single_rank_group")
def test_flat_parameter_views_inside_an_fsdp1_unit_are_never_copied(saved: Saved) -> None:
    module = mlp()
    reference = copy.deepcopy(module)
    unit = FullyShardedDataParallel(
        offload_wrapper(module, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True),
        use_orig_params=False,
        sharding_strategy=ShardingStrategy.NO_SHARD,  # what FULL_SHARD becomes on one rank
        device_id=torch.device("cpu"),
    )
    x = torch.randn(4, 32, requires_grad=True)
    unit(x * 1.0).sum().backward()
    reference(x * 1.0).sum().backward()
    (flat,) = unit.parameters()
    assert [packed is not tensor for tensor, packed in saved] == [True, False, True, True, False]
    kept = [tensor for tensor, packed in saved if packed is tensor]
    assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in kept)
    # On one rank the flat gradient is the module's gradients back to back.
    expected = torch.cat([param.grad.flatten() for param in reference.parameters()])
    torch.testing.assert_close(flat.grad[: expected.numel()], expected, rtol=0, atol=0)


def local_storage(tensor: torch.Tensor) -> int:
    return tensor.to_local().untyped_storage().data_ptr()


@pytest.mark.usefixtures("single_rank_group")
@pytest.mark.parametrize("placement", [Replicate(), Shard(0)], ids=["replicate", "shard"])
def test_dtensor_activations_are_copied_locally_and_rebuilt(placement: Any, saved: Saved) -> None:
    mesh = init_device_mesh("cpu", (1,))
    module = mlp()
    reference = copy.deepcopy(module)
    distribute_module(module, mesh)  # replicated DTensor parameters
    x = torch.randn(8, 32, requires_grad=True)
    with offload_saved_tensors(module, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True):
        out = module(distribute_tensor(x, mesh, [placement]) * 1.0)
    assert [type(packed) for _, packed in saved] == [
        FlattenedCopy,  # x
        DTensor,  # the first weight
        FlattenedCopy,  # the first output
        FlattenedCopy,  # GELU's output
        DTensor,  # the second weight
    ]
    for tensor, packed in saved:
        if packed is tensor:
            assert isinstance(tensor._base, nn.Parameter) or isinstance(tensor, nn.Parameter)
            continue
        local = packed.inner["_local_tensor"]
        assert isinstance(local, HostCopy) and local.host.shape == tensor.to_local().shape
        unpacked = unpack_saved_tensor(packed)
        assert isinstance(unpacked, DTensor) and unpacked.placements == tensor.placements
        assert unpacked.device_mesh is tensor.device_mesh and unpacked.shape == tensor.shape
        assert local_storage(unpacked) == local.host.untyped_storage().data_ptr() != local_storage(tensor)
        torch.testing.assert_close(unpacked.to_local(), tensor.to_local(), rtol=0, atol=0)
    out.to_local().sum().backward()
    reference(x * 1.0).sum().backward()
    assert_grads_bitwise(module, reference)
    # torch's wrapper copies into a plain tensor at the global shape, which DTensor refuses.
    with shows_error(
        "torch", "offload_wrapper fails on a DTensor", RuntimeError, r"mixed torch\.Tensor and DTensor"
    ):
        torch_wrappers.offload_wrapper(module)(distribute_tensor(x, mesh, [placement]) * 1.0)


@pytest.mark.usefixtures("single_rank_group")
def test_a_dtensor_with_nothing_to_copy_is_kept_whole() -> None:
    mesh = init_device_mesh("cpu", (1,))
    small = distribute_tensor(torch.randn(4), mesh, [Replicate()])
    options = OffloadOptions(pin_memory=False, min_offload_bytes=1024, copy_cpu_tensors=True)
    assert decide(small, options, frozenset()) is Decision.FLATTEN
    assert pack_saved_tensor(small, options, frozenset()) is small
    assert isinstance(pack_saved_tensor(small, COPY_ALL, frozenset()), FlattenedCopy)


@pytest.mark.usefixtures("single_rank_group")
def test_dtensor_buffers_are_module_state() -> None:
    module = nn.BatchNorm1d(256)
    distribute_module(module, init_device_mesh("cpu", (1,)))
    buffer = module.running_mean
    assert isinstance(buffer, DTensor)
    assert pack_saved_tensor(buffer, COPY_ALL, owned_storages(module)) is buffer
    assert isinstance(pack_saved_tensor(buffer, COPY_ALL, frozenset()), FlattenedCopy)


def test_other_traceable_wrapper_subclasses_are_copied_through_their_inner_tensors(saved: Saved) -> None:
    def run(offload: bool) -> TwoTensor:
        torch.manual_seed(0)
        leaf = TwoTensor(torch.randn(64), torch.randn(64)).requires_grad_()
        context = offload_saved_tensors(
            nn.Identity(), pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True
        )
        with context if offload else contextlib.nullcontext():
            out = (leaf * 2).sin().sum()
        out.backward()
        return leaf.grad

    expected = run(offload=False)
    actual = run(offload=True)
    ((tensor, packed),) = saved  # sin saves its input, leaf * 2
    assert isinstance(packed, FlattenedCopy) and set(packed.inner) == {"a", "b"}
    unpacked = unpack_saved_tensor(packed)
    assert isinstance(unpacked, TwoTensor)
    for name in ("a", "b"):
        assert getattr(unpacked, name).data_ptr() != getattr(tensor, name).data_ptr()
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0)


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activations_leave_the_gpu_and_gradients_are_unchanged(saved: Saved) -> None:
    torch.manual_seed(0)
    module = nn.Linear(1024, 1024).cuda()
    x = torch.randn(512, 1024, device="cuda")
    hidden_bytes = 512 * 1024 * 4
    base = torch.cuda.memory_allocated()
    out = nn.functional.gelu(module(x))  # GELU saves its input, the Linear output
    held_plain = torch.cuda.memory_allocated() - base
    out.sum().backward()
    expected = module.weight.grad.clone()
    module.weight.grad = None
    del out
    with offload_saved_tensors(module):
        out = nn.functional.gelu(module(x))
    held_offloaded = torch.cuda.memory_allocated() - base
    assert held_offloaded <= held_plain - hidden_bytes
    host_copies = [packed for tensor, packed in saved if packed is not tensor]  # x and the Linear output
    assert len(host_copies) == 2
    assert all(isinstance(p, HostCopy) and p.pinned and p.host.is_pinned() for p in host_copies)
    out.sum().backward()
    assert torch.equal(module.weight.grad, expected)
