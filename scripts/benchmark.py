"""Benchmarks activation checkpointing: step time and activation memory, and fsdp_ac's costs against torch's.

Run it as ``make bench`` (``python scripts/benchmark.py``). It has four parts, each a set of records;
``--only`` runs some of them (``--only overhead,state_dict`` takes seconds):

- ``steps``: AC variants of the reference GPT, then of a Llama-style decoder (``transformers``'
  ``LlamaForCausalLM``, records ``llama/<name>``; ``--model`` picks one, or a user's model given as
  ``package.module:factory``), including the memory planner's plans for 25%, 50% and 75% of no AC's
  activation bytes (``fsdp_ac_plan_<percent>``, planned from one profile of the model in the run).
  Every variant is a copy of one model (same weights, same batch) run in this one process. A step
  is the forward, the loss and the backward (what activation checkpointing changes). The activation
  memory is what the forward and the loss hold for backward, measured deterministically by
  :class:`fsdp_ac.ActivationMemoryMeter` on a separate step, whose gradients are also compared
  bitwise with those of ``no_ac``.
- ``overhead``: the cost of a wrapper per call: forward and backward of a 2-layer MLP of width 64 on a
  batch of 8, unwrapped, in torch's ``checkpoint_wrapper`` and in fsdp_ac's. The module is small so
  that the wrapper's own work, not the arithmetic, decides the ratio.
- ``state_dict``: ``state_dict()`` and ``load_state_dict()`` of a model of 24 and of 96 blocks (two
  Linear layers each), without wrappers, with torch's wrapper on every block and with fsdp_ac's.
- ``solve``: the planner's CPU time (options and solve) for 128 alike Llama-style blocks, from a
  profile built from their shapes, at budgets of 25%, 50% and 75%; the target is at most 1 s each.

Each timed round runs every variant once, in an order that rotates from round to round, so that
machine noise hits all variants alike; a variant's time is its median over the rounds. By default the
time is the process CPU time with one thread: on a small shared machine, wall time also counts the
time other processes hold the cores, which is noise to this comparison; ``--clock wall`` measures
wall time instead.

``--json PATH`` writes ``{"steps": [...], "costs": [...], "solve": [...]}``: step records
``{"name", "time_ratio", "memory_ratio", "step_ms", "activation_bytes", "budget_ratio"}`` (ratios to
``no_ac``; the planner's also ``"predicted_memory_ratio"``), cost records ``{"name", "blocks",
"plain_us", "torch_us", "fsdp_ac_us", "ratio", "target"}`` (ratio: fsdp_ac to torch) and solve
records ``{"blocks", "budget_fraction", "cpu_s", "target_s"}``. ``--png PATH`` draws every variant's
time against its memory (needs matplotlib). ``--check`` exits with status 1 when a target is missed
(every time target is an upper bound: faster is met): ``fsdp_ac_full`` holds no more memory than
``torch_full`` at a time ratio at most 3% above it, ``fsdp_ac_selective`` holds at most 0.60 of
``no_ac``'s memory at a time ratio of at most 1.06; the plans for 25%, 50% and 75% hold at most that
at time ratios of at most 1.20, 1.08 and 1.035, ``llama/fsdp_ac_plan_50`` at most 0.50 at 1.10;
each plan's time is at most 2% above the fastest fixed variant of its model whose ``budget_ratio``
fits the plan's budget, and its predicted memory ratio is within 5% of the measured one; a call
through fsdp_ac's wrapper takes at most 1.10 times as long as through torch's, and ``state_dict()``
and ``load_state_dict()`` of the 96-block model at most 1.25 times as long.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers

from fsdp_ac import (
    ActivationMemoryMeter,
    ModulePolicy,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from fsdp_ac.__main__ import BUILTINS, workload_from_args
from fsdp_ac.planner import BudgetError, MemoryPlan, plan
from fsdp_ac.profiler import BlockProfile, OpProfile, Profile, Workload, peak_bytes, profile
from fsdp_ac.report import silenced

MIB = 2**20


def _torch_full(model: nn.Module, blocks: ModulePolicy) -> None:
    """Wraps every block of ``model`` in torch's own (non-reentrant) ``checkpoint_wrapper``."""
    modules = dict(model.named_modules())
    selected = {id(modules[name]) for name in blocks.names(model)}
    torch_wrappers.apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(
            torch_wrappers.checkpoint_wrapper, checkpoint_impl=torch_wrappers.CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: id(m) in selected,
    )


