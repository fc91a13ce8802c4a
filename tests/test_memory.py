"""ActivationMemoryMeter: exact byte counts on small graphs, determinism, and the AC saving."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fsdp_ac import ActivationMemoryMeter, apply_activation_checkpointing
from fsdp_ac.reference_model import GPT, TransformerBlock


def test_counts_exactly_what_backward_holds() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    x = torch.randn(8, 64)  # created outside the meter: the caller holds it, not autograd
    with ActivationMemoryMeter(model) as meter:
        loss = model(x).sum()
    # Linear saves x (not created inside) and its weight (excluded); ReLU saves its 8x64 fp32
    # output; the loss is a 4-byte scalar. The Linear output is freed once ReLU has consumed it.
    assert meter.held_bytes == 8 * 64 * 4 + 4
    loss.backward()


def test_no_grad_forward_holds_only_its_output() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad(), ActivationMemoryMeter(model) as meter:
        out = model(torch.randn(8, 64))
    # The input made inside the meter is freed when forward returns; only the output remains.
    assert meter.held_bytes == out.numel() * 4


def test_parameters_and_buffers_are_excluded() -> None:
    model = nn.BatchNorm1d(16)
    with ActivationMemoryMeter(model) as meter:
        out = model(torch.randn(4, 16))
    with ActivationMemoryMeter() as unfiltered:
        out2 = model(torch.randn(4, 16))
    # Saved for backward: the input and output (4x16 fp32 each) and the batch mean and inverse std
    # (16 fp32 each). The in-place update of the int64 num_batches_tracked buffer is only counted
    # when the meter is not told which module owns it.
    assert meter.held_bytes == 2 * 4 * 16 * 4 + 2 * 16 * 4
    assert unfiltered.held_bytes == meter.held_bytes + 8
    del out, out2


def test_checkpointing_holds_less_and_the_figure_is_deterministic(gpt: GPT, tokens: torch.Tensor) -> None:
    wrapped = copy.deepcopy(gpt)
    apply_activation_checkpointing(wrapped, check_fn=lambda m: isinstance(m, TransformerBlock))
    figures = []
    for model in (gpt, wrapped, gpt, wrapped):
        with ActivationMemoryMeter(model) as meter:
            loss = model(tokens).sum()
        figures.append(meter.held_bytes)
        loss.backward()
    assert figures[0] == figures[2] and figures[1] == figures[3]
    assert figures[1] < figures[0] / 2
