"""DDP, FSDP1 and FSDP2 with fsdp_ac checkpointing: same training as without, clean names (2 ranks).

Every test launches ``FSDP_AC_NPROC`` ranks (default 2; gloo on CPU, NCCL with a GPU per rank) once
and runs its setups as sub-cases. Each setup builds the same reference GPT, optionally checkpoints
every ``TransformerBlock`` before or after the parallel wrapper, and trains it for a few Adam steps on
the rank's slice of a fixed global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from launcher import RankContext, run_on_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_ac import CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

pytestmark = pytest.mark.distributed

CONFIG = GPTConfig(vocab_size=128, max_seq_len=16, d_model=64, n_heads=4, n_layers=2, dropout=0.0)
BATCH_PER_RANK = 2
STEPS = 3
LR = 1e-3
REFERENCE_ATOL = 1e-5
"""Distributed vs single-process parameters after STEPS Adam steps (fp32; see check_training)."""
LOSS_RTOL = 1e-6
"""Mean of the ranks' losses vs the single-process loss: a few fp32 ulps."""

AC_WRAPPERS = {
    "no_reentrant": partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
}
"""Activation wrappers by the name a :class:`Setup` uses for them."""

NESTING = {
    ("ddp", False, True): "TransformerBlock",
    ("ddp", True, False): "CheckpointWrapper>TransformerBlock",
    ("ddp", True, True): "CheckpointWrapper>TransformerBlock",
    ("fsdp1", False, True): "FullyShardedDataParallel>TransformerBlock",
    ("fsdp1", True, False): "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock",
    ("fsdp1", True, True): "CheckpointWrapper>FullyShardedDataParallel>TransformerBlock",
    ("fsdp2", False, True): "FSDPTransformerBlock",
    ("fsdp2", True, False): "CheckpointWrapper>FSDPTransformerBlock",
    ("fsdp2", True, True): "FSDPCheckpointWrapper>TransformerBlock",
}
"""``layers[0]`` by (parallel, AC, AC first): AC before the parallel wrapper puts FSDP1's unit inside
the checkpoint and FSDP2's around it; after it, the other way round."""

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")


@dataclass(frozen=True)
class Setup:
    """One way to train the reference GPT on several ranks."""

    parallel: str
    """``ddp``, ``fsdp1`` (use_orig_params, one unit per block) or ``fsdp2`` (one unit per block)."""
    ac: str | None = None
    """Key of ``AC_WRAPPERS`` applied to every ``TransformerBlock``, or None for no AC."""
    ac_first: bool = True
    """Apply AC before the parallel wrapper (else after it)."""


def build(ctx: RankContext, setup: Setup) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = GPT(CONFIG).to(ctx.device)
    if setup.ac is not None and setup.ac_first:
        _checkpoint_blocks(model, setup.ac)
    model = _parallelize(ctx, model, setup.parallel)
    if setup.ac is not None and not setup.ac_first:
        _checkpoint_blocks(model, setup.ac)
    return model


def _checkpoint_blocks(model: nn.Module, ac: str) -> None:
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=AC_WRAPPERS[ac], check_fn=lambda m: isinstance(m, TransformerBlock)
    )


def _parallelize(ctx: RankContext, model: nn.Module, parallel: str) -> nn.Module:
    if parallel == "ddp":
        return DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if parallel == "fsdp1":
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({TransformerBlock}),
            use_orig_params=True,
            device_id=ctx.device,
        )
    if parallel == "fsdp2":
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        # With AC first, each layer is the checkpoint wrapper around a block (torchtitan's order).
        for layer in model.layers:  # type: ignore[union-attr]
            fully_shard(layer, mesh=mesh)
        # The tied embedding and head both live in the root unit.
        return fully_shard(model, mesh=mesh)
    raise ValueError(f"Unknown parallel setup {parallel!r}.")


