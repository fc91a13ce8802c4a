"""On 2 ranks: reentrant AC with frozen inputs (issue 3 item 1), and reentrant AC under DDP (issue 3
item 2, issue 9 item 6: the first block takes the raw batch).

Each cell runs torch's wrapper to reproduce the failure, then fsdp_ac's to show its answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from launcher import RankContext, run_on_ranks
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from upstream import shows

import fsdp_ac

pytestmark = pytest.mark.distributed

WRAPPERS = {
    "none": None,
    "torch_reentrant": lambda m: torch_wrappers.checkpoint_wrapper(
        m, torch_wrappers.CheckpointImpl.REENTRANT
    ),
    "fsdp_ac_reentrant": lambda m: fsdp_ac.checkpoint_wrapper(m, fsdp_ac.CheckpointImpl.REENTRANT),
    "fsdp_ac_no_reentrant": fsdp_ac.checkpoint_wrapper,
}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)
        self.calls = 0
        """Runs of ``forward``, replays included: the proof that checkpointing recomputed the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.out(torch.tanh(self.fc(x)))


class FrozenEmbeddingNet(nn.Module):
    """LoRA-style: a frozen embedding feeds checkpointed blocks, so no block input needs a gradient."""

    def __init__(self, frozen: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16).requires_grad_(not frozen)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def wrap_blocks(model: FrozenEmbeddingNet, wrapper: str) -> None:
    if WRAPPERS[wrapper] is not None:
        for index, block in enumerate(model.blocks):
            model.blocks[index] = WRAPPERS[wrapper](block)


def parallelize(ctx: RankContext, model: FrozenEmbeddingNet, parallel: str, **ddp_kwargs: Any) -> nn.Module:
    if parallel == "ddp":
        return DistributedDataParallel(model, **ddp_kwargs)
    if parallel == "fsdp1":
        # The frozen embedding is a unit of its own, so its output needs no gradient (in the root
        # unit, FSDP1's views of a trainable flat parameter would give it one). fsdp_ac's policy puts
        # each block's unit around its checkpoint wrapper.
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=fsdp_ac.ModulePolicy({Block, nn.Embedding}),
            use_orig_params=True,
            device_id=ctx.device,
        )
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def block_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) block weights, by clean name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith("blocks.")}


def block_grad_norms(model: nn.Module) -> dict[str, float | None]:
    norms: dict[str, float | None] = {}
    for name, param in model.named_parameters():
        if "blocks" in name:
            grad = param.grad
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()
            norms[fsdp_ac.clean_name(name)] = None if grad is None else grad.norm().item()
    return norms


@dataclass(frozen=True)
class FrozenCase:
    parallel: str
    wrapper: str


def frozen_input_on_rank(ctx: RankContext, case: FrozenCase) -> dict[str, Any]:
    torch.manual_seed(0)
    model = FrozenEmbeddingNet()
    wrap_blocks(model, case.wrapper)
    model = parallelize(ctx, model, case.parallel)
    before = block_weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(ctx.rank))
    loss = model(tokens).square().mean()
    output_requires_grad = loss.requires_grad
    if output_requires_grad:
        loss.backward()
    norms = block_grad_norms(model)
    if output_requires_grad:
        optimizer.step()
    after = block_weights(model)
    return {"before": before, "after": after, "norms": norms, "requires_grad": output_requires_grad}


@pytest.mark.timeout(240)
def test_reentrant_with_frozen_inputs_trains_under_ddp_fsdp1_fsdp2() -> None:
    cases = [
        FrozenCase(parallel, wrapper)
        for parallel in ("ddp", "fsdp1", "fsdp2")
        for wrapper in ("none", "torch_reentrant", "fsdp_ac_reentrant")
    ]
    results = run_on_ranks(frozen_input_on_rank, cases)
    by_case = dict(zip(cases, results, strict=True))
    for parallel in ("ddp", "fsdp1", "fsdp2"):
        reference = by_case[FrozenCase(parallel, "none")]
        theirs = by_case[FrozenCase(parallel, "torch_reentrant")]
        ours = by_case[FrozenCase(parallel, "fsdp_ac_reentrant")]
        for rank in range(len(reference)):
            block_parameters = len(reference[rank]["after"])
            # torch: the loss needs a gradient (the head trains), but no block parameter gets one,
            # so the blocks never change.
            untrained = (
                theirs[rank]["requires_grad"]
                and list(theirs[rank]["norms"].values()) == [None] * block_parameters
                and all(
                    torch.equal(theirs[rank]["after"][k], theirs[rank]["before"][k])
                    for k in theirs[rank]["after"]
                )
            )
            shows(
                "torch",
                f"{parallel}: reentrant AC with a frozen input leaves the blocks untrained",
                untrained,
            )
            # fsdp_ac: exactly the updates of training without AC, in sync across ranks.
            assert ours[rank]["requires_grad"]
            for key, value in reference[rank]["after"].items():
                assert not torch.equal(value, reference[rank]["before"][key]), key
                assert torch.equal(ours[rank]["after"][key], value), f"{parallel} {key} rank {rank}"
                assert torch.equal(ours[rank]["after"][key], ours[0]["after"][key])
        # fsdp_ac: every block parameter gets a non-zero gradient, on the ranks that hold it (FSDP1
        # leaves None on a rank whose shard of its flat parameter holds none of that parameter).
        assert len(ours[0]["norms"]) == len(reference[0]["after"]), ours[0]["norms"]
        for name in ours[0]["norms"]:
            assert any(result["norms"][name] for result in ours), f"{parallel}: no gradient for {name}"


