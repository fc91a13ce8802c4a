"""Builds and trains the reference GPT on every rank under DDP, FSDP1 or FSDP2, with or without fsdp_ac.

Shared by the distributed tests. A :class:`Setup` names one way to build the model: the parallel
wrapper and its options, the activation wrapper put around every ``TransformerBlock``, whether that
happens before or after the parallel wrapper, and where ``torch.compile`` goes. :func:`build` builds
it on a rank from the same seed, so every setup starts from the same weights, and
:func:`train` trains it on the rank's slice of a fixed global batch, returning the losses and the
first-step gradients; :func:`full_parameters`, :func:`full_optimizer_state` and :func:`saved_keys`
read back the rest the checks compare. :func:`train_single_process` is the reference: the unwrapped
model trained in one process on the whole global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from launcher import RankContext
from models import ForwardOpsInBackward
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as torch_apply_activation_checkpointing,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper as torch_checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    FullyShardedDataParallel,
    MixedPrecisionPolicy,
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    ShardingStrategy,
    StateDictType,
    fully_shard,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel

from fsdp_ac import (
    CheckpointImpl,
    ModulePolicy,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)
from fsdp_ac.offload import OffloadEngine
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

CONFIG = GPTConfig(vocab_size=128, max_seq_len=16, d_model=64, n_heads=4, n_layers=2, dropout=0.0)
BATCH_PER_RANK = 2
STEPS = 3
LR = 1e-3
ADAM_BETA1 = 0.9
COMPILE_BACKEND = "aot_eager"
"""Dynamo and AOT autograd (where AC meets the compiler: the checkpoint becomes a higher-order op and
the partitioner recomputes), without inductor's C++ code generation, which takes about 25 s per
block on two CPU cores."""


def _offload_checkpoint_through(engine: OffloadEngine) -> Callable[[nn.Module], nn.Module]:
    return lambda module: offload_wrapper(checkpoint_wrapper(module), copy_cpu_tensors=True, engine=engine)


AC_WRAPPERS: dict[str, Callable[[], Callable[[nn.Module], nn.Module]]] = {
    "no_reentrant": lambda: partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
    "reentrant": lambda: partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
    "selective": lambda: SelectiveCheckpoint("default"),
    "offload": lambda: partial(offload_wrapper, copy_cpu_tensors=True),
    "offload_checkpoint": lambda: (
        lambda module: offload_wrapper(checkpoint_wrapper(module), copy_cpu_tensors=True)
    ),
    "offload_engine": lambda: partial(offload_wrapper, copy_cpu_tensors=True, engine=OffloadEngine()),
    "offload_checkpoint_engine": lambda: _offload_checkpoint_through(OffloadEngine()),
}
"""Activation wrappers by the name a :class:`Setup` uses, as factories: a selective policy learns
per model, so each build gets a fresh one. Offload copies CPU tensors too (``copy_cpu_tensors``), so
that on gloo its cells move activations for real, into separate CPU memory; on GPUs it changes
nothing, as every activation is on the GPU. The ``_engine`` variants copy through one
:class:`~fsdp_ac.offload.OffloadEngine` per model (pool, prefetch across its blocks)."""

AC_CLASSES = {
    "no_reentrant": ("CheckpointWrapper",),
    "reentrant": ("CheckpointWrapper",),
    "selective": ("CheckpointWrapper",),
    "offload": ("OffloadWrapper",),
    "offload_checkpoint": ("OffloadWrapper", "CheckpointWrapper"),
    "offload_engine": ("OffloadWrapper",),
    "offload_checkpoint_engine": ("OffloadWrapper", "CheckpointWrapper"),
}
"""The wrapper classes around each block, outermost first."""

RECOMPUTES = {
    "no_reentrant": True,
    "reentrant": True,
    "selective": True,
    "offload": False,
    "offload_checkpoint": True,
    "offload_engine": False,
    "offload_checkpoint_engine": True,
}
"""Whether backward runs the block's forward again (offload alone saves activations elsewhere)."""

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")
"""Attribute names of wrappers that must never appear in a saved key."""


