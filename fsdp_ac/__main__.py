"""Command line: ``python -m fsdp_ac profile|plan MODEL ...``: measure a model, plan its activations.

``--help`` says how (plain text, :data:`_DESCRIPTION`); ``docs/planning.md`` explains the plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from fsdp_ac.planner import BudgetError, plan
from fsdp_ac.profiler import Profile, Workload, builtin_workload, profile, workload_from_spec
from fsdp_ac.settings import parse_budget

BUILTINS = ("gpt", "llama")
"""The models named without an import path."""

_DESCRIPTION = """\
Measure a model (profile), or plan its activations for a memory budget (plan).

MODEL is a built-in (gpt: the reference GPT; llama: a Llama-style decoder from transformers) or
package.module:factory with --block and --shape. profile prints a per-block table (bytes held with
each strategy, forward and recompute times); plan --budget B prints the plan that fits B at the least
predicted recompute and can save it for fsdp_ac.ActivationPlan.load. --json PATH writes the profile
(and the plan) as JSON.

examples:
  python -m fsdp_ac profile gpt --layers 8
  python -m fsdp_ac plan gpt --budget 50% --save-plan plan.json
  python -m fsdp_ac plan mypkg.models:build --block DecoderLayer --shape 4,1024 --budget 6GiB
"""


def _budget_argument(text: str) -> int | float:
    try:
        return parse_budget(text, "--budget")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Builds the workload the command line names (shared with ``scripts/benchmark.py``).

    Raises:
        ValueError: An import path without ``--block`` or ``--shape``, or an unknown built-in.
    """
    if args.model in BUILTINS:
        return builtin_workload(
            args.model,
            batch=args.batch,
            seq=args.seq,
            layers=args.layers,
            d_model=args.d_model,
            heads=args.heads,
            vocab=args.vocab,
            device=args.device,
        )
    if ":" not in args.model:
        raise ValueError(f"Unknown model {args.model!r}: use one of {BUILTINS} or package.module:factory.")
    if not args.block or not args.shape:
        raise ValueError(f"{args.model} needs --block (its block class names) and --shape (e.g. 4,256).")
    shape = [int(n) for n in args.shape.replace("x", ",").split(",")]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return workload_from_spec(
        args.model, shape, blocks=set(args.block.split(",")), dtype=dtype, device=args.device
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a model and its input (shared with ``scripts/benchmark.py``)."""
    parser.add_argument(
        "model", nargs="?", default="gpt", help=f"{' or '.join(BUILTINS)}, or package.module:factory"
    )
    parser.add_argument("--block", help="block class names, comma-separated (with package.module:factory)")
    parser.add_argument("--shape", help="input shape, e.g. 4,256 (with package.module:factory)")
    parser.add_argument("--dtype", help="input dtype, e.g. long or float32 (default: tokens if it embeds)")
    parser.add_argument("--layers", type=int, help="built-ins: blocks (default: gpt 8, llama 4)")
    parser.add_argument("--d-model", type=int, default=512, help="built-ins: hidden width (default: 512)")
    parser.add_argument("--heads", type=int, default=8, help="built-ins: attention heads (default: 8)")
    parser.add_argument("--seq", type=int, default=256, help="built-ins: sequence length (default: 256)")
    parser.add_argument("--batch", type=int, default=4, help="built-ins: batch size (default: 4)")
    parser.add_argument("--vocab", type=int, default=512, help="built-ins: vocabulary (default: 512)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def progress_bar(done: int, total: int, width: int = 30) -> None:
    """Draws a progress bar on standard error, on one line."""
    filled = width * done // total
    end = "\n" if done == total else ""
    print(
        f"\rprofiling [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps", end=end, file=sys.stderr
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses ``profile`` or ``plan`` and their options."""
    parser = argparse.ArgumentParser(
        prog="python -m fsdp_ac",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("profile", "measure each block"), ("plan", "plan activations for a budget")):
        sub = commands.add_parser(name, help=text)
        add_model_arguments(sub)
        sub.add_argument("--repeats", type=int, default=3, help="timed steps; times are medians (default: 3)")
        sub.add_argument("--json", metavar="PATH", help="write the profile (and the plan) as JSON")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "plan":
            sub.add_argument(
                "--budget",
                required=True,
                type=_budget_argument,
                help="a fraction of no AC's activation bytes (0.5, 50%%) or bytes (300MiB, 2GiB, 123B)",
            )
            sub.add_argument(
                "--save-plan", metavar="PATH", help="write the ActivationPlan for ActivationPlan.load"
            )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (2 when the budget cannot be met)."""
    args = parse_args(argv)
    try:
        workload = workload_from_args(args)
    except (ValueError, ImportError, AttributeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    progress = None if args.quiet else progress_bar
    measured: Profile = profile(workload, repeats=args.repeats, progress=progress)
    print(measured.table())
    document: dict[str, object] = {"profile": measured.to_json()}
    status = 0
    if args.command == "plan":
        try:
            result = plan(measured, args.budget)
        except BudgetError as error:
            print(f"error: {error}", file=sys.stderr)
            document["smallest_budget_bytes"] = error.smallest
            status = 2
        else:
            print(result.table())
            document["plan"] = result.to_json()
            if args.save_plan:
                result.to_activation_plan().save(args.save_plan)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
