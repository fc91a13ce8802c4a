"""Selective (op-level) activation checkpointing: keep some operator outputs, recompute the rest.

Built on ``torch.utils.checkpoint.create_selective_checkpoint_contexts``: inside a checkpointed block,
every operator output is either saved in forward (``MUST_SAVE``) or recomputed in backward
(``PREFER_RECOMPUTE``). Saving the outputs of the expensive operators (matmuls, attention) and
recomputing the cheap ones keeps most of full checkpointing's memory savings at a fraction of its
recompute time. Every choice gives the same gradients; the presets differ only in memory and time.

Presets (``SelectiveCheckpoint(save=...)``):

``"default"``
    Saves attention outputs, and the output of each matmul (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
    convolution) that backward reads: one that some operator consumes, directly or through views and
    copies, and whose derivative needs that input (a GELU, a LayerNorm, another matmul, attention).
    A matmul output that only feeds operators whose backward does not read it (residual adds,
    dropout, sums) is recomputed instead. In a pre-LN transformer block that recomputes the two
    output projections and every cheap op, and saves QKV, attention and the MLP's first matmul.
    The data flow is observed on the first call of each kind of block (that call saves every matmul
    output) and reused for later calls; blocks of one kind share what was learned when they share one
    ``SelectiveCheckpoint`` object, as :func:`~fsdp_ac.apply_activation_checkpointing` arranges.
``"torchtitan"``
    torchtitan's op-level default: saves attention outputs and reduce-scatters, and every other
    matmul (the 1st, 3rd, ... of a block). torchtitan counts ``aten.mm`` only, as its models have no
    biases; ``aten.addmm`` (a ``Linear`` with bias) counts here too, and the CPU attention kernel is
    an attention output, so that the preset means on any model what it means on torchtitan's.
``"matmul"``
    Saves every matmul and attention output; recomputes only cheap operators.
``"attention"``
    Saves attention outputs only; recomputes every matmul.

A collection of ``OpOverload`` saves exactly those operators' outputs. Operators may also be given by
name, ``"aten.mm.default"`` (every call) or ``"aten.mm.default#2"`` (the third call in each call of the
block, counting from 0): the per-call form is what the memory planner (:mod:`fsdp_ac.planner`) chooses,
and :meth:`SelectiveCheckpoint.from_text` reads it back from a plan. A callable is used as torch's
``policy_fn(ctx, op, *args, **kwargs)`` as it is.

Every form compiles: under ``torch.compile`` the policy tags the traced operators and the compiled
backward recomputes what the policy leaves unsaved. ``"default"`` cannot learn while the graph is
traced: a block it has not learned yet saves every matmul output in that graph, with a warning, and a
plan learned in an uncompiled step before is used as it is. Tensor subclasses such as ``DTensor`` are
followed through their inner tensors.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fsdp_ac._compat import (
    OpOverload,
    OpOverloadPacket,
    StorageWeakRef,
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    tree_leaves,
    uncache_selective_outputs,
    written_tensors,
)
from fsdp_ac.names import unwrap
from fsdp_ac.wrappers import CheckpointImpl, checkpoint_wrapper

__all__ = ["ATTENTION_OPS", "MATMUL_OPS", "SDPA", "SelectiveCheckpoint", "op_call_name", "op_family"]


def _resolve(*names: str) -> frozenset[OpOverload]:
    """Operators by qualified name (``"aten.mm.default"``); names this torch build lacks are skipped."""
    ops = []
    for name in names:
        namespace, packet, overload = name.split(".")
        op = getattr(getattr(getattr(torch.ops, namespace), packet, None), overload, None)
        if isinstance(op, OpOverload):
            ops.append(op)
    return frozenset(ops)


MATMUL_OPS = _resolve(
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.baddbmm.default",
    "aten.convolution.default",
    "aten._scaled_mm.default",
)
"""Compute-bound operators whose outputs are worth saving when backward reads them."""

ATTENTION_OPS = _resolve(
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "aten._flash_attention_forward.default",
    "aten._efficient_attention_forward.default",
)
"""Attention kernels: expensive, and their backward reads their own output, so always saved."""

_TORCHTITAN_MATMULS = _resolve("aten.mm.default", "aten.addmm.default")
_COLLECTIVE_OPS = _resolve("_c10d_functional.reduce_scatter_tensor.default")

_VALUE_COPIES = _resolve(
    "aten.clone.default",
    "aten._to_copy.default",
    "aten._unsafe_view.default",
    "aten.view_copy.default",
    "aten.permute_copy.default",
    "aten.transpose_copy.int",
    "aten.t_copy.default",
    "aten.expand_copy.default",
    "aten.alias_copy.default",
)
"""Operators whose output is the input's value, copied: their readers read the original's value."""

_BACKWARD_IGNORES_INPUT = _resolve(
    "aten.add.Tensor",
    "aten.add_.Tensor",
    "aten.add.Scalar",
    "aten.sub.Tensor",
    "aten.sub_.Tensor",
    "aten.sub.Scalar",
    "aten.mul.Scalar",
    "aten.div.Scalar",
    "aten.neg.default",
    "aten.native_dropout.default",
    "aten.cat.default",
    "aten.stack.default",
    "aten.sum.default",
    "aten.sum.dim_IntList",
    "aten.mean.default",
    "aten.mean.dim",
    "aten.constant_pad_nd.default",
    "aten.copy_.default",
)
"""Operators whose derivative does not read their tensor inputs' values (only shapes, or a mask).
Any operator not listed is assumed to read its inputs, which errs towards saving."""

_OpKey = tuple[OpOverload, int]
"""An operator and how many calls of it came before in the same region call."""


SDPA = torch.ops.aten.scaled_dot_product_attention.default
"""Stands for every attention kernel it dispatches to, so that a call's name means the same on any device."""
_SDPA_KERNELS = _resolve(
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
)


