"""Benchmarks activation checkpointing variants on the reference GPT: step time and activation memory.

Run it as ``make bench`` (``python scripts/benchmark.py``). Every variant is a copy of one model
(same weights, same batch) run in this one process. Each round runs every variant once, in an order
that rotates from round to round, so that machine noise hits all variants alike; the step time of a
variant is its median over the rounds. A step is the forward, the loss and the backward (what
activation checkpointing changes). The activation memory is what the forward and the loss hold for
backward, measured deterministically by :class:`fsdp_ac.ActivationMemoryMeter` on a separate step,
whose gradients are also compared bitwise with those of ``no_ac``.

By default the step time is the process CPU time with one thread: on a small shared machine, wall
time also counts the time other processes hold the cores, which is noise to this comparison;
``--clock wall`` measures wall time instead. Both are printed.

``--json PATH`` writes a list of records ``{"name", "time_ratio", "memory_ratio", "step_ms",
"activation_bytes"}`` (ratios to ``no_ac``); ``--check`` exits with status 1 when a target is missed:
``fsdp_ac_full`` holds no more memory than ``torch_full`` at a time ratio within 3% of it, and
``fsdp_ac_selective`` holds at most 0.60 of ``no_ac``'s memory at a time ratio of at most 1.06.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers

from fsdp_ac import ActivationMemoryMeter, ModulePolicy, SelectiveCheckpoint, apply_activation_checkpointing
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

MIB = 2**20
BLOCKS = ModulePolicy({TransformerBlock})


def _torch_full(model: nn.Module) -> None:
    torch_wrappers.apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=partial(
            torch_wrappers.checkpoint_wrapper, checkpoint_impl=torch_wrappers.CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: isinstance(m, TransformerBlock),
    )


VARIANTS: dict[str, Callable[[nn.Module], None]] = {
    "no_ac": lambda model: None,
    "torch_full": _torch_full,
    "fsdp_ac_full": lambda model: apply_activation_checkpointing(model, auto_wrap_policy=BLOCKS),
    "fsdp_ac_every_2": lambda model: apply_activation_checkpointing(model, auto_wrap_policy=BLOCKS.every(2)),
    "torchtitan_op_sac": lambda model: apply_activation_checkpointing(
        model, SelectiveCheckpoint("torchtitan"), auto_wrap_policy=BLOCKS
    ),
    "fsdp_ac_selective": lambda model: apply_activation_checkpointing(
        model, SelectiveCheckpoint("default"), auto_wrap_policy=BLOCKS
    ),
    "fsdp_ac_matmul_sac": lambda model: apply_activation_checkpointing(
        model, SelectiveCheckpoint("matmul"), auto_wrap_policy=BLOCKS
    ),
}
"""How each variant checkpoints the model; ``no_ac`` is the reference for the ratios."""

DEFAULT_VARIANTS = [name for name in VARIANTS if name != "fsdp_ac_matmul_sac"]
"""What a plain run measures; ``--variants all`` adds the save-every-matmul preset for comparison."""


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; the defaults are the reference model of the benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        help=f"'all', or a comma-separated subset of {', '.join(VARIANTS)} (no_ac always runs)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the records to PATH as JSON")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.variants == "all":
        args.variants = ",".join(VARIANTS)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1 and --warmup >= 0")
    return args


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``tokens`` of shape (batch, seq + 1)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def timed_step(model: nn.Module, tokens: torch.Tensor) -> tuple[float, float]:
    """Runs one forward, loss and backward; returns its (CPU, wall) time in milliseconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    lm_loss(model, tokens).backward()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    model.zero_grad(set_to_none=True)
    return cpu * 1e3, wall * 1e3


def metered_step(model: nn.Module, tokens: torch.Tensor) -> tuple[int, list[torch.Tensor | None]]:
    """Runs one step measuring the activation bytes; returns them and the gradients in order."""
    with ActivationMemoryMeter(model) as meter:
        loss = lm_loss(model, tokens)
    loss.backward()
    # By position: torch's own wrappers change parameter names, never their order.
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return meter.held_bytes, grads


