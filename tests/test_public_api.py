"""The public API: every name in ``__all__`` imports and is documented."""

from __future__ import annotations

import importlib

import fsdp_ac


def test_every_public_name_imports_and_has_a_docstring() -> None:
    assert len(fsdp_ac.__all__) == len(set(fsdp_ac.__all__))
    module = importlib.import_module("fsdp_ac")
    for name in fsdp_ac.__all__:
        obj = getattr(module, name)
        # CheckpointImpl is torch's own enum, re-exported so members from either import are one.
        assert obj.__doc__ or obj.__module__.startswith("torch."), name


def test_drop_in_names_are_all_there() -> None:
    expected = {
        "checkpoint_wrapper",
        "offload_wrapper",
        "apply_activation_checkpointing",
        "CheckpointImpl",
        "ActivationWrapper",
        "CheckpointWrapper",
        "OffloadWrapper",
    }
    assert expected <= set(fsdp_ac.__all__)


def test_package_ships_type_information() -> None:
    from importlib.resources import files

    assert files("fsdp_ac").joinpath("py.typed").is_file()