def op_family(op: OpOverload) -> OpOverload:
    """The operator a call is counted and named as: :data:`SDPA` for its kernels, else ``op``."""
    return SDPA if op in _SDPA_KERNELS else op


def op_call_name(op: OpOverload, n: int) -> str:
    """Names the ``n``-th call (from 0) of ``op``'s family in one call of a block: ``"aten.mm.default#2"``."""
    return f"{op_family(op)}#{n}"


def _parse_op(text: str) -> tuple[OpOverload, int | None]:
    """Reads ``"aten.mm.default"`` (every call) or ``"aten.mm.default#2"`` (that call only).

    Raises:
        ValueError: The text is not ``namespace.operator.overload[#n]`` of an operator of this torch.
    """
    name, hash_, count = text.strip().partition("#")
    name = name.strip()
    ops = _resolve(name) if name.count(".") == 2 else frozenset()
    if not ops or (hash_ and not count.strip().isdigit()):
        raise ValueError(
            f"Cannot read {text!r} as an operator to save: write namespace.operator.overload, "
            "optionally with #<call> counting from 0, e.g. 'aten.mm.default' or 'aten.addmm.default#2'."
        )
    return op_family(next(iter(ops))), int(count) if hash_ else None


_Kind = tuple[type[nn.Module], tuple[tuple[str, tuple[int, ...], torch.dtype], ...]]
"""A block's class and the names, shapes and dtypes of its parameters: blocks alike run alike."""


def _storage_id(tensor: torch.Tensor) -> int | None:
    """Identifies the memory holding ``tensor``'s values, which its views and in-place results share.

    A wrapper subclass (``DTensor``, float8 and quantized tensors) holds its values in inner tensors
    (``__tensor_flatten__``); the storage of the wrapper itself is a placeholder without data, so
    the first inner tensor stands for it.
    """
    while is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        if not inner_names:
            return None
        tensor = getattr(tensor, inner_names[0])
    try:
        return int(StorageWeakRef(tensor.untyped_storage()).cdata)
    except (RuntimeError, NotImplementedError):  # sparse, nested and other tensors without one storage
        return None


