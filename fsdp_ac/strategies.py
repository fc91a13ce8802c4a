"""What a module gets: small frozen strategy objects that carry their options and build their wrapper.

==================  ========================  =====================================================
Spelling            Object                    What the module gets
==================  ========================  =====================================================
``none``            ``NoCheckpoint()``        Nothing: its activations stay in memory.
``full``            ``Full()``                :func:`~fsdp_ac.checkpoint_wrapper`: only its inputs are
                                              kept; the rest is recomputed in backward.
``selective``       ``Selective()``           :class:`~fsdp_ac.SelectiveCheckpoint`, ``default``
                                              preset; ``selective:<preset>`` for the others;
                                              ``selective:aten.mm.default#0,...`` for operator
                                              calls (the memory planner's choices).
``offload``         ``Offload()``             :func:`~fsdp_ac.offload_wrapper`: its saved
                                              activations live in CPU memory.
``full+offload``    ``Offload(Full())``       Checkpointed, and its inputs (all the checkpoint keeps)
                                              in CPU memory: one :class:`~fsdp_ac.CheckpointWrapper`
                                              with ``offload``, which an FSDP1 unit without
                                              ``use_orig_params`` can hold.
==================  ========================  =====================================================

:func:`parse_strategy` is the one parser of these spellings (plans, ``FSDP_AC_STRATEGY``, config
files); options without a spelling (``Full(CheckpointImpl.REENTRANT)``, ``Offload(pin_memory=False)``,
``Selective(("aten.mm.default",))``) travel in JSON through :meth:`to_json` and
:func:`strategy_from_json`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from torch import nn

from fsdp_ac.offload import DEFAULT_MIN_OFFLOAD_BYTES, OffloadEngine, OffloadOptions
from fsdp_ac.selective import SelectiveCheckpoint
from fsdp_ac.wrappers import CheckpointImpl, checkpoint_wrapper, offload_wrapper

__all__ = [
    "STRATEGIES",
    "Full",
    "NoCheckpoint",
    "Offload",
    "Selective",
    "Strategy",
    "parse_strategy",
    "strategy_from_json",
]

STRATEGIES: tuple[str, ...] = (
    "none",
    "full",
    "selective",
    *(f"selective:{preset}" for preset in SelectiveCheckpoint.PRESETS),
    "offload",
    "full+offload",
)
"""Every spelling :func:`parse_strategy` accepts."""

Wrap: TypeAlias = Callable[[nn.Module], nn.Module]


class _Strategy:
    """What every strategy does with its :meth:`wrapper`."""

    def wrapper(self, *, engine: OffloadEngine | None = None) -> Wrap:
        """Returns the function that wraps modules with this strategy.

        The modules one such function wraps share what a selective strategy learns; ``engine`` copies
        for offloading strategies.
        """
        raise NotImplementedError

    def wrap(self, module: nn.Module, *, engine: OffloadEngine | None = None) -> nn.Module:
        """Returns ``module`` wrapped with this strategy, every option set at construction."""
        return self.wrapper(engine=engine)(module)

    def __str__(self) -> str:
        """The strategy's spelling (:data:`STRATEGIES`), or its repr when its options have none."""
        return next((text for text in STRATEGIES if parse_strategy(text, "") == self), repr(self))


@dataclass(frozen=True)
class NoCheckpoint(_Strategy):
    """Leaves the module as it is (``none``)."""

    def wrapper(self, *, engine: OffloadEngine | None = None) -> Wrap:
        """The identity."""
        return lambda module: module

    def to_json(self) -> dict[str, Any]:
        """Returns the strategy as a JSON object (see :func:`strategy_from_json`)."""
        return {"strategy": "none"}


@dataclass(frozen=True)
class Full(_Strategy):
    """Full activation checkpointing (``full``): only the module's inputs are kept."""

    impl: CheckpointImpl = CheckpointImpl.NO_REENTRANT
    """torch's checkpoint implementation."""

    def wrapper(self, *, engine: OffloadEngine | None = None) -> Wrap:
        """:func:`~fsdp_ac.checkpoint_wrapper` with ``impl``."""
        return lambda module: checkpoint_wrapper(module, self.impl)

    def to_json(self) -> dict[str, Any]:
        """Returns the strategy as a JSON object (see :func:`strategy_from_json`)."""
        return {"strategy": "full", "impl": self.impl.name.lower()}


@dataclass(frozen=True)
class Selective(_Strategy):
    """Selective (op-level) checkpointing (``selective[:preset]``): some operator outputs are kept."""

    save: str | tuple[str, ...] = "default"
    """A preset name (:attr:`fsdp_ac.SelectiveCheckpoint.PRESETS`), or operator names whose outputs
    are saved: ``"aten.mm.default"`` (every call) or ``"aten.mm.default#2"`` (the third call in one
    call of the block, as the memory planner chooses)."""

    def __post_init__(self) -> None:
        if not isinstance(self.save, str):
            object.__setattr__(self, "save", tuple(self.save))
        SelectiveCheckpoint(self.save)  # an unknown preset or operator fails here, naming it

    def __str__(self) -> str:
        """``selective[:preset]``, or ``selective:`` and the operator (call) names joined by commas."""
        return super().__str__() if isinstance(self.save, str) else "selective:" + ",".join(self.save)

    def wrapper(self, *, engine: OffloadEngine | None = None) -> Wrap:
        """One :class:`~fsdp_ac.SelectiveCheckpoint`."""
        return _selective(self, None, engine)

    def to_json(self) -> dict[str, Any]:
        """Returns the strategy as a JSON object (see :func:`strategy_from_json`)."""
        return {"strategy": "selective", "save": self.save if isinstance(self.save, str) else list(self.save)}