@dataclass(frozen=True, repr=False)
class Setup:
    """One way to build the reference GPT on several ranks."""

    parallel: str
    """``plain`` (no parallel wrapper: each rank holds the whole model), ``ddp``, ``fsdp1`` or
    ``fsdp2``; FSDP makes one unit per ``TransformerBlock`` and one at the root."""
    ac: str | None = None
    """Key of :data:`AC_WRAPPERS` applied to every ``TransformerBlock``, or None for no AC."""
    ac_first: bool = True
    """Apply AC before the parallel wrapper, else after it. FSDP1 before: ``CheckpointWrapper(FSDP(
    block))``, after: ``FSDP(CheckpointWrapper(block))``; FSDP2 before: the wrapper is sharded, after:
    the block is."""
    ac_api: str = "fsdp_ac"
    """Whose ``apply_activation_checkpointing`` and ``checkpoint_wrapper`` apply AC: ``fsdp_ac``, or
    ``torch`` (``torch.distributed.algorithms._checkpoint.checkpoint_wrapper``, NO_REENTRANT only), to
    compare with torch's wrapper."""
    use_orig_params: bool = True
    """FSDP1's ``use_orig_params``."""
    sharding: str = "FULL_SHARD"
    """FSDP1's ``ShardingStrategy``: ``FULL_SHARD`` or ``SHARD_GRAD_OP``."""
    fsdp1_policy: str = "torch"
    """FSDP1's ``auto_wrap_policy``: ``torch``, ``ModuleWrapPolicy({TransformerBlock})``, which wraps
    the block (inside its checkpoint wrapper when AC came first); ``fsdp_ac``,
    ``fsdp_ac.ModulePolicy({TransformerBlock})``, which wraps the outermost wrapper of a block, so
    both orders give ``FSDP(CheckpointWrapper(block))``."""
    reshard_after_forward: bool = True
    """FSDP2's ``reshard_after_forward``."""
    bf16: bool = False
    """FSDP2 with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``."""
    compile: str | None = None
    """``inside``: each block is compiled, then AC wraps it (eager checkpoint, compiled region).
    ``outside``: once AC and the parallel wrapper are applied, each layer (the outermost wrapper or
    unit) is compiled, so the compiler traces the checkpoint. Compiled in place (``module.compile()``),
    so no ``_orig_mod`` enters names."""

    def __repr__(self) -> str:
        options = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in ("parallel", "ac", "ac_first") and getattr(self, f.name) != f.default
        ]
        if self.ac is not None:
            options.append(f"{self.ac} {'before' if self.ac_first else 'after'}")
        return f"{self.parallel}({', '.join(options)})"

    @property
    def recomputes(self) -> bool:
        return self.ac is not None and RECOMPUTES[self.ac]


def build(ctx: RankContext, setup: Setup) -> nn.Module:
    """The reference GPT from seed 0, wrapped as ``setup`` says."""
    torch.manual_seed(0)
    model: nn.Module = GPT(CONFIG).to(ctx.device)
    if setup.compile == "inside":
        for block in model.layers:  # type: ignore[union-attr]
            block.compile(backend=COMPILE_BACKEND)
    if setup.ac is not None and setup.ac_first:
        checkpoint_blocks(model, setup)
    model = _parallelize(ctx, model, setup)
    if setup.ac is not None and not setup.ac_first:
        checkpoint_blocks(model, setup)
    if setup.compile == "outside":
        for layer in gpt_of(model).layers:  # type: ignore[union-attr]
            layer.compile(backend=COMPILE_BACKEND)
    return model


def checkpoint_blocks(model: nn.Module, setup: Setup) -> None:
    def is_block(module: nn.Module) -> bool:
        return isinstance(module, TransformerBlock)

    if setup.ac_api == "torch":
        if setup.ac != "no_reentrant":
            raise ValueError(f"Setups with torch's wrapper use ac='no_reentrant', got {setup.ac!r}.")
        torch_wrapper = partial(torch_checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        torch_apply_activation_checkpointing(model, checkpoint_wrapper_fn=torch_wrapper, check_fn=is_block)
        return
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=AC_WRAPPERS[setup.ac](), check_fn=is_block)


def _parallelize(ctx: RankContext, model: nn.Module, setup: Setup) -> nn.Module:
    if setup.parallel == "plain":
        return model
    if setup.parallel == "ddp":
        return DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if setup.parallel == "fsdp1":
        policy = ModuleWrapPolicy({TransformerBlock})
        if setup.fsdp1_policy == "fsdp_ac":
            policy = ModulePolicy({TransformerBlock})
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=policy,
            sharding_strategy=ShardingStrategy[setup.sharding],
            use_orig_params=setup.use_orig_params,
            device_id=ctx.device,
        )
    if setup.parallel == "fsdp2":
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        mp_policy = MixedPrecisionPolicy()
        if setup.bf16:
            mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        options = {"mesh": mesh, "reshard_after_forward": setup.reshard_after_forward, "mp_policy": mp_policy}
        # With AC first, each layer is the activation wrapper around a block (torchtitan's order).
        for layer in model.layers:  # type: ignore[union-attr]
            fully_shard(layer, **options)
        # The tied embedding and head both live in the root unit.
        return fully_shard(model, **options)
    raise ValueError(f"Unknown parallel setup {setup.parallel!r}.")


