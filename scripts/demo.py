"""Trains a small GPT under FSDP2 twice, without and with fsdp_ac activation checkpointing, and compares.

Run it under torchrun (this is ``make demo``)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/demo.py

Both runs start from the same weights and see the same data. For each run, rank 0 reports the
activation memory held for backward after the forward and loss of the first step (measured
deterministically with :class:`fsdp_ac.ActivationMemoryMeter`), its ratio to the run without AC, the
median step time, and how far the first step's gradients and the final parameters are from the run
without AC. On CUDA it also reports each run's peak allocated memory.

Recomputation replays the same operators on the same inputs, so the gradients must agree: the script
exits with status 1 when the largest gradient difference exceeds ``--grad-tolerance``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fsdp_ac import ActivationMemoryMeter, apply_activation_checkpointing
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

# The demo starts its ranks as the distributed suite does (FSDP_AC_BACKEND, FSDP_AC_TIMEOUT_S).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from suite_settings import collective_timeout, select_backend

MIB = 2**20


@dataclass(frozen=True)
class Setup:
    """Where this rank runs."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of ranks."""
    backend: str
    """Process-group backend (``gloo`` or ``nccl``)."""
    device: torch.device
    """Device the model and data live on."""


@dataclass
class RunResult:
    """What one training run measured."""

    name: str
    """Label of the variant in the table."""
    activation_bytes: int
    """Bytes the first step's forward and loss held for backward (this rank)."""
    step_ms: list[float]
    """Wall time of each timed step, in milliseconds."""
    first_grads: dict[str, torch.Tensor]
    """Full (unsharded) gradients after the first backward, on the CPU, by parameter name."""
    final_params: dict[str, torch.Tensor]
    """Full (unsharded) parameters after the last step, on the CPU, by parameter name."""
    peak_cuda_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` over the run; ``None`` off CUDA."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; every size has a default that runs in seconds on two CPU cores."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: 4)")
    parser.add_argument("--d-model", type=int, default=128, help="residual width (default: 128)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=512, help="token ids (default: 512)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step (default: 4)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default: 5)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    parser.add_argument(
        "--grad-tolerance",
        type=float,
        default=1e-5,
        help="largest allowed |grad difference| between AC and no-AC (default: 1e-5)",
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is measured, the rest are timed.")
    if not args.grad_tolerance >= 0:
        parser.error(f"--grad-tolerance must be a number >= 0, got {args.grad_tolerance}.")
    return args


def init_distributed() -> Setup:
    """Initialises the default process group from torchrun's environment.

    Raises:
        RuntimeError: The script was not started by torchrun (or another launcher setting ``RANK``).
    """
    if "RANK" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "scripts/demo.py needs torchrun's environment; run "
            "`python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/demo.py` "
            "(or `make demo`)."
        )
    backend = select_backend(int(os.environ["LOCAL_WORLD_SIZE"]))
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, timeout=collective_timeout())
    return Setup(dist.get_rank(), dist.get_world_size(), backend, device)


def model_config(args: argparse.Namespace) -> GPTConfig:
    """Returns the GPT sizes chosen on the command line (no dropout, so runs are comparable)."""
    return GPTConfig(
        vocab_size=args.vocab_size,
        max_seq_len=args.seq_len,
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        dropout=0.0,
    )


def build_model(config: GPTConfig, seed: int, mesh: DeviceMesh, checkpointing: bool) -> nn.Module:
    """Builds the GPT with the same weights on every rank and every call, then shards it with FSDP2.

    Activation checkpointing, when asked for, wraps each ``TransformerBlock`` before sharding. Each
    entry of ``model.layers`` (the checkpoint wrapper, or the bare block without AC) then becomes an
    FSDP unit, as torchtitan does it, and the root takes the embeddings, final norm and head.
    """
    # fork_rng keeps the seeding local to the construction instead of resetting the process's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config)
    model.to(mesh.device_type)
    if checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, TransformerBlock))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_batch(
    args: argparse.Namespace, step: int, rank: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(inputs, targets)`` for ``step``: the same on every run, different on every rank."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)
    tokens = torch.randint(
        args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator, dtype=torch.long
    ).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each next token."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def gather_full(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Returns CPU copies of the full tensors behind sharded DTensors; a collective on every rank."""
    full: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        full[name] = value.detach().to("cpu", copy=True)
    return full


def synchronize(device: torch.device) -> None:
    """Waits for queued device work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args: argparse.Namespace, setup: Setup, mesh: DeviceMesh, checkpointing: bool) -> RunResult:
    """Trains one variant for ``args.steps`` steps and returns what it measured.

    The first step is measured (activation memory, gradients) under the memory meter and is not
    timed; the remaining steps are timed.
    """
    model = build_model(model_config(args), args.seed, mesh, checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)

    activation_bytes = 0
    first_grads: dict[str, torch.Tensor] = {}
    step_ms: list[float] = []
    for step in range(args.steps):
        inputs, targets = make_batch(args, step, setup.rank, setup.device)
        synchronize(setup.device)
        start = time.perf_counter()
        if step == 0:
            with ActivationMemoryMeter(model) as meter:
                loss = next_token_loss(model, inputs, targets)
            activation_bytes = meter.held_bytes
        else:
            loss = next_token_loss(model, inputs, targets)
        loss.backward()
        if step == 0:
            first_grads = gather_full(
                {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(setup.device)
        if step > 0:
            step_ms.append((time.perf_counter() - start) * 1e3)

    peak = torch.cuda.max_memory_allocated(setup.device) if setup.device.type == "cuda" else None
    final_params = gather_full(dict(model.named_parameters()))
    return RunResult(
        name="fsdp_ac checkpoint" if checkpointing else "no AC",
        activation_bytes=activation_bytes,
        step_ms=step_ms,
        first_grads=first_grads,
        final_params=final_params,
        peak_cuda_bytes=peak,
    )


def max_abs_diff(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """Largest element-wise ``|reference - other|`` over all tensors.

    Raises:
        ValueError: The two runs do not have the same parameter names (a wrapper leaked into a name).
    """
    if reference.keys() != other.keys():
        only_reference = sorted(reference.keys() - other.keys())
        only_other = sorted(other.keys() - reference.keys())
        raise ValueError(
            "The runs name their parameters differently: only in the reference "
            f"{only_reference}, only in the other {only_other}."
        )
    return max((reference[k] - other[k]).abs().max().item() for k in reference)


def format_table(setup: Setup, runs: Sequence[RunResult]) -> str:
    """Renders the comparison of ``runs`` (the first is the no-AC reference) as an aligned table."""
    reference = runs[0]
    header = ["variant", "activation MiB", "ratio to no-AC", "median step ms", "max |grad diff|"]
    header.append("max |param diff|")
    on_cuda = reference.peak_cuda_bytes is not None
    if on_cuda:
        header.append("peak CUDA MiB")
    rows = [header]
    for run in runs:
        row = [
            run.name,
            f"{run.activation_bytes / MIB:.2f}",
            f"{run.activation_bytes / reference.activation_bytes:.3f}",
            f"{statistics.median(run.step_ms):.1f}",
            f"{max_abs_diff(reference.first_grads, run.first_grads):.3e}",
            f"{max_abs_diff(reference.final_params, run.final_params):.3e}",
        ]
        if on_cuda:
            row.append(f"{(run.peak_cuda_bytes or 0) / MIB:.1f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        " | ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    title = (
        f"world size {setup.world_size}, backend {setup.backend}, device {setup.device.type}; "
        "activation memory is rank 0's, after forward + loss of step 0"
    )
    return "\n".join([title, *lines])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs both variants and compares them; returns the process exit status."""
    args = parse_args(argv)
    setup = init_distributed()
    try:
        mesh = init_device_mesh(setup.device.type, (setup.world_size,))
        runs = [train(args, setup, mesh, checkpointing) for checkpointing in (False, True)]
        reference, checkpointed = runs
        # Every rank holds the same full tensors, so every rank reaches the same verdict.
        grad_diff = max_abs_diff(reference.first_grads, checkpointed.first_grads)
        if setup.rank == 0:
            print(format_table(setup, runs), flush=True)
        # Written so that a NaN difference fails too.
        if not grad_diff <= args.grad_tolerance:
            if setup.rank == 0:
                print(
                    f"FAIL: with activation checkpointing the first step's gradients differ from the "
                    f"run without it by up to {grad_diff:.3e} (> --grad-tolerance {args.grad_tolerance:g}); "
                    "recomputation must reproduce the forward.",
                    file=sys.stderr,
                    flush=True,
                )
            return 1
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
