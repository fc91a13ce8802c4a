"""Benchmarks activation offload on one GPU: step time and GPU memory of AC with and without offload.

Run it as part of ``make gpu-check`` (``python scripts/offload_benchmark.py``). Each variant is a copy
of one reference GPT in bf16 (same weights, same batch), sized so that a block's forward takes longer
than copying its input over PCIe (hidden size 2048, 8192 tokens, by default):

- ``no_ac``: plain training.
- ``full_ac``: every block checkpointed (fsdp_ac's ``checkpoint_wrapper``).
- ``ac_torch_save_on_cpu``: torch's ``offload_wrapper(checkpoint_wrapper(block))``: ``save_on_cpu``,
  synchronous copies on the compute stream.
- ``ac_torchtune_offload``: torchtune's ``OffloadActivations`` around the forward, when torchtune is
  installed (skipped otherwise).
- ``ac_fsdp_ac_sync_offload``: fsdp_ac's ``offload_wrapper(checkpoint_wrapper(block))`` without an
  engine (synchronous copies).
- ``ac_fsdp_ac_offload``: the same with an :class:`fsdp_ac.offload.OffloadEngine` (side-stream copies,
  pooled pinned buffers, one block of prefetch).

A variant's step time is its median over the timed steps (forward, loss, backward, with the device
synchronised around it). ``held_bytes`` is the GPU memory the blocks hold for backward when the last
block's forward ends, in steady state: the most over steps 3 to 5, read by the host as it runs ahead
of the device (a pre-hook of the final norm, above the memory before the step, less the blocks'
output, which every variant holds there); ``peak_bytes`` is the peak over those steps. Gradients are
those of the first step, compared bitwise with ``full_ac``'s. The target: ``ac_fsdp_ac_offload`` at
most 3% slower than ``full_ac`` while holding at most 10% of the activation memory ``full_ac``'s
blocks hold.

Then the stress checks, on a model of at most 4 blocks and 2048 tokens, each against ``full_ac`` run
the same way, bitwise, on the third step (the pool reused): fresh memory filled with NaN
(``fill_uninitialized_memory`` under deterministic algorithms), ``torch.cuda._sleep`` on the compute
stream before each block's MLP (the producer of what the next block offloads) and on the engine's side
stream before each reload, so a missing stream wait shows as wrong gradients: ``stress_checkpoint``
(offload around checkpoints), ``stress_offload`` (every activation offloaded) and ``stress_autocast``
(fp32 weights under bf16 autocast, every activation offloaded).

``--check`` exits with status 1 when the target is missed or any gradients differ; ``--json PATH``
writes the records. ``--device cpu --tiny`` is a dry run of the same code on a tiny model on the CPU
(offload copies CPU tensors, in fsdp_ac's test mode; no delays): it checks the script, not the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers

from fsdp_ac import apply_activation_checkpointing, checkpoint_wrapper, offload_wrapper
from fsdp_ac.offload import CudaTransfers, Event, OffloadEngine, Operation
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

TIME_TARGET = 1.03
"""``ac_fsdp_ac_offload``'s step time over ``full_ac``'s, at most."""
MEMORY_TARGET = 0.10
"""``ac_fsdp_ac_offload``'s held activation memory over ``full_ac``'s, at most."""
STEADY_STEPS = range(2, 5)
"""The steps (from 0) whose memory is read: steps 3 to 5."""
DELAY_CYCLES = 2_000_000
"""``torch.cuda._sleep`` cycles per injected delay (about a millisecond)."""


@dataclass
class Record:
    """One variant's measurements."""

    name: str
    step_ms: float
    held_bytes: int | None
    peak_bytes: int | None
    host_bytes: int | None
    """Host memory the fsdp_ac engine's pool holds (None for other variants)."""
    grads_equal: bool
    """Gradients equal ``full_ac``'s bitwise."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and one step: checks the script")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (default: 12)")
    parser.add_argument("--d-model", type=int, default=2048, help="hidden size (default: 2048)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (default: 16)")
    parser.add_argument("--seq", type=int, default=8192, help="tokens per sequence (default: 8192)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: 1024)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--json", metavar="PATH", help="write the records to PATH as JSON")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.d_model, args.heads, args.seq, args.batch, args.vocab = 3, 32, 4, 16, 2, 64
        args.steps, args.warmup = 1, 4
    if args.warmup + args.steps < STEADY_STEPS.stop:
        parser.error(
            f"--warmup plus --steps must be at least {STEADY_STEPS.stop}: memory is read in steps 3-5."
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --tiny for a dry run.")
    return args


def offload_options(device: torch.device) -> dict[str, Any]:
    """fsdp_ac's offload settings: on the CPU, the test mode that copies CPU tensors."""
    return {"copy_cpu_tensors": True, "pin_memory": False} if device.type == "cpu" else {}