@dataclass(frozen=True)
class Offload(_Strategy):
    """Activation offloading (``offload``), alone or around checkpointing (``full+offload``)."""

    inner: Full | Selective | None = None
    """The checkpointing whose kept inputs are offloaded; None offloads every saved activation."""
    pin_memory: bool = True
    """Offload into page-locked memory (for tensors on a CUDA device)."""
    min_offload_bytes: int = DEFAULT_MIN_OFFLOAD_BYTES
    """Saved tensors whose storage is smaller than this stay on their device."""
    copy_cpu_tensors: bool = False
    """Also copy tensors already in CPU memory (frees nothing; lets CPU tests offload for real)."""

    def __post_init__(self) -> None:
        self.options()  # a negative min_offload_bytes fails here

    def options(self) -> OffloadOptions:
        """Returns the offload options."""
        return OffloadOptions(self.pin_memory, self.min_offload_bytes, self.copy_cpu_tensors)

    def wrapper(self, *, engine: OffloadEngine | None = None) -> Wrap:
        """One wrapper: an offloading checkpoint with ``inner``, else an offload wrapper."""
        options = self.options()
        if isinstance(self.inner, Selective):
            return _selective(self.inner, options, engine)
        if isinstance(self.inner, Full):
            impl = self.inner.impl
            return lambda module: checkpoint_wrapper(module, impl, offload=options, engine=engine)
        return lambda module: offload_wrapper(module, **dataclasses.asdict(options), engine=engine)

    def to_json(self) -> dict[str, Any]:
        """Returns the strategy as a JSON object (see :func:`strategy_from_json`)."""
        return {
            "strategy": "offload",
            "inner": None if self.inner is None else self.inner.to_json(),
            **dataclasses.asdict(self.options()),
        }


Strategy: TypeAlias = NoCheckpoint | Full | Selective | Offload
"""What a module gets."""


def parse_strategy(text: str, source: str) -> Strategy:
    """Parses a strategy's spelling (:data:`STRATEGIES`): the one parser of plans, variables and files.

    Args:
        text: ``none``, ``full``, ``selective``, ``selective:<preset>``, ``offload`` or
            ``full+offload`` (case and spaces are ignored); also ``selective:`` and operator (call)
            names joined by commas, ``selective:aten.addmm.default#0,aten.mm.default``.
        source: Where ``text`` came from, named in the error (``"module 'layers.0'"``,
            ``"FSDP_AC_STRATEGY"``).

    Raises:
        ValueError: ``text`` is no strategy; the message names ``source`` and suggests a close one.

    Example:
        >>> parse_strategy("full+offload", "FSDP_AC_STRATEGY")
        Offload(inner=Full(impl=<CheckpointImpl.NO_REENTRANT: 2>), pin_memory=True, ...)
    """
    spelling = str(text).strip().lower().replace(" ", "")
    if spelling == "none":
        return NoCheckpoint()
    if spelling == "full":
        return Full()
    if spelling == "offload":
        return Offload()
    if spelling == "full+offload":
        return Offload(Full())
    if spelling in STRATEGIES:
        return Selective(spelling.partition(":")[2] or "default")
    kind, _, operators = spelling.partition(":")
    if kind == "selective" and "." in operators:  # the per-operator choices a planner writes
        try:
            return Selective(tuple(part for part in operators.split(",") if part))
        except (ValueError, TypeError) as error:
            raise ValueError(f"Strategy {text!r} for {source}: {error}") from None
    close = difflib.get_close_matches(spelling, STRATEGIES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown strategy {text!r} for {source}; use one of {STRATEGIES}.{hint}")


def strategy_from_json(document: Mapping[str, Any] | str, source: str = "the activation plan") -> Strategy:
    """Reads a strategy written by ``to_json`` (an object) or spelled as :func:`parse_strategy` reads.

    Raises:
        ValueError: The document is no strategy; the message names ``source``.
    """
    if isinstance(document, str):
        return parse_strategy(document, source)
    fields = dict(document)
    kind = fields.pop("strategy", None)
    try:
        if kind == "none" and not fields:
            return NoCheckpoint()
        if kind == "full":
            return Full(CheckpointImpl.__members__[str(fields.pop("impl", "no_reentrant")).upper()], **fields)
        if kind == "selective":
            save = fields.pop("save", "default")
            return Selective(save if isinstance(save, str) else tuple(save), **fields)
        if kind == "offload":
            inner = fields.pop("inner", None)
            parsed = None if inner is None else strategy_from_json(inner, source)
            if not isinstance(parsed, (Full, Selective, type(None))):
                raise ValueError(f"an offload's inner strategy is full or selective, not {parsed}")
            return Offload(parsed, **fields)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{source}: invalid options for strategy {kind!r}: {error}.") from None
    raise ValueError(
        f"{source}: {dict(document)!r} is no strategy; write a strategy's name ({', '.join(STRATEGIES)}) "
        'or an object such as {"strategy": "offload", "inner": {"strategy": "full"}}.'
    )


def _selective(strategy: Selective, offload: OffloadOptions | None, engine: OffloadEngine | None) -> Wrap:
    if offload is None:
        return SelectiveCheckpoint(strategy.save)
    return SelectiveCheckpoint(strategy.save, offload=offload, engine=engine)
