"""Environment knobs: backend selection and collective timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
from suite_settings import collective_timeout, select_backend, suite_nproc


def test_backend_defaults_to_gloo_without_enough_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSDP_AC_BACKEND", raising=False)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert select_backend(gpus + 1) == "gloo"


def test_backend_override_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSDP_AC_BACKEND", "GLOO")
    assert select_backend(2) == "gloo"
    monkeypatch.setenv("FSDP_AC_BACKEND", "mpi")
    with pytest.raises(ValueError, match="not one of"):
        select_backend(2)
    monkeypatch.setenv("FSDP_AC_BACKEND", "nccl")
    with pytest.raises(ValueError, match="FSDP_AC_BACKEND=gloo"):
        select_backend(10_000)


def test_timeout_is_read_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSDP_AC_TIMEOUT_S", raising=False)
    assert collective_timeout() == timedelta(seconds=120)
    monkeypatch.setenv("FSDP_AC_TIMEOUT_S", "7.5")
    assert collective_timeout() == timedelta(seconds=7.5)
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("FSDP_AC_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="positive number"):
            collective_timeout()


def test_suite_nproc_is_read_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FSDP_AC_NPROC", raising=False)
    assert suite_nproc() == 2
    monkeypatch.setenv("FSDP_AC_NPROC", " 8 ")
    assert suite_nproc() == 8
    for bad in ("0", "-1", "two", "1.5", ""):
        monkeypatch.setenv("FSDP_AC_NPROC", bad)
        with pytest.raises(ValueError, match="FSDP_AC_NPROC must be a positive integer"):
            suite_nproc()
