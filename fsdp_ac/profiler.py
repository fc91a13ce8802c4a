"""Measures a model's blocks for the memory planner: what each holds for backward, and at what cost.

Training steps (forward, loss, backward) of the model on a sample batch are observed operator by
operator, each block dropping what it saves for backward (backward gets zeros), so that profiling needs
about full checkpointing's memory, not a step without it (docs/planning.md). For each block (the
modules a policy selects) it records, exactly as a step without checkpointing gives them:

- the activation bytes the block holds for backward without checkpointing (storages its forward
  creates that are alive when the forward and the loss return: the figure
  :class:`~fsdp_ac.ActivationMemoryMeter` gives for the whole model, split by block), and the bytes of
  its outputs, which stay held whatever the block's strategy (the next block or the head keeps them);
- per matmul and attention call in the block (the operators selective checkpointing can save, unless
  the block modifies their output in place later, which makes them recomputed whatever the plan), the
  bytes of its outputs and the time to recompute it (the median of its forward time over the steps);
- the time of everything else a recompute replays (the cheap operators up to the last one whose
  output backward reads: torch's checkpoint stops replaying there), and the block's forward time;
- the bytes held with full checkpointing and with each selective preset, measured on copies of the
  model by the same meter;
- on one more step per kind of block (the first and last apart), with one block of the kind keeping
  what it saves, under a tracker of live storages through backward, what the block's backward adds
  beyond its held bytes, and what the head's and the loss's backward add beyond the end of forward:
  with the above, the step's peak (:func:`peak_bytes` measures it for any model).

Bytes come from the deterministic meter (exact, the same on every run and machine); on CUDA the
allocator's peak while profiling is recorded too. Times are medians over ``repeats`` steps, of
the process's CPU time on the CPU and of wall time (synchronised) on CUDA. :mod:`fsdp_ac.planner`
turns a :class:`Profile` into a plan.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import statistics
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_ac._compat import StorageWeakRef, TorchDispatchMode, tree_leaves, written_tensors
from fsdp_ac.plan import ActivationPlan, PlanOrigin, block_inputs
from fsdp_ac.policies import ModulePolicy, PolicySpec
from fsdp_ac.report import silenced
from fsdp_ac.selective import ATTENTION_OPS, MATMUL_OPS, SelectiveCheckpoint, op_call_name, op_family

__all__ = [
    "BlockBytes",
    "BlockProfile",
    "OpProfile",
    "Profile",
    "Workload",
    "block_bytes",
    "builtin_workload",
    "lm_loss",
    "profile",
    "workload_from_spec",
]

SAVEABLE_OPS = MATMUL_OPS | ATTENTION_OPS
"""Operators whose outputs the planner may choose to save: the expensive ones."""

STRATEGIES_MEASURED = ("full", *(f"selective:{preset}" for preset in SelectiveCheckpoint.PRESETS))
"""Strategies whose bytes per block the profile measures on a copy of the model, for reference."""

Progress = Callable[[int, int], None]
"""Called with (steps done, steps in all) as profiling advances."""


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``tokens`` of shape (batch, seq + 1).

    Accepts models returning logits or an object with ``.logits`` (Hugging Face models).
    """
    output = model(tokens[:, :-1])
    logits = getattr(output, "logits", output)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _mean_square_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    output = model(batch)
    return getattr(output, "logits", output).float().square().mean()


@dataclass
class Workload:
    """One training step to measure: a model, its blocks, a sample batch and a loss.

    Args:
        model: The model (not modified by profiling; plans are applied to it or to a copy).
        blocks: The modules a plan may checkpoint, as :class:`~fsdp_ac.ModulePolicy` accepts them.
        batch: The sample batch passed to ``loss``.
        loss: ``loss(model, batch)`` runs the forward and returns the scalar to call backward on.
        description: One line saying what the workload is, for tables.
    """

    model: nn.Module
    blocks: PolicySpec | ModulePolicy
    batch: torch.Tensor
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss
    description: str = ""

    def step(self, model: nn.Module | None = None) -> None:
        """Runs forward, loss and backward on ``model`` (default: the workload's) and drops the grads."""
        model = self.model if model is None else model
        self.loss(model, self.batch).backward()
        model.zero_grad(set_to_none=True)


