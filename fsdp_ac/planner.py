"""Chooses per block what to save so that the activations fit a memory budget at the least recompute.

From a :class:`~fsdp_ac.profiler.Profile`, every block gets its own memory/time curve: no
checkpointing, full checkpointing, and selective checkpointing of each subset of its matmul and
attention calls (the op profile says what each call's outputs hold and what recomputing it costs).
Points that another point beats on bytes held, bytes at its recompute and time are dropped.

The planner then picks one point per block, minimising the predicted recompute time under the budget,
exactly: a multiple-choice knapsack solved by dynamic programming over the bytes held by the blocks
before (states that another state beats on both bytes and time are dropped, which loses no optimum).

What the budget covers is the peak of activation bytes over the step (storages operators create,
parameters, buffers and parameter gradients excluded; :func:`fsdp_ac.profiler.peak_bytes` measures
it), modelled as the largest of:

- the end of forward, loss and the head's backward: the bytes created outside the blocks, each
  block's held bytes for its choice, and the head's and loss's backward on top
  (:attr:`~fsdp_ac.profiler.Profile.head_backward_bytes`); and
- each block's recompute and backward: what was created before the block (outside bytes and earlier
  blocks' held bytes; later blocks have been freed by then), everything the block holds without
  checkpointing (the recompute rebuilds it), saved outputs that backward does not read, and what its
  backward adds (:attr:`~fsdp_ac.profiler.BlockProfile.backward_bytes`, the same for every strategy);

both with the inputs that checkpoints keep (:attr:`~fsdp_ac.profiler.Profile.kept_inputs`), from the
first checkpointed block that takes them on.

docs/planning.md says how close the model comes to the measured peak.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fsdp_ac.plan import ActivationPlan, PlanOrigin
from fsdp_ac.profiler import BlockProfile, Profile, text_table

__all__ = [
    "BlockChoice",
    "BudgetError",
    "MemoryPlan",
    "block_options",
    "budget_needed",
    "plan",
    "smallest_budget",
    "solve",
]

MAX_ENUMERATED_CALLS = 12
"""Blocks with more matmul and attention calls than this get a greedy curve instead of every subset."""


class BudgetError(ValueError):
    """The budget is below what any plan needs; :attr:`smallest` is the least budget that fits."""

    def __init__(self, message: str, smallest: int) -> None:
        super().__init__(message)
        self.smallest = smallest


@dataclass(frozen=True)
class BlockChoice:
    """One point on a block's memory/time curve."""

    saved: tuple[str, ...] | None
    """None: no checkpointing; ``()``: full checkpointing; otherwise the calls whose outputs are saved
    (``"aten.addmm.default#0"``) under selective checkpointing."""
    held_bytes: int
    """Bytes the block holds at the end of forward."""
    recompute_bytes: int
    """Bytes alive for the block while backward recomputes it and runs its backward (its no-AC bytes,
    saved outputs that backward does not read, and its backward's own)."""
    extra_ms: float
    """Predicted recompute time."""

    @property
    def strategy(self) -> str:
        """The :class:`~fsdp_ac.ActivationPlan` strategy string."""
        if self.saved is None:
            return "none"
        if not self.saved:
            return "full"
        return "selective:" + ",".join(self.saved)


def block_options(block: BlockProfile, max_calls: int = MAX_ENUMERATED_CALLS) -> list[BlockChoice]:
    """The block's curve: no checkpointing, full, and selective subsets, dominated points dropped.

    Args:
        block: The block's profile.
        max_calls: Up to this many saveable calls, every subset is tried; beyond it, the calls are
            added one at a time, most recompute time per byte first.

    Returns:
        The non-dominated points, fewest bytes held first.
    """
    ops = block.ops
    if len(ops) <= max_calls:
        subsets: list[tuple[int, ...]] = [
            combo for size in range(len(ops) + 1) for combo in itertools.combinations(range(len(ops)), size)
        ]
    else:
        ranked = sorted(range(len(ops)), key=lambda i: -ops[i].recompute_ms / max(ops[i].bytes, 1))
        subsets = [tuple(sorted(ranked[:size])) for size in range(len(ops) + 1)]
    backward = block.backward_bytes  # the same under every strategy
    points = [BlockChoice(None, block.none_bytes, block.none_bytes + backward, 0.0)]
    for subset in subsets:
        saved_bytes = sum(ops[i].bytes for i in subset)
        unread = sum(ops[i].bytes for i in subset if not ops[i].read_by_backward)
        points.append(
            BlockChoice(
                saved=tuple(ops[i].name for i in subset),
                held_bytes=block.kept_bytes + saved_bytes,
                recompute_bytes=block.none_bytes + unread + backward,
                extra_ms=block.other_ms + sum(op.recompute_ms for i, op in enumerate(ops) if i not in subset),
            )
        )
    return _frontier(points)


