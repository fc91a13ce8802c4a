"""The one path by which activation wrappers go into a model, and come out of it.

:func:`wrap_in_place` walks the model, lets its caller choose the modules and how to wrap each,
names each region, replaces the modules in every slot that holds them, and runs every wrap-time guard.
:func:`apply_activation_checkpointing` (torch's signature), :meth:`fsdp_ac.ActivationPlan.apply` and
the Accelerate integration (:func:`fsdp_ac.accelerate.prepare`) are thin callers, so a guard added
here holds for all three. Each runs when something is to be wrapped:

- Hugging Face gradient checkpointing on anywhere in the model: refused (every layer would be
  recomputed twice);
- a Hugging Face key/value cache (``config.use_cache``): set to ``False``, as Hugging Face's own
  gradient checkpointing does, and said in the account line. The replay of a checkpointed layer would
  append to the cache a second time; training has no use for it. Set it back for generation;
- a stack of two activation wrappers placed as the whole module of an FSDP1 unit without
  ``use_orig_params``: refused (FSDP1 looks through one wrapper there, so its flat parameter would
  reach the state dict);
- afterwards, :func:`~fsdp_ac.check_alignment` warns about regions that do not coincide with FSDP units,
  and rank 0 writes one line that says what was wrapped (:func:`fsdp_ac.report.notice`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from fsdp_ac._compat import uses_flat_parameters
from fsdp_ac.names import Site, activation_wrappers, children_first, unwrap, walk
from fsdp_ac.policies import ModulePolicy, PolicySpec, check_alignment
from fsdp_ac.report import notice, said_origin, user_stacklevel, verbosity
from fsdp_ac.wrappers import (
    checkpoint_wrapper,
    naming_regions,
    refuse_hf_gradient_checkpointing,
    require_module,
)

__all__ = ["Choice", "apply_activation_checkpointing", "remove_activation_checkpointing", "wrap_in_place"]

Choice = tuple[Site, Callable[[nn.Module], nn.Module]]
"""A module to wrap (its site in the model) and how to wrap it."""


def wrap_in_place(
    model: nn.Module, choose: Callable[[list[Site]], Iterable[Choice]], *, caller: str
) -> nn.Module:
    """Wraps the modules ``choose`` picks from ``model``'s sites, in place, with every guard.

    Args:
        model: The model to modify in place.
        choose: Given every site of ``model`` (the root's first), returns the sites to wrap and the
            function that wraps each; it raises when the choice is invalid.
        caller: The public function, named when ``model`` is not a module.

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` instance.
        ValueError: Hugging Face gradient checkpointing is on in ``model``, or a wrapper stack would
            be the whole module of an FSDP1 unit without ``use_orig_params``; or see ``choose``.
    """
    require_module(model, caller)
    sites = walk(model)
    chosen = dict(choose(sites))
    cache_off = False
    if chosen:
        verbosity()  # a bad FSDP_AC_VERBOSITY fails before the model changes
        refuse_hf_gradient_checkpointing(model, type(unwrap(model)).__name__)
        cache_off = _turn_off_hf_cache(model)
    kinds: Counter[str] = Counter()
    # Children before parents: a parent's wrapper then holds its already wrapped children.
    order = {site.chain[0]: index for index, site in enumerate(sites)}
    for site in children_first(sorted(chosen, key=lambda site: order[site.chain[0]])):
        wrap = chosen[site]
        with naming_regions(site.name):
            wrapper = wrap(site.module)
        holders = site.holders(site.module)
        for parent, _ in holders:
            _refuse_nested_wrappers_in_flat_unit(parent, wrapper, site.module)
        for parent, attr in holders:
            setattr(parent, attr, wrapper)
        kinds[_kind(wrapper)] += 1
    check_alignment(model, stacklevel=user_stacklevel() + 1)
    if chosen:
        notice(_account(model, sites, chosen, kinds, cache_off))
    return model


def apply_activation_checkpointing(
    model: nn.Module,
    checkpoint_wrapper_fn: Callable[[nn.Module], nn.Module] = checkpoint_wrapper,
    check_fn: Callable[[nn.Module], bool] = lambda _: True,
    auto_wrap_policy: PolicySpec | ModulePolicy | None = None,
) -> None:
    """Replaces selected submodules of ``model``, in place, by ``checkpoint_wrapper_fn(submodule)``.

    The root is never wrapped (use :func:`~fsdp_ac.checkpoint_wrapper` on it directly), and neither
    is a wrapper or a module a wrapper already holds, so applying twice changes nothing. The guards
    of :func:`wrap_in_place` run (Hugging Face checkpointing and cache, FSDP1 flat units,
    alignment with FSDP units).

    Args:
        model: The model to modify in place.
        checkpoint_wrapper_fn: Builds the wrapper, e.g. :func:`~fsdp_ac.checkpoint_wrapper`,
            :func:`~fsdp_ac.offload_wrapper`, or a ``functools.partial`` of either.
        check_fn: Called on each submodule; ``True`` wraps it. Ignored when ``auto_wrap_policy``
            is given.
        auto_wrap_policy: What to wrap: a :class:`fsdp_ac.ModulePolicy`, a module class, a class
            name (as Accelerate's ``transformer_cls_names_to_wrap`` gives them), a set of either, a
            predicate, or an FSDP policy (``ModuleWrapPolicy``, ``CustomPolicy``, or a callable such
            as ``partial(transformer_auto_wrap_policy, ...)``). The same object passed to FSDP gives
            FSDP units and AC regions that coincide.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` instance (the message says what it is).
        TypeError: ``auto_wrap_policy`` is of none of those kinds.
        ValueError: The policy or ``check_fn`` matches no submodule (the message lists the model's
            module classes), or see :func:`wrap_in_place`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Linear))
        >>> [name for name, _ in model.named_parameters()]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    policy = ModulePolicy(check_fn if auto_wrap_policy is None else auto_wrap_policy)

    def choose(_: list[Site]) -> list[Choice]:
        return [
            (site, checkpoint_wrapper_fn)
            for site in policy.sites(model)
            if not any(activation_wrappers(member) for member in site.chain)
        ]

    wrap_in_place(model, choose, caller="apply_activation_checkpointing")


