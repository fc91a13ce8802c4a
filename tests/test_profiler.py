"""The profiler's bytes add up to the meter's, and its per-call bytes predict what each strategy holds."""

from __future__ import annotations

import copy

import pytest
import torch
from models import held_bytes_after_steps
from torch import nn

from fsdp_ac import ActivationPlan
from fsdp_ac.planner import plan
from fsdp_ac.profiler import (
    Profile,
    Workload,
    _LiveBytes,
    _storage_key,
    builtin_workload,
    peak_bytes,
    profile,
    workload_from_spec,
)

TINY = {"batch": 2, "seq": 16, "d_model": 32, "heads": 4, "vocab": 64}


@pytest.fixture(scope="module")
def gpt() -> tuple[Workload, Profile]:
    workload = builtin_workload("gpt", layers=3, **TINY)  # type: ignore[arg-type]
    progress: list[tuple[int, int]] = []
    measured = profile(workload, repeats=2, progress=lambda done, total: progress.append((done, total)))
    assert progress[-1][0] == progress[-1][1] == len(progress)
    return workload, measured


def test_block_bytes_add_up_to_the_meter(gpt: tuple[Workload, Profile]) -> None:
    workload, measured = gpt
    assert measured.no_ac_bytes == held_bytes_after_steps(workload, copy.deepcopy(workload.model))
    assert measured.no_ac_bytes == measured.outside_bytes + sum(b.none_bytes for b in measured.blocks)
    assert [b.name for b in measured.blocks] == ["layers.0", "layers.1", "layers.2"]
    # The embedding output comes before every block; the head's tensors after them.
    assert 0 < measured.outside_before[0] == measured.outside_before[-1] < measured.outside_bytes


def test_call_bytes_predict_what_each_strategy_holds(gpt: tuple[Workload, Profile]) -> None:
    _, measured = gpt
    for block in measured.blocks:
        by_op = {op.name.split("#")[0].split(".")[1]: op for op in block.ops}
        attention = sum(op.bytes for op in block.ops if "attention" in op.name)
        assert set(by_op) == {"addmm", "scaled_dot_product_attention"}  # one name on every device
        assert block.measured_bytes["full"] == block.kept_bytes > 0
        assert block.measured_bytes["selective:matmul"] == block.kept_bytes + sum(
            op.bytes for op in block.ops
        )
        assert block.measured_bytes["selective:attention"] == block.kept_bytes + attention
        # QKV (#0) and the MLP's first matmul (#2) are what backward reads; the default saves them.
        read = [op.name for op in block.ops if op.read_by_backward]
        assert read == [
            "aten.addmm.default#0",
            "aten.scaled_dot_product_attention.default#0",
            "aten.addmm.default#2",
        ]
        assert block.measured_bytes["selective:default"] == block.kept_bytes + sum(
            op.bytes for op in block.ops if op.read_by_backward
        )


def test_recompute_times_follow_torchs_early_stop(gpt: tuple[Workload, Profile]) -> None:
    _, measured = gpt
    for block in measured.blocks:
        times = {op.name: op.recompute_ms for op in block.ops}
        # The MLP's output projection (#3) runs after the last tensor backward saves: never replayed.
        assert times.pop("aten.addmm.default#3") == 0.0
        assert all(t > 0 for t in times.values())
        assert block.other_ms > 0 and block.forward_ms > 0


def test_a_saved_call_holds_its_bytes(gpt: tuple[Workload, Profile]) -> None:
    workload, measured = gpt
    block = measured.blocks[1]
    op = block.ops[2]
    model = copy.deepcopy(workload.model)
    ActivationPlan({block.name: f"selective:{op.name}"}).apply(model)
    none_others = measured.no_ac_bytes - block.none_bytes
    assert held_bytes_after_steps(workload, model) == none_others + block.kept_bytes + op.bytes