def builtin_workload(
    name: str,
    *,
    batch: int = 4,
    seq: int = 256,
    layers: int | None = None,
    d_model: int = 512,
    heads: int = 8,
    vocab: int = 512,
    device: str | torch.device = "cpu",
) -> Workload:
    """The reference GPT (``"gpt"``) or a Llama-style decoder (``"llama"``) on random tokens.

    ``"llama"`` is ``transformers``' ``LlamaForCausalLM`` built from a config (separate q/k/v,
    RMSNorm, rotary, SwiGLU of width 1376 for hidden 512), eager SDPA attention, no KV cache.

    Args:
        name: ``"gpt"`` or ``"llama"``.
        batch: Sequences per batch.
        seq: Tokens per sequence.
        layers: Blocks (default: 8 for ``gpt``, 4 for ``llama``).
        d_model: Hidden width.
        heads: Attention heads.
        vocab: Vocabulary size.
        device: Where the model and batch live.

    Raises:
        ValueError: ``name`` is neither; ImportError: ``"llama"`` without ``transformers``.
    """
    torch.manual_seed(0)
    model: nn.Module
    if name == "gpt":
        from fsdp_ac.reference_model import GPT, GPTConfig

        layers = 8 if layers is None else layers
        config = GPTConfig(vocab_size=vocab, max_seq_len=seq, d_model=d_model, n_heads=heads, n_layers=layers)
        model, blocks = GPT(config), "TransformerBlock"
        what = f"reference GPT: {layers} pre-LN blocks, d_model {d_model}, {heads} heads"
    elif name == "llama":
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as error:
            raise ImportError("The 'llama' model needs transformers: pip install transformers.") from error
        layers = 4 if layers is None else layers
        llama_config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=(8 * d_model // 3 + 31) // 32 * 32,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=seq,
            use_cache=False,
        )
        llama_config._attn_implementation = "sdpa"
        model, blocks = LlamaForCausalLM(llama_config), "LlamaDecoderLayer"
        what = f"Llama (transformers): {layers} decoder layers, hidden {d_model}, {heads} heads, SwiGLU"
    else:
        raise ValueError(
            f"Unknown built-in model {name!r}; use 'gpt' or 'llama', or give package.module:factory."
        )
    cast(nn.Module, model).to(device)  # as a module: transformers' own .to signature confuses mypy
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    return Workload(model, blocks, tokens, lm_loss, f"{what}, seq {seq}, batch {batch}, vocab {vocab}")