DDP_STEPS = 3
FIRST_BLOCK_TAKES_THE_BATCH = ("raw_batch", "tied", "outside_use", "nested")
"""Patterns whose first checkpointed block takes the raw batch, so its input needs no gradient."""
TORCH_MARKS_TWICE = ("find_unused", "twice", "two_forwards")
"""Patterns where torch's reentrant wrapper makes DDP mark a parameter ready twice."""


@dataclass(frozen=True)
class DdpCase:
    pattern: str
    """``plain``; ``find_unused``; ``twice`` (a block run twice per step); ``two_forwards``;
    ``abandoned_forward`` (a forward whose output is dropped, then a normal step); ``raw_batch`` (the
    first block takes the raw features); ``tied`` (the first block embeds the raw token ids and the
    head is tied to its embedding); ``outside_use`` (that embedding also feeds a penalty computed
    before the block); ``nested`` (the block inside that first block is checkpointed too)."""
    wrapper: str
    static_graph: bool = False


class TwiceNet(FrozenEmbeddingNet):
    """Runs its first block twice per forward, as weight-shared (universal) transformers do."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = self.blocks[0](self.blocks[0](x))
        return self.head(self.blocks[1](x))


class TokenBlock(nn.Module):
    """A block that embeds the raw token ids itself, as a language model's first checkpointed layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = Block()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(tokens))


