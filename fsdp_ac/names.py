"""Clean parameter, buffer, module and state-dict names through activation wrappers.

An activation wrapper keeps the module it wraps as the attribute ``_checkpoint_wrapped_module``
(torch's FSDP and DCP look for that exact name). Left alone, that attribute leaks into every name
computed from above the wrapper: ``layers.0._checkpoint_wrapped_module.attn.weight`` instead of
``layers.0.attn.weight``. This module holds the one definition of that prefix and the hooks that keep
it out of names, state dicts, load errors and optimizer ``param_names``, and put it back on load.

Loading accepts both spellings of a key: the clean one (what fsdp_ac and a plain model write) and the
legacy one that still carries the prefix (what older tools wrote). It never doubles the prefix.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import nn

__all__ = ["WRAPPED_MODULE_ATTR", "clean_name", "clean_state_dict"]

WRAPPED_MODULE_ATTR = "_checkpoint_wrapped_module"
"""Attribute under which a wrapper keeps its module; torch's FSDP and DCP key off this name."""

_WRAPPED_SEGMENT = WRAPPED_MODULE_ATTR + "."
_PENDING_ERRORS_ATTR = "_fsdp_ac_pending_load_errors"


def clean_name(name: str) -> str:
    """Returns ``name`` with every ``_checkpoint_wrapped_module`` segment removed.

    Args:
        name: A dotted parameter, buffer, module or state-dict name.

    Returns:
        The name an unwrapped model uses for the same object.

    Example:
        >>> clean_name("layers.0._checkpoint_wrapped_module.attn.weight")
        'layers.0.attn.weight'
    """
    if WRAPPED_MODULE_ATTR not in name:
        return name
    return ".".join(part for part in name.split(".") if part != WRAPPED_MODULE_ATTR)


def clean_state_dict(state_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """Returns a copy of ``state_dict`` with wrapper prefixes removed from every key.

    Use it to load a checkpoint written by an older tool (keys with ``_checkpoint_wrapped_module``)
    into a model that has no activation wrappers. fsdp_ac's own wrappers accept both spellings, so a
    wrapped model does not need it.

    Args:
        state_dict: A model state dict, possibly with legacy keys.

    Returns:
        A new dict with clean keys, in the original order.

    Raises:
        ValueError: Two keys differ only by the wrapper prefix, so one would overwrite the other.
            Remove the duplicate key from the checkpoint.
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

    The key order is kept, so a clean state dict lists tensors exactly as an unwrapped model does.
    Version metadata moves with the keys, which a plain model's ``load_state_dict`` reads.
    """
    del module, local_metadata
    wrapped_prefix = prefix + _WRAPPED_SEGMENT
    keys = list(state_dict.keys())
    if not any(key.startswith(wrapped_prefix) for key in keys):
        return
    # Rebuild in place so the caller's dict object (and its order) is what it gets back.
    items = [(key, state_dict.pop(key)) for key in keys]
    for key, value in items:
        if key.startswith(wrapped_prefix):
            key = prefix + key[len(wrapped_prefix) :]
        state_dict[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        wrapped_meta = prefix + WRAPPED_MODULE_ATTR
        for meta_key in [k for k in metadata if k == wrapped_meta or k.startswith(wrapped_meta + ".")]:
            # The wrapped module's entry replaces the wrapper's: its version is the one that matters.
            metadata[clean_name(meta_key)] = metadata.pop(meta_key)


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

    A key that already goes through ``_checkpoint_wrapped_module`` (a legacy checkpoint) is left as it
    is, so the prefix is never doubled. The wrapper owns no tensors itself, so every other key under
    ``prefix`` belongs to the wrapped module.

    Raises:
        ValueError: The state dict holds both the clean and the prefixed spelling of one key.
    """
    del local_metadata, strict, missing_keys, unexpected_keys
    # Load errors are appended by the wrapped module's own loading, which runs after this hook; the
    # post-hook cleans them, so it needs this call's list.
    setattr(module, _PENDING_ERRORS_ATTR, error_msgs)
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
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [clean_name(key) for key in keys]
    error_msgs = module.__dict__.pop(_PENDING_ERRORS_ATTR, None)
    if error_msgs:
        error_msgs[:] = [msg.replace(_WRAPPED_SEGMENT, "") for msg in error_msgs]