def _frontier(points: list[BlockChoice]) -> list[BlockChoice]:
    """Drops every point another beats or equals on bytes held, bytes at recompute and time."""
    ordered = sorted(points, key=lambda p: (p.held_bytes, p.extra_ms, p.recompute_bytes))
    kept: list[BlockChoice] = []
    for point in ordered:
        if not any(
            k.held_bytes <= point.held_bytes
            and k.recompute_bytes <= point.recompute_bytes
            and k.extra_ms <= point.extra_ms
            for k in kept
        ):
            kept.append(point)
    return kept


def budget_needed(held: Sequence[int], recompute: Sequence[int], before: Sequence[int], outside: int) -> int:
    """The bytes a budget must cover (see the module docstring), from per-block figures.

    Args:
        held: Per block in forward order, the bytes it holds at the end of forward.
        recompute: Per block, the bytes alive for it while backward recomputes it (for a block that is
            not checkpointed, its held bytes).
        before: Per block, the bytes created outside the blocks before it.
        outside: All bytes created outside the blocks.

    Example:
        A fixed strategy measured block by block (:func:`fsdp_ac.profiler.block_bytes`) needs
        ``budget_needed(held, [max(h, n) for h, n in zip(held, no_ac_held)], before, outside)``.
    """
    peak, prefix = 0, 0
    for i, (kept, rebuilt) in enumerate(zip(held, recompute, strict=True)):
        peak = max(peak, before[i] + prefix + rebuilt)
        prefix += kept
    return max(peak, outside + prefix)


def _peak(
    options: Sequence[Sequence[BlockChoice]], before: Sequence[int], outside: int, picks: Sequence[int]
) -> int:
    """The bytes the budget must cover for one choice per block."""
    chosen = [options[i][pick] for i, pick in enumerate(picks)]
    return budget_needed([c.held_bytes for c in chosen], [c.recompute_bytes for c in chosen], before, outside)


LATTICE_LIMIT = 1 << 20
"""Most multiples of the bytes' common divisor up to the budget for which :func:`solve` runs the dense
programme; beyond it, the frontier one."""


def solve(
    options: Sequence[Sequence[BlockChoice]],
    before: Sequence[int],
    outside: int,
    budget: int,
    lattice_limit: int = LATTICE_LIMIT,
) -> list[int] | None:
    """Picks one option per block minimising the summed ``extra_ms`` within ``budget``; exact.

    Dynamic programming over the blocks in forward order, the state being the bytes the blocks so far
    hold: a block's options are allowed when the bytes at its recompute fit, and at the end when all
    held bytes fit. Where the bytes share a common divisor that leaves at most ``lattice_limit``
    states up to the budget, the least time for each state is kept in one dense array (the work grows
    linearly with the blocks); otherwise only the frontier of states is kept: of two states, one with
    no more bytes and no more time makes the other useless, as every later constraint only gets harder
    with more bytes.

    Args:
        options: Per block, its options.
        before: Per block, the bytes created outside the blocks before it.
        outside: All bytes created outside the blocks.
        budget: The bytes allowed.
        lattice_limit: See above.

    Returns:
        The index of the chosen option per block, or None when nothing fits.
    """
    arrays = [
        (
            torch.tensor([c.held_bytes for c in block], dtype=torch.int64),
            torch.tensor([c.recompute_bytes for c in block], dtype=torch.int64),
            torch.tensor([c.extra_ms for c in block], dtype=torch.float64),
        )
        for block in options
    ]
    unit = math.gcd(*(int(x) for h, r, _ in arrays for x in (*h.tolist(), *r.tolist())))
    if budget < outside:
        return None
    if unit and (budget - outside) // unit <= lattice_limit:
        return _lattice_dp(arrays, before, outside, budget, unit)
    return _frontier_dp(arrays, before, outside, budget)


