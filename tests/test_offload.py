"""Offload: which saved tensors move, and that gradients are unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from fsdp_ac import offload_wrapper
from fsdp_ac.offload import _is_parameter_like, offload_saved_tensors


def test_parameters_views_of_parameters_and_buffers_are_recognised() -> None:
    module = nn.BatchNorm1d(4)
    owned = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    assert _is_parameter_like(module.weight, owned)
    assert _is_parameter_like(module.weight.view(2, 2), owned)
    assert _is_parameter_like(module.running_mean, owned)
    assert not _is_parameter_like(torch.randn(4), owned)
    assert not _is_parameter_like(torch.randn(4, requires_grad=True) * 2, owned)


def test_nothing_on_the_cpu_is_copied() -> None:
    module = nn.Linear(32, 32)
    with offload_saved_tensors(module, pin_memory=False, min_offload_bytes=0):
        out = module(torch.randn(4, 32)).relu()
    # Unpacking returns the very storage that was saved: no copy was made.
    assert out.grad_fn._saved_result.data_ptr() == out.data_ptr()
    out.sum().backward()
    assert module.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activations_leave_the_gpu_and_gradients_are_unchanged() -> None:
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
    out.sum().backward()
    assert torch.equal(module.weight.grad, expected)


def test_gradients_equal_without_offload() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    wrapped = offload_wrapper(copy.deepcopy(plain), pin_memory=False, min_offload_bytes=0)
    x = torch.randn(4, 16)
    plain(x).square().sum().backward()
    wrapped(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_negative_threshold_is_refused() -> None:
    with (
        pytest.raises(ValueError, match="min_offload_bytes"),
        offload_saved_tensors(nn.Linear(1, 1), min_offload_bytes=-1),
    ):
        pass


@pytest.mark.usefixtures("single_rank_group")
def test_offload_around_a_fully_sharded_module_trains_like_without() -> None:
    """The wrapper's forward sees FSDP2's sharded DTensor parameters, which have no storage."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    reference = copy.deepcopy(module)
    fully_shard(module)
    wrapped = offload_wrapper(module, pin_memory=False, min_offload_bytes=0)
    x = torch.randn(4, 32)
    wrapped(x).sum().backward()
    reference(x).sum().backward()
    for (name, param), expected in zip(module.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad.full_tensor(), expected.grad, rtol=0, atol=0, msg=name)
