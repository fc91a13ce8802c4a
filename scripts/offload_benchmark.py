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
block's forward ends (measured in a pre-hook of the final norm, on the first step, above the memory
before the step, less the blocks' output, which every variant holds there); ``peak_bytes`` is the
peak over that step. The target: ``ac_fsdp_ac_offload`` at most 3% slower than ``full_ac`` while
holding at most 10% of the activation memory ``full_ac``'s blocks hold. ``--check`` exits with status
1 when it is missed; ``--json PATH`` writes the records.

``--device cpu --tiny`` is a dry run of the same code on a tiny model on the CPU (offload copies CPU
tensors, in fsdp_ac's test mode): it checks the script, not the figures.
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
from fsdp_ac.offload import OffloadEngine
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

TIME_TARGET = 1.03
"""``ac_fsdp_ac_offload``'s step time over ``full_ac``'s, at most."""
MEMORY_TARGET = 0.10
"""``ac_fsdp_ac_offload``'s held activation memory over ``full_ac``'s, at most."""


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
    """Gradients equal ``no_ac``'s bitwise."""


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
        args.steps, args.warmup = 1, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu --tiny for a dry run.")
    return args


def offload_options(device: torch.device) -> dict[str, Any]:
    """fsdp_ac's offload settings: on the CPU, the test mode that copies CPU tensors."""
    return {"copy_cpu_tensors": True, "pin_memory": False} if device.type == "cpu" else {}


def variants(device: torch.device) -> dict[str, Callable[[GPT], tuple[nn.Module, OffloadEngine | None]]]:
    """Each variant's name, and how it wraps a copy of the model (with its engine, if any)."""

    def wrap_blocks(model: GPT, wrap: Callable[[nn.Module], nn.Module]) -> GPT:
        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, TransformerBlock)
        )
        return model

    def engine_variant(model: GPT) -> tuple[nn.Module, OffloadEngine | None]:
        engine = OffloadEngine()
        options = offload_options(device)
        return wrap_blocks(
            model, lambda b: offload_wrapper(checkpoint_wrapper(b), engine=engine, **options)
        ), engine

    table: dict[str, Callable[[GPT], tuple[nn.Module, OffloadEngine | None]]] = {
        "no_ac": lambda model: (model, None),
        "full_ac": lambda model: (wrap_blocks(model, checkpoint_wrapper), None),
        "ac_torch_save_on_cpu": lambda model: (
            wrap_blocks(
                model, lambda b: torch_wrappers.offload_wrapper(torch_wrappers.checkpoint_wrapper(b))
            ),
            None,
        ),
        "ac_fsdp_ac_sync_offload": lambda model: (
            wrap_blocks(model, lambda b: offload_wrapper(checkpoint_wrapper(b), **offload_options(device))),
            None,
        ),
        "ac_fsdp_ac_offload": engine_variant,
    }
    torchtune = torchtune_offload()
    if torchtune is not None:
        table["ac_torchtune_offload"] = lambda model: (
            TorchtuneOffload(wrap_blocks(model, checkpoint_wrapper), torchtune),
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
    peak = None
    final_norm = next(module for name, module in model.named_modules() if name.endswith("ln_f"))
    for step in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)
        synchronize(device)
        before = allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        hook = None
        if step == 0 and before is not None:

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
            if device.type == "cuda" and before is not None:
                peak = torch.cuda.max_memory_allocated(device) - before
        del loss
    host = engine.pool.bytes if engine is not None else None
    record = Record(name, statistics.median(times), held[0] if held else None, peak, host, grads_equal=False)
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
    records, reference = [], None
    for name, wrap in variants(device).items():
        model, engine = wrap(copy.deepcopy(base))
        record, grads = measure(name, model, engine, tokens, args)
        reference = grads if reference is None else reference
        record.grads_equal = len(grads) == len(reference) and all(map(torch.equal, grads, reference))
        records.append(record)
        del model, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
    return 1 if args.check and met is False else 0


if __name__ == "__main__":
    sys.exit(main())
