"""Per-block activation plans: which strategy each module of a model gets, applied in one call.

An :class:`ActivationPlan` maps clean qualified module names (as ``model.named_modules()`` lists
them) to strategies (:mod:`fsdp_ac.strategies`: ``none``, ``full``, ``selective[:preset]``,
``offload``, ``full+offload``, or the typed objects, which carry options the spellings cannot).

A plan can be written by hand, derived from a policy (:meth:`ActivationPlan.from_policy`), printed as
a table and saved as JSON, so that a memory planner can emit one and a run can record what it used.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from fsdp_ac._compat import tree_leaves
from fsdp_ac.apply import Choice, wrap_in_place
from fsdp_ac.names import Site, activation_wrappers, walk
from fsdp_ac.offload import OffloadEngine
from fsdp_ac.policies import ModulePolicy, PolicySpec
from fsdp_ac.strategies import (
    STRATEGIES,
    Full,
    NoCheckpoint,
    Offload,
    Selective,
    Strategy,
    Wrap,
    parse_strategy,
    strategy_from_json,
)

__all__ = ["ActivationPlan", "PlanOrigin", "block_inputs"]

_FORMAT = "fsdp_ac.ActivationPlan"
_VERSION = 2
"""Version 2 adds ``origin``; version 1 plans still load."""


def block_inputs(args: Any, kwargs: Any) -> tuple[str, str, tuple[int, ...]] | None:
    """A block input's device type, dtype (autocast's when on) and shape; None without a float input."""
    x = next(
        (t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()),
        None,
    )
    if x is None:
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return x.device.type, str(dtype).removeprefix("torch."), tuple(x.shape)


@dataclasses.dataclass(frozen=True)
class PlanOrigin:
    """What a plan was made for; applying it elsewhere warns, naming each difference."""

    device: str
    """Device type of the first block's input (``"cpu"``, ``"cuda"``)."""
    dtype: str
    """Its dtype, or autocast's (``"bfloat16"``)."""
    shape: tuple[int, ...]
    """Its shape."""
    torch: str
    model: str
    """The model's class name."""
    block: str
    """The planned blocks' class name."""
    blocks: int
    """How many blocks were planned."""

    def differences(self, model: nn.Module, named: set[str]) -> list[str]:
        """How ``model``, planned for the modules ``named``, differs from what the plan was made for."""
        sites = walk(model)  # FSDP1 units and activation wrappers folded in
        found = [site.name for site in sites[1:] if type(site.module).__name__ == self.block]
        differences = [
            f"{what} {got} (planned for {want})"
            for what, got, want in [
                ("torch", torch.__version__, self.torch),
                ("model class", type(sites[0].module).__name__, self.model),
                (f"{self.block} count", len(found), self.blocks),
            ]
            if got != want
        ]
        uncovered = [name for name in found if name not in named]
        if uncovered:
            differences.append(f"{self.block} blocks the plan does not name: {', '.join(uncovered)}")
        return differences


def _check_first_input(block: nn.Module, origin: PlanOrigin) -> None:
    """Warns at the block's first call when its input differs from the one the plan was made for."""

    def check(module: nn.Module, args: Any, kwargs: Any) -> None:
        handle.remove()
        seen = block_inputs(args, kwargs)
        if seen is not None:
            names = ("device", "dtype", "block input shape")
            wanted = (origin.device, origin.dtype, origin.shape)
            found = zip(names, seen, wanted, strict=True)
            _warn([f"{n} {a} (planned for {b})" for n, a, b in found if a != b], "to inputs")

    handle = block.register_forward_pre_hook(check, with_kwargs=True)


def _warn(differences: list[str], where: str) -> None:
    if differences:
        warnings.warn(
            f"The activation plan is applied {where} other than it was made for: {'; '.join(differences)}. "
            "Its calls and predicted bytes may not hold: profile and plan again where training runs.",
            stacklevel=3,
        )


