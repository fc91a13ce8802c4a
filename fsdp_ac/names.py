"""Clean parameter, buffer, module and state-dict names through activation wrappers.

Holds the one definition of the ``_checkpoint_wrapped_module`` prefix, the hooks that keep it out
of names, state dicts and load reports (and accept it on load), and the two walks the other modules
use: :func:`wrapper_chain` and :func:`walk`. See docs/names.md.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from fsdp_ac._compat import FSDP1_WRAPPED_ATTR, WRAPPED_MODULE_ATTR, TorchActivationWrapper

_WRAPPED_SEGMENT = WRAPPED_MODULE_ATTR + "."
_PENDING_REPORT_ATTR = "_fsdp_ac_pending_load_report"


class _PendingReport(NamedTuple):
    """What a wrapper's load pre-hook leaves for its post-hook: where its subtree's report begins."""

    error_msgs: list[str]  # the post-hook gets the key lists but not this one
    missing_start: int
    unexpected_start: int
    error_start: int


def clean_name(name: str) -> str:
    """Returns ``name`` (a dotted parameter, buffer, module or state-dict name) as an unwrapped model has it.

    Example:
        >>> clean_name("layers.0._checkpoint_wrapped_module.attn.weight")
        'layers.0.attn.weight'
    """
    if WRAPPED_MODULE_ATTR not in name:
        return name
    return ".".join(part for part in name.split(".") if part != WRAPPED_MODULE_ATTR)


def clean_state_dict(state_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """Returns a copy of ``state_dict`` with wrapper prefixes removed from every key.

    For loading an older tool's checkpoint into a model without wrappers (fsdp_ac's accept both).

    Args:
        state_dict: A model state dict, possibly with legacy keys.

    Returns:
        A new dict with clean keys, in the original order.

    Raises:
        ValueError: Two keys differ only by the wrapper prefix.
    """
    cleaned: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new_key = clean_name(key)
        if new_key in cleaned:
            raise ValueError(
                f"State-dict keys {origin[new_key]!r} and {key!r} name the same tensor once the "
                f"'{WRAPPED_MODULE_ATTR}' prefix is removed; keep only one of them in the checkpoint."
            )
        cleaned[new_key] = value
        origin[new_key] = key
    return cleaned


def strip_prefix_on_save(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """State-dict post-hook: rewrites ``{prefix}_checkpoint_wrapped_module.*`` as ``{prefix}*``.

    Keeps the key order; version metadata moves with the keys (the wrapped module's replaces the
    wrapper's).
    """
    del module, local_metadata
    _strip_trailing(state_dict, prefix)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        _strip_trailing(metadata, prefix)


def _strip_trailing(mapping: MutableMapping[str, Any], prefix: str) -> None:
    """Removes the wrapper's segment after ``prefix`` from the trailing keys under ``prefix``.

    ``state_dict`` inserts a module's keys last, just before its post-hooks, so the trailing run under
    ``prefix`` is the wrapper's subtree: visiting only it keeps a save linear in the number of keys.
    """
    wrapped = prefix + WRAPPED_MODULE_ATTR
    wrapped_prefix = wrapped + "."
    cut = len(wrapped_prefix)
    tail: list[str] = []
    for key in reversed(mapping) if isinstance(mapping, dict) else reversed(list(mapping)):
        if not key.startswith(prefix):
            break
        tail.append(key)
    # The tail is newest first; find the oldest key to rename. Popping it and every later key and
    # inserting them again keeps the caller's dict object and the relative order of all keys.
    first = 0
    for i, key in enumerate(tail):
        if key.startswith(wrapped_prefix) or key == wrapped:
            first = i + 1
    items = [(key, mapping.pop(key)) for key in reversed(tail[:first])]
    for key, value in items:
        if key.startswith(wrapped_prefix):
            key = prefix + key[cut:]
        elif key == wrapped:
            key = prefix[:-1]
        mapping[key] = value


def restore_prefix_on_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: routes every key under ``prefix`` to the wrapped module.

    A legacy key (already through ``_checkpoint_wrapped_module``) is left as it is: never doubled.

    Raises:
        ValueError: The state dict holds both the clean and the prefixed spelling of one key.
    """
    del local_metadata, strict
    # The wrapped module's loading appends to these lists (shared by the whole call); the post-hook
    # cleans what was appended from here on.
    module.__dict__[_PENDING_REPORT_ATTR] = _PendingReport(
        error_msgs, len(missing_keys), len(unexpected_keys), len(error_msgs)
    )
    wrapped_prefix = prefix + _WRAPPED_SEGMENT
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(wrapped_prefix)]:
        new_key = wrapped_prefix + key[len(prefix) :]
        if new_key in state_dict:
            raise ValueError(
                f"The state dict has both {key!r} and {new_key!r}, which name the same tensor; "
                "keep only one of them in the checkpoint (fsdp_ac.clean_state_dict finds such pairs)."
            )
        state_dict[new_key] = state_dict.pop(key)