def run(args: argparse.Namespace) -> tuple[list[Record], dict[str, float], dict[str, bool]]:
    """Builds the variants, measures them interleaved; returns records, wall ms and gradient checks."""
    torch.set_num_threads(args.threads)
    config = GPTConfig(
        vocab_size=args.vocab,
        max_seq_len=args.seq,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
    )
    torch.manual_seed(0)
    reference = GPT(config)
    tokens = torch.randint(
        0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1)
    )
    names = ["no_ac", *(v for v in args.variants.split(",") if v != "no_ac")]
    models: dict[str, nn.Module] = {}
    for name in names:
        models[name] = copy.deepcopy(reference)
        VARIANTS[name](models[name])

    def rounds(count: int) -> list[list[str]]:
        return [names[i % len(names) :] + names[: i % len(names)] for i in range(count)]

    for order in rounds(args.warmup):
        for name in order:
            timed_step(models[name], tokens)
    held: dict[str, int] = {}
    grads_equal: dict[str, bool] = {}
    expected: list[torch.Tensor | None] = []
    for name in names:
        held[name], grads = metered_step(models[name], tokens)
        expected = expected or grads
        grads_equal[name] = len(grads) == len(expected) and all(
            g is not None and e is not None and torch.equal(g, e)
            for g, e in zip(grads, expected, strict=False)
        )
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for order in rounds(args.repeats):
        # A garbage collection inside a timed step would be charged to whichever variant ran it.
        gc.collect()
        gc.disable()
        try:
            for name in order:
                c, w = timed_step(models[name], tokens)
                cpu[name].append(c)
                wall[name].append(w)
        finally:
            gc.enable()
    chosen = cpu if args.clock == "cpu" else wall
    step = {name: statistics.median(chosen[name]) for name in names}
    records = [
        Record(
            name=name,
            time_ratio=step[name] / step["no_ac"],
            memory_ratio=held[name] / held["no_ac"],
            step_ms=step[name],
            activation_bytes=held[name],
        )
        for name in names
    ]
    return records, {name: statistics.median(wall[name]) for name in names}, grads_equal


def check_targets(records: list[Record]) -> list[tuple[str, bool]]:
    """The targets of the benchmark, each with whether it is met (those whose variants ran)."""
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
                f"fsdp_ac_full time {ours.time_ratio:.3f} within 3% of torch_full {theirs.time_ratio:.3f}",
                abs(ours.time_ratio / theirs.time_ratio - 1) <= 0.03,
            )
        )
    if "fsdp_ac_selective" in by_name:
        ours = by_name["fsdp_ac_selective"]
        results.append(
            (f"fsdp_ac_selective memory {ours.memory_ratio:.3f} <= 0.60", ours.memory_ratio <= 0.60)
        )
        results.append((f"fsdp_ac_selective time {ours.time_ratio:.3f} <= 1.06", ours.time_ratio <= 1.06))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints the table; returns the exit status."""
    args = parse_args(argv)
    started = time.perf_counter()
    records, wall_ms, grads_equal = run(args)
    print(
        f"Reference GPT: {args.layers} pre-LN blocks, d_model {args.d_model}, {args.heads} heads, "
        f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, fp32, causal SDPA, 4x GELU MLP.\n"
        f"{args.threads} thread(s); {args.warmup} warm-up and {args.repeats} timed rounds, variants "
        f"interleaved; step = forward + loss + backward; time = median {args.clock.upper()} time."
    )
    header = f"{'variant':<20} {'time_ratio':>10} {'memory_ratio':>12} {'step_ms':>9} {'wall_ms':>9} "
    print(header + f"{'activation_MiB':>14}  grads")
    for r in records:
        grads = "reference" if r.name == "no_ac" else ("bitwise equal" if grads_equal[r.name] else "DIFFER")
        print(
            f"{r.name:<20} {r.time_ratio:>10.3f} {r.memory_ratio:>12.3f} {r.step_ms:>9.1f} "
            f"{wall_ms[r.name]:>9.1f} {r.activation_bytes / MIB:>14.2f}  {grads}"
        )
    targets = check_targets(records)
    for text, met in targets:
        print(f"target {'met' if met else 'MISSED'}: {text}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump([asdict(r) for r in records], file, indent=2)
            file.write("\n")
    failed = not all(grads_equal.values()) or (args.check and not all(met for _, met in targets))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