def _selective(preset: str) -> Callable[[nn.Module, ModulePolicy], None]:
    return lambda model, blocks: apply_activation_checkpointing(
        model, SelectiveCheckpoint(preset), auto_wrap_policy=blocks
    )


VARIANTS: dict[str, Callable[[nn.Module, ModulePolicy], None]] = {
    "no_ac": lambda model, blocks: None,
    "torch_full": _torch_full,
    "fsdp_ac_full": lambda model, blocks: apply_activation_checkpointing(model, auto_wrap_policy=blocks),
    "fsdp_ac_every_2": lambda model, blocks: apply_activation_checkpointing(
        model, auto_wrap_policy=blocks.every(2)
    ),
    "torchtitan_op_sac": _selective("torchtitan"),
    "fsdp_ac_selective": _selective("default"),
    "fsdp_ac_matmul_sac": _selective("matmul"),
}
"""How each fixed variant checkpoints the model's blocks; ``no_ac`` is the reference for the ratios."""

PLANS: dict[str, float] = {"fsdp_ac_plan_25": 0.25, "fsdp_ac_plan_50": 0.50, "fsdp_ac_plan_75": 0.75}
"""The planner's variants: the budget as a fraction of no AC's activation bytes."""

ALL_VARIANTS = [*VARIANTS, *PLANS]

DEFAULT_VARIANTS = [name for name in ALL_VARIANTS if name != "fsdp_ac_matmul_sac"]
"""What a plain run measures; ``--variants all`` adds the save-every-matmul preset for comparison."""

LLAMA_VARIANTS = ["no_ac", "fsdp_ac_full", "torchtitan_op_sac", "fsdp_ac_selective", "fsdp_ac_plan_50"]
"""What the second reference model (``llama/<name>`` records) runs."""

LLAMA_SIZES = {"layers": 4, "d_model": 512, "heads": 8, "seq": 256, "batch": 4, "vocab": 512}
"""The Llama-style reference model: 4 decoder layers, hidden 512, 8 heads, sequence 256, batch 4."""

PROFILE_REPEATS = 3
"""Profiled steps whose median times the planner uses."""

PLAN_TARGETS: dict[str, tuple[float, float]] = {
    "fsdp_ac_plan_25": (0.25, 1.20),
    "fsdp_ac_plan_50": (0.50, 1.08),
    "fsdp_ac_plan_75": (0.75, 1.035),
    "llama/fsdp_ac_plan_50": (0.50, 1.10),
}
"""Per plan record: the most memory (ratio to no AC) and time (ratio) it may take."""


@dataclass(frozen=True)
class Record:
    """One row of the result, as ``--json`` writes it."""

    name: str
    """Variant name (a key of VARIANTS)."""
    time_ratio: float
    """Median step time divided by no_ac's."""
    memory_ratio: float
    """Activation bytes divided by no_ac's."""
    step_ms: float
    """Median step time in milliseconds (of the clock chosen with --clock)."""
    activation_bytes: int
    """Bytes the forward and the loss hold for backward."""
    budget_ratio: float
    """The least budget the variant fits: its measured peak of activation bytes over a step (forward,
    loss and backward; ``fsdp_ac.profiler.peak_bytes``), divided by no_ac's activation bytes: what
    "fits a budget" means for every variant alike."""
    predicted_memory_ratio: float | None = None
    """For the planner's variants: the memory ratio the plan predicted (written only for them)."""

    def to_json(self) -> dict[str, object]:
        """The record as ``--json`` writes it: ``predicted_memory_ratio`` only where there is one."""
        record = asdict(self)
        if self.predicted_memory_ratio is None:
            del record["predicted_memory_ratio"]
        return record


PARTS = ("steps", "overhead", "state_dict", "solve")
"""The parts of the benchmark, in the order they run; ``--only`` picks some."""

COST_VARIANTS = ("plain", "torch", "fsdp_ac")
"""The module unwrapped, in torch's ``checkpoint_wrapper`` and in fsdp_ac's."""

OVERHEAD_WIDTH, OVERHEAD_BATCH, OVERHEAD_CALLS = 64, 8, 20
"""The MLP of the overhead record, its batch, and how many calls one timed sample makes."""