def _lattice_dp(
    arrays: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    before: Sequence[int],
    outside: int,
    budget: int,
    unit: int,
) -> list[int] | None:
    """The dense programme: per multiple of ``unit`` held so far, the least time and the option taken.

    After block i the held bytes lie between the blocks' least and most so far, and leave room for the
    later blocks' least: only that window is kept (``best[j]`` is for ``low + j`` units).
    """
    steps = [(h // unit).tolist() for h, _, _ in arrays]
    least = [min(s) for s in steps]
    top = (budget - outside) // unit  # held bytes only grow, and must fit the end of forward
    low, best = 0, torch.zeros(1, dtype=torch.float64)
    back = []
    for i, (_, r, t) in enumerate(arrays):
        new_low = low + least[i]
        new_high = min(low + len(best) - 1 + max(steps[i]), top - sum(least[i + 1 :]))
        if new_high < new_low:
            return None
        grown = torch.full((new_high - new_low + 1,), math.inf, dtype=torch.float64)
        taken = torch.full_like(grown, -1, dtype=torch.int16)
        for k, (step, rebuilt, ms) in enumerate(zip(steps[i], r.tolist(), t.tolist(), strict=True)):
            # sources: held low + j, with low + j + step <= new_high and low + j fitting the recompute
            sources = min(new_high - step, (budget - before[i] - rebuilt) // unit) - low + 1
            sources = min(sources, len(best))
            if sources <= 0:
                continue
            start = low + step - new_low
            target = grown[start : start + sources]
            candidate = best[:sources] + ms
            taken[start : start + sources].masked_fill_(candidate < target, k)
            torch.minimum(target, candidate, out=target)
        low, best = new_low, grown
        back.append(taken)
    if math.isinf(float(best.min())):
        return None
    index = int(torch.argmin(best)) + low
    picks = []
    for held, taken, floor in zip(reversed(steps), reversed(back), reversed(_lows(least)), strict=True):
        k = int(taken[index - floor])
        picks.append(k)
        index -= held[k]
    return picks[::-1]


def _lows(least: list[int]) -> list[int]:
    """The lowest held units after each block."""
    return list(itertools.accumulate(least))


def _frontier_dp(
    arrays: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    before: Sequence[int],
    outside: int,
    budget: int,
) -> list[int] | None:
    """The frontier programme: only states that no other beats on both bytes and time are kept."""
    held = torch.zeros(1, dtype=torch.int64)
    ms = torch.zeros(1, dtype=torch.float64)
    back = []
    for i, (h, r, t) in enumerate(arrays):
        fits = (held[:, None] + r[None, :] <= budget - before[i]) & (
            held[:, None] + h[None, :] <= budget - outside
        )
        source, option = fits.nonzero(as_tuple=True)
        grown_held, grown_ms = held[source] + h[option], ms[source] + t[option]
        if not len(source):
            return None
        order = torch.sort(grown_ms, stable=True).indices
        order = order[torch.sort(grown_held[order], stable=True).indices]
        grown_held, grown_ms, source, option = (x[order] for x in (grown_held, grown_ms, source, option))
        keep = torch.ones(len(order), dtype=torch.bool)
        keep[1:] = grown_ms[1:] < torch.cummin(grown_ms, 0).values[:-1]
        held, ms = grown_held[keep], grown_ms[keep]
        back.append((source[keep], option[keep]))
    index = int(torch.argmin(ms))  # every state fits the end of forward
    picks = []
    for source, option in reversed(back):
        picks.append(int(option[index]))
        index = int(source[index])
    return picks[::-1]


@dataclass(frozen=True)
class MemoryPlan:
    """The planner's result: a choice per block and what it predicts."""

    budget_bytes: int
    """The budget planned for."""
    choices: dict[str, BlockChoice]
    """Per block name, in forward order."""
    predicted_bytes: int
    """Bytes held at the end of forward and loss."""
    predicted_peak_bytes: int
    """The predicted peak over the step: what the budget covers (see the module docstring)."""
    predicted_extra_ms: float
    """Predicted recompute time per step."""
    no_ac_bytes: int
    """Bytes held without checkpointing."""
    step_ms: float
    """Measured step time without checkpointing."""
    origin: PlanOrigin | None = None
    """What the profile was made for; the activation plan carries it."""

    @property
    def predicted_memory_ratio(self) -> float:
        """Predicted held bytes as a fraction of no AC's."""
        return self.predicted_bytes / self.no_ac_bytes

    @property
    def predicted_time_ratio(self) -> float:
        """Predicted step time as a multiple of no AC's."""
        return (self.step_ms + self.predicted_extra_ms) / self.step_ms

    def to_activation_plan(self) -> ActivationPlan:
        """The plan to apply: each block's strategy (``none``, ``full`` or ``selective:<calls>``)."""
        return ActivationPlan({name: choice.strategy for name, choice in self.choices.items()}, self.origin)

    def to_json(self) -> dict[str, Any]:
        """The plan and its predictions as a JSON-ready dictionary.

        Its ``activation_plan`` is what :meth:`fsdp_ac.ActivationPlan.from_json` reads.
        """
        return {
            "budget_bytes": self.budget_bytes,
            "predicted_bytes": self.predicted_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_memory_ratio": self.predicted_memory_ratio,
            "predicted_time_ratio": self.predicted_time_ratio,
            "predicted_extra_ms": self.predicted_extra_ms,
            "no_ac_bytes": self.no_ac_bytes,
            "step_ms": self.step_ms,
            "blocks": {
                name: {"strategy": c.strategy, "held_bytes": c.held_bytes, "extra_ms": c.extra_ms}
                for name, c in self.choices.items()
            },
            "activation_plan": json.loads(self.to_activation_plan().to_json()),
        }

    def table(self) -> str:
        """The plan as a text table, one block per row, with the predictions below."""
        rows = [
            [name, f"{c.held_bytes / 2**20:.2f}", f"{c.extra_ms:.1f}", c.strategy]
            for name, c in self.choices.items()
        ]
        predictions = (
            f"budget {self.budget_bytes / 2**20:.2f} MiB: held {self.predicted_bytes / 2**20:.2f} MiB "
            f"(memory ratio {self.predicted_memory_ratio:.3f}), peak over the step "
            f"{self.predicted_peak_bytes / 2**20:.2f} MiB; "
            f"predicted time ratio {self.predicted_time_ratio:.3f}"
        )
        return text_table(["block", "held_MiB", "recompute_ms", "strategy"], rows) + "\n" + predictions


def _end(profile: Profile) -> int:
    """Bytes besides the blocks' held ones at the end of forward and in the head's backward."""
    return profile.outside_bytes + profile.head_backward_bytes


def _curves(profile: Profile) -> list[list[BlockChoice]]:
    """Every block's curve, computed once for blocks with the same figures."""
    curves: dict[tuple[Any, ...], list[BlockChoice]] = {}
    keys = [(b.none_bytes, b.kept_bytes, b.ops, b.other_ms) for b in profile.blocks]
    for key, block in zip(keys, profile.blocks, strict=True):
        if key not in curves:
            curves[key] = block_options(block)
    return [curves[key] for key in keys]


def _budget_bytes(profile: Profile, budget: int | float) -> int:
    if isinstance(budget, float):
        if not 0 < budget:
            raise ValueError(f"A budget fraction must be positive, got {budget}.")
        return int(budget * profile.no_ac_bytes)
    if budget <= 0:
        raise ValueError(f"A budget in bytes must be positive, got {budget}.")
    return budget


def _kept_inputs(profile: Profile, chosen: Sequence[BlockChoice]) -> tuple[list[int], int]:
    """Bytes of inputs that checkpoints keep, at each block's recompute and at the end of forward."""
    at, end = [0] * len(chosen), 0
    for nbytes, blocks in profile.kept_inputs:
        first = min((i for i in blocks if chosen[i].saved is not None), default=len(chosen))
        end += nbytes if first < len(chosen) else 0
        at[first:] = [a + nbytes for a in at[first:]]
    return at, end


def _predicted_peak(profile: Profile, options: Sequence[Sequence[BlockChoice]], picks: Sequence[int]) -> int:
    """:func:`_peak` with the inputs that the chosen checkpoints keep."""
    at, end = _kept_inputs(profile, [options[i][pick] for i, pick in enumerate(picks)])
    before = [b + a for b, a in zip(profile.outside_before, at, strict=True)]
    return _peak(options, before, _end(profile) + end, picks)


def smallest_budget(profile: Profile) -> int:
    """The least budget any plan fits: full checkpointing of every block.

    Full checkpointing holds the fewest bytes in each block, and no option needs fewer bytes at its
    recompute than the block's no-AC bytes, which full needs; so no plan needs less.
    """
    options = _curves(profile)
    return _predicted_peak(profile, options, _least_held(options))


def _least_held(options: Sequence[Sequence[BlockChoice]]) -> list[int]:
    """Per block, the option that holds the fewest bytes: full checkpointing."""
    return [min(range(len(c)), key=lambda k: (c[k].held_bytes, c[k].recompute_bytes)) for c in options]


def plan(profile: Profile, budget: int | float) -> MemoryPlan:
    """Chooses per block what to save so that the activations fit ``budget`` at the least recompute.

    Args:
        profile: From :func:`fsdp_ac.profiler.profile`.
        budget: Bytes (an int), or a fraction of no AC's activation bytes (a float, e.g. ``0.5``).

    Returns:
        The :class:`MemoryPlan`; apply it with ``result.to_activation_plan().apply(model)``.

    Raises:
        BudgetError: No plan fits; the message and ``.smallest`` give the least budget that does.
        ValueError: ``budget`` is not positive.

    Example:
        >>> result = plan(profile(workload), 0.5)
        >>> print(result.table())
        >>> result.to_activation_plan().apply(workload.model)
    """
    budget_bytes = _budget_bytes(profile, budget)
    options = _curves(profile)
    picks = solve(options, profile.outside_before, _end(profile), budget_bytes)
    if picks is not None and _predicted_peak(profile, options, picks) > budget_bytes:
        # The kept inputs pushed the optimum over: plan as if they were held all through (a few bytes
        # of positions or masks: the plan may recompute a little more than it needs to).
        kept = sum(nbytes for nbytes, _ in profile.kept_inputs)
        before = [b + kept for b in profile.outside_before]
        picks = solve(options, before, _end(profile) + kept, budget_bytes)
        if picks is None and _predicted_peak(profile, options, _least_held(options)) <= budget_bytes:
            picks = _least_held(options)
    if picks is None:
        smallest = smallest_budget(profile)
        raise BudgetError(
            f"No plan fits {budget_bytes:,} bytes ({budget_bytes / profile.no_ac_bytes:.3f} of no AC's "
            f"{profile.no_ac_bytes:,}) at the peak of the step: even full checkpointing of every block "
            f"needs {smallest:,} bytes ({smallest / profile.no_ac_bytes:.3f}), of which the head and loss "
            f"backward adds {profile.head_backward_bytes:,} that no plan changes. Give a budget of at "
            "least that, or a smaller batch.",
            smallest,
        )
    chosen = [options[i][pick] for i, pick in enumerate(picks)]
    return MemoryPlan(
        budget_bytes=budget_bytes,
        choices={b.name: c for b, c in zip(profile.blocks, chosen, strict=True)},
        predicted_bytes=profile.outside_bytes
        + sum(c.held_bytes for c in chosen)
        + _kept_inputs(profile, chosen)[1],
        predicted_peak_bytes=_predicted_peak(profile, options, picks),
        predicted_extra_ms=sum(c.extra_ms for c in chosen),
        no_ac_bytes=profile.no_ac_bytes,
        step_ms=profile.step_ms,
        origin=profile.origin,
    )
