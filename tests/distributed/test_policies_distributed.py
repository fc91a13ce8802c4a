"""One policy for FSDP and AC on 2 ranks: one FSDP unit and one AC region per block, in both orders.

Every test launches ``FSDP_AC_NPROC`` ranks (default 2; gloo on CPU, NCCL with a GPU per rank) once
and runs its cases as sub-cases. A case parallelizes the reference GPT (or a tiny Hugging Face Llama)
with FSDP1, FSDP2 (through :func:`fsdp_ac.fully_shard_by_policy`) or DDP, and checkpoints it with the
same policy object, before or after. It reports the wrappers around each block, the alignment check,
and whether its gradients equal those of the same parallel setup without AC, bitwise: recomputation
replays the same kernels on the same inputs, and both runs communicate the same way. Equal gradients
alone would also pass with AC that did nothing, so every rank also counts the blocks' activation
(GELU, or Llama's SiLU: forward-only operators) in backward (``models.ForwardOpsInBackward``): once
per checkpointed block with AC, never without.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hf_models import tiny_llama
from launcher import RankContext, run_on_ranks
from models import ForwardOpsInBackward, block_policy_specs
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.fsdp.wrap import (
    CustomPolicy,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fsdp_ac import (
    ModulePolicy,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
    check_alignment,
    checkpoint_wrapper,
    fully_shard_by_policy,
)
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

pytestmark = pytest.mark.distributed

CONFIG = GPTConfig(vocab_size=128, max_seq_len=16, d_model=64, n_heads=4, n_layers=2)
BATCH_PER_RANK = 2

SPECS: dict[str, Any] = {
    **block_policy_specs(),
    "class_names": {"TransformerBlock"},
    # Reaches through a wrapper by attribute: torch's CustomPolicy alone matches wrapper and block.
    "custom_policy_hasattr": CustomPolicy(lambda m: hasattr(m, "attn")),
}
"""Every policy input, by a name that travels to the ranks."""


@dataclass(frozen=True)
class Case:
    """One way to shard (or replicate) and checkpoint the blocks."""

    parallel: str
    """``fsdp1``, ``fsdp2`` or ``ddp``."""
    spec: str
    """Key of SPECS, wrapped in one ModulePolicy given to both FSDP and AC."""
    ac_first: bool
    """Checkpoint before parallelizing (else after)."""
    every: int = 1
    """Checkpoint one block in ``every`` (FSDP still gets every block)."""


def chain_of(module: nn.Module) -> list[nn.Module]:
    """A block's slot: the wrappers around it (activation and FSDP1), outermost first, then the block."""
    chain = [module]
    while attrs := [
        a for a in ("_checkpoint_wrapped_module", "_fsdp_wrapped_module") if a in module._modules
    ]:
        module = module._modules[attrs[0]]  # type: ignore[assignment]
        chain.append(module)
    return chain


def block_slots(model: nn.Module) -> list[nn.Module]:
    root = model
    while attrs := [a for a in ("module", "_fsdp_wrapped_module") if a in root._modules]:
        root = root._modules[attrs[0]]  # type: ignore[assignment]
    layers = root.model.layers if hasattr(root, "model") else root.layers
    return list(layers._modules.values())


def describe(model: nn.Module) -> list[dict[str, Any]]:
    slots = []
    for slot in block_slots(model):
        chain = chain_of(slot)
        slots.append(
            {
                "nesting": ">".join(type(m).__name__ for m in chain),
                "units": sum(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in chain),
                "regions": sum(isinstance(m, CheckpointWrapper) for m in chain),
            }
        )
    return slots


def parallelize(ctx: RankContext, model: nn.Module, parallel: str, policy: Any) -> nn.Module:
    if parallel == "ddp":
        return DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if parallel == "fsdp1":
        return FullyShardedDataParallel(
            model, auto_wrap_policy=policy, use_orig_params=True, device_id=ctx.device
        )
    return fully_shard_by_policy(model, policy, mesh=init_device_mesh(ctx.device.type, (ctx.world_size,)))


def local_grads(model: nn.Module) -> list[torch.Tensor | None]:
    grads = []
    for param in model.parameters():
        grad = param.grad
        grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
    return grads


def same_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


def run_gpt_case(ctx: RankContext, case: Case) -> dict[str, Any]:
    torch.manual_seed(0)
    base = GPT(CONFIG).to(ctx.device)
    policy = ModulePolicy(SPECS[case.spec])
    ac_policy = policy.every(case.every)
    plain = parallelize(ctx, copy.deepcopy(base), case.parallel, policy)
    model: nn.Module = copy.deepcopy(base)
    if case.ac_first:
        apply_activation_checkpointing(model, auto_wrap_policy=ac_policy)
    model = parallelize(ctx, model, case.parallel, policy)
    if not case.ac_first:
        apply_activation_checkpointing(model, auto_wrap_policy=ac_policy)
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(
        0, CONFIG.vocab_size, (ctx.world_size * BATCH_PER_RANK, CONFIG.max_seq_len + 1), generator=generator
    )
    tokens = tokens[ctx.rank * BATCH_PER_RANK : (ctx.rank + 1) * BATCH_PER_RANK].to(ctx.device)
    grads, recomputed = [], []
    for m in (plain, model):
        logits = m(tokens[:, :-1])
        with ForwardOpsInBackward(torch.ops.aten.gelu.default) as gelus:
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append(local_grads(m))
        recomputed.append(gelus.count)
    return {
        "blocks": describe(model),
        "problems": check_alignment(model),
        "same_grads": same_grads(*grads),
        "recomputed": recomputed,
    }