class ActivationPlan:
    """A strategy per module, applied to a model in one call; printable and saved as JSON.

    Args:
        strategies: Clean qualified module name to strategy: a :mod:`fsdp_ac.strategies` object or
            its spelling (``"full"``, ``"selective:torchtitan"``, ``"full+offload"``, ...).
        origin: What the plan was made for (the planner sets it); :meth:`apply` warns where the model
            or, at its first step, the first block's input differs.

    Raises:
        ValueError: A strategy is unknown, a name is empty (the root cannot be replaced in place), or
            two checkpointed or offloaded modules lie one inside the other.
        TypeError: A name is not a string, or a strategy is neither a string nor a strategy object.

    Example:
        >>> plan = ActivationPlan({"layers.0": "full", "layers.1": "selective", "layers.2": "none"})
        >>> plan.apply(model)
        >>> print(plan.table(model))
        >>> plan.save("plan.json")
    """

    def __init__(self, strategies: Mapping[str, Strategy | str], origin: PlanOrigin | None = None) -> None:
        self.origin = origin
        self._strategies: dict[str, Strategy] = {}
        for name, strategy in strategies.items():
            if not isinstance(name, str) or not isinstance(
                strategy, (str, NoCheckpoint, Full, Selective, Offload)
            ):
                raise TypeError(
                    f"An activation plan maps module names to strategy names (strings) or "
                    f"fsdp_ac.strategies objects, got {name!r}: {strategy!r}."
                )
            if not name:
                raise ValueError(
                    "An activation plan cannot name the root module (''): it cannot be replaced in place. "
                    "Wrap the model yourself (checkpoint_wrapper(model)) or name its blocks."
                )
            self._strategies[name] = (
                parse_strategy(strategy, f"module {name!r}") if isinstance(strategy, str) else strategy
            )
        active = sorted(name for name, strategy in self._strategies.items() if strategy != NoCheckpoint())
        for outer in active:
            inner = next((n for n in active if n.startswith(outer + ".")), None)
            if inner is not None:
                raise ValueError(
                    f"The plan wraps both {outer!r} ({self._strategies[outer]}) and {inner!r} "
                    f"({self._strategies[inner]}), one inside the other: the inner region would be "
                    f"recomputed twice. Keep one of them, or set the other to 'none'."
                )

    @property
    def strategies(self) -> dict[str, Strategy]:
        """A copy of the mapping from module name to strategy."""
        return dict(self._strategies)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActivationPlan) and (self._strategies, self.origin) == (
            other._strategies,
            other.origin,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        spelled = {name: _spelling(strategy) for name, strategy in self._strategies.items()}
        shown = {name: s if isinstance(s, str) else self._strategies[name] for name, s in spelled.items()}
        return f"ActivationPlan({shown!r})"

    def __len__(self) -> int:
        """Number of modules the plan names."""
        return len(self._strategies)

    def __iter__(self) -> Iterator[str]:
        """Iterates the module names, in the plan's order."""
        return iter(self._strategies)

    @classmethod
    def from_policy(
        cls, model: nn.Module, policy: PolicySpec | ModulePolicy, strategy: Strategy | str = "full"
    ) -> ActivationPlan:
        """Returns a plan giving ``strategy`` to every module ``policy`` selects in ``model``.

        Args:
            model: The model to plan for.
            policy: Anything :class:`~fsdp_ac.ModulePolicy` accepts, e.g.
                ``ModulePolicy({"LlamaDecoderLayer"}).every(2)``.
            strategy: A strategy or its spelling (:data:`fsdp_ac.strategies.STRATEGIES`).

        Raises:
            ValueError: ``policy`` matches no submodule, or ``strategy`` is unknown.

        Example:
            >>> ActivationPlan.from_policy(GPT(GPTConfig(n_layers=2)), {"TransformerBlock"}, "selective")
            ActivationPlan({'layers.0': 'selective', 'layers.1': 'selective'})
        """
        return cls(dict.fromkeys(ModulePolicy(policy).names(model), strategy))

    def check(self, model: nn.Module) -> None:
        """Checks that every name in the plan is a module of ``model``.

        Raises:
            ValueError: A name is not a module of ``model``; the message suggests close names.
        """
        names = [site.name for site in walk(model)[1:]]
        missing = [name for name in self._strategies if name not in names]
        if missing:
            close = difflib.get_close_matches(missing[0], names, n=3)
            hint = f" Close names: {', '.join(map(repr, close))}." if close else ""
            raise ValueError(
                f"The activation plan names {missing[0]!r}, which is not a module of "
                f"{type(model).__name__}.{hint} Names are clean qualified names as "
                "model.named_modules() lists them."
            )

    def apply(self, model: nn.Module, *, offload_engine: OffloadEngine | None = None) -> nn.Module:
        """Wraps each named module of ``model`` in place as the plan says.

        Names are clean qualified names; a module inside an FSDP1 unit is wrapped inside it, so the
        plan can be applied before or after ``FullyShardedDataParallel``. Modules with the same
        ``selective`` preset share one :class:`~fsdp_ac.SelectiveCheckpoint`. The guards of
        :func:`fsdp_ac.apply.wrap_in_place` run, as for :func:`~fsdp_ac.apply_activation_checkpointing`.

        Args:
            model: The model to modify in place.
            offload_engine: The :class:`~fsdp_ac.offload.OffloadEngine` through which the ``offload``
                and ``full+offload`` modules copy (asynchronously, prefetching across them); None
                copies synchronously.

        Returns:
            ``model``.

        Raises:
            ValueError: A name is not a module of ``model`` (the message suggests close names), or a
                named module is already wrapped or lies inside an activation wrapper (remove existing
                wrappers first with :func:`~fsdp_ac.remove_activation_checkpointing`), or see
                :func:`fsdp_ac.apply.wrap_in_place`.
        """
        builders: dict[Strategy, Wrap] = {}

        def choose(sites: list[Site]) -> list[Choice]:
            self.check(model)
            by_name = {site.name: site for site in sites}
            wrapped_inside: dict[nn.Module, str] = {}
            for site in sites:
                if any(activation_wrappers(member) for member in site.chain):
                    for sub in site.module.modules():
                        wrapped_inside.setdefault(sub, site.name)
            chosen: list[Choice] = []
            for name, strategy in self._strategies.items():
                if strategy == NoCheckpoint():
                    continue
                module = by_name[name].module
                if module in wrapped_inside:
                    where = wrapped_inside[module]
                    raise ValueError(
                        f"The activation plan wraps {name!r}, but "
                        + ("it is" if where == name else f"it lies inside {where!r}, which is")
                        + " already wrapped for activation checkpointing or offloading. Call "
                        "fsdp_ac.remove_activation_checkpointing(model) before applying a plan."
                    )
                # One builder per strategy: blocks with the same selective strategy share what it learns.
                chosen.append(
                    (by_name[name], builders.setdefault(strategy, strategy.wrapper(engine=offload_engine)))
                )
            return chosen

        if self.origin is not None:
            self.check(model)
            _warn(self.origin.differences(model, set(self._strategies)), "to a model")
            first = next(site.module for site in walk(model) if site.name in self._strategies)
            _check_first_input(first, self.origin)
        return wrap_in_place(model, choose, caller="ActivationPlan.apply")

    def table(self, model: nn.Module | None = None) -> str:
        """Returns the plan as an aligned text table, one module per row.

        Args:
            model: When given, adds each module's class and parameter count.

        Raises:
            ValueError: ``model`` is given and lacks a module the plan names.
        """
        header = ["module", "strategy"]
        rows = [[name, str(strategy)] for name, strategy in self._strategies.items()]
        if model is not None:
            sites = {site.name: site for site in walk(model)}
            header += ["class", "parameters"]
            for row in rows:
                if row[0] not in sites:
                    raise ValueError(f"The plan names {row[0]!r}, which is not a module of the model.")
                module = sites[row[0]].module
                row += [type(module).__name__, f"{sum(p.numel() for p in module.parameters()):,}"]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True))
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(line.rstrip() for line in lines)

    def to_json(self) -> str:
        """Returns the plan as a JSON document (format name, version, strategies in order)."""
        strategies = {name: _spelling(strategy) for name, strategy in self._strategies.items()}
        origin = None if self.origin is None else dataclasses.asdict(self.origin)
        document = {"format": _FORMAT, "version": _VERSION, "origin": origin, "strategies": strategies}
        return json.dumps(document, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ActivationPlan:
        """Reads a plan written by :meth:`to_json`.

        Raises:
            ValueError: ``text`` is not an fsdp_ac activation plan of a known version, or holds an
                invalid plan.
        """
        try:
            document: Any = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"An activation plan is a JSON document; this one does not parse: {error}."
            ) from error
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise ValueError(
                f'Not an fsdp_ac activation plan: expected a JSON object with "format": "{_FORMAT}", '
                "as ActivationPlan.to_json writes."
            )
        if document.get("version") not in (1, _VERSION):
            raise ValueError(
                f"Activation plan version {document.get('version')!r} is not supported; this fsdp_ac "
                f"reads versions 1 to {_VERSION}. Upgrade fsdp_ac or write the plan again."
            )
        strategies = document.get("strategies")
        if not isinstance(strategies, dict):
            raise ValueError(
                'An activation plan needs a "strategies" object mapping module names to strategies.'
            )
        origin = document.get("origin")
        try:
            made_for = None if origin is None else PlanOrigin(**{**origin, "shape": tuple(origin["shape"])})
        except (TypeError, KeyError) as error:
            raise ValueError(
                f"The plan's origin is not what ActivationPlan.to_json writes: {error}."
            ) from None
        return cls(
            {
                name: strategy_from_json(value, f"module {name!r}") if isinstance(value, dict) else value
                for name, value in strategies.items()
            },
            made_for,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the plan to ``path`` as JSON."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationPlan:
        """Reads a plan saved by :meth:`save`.

        Raises:
            ValueError: See :meth:`from_json`.
        """
        with open(path, encoding="utf-8") as file:
            return cls.from_json(file.read())


def _spelling(strategy: Strategy) -> str | dict[str, Any]:
    """The strategy's name where it has one, else its JSON object."""
    return str(strategy) if str(strategy) in STRATEGIES else strategy.to_json()
