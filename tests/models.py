"""Small models shared by the tests."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp.wrap import (
    CustomPolicy,
    ModuleWrapPolicy,
    lambda_auto_wrap_policy,
    transformer_auto_wrap_policy,
)
from torch.utils._python_dispatch import TorchDispatchMode

from fsdp_ac import CheckpointImpl
from fsdp_ac.reference_model import GPTConfig, TransformerBlock

SMALL_GPT = GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_heads=4, n_layers=2)

LINEARS_RECOMPUTED_PER_BLOCK = {CheckpointImpl.NO_REENTRANT: 3, CheckpointImpl.REENTRANT: 4}
"""``Linear`` forwards a checkpointed ``TransformerBlock`` without dropout reruns in backward.

A block has 4 ``Linear`` layers with bias. Non-reentrant recomputation stops at the last tensor that
backward needs (torch's early stop), before ``mlp.proj``, whose output nothing saves; reentrant
recomputation reruns the whole block. Compiled, the partitioner reruns the same 3 as non-reentrant.
"""


class ScaledLinear(nn.Module):
    """Owns a parameter directly and another through a child."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((n_out,), 2.0))
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.gain


class ConvNet(nn.Module):
    """A model with buffers (BatchNorm) and a block that owns a parameter directly."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = ScaledLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class TiedHead(nn.Module):
    """An embedding outside a wrapper tied to an output layer that gets wrapped."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.embed(tokens)))


WRAPPED_ATTRS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")
"""Attributes under which activation wrappers and FSDP1 units hold the module they wrap."""


def chain_of(module: nn.Module) -> str:
    """Class names from the outermost wrapper (activation or FSDP1) down to the wrapped module."""
    names = [type(module).__name__]
    while attrs := [a for a in WRAPPED_ATTRS if a in module._modules]:
        module = module._modules[attrs[0]]  # type: ignore[assignment]
        names.append(type(module).__name__)
    return ">".join(names)


def block_policy_specs() -> dict[str, Any]:
    """Ways every policy helper accepts to say "the transformer blocks", torch's forms included."""
    return {
        "class_set": {TransformerBlock},
        "predicate": lambda m: isinstance(m, TransformerBlock),
        "module_wrap_policy": ModuleWrapPolicy({TransformerBlock}),
        "transformer_policy": functools.partial(
            transformer_auto_wrap_policy, transformer_layer_cls={TransformerBlock}
        ),
        "lambda_policy": functools.partial(
            lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, TransformerBlock)
        ),
        "custom_policy": CustomPolicy(lambda m: isinstance(m, TransformerBlock)),
    }


class ForwardOpsInBackward(TorchDispatchMode):
    """Counts the forward operators that run inside the mode: entered around ``backward()``, the
    operators a checkpointing wrapper recomputed.

    The default, ``aten.addmm``, is a ``Linear`` with bias; its backward runs ``mm`` and ``sum`` only,
    so every ``addmm`` counted in backward is a recomputed forward, and a wrapper that checkpointed
    nothing counts zero. Pass other forward-only operators for other layers (``aten.convolution`` for
    a convolution, whose backward is ``convolution_backward``; ``aten.silu`` for a bias-free MLP).
    Higher-order operators (the compiled backward's ``run_with_rng_state`` around a recomputed random
    op) run as they are, uncounted.

    Args:
        *ops: The operator overloads to count; ``aten.addmm.default`` when none are given.
    """

    supports_higher_order_operators = True

    def __init__(self, *ops: torch._ops.OpOverload) -> None:
        super().__init__()
        self.ops = frozenset(ops or (torch.ops.aten.addmm.default,))
        self.count = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in self.ops:
            self.count += 1
        return func(*args, **(kwargs or {}))


def recomputed_in_backward(loss: torch.Tensor, *ops: torch._ops.OpOverload) -> int:
    """Runs ``loss.backward()`` and returns how many of ``ops`` (see :class:`ForwardOpsInBackward`) it ran."""
    with ForwardOpsInBackward(*ops) as counter:
        loss.backward()
    return counter.count


def held_bytes_after_steps(workload: Any, model: nn.Module) -> int:
    """Bytes ``model`` holds for backward at the end of forward on ``workload``'s batch, measured by
    :class:`fsdp_ac.ActivationMemoryMeter` in the second of two steps (the first lets a selective
    preset learn; plans need none, but both are measured alike)."""
    from fsdp_ac import ActivationMemoryMeter

    for _ in range(2):
        with ActivationMemoryMeter(model) as meter:
            loss = workload.loss(model, workload.batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return meter.held_bytes


class InPlaceBlock(nn.Module):
    """A residual MLP block whose first matmul output is modified in place: ``mul_`` or a ReLU."""

    def __init__(self, width: int = 8, *, relu: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)
        self.act = nn.ReLU(inplace=True) if relu else None
        self.out = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = self.act(h) if self.act is not None else h.mul_(0.5)
        return x + self.out(h.sin())


def in_place_model(relu: bool, blocks: int = 2, width: int = 8) -> nn.Sequential:
    """Blocks of :class:`InPlaceBlock` (seeded), as the in-place tests of selective checkpointing use."""
    torch.manual_seed(0)
    return nn.Sequential(*(InPlaceBlock(width, relu=relu) for _ in range(blocks)))