def wrap_all(model: GPT, wrap: Callable[[nn.Module], nn.Module]) -> GPT:
    """Wraps each transformer block of ``model`` with ``wrap``."""
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, TransformerBlock)
    )
    return model


def variants(device: torch.device) -> dict[str, Callable[[GPT], tuple[nn.Module, OffloadEngine | None]]]:
    """Each variant's name, and how it wraps a copy of the model (with its engine, if any)."""

    def engine_variant(model: GPT) -> tuple[nn.Module, OffloadEngine | None]:
        engine = OffloadEngine()
        options = offload_options(device)
        return wrap_all(
            model, lambda b: offload_wrapper(checkpoint_wrapper(b), engine=engine, **options)
        ), engine

    table: dict[str, Callable[[GPT], tuple[nn.Module, OffloadEngine | None]]] = {
        "no_ac": lambda model: (model, None),
        "full_ac": lambda model: (wrap_all(model, checkpoint_wrapper), None),
        "ac_torch_save_on_cpu": lambda model: (
            wrap_all(model, lambda b: torch_wrappers.offload_wrapper(torch_wrappers.checkpoint_wrapper(b))),
            None,
        ),
        "ac_fsdp_ac_sync_offload": lambda model: (
            wrap_all(model, lambda b: offload_wrapper(checkpoint_wrapper(b), **offload_options(device))),
            None,
        ),
        "ac_fsdp_ac_offload": engine_variant,
    }
    torchtune = torchtune_offload()
    if torchtune is not None:
        table["ac_torchtune_offload"] = lambda model: (
            TorchtuneOffload(wrap_all(model, checkpoint_wrapper), torchtune),
            None,
        )
    return table


def torchtune_offload() -> type | None:
    """torchtune's ``OffloadActivations`` context, or None when torchtune is not installed."""
    try:
        from torchtune.training import OffloadActivations  # type: ignore[import-not-found]
    except ImportError:
        return None
    return OffloadActivations  # type: ignore[no-any-return]


class TorchtuneOffload(nn.Module):
    """Runs ``model``'s forward inside torchtune's offload context."""

    def __init__(self, model: nn.Module, context: type) -> None:
        super().__init__()
        self.model = model
        self.context = context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.context():
            return self.model(tokens)  # type: ignore[no-any-return]


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``tokens`` of shape (batch, seq + 1)."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def measure(
    name: str, model: nn.Module, engine: OffloadEngine | None, tokens: torch.Tensor, args: argparse.Namespace
) -> tuple[Record, list[torch.Tensor]]:
    """Runs the warm-up and timed steps of one variant; returns its record and its first gradients."""
    device = tokens.device
    grads: list[torch.Tensor] = []
    times: list[float] = []
    held: list[int] = []
    peaks: list[int] = []
    final_norm = next(module for name, module in model.named_modules() if name.endswith("ln_f"))
    for step in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        before = allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        hook = None
        if step in STEADY_STEPS and before is not None:

            def measure_held(module: nn.Module, inputs: tuple[torch.Tensor, ...], base: int = before) -> None:
                held.append(allocated(device) - base - inputs[0].nbytes)  # type: ignore[operator]

            hook = final_norm.register_forward_pre_hook(measure_held)
        start = time.perf_counter()
        loss = lm_loss(model, tokens)
        if hook is not None:
            hook.remove()
        loss.backward()
        synchronize(device)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
        if step == 0:
            grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        if step in STEADY_STEPS and device.type == "cuda" and before is not None:
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        del loss
    host = engine.pool.bytes if engine is not None else None
    record = Record(
        name, statistics.median(times), max(held, default=None), max(peaks, default=None), host, False
    )
    return record, grads


def run(args: argparse.Namespace) -> list[Record]:
    """Measures every variant on copies of one model and one batch."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = GPTConfig(
        vocab_size=args.vocab,
        max_seq_len=args.seq,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
    )
    torch.manual_seed(0)
    base = GPT(config).to(device=device, dtype=dtype)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    records, all_grads = [], {}
    for name, wrap in variants(device).items():
        model, engine = wrap(copy.deepcopy(base))
        record, all_grads[name] = measure(name, model, engine, tokens, args)
        records.append(record)
        del model, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for record in records:
        record.grads_equal = equal(all_grads[record.name], all_grads["full_ac"])
    return records + stress(args, device)


def equal(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> bool:
    return len(grads) == len(reference) and all(map(torch.equal, grads, reference))


class DelayedTransfers(CudaTransfers):
    """The engine's side stream, asleep before each reload: a reload read too early reads NaN."""

    def copy(
        self, source: torch.Tensor, target: torch.Tensor, after: Event | None, label: Operation
    ) -> Event:
        if label.kind == "to_device":
            with torch.cuda.stream(self.stream):
                torch.cuda._sleep(DELAY_CYCLES)
        return super().copy(source, target, after, label)