STATE_DICT_BLOCKS, STATE_DICT_WIDTH = (24, 96), 32
"""Sizes of the state-dict model (the targets apply to the largest) and the width of its layers."""

COST_WARMUP = 10
"""Untimed rounds before each cost record's timed ones."""

OVERHEAD_TARGET, STATE_DICT_TARGET = 1.10, 1.25
"""Most that fsdp_ac may take, as a multiple of torch's time: per call, and per state-dict call."""


@dataclass(frozen=True)
class CostRecord:
    """One cost of fsdp_ac's wrapper against torch's, as ``--json`` writes it."""

    name: str
    """``forward_backward``, ``state_dict`` or ``load_state_dict``."""
    blocks: int | None
    """Wrapped blocks in the model; None for the per-call record."""
    plain_us: float
    """Median microseconds per call without wrappers."""
    torch_us: float
    """The same with torch's ``checkpoint_wrapper``."""
    fsdp_ac_us: float
    """The same with fsdp_ac's ``checkpoint_wrapper``."""
    ratio: float
    """fsdp_ac_us divided by torch_us."""
    target: float | None
    """Largest ratio that meets the target; None where there is none (the smaller state-dict model)."""


class StackedBlock(nn.Module):
    """A block of the state-dict model: two Linear layers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def stacked_model(blocks: int, width: int = STATE_DICT_WIDTH) -> nn.Module:
    """An input layer, ``blocks`` blocks in a ModuleList and an output layer: how deep models nest."""
    return nn.ModuleDict(
        {
            "embed": nn.Linear(width, width),
            "layers": nn.ModuleList(StackedBlock(width) for _ in range(blocks)),
            "head": nn.Linear(width, width),
        }
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; the defaults are the reference model of the benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="reference",
        help="'reference' (the GPT, then the Llama-style model as llama/<name> when transformers is "
        "installed), 'gpt', 'llama', or package.module:factory with --block and --shape",
    )
    parser.add_argument(
        "--block", help="with --model package.module:factory: block class names, comma-separated"
    )
    parser.add_argument("--shape", help="with --model package.module:factory: input shape, e.g. 4,256")
    parser.add_argument(
        "--dtype", help="with --model package.module:factory: input dtype (default: tokens if it embeds)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu; cuda times wall time)")
    parser.add_argument(
        "--png", metavar="PATH", help="draw the memory/time plot of every variant (needs matplotlib)"
    )
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (default: 8)")
    parser.add_argument("--d-model", type=int, default=512, help="residual width (default: 512)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length (default: 256)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size (default: 512)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (default: 11)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="step time: process CPU time or wall time"
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"'all', or a comma-separated subset of {', '.join(ALL_VARIANTS)} (no_ac always runs)",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"a comma-separated subset of {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--cost-repeats",
        type=int,
        default=201,
        help="timed rounds of the overhead and state_dict parts (default: 201)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the records to PATH as JSON")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.variants == "all":
        args.variants = ",".join(ALL_VARIANTS)
    unknown = [v for v in args.variants.split(",") if v not in ALL_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {ALL_VARIANTS}")
    if args.model not in ("reference", *BUILTINS) and ":" not in args.model:
        parser.error(f"--model: use 'reference', one of {BUILTINS}, or package.module:factory")
    if args.device.startswith("cuda"):
        args.clock = "wall"  # kernels run asynchronously; the step synchronises and wall time counts them
    unknown = [part for part in args.only.split(",") if part not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.repeats < 1 or args.cost_repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats, --cost-repeats and --threads must be >= 1 and --warmup >= 0")
    return args


def clocked(fn: Callable[[], object], calls: int = 1) -> tuple[float, float]:
    """Runs ``fn`` ``calls`` times; returns the (CPU, wall) time of one call in milliseconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu * 1e3 / calls, wall * 1e3 / calls


def timed_step(workload: Workload, model: nn.Module) -> tuple[float, float]:
    """Runs one forward, loss and backward; returns its (CPU, wall) time in milliseconds."""

    def step() -> None:
        workload.loss(model, workload.batch).backward()
        if workload.batch.is_cuda:
            torch.cuda.synchronize()

    times = clocked(step)
    model.zero_grad(set_to_none=True)
    return times