def global_batches(nproc: int) -> torch.Tensor:
    """Token ids of shape (STEPS, nproc * BATCH_PER_RANK, max_seq_len + 1); rank r gets its slice."""
    generator = torch.Generator().manual_seed(1234)
    shape = (STEPS, nproc * BATCH_PER_RANK, CONFIG.max_seq_len + 1)
    return torch.randint(0, CONFIG.vocab_size, shape, generator=generator)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train_steps(model: nn.Module, batches: torch.Tensor) -> torch.Tensor:
    """Trains one Adam step per batch; returns the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    losses = []
    for tokens in batches:
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses).cpu()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: value.detach().cpu() for name, value in state.items()}


def first_layer_nesting(model: nn.Module) -> str:
    """The classes from ``layers[0]`` down to its TransformerBlock, e.g. ``CheckpointWrapper>...``."""
    root = model
    while "layers" not in root._modules:  # DDP's module, FSDP1's _fsdp_wrapped_module
        (root,) = root._modules.values()
    chain = [root.layers[0]]  # type: ignore[index]
    while not isinstance(chain[-1], TransformerBlock):
        (child,) = chain[-1]._modules.values()
        chain.append(child)
    return ">".join(type(module).__name__ for module in chain)


class OpCounter(TorchDispatchMode):
    """Counts the calls of one aten op, whatever module or hook runs it."""

    def __init__(self, op: torch._ops.OpOverload) -> None:
        super().__init__()
        self.op = op
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


def train_on_rank(ctx: RankContext, setup: Setup) -> dict[str, Any]:
    model = build(ctx, setup)
    rows = slice(ctx.rank * BATCH_PER_RANK, (ctx.rank + 1) * BATCH_PER_RANK)
    with OpCounter(torch.ops.aten.gelu.default) as gelus:
        losses = train_steps(model, global_batches(ctx.world_size)[:, rows].to(ctx.device))
    return {
        "losses": losses,
        "params": full_parameters(model),
        "gelu_calls": gelus.calls,
        "nesting": first_layer_nesting(model),
    }


def train_single_process(nproc: int) -> dict[str, Any]:
    """The unwrapped model trained in this process on the whole global batch of ``nproc`` ranks."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    losses = train_steps(model, global_batches(nproc))
    return {"losses": losses, "params": {k: v.detach() for k, v in model.state_dict().items()}}