def gpt_of(model: nn.Module) -> nn.Module:
    """The GPT inside DDP's ``module`` or FSDP1's ``_fsdp_wrapped_module``."""
    while "layers" not in model._modules:
        (model,) = model._modules.values()
    return model


def first_layer_nesting(model: nn.Module) -> str:
    """The classes from ``layers[0]`` down to its TransformerBlock, e.g. ``CheckpointWrapper>...``."""
    chain = [gpt_of(model).layers[0]]  # type: ignore[index]
    while not isinstance(chain[-1], TransformerBlock):
        (child,) = chain[-1]._modules.values()
        chain.append(child)
    return ">".join(type(module).__name__ for module in chain)


def expected_nesting(setup: Setup) -> str:
    """What :func:`first_layer_nesting` must find for ``setup``."""
    wrappers = list(AC_CLASSES[setup.ac]) if setup.ac is not None else []
    chain = [*wrappers, "TransformerBlock"]
    if setup.parallel == "fsdp1":
        # torch's policy wraps the block, inside the wrappers when AC came first; fsdp_ac's wraps
        # the outermost wrapper.
        inside = setup.ac_first and setup.fsdp1_policy == "torch"
        position = len(wrappers) if inside else 0
        chain.insert(position, "FullyShardedDataParallel")
    elif setup.parallel == "fsdp2":
        position = 0 if setup.ac_first else len(wrappers)  # fully_shard swaps the class it is given
        chain[position] = "FSDP" + chain[position]
    return ">".join(chain)


# --- data and training ------------------------------------------------------------------------------


def global_batches(nproc: int) -> torch.Tensor:
    """Token ids of shape (STEPS, nproc * BATCH_PER_RANK, max_seq_len + 1); rank r gets its slice."""
    generator = torch.Generator().manual_seed(1234)
    shape = (STEPS, nproc * BATCH_PER_RANK, CONFIG.max_seq_len + 1)
    return torch.randint(0, CONFIG.vocab_size, shape, generator=generator)


def rank_batches(ctx: RankContext, setup: Setup) -> torch.Tensor:
    """This rank's slice of the global batch; the whole batch for ``plain``, whose ranks never sync."""
    batches = global_batches(ctx.world_size)
    if setup.parallel != "plain":
        batches = batches[:, ctx.rank * BATCH_PER_RANK : (ctx.rank + 1) * BATCH_PER_RANK]
    return batches.to(ctx.device)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


class ReplayCounter:
    """Counts the replays of fsdp_ac's eager checkpoint regions while entered."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> ReplayCounter:
        from fsdp_ac.recompute import RecomputeRegion

        replay = RecomputeRegion._replay

        def counting(region: RecomputeRegion, *args: Any) -> Any:
            self.calls += 1
            return replay(region, *args)

        self._restore = replay
        RecomputeRegion._replay = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from fsdp_ac.recompute import RecomputeRegion

        RecomputeRegion._replay = self._restore  # type: ignore[method-assign]


@dataclass
class Trained:
    """A model after training, with what the checks compare."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: torch.Tensor
    """This rank's loss at each step."""
    first_grads: dict[str, torch.Tensor]
    """Full gradients of the first step, read from Adam's first moment (see :func:`fit`)."""
    gelu_calls: int
    """How often the blocks' GELU ran, over all steps: ``aten.gelu`` calls in forward and backward;
    with ``compile="outside"``, in backward only, where aot_eager runs the compiled backward graph op
    by op through the dispatcher (a mode must not see the compiled forward); with
    ``compile="inside"``, the eager regions' replays of a compiled block (one GELU each), since a mode
    active in the replay would make the compiled block run differently from its forward."""


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=LR, betas=(ADAM_BETA1, 0.999))


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: torch.Tensor,
    optimizer_state: Callable[[], dict[str, Any]],
    counting: contextlib.AbstractContextManager[Any] | None = None,
    counting_backward: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Trains one Adam step per batch; returns the losses and the first step's full gradients.

    The gradients are read from ``optimizer_state()`` (a state dict keyed by parameter name): after
    one step Adam's first moment is ``lerp(0, grad, 1 - beta1) = (1 - beta1) * grad``, one rounding
    of the gradient, the same whether the optimizer holds whole parameters, DTensor shards or FSDP1's
    flat shards. So equal gradients give equal moments bitwise, and the comparison reads the same for
    every parallel wrapper (FSDP1 without ``use_orig_params`` has no per-parameter gradients).
    """
    losses = []
    first_grads: dict[str, torch.Tensor] = {}
    for step, tokens in enumerate(batches):
        with counting or contextlib.nullcontext():
            loss = lm_loss(model, tokens)
            with counting_backward or contextlib.nullcontext():
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if step == 0:
            state = optimizer_state()["state"]
            first_grads = {name: moments["exp_avg"] / (1 - ADAM_BETA1) for name, moments in state.items()}
    return torch.stack(losses).cpu(), first_grads


def train(ctx: RankContext, setup: Setup, steps: int = STEPS) -> Trained:
    """Builds ``setup`` and trains it with :func:`fit` on this rank's slice of the data."""
    model = build(ctx, setup)
    optimizer = adam(model)
    gelus = ForwardOpsInBackward(torch.ops.aten.gelu.default)
    replays = ReplayCounter()
    losses, first_grads = fit(
        model,
        optimizer,
        rank_batches(ctx, setup)[:steps],
        lambda: full_optimizer_state(model, optimizer),
        counting={None: gelus, "inside": replays}.get(setup.compile),
        counting_backward=gelus if setup.compile == "outside" else None,
    )
    if setup.compile == "inside":
        return Trained(model, optimizer, losses, first_grads, replays.calls)
    return Trained(model, optimizer, losses, first_grads, gelus.count)


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {name: value.detach().cpu() for name, value in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return to_cpu(state)


def to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_cpu(item) for item in value]
    return value


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes: equal digests mean bitwise-equal tensors."""
    sha = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        sha.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def optimizer_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The optimizer state's tensors by ``<param>.<key>``, e.g. ``tok_emb.weight.exp_avg``."""
    return {
        f"{name}.{key}": torch.as_tensor(value)
        for name, moments in state["state"].items()
        for key, value in moments.items()
    }