def workload_from_spec(
    spec: str,
    shape: Sequence[int],
    *,
    blocks: PolicySpec | ModulePolicy,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Workload:
    """A user's model given as ``package.module:factory`` (a function or class called without arguments).

    The batch is random: token ids when ``dtype`` is an integer type (or, without ``dtype``, when the
    model has an ``nn.Embedding``, below its size), with one token more than ``shape`` says so that the
    loss is next-token cross-entropy; otherwise normal floats, and the loss is the mean square of the
    output.

    Args:
        spec: ``package.module:factory``.
        shape: The input's shape, e.g. ``(4, 256)``.
        blocks: The modules to plan for (class names or classes).
        dtype: The input's dtype; see above for the default.
        device: Where the model and batch live.

    Raises:
        ValueError: ``spec`` is not ``package.module:factory``, or the factory does not return a module.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Give the model as package.module:factory, got {spec!r}.")
    factory = getattr(importlib.import_module(module_name), attr)
    torch.manual_seed(0)
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not an nn.Module.")
    model.to(device)
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    generator = torch.Generator().manual_seed(1)
    if (dtype is None and embedding is not None) or (dtype is not None and not dtype.is_floating_point):
        high = embedding.num_embeddings if embedding is not None else 2
        batch = torch.randint(0, high, (*shape[:-1], shape[-1] + 1), generator=generator)
        loss: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss
    else:
        batch = torch.randn(*shape, generator=generator, dtype=dtype or torch.float32)
        loss = _mean_square_loss
    return Workload(model, blocks, batch.to(device), loss, f"{spec}, input {tuple(shape)}")


@dataclass(frozen=True)
class OpProfile:
    """One call of a matmul or attention operator in a block: what saving its outputs holds and saves."""

    name: str
    """The call, as selective checkpointing names it: ``"aten.addmm.default#0"``."""
    bytes: int
    """Bytes of its outputs (not counting the block's outputs, which stay held anyway)."""
    recompute_ms: float
    """Median forward time of the call: what a recompute spends on it unless it is saved. Zero when
    the call comes after the last operator whose output backward reads, as it is then never replayed."""
    read_by_backward: bool
    """Whether its outputs are alive at the end of forward without checkpointing (some operator's
    backward reads them); saving one that is not holds bytes no-AC would not hold."""


@dataclass(frozen=True)
class BlockProfile:
    """What one block holds for backward and what recomputing it costs."""

    name: str
    """Clean qualified module name."""
    kind: str
    """The module's class name."""
    none_bytes: int
    """Bytes the block holds for backward without checkpointing."""
    kept_bytes: int
    """Bytes of the block's outputs: held whatever the block's strategy."""
    ops: tuple[OpProfile, ...]
    """Its matmul and attention calls, in call order."""
    other_ms: float
    """Time of the other operators a recompute replays (every one up to the last whose output
    backward reads)."""
    forward_ms: float
    """Median time of the block's forward."""
    measured_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes held with each of :data:`STRATEGIES_MEASURED` (measured on a copy of the model)."""
    backward_bytes: int = 0
    """Most bytes alive beyond what blocks before it and it hold without checkpointing, in its forward
    or its backward (gradients, temporaries): what its backward adds to its recompute, whatever its
    strategy."""

    @property
    def full_ms(self) -> float:
        """Predicted time of a full recompute."""
        return self.other_ms + sum(op.recompute_ms for op in self.ops)


@dataclass(frozen=True)
class Profile:
    """The measurements of one workload, in the blocks' forward order."""

    description: str
    """What was measured."""
    blocks: tuple[BlockProfile, ...]
    """Per block, in forward order."""
    no_ac_bytes: int
    """Bytes the whole forward and loss hold for backward without checkpointing."""
    outside_before: tuple[int, ...]
    """For each block, the bytes held that were created outside every block before it ran."""
    outside_bytes: int
    """Bytes held that were created outside every block (embeddings, head, loss)."""
    forward_ms: float
    """Median time of the forward and loss."""
    backward_ms: float
    """Median time of the backward."""
    allocator_bytes: int | None = None
    """On CUDA: the allocator's peak while profiling, above what was allocated before (includes what
    the meter does not count, e.g. the allocator's rounding); None elsewhere."""
    origin: PlanOrigin | None = None
    """What was profiled (device, dtype, the first block's input shape, torch, classes): plans carry it."""
    head_backward_bytes: int = 0
    """Most bytes alive beyond the end of forward from the last block's output to its gradient: the
    head, the loss and their backward (the gradient of the logits), which no plan changes."""
    kept_inputs: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """Blocks' inputs made outside the blocks that no AC frees by the end of forward but a checkpoint
    keeps until its backward (position ids, masks): per storage, its bytes and the blocks taking it."""

    @property
    def step_ms(self) -> float:
        """Forward, loss and backward."""
        return self.forward_ms + self.backward_ms

    def to_json(self) -> dict[str, Any]:
        """The profile as a JSON-ready dictionary (``step_ms`` included)."""
        return {**asdict(self), "step_ms": self.step_ms}

    def table(self) -> str:
        """Returns a per-block table: bytes in MiB by strategy, and times in milliseconds."""
        measured = list(self.blocks[0].measured_bytes) if self.blocks else []
        header = ["block", "class", "none_MiB", *(f"{s}_MiB" for s in measured), "fwd_ms", "recompute_ms"]
        rows = [
            [
                b.name,
                b.kind,
                f"{b.none_bytes / 2**20:.2f}",
                *(f"{b.measured_bytes[s] / 2**20:.2f}" for s in measured),
                f"{b.forward_ms:.1f}",
                f"{b.full_ms:.1f}",
            ]
            for b in self.blocks
        ]
        summary = (
            f"{self.description}\nno AC: {self.no_ac_bytes / 2**20:.2f} MiB held for backward "
            f"({self.outside_bytes / 2**20:.2f} outside the blocks); step {self.step_ms:.1f} ms "
            f"(forward {self.forward_ms:.1f}, backward {self.backward_ms:.1f})"
        )
        return summary + "\n" + text_table(header, rows)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligns ``rows`` under ``header`` in columns two spaces apart, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return int(StorageWeakRef(tensor.untyped_storage()).cdata)
    except (RuntimeError, NotImplementedError):
        return None


@dataclass
class _Created:
    ref: StorageWeakRef
    nbytes: int
    block: int | None
    """Index of the block whose forward created it, None outside blocks."""
    blocks_before: int
    """How many blocks had run when it was created."""
    call: int | None
    """Index into the block's saveable calls when one of them created it."""


class _Dropped:
    """A tensor a block saved for backward and created itself, not kept: backward gets zeros."""

    __slots__ = ("__weakref__", "device", "dtype", "size")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.size, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def __call__(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=self.dtype, device=self.device)


class _BlockRecorder(TorchDispatchMode):
    """Attributes every storage a forward creates to the block running, and times the operators.

    Blocks are marked by forward hooks (:meth:`enter` / :meth:`leave`); operators are timed only when
    ``timed`` (the clock adds a little to each call). Blocks not in ``real`` (when given) drop what they
    save for backward and create (see :func:`_observe`).
    """

    def __init__(
        self, n_blocks: int, *, clock: Callable[[], float] | None, real: set[int] | None = None
    ) -> None:
        super().__init__()
        self.clock = clock
        self.real = real
        self.dropped: list[tuple[weakref.ref[_Dropped], int]] = []
        self.block: int | None = None
        self.blocks_run = 0
        self.created: dict[int, _Created] = {}
        self.calls: list[list[tuple[str, float]]] = [[] for _ in range(n_blocks)]
        """Per block: each saveable call's name and time."""
        self.other: list[list[float]] = [[] for _ in range(n_blocks)]
        """Per block: the time of every other operator, in call order."""
        self.order: list[list[int]] = [[] for _ in range(n_blocks)]
        """Per block: for each operator in call order, its saveable-call index or -1-(other index)."""
        self.last_read: list[int] = [-1] * n_blocks
        """Per block: the position of the last operator that ran before the block's last save for
        backward; torch's checkpoint replays up to there and stops."""
        self.outputs: list[set[int]] = [set() for _ in range(n_blocks)]
        self.inputs: list[set[int]] = [set() for _ in range(n_blocks)]
        self.tracker: _LiveBytes | None = None
        self.spans = [[-1, -1, -1] for _ in range(n_blocks)]
        """Per block, with a tracker: the curve's length when its forward starts and ends, and when
        backward has its output's gradient (its own backward starts)."""
        self.mutated: list[set[int]] = [set() for _ in range(n_blocks)]
        """Per block: its saveable calls whose outputs a later operator of the block modifies in place."""
        self.counts: defaultdict[Any, int] = defaultdict(int)

    def enter(self, index: int, inputs: Any) -> None:
        self.block = index
        self.inputs[index] = {
            key for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and (key := _storage_key(t))
        }
        self.counts.clear()
        self._mark(index, 0)

    def leave(self, index: int, output: Any) -> None:
        self.block = None
        self.blocks_run += 1
        self.outputs[index] = {
            key for t in tree_leaves(output) if isinstance(t, torch.Tensor) and (key := _storage_key(t))
        }
        self._mark(index, 1)
        grads = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if self.tracker is not None and grads:
            grads[0].register_hook(lambda grad: self._mark(index, 2))

    def _mark(self, index: int, at: int) -> None:
        if self.tracker is not None and self.spans[index][at] < 0:
            self.spans[index][at] = len(self.tracker.curve)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Dropped:
        """``saved_tensors_hooks`` pack hook: backward will read ``tensor``.

        Autograd saves an operator's inputs before the operator runs and its outputs after, so the
        operators recorded so far are those a replay must run to rebuild this saved tensor.
        """
        if self.block is not None:
            self.last_read[self.block] = len(self.order[self.block]) - 1
            key = _storage_key(tensor) if self.real is not None and self.block not in self.real else None
            if key in self.created and self.created[key].block == self.block and type(tensor) is torch.Tensor:
                dropped = _Dropped(tensor)
                self.dropped.append((weakref.ref(dropped), key))
                return dropped
        return tensor

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        timed = self.clock is not None and self.block is not None
        start = self.clock() if timed else 0.0  # type: ignore[misc]
        out = func(*args, **(kwargs or {}))
        elapsed = (self.clock() - start) * 1e3 if timed else 0.0  # type: ignore[misc]
        call: int | None = None
        if self.block is not None:
            for written in written_tensors(func, args, kwargs or {}):
                source = self.created.get(_storage_key(written) or -1)
                if source is not None and source.block == self.block and source.call is not None:
                    self.mutated[self.block].add(source.call)
            order = self.order[self.block]
            if func in SAVEABLE_OPS:
                call = len(self.calls[self.block])
                self.calls[self.block].append((op_call_name(func, self.counts[op_family(func)]), elapsed))
                self.counts[op_family(func)] += 1
                order.append(call)
            else:
                order.append(-1 - len(self.other[self.block]))
                self.other[self.block].append(elapsed)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta and (key := _storage_key(leaf)):
                if key not in self.created:
                    ref = StorageWeakRef(leaf.untyped_storage())
                    nbytes = leaf.untyped_storage().nbytes()
                    self.created[key] = _Created(ref, nbytes, self.block, self.blocks_run, call)
        return out


class _LiveBytes(TorchDispatchMode):
    """Counts, after every operator, the bytes alive in storages that operators created.

    Parameters and buffers are excluded, and parameter gradients once backward is over.
    """

    def __init__(self, excluded: set[int | None]) -> None:
        super().__init__()
        self.excluded = excluded
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.curve: list[int] = []
        self.created: list[tuple[int, StorageWeakRef, int, int]] = []
        """Each storage created: its key, a weak reference, its bytes and the curve's length then."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for freed in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[freed]
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta and (key := _storage_key(leaf)):
                if key not in self.live and key not in self.excluded:
                    ref, nbytes = StorageWeakRef(leaf.untyped_storage()), leaf.untyped_storage().nbytes()
                    self.live[key] = (ref, nbytes)
                    self.created.append((key, ref, nbytes, len(self.curve)))
        self.curve.append(sum(nbytes for _, nbytes in self.live.values()))
        return out

    def without_gradients(self, model: nn.Module) -> list[int]:
        """The curve less the parameter gradients, which stay alive from their creation on."""
        grads = {_storage_key(p.grad) for p in model.parameters() if p.grad is not None}
        curve = list(self.curve)
        for key, ref, nbytes, at in self.created:
            if key in grads and not ref.expired():  # a freed storage's key can be a gradient's later
                curve[at:] = [bytes_ - nbytes for bytes_ in curve[at:]]
        return curve


def peak_bytes(workload: Workload, model: nn.Module | None = None) -> int:
    """The most activation bytes alive at once over one step (forward, loss, backward) of ``model``.

    What every operator creates, counted until it is freed, except parameters, buffers and parameter
    gradients: what the planner's budget covers. Runs one step first, so that selective presets that
    learn on their first call have learned.
    """
    model = workload.model if model is None else model
    workload.step(model)
    tracker = _LiveBytes({_storage_key(t) for t in (*model.parameters(), *model.buffers())})
    with tracker:
        workload.loss(model, workload.batch).backward()
    peak = max(tracker.without_gradients(model), default=0)
    model.zero_grad(set_to_none=True)
    return peak


@dataclass
class _Observation:
    """One observed forward: per-block held bytes and timings."""

    recorder: _BlockRecorder
    alive: dict[int, _Created]
    forward_ms: float
    backward_ms: float
    curve: list[int]
    """Bytes alive after each operator of the step (:class:`_LiveBytes`); empty without backward."""
    dropped: set[int]
    """Keys in ``alive`` only because a saved tensor was dropped: freed in this step, alive without AC."""


def _clock(device: torch.device) -> Callable[[], float]:
    """A clock in seconds: CPU time of the process on the CPU, synchronised wall time on CUDA.

    CPU time as ``scripts/benchmark.py`` measures by default: on a shared machine, wall time also
    counts the time other processes hold the cores. On CUDA kernels run asynchronously, so the clock
    synchronises first to charge each operator its own kernels.
    """
    if device.type == "cuda":

        def synchronized() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return synchronized
    return time.process_time


def _observe(
    workload: Workload,
    model: nn.Module,
    names: list[str],
    *,
    timed: bool,
    backward: bool = True,
    tracked: bool = False,
    real: set[int] | None = None,
) -> _Observation:
    """Runs forward and loss under a :class:`_BlockRecorder` (then backward); returns what it saw.

    ``tracked``: the step also runs under a :class:`_LiveBytes`, whose curve the observation keeps.
    ``real``: only these blocks keep what they save for backward and create themselves; the others
    keep what they save from outside (inputs, as a checkpoint does) and drop the rest, so the step
    needs about full checkpointing's memory plus the real blocks'. What a step without AC holds at the
    end of forward stays exact: a dropped tensor counts as long as the autograd graph holds it.
    """
    modules = dict(model.named_modules())
    clock = _clock(workload.batch.device)
    recorder = _BlockRecorder(len(names), clock=clock if timed else None, real=real)
    handles = []
    for index, name in enumerate(names):
        module = modules[name]
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, k, i=index: recorder.enter(i, (a, k)), with_kwargs=True
            )
        )
        handles.append(module.register_forward_hook(lambda m, a, out, i=index: recorder.leave(i, out)))
    excluded = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    tracker = recorder.tracker = _LiveBytes(excluded) if tracked else None
    try:
        start = clock()
        with (
            recorder,
            tracker or contextlib.nullcontext(),
            torch.autograd.graph.saved_tensors_hooks(
                recorder.pack, lambda t: t() if isinstance(t, _Dropped) else t
            ),
        ):
            loss = workload.loss(model, workload.batch)
        forward_ms = (clock() - start) * 1e3
    finally:
        for handle in handles:
            handle.remove()
    held = {key for ref, key in recorder.dropped if ref() is not None}
    alive = {
        key: created
        for key, created in recorder.created.items()
        if (not created.ref.expired() or key in held) and key not in excluded
    }
    dropped = {key for key in held if recorder.created[key].ref.expired()}
    start = clock()
    curve: list[int] = []
    if backward:
        with tracker or contextlib.nullcontext():
            loss.backward()
        curve = tracker.without_gradients(model) if tracker is not None else []
        model.zero_grad(set_to_none=True)
    return _Observation(recorder, alive, forward_ms, (clock() - start) * 1e3, curve, dropped)


def _held_by_block(alive: dict[int, _Created], n_blocks: int) -> tuple[list[int], list[int], int]:
    """Per block the bytes alive it created; per block the outside bytes created before it; all outside."""
    held = [0] * n_blocks
    before = [0] * n_blocks
    outside = 0
    for created in alive.values():
        if created.block is not None:
            held[created.block] += created.nbytes
        else:
            outside += created.nbytes
            for i in range(created.blocks_before, n_blocks):
                before[i] += created.nbytes
    return held, before, outside


def profile(
    workload: Workload,
    *,
    repeats: int = 3,
    progress: Progress | None = None,
    strategies: Sequence[str] = STRATEGIES_MEASURED,
) -> Profile:
    """Measures ``workload`` for :func:`fsdp_ac.planner.plan`.

    Runs one warm-up step, then ``repeats`` steps whose forward runs under an operator recorder (its
    clock adds a little to the forward time), one step per kind of block tracking live storages, and
    two forwards per strategy of ``strategies`` on a copy of the model (the first lets the ``default``
    preset learn). The steps need about full checkpointing's memory plus one block's (the module
    docstring says how); the strategies' forwards need what each strategy holds.

    Args:
        workload: The model, its blocks, a sample batch and the loss.
        repeats: Steps whose median gives each time (at least 1).
        progress: Called with (steps done, steps in all) after each step.
        strategies: Strategies whose bytes per block to measure for the table (the planner does not
            need them; ``()`` skips them).

    Returns:
        The :class:`Profile`, blocks in forward order.

    Raises:
        ValueError: ``repeats`` < 1, the policy selects no module, a block runs twice in one forward,
            or the model is already wrapped for checkpointing.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    model = workload.model
    names = ModulePolicy(workload.blocks).names(model)
    modules = dict(model.named_modules())
    done = 0
    if workload.batch.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(workload.batch.device)
        allocated = torch.cuda.memory_allocated(workload.batch.device)

    seen: list[tuple[str, str, tuple[int, ...]] | None] = []
    first_block = modules[names[0]] if names else model
    handle = first_block.register_forward_pre_hook(
        lambda m, a, k: seen.append(block_inputs(a, k)), with_kwargs=True
    )
    try:  # warm-up: first calls allocate and select kernels
        warm = _observe(workload, model, names, timed=False, real=set())
    finally:
        handle.remove()
    # Every step drops what blocks save (see _observe) but for one block of a kind in the tracked steps,
    # whose backward is then observed: blocks of one class, calls and bytes share it, except the first
    # (its input may need no gradient; its backward runs until the step's end) and the last.
    warm_held = _held_by_block(warm.alive, len(names))[0]
    reps: dict[tuple[Any, ...], int] = {}
    ends = (0, len(names) - 1)
    rep_of = [
        reps.setdefault(
            (
                type(modules[n]).__name__,
                *(c for c, _ in warm.recorder.calls[i]),
                warm_held[i],
                i if i in ends else -1,
            ),
            i,
        )
        for i, n in enumerate(names)
    ]
    total = 1 + repeats + len(reps) + len(strategies)

    def advance() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    advance()
    observations = []
    for _ in range(repeats):
        observations.append(_observe(workload, model, names, timed=True, real=set()))
        advance()
    first = observations[0]
    recorder = first.recorder
    if recorder.blocks_run != len(names):
        raise ValueError(
            f"The policy selects {len(names)} blocks but the forward ran {recorder.blocks_run} block calls: "
            "a block that runs twice (weights shared across positions) cannot be planned alone. "
            "Select modules that run once per forward."
        )
    held, before, outside = _held_by_block(first.alive, len(names))
    head, transients = 0, {}
    for index in reps.values():
        head, transients[index] = _transients(
            _observe(workload, model, names, timed=False, tracked=True, real={index}), index
        )
        advance()
    measured: dict[str, list[int]] = {}
    for strategy in strategies:
        measured[strategy] = _strategy_bytes(workload, names, strategy)
        advance()
    call_bytes = [[0] * len(calls) for calls in recorder.calls]
    call_alive = [[False] * len(calls) for calls in recorder.calls]
    for key, created in recorder.created.items():
        if (
            created.block is not None
            and created.call is not None
            and key not in recorder.outputs[created.block]
        ):
            call_bytes[created.block][created.call] += created.nbytes
            call_alive[created.block][created.call] |= key in first.alive
    takers: defaultdict[int, list[int]] = defaultdict(list)
    params = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
    for index, keys in enumerate(recorder.inputs):
        for key in keys - first.alive.keys() - params:
            if key in recorder.created and recorder.created[key].block is None:
                takers[key].append(index)
    # Blocks of one kind run the same calls: their times are pooled, which steadies the medians, and
    # blocks alike in bytes too are worked out once.
    kinds = [
        (type(modules[name]).__name__, *(n for n, _ in recorder.calls[i])) for i, name in enumerate(names)
    ]
    alike: defaultdict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, kind in enumerate(kinds):
        alike[kind].append(index)
    derived: dict[tuple[Any, ...], tuple[tuple[OpProfile, ...], float, float]] = {}
    blocks = []
    for index, name in enumerate(names):
        outputs = recorder.outputs[index]
        kept = sum(first.alive[key].nbytes for key in outputs if key in first.alive)
        replayed = tuple(recorder.order[index][: recorder.last_read[index] + 1])
        mutated = frozenset(recorder.mutated[index])
        figures = (kinds[index], tuple(call_bytes[index]), tuple(call_alive[index]), replayed, mutated)
        if figures not in derived:
            derived[figures] = _block_figures(observations, alike[kinds[index]], *figures[1:])
        ops, other_ms, forward_ms = derived[figures]
        blocks.append(
            BlockProfile(
                name=name,
                kind=type(modules[name]).__name__,
                none_bytes=held[index],
                kept_bytes=kept,
                ops=ops,
                other_ms=other_ms,
                forward_ms=forward_ms,
                measured_bytes={strategy: measured[strategy][index] for strategy in strategies},
                backward_bytes=transients[rep_of[index]],
            )
        )
    return Profile(
        description=workload.description or type(model).__name__,
        blocks=tuple(blocks),
        no_ac_bytes=sum(created.nbytes for created in first.alive.values()),
        outside_before=tuple(before),
        outside_bytes=outside,
        forward_ms=statistics.median(obs.forward_ms for obs in observations),
        backward_ms=statistics.median(obs.backward_ms for obs in observations),
        allocator_bytes=int(torch.cuda.max_memory_allocated(workload.batch.device) - allocated)
        if workload.batch.device.type == "cuda"
        else None,
        head_backward_bytes=head,
        kept_inputs=tuple((recorder.created[key].nbytes, tuple(blocks)) for key, blocks in takers.items()),
        origin=None
        if not seen or seen[0] is None
        else PlanOrigin(
            *seen[0], torch.__version__, type(model).__name__, type(first_block).__name__, len(names)
        ),
    )


def _transients(traced: _Observation, i: int) -> tuple[int, int]:
    """The head's bytes beyond the end of forward, and block ``i``'s beyond what it holds.

    From a tracked step where block ``i`` is real; see :attr:`Profile.head_backward_bytes` and
    :attr:`BlockProfile.backward_bytes`. Dropped tensors lower the curve and what blocks hold alike.
    """
    curve, spans = traced.curve, traced.recorder.spans
    alive = {key: c for key, c in traced.alive.items() if key not in traced.dropped}
    held, before, _ = _held_by_block(alive, len(spans))
    end = sum(c.nbytes for c in alive.values())
    starts = [span[2] if span[2] >= 0 else len(curve) for span in spans] + [len(curve)]
    head = max(curve[spans[-1][1] : starts[-2]], default=end) - end if spans else 0
    seen = curve[spans[i][0] : spans[i][1]] + curve[starts[i] : starts[i - 1] if i else len(curve)]
    return max(head, 0), max(max(seen, default=0) - before[i] - sum(held[: i + 1]), 0)


def _block_figures(
    observations: list[_Observation],
    alike: list[int],
    call_bytes: tuple[int, ...],
    call_alive: tuple[bool, ...],
    replayed: tuple[int, ...],
    mutated: frozenset[int],
) -> tuple[tuple[OpProfile, ...], float, float]:
    """A block's calls, the time of the other operators a recompute replays, and its forward time."""
    calls = observations[0].recorder.calls[alike[0]]
    replays = set(replayed)
    ops = tuple(
        OpProfile(
            name=op_name,
            bytes=call_bytes[call],
            recompute_ms=statistics.median(o.recorder.calls[j][call][1] for o in observations for j in alike)
            if call in replays
            else 0.0,
            read_by_backward=call_alive[call],
        )
        for call, (op_name, _) in enumerate(calls)
        # A call whose output the block modifies in place later is always recomputed (selective
        # checkpointing cannot keep its value), so its time counts among the other operators'.
        if call not in mutated
    )
    other_ms = statistics.median(
        sum(o.recorder.other[j][-1 - position] for position in replayed if position < 0)
        + sum(o.recorder.calls[j][call][1] for call in mutated if call in replays)
        for o in observations
        for j in alike
    )
    forward_ms = statistics.median(
        sum(t for _, t in o.recorder.calls[j]) + sum(o.recorder.other[j]) for o in observations for j in alike
    )
    return ops, other_ms, forward_ms


def _strategy_bytes(workload: Workload, names: list[str], strategy: str) -> list[int]:
    """Bytes each block holds with ``strategy`` on every block, measured on a copy of the model."""
    model = copy.deepcopy(workload.model)
    with silenced():  # a copy checkpointed to be measured: no account line for the user
        ActivationPlan(dict.fromkeys(names, strategy)).apply(model)
    return block_bytes(workload, model).held


@dataclass(frozen=True)
class BlockBytes:
    """What one forward of a (possibly checkpointed) model holds, split by block."""

    held: list[int]
    """Per block (forward order), the bytes alive at the end of forward that its forward created."""
    before: list[int]
    """Per block, the bytes alive created outside every block before it ran."""
    outside: int
    """All bytes alive created outside every block."""


def block_bytes(workload: Workload, model: nn.Module | None = None) -> BlockBytes:
    """Measures what each block of ``model`` (default: the workload's) holds after forward and loss.

    Runs one forward and loss first, so that selective presets that learn on their first call have
    learned; neither forward runs backward. The blocks are those the workload's policy selects.
    """
    model = workload.model if model is None else model
    names = ModulePolicy(workload.blocks).names(model)
    workload.loss(model, workload.batch)
    observation = _observe(workload, model, names, timed=False, backward=False)
    return BlockBytes(*_held_by_block(observation.alive, len(names)))