def assert_same_params(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float
) -> None:
    assert list(actual) == list(expected)
    for name, value in actual.items():
        torch.testing.assert_close(
            value, expected[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_matches_reference(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Parameters agree with the single-process run to REFERENCE_ATOL, but for Adam's amplified noise.

    A weight whose gradient is nearly zero gets an Adam step whose size is about LR whatever the
    gradient's magnitude, so fp32 rounding noise in its gradient can move it by up to LR per step in
    either direction. Such weights are rare; a real defect moves many. So at most 0.1% of each
    tensor's elements may differ by more than REFERENCE_ATOL, and none by more than one step per step.
    """
    assert list(actual) == list(expected)
    for name, value in actual.items():
        diff = (value - expected[name]).abs()
        noisy = (diff > REFERENCE_ATOL).float().mean().item()
        assert noisy <= 1e-3, f"{name}: {noisy:.2%} of elements differ by more than {REFERENCE_ATOL}"
        assert diff.max().item() <= LR * STEPS, f"{name}: differs by {diff.max().item():g}"


def without_key_biases(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the attention key biases from the parameters.

    Their gradient is zero analytically (softmax ignores a shift shared by all keys), so it is pure
    rounding noise, about 1e-9, and Adam's normalised update turns that noise into steps of up to LR
    whose sign depends on summation order. Only the comparison with the single-process run, whose
    order differs, leaves them out; they never change the model's output.
    """
    kept = dict(params)
    for name, value in params.items():
        if name.endswith("attn.qkv.bias"):
            query, _, value_ = value.split(CONFIG.d_model)
            kept[name] = torch.cat([query, value_])
    return kept


def check_training(setups: list[Setup], results: list[list[dict[str, Any]]]) -> None:
    """AC changes nothing bitwise; ranks agree bitwise; the single-process run agrees to REFERENCE_ATOL.

    With AC, backward recomputes each block's forward with the same kernels on the same inputs, and
    every rank reduces the same gradients, so equality is exact. The single-process reference runs
    the matmuls on a batch ``nproc`` times as wide and sums the gradients in another order, so it
    differs in the last bits of fp32 (about 1e-7 on CPU); Adam's first steps move every weight by
    about LR, so REFERENCE_ATOL is 1% of a step. See :func:`assert_matches_reference` and
    :func:`without_key_biases` for the exceptions.
    """
    assert setups[0].ac is None, "the first setup is the baseline without AC"
    baseline = results[0]
    reference = train_single_process(len(baseline))
    for setup, per_rank in zip(setups, results, strict=True):
        for rank, result in enumerate(per_rank):
            where = f"{setup} on rank {rank}"
            assert result["nesting"] == NESTING[setup.parallel, setup.ac is not None, setup.ac_first], where
            # One GELU per block forward; with AC, backward recomputes it (AC that did nothing would
            # pass every equality below).
            runs_per_step = 2 if setup.ac is not None else 1
            assert result["gelu_calls"] == STEPS * CONFIG.n_layers * runs_per_step, where
            torch.testing.assert_close(result["losses"], baseline[rank]["losses"], rtol=0, atol=0, msg=where)
            assert_same_params(result["params"], baseline[rank]["params"], atol=0)
            assert_same_params(result["params"], per_rank[0]["params"], atol=0)
        mean_losses = torch.stack([result["losses"] for result in per_rank]).mean(0)
        torch.testing.assert_close(mean_losses, reference["losses"], rtol=LOSS_RTOL, atol=0)
        assert_matches_reference(
            without_key_biases(per_rank[0]["params"]), without_key_biases(reference["params"])
        )


def names_on_rank(ctx: RankContext, setup: Setup) -> dict[str, list[str]]:
    """Parameter names from the root and state-dict keys, each way the parallel wrapper offers them."""
    model = build(ctx, setup)
    train_steps(model, global_batches(ctx.world_size)[:1, :BATCH_PER_RANK].to(ctx.device))
    names = {
        "named_parameters": [name for name, _ in model.named_parameters()],
        "get_model_state_dict": list(get_model_state_dict(model)),
        "get_model_state_dict(full)": list(
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        ),
    }
    if setup.parallel == "ddp":
        names["module.state_dict"] = list(model.module.state_dict())
    elif setup.parallel == "fsdp1":
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            names["state_dict(FULL_STATE_DICT)"] = list(model.state_dict())
    else:
        names["state_dict"] = list(model.state_dict())
    return names


def check_names(setups: list[Setup], results: list[list[dict[str, list[str]]]]) -> None:
    plain = GPT(CONFIG)
    expected_keys = list(plain.state_dict())
    expected_params = [name for name, _ in plain.named_parameters()]
    for setup, per_rank in zip(setups, results, strict=True):
        for rank, names in enumerate(per_rank):
            where = f"{setup} on rank {rank}"
            params = names.pop("named_parameters")
            assert not [name for name in params if "_checkpoint_wrapped_module" in name], where
            # The parallel wrapper's own prefix is its business, not fsdp_ac's.
            params = [name.removeprefix("module.").replace("_fsdp_wrapped_module.", "") for name in params]
            assert params == expected_params, where
            for method, keys in names.items():
                assert not [key for key in keys if any(p in key for p in WRAPPER_PREFIXES)], (
                    f"{where}: {method}"
                )
                assert keys == expected_keys, f"{where}: {method}"


def setups_for(parallel: str) -> list[Setup]:
    """No AC first (the baseline), then AC applied after and before the parallel wrapper."""
    return [Setup(parallel), Setup(parallel, "no_reentrant", ac_first=False), Setup(parallel, "no_reentrant")]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp1", "fsdp2"])
def test_training_with_ac_matches_training_without(parallel: str) -> None:
    setups = setups_for(parallel)
    check_training(setups, run_on_ranks(train_on_rank, setups))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp1", "fsdp2"])
def test_names_and_state_dict_keys_are_the_unwrapped_models(parallel: str) -> None:
    setups = setups_for(parallel)
    check_names(setups, run_on_ranks(names_on_rank, setups))