# --- names ------------------------------------------------------------------------------------------


def optimizer_keys(method: str, state: dict[str, Any]) -> dict[str, list[str]]:
    """The names an optimizer state dict holds: its ``state`` keys and its param groups' params."""
    return {
        f"{method} state": [str(name) for name in state["state"]],
        f"{method} param_groups": [str(name) for group in state["param_groups"] for name in group["params"]],
    }


def saved_keys(model: nn.Module, optimizer: torch.optim.Optimizer, setup: Setup) -> dict[str, list[str]]:
    """Keys of every model and optimizer state dict the setup offers, by the call that made them."""
    full = StateDictOptions(full_state_dict=True)
    keys = {
        "get_model_state_dict": list(get_model_state_dict(model)),
        "get_model_state_dict(full)": list(get_model_state_dict(model, options=full)),
        **optimizer_keys("get_optimizer_state_dict", get_optimizer_state_dict(model, optimizer)),
        **optimizer_keys(
            "get_optimizer_state_dict(full)", get_optimizer_state_dict(model, optimizer, options=full)
        ),
    }
    if setup.parallel == "ddp":
        keys["module.state_dict"] = list(model.module.state_dict())
    elif setup.parallel == "fsdp1":
        configs = {
            StateDictType.FULL_STATE_DICT: (
                FullStateDictConfig(rank0_only=False),
                FullOptimStateDictConfig(rank0_only=False),
            ),
            StateDictType.SHARDED_STATE_DICT: (ShardedStateDictConfig(), ShardedOptimStateDictConfig()),
        }
        for kind, (config, optim_config) in configs.items():
            with FullyShardedDataParallel.state_dict_type(model, kind, config, optim_config):
                keys[f"state_dict({kind.name})"] = list(model.state_dict())
                keys.update(
                    optimizer_keys(
                        f"FSDP.optim_state_dict({kind.name})",
                        FullyShardedDataParallel.optim_state_dict(model, optimizer),
                    )
                )
    else:
        keys["state_dict"] = list(model.state_dict())
    return keys


def root_parameter_names(model: nn.Module) -> list[str]:
    """``named_parameters()`` from the root, without the parallel wrapper's own prefixes.

    DDP's ``module.`` and FSDP1's ``_fsdp_wrapped_module.`` are the parallel wrapper's business (they
    are in torch's own names without AC too); what fsdp_ac answers for is everything else.
    """
    return [
        name.removeprefix("module.").replace("_fsdp_wrapped_module.", "")
        for name, _ in model.named_parameters()
    ]


# --- the reference ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the same kernels' summation order where possible
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_single_process(nproc: int) -> dict[str, Any]:
    """The unwrapped model trained in this process on the whole global batch of ``nproc`` ranks."""
    with _single_thread():
        torch.manual_seed(0)
        model = GPT(CONFIG)
        optimizer = adam(model)
        losses, first_grads = fit(
            model, optimizer, global_batches(nproc), lambda: get_optimizer_state_dict(model, optimizer)
        )
    return {
        "losses": losses,
        "first_grads": first_grads,
        "params": {name: value.detach().clone() for name, value in model.state_dict().items()},
        "param_names": [name for name, _ in model.named_parameters()],
        "state_dict_keys": list(model.state_dict()),
    }
