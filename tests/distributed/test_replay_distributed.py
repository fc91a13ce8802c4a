"""The replay rule on ranks: tensor parallelism inside a checkpointed block, alone and with FSDP2.

Tensor parallelism works through forward hooks that turn a module's inputs and outputs into
DTensors of the right layout; the replay must run them again or the recomputed matmul mixes
``torch.Tensor`` and ``DTensor``. Each cell runs the same model with torch's wrapper and fsdp_ac's,
and compares with the same parallel model without AC, bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from launcher import RankContext, run_on_ranks
from models import ForwardOpsInBackward
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fsdp_ac

pytestmark = pytest.mark.distributed

WRAPPERS = {
    "none": None,
    "torch_no_reentrant": torch_wrappers.checkpoint_wrapper,
    "torch_reentrant": lambda m: torch_wrappers.checkpoint_wrapper(m, fsdp_ac.CheckpointImpl.REENTRANT),
    "fsdp_ac_no_reentrant": fsdp_ac.checkpoint_wrapper,
    "fsdp_ac_reentrant": lambda m: fsdp_ac.checkpoint_wrapper(m, fsdp_ac.CheckpointImpl.REENTRANT),
}


class MLPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(torch.nn.functional.gelu(self.l1(x)))


@dataclass(frozen=True)
class TpCase:
    wrapper: str
    fsdp: bool
    """Also shard with FSDP2 on the other dimension of a 2-D (dp, tp) mesh."""


def tp_on_rank(ctx: RankContext, case: TpCase) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock(), MLPBlock())
    if case.fsdp:
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size // 2, 2), mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    else:
        tp_mesh = init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("tp",))
    for index, block in enumerate(model):
        parallelize_module(block, tp_mesh, {"l1": ColwiseParallel(), "l2": RowwiseParallel()})
        if WRAPPERS[case.wrapper] is not None:
            model[index] = WRAPPERS[case.wrapper](block)
        if case.fsdp:
            fully_shard(model[index], mesh=dp_mesh)
    if case.fsdp:
        fully_shard(model, mesh=dp_mesh)
    # The same input on the ranks of one TP group (TP replicates it); another per DP group.
    dp_rank = ctx.rank // 2 if case.fsdp else 0
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(dp_rank), requires_grad=True)
    try:
        loss = model(x).square().sum()
        with ForwardOpsInBackward() as recomputed:
            loss.backward()
    except (RuntimeError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        # torch's wrapper leaks its prefix into names; compare by the unwrapped model's names.
        grads[fsdp_ac.clean_name(name)] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    return {"grads": grads, "recomputed": recomputed.count, "loss": loss.detach().clone()}


@pytest.mark.timeout(300)
def test_tensor_parallel_inside_a_checkpointed_block_trains_like_no_ac() -> None:
    cases = [TpCase(wrapper, fsdp=False) for wrapper in WRAPPERS]
    results = dict(zip(cases, run_on_ranks(tp_on_rank, cases), strict=True))
    reference = results[TpCase("none", fsdp=False)]
    assert all("error" not in r for r in reference), reference
    for wrapper in WRAPPERS:
        for rank, result in enumerate(results[TpCase(wrapper, fsdp=False)]):
            assert "error" not in result, (wrapper, rank, result)
            # Recomputed forward matmuls: none without AC, as many as torch's wrapper recomputes.
            torch_twin = wrapper.replace("fsdp_ac", "torch")
            expected = results[TpCase(torch_twin, fsdp=False)][rank]["recomputed"]
            assert result["recomputed"] == expected and (expected > 0) == (wrapper != "none"), wrapper
            assert result["grads"].keys() == reference[rank]["grads"].keys()
            for name, grad in result["grads"].items():
                assert torch.equal(grad, reference[rank]["grads"][name]), (wrapper, rank, name)
                assert torch.equal(grad, results[TpCase(wrapper, fsdp=False)][0]["grads"][name])


@pytest.mark.timeout(300)
def test_tensor_parallel_with_fsdp2_on_a_2d_mesh_trains_like_no_ac() -> None:
    wrappers = ("none", "torch_no_reentrant", "torch_reentrant", "fsdp_ac_no_reentrant", "fsdp_ac_reentrant")
    cases = [TpCase(wrapper, fsdp=True) for wrapper in wrappers]
    results = dict(zip(cases, run_on_ranks(tp_on_rank, cases, nproc=4, timeout_s=240), strict=True))
    reference = results[TpCase("none", fsdp=True)]
    for wrapper in wrappers:
        per_rank = results[TpCase(wrapper, fsdp=True)]
        for rank, result in enumerate(per_rank):
            assert "error" not in result, (wrapper, rank, result)
            torch_twin = wrapper.replace("fsdp_ac", "torch")
            expected = results.get(TpCase(torch_twin, fsdp=True), per_rank)[rank]["recomputed"]
            assert result["recomputed"] == expected and (expected > 0) == (wrapper != "none"), wrapper
            assert torch.equal(result["loss"], reference[rank]["loss"]), (wrapper, rank)
            for name, grad in result["grads"].items():
                assert torch.equal(grad, reference[rank]["grads"][name]), (wrapper, rank, name)
                assert torch.equal(grad, per_rank[0]["grads"][name]), "ranks disagree"
