"""Per-block activation plans: which strategy each module of a model gets, applied in one call.

An :class:`ActivationPlan` maps clean qualified module names (as ``model.named_modules()`` lists
them) to strategies:

==================  ===============================================================================
Strategy            What the module gets
==================  ===============================================================================
``none``            Nothing: its activations stay in memory.
``full``            :func:`~fsdp_ac.checkpoint_wrapper`: only its inputs are kept; the rest is
                    recomputed in backward.
``selective``       :class:`~fsdp_ac.SelectiveCheckpoint` with the ``default`` preset; other presets
                    as ``selective:<preset>`` (``selective:torchtitan``, ``selective:matmul``, ...),
                    or operator calls as ``selective:aten.addmm.default#0,aten.mm.default#2``.
``offload``         :func:`~fsdp_ac.offload_wrapper`: its saved activations live in CPU memory.
``full+offload``    Checkpointed, and its inputs (all the checkpoint keeps) offloaded to CPU memory.
==================  ===============================================================================

A plan can be written by hand, derived from a policy (:meth:`ActivationPlan.from_policy`), printed as
a table and saved as JSON, so that a memory planner can emit one and a run can record what it used.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    ActivationWrapper as TorchActivationWrapper,
)

from fsdp_ac.names import WRAPPED_MODULE_ATTR
from fsdp_ac.offload import OffloadEngine
from fsdp_ac.policies import ModulePolicy, PolicySpec, _check_alignment, _sites, parent_slots, post_order
from fsdp_ac.selective import SelectiveCheckpoint
from fsdp_ac.wrappers import (
    ActivationWrapper,
    _refuse_nested_wrappers_in_flat_unit,
    checkpoint_wrapper,
    offload_wrapper,
)

__all__ = ["STRATEGIES", "ActivationPlan"]

STRATEGIES: tuple[str, ...] = (
    "none",
    "full",
    "selective",
    *(f"selective:{preset}" for preset in SelectiveCheckpoint.PRESETS),
    "offload",
    "full+offload",
)
"""Every strategy a plan accepts."""

_FORMAT = "fsdp_ac.ActivationPlan"
_VERSION = 1


class ActivationPlan:
    """A strategy per module, applied to a model in one call; printable and saved as JSON.

    Args:
        strategies: Clean qualified module name to strategy (see :data:`STRATEGIES`).

    Raises:
        ValueError: A strategy is unknown, a name is empty (the root cannot be replaced in place), or
            two checkpointed or offloaded modules lie one inside the other.
        TypeError: A name or a strategy is not a string.

    Example:
        >>> plan = ActivationPlan({"layers.0": "full", "layers.1": "selective", "layers.2": "none"})
        >>> plan.apply(model)
        >>> print(plan.table(model))
        >>> plan.save("plan.json")
    """

    def __init__(self, strategies: Mapping[str, str]) -> None:
        for name, strategy in strategies.items():
            if not isinstance(name, str) or not isinstance(strategy, str):
                raise TypeError(
                    f"An activation plan maps module names to strategy names (strings), got {name!r}: "
                    f"{strategy!r}."
                )
            if strategy not in STRATEGIES and not _is_op_selection(strategy):
                close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"Unknown strategy {strategy!r} for module {name!r}; use one of {STRATEGIES}, or "
                    f"'selective:<operators>' as in 'selective:aten.addmm.default#0'.{hint}"
                )
            if not name:
                raise ValueError(
                    "An activation plan cannot name the root module (''): it cannot be replaced in place. "
                    "Wrap the model yourself (checkpoint_wrapper(model)) or name its blocks."
                )
        self._strategies = dict(strategies)
        active = sorted(name for name, strategy in self._strategies.items() if strategy != "none")
        for outer in active:
            inner = next((n for n in active if n.startswith(outer + ".")), None)
            if inner is not None:
                raise ValueError(
                    f"The plan wraps both {outer!r} ({self._strategies[outer]}) and {inner!r} "
                    f"({self._strategies[inner]}), one inside the other: the inner region would be "
                    f"recomputed twice. Keep one of them, or set the other to 'none'."
                )

    @property
    def strategies(self) -> dict[str, str]:
        """A copy of the mapping from module name to strategy."""
        return dict(self._strategies)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActivationPlan) and self._strategies == other._strategies

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ActivationPlan({self._strategies!r})"

    def __len__(self) -> int:
        """Number of modules the plan names."""
        return len(self._strategies)

    def __iter__(self) -> Iterator[str]:
        """Iterates the module names, in the plan's order."""
        return iter(self._strategies)

    @classmethod
    def from_policy(
        cls, model: nn.Module, policy: PolicySpec | ModulePolicy, strategy: str = "full"
    ) -> ActivationPlan:
        """Returns a plan giving ``strategy`` to every module ``policy`` selects in ``model``.

        Args:
            model: The model to plan for.
            policy: Anything :class:`~fsdp_ac.ModulePolicy` accepts, e.g.
                ``ModulePolicy({"LlamaDecoderLayer"}).every(2)``.
            strategy: One of :data:`STRATEGIES`.

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
        names = [site.name for site in _sites(model)]
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
        ``selective`` preset share one :class:`~fsdp_ac.SelectiveCheckpoint`. When the model has FSDP
        units, :func:`~fsdp_ac.check_alignment` then warns about regions that do not coincide with them.

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
                wrappers first with :func:`~fsdp_ac.remove_activation_checkpointing`), or ``full+offload``
                names the whole module of an FSDP1 unit without ``use_orig_params`` (apply the plan
                before FSDP1, or use ``use_orig_params=True``).
        """
        self.check(model)
        sites = {site.name: site for site in _sites(model)}
        wrapped_inside: dict[nn.Module, str] = {}
        for site in sites.values():
            if any(isinstance(m, TorchActivationWrapper) for m in site.chain):
                for sub in post_order(site.module):
                    wrapped_inside.setdefault(sub, site.name)
        parents = parent_slots(model)
        builders: dict[str, Callable[[nn.Module], nn.Module]] = {}
        for name, strategy in self._strategies.items():
            if strategy == "none":
                continue
            module = sites[name].module
            if module in wrapped_inside:
                where = wrapped_inside[module]
                raise ValueError(
                    f"The activation plan wraps {name!r}, but "
                    + ("it is" if where == name else f"it lies inside {where!r}, which is")
                    + " already wrapped for activation checkpointing or offloading. Call "
                    "fsdp_ac.remove_activation_checkpointing(model) before applying a plan."
                )
            builder = builders.setdefault(strategy, _builder(strategy, offload_engine))
            wrapper = builder(module)
            for layer in _wrapper_layers(wrapper):
                layer.region_name = name
            for parent, _ in parents[module]:
                # The guard apply_activation_checkpointing runs: offload around checkpoint inside a
                # flat-parameter FSDP1 unit would leak the flat parameter into the state dict.
                _refuse_nested_wrappers_in_flat_unit(parent, wrapper, module)
            for parent, attr in parents[module]:
                setattr(parent, attr, wrapper)
        _check_alignment(model, strict=False, stacklevel=3)
        return model

    def table(self, model: nn.Module | None = None) -> str:
        """Returns the plan as an aligned text table, one module per row.

        Args:
            model: When given, adds each module's class and parameter count.

        Raises:
            ValueError: ``model`` is given and lacks a module the plan names.
        """
        header = ["module", "strategy"]
        rows = [[name, strategy] for name, strategy in self._strategies.items()]
        if model is not None:
            sites = {site.name: site for site in _sites(model)}
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
        return json.dumps({"format": _FORMAT, "version": _VERSION, "strategies": self._strategies}, indent=2)

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
        if document.get("version") != _VERSION:
            raise ValueError(
                f"Activation plan version {document.get('version')!r} is not supported; this fsdp_ac "
                f"reads version {_VERSION}. Upgrade fsdp_ac or write the plan again."
            )
        strategies = document.get("strategies")
        if not isinstance(strategies, dict):
            raise ValueError(
                'An activation plan needs a "strategies" object mapping module names to strategies.'
            )
        return cls(strategies)

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


def _builder(strategy: str, engine: OffloadEngine | None) -> Callable[[nn.Module], nn.Module]:
    if strategy == "full":
        return checkpoint_wrapper
    if strategy == "offload":
        return lambda module: offload_wrapper(module, engine=engine)
    if strategy == "full+offload":
        return lambda module: offload_wrapper(checkpoint_wrapper(module), engine=engine)
    _, _, choice = strategy.partition(":")
    return SelectiveCheckpoint.from_text(choice)


def _is_op_selection(strategy: str) -> bool:
    """Whether ``strategy`` is ``selective:<operators>``, the per-operator choices a planner writes.

    Raises:
        ValueError: It is, but names an operator this torch lacks (from SelectiveCheckpoint).
    """
    kind, _, choice = strategy.partition(":")
    if kind != "selective" or "." not in choice:
        return False
    SelectiveCheckpoint.from_text(choice)  # raises, naming the operator it cannot read
    return True


def _wrapper_layers(module: nn.Module) -> Iterator[ActivationWrapper]:
    while isinstance(module, TorchActivationWrapper):
        if isinstance(module, ActivationWrapper):
            yield module
        module = module._modules[WRAPPED_MODULE_ATTR]  # type: ignore[assignment]
