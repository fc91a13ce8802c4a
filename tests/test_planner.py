"""The planner: the DP is exact (against brute force), budgets are met, and predicted bytes are measured."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random

import pytest
import torch
from models import held_bytes_after_steps

from fsdp_ac import ActivationPlan
from fsdp_ac.plan import PlanOrigin
from fsdp_ac.planner import (
    BlockChoice,
    BudgetError,
    _curves,
    _peak,
    _predicted_peak,
    block_options,
    plan,
    smallest_budget,
    solve,
)
from fsdp_ac.profiler import BlockProfile, OpProfile, Profile, Workload, builtin_workload, peak_bytes, profile


def _random_case(rng: random.Random) -> tuple[list[list[BlockChoice]], list[int], int]:
    blocks = rng.randint(1, 4)
    options = []
    for _ in range(blocks):
        none = rng.randint(20, 60)
        choices = [BlockChoice(None, none, none, 0.0)]
        for _ in range(rng.randint(1, 3)):
            held = rng.randint(1, none)
            choices.append(BlockChoice((), held, none + rng.randint(0, 5), rng.uniform(0.1, 10)))
        options.append(choices)
    before = sorted(rng.randint(0, 10) for _ in range(blocks))
    return options, before, before[-1] + rng.randint(0, 10)


def _brute_force(
    options: list[list[BlockChoice]], before: list[int], outside: int, budget: int
) -> float | None:
    best = None
    for picks in itertools.product(*(range(len(o)) for o in options)):
        if _peak(options, before, outside, picks) <= budget:
            ms = sum(options[i][p].extra_ms for i, p in enumerate(picks))
            best = ms if best is None else min(best, ms)
    return best


@pytest.mark.parametrize("lattice_limit", [1 << 20, -1], ids=["dense", "frontier"])
def test_dp_equals_brute_force_on_random_cases(lattice_limit: int) -> None:
    rng = random.Random(0)
    checked_feasible = 0
    for _ in range(300):
        options, before, outside = _random_case(rng)
        budget = rng.randint(0, 300)
        picks = solve(options, before, outside, budget, lattice_limit)
        expected = _brute_force(options, before, outside, budget)
        if expected is None:
            assert picks is None
            continue
        assert picks is not None
        checked_feasible += 1
        assert _peak(options, before, outside, picks) <= budget
        assert sum(options[i][p].extra_ms for i, p in enumerate(picks)) == pytest.approx(expected)
    assert checked_feasible > 100  # the cases exercise the optimisation, not only infeasibility


def _block(name: str, ops: list[tuple[int, float, bool]], none: int = 100, kept: int = 10) -> BlockProfile:
    return BlockProfile(
        name=name,
        kind="Block",
        none_bytes=none,
        kept_bytes=kept,
        ops=tuple(OpProfile(f"aten.mm.default#{i}", b, ms, read) for i, (b, ms, read) in enumerate(ops)),
        other_ms=1.0,
        forward_ms=10.0,
    )


def test_block_options_are_the_frontier_of_every_subset() -> None:
    # Call 1 is cheap per byte, call 2 is never replayed (0 ms): saving it only costs bytes.
    block = _block("b", [(30, 5.0, True), (40, 0.5, True), (20, 0.0, False)])
    options = block_options(block)
    strategies = {o.strategy for o in options}
    assert "none" in strategies and "full" in strategies
    assert "selective:aten.mm.default#0" in strategies
    assert not any("#2" in s for s in strategies)  # dominated: bytes for no time
    full = next(o for o in options if o.strategy == "full")
    assert (full.held_bytes, full.extra_ms) == (10, pytest.approx(6.5))
    both = next(o for o in options if o.strategy == "selective:aten.mm.default#0,aten.mm.default#1")
    assert (both.held_bytes, both.extra_ms) == (80, pytest.approx(1.0))
    for a, b in itertools.combinations(options, 2):
        assert not (
            a.held_bytes <= b.held_bytes
            and a.recompute_bytes <= b.recompute_bytes
            and a.extra_ms <= b.extra_ms
        )


def _synthetic_profile() -> Profile:
    blocks = tuple(_block(f"layers.{i}", [(30, 5.0, True), (40, 0.5, True)]) for i in range(3))
    return Profile(
        "synthetic",
        blocks,
        no_ac_bytes=320,
        outside_before=(10, 10, 10),
        outside_bytes=20,
        forward_ms=30.0,
        backward_ms=60.0,
    )


def test_impossible_budget_names_the_smallest_feasible_one() -> None:
    measured = _synthetic_profile()
    smallest = smallest_budget(measured)
    # Full everywhere: at the last block's recompute, 10 outside + 2 x 10 held + its 100 no-AC bytes.
    assert smallest == 130
    with pytest.raises(BudgetError, match="130 bytes") as caught:
        plan(measured, smallest - 1)
    assert caught.value.smallest == smallest
    # Block 2's recompute leaves room for blocks 0 and 1 to hold only their outputs; block 2 itself only
    # has to fit the end of forward (20 outside + 20 + its held bytes), so it may save both calls (80).
    strategies = [c.strategy for c in plan(measured, smallest).choices.values()]
    assert strategies == ["full", "full", "selective:aten.mm.default#0,aten.mm.default#1"]


def test_inputs_that_checkpoints_keep_count_from_the_first_checkpointed_block() -> None:
    measured = dataclasses.replace(_synthetic_profile(), kept_inputs=((7, (0, 1, 2)),))
    # Full everywhere keeps the 7 bytes from block 0's checkpoint on: 130 becomes 137.
    assert smallest_budget(measured) == 137
    with pytest.raises(BudgetError, match="137 bytes"):
        plan(measured, 136)
    # At 140, 200 and 260 the optimum without the kept inputs needs 7 bytes more than the budget: the
    # planner sees it and plans again with them held all through.
    for budget in (137, 140, 200, 260):
        picks = solve(_curves(measured), measured.outside_before, 20, budget)
        assert picks is not None and _predicted_peak(measured, _curves(measured), picks) == budget + 7 * (
            budget != 137
        )
        assert plan(measured, budget).predicted_peak_bytes <= budget
    # An input taken by the last block only: planning as if it were held all through fits nothing at
    # 166 bytes, where full checkpointing fits (block 0's recompute binds before the input is kept).
    blocks = (
        _block("a", [(20, 2.0, True)], none=156, kept=2),
        _block("b", [(36, 4.5, True)], none=137, kept=2),
    )
    late = Profile("late input", blocks, 297, (1, 7), 14, 1.0, 2.0, kept_inputs=((14, (1,)),))
    assert [c.strategy for c in plan(late, 166).choices.values()] == ["full", "full"]
    # No block checkpointed: nothing is kept, the budget is no AC's own peak.
    assert plan(measured, 320).predicted_extra_ms == 0.0 and plan(measured, 320).predicted_peak_bytes == 320


def test_larger_budgets_buy_less_recompute() -> None:
    measured = _synthetic_profile()
    times = [plan(measured, budget).predicted_extra_ms for budget in (130, 200, 260, 320)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1] == 0.0
    assert plan(measured, 1.0).predicted_memory_ratio == 1.0


TINY_GPT = {"batch": 2, "seq": 32, "layers": 4, "d_model": 64, "heads": 4, "vocab": 64}


@pytest.fixture(scope="module")
def gpt_profile() -> tuple[Workload, Profile]:
    workload = builtin_workload("gpt", **TINY_GPT)  # type: ignore[arg-type]
    return workload, profile(workload, repeats=1)


@pytest.mark.parametrize("fraction", [0.4, 0.5, 0.75, 0.9])
def test_applied_plan_holds_the_predicted_bytes_within_budget(
    gpt_profile: tuple[Workload, Profile], fraction: float
) -> None:
    workload, measured = gpt_profile
    result = plan(measured, fraction)
    model = copy.deepcopy(workload.model)
    result.to_activation_plan().apply(model)
    held = held_bytes_after_steps(workload, model)
    assert held == pytest.approx(result.predicted_bytes, rel=0.05)
    # The budget is the peak over forward, loss and backward, as measured, and the prediction is it.
    peak = peak_bytes(workload, model)
    assert peak == pytest.approx(result.predicted_peak_bytes, rel=0.03)
    assert max(peak, result.predicted_peak_bytes) <= result.budget_bytes
    # Checkpointing really happened: the plan holds less than no AC, and its gradients are no AC's.
    assert held < measured.no_ac_bytes
    reference = copy.deepcopy(workload.model)
    for m in (model, reference):
        workload.loss(m, workload.batch).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_plan_round_trips_through_json(gpt_profile: tuple[Workload, Profile]) -> None:
    _, measured = gpt_profile
    # The four blocks are alike: worked out once, their figures are one object.
    assert all(b.ops is measured.blocks[0].ops for b in measured.blocks[1:])
    result = plan(measured, 0.5)
    activation_plan = result.to_activation_plan()
    assert ActivationPlan.from_json(activation_plan.to_json()) == activation_plan
    # Made where it was profiled: the CPU, fp32, the first block's input (batch, seq, d_model).
    assert activation_plan.origin == PlanOrigin(
        "cpu", "float32", (2, 32, 64), torch.__version__, "GPT", "TransformerBlock", 4
    )
    document = result.to_json()
    assert document["predicted_memory_ratio"] == pytest.approx(result.predicted_bytes / measured.no_ac_bytes)
    assert list(document["blocks"]) == [b.name for b in measured.blocks]


@pytest.mark.parametrize("relu", [False, True], ids=["mul_", "relu_inplace"])
def test_outputs_modified_in_place_are_never_saved_and_every_plan_trains_like_no_ac(relu: bool) -> None:
    from models import InPlaceBlock, in_place_model

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    workload = Workload(in_place_model(relu, blocks=3), {InPlaceBlock}, x, lambda m, b: m(b).square().sum())
    measured = profile(workload, repeats=1, strategies=())
    # The first matmul's output is modified in place: it is not offered; the second one is.
    assert [op.name for op in measured.blocks[0].ops] == ["aten.addmm.default#1"]
    # The first block's input needs no gradient: its backward adds less than the others' (the profile
    # observes it apart from the blocks alike).
    assert (
        measured.blocks[0].backward_bytes
        < measured.blocks[1].backward_bytes
        == measured.blocks[2].backward_bytes
    )
    reference = copy.deepcopy(workload.model)
    workload.loss(reference, x).backward()
    options = block_options(measured.blocks[0])
    plans = [ActivationPlan(dict.fromkeys(("0", "1", "2"), o.strategy)) for o in options]
    least = smallest_budget(measured)
    plans += [plan(measured, budget).to_activation_plan() for budget in (least, least * 5 // 4, least * 3)]
    assert {s for p in plans for s in map(str, p.strategies.values())} >= {"none", "full"}
    for activation_plan in plans:
        model = copy.deepcopy(workload.model)
        activation_plan.apply(model)
        for _ in range(2):
            workload.loss(model, x).backward()
            for p, q in zip(reference.parameters(), model.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad), activation_plan
            model.zero_grad(set_to_none=True)
