"""Where to checkpoint and where to shard: one policy object for FSDP1, FSDP2 and activation checkpointing.

A :class:`ModulePolicy` names the blocks of a model once and answers the same way for FSDP1's
``auto_wrap_policy``, :func:`fully_shard_by_policy` (FSDP2) and ``apply_activation_checkpointing``;
:func:`check_alignment` finds AC regions that FSDP units split or span. See docs/policies.md.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from fsdp_ac._compat import (
    FsdpPolicy,
    FsdpTargetsPolicy,
    TorchCheckpointWrapper,
    custom_policy_fields,
    flat_parameter_modules,
    run_fsdp_policy,
)
from fsdp_ac.names import Site, children_first, walk

# What ModulePolicy accepts (see its docstring).
PolicySpec: TypeAlias = (
    type[nn.Module] | str | Iterable[type[nn.Module] | str] | Callable[..., bool] | FsdpPolicy
)


def _class_names(module: nn.Module) -> set[str]:
    # The whole MRO: FSDP2 swaps a sharded module's class for a subclass named "FSDP<Name>".
    return {n for c in type(module).__mro__ for n in (c.__name__, f"{c.__module__}.{c.__qualname__}")}


def _is_fsdp_callable(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "recurse" in params and "nonwrapped_numel" in params


def _run_fsdp_callable(fn: Callable[..., bool], root: nn.Module) -> set[nn.Module]:
    """The modules FSDP's recursive auto-wrap picks with ``fn`` (its exact algorithm, root excluded)."""
    chosen: set[nn.Module] = set()

    def visit(module: nn.Module) -> int:
        numel = sum(p.numel() for p in module.parameters())
        if not fn(module=module, recurse=True, nonwrapped_numel=numel):
            return 0
        wrapped = sum(visit(child) for child in module.children())
        if module is not root and fn(module=module, recurse=False, nonwrapped_numel=numel - wrapped):
            chosen.add(module)
            return numel
        return wrapped

    visit(root)
    return chosen