GPT_CASES = [
    *(
        Case(parallel, spec, ac_first)
        for parallel in ("fsdp1", "fsdp2")
        for spec in SPECS
        for ac_first in (True, False)
    ),
    *(
        Case(parallel, "class_names", ac_first, every=2)
        for parallel in ("fsdp1", "fsdp2")
        for ac_first in (True, False)
    ),
    *(
        Case("ddp", spec, ac_first)
        for spec in ("class_names", "module_wrap_policy")
        for ac_first in (True, False)
    ),
]

NESTING = {
    ("fsdp1", True): "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock",
    ("fsdp1", False): "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock",
    ("fsdp2", True): "FSDPCheckpointWrapper>TransformerBlock",
    ("fsdp2", False): "CheckpointWrapper>FSDPTransformerBlock",
    ("ddp", True): "CheckpointWrapper>TransformerBlock",
    ("ddp", False): "CheckpointWrapper>TransformerBlock",
}
"""A checkpointed block by (parallel, AC first): FSDP1 puts its unit around the checkpoint in both orders."""


@pytest.mark.timeout(300)
def test_one_unit_and_one_region_per_block_in_both_orders() -> None:
    results = run_on_ranks(run_gpt_case, GPT_CASES, timeout_s=280)
    for case, per_rank in zip(GPT_CASES, results, strict=True):
        for rank, result in enumerate(per_rank):
            where = f"{case} on rank {rank}"
            checkpointed = [i % case.every == 0 for i in range(CONFIG.n_layers)]
            units = 0 if case.parallel == "ddp" else 1
            assert [b["units"] for b in result["blocks"]] == [units] * CONFIG.n_layers, where
            assert [b["regions"] for b in result["blocks"]] == [int(c) for c in checkpointed], where
            for block, region in zip(result["blocks"], checkpointed, strict=True):
                if region:
                    assert block["nesting"] == NESTING[case.parallel, case.ac_first], where
            assert result["problems"] == [], where
            assert result["same_grads"], where
            # Each checkpointed block's GELU reruns once in backward; without AC, none does.
            assert result["recomputed"] == [0, sum(checkpointed)], where


LLAMA_CASES = [
    Case(parallel, "llama", ac_first) for parallel in ("fsdp1", "fsdp2", "ddp") for ac_first in (True, False)
]


def run_llama_case(ctx: RankContext, case: Case) -> dict[str, Any]:
    """A tiny Llama, blocks named by ``_no_split_modules``, selectively checkpointed (default preset)."""
    base = tiny_llama().to(ctx.device)
    policy = ModulePolicy(set(base._no_split_modules))
    plain = parallelize(ctx, copy.deepcopy(base), case.parallel, policy)
    model: nn.Module = copy.deepcopy(base)
    wrapper_fn = SelectiveCheckpoint("default")
    if case.ac_first:
        apply_activation_checkpointing(model, wrapper_fn, auto_wrap_policy=policy)
    model = parallelize(ctx, model, case.parallel, policy)
    if not case.ac_first:
        apply_activation_checkpointing(model, wrapper_fn, auto_wrap_policy=policy)
    generator = torch.Generator().manual_seed(ctx.rank)
    same, recomputed = [], []
    for _ in range(2):  # the first step learns what to save, the second uses it
        tokens = torch.randint(0, 64, (BATCH_PER_RANK, 12), generator=generator).to(ctx.device)
        grads, silus = [], []
        for m in (plain, model):
            loss = m(tokens, labels=tokens, use_cache=False).loss
            with ForwardOpsInBackward(torch.ops.aten.silu.default) as counter:
                loss.backward()
            grads.append(local_grads(m))
            silus.append(counter.count)
            m.zero_grad(set_to_none=True)
        same.append(same_grads(*grads))
        recomputed.append(silus)
    return {
        "blocks": describe(model),
        "problems": check_alignment(model),
        "same_grads": same,
        "recomputed": recomputed,
    }


@pytest.mark.timeout(300)
def test_hugging_face_llama_with_selective_checkpointing() -> None:
    pytest.importorskip("transformers")
    results = run_on_ranks(run_llama_case, LLAMA_CASES, timeout_s=280)
    for case, per_rank in zip(LLAMA_CASES, results, strict=True):
        for rank, result in enumerate(per_rank):
            where = f"{case} on rank {rank}"
            units = 0 if case.parallel == "ddp" else 1
            assert [(b["units"], b["regions"]) for b in result["blocks"]] == [(units, 1)] * 2, where
            assert result["problems"] == [] and result["same_grads"] == [True, True], where
            # The default preset saves matmul outputs, not the MLP's SiLU: it reruns once per block in
            # both steps (the learning one and the one that uses what it learned); never without AC.
            assert result["recomputed"] == [[0, len(result["blocks"])]] * 2, where


def misaligned_case(ctx: RankContext, strict: bool) -> list[str]:
    """AC on the ModuleList of blocks while FSDP1 shards each block: one region spans two units."""
    torch.manual_seed(0)
    model: nn.Module = GPT(CONFIG).to(ctx.device)
    model.layers = checkpoint_wrapper(model.layers)  # type: ignore[assignment]
    model = FullyShardedDataParallel(
        model, auto_wrap_policy=ModulePolicy({TransformerBlock}), use_orig_params=True, device_id=ctx.device
    )
    if strict:
        try:
            check_alignment(model, strict=True)
        except ValueError as error:
            return [str(error)]
        return []
    with pytest.warns(UserWarning, match="spans 2 FSDP units"):
        return check_alignment(model)


@pytest.mark.timeout(120)
def test_misaligned_regions_are_reported_on_every_rank() -> None:
    results = run_on_ranks(misaligned_case, [False, True])
    for per_rank in results:
        for problems in per_rank:
            assert len(problems) == 1
            assert problems[0].startswith("AC region 'layers' spans 2 FSDP units ('layers.0', 'layers.1')")