class _DataflowRecorder(TorchDispatchMode):
    """Records which matmul outputs an operator reads in backward, during one forward of a region."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[_OpKey] = []
        self.read: set[_OpKey] = set()
        self._producer: dict[int, _OpKey] = {}
        self._calls: defaultdict[OpOverload, int] = defaultdict(int)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        out_ids = {_storage_id(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        in_keys = {
            self._producer[sid]: sid
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and (sid := _storage_id(t)) in self._producer
        }
        for key, sid in in_keys.items():
            if sid in out_ids or func in _VALUE_COPIES:
                # A view, an in-place op or a copy: the output carries the same value onwards.
                self._producer.update({oid: key for oid in out_ids if oid is not None})
            elif func not in _BACKWARD_IGNORES_INPUT:
                self.read.add(key)
        if func in MATMUL_OPS:
            key = (func, self._calls[func])
            self._calls[func] += 1
            self.order.append(key)
            self._producer.update({oid: key for oid in out_ids if oid is not None})
        return out


@dataclass(frozen=True)
class _Plan:
    """What the default preset learned about one kind of block: which matmul outputs to save."""

    known: frozenset[_OpKey]
    save: frozenset[_OpKey]


class _RegionCall:
    """Policy state for one call of one selectively checkpointed region."""

    def __init__(self, owner: SelectiveCheckpoint, key: _Kind, *, learn: bool) -> None:
        self.owner = owner
        self.key = key
        self.plan = owner._plans.get(key) if owner.name == "default" else None
        self.recorder = (
            _DataflowRecorder() if learn and owner.name == "default" and self.plan is None else None
        )
        self.calls: defaultdict[OpOverload, int] = defaultdict(int)
        self.replays: defaultdict[OpOverload, int] = defaultdict(int)
        self.decisions: dict[_OpKey, CheckpointPolicy] = {}
        self.stale = False

    def policy(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if ctx.is_recompute:
            # Only torch versions that consult the policy again in backward get here: replay forward.
            key = (func, self.replays[func])
            self.replays[func] += 1
            return self.decisions.get(key, CheckpointPolicy.PREFER_RECOMPUTE)
        if func in ATTENTION_OPS or (func in _COLLECTIVE_OPS and self.owner.name == "torchtitan"):
            return CheckpointPolicy.MUST_SAVE
        if func not in MATMUL_OPS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        key = (func, self.calls[func])
        self.calls[func] += 1
        self.decisions[key] = decision = self._decide(func, key)
        return decision

    def _decide(self, func: OpOverload, key: _OpKey) -> CheckpointPolicy:
        if self.owner.name == "torchtitan":
            matmuls = sum(n for op, n in self.calls.items() if op in _TORCHTITAN_MATMULS)
            save = func in _TORCHTITAN_MATMULS and matmuls % 2 == 1
        elif self.plan is None:
            save = True  # learning: save every matmul output this once
        elif key in self.plan.known:
            save = key in self.plan.save
        else:
            save = self.stale = True  # the block took another path: save, and learn again next call
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    @contextlib.contextmanager
    def forward(self, caching: Any) -> Iterator[None]:
        with caching, self.recorder if self.recorder is not None else contextlib.nullcontext():
            yield
        if self.recorder is not None:
            known = frozenset(self.recorder.order)
            self.owner._plans[self.key] = _Plan(known, known & self.recorder.read)
        elif self.plan is not None and (self.stale or len(self.decisions) != len(self.plan.known)):
            self.owner._plans.pop(self.key, None)


class _CallPolicy:
    """Policy state for one call of a region whose choices name operator calls (``aten.mm.default#2``)."""

    def __init__(self, calls: frozenset[_OpKey], ops: frozenset[OpOverload]) -> None:
        self.saved = calls
        self.ops = ops
        self.calls: defaultdict[OpOverload, int] = defaultdict(int)
        self.replays: defaultdict[OpOverload, int] = defaultdict(int)

    def policy(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        family = op_family(func)
        if func in self.ops or family in self.ops:
            return CheckpointPolicy.MUST_SAVE
        # The recompute replays the forward's calls in order: count them apart to find the same ones.
        counter = self.replays if ctx.is_recompute else self.calls
        key = (family, counter[family])
        counter[family] += 1
        return CheckpointPolicy.MUST_SAVE if key in self.saved else CheckpointPolicy.PREFER_RECOMPUTE

    @contextlib.contextmanager
    def checked(self, caching: Any, block: str) -> Iterator[None]:
        """Runs the forward under ``caching``, then raises if a saved call did not happen."""
        with caching:
            yield
        missing = sorted(op_call_name(op, n) for op, n in self.saved if n >= self.calls[op])
        if missing:
            happened = [
                op_call_name(op, n)
                for op, count in self.calls.items()
                if op in MATMUL_OPS or op == SDPA
                for n in range(count)
            ]
            raise ValueError(
                f"The plan saves {', '.join(missing)} in {block} blocks, but no such call happens there; "
                f"their matmul and attention calls are {', '.join(happened) or 'none'}. The plan was made "
                "for another model, shape or torch: profile and plan again where training runs, or name "
                "calls that happen."
            )


def _kind(module: nn.Module) -> _Kind:
    """Blocks of one kind (class and parameter shapes) run the same operators, so share a plan."""
    inner = unwrap(module)
    return (type(inner), tuple((n, tuple(p.shape), p.dtype) for n, p in inner.named_parameters()))


class _BlockKind:
    """One kind of block wrapped by one :class:`SelectiveCheckpoint`: what its ``context_fn`` needs.

    A plain object, so that ``torch.compile`` guards on its identity alone.
    """

    def __init__(self, owner: SelectiveCheckpoint, kind: _Kind) -> None:
        self.owner = owner
        self.kind = kind


class _InPlaceGuard:
    """Recomputes, instead of reading from the cache, a saved output that the block later modifies in place.

    torch's selective checkpointing caches the outputs a policy saves and fails in backward ("Tensor
    cached during selective activation checkpoint has been mutated") when one was modified in place
    after it was saved (``h = fc(x); h.relu_()``). The guard sees the in-place operator and turns the
    cached entry back into a recompute; where this torch does not allow that, the forward raises.
    """

    def __init__(self, policy: Callable[..., Any]) -> None:
        self.policy = policy
        self.caching: Any = None
        self.saved: dict[int, OpOverload] = {}

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        decision = self.policy(ctx, func, *args, **kwargs)
        if isinstance(decision, bool):
            decision = CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
        if ctx.is_recompute:
            return decision
        hit = {sid for t in written_tensors(func, args, kwargs) if (sid := _storage_id(t)) in self.saved}
        if hit and not uncache_selective_outputs(self.caching, lambda t: _storage_id(t) in hit):
            producer = self.saved[next(iter(hit))]
            raise RuntimeError(
                f"{func} modifies in place the output of {producer}, which selective checkpointing saved "
                f"for backward; torch {torch.__version__} cannot recompute it instead, and backward would "
                f"fail. Make the operation out of place (nn.ReLU(inplace=False), h = h * 0.5) or do not "
                f"save {producer} (e.g. SelectiveCheckpoint('attention'))."
            )
        for sid in hit:
            del self.saved[sid]
        if decision in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE):
            outputs = tree_leaves(getattr(ctx, "op_output", None))
            self.saved.update(
                {sid: func for t in outputs if isinstance(t, torch.Tensor) and (sid := _storage_id(t))}
            )
        return decision


def _contexts(policy: Callable[..., Any], compiling: bool) -> tuple[Any, Any]:
    """Selective-checkpoint contexts for ``policy``, guarded against in-place changes of saved outputs.

    Under ``torch.compile`` the graph is functionalised: there is no cache to guard.
    """
    if compiling:
        return create_selective_checkpoint_contexts(policy)
    guard = _InPlaceGuard(policy)
    guard.caching, cached = create_selective_checkpoint_contexts(guard)
    return guard.caching, cached


def _selective_contexts(block: _BlockKind) -> tuple[Any, Any]:
    """The ``context_fn`` of one kind of block: fresh selective-checkpoint contexts for each call.

    Bound with ``functools.partial``: ``torch.compile`` takes a function or a ``partial`` as
    ``context_fn`` and no other callable. Under compile it runs once per region while the graph is
    traced, and the forward context must be torch's own caching mode, which the compiled checkpoint
    tags with the region's id.
    """
    owner, kind = block.owner, block.kind
    compiling = torch.compiler.is_compiling()
    if owner._policy_fn is not None:
        return _contexts(owner._policy_fn, compiling)
    if owner._save_calls:
        calls = _CallPolicy(owner._save_calls, owner._save_ops or frozenset())
        caching, cached = _contexts(calls.policy, compiling)
        if compiling or kind in owner._checked:
            return caching, cached
        owner._checked.add(kind)  # checked on the first call of each kind of block
        return calls.checked(caching, kind[0].__name__), cached
    if owner._save_ops is not None:
        return _contexts(_CallPolicy(frozenset(), owner._save_ops).policy, compiling)
    if compiling and owner.name == "default" and kind not in owner._plans and kind not in owner._warned:
        owner._warned.add(kind)
        warnings.warn(
            f"SelectiveCheckpoint('default') has not learned yet which matmul outputs backward reads "
            f"in {kind[0].__name__} blocks, and it cannot learn while torch.compile traces them, so "
            "this compiled graph saves every matmul output (as 'matmul' does). Run one training step "
            "uncompiled first (e.g. under torch.compiler.set_stance('force_eager')) so that the "
            "compiled graph uses what it learns, or use SelectiveCheckpoint('torchtitan'), which "
            "needs no learning.",
            stacklevel=2,
        )
    call = _RegionCall(owner, kind, learn=not compiling)
    caching, cached = _contexts(call.policy, compiling)
    if compiling:
        return caching, cached
    return call.forward(caching), cached


class SelectiveCheckpoint:
    """Wraps modules for selective (op-level) activation checkpointing; use as ``checkpoint_wrapper_fn``.

    One object wraps any number of blocks; blocks of the same class and parameter shapes share what
    the ``"default"`` preset learns on the first call of the first of them.

    Args:
        save: A preset name (see :attr:`PRESETS` and the module docstring), a collection of operators
            whose outputs to save (``OpOverload``, e.g. ``torch.ops.aten.mm.default``, or names:
            ``"aten.mm.default"`` for every call, ``"aten.mm.default#2"`` for the third call in each
            call of the block), or torch's ``policy_fn(ctx, op, *args, **kwargs) -> CheckpointPolicy``.
        **checkpoint_kwargs: Passed to :func:`~fsdp_ac.checkpoint_wrapper` (``preserve_rng_state``,
            ``allow_rng_divergence``, ``determinism_check``, ...).

    Raises:
        ValueError: ``save`` is an unknown preset name, an empty collection, or holds a name that is
            not an operator of this torch.
        TypeError: ``save`` holds something other than ``OpOverload`` or a name (e.g.
            ``torch.ops.aten.mm`` without ``.default``), or ``checkpoint_kwargs`` asks for reentrant
            checkpointing or sets ``context_fn``.

    Example:
        >>> apply_activation_checkpointing(
        ...     model, SelectiveCheckpoint("default"), auto_wrap_policy={"TransformerBlock"}
        ... )
    """

    PRESETS: ClassVar[tuple[str, ...]] = ("default", "torchtitan", "matmul", "attention")
    """The preset names ``save`` accepts."""

    def __init__(
        self,
        save: str | Iterable[OpOverload | str] | Callable[..., Any] = "default",
        **checkpoint_kwargs: Any,
    ) -> None:
        self._policy_fn: Callable[..., Any] | None = None
        self._save_ops: frozenset[OpOverload] | None = None
        self._save_calls: frozenset[_OpKey] = frozenset()
        self._text: str | None = None
        self._plans: dict[_Kind, _Plan] = {}
        self._context_fns: dict[_Kind, functools.partial[tuple[Any, Any]]] = {}
        self._warned: set[_Kind] = set()
        self._checked: set[_Kind] = set()
        if isinstance(save, str):
            if save not in self.PRESETS:
                raise ValueError(
                    f"Unknown selective checkpointing preset {save!r}; use one of {self.PRESETS}."
                )
            self.name = self._text = save
            if save == "matmul":
                self._save_ops = MATMUL_OPS | ATTENTION_OPS
            elif save == "attention":
                self._save_ops = ATTENTION_OPS
        elif callable(save):
            self.name = "custom"
            self._policy_fn = save
        else:
            ops: list[OpOverload] = []
            calls: list[_OpKey] = []
            for item in save:
                if isinstance(item, str):
                    op, n = _parse_op(item)
                    if n is None:
                        ops.append(op)
                    else:
                        calls.append((op, n))
                elif isinstance(item, OpOverload):
                    ops.append(item)
                else:
                    hint = f" Use {item}.default." if isinstance(item, OpOverloadPacket) else ""
                    raise TypeError(
                        f"SelectiveCheckpoint saves outputs of OpOverloads such as "
                        f"torch.ops.aten.mm.default, or of operators named as 'aten.mm.default#0', "
                        f"got {item!r}.{hint}"
                    )
            if not ops and not calls:
                raise ValueError(
                    "SelectiveCheckpoint got no operators to save, which is full checkpointing; use "
                    "fsdp_ac.checkpoint_wrapper for that, or name the operators to save."
                )
            self.name = "custom"
            self._save_ops = frozenset(ops)
            self._save_calls = frozenset(calls)
            named_calls = [op_call_name(op, n) for op, n in sorted(calls, key=lambda k: (str(k[0]), k[1]))]
            self._text = ",".join([*sorted(map(str, self._save_ops)), *named_calls])
        if (
            checkpoint_kwargs.get("checkpoint_impl", CheckpointImpl.NO_REENTRANT)
            != CheckpointImpl.NO_REENTRANT
        ):
            raise TypeError(
                "Selective checkpointing needs CheckpointImpl.NO_REENTRANT (torch's reentrant "
                "checkpoint has no context_fn); drop checkpoint_impl."
            )
        if "context_fn" in checkpoint_kwargs:
            raise TypeError("SelectiveCheckpoint sets context_fn itself; pass the policy as `save` instead.")
        self._checkpoint_kwargs = checkpoint_kwargs

    def __repr__(self) -> str:
        return f"SelectiveCheckpoint({self.text or self.name!r})"

    @property
    def text(self) -> str | None:
        """The choice as :meth:`from_text` reads it: a preset, or operator names joined by commas.

        None for a ``policy_fn``.
        """
        return self._text

    @classmethod
    def from_text(cls, text: str, **checkpoint_kwargs: Any) -> SelectiveCheckpoint:
        """Reads a preset name or comma-separated operator names (``"aten.mm.default#0,aten.bmm.default"``).

        The text of an ``ActivationPlan`` strategy ``selective:<text>``; :attr:`text` writes it.

        Raises:
            ValueError: ``text`` is neither a preset nor operator names (the message says which part).
        """
        if "." not in text:
            return cls(text or "default", **checkpoint_kwargs)
        return cls([part for part in text.split(",") if part.strip()], **checkpoint_kwargs)

    def __call__(self, module: nn.Module) -> nn.Module:
        """Returns ``module`` wrapped in a checkpoint wrapper that applies this selection.

        Raises:
            ValueError: ``module`` is checkpointed already with other settings.
        """
        kind = _kind(module)
        # One context_fn per kind, so that wrapping a block again finds equal settings (idempotence).
        if kind not in self._context_fns:
            self._context_fns[kind] = functools.partial(_selective_contexts, _BlockKind(self, kind))
        return checkpoint_wrapper(module, context_fn=self._context_fns[kind], **self._checkpoint_kwargs)

    def learned(self, module: nn.Module) -> list[str] | None:
        """Returns the matmul outputs the ``"default"`` preset saves in blocks like ``module``.

        Each entry reads ``"<operator> #<n>"``: the ``n``-th call (from 0) of that operator in one
        call of the block. Attention outputs are always saved and not listed.

        Args:
            module: A block wrapped by this object, or one like it.

        Returns:
            The saved matmuls in call order, or None before the first uncompiled training call of such a
            block (nothing is learned while ``torch.compile`` traces).
        """
        plan = self._plans.get(_kind(module))
        if plan is None:
            return None
        return [f"{op} #{n}" for op, n in sorted(plan.save, key=lambda k: (str(k[0]), k[1]))]