def interleaved(
    names: Sequence[str], rounds: int, timed: Callable[[str], tuple[float, float]]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times every variant once per round; returns each variant's (CPU, wall) times, one per round.

    Each round starts one variant later than the round before, so that machine noise hits all
    variants alike.

    Args:
        names: The variants.
        rounds: How many rounds to run.
        timed: Runs one variant and returns its (CPU, wall) time.
    """
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    # A garbage collection inside a timed call would be charged to whichever variant ran it, so the
    # collector runs between rounds only. With automatic collection off, what a round leaves behind
    # stays in the youngest generation: collecting that one is enough, and takes microseconds where
    # a full collection takes about 0.1 s, longer than a round of the cost records.
    gc.collect()
    for i in range(rounds):
        gc.collect(0)
        gc.disable()
        try:
            for name in [*names[i % len(names) :], *names[: i % len(names)]]:
                c, w = timed(name)
                cpu[name].append(c)
                wall[name].append(w)
        finally:
            gc.enable()
    return cpu, wall


def metered_step(workload: Workload, model: nn.Module) -> tuple[int, list[torch.Tensor | None]]:
    """Runs one step measuring the activation bytes; returns them and the gradients in order."""
    with ActivationMemoryMeter(model) as meter:
        loss = workload.loss(model, workload.batch)
    loss.backward()
    # By position: torch's own wrappers change parameter names, never their order.
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return meter.held_bytes, grads


def reference_workloads(args: argparse.Namespace) -> list[tuple[str, Workload, list[str]]]:
    """The models ``--model`` names: (record prefix, workload, variants) for each."""
    gpt_sizes = {"layers": args.layers, "d_model": args.d_model, "heads": args.heads, "seq": args.seq}
    gpt_sizes |= {"batch": args.batch, "vocab": args.vocab}
    chosen = args.variants.split(",")
    runs = []
    if args.model in ("reference", "gpt"):
        runs.append(("", "gpt", gpt_sizes, chosen))
    if args.model in ("reference", "llama"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            if args.model == "llama":
                raise
            print("transformers is not installed: the Llama-style model (llama/<name> records) is skipped.")
        else:
            runs.append(("llama/", "llama", LLAMA_SIZES, [v for v in LLAMA_VARIANTS if v in chosen]))
    workloads = []
    for prefix, model, sizes, variants in runs:
        options = argparse.Namespace(
            model=model, device=args.device, block=None, shape=None, dtype=None, **sizes
        )
        workloads.append((prefix, workload_from_args(options), variants))
    if ":" in args.model:
        options = argparse.Namespace(**{**vars(args), "layers": None})
        workloads.append(("", workload_from_args(options), chosen))
    return workloads


def run(
    args: argparse.Namespace, workload: Workload, variants: Sequence[str], prefix: str = ""
) -> tuple[list[Record], dict[str, float], dict[str, bool], list[tuple[str, bool]]]:
    """Builds the variants, measures them interleaved.

    The planner's variants are planned from one profile of the model (:mod:`fsdp_ac.profiler`); a
    budget no plan fits skips its variant and counts as a missed target.

    Returns:
        The records, each variant's median wall time, whether its gradients equal no AC's, and the
        planner's variants that could not be planned as missed targets.
    """
    blocks = ModulePolicy(workload.blocks)
    names = ["no_ac", *(v for v in variants if v != "no_ac")]
    plans: dict[str, MemoryPlan] = {}
    unplanned: list[tuple[str, bool]] = []
    measured: Profile | None = None
    for name in [n for n in names if n in PLANS]:
        if measured is None:
            measured = profile(workload, repeats=PROFILE_REPEATS, strategies=())
        try:
            plans[name] = plan(measured, PLANS[name])
        except BudgetError as error:
            unplanned.append((f"{prefix}{name}: {error}", False))
            names.remove(name)
    models: dict[str, nn.Module] = {}
    for name in names:
        models[name] = copy.deepcopy(workload.model)
        if name in plans:
            plans[name].to_activation_plan().apply(models[name])
        else:
            VARIANTS[name](models[name], blocks)

    def timed(name: str) -> tuple[float, float]:
        return timed_step(workload, models[name])

    interleaved(names, args.warmup, timed)
    held: dict[str, int] = {}
    grads_equal: dict[str, bool] = {}
    expected: list[torch.Tensor | None] = []
    for name in names:
        held[name], grads = metered_step(workload, models[name])
        expected = expected or grads
        grads_equal[prefix + name] = len(grads) == len(expected) and all(
            g is not None and e is not None and torch.equal(g, e)
            for g, e in zip(grads, expected, strict=False)
        )
    needed = {name: peak_bytes(workload, models[name]) for name in names}
    cpu, wall = interleaved(names, args.repeats, timed)
    chosen = cpu if args.clock == "cpu" else wall
    step = {name: statistics.median(chosen[name]) for name in names}
    records = [
        Record(
            name=prefix + name,
            time_ratio=step[name] / step["no_ac"],
            memory_ratio=held[name] / held["no_ac"],
            step_ms=step[name],
            activation_bytes=held[name],
            budget_ratio=needed[name] / held["no_ac"],
            predicted_memory_ratio=plans[name].predicted_memory_ratio if name in plans else None,
        )
        for name in names
    ]
    wall_ms = {prefix + name: statistics.median(wall[name]) for name in names}
    return records, wall_ms, grads_equal, unplanned


def cost_record(
    args: argparse.Namespace,
    name: str,
    blocks: int | None,
    calls: Mapping[str, Callable[[], object]],
    calls_per_sample: int,
    target: float | None,
) -> CostRecord:
    """Times one call of each of COST_VARIANTS, interleaved, and returns the record."""

    def timed(variant: str) -> tuple[float, float]:
        return clocked(calls[variant], calls_per_sample)

    interleaved(COST_VARIANTS, COST_WARMUP, timed)
    cpu, wall = interleaved(COST_VARIANTS, args.cost_repeats, timed)
    chosen = cpu if args.clock == "cpu" else wall
    us = {variant: statistics.median(chosen[variant]) * 1e3 for variant in COST_VARIANTS}
    return CostRecord(
        name=name,
        blocks=blocks,
        plain_us=us["plain"],
        torch_us=us["torch"],
        fsdp_ac_us=us["fsdp_ac"],
        ratio=us["fsdp_ac"] / us["torch"],
        target=target,
    )


def forward_backward(module: nn.Module, x: torch.Tensor) -> None:
    """One forward and backward of ``module``; gradients accumulate, the same work for every variant."""
    module(x).sum().backward()


def overhead_records(args: argparse.Namespace) -> list[CostRecord]:
    """The per-call record: forward and backward of a small MLP through each wrapper."""
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(OVERHEAD_WIDTH, OVERHEAD_WIDTH), nn.ReLU(), nn.Linear(OVERHEAD_WIDTH, OVERHEAD_WIDTH)
    )
    modules = {
        "plain": mlp,
        "torch": torch_wrappers.checkpoint_wrapper(copy.deepcopy(mlp)),
        "fsdp_ac": checkpoint_wrapper(copy.deepcopy(mlp)),
    }
    x = torch.randn(OVERHEAD_BATCH, OVERHEAD_WIDTH)
    calls = {variant: partial(forward_backward, module, x) for variant, module in modules.items()}
    return [cost_record(args, "forward_backward", None, calls, OVERHEAD_CALLS, OVERHEAD_TARGET)]


def state_dict_records(args: argparse.Namespace) -> list[CostRecord]:
    """``state_dict()`` and ``load_state_dict()`` of the stacked model at each size, per variant."""
    records = []
    for blocks in STATE_DICT_BLOCKS:
        torch.manual_seed(0)
        plain = stacked_model(blocks)
        torch_wrapped, fsdp_ac_wrapped = copy.deepcopy(plain), copy.deepcopy(plain)
        _torch_full(torch_wrapped, ModulePolicy({StackedBlock}))
        apply_activation_checkpointing(fsdp_ac_wrapped, auto_wrap_policy=ModulePolicy({StackedBlock}))
        models = {"plain": plain, "torch": torch_wrapped, "fsdp_ac": fsdp_ac_wrapped}
        # Clean keys, which every variant loads: what a plain model or fsdp_ac writes.
        state = plain.state_dict()
        target = STATE_DICT_TARGET if blocks == max(STATE_DICT_BLOCKS) else None
        saves = {variant: model.state_dict for variant, model in models.items()}
        loads = {variant: partial(model.load_state_dict, state) for variant, model in models.items()}
        records.append(cost_record(args, "state_dict", blocks, saves, 1, target))
        records.append(cost_record(args, "load_state_dict", blocks, loads, 1, target))
    return records


SOLVE_BLOCKS, SOLVE_FRACTIONS, SOLVE_TARGET_S = 128, (0.25, 0.5, 0.75), 1.0
"""The solve record: Llama-style blocks, the budgets (fractions of no AC), and the most CPU seconds."""


def llama_style_profile(blocks: int, batch: int = 4, seq: int = 256, width: int = 512) -> Profile:
    """A profile of ``blocks`` alike Llama decoder layers (q, k, v, attention, o, gate, up, down), built
    from their shapes: bytes as the profiler counts them, times proportional to the FLOPs."""
    unit, hidden = batch * seq * width * 4, (8 * width // 3 + 31) // 32 * 32
    wide, lse = unit * hidden // width, batch * 8 * seq * 4
    sizes = [unit, unit, unit, unit + lse, unit, wide, wide, unit]
    names = [*(f"aten.mm.default#{i}" for i in range(3)), "aten.scaled_dot_product_attention.default#0"]
    names += [f"aten.mm.default#{i}" for i in range(3, 7)]
    ms = [1.0, 1.0, 1.0, 2.0, 1.0, 2.7, 2.7, 0.0]  # down_proj is never replayed
    ops = tuple(OpProfile(n, b, t, i < 7) for i, (n, b, t) in enumerate(zip(names, sizes, ms, strict=True)))
    none = 14 * unit + 3 * wide
    layer = [
        BlockProfile(f"layers.{i}", "LlamaDecoderLayer", none, unit, ops, 2.0, 16.0) for i in range(blocks)
    ]
    return Profile(
        "Llama-style", tuple(layer), blocks * none + 3 * unit, (unit,) * blocks, 3 * unit, 1.0, 2.0
    )


@dataclass(frozen=True)
class SolveRecord:
    """The planner's time on the Llama-style profile, as ``--json`` writes it (under ``"solve"``)."""

    blocks: int
    budget_fraction: float
    cpu_s: float
    """Median CPU seconds of ``fsdp_ac.planner.plan`` over 3 runs (its options and its solve)."""
    target_s: float


def solve_records() -> list[SolveRecord]:
    """The planner's CPU time for SOLVE_BLOCKS blocks at each of SOLVE_FRACTIONS."""
    measured = llama_style_profile(SOLVE_BLOCKS)
    seconds = [
        statistics.median(clocked(partial(plan, measured, fraction))[0] / 1e3 for _ in range(3))
        for fraction in SOLVE_FRACTIONS
    ]
    return [
        SolveRecord(SOLVE_BLOCKS, f, s, SOLVE_TARGET_S) for f, s in zip(SOLVE_FRACTIONS, seconds, strict=True)
    ]


def check_targets(records: list[Record]) -> list[tuple[str, bool]]:
    """The targets of the benchmark, each with whether it is met (those whose variants ran).

    Faster than a time target is met: every time target is an upper bound.
    """
    by_name = {r.name: r for r in records}
    results = []
    if {"torch_full", "fsdp_ac_full"} <= by_name.keys():
        ours, theirs = by_name["fsdp_ac_full"], by_name["torch_full"]
        results.append(
            (
                f"fsdp_ac_full memory {ours.memory_ratio:.3f} <= torch_full {theirs.memory_ratio:.3f}",
                ours.activation_bytes <= theirs.activation_bytes,
            )
        )
        results.append(
            (
                f"fsdp_ac_full time {ours.time_ratio:.3f} at most 3% above torch_full "
                f"{theirs.time_ratio:.3f}",
                ours.time_ratio <= theirs.time_ratio * 1.03,
            )
        )
    if "fsdp_ac_selective" in by_name:
        ours = by_name["fsdp_ac_selective"]
        results.append(
            (f"fsdp_ac_selective memory {ours.memory_ratio:.3f} <= 0.60", ours.memory_ratio <= 0.60)
        )
        results.append((f"fsdp_ac_selective time {ours.time_ratio:.3f} <= 1.06", ours.time_ratio <= 1.06))
    for name, (memory, time_ratio) in PLAN_TARGETS.items():
        if name in by_name:
            r = by_name[name]
            results.append((f"{name} memory {r.memory_ratio:.3f} <= {memory:.2f}", r.memory_ratio <= memory))
            results.append((f"{name} time {r.time_ratio:.3f} <= {time_ratio}", r.time_ratio <= time_ratio))
    for r in records:
        if r.predicted_memory_ratio is None:
            continue
        error = abs(r.predicted_memory_ratio - r.memory_ratio) / r.memory_ratio
        results.append(
            (
                f"{r.name} predicted memory {r.predicted_memory_ratio:.3f} within 5% of measured "
                f"{r.memory_ratio:.3f} ({error:.1%})",
                error <= 0.05,
            )
        )
        prefix, _, variant = r.name.rpartition("/")
        fraction = PLANS[variant]
        fixed = [
            f
            for f in records
            if f.predicted_memory_ratio is None
            and f.name.rpartition("/")[0] == prefix
            and f.budget_ratio <= fraction
        ]
        if fixed:
            fastest = min(fixed, key=lambda f: f.time_ratio)
            results.append(
                (
                    f"{r.name} time {r.time_ratio:.3f} at most 2% above the fastest fixed variant that "
                    f"fits {fraction:.2f}, {fastest.name} {fastest.time_ratio:.3f}",
                    r.time_ratio <= fastest.time_ratio * 1.02,
                )
            )
    return results


def draw_pareto(records: list[Record], path: str) -> None:
    """Draws every variant's memory ratio against its time ratio, one panel per model, to ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install fsdp_ac[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--png needs matplotlib: pip install 'fsdp_ac[plot]' (or matplotlib).") from error
    models: dict[str, list[Record]] = {}
    for r in records:
        prefix, _, _ = r.name.rpartition("/")
        models.setdefault(prefix or "reference GPT", []).append(r)
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, (model, rows) in zip(axes[0], models.items(), strict=True):
        for r in rows:
            planned = r.predicted_memory_ratio is not None
            color = "tab:red" if planned else "tab:blue"
            # From the bytes held at the end of forward to the budget the variant needs (recompute).
            axis.plot([r.memory_ratio, r.budget_ratio], [r.time_ratio] * 2, color=color, alpha=0.4, lw=1)
            axis.scatter(r.budget_ratio, r.time_ratio, marker="|", s=60, color=color, alpha=0.6)
            axis.scatter(
                r.memory_ratio,
                r.time_ratio,
                marker="*" if planned else "o",
                s=90 if planned else 40,
                color=color,
            )
            axis.annotate(
                r.name.rpartition("/")[2],
                (r.memory_ratio, r.time_ratio),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        frontier = []
        for r in sorted(rows, key=lambda r: (r.memory_ratio, r.time_ratio)):
            if not frontier or r.time_ratio < frontier[-1].time_ratio:
                frontier.append(r)
        axis.step(
            [r.memory_ratio for r in frontier],
            [r.time_ratio for r in frontier],
            where="post",
            color="grey",
            linewidth=0.8,
        )
        axis.set(
            title=f"{model}: held at the end of forward (dot) to budget needed (bar)",
            xlabel="activation memory / no AC",
            ylabel="step time / no AC",
        )
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def cost_label(cost: CostRecord) -> str:
    """The record's name, with the model's size where it has one."""
    return cost.name if cost.blocks is None else f"{cost.name} ({cost.blocks} blocks)"


def check_cost_targets(costs: list[CostRecord]) -> list[tuple[str, bool]]:
    """The targets of the cost records, each with whether it is met."""
    return [
        (f"{cost_label(c)}: fsdp_ac/torch {c.ratio:.3f} <= {c.target:.2f}", c.ratio <= c.target)
        for c in costs
        if c.target is not None
    ]


def print_steps(
    args: argparse.Namespace,
    workload: Workload,
    records: list[Record],
    wall_ms: dict[str, float],
    grads_equal: dict[str, bool],
) -> None:
    """Prints the table of the steps part for one model."""
    print(
        f"{workload.description}; fp32.\n"
        f"{args.threads} thread(s); {args.warmup} warm-up and {args.repeats} timed rounds, variants "
        f"interleaved; step = forward + loss + backward; time = median {args.clock.upper()} time."
    )
    header = f"{'variant':<24} {'time_ratio':>10} {'memory_ratio':>12} {'predicted':>9} {'budget':>6} "
    print(header + f"{'step_ms':>9} {'wall_ms':>9} {'activation_MiB':>14}  grads")
    for r in records:
        grads = (
            "reference"
            if r.name.endswith("no_ac")
            else ("bitwise equal" if grads_equal[r.name] else "DIFFER")
        )
        predicted = "" if r.predicted_memory_ratio is None else f"{r.predicted_memory_ratio:.3f}"
        print(
            f"{r.name:<24} {r.time_ratio:>10.3f} {r.memory_ratio:>12.3f} {predicted:>9} "
            f"{r.budget_ratio:>6.3f} {r.step_ms:>9.1f} {wall_ms[r.name]:>9.1f} "
            f"{r.activation_bytes / MIB:>14.2f}  {grads}"
        )


def print_costs(args: argparse.Namespace, costs: list[CostRecord]) -> None:
    """Prints the table of the overhead and state_dict parts, and what the wrappers add per block."""
    width = STATE_DICT_WIDTH
    print(
        f"Costs against torch's checkpoint_wrapper: median {args.clock.upper()} time per call, "
        f"{COST_WARMUP} warm-up and {args.cost_repeats} timed rounds, variants interleaved.\n"
        f"forward_backward: 2-layer MLP of width {OVERHEAD_WIDTH}, batch {OVERHEAD_BATCH}, "
        f"{OVERHEAD_CALLS} calls per sample; state dicts: Linear({width}, {width}), blocks of two "
        f"Linear({width}, {width}) in a ModuleList, Linear({width}, {width})."
    )
    print(
        f"{'record':<18} {'blocks':>6} {'plain_us':>10} {'torch_us':>10} {'fsdp_ac_us':>10} "
        f"{'ratio':>7} {'target':>7}"
    )
    for c in costs:
        target = "" if c.target is None else f"{c.target:.2f}"
        print(
            f"{c.name:<18} {c.blocks or '':>6} {c.plain_us:>10.1f} {c.torch_us:>10.1f} {c.fsdp_ac_us:>10.1f} "
            f"{c.ratio:>7.3f} {target:>7}"
        )
    # What the wrappers add per block: constant for a cost linear in the number of keys, growing with
    # the number of blocks for one that is quadratic.
    for name in ("state_dict", "load_state_dict"):
        rows = [c for c in costs if c.name == name and c.blocks]
        if rows:
            wrapped_us: dict[str, Callable[[CostRecord], float]] = {
                "torch": lambda c: c.torch_us,
                "fsdp_ac": lambda c: c.fsdp_ac_us,
            }
            added = {
                variant: ", ".join(
                    f"{(us(c) - c.plain_us) / (c.blocks or 1):.1f} at {c.blocks}" for c in rows
                )
                for variant, us in wrapped_us.items()
            }
            print(
                f"{name}(): us the wrappers add per block: torch {added['torch']} blocks; "
                f"fsdp_ac {added['fsdp_ac']} blocks"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the chosen parts of the benchmark and prints their tables; returns the exit status."""
    args = parse_args(argv)
    parts = args.only.split(",")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    records: list[Record] = []
    costs: list[CostRecord] = []
    targets: list[tuple[str, bool]] = []
    grads_equal: dict[str, bool] = {}
    if "steps" in parts:
        for prefix, workload, variants in reference_workloads(args):
            model_records, wall_ms, model_grads, unplanned = run(args, workload, variants, prefix)
            targets += unplanned
            print_steps(args, workload, model_records, wall_ms, model_grads)
            records += model_records
            grads_equal |= model_grads
        targets += check_targets(records)
        if args.png:
            draw_pareto(records, args.png)
    if "overhead" in parts:
        costs += overhead_records(args)
    if "state_dict" in parts:
        costs += state_dict_records(args)
    solves = solve_records() if "solve" in parts else []
    for r in solves:
        print(f"solve: {r.blocks} Llama-style blocks, budget {r.budget_fraction:.2f}: {r.cpu_s:.3f} CPU s")
        targets.append(
            (
                f"solve of {r.blocks} blocks at {r.budget_fraction:.2f}: {r.cpu_s:.3f} s <= {r.target_s:.1f}",
                r.cpu_s <= r.target_s,
            )
        )
    if costs:
        print_costs(args, costs)
        targets += check_cost_targets(costs)
    for text, met in targets:
        print(f"target {'met' if met else 'MISSED'}: {text}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(
                {
                    "steps": [r.to_json() for r in records],
                    "costs": [asdict(c) for c in costs],
                    "solve": [asdict(r) for r in solves],
                },
                file,
                indent=2,
            )
            file.write("\n")
    failed = not all(grads_equal.values()) or (args.check and not all(met for _, met in targets))
    return 1 if failed else 0


if __name__ == "__main__":
    with silenced():  # the variants it builds are measurements, not the user's model: no account lines
        sys.exit(main())