def stress(args: argparse.Namespace, device: torch.device) -> list[Record]:
    """The delay- and NaN-injected checks (see the module docstring): one record each."""
    config = GPTConfig(args.vocab, min(args.seq, 2048), args.d_model, args.heads, min(args.layers, 4))
    torch.manual_seed(0)
    base = GPT(config).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, config.max_seq_len + 1), device=device)
    cuda = device.type == "cuda"
    if cuda:  # the engine keys its streams by device index
        device = torch.device("cuda", torch.cuda.current_device())

    def run(
        model: nn.Module, engine: OffloadEngine | None, autocast: bool
    ) -> tuple[list[torch.Tensor], float]:
        if engine is not None and cuda:
            engine._cuda[device] = DelayedTransfers(device)  # the engine's side stream, delayed
        for block in model.modules():
            if isinstance(block, TransformerBlock) and cuda:
                block.mlp.register_forward_pre_hook(lambda *_: torch.cuda._sleep(DELAY_CYCLES))
        for _ in range(3):  # the third step reuses the pool's buffers
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = lm_loss(model, tokens)
            loss.backward()
            synchronize(device)
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        return grads, (time.perf_counter() - start) * 1e3

    # name: (checkpoint inside the offload, bf16 autocast over fp32 weights)
    checks = {
        "stress_checkpoint": (True, False),
        "stress_offload": (False, False),
        "stress_autocast": (False, True),
    }
    records = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    try:
        for name, (checkpoint, autocast) in checks.items():
            model = copy.deepcopy(base).to(dtype=torch.bfloat16 if cuda and not autocast else torch.float32)
            reference, _ = run(wrap_all(copy.deepcopy(model), checkpoint_wrapper), None, autocast)
            engine = OffloadEngine()

            def wrap(
                block: nn.Module, engine: OffloadEngine = engine, checkpoint: bool = checkpoint
            ) -> nn.Module:
                inner = checkpoint_wrapper(block) if checkpoint else block
                return offload_wrapper(inner, engine=engine, **offload_options(device))

            grads, step_ms = run(wrap_all(model, wrap), engine, autocast)
            records.append(Record(name, step_ms, None, None, engine.pool.bytes, equal(grads, reference)))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
    return records


def target_met(records: list[Record]) -> bool | None:
    """Whether fsdp_ac's offload meets the time and memory target; None where memory is not measured."""
    by_name = {r.name: r for r in records}
    ac, offload = by_name["full_ac"], by_name["ac_fsdp_ac_offload"]
    if ac.held_bytes is None or offload.held_bytes is None:
        return None
    return offload.step_ms <= TIME_TARGET * ac.step_ms and offload.held_bytes <= MEMORY_TARGET * ac.held_bytes


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints its table; returns the exit status."""
    args = parse_args(argv)
    records = run(args)
    by_name = {r.name: r for r in records}
    ac = by_name["full_ac"]
    header = ("step ms", "vs AC", "held MiB", "vs AC", "peak MiB", "host MiB")
    print(f"{'variant':<26}" + "".join(f"{h:>11}" for h in header) + "  grads")
    for r in records:
        memory = "-" if r.held_bytes is None or not ac.held_bytes else f"{r.held_bytes / ac.held_bytes:.3f}"
        print(
            f"{r.name:<26}{r.step_ms:>11.2f}{r.step_ms / ac.step_ms:>11.3f}"
            f"{mib(r.held_bytes):>11}{memory:>11}"
            f"{mib(r.peak_bytes):>11}{mib(r.host_bytes):>11}  {'equal' if r.grads_equal else 'differ'}"
        )
    met = target_met(records)
    verdict = {True: "met", False: "MISSED", None: "not measured (no GPU memory on this device)"}[met]
    target = (
        f"ac_fsdp_ac_offload <= {TIME_TARGET:.2f} x full_ac time, <= {MEMORY_TARGET:.0%} of its held memory"
    )
    print(f"target ({target}): {verdict}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"records": [asdict(r) for r in records], "target_met": met}, out, indent=2)
    differ = [r.name for r in records if not r.grads_equal]
    print(f"gradients that differ from full_ac's: {', '.join(differ) or 'none'}")
    ours = [name for name in differ if "fsdp_ac" in name or name.startswith("stress")]
    return 1 if args.check and (met is False or ours) else 0


if __name__ == "__main__":
    sys.exit(main())