def remove_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Removes every activation wrapper from ``model`` in place, restoring the original module tree.

    Afterwards names, module structure and state dicts are exactly the unwrapped model's.

    Args:
        model: The model to modify in place.

    Returns:
        ``model``, or the module inside it when ``model`` itself is a wrapper.

    Raises:
        ValueError: A wrapper carries hooks or a distributed state (e.g. ``fully_shard`` was applied
            to it), which removing it would lose. Remove activation checkpointing before sharding.
    """
    for site in walk(model)[1:]:
        for index, member in enumerate(site.chain):
            outermost = index == 0 or not activation_wrappers(site.chain[index - 1])
            if not (outermost and activation_wrappers(member)):
                continue
            for layer in activation_wrappers(member):
                if layer._forward_pre_hooks or layer._forward_hooks:
                    raise ValueError(
                        f"The activation wrapper around '{site.name}' has forward hooks (for example, "
                        "fully_shard was applied to it); removing it would drop them. Remove "
                        "activation checkpointing before sharding."
                    )
            for parent, attr in site.holders(member):
                nn.Module.__setattr__(parent, attr, unwrap(member))
    return unwrap(model)


def _turn_off_hf_cache(model: nn.Module) -> bool:
    """Sets ``config.use_cache = False`` on a Hugging Face model, as its own checkpointing does."""
    config: Any = getattr(model, "config", None)
    if getattr(config, "use_cache", False) is not True:
        return False
    config.use_cache = False
    return True


def _kind(wrapper: nn.Module) -> str:
    """What a wrapper does, as strategies are spelled: ``full``, ``selective``, ``offload``, joined by +."""
    kinds = []
    for layer in activation_wrappers(wrapper):
        keywords = getattr(getattr(layer, "checkpoint_fn", None), "keywords", None)
        if keywords is None:
            kinds.append("offload")
            continue
        kinds.append("selective" if "context_fn" in keywords else "full")
        if getattr(layer, "offload", None) is not None:
            kinds.append("offload")
    return "+".join(kinds)


def _account(
    model: nn.Module, sites: list[Site], chosen: dict[Site, Any], kinds: Counter[str], cache_off: bool
) -> str:
    """``4/4 LlamaDecoderLayer checkpointed (full; <origin>)``: the classes wrapped, of how many."""
    wrapped = Counter(type(site.module).__name__ for site in chosen)
    present = Counter(type(site.module).__name__ for site in sites)
    blocks = ", ".join(f"{count}/{present[name]} {name}" for name, count in wrapped.items())
    verb = "offloaded" if set(kinds) == {"offload"} else "checkpointed"
    how = ", ".join(kind if len(kinds) == 1 else f"{n} {kind}" for kind, n in kinds.items())
    where = said_origin()
    cache = f"; set {type(unwrap(model)).__name__}.config.use_cache = False" if cache_off else ""
    return f"{blocks} {verb} ({how}{'; ' + where if where else ''}){cache}"


def _refuse_nested_wrappers_in_flat_unit(parent: nn.Module, wrapper: nn.Module, target: nn.Module) -> None:
    """FSDP1 without ``use_orig_params`` unwraps only one wrapper level of the module it holds."""
    if (
        isinstance(parent, FullyShardedDataParallel)
        and uses_flat_parameters(parent)
        and len(activation_wrappers(wrapper)) > 1
    ):
        raise ValueError(
            f"{type(target).__name__} is the whole module of an FSDP1 unit with use_orig_params=False; "
            "torch's FSDP1 looks through only one activation wrapper there, so two (offload around "
            "checkpoint) would put FSDP's flat parameter into the state dict. Apply activation "
            "checkpointing before FSDP1, use use_orig_params=True, or use the full+offload strategy "
            "(fsdp_ac.strategies.Offload(Full())), which is one wrapper."
        )