def test_llama_plan_holds_the_predicted_bytes() -> None:
    pytest.importorskip("transformers")
    workload = builtin_workload("llama", layers=2, **TINY)  # type: ignore[arg-type]
    measured = profile(workload, repeats=1)
    # q, k, v, attention, o, gate, up, down: eight saveable calls per layer.
    assert len(measured.blocks[0].ops) == 8
    result = plan(measured, 0.75)
    model = copy.deepcopy(workload.model)
    result.to_activation_plan().apply(model)
    held = held_bytes_after_steps(workload, model)
    assert held == pytest.approx(result.predicted_bytes, rel=0.05)
    assert held <= result.budget_bytes < measured.no_ac_bytes
    # The checkpoints keep the layers' position ids, which no AC frees: one int64 per token, counted
    # (transformers 4.x passes both layers one more input, which is counted alike).
    assert (TINY["seq"] * 8, (0, 1)) in measured.kept_inputs
    assert all(layers == (0, 1) for _, layers in measured.kept_inputs)
    peak = peak_bytes(workload, model)
    assert peak == result.predicted_peak_bytes <= result.budget_bytes


def test_the_peak_of_a_step_without_ac_is_what_the_profile_predicts(gpt: tuple[Workload, Profile]) -> None:
    workload, measured = gpt
    # The head's backward holds at least the gradient of the logits (batch x seq x vocab floats).
    assert measured.head_backward_bytes >= TINY["batch"] * TINY["seq"] * TINY["vocab"] * 4
    assert all(b.backward_bytes == measured.blocks[0].backward_bytes > 0 for b in measured.blocks)
    at_blocks = [
        measured.outside_before[i]
        + sum(b.none_bytes for b in measured.blocks[: i + 1])
        + block.backward_bytes
        for i, block in enumerate(measured.blocks)
    ]
    predicted = max(measured.no_ac_bytes + measured.head_backward_bytes, *at_blocks)
    assert peak_bytes(workload, copy.deepcopy(workload.model)) == predicted


def _float_model() -> nn.Module:
    return nn.Sequential(*(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)) for _ in range(3)))


def test_a_user_model_by_import_path(capfd: pytest.CaptureFixture[str]) -> None:
    workload = workload_from_spec(f"{__name__}:_float_model", (8, 16), blocks={"Sequential"}.copy())
    assert workload.batch.dtype == torch.float32 and workload.batch.shape == (8, 16)
    measured = profile(workload, repeats=1)
    assert "fsdp_ac:" not in capfd.readouterr().err  # the copies it checkpoints to measure say nothing
    assert [b.name for b in measured.blocks] == ["0", "1", "2"]
    assert measured.blocks[0].none_bytes > measured.blocks[0].kept_bytes == 8 * 16 * 4
    with pytest.raises(ValueError, match=r"package\.module:factory"):
        workload_from_spec("no_colon", (1,), blocks="Sequential")


class _Limited(_LiveBytes):
    """Live bytes (parameters and buffers excluded, their gradients counted) that refuse to pass ``limit``."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__({_storage_key(t) for t in (*model.parameters(), *model.buffers())})
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.curve[-1] > self.limit:
            raise MemoryError(f"{self.curve[-1]} bytes alive, over the limit of {self.limit}")
        return out


def test_a_model_whose_step_without_ac_does_not_fit_is_profiled_and_planned() -> None:
    workload = builtin_workload("gpt", layers=6, **{**TINY, "batch": 4, "seq": 64})  # type: ignore[arg-type]
    model = workload.model
    full = copy.deepcopy(model)
    ActivationPlan(dict.fromkeys(measured_names := [f"layers.{i}" for i in range(6)], "full")).apply(full)
    peaks = {}
    for name, m in (("none", model), ("full", full)):
        with _Limited(m, 1 << 40) as meter:
            workload.step(m)
        peaks[name] = max(meter.curve)
    limit = peaks["full"] + held_bytes_after_steps(workload, copy.deepcopy(model)) // 6  # + about one block
    with pytest.raises(MemoryError), _Limited(model, limit):
        workload.step()
    model.zero_grad(set_to_none=True)
    with _Limited(model, limit) as meter:
        measured = profile(workload, repeats=1, strategies=())
    assert [b.name for b in measured.blocks] == measured_names
    # Measured: 1,222,056 bytes against full AC's 977,960 (+ a block's 532,480) and no AC's 3,461,672.
    assert peaks["full"] < max(meter.curve) <= peaks["full"] + measured.blocks[0].none_bytes < peaks["none"]
    # The profile is the one a step without AC gives (the other tests check its bytes exactly).
    assert measured.no_ac_bytes == held_bytes_after_steps(workload, copy.deepcopy(model))
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    result = plan(measured, limit - grads)
    planned = copy.deepcopy(model)
    result.to_activation_plan().apply(planned)
    with _Limited(planned, limit):
        workload.step(planned)