class ModulePolicy(FsdpTargetsPolicy):
    """Selects the blocks of a model for FSDP units and activation checkpointing, the same way for both.

    An FSDP ``CustomPolicy``, so FSDP1 and torch's ``apply_activation_checkpointing`` accept it. A
    module and the wrappers around it count as one match, so both orders of FSDP1 and AC give
    ``FSDP(CheckpointWrapper(block))``; matches come in model order.

    Args:
        spec: A module class, a class name (``"LlamaDecoderLayer"``; matches subclasses too), a
            collection of classes and names, a predicate ``(module) -> bool``, an FSDP policy object
            or ``(module, recurse, nonwrapped_numel) -> bool`` callable (``partial`` of
            ``transformer_auto_wrap_policy``...), or another ``ModulePolicy``.

    Raises:
        TypeError: ``spec`` is none of these.
        ValueError: ``spec`` is an empty collection.

    Example:
        >>> blocks = ModulePolicy({"TransformerBlock"})
        >>> blocks.names(GPT(GPTConfig(n_layers=2)))
        ['layers.0', 'layers.1']
        >>> blocks.every(2).names(GPT(GPTConfig(n_layers=4)))
        ['layers.0', 'layers.2']
    """

    def __init__(self, spec: PolicySpec | ModulePolicy) -> None:
        super().__init__(self._matches_alone)
        self._classes: tuple[type[nn.Module], ...] = ()
        self._class_names: frozenset[str] = frozenset()
        self._predicate: Callable[[nn.Module], bool] | None = None
        self._fsdp_policy: FsdpPolicy | None = None
        self._fsdp_callable: Callable[..., bool] | None = None
        self._subsets: tuple[tuple[str, int], ...] = ()
        self._spec_repr = ""
        if isinstance(spec, ModulePolicy):
            self.__dict__.update(custom_policy_fields(spec))
            return
        if isinstance(spec, (str, type)):
            spec = {spec}
        if isinstance(spec, FsdpPolicy):
            self._fsdp_policy = spec
            self._spec_repr = type(spec).__name__
        elif callable(spec):
            if _is_fsdp_callable(spec):
                self._fsdp_callable = spec
            else:
                self._predicate = spec
            self._spec_repr = getattr(spec, "__name__", None) or repr(spec)
        elif isinstance(spec, Iterable):
            items = list(spec)
            bad = [
                i
                for i in items
                if not (isinstance(i, str) or (isinstance(i, type) and issubclass(i, nn.Module)))
            ]
            if bad:
                raise TypeError(
                    f"A ModulePolicy collection holds nn.Module classes or class names, got {bad[0]!r}; "
                    "pass e.g. {TransformerBlock} or {'LlamaDecoderLayer'}."
                )
            if not items:
                raise ValueError(
                    "ModulePolicy got an empty collection, which selects nothing; name the block class, "
                    "e.g. ModulePolicy({'LlamaDecoderLayer'}) (model._no_split_modules lists it for "
                    "Hugging Face models)."
                )
            self._classes = tuple(i for i in items if isinstance(i, type))
            self._class_names = frozenset(i for i in items if isinstance(i, str))
            labels = sorted(i if isinstance(i, str) else i.__name__ for i in items)
            self._spec_repr = "{" + ", ".join(map(repr, labels)) + "}"
        else:
            raise TypeError(
                "A module policy (auto_wrap_policy) must be a module class, a class name, a collection "
                "of them, a predicate (module) -> bool, or an FSDP auto_wrap_policy such as "
                "ModuleWrapPolicy({Block}) or partial(transformer_auto_wrap_policy, ...); "
                f"got {type(spec).__name__} {spec!r}."
            )

    def __repr__(self) -> str:
        subsets = "".join(f".{kind}({n})" for kind, n in self._subsets)
        return f"ModulePolicy({self._spec_repr}){subsets}"

    def every(self, n: int) -> ModulePolicy:
        """Returns a policy that keeps the first match and every ``n``-th one after it.

        Give the result to AC and ``self`` to FSDP to checkpoint one block in ``n``. Raises
        ``ValueError`` when ``n`` < 1, as :meth:`first` and :meth:`last` do.
        """
        return self._with_subset("every", n)

    def first(self, k: int) -> ModulePolicy:
        """Returns a policy that keeps the first ``k`` matches (Megatron's ``recompute_method='block'``)."""
        return self._with_subset("first", k)

    def last(self, k: int) -> ModulePolicy:
        """Returns a policy that keeps the last ``k`` matches."""
        return self._with_subset("last", k)

    def _with_subset(self, kind: str, n: int) -> ModulePolicy:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"ModulePolicy.{kind}() takes a positive integer, got {n!r}.")
        derived = ModulePolicy(self)
        derived._subsets = (*self._subsets, (kind, n))
        return derived

    def names(self, model: nn.Module) -> list[str]:
        """Returns the clean qualified names of the modules :meth:`sites` selects in ``model``."""
        return [site.name for site in self.sites(model)]

    def sites(self, model: nn.Module, ignored: frozenset[nn.Module] = frozenset()) -> list[Site]:
        """Returns the modules this policy selects in ``model``, each with its wrappers, in model order.

        Args:
            model: The model to search; the root itself is never selected.
            ignored: Modules to leave out (FSDP's ``ignored_modules``).

        Raises:
            ValueError: The policy matches no submodule of ``model``.
        """
        chosen: frozenset[nn.Module] = frozenset()
        if self._fsdp_policy is not None:
            chosen = frozenset(run_fsdp_policy(self._fsdp_policy, model, ignored))
        elif self._fsdp_callable is not None:
            chosen = frozenset(_run_fsdp_callable(self._fsdp_callable, model))
        all_sites = walk(model)[1:]
        matched = [
            s
            for s in all_sites
            if ignored.isdisjoint(s.chain) and any(self._member_matches(m, chosen) for m in s.chain)
        ]
        if not matched:
            raise ValueError(self._no_match_message(model, all_sites))
        for kind, n in self._subsets:
            if kind == "every":
                matched = matched[::n]
            elif kind == "first":
                matched = matched[:n]
            else:
                matched = matched[-n:]
        return matched

    def _matches_alone(self, module: nn.Module) -> bool:
        return self._member_matches(module, frozenset())

    def _member_matches(self, module: nn.Module, chosen: frozenset[nn.Module]) -> bool:
        if self._fsdp_policy is not None or self._fsdp_callable is not None:
            return module in chosen
        if self._predicate is not None:
            return bool(self._predicate(module))
        return isinstance(module, self._classes) or not self._class_names.isdisjoint(_class_names(module))

    def _no_match_message(self, model: nn.Module, sites: list[Site]) -> str:
        root = type(walk(model)[0].module).__name__
        classes = sorted({type(s.module).__name__ for s in sites} | {root})
        # Suggest the repeated class with the most parameters per module: the transformer block, usually.
        counts: dict[type[nn.Module], int] = {}
        for site in sites:
            if site.module._modules and not isinstance(
                site.module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)
            ):
                counts[type(site.module)] = counts.get(type(site.module), 0) + 1
        repeated = {s.module for s in sites if counts.get(type(s.module), 0) > 1}
        largest = max(repeated, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
        hint = f", e.g. ModulePolicy({{'{type(largest).__name__}'}})" if largest is not None else ""
        return (
            f"{self!r} matched no submodule of {root}, so nothing would be checkpointed or sharded. "
            f"The model's module classes are: {', '.join(classes)}. Name the block class among them{hint}."
        )

    def fsdp_targets(self, root: nn.Module, ignored: frozenset[nn.Module]) -> list[nn.Module]:
        """What FSDP1 makes units of: the outermost activation wrapper of each match (see :meth:`sites`)."""
        return [site.top for site in self.sites(root, ignored)]


def fully_shard_by_policy(
    model: nn.Module, policy: PolicySpec | ModulePolicy, *, shard_root: bool = True, **fully_shard_kwargs: Any
) -> nn.Module:
    """Applies FSDP2's ``fully_shard`` to each module ``policy`` selects, then to the root.

    FSDP2's counterpart of ``auto_wrap_policy``: a checkpointed block is sharded through its outermost
    wrapper, blocks sharded already are left alone, and :func:`check_alignment` runs afterwards.

    Args:
        model: The model to shard in place.
        policy: Anything :class:`ModulePolicy` accepts.
        shard_root: Also shard the root (holding the parameters outside the blocks).
        **fully_shard_kwargs: Passed to every ``fully_shard`` call (``mesh``, ``mp_policy``...).

    Returns:
        ``model``, now an ``FSDPModule`` when ``shard_root``.

    Raises:
        ValueError: The policy matches no submodule.

    Example:
        >>> mesh = init_device_mesh("cuda", (world_size,))
        >>> apply_activation_checkpointing(model, auto_wrap_policy={"LlamaDecoderLayer"})
        >>> fully_shard_by_policy(model, {"LlamaDecoderLayer"}, mesh=mesh)
    """
    from torch.distributed.fsdp import fully_shard

    # Children before parents, as nested units must be sharded.
    for site in children_first(ModulePolicy(policy).sites(model)):
        if not any(isinstance(m, FSDPModule) for m in site.chain):
            fully_shard(site.top, **fully_shard_kwargs)
    if shard_root and not isinstance(model, FSDPModule):
        fully_shard(model, **fully_shard_kwargs)
    check_alignment(model, stacklevel=3)
    return model


def _is_unit(module: nn.Module) -> bool:
    return isinstance(module, (FullyShardedDataParallel, FSDPModule))


def check_alignment(model: nn.Module, *, strict: bool = False, stacklevel: int = 2) -> list[str]:
    """Finds activation-checkpoint regions that do not coincide with FSDP units.

    A region that spans several FSDP1 or FSDP2 units, or that a unit splits, needs them all
    unsharded at once when it is recomputed.

    Args:
        model: The model after both activation checkpointing and FSDP were applied.
        strict: Raise instead of warning.
        stacklevel: Where the warnings point, as for ``warnings.warn``.

    Returns:
        One message per misplaced region, naming the region and the units (empty when aligned).

    Raises:
        ValueError: ``strict`` and some region is misplaced.

    Example:
        >>> blocks = ModulePolicy({"TransformerBlock"})
        >>> apply_activation_checkpointing(model, auto_wrap_policy=blocks)
        >>> model = FullyShardedDataParallel(model, auto_wrap_policy=blocks)
        >>> check_alignment(model, strict=True)
        []
    """
    entries = [
        (site.name, member, (*site.ancestors, *site.chain[:index]))
        for site in walk(model)
        for index, member in enumerate(site.chain)
    ]
    if not any(_is_unit(m) for _, m, _ in entries):
        return []
    names = {m: name for name, m, _ in entries}
    ancestors_of = {m: a for _, m, a in entries}

    def owner(module: nn.Module) -> nn.Module | None:
        # The FSDP unit that manages module's own parameters: the nearest at or above it.
        return next((m for m in reversed((*ancestors_of[module], module)) if _is_unit(m)), None)

    def label(unit: nn.Module | None) -> str:
        if unit is None:
            return "no FSDP unit"
        return f"'{names[unit]}'" if names[unit] else "the root unit"

    # FSDP1 without use_orig_params moves parameters into flat parameters held by the unit; each
    # records the modules its parameters came from.
    managed_by: dict[nn.Module, nn.Module | None] = {}
    for _, module, _ in entries:
        for param in module._parameters.values():
            held = flat_parameter_modules(param)
            for holder in held or ():
                managed_by[holder] = owner(module)
            if param is not None and held is None:
                managed_by.setdefault(module, owner(module))

    problems: list[str] = []
    for name, region, _ in entries:
        if not isinstance(region, TorchCheckpointWrapper):
            continue
        owners = {
            managed_by[m]
            for m, ancestors in ancestors_of.items()
            if (m is region or region in ancestors) and m in managed_by
        }
        if len(owners) <= 1:
            continue
        inner = sorted((u for u in owners if u is not None and region in ancestors_of[u]), key=label)
        outer = sorted((u for u in owners if u not in inner), key=label)
        where = f"'{name}'" if name else "the root"
        fix = (
            "pass the same fsdp_ac.ModulePolicy to FSDP (or fsdp_ac.fully_shard_by_policy) and to "
            "apply_activation_checkpointing."
        )
        if outer:
            units = ", ".join(map(label, inner))
            problems.append(
                f"FSDP unit{'s' if len(inner) > 1 else ''} {units} split{'' if len(inner) > 1 else 's'} "
                f"AC region {where}: its parameters belong to {units} inside it and to "
                f"{', '.join(map(label, outer))} around it, so recomputing it in backward needs all of "
                f"them unsharded at once. Make each AC region exactly one FSDP unit: {fix}"
            )
        else:
            problems.append(
                f"AC region {where} spans {len(inner)} FSDP units ({', '.join(map(label, inner))}): "
                "recomputing it in backward unshards all of them at once. Checkpoint each unit "
                f"instead: {fix}"
            )
    if problems and strict:
        raise ValueError("\n".join(problems))
    for message in problems:
        warnings.warn(message, UserWarning, stacklevel=stacklevel)
    return problems