class RawBatchNet(nn.Module):
    """Blocks with no layer before them: the first checkpointed region gets the batch as it comes."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        first = Block() if pattern == "raw_batch" else TokenBlock()
        self.blocks = nn.ModuleList([first, Block()])
        self.head = nn.Linear(16, 4 if pattern == "raw_batch" else 32, bias=False)
        if pattern == "tied":
            self.head.weight = first.embed.weight

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        # Used before the block runs, so its backward comes after the block's.
        penalty = self.blocks[0].embed.weight.square().sum() if self.pattern == "outside_use" else 0.0
        x = batch
        for block in self.blocks:
            x = block(x)
        return self.head(x) + 1e-3 * penalty


def ddp_model(pattern: str) -> nn.Module:
    if pattern in FIRST_BLOCK_TAKES_THE_BATCH:
        return RawBatchNet(pattern)
    # A trainable embedding: these cells are about DDP, not about frozen inputs.
    return TwiceNet(frozen=False) if pattern == "twice" else FrozenEmbeddingNet(frozen=False)


def ddp_loss(model: nn.Module, pattern: str, rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * rank + step)
    if pattern == "raw_batch":
        return model(torch.randn(4, 8, 16, generator=generator)).square().mean()
    tokens = torch.randint(0, 32, (4, 8), generator=generator)
    if pattern == "two_forwards":
        return model(tokens).square().mean() + model(tokens.flip(0)).square().mean()
    if pattern == "find_unused":
        # The head's second output column is never used: DDP must be told to look for unused params.
        return model(tokens)[..., 0].square().mean()
    if pattern == "abandoned_forward":
        model(tokens)  # output dropped before backward (e.g. a logging forward that forgot no_grad)
    return model(tokens).square().mean()


def named_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        fsdp_ac.clean_name(name): None if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
    }


def ddp_on_rank(ctx: RankContext, case: DdpCase) -> dict[str, Any]:
    """Trains ``DDP_STEPS`` steps; returns each step's gradients and block runs, and the weights."""
    torch.manual_seed(0)
    model = ddp_model(case.pattern)
    if case.pattern == "nested" and WRAPPERS[case.wrapper] is not None:
        model.blocks[0].block = WRAPPERS[case.wrapper](model.blocks[0].block)
    wrap_blocks(model, case.wrapper)
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    initial = {fsdp_ac.clean_name(n): p.detach().clone() for n, p in model.named_parameters()}
    ddp = DistributedDataParallel(
        model, find_unused_parameters=case.pattern == "find_unused", static_graph=case.static_graph
    )
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"initial": initial, "steps": steps}
    try:
        for step in range(DDP_STEPS):
            before = sum(block.calls for block in blocks)
            loss = ddp_loss(ddp, case.pattern, ctx.rank, step)
            forwards = sum(block.calls for block in blocks) - before
            loss.backward()
            replays = sum(block.calls for block in blocks) - before - forwards
            steps.append({"grads": named_grads(model), "forwards": forwards, "replays": replays})
            optimizer.step()
            optimizer.zero_grad()
    except (RuntimeError, ValueError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["weights"] = {fsdp_ac.clean_name(n): p.detach().clone() for n, p in model.named_parameters()}
    return result


def first_block_grads(step: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """The gradients of the first block's own layers (not of an embedding it holds)."""
    return {k: g for k, g in step["grads"].items() if k.startswith("blocks.0.") and "embed" not in k}


@pytest.mark.timeout(240)
def test_reentrant_under_ddp_trains_exactly_as_without_ac() -> None:
    patterns = (*TORCH_MARKS_TWICE, *FIRST_BLOCK_TAKES_THE_BATCH, "plain", "abandoned_forward")
    cases = [DdpCase(p, w) for p in patterns for w in WRAPPERS]
    statics = ("twice", "two_forwards", "plain", "raw_batch", "tied")
    cases += [DdpCase(p, "fsdp_ac_reentrant", static_graph=True) for p in statics]
    cases += [DdpCase("raw_batch", "torch_reentrant", static_graph=True)]
    results = dict(zip(cases, run_on_ranks(ddp_on_rank, cases), strict=True))

    # torch's wrapper: DDP marks a parameter ready twice, or (the batch into the first block) the
    # block gets no gradient and DDP stops at the next step; with static_graph it trains wrongly, silently.
    for pattern in TORCH_MARKS_TWICE:
        for theirs in results[DdpCase(pattern, "torch_reentrant")]:
            failed = "mark a variable ready only once" in theirs.get("error", "") and not theirs["steps"]
            shows("torch", f"DDP with reentrant AC ({pattern}): a parameter marked ready twice", failed)
    for pattern in FIRST_BLOCK_TAKES_THE_BATCH:
        for theirs in results[DdpCase(pattern, "torch_reentrant")]:
            stopped = (
                "Expected to have finished reduction in the prior iteration" in theirs.get("error", "")
                and len(theirs["steps"]) == 1
                and all(g is None for g in first_block_grads(theirs["steps"][0]).values())
            )
            shows("torch", f"DDP with reentrant AC ({pattern}): no gradient, then a stop", stopped)
    for theirs in results[DdpCase("raw_batch", "torch_reentrant", static_graph=True)]:
        silent = (
            "error" not in theirs
            and len(theirs["steps"]) == DDP_STEPS
            and all(
                torch.equal(theirs["weights"][k], theirs["initial"][k])
                for k in first_block_grads(theirs["steps"][0])
            )
        )
        shows("torch", "DDP static_graph with reentrant AC: the first block silently untrained", silent)

    # fsdp_ac, both implementations, every pattern (and torch's reentrant wrapper where it works: one
    # forward, every parameter used once): each step's gradients and the final weights are bitwise
    # those of DDP without AC on each rank, the same on every rank, and every block that took part in
    # backward was recomputed (a wrapper that only called the module would fail here).
    trained = [c for c in cases if c.wrapper.startswith("fsdp_ac")]
    trained += [DdpCase("plain", "torch_reentrant"), DdpCase("abandoned_forward", "torch_reentrant")]
    for case in trained:
        per_rank, reference = results[case], results[DdpCase(case.pattern, "none")]
        for rank, ours in enumerate(per_rank):
            assert "error" not in ours, (case, ours["error"])
            for step, (mine, plain) in enumerate(zip(ours["steps"], reference[rank]["steps"], strict=True)):
                assert plain["replays"] == 0
                backpropagated = plain["forwards"] // (2 if case.pattern == "abandoned_forward" else 1)
                # In a reentrant parent's replay a nested region runs once more, checkpointing itself.
                extra = int(case.pattern == "nested" and case.wrapper == "fsdp_ac_reentrant")
                assert backpropagated > 0 and mine["replays"] == backpropagated + extra, (case, step)
                assert mine["grads"].keys() == plain["grads"].keys()
                for key, grad in plain["grads"].items():
                    assert grad is not None, (case.pattern, key)
                    assert torch.equal(mine["grads"][key], grad), (case, rank, step, key)
                    assert torch.equal(mine["grads"][key], per_rank[0]["steps"][step]["grads"][key]), "ranks"
            for key, value in reference[rank]["weights"].items():
                assert not torch.equal(value, reference[rank]["initial"][key]), (case.pattern, key)
                assert torch.equal(ours["weights"][key], value), (case, rank, key)
                assert torch.equal(ours["weights"][key], per_rank[0]["weights"][key]), "ranks out of sync"