def clean_load_report(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: reports missing and unexpected keys, and load errors, in clean names."""
    pending: _PendingReport | None = module.__dict__.pop(_PENDING_REPORT_ATTR, None)
    missing, unexpected = incompatible_keys.missing_keys, incompatible_keys.unexpected_keys
    # Without the pre-hook's record (torch always runs it first), every entry is cleaned.
    missing_start, unexpected_start = (
        (0, 0) if pending is None else (pending.missing_start, pending.unexpected_start)
    )
    missing[missing_start:] = [clean_name(key) for key in missing[missing_start:]]
    unexpected[unexpected_start:] = [clean_name(key) for key in unexpected[unexpected_start:]]
    if pending is not None:
        errors, start = pending.error_msgs, pending.error_start
        errors[start:] = [msg.replace(_WRAPPED_SEGMENT, "") for msg in errors[start:]]


# --- the two walks -----------------------------------------------------------------------------------


def wrapper_chain(module: nn.Module) -> tuple[nn.Module, ...]:
    """Returns ``module`` and each module the activation or FSDP1 wrapper before it holds; outermost first."""
    chain = [module]
    while True:
        last = chain[-1]
        if isinstance(last, TorchActivationWrapper):
            inner = last._modules.get(WRAPPED_MODULE_ATTR)
        elif isinstance(last, FullyShardedDataParallel):
            inner = last._modules.get(FSDP1_WRAPPED_ATTR)
        else:
            return tuple(chain)
        if inner is None:
            return tuple(chain)
        chain.append(inner)


def activation_wrappers(module: nn.Module) -> list[TorchActivationWrapper]:
    """Returns the activation wrappers (fsdp_ac's or torch's) stacked on ``module``, outermost first."""
    layers: list[TorchActivationWrapper] = []
    for member in wrapper_chain(module):
        if not isinstance(member, TorchActivationWrapper):
            break
        layers.append(member)
    return layers


def unwrap(module: nn.Module) -> nn.Module:
    """Returns the module inside any stack of activation wrappers (fsdp_ac's or torch's), or ``module``.

    Example:
        >>> linear = nn.Linear(2, 2)
        >>> unwrap(offload_wrapper(checkpoint_wrapper(linear))) is linear
        True
    """
    return wrapper_chain(module)[len(activation_wrappers(module))]


@dataclass(frozen=True, eq=False)
class Site:
    """One module of a model together with the activation and FSDP1 wrappers stacked on it."""

    name: str  # clean; "" for the root
    chain: tuple[nn.Module, ...]  # :func:`wrapper_chain`
    ancestors: tuple[nn.Module, ...]  # the raw modules above chain[0], outermost first
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)  # each (parent, attr) holding chain[0]

    @property
    def module(self) -> nn.Module:
        """The wrapped module."""
        return self.chain[-1]

    @property
    def top(self) -> nn.Module:
        """The outermost member below any FSDP1 wrapper: what FSDP1 wraps as one unit."""
        return next(m for m in self.chain if not isinstance(m, FullyShardedDataParallel))

    def holders(self, member: nn.Module) -> list[tuple[nn.Module, str]]:
        """The ``(parent, attribute)`` slots that hold ``member`` of the chain."""
        index = self.chain.index(member)
        if index == 0:
            return list(self.slots)
        holder = self.chain[index - 1]
        attr = WRAPPED_MODULE_ATTR if isinstance(holder, TorchActivationWrapper) else FSDP1_WRAPPED_ATTR
        return [(holder, attr)]


def walk(root: nn.Module) -> list[Site]:
    """Returns every module of ``root`` once, in definition (pre-)order, wrappers folded in; the root first.

    Walks ``_modules``: the raw tree, with the wrappers ``named_children`` hides and every shared slot.
    """
    sites: dict[nn.Module, Site] = {}

    def visit(module: nn.Module, name: str, ancestors: tuple[nn.Module, ...]) -> None:
        site = Site(name, wrapper_chain(module), ancestors)
        sites.update(dict.fromkeys(site.chain, site))
        for attr, child in site.module._modules.items():
            if child is None:
                continue
            if child in sites:
                if sites[child].chain[0] is child:
                    sites[child].slots.append((site.module, attr))
                continue
            visit(child, f"{name}.{attr}" if name else attr, (*ancestors, *site.chain))
            sites[child].slots.append((site.module, attr))

    visit(root, "", ())
    return list(dict.fromkeys(sites.values()))


def children_first(sites: list[Site]) -> list[Site]:
    """Returns ``sites`` (in model order) with each one after every site inside it: post-order."""
    ordered: list[Site] = []
    open_sites: list[Site] = []
    for site in sites:
        while open_sites and open_sites[-1].module not in site.ancestors:
            ordered.append(open_sites.pop())
        open_sites.append(site)
    return ordered + open_sites[::-1]
