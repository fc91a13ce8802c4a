"""Trains the demo model for N minutes under torchrun with random faults, and checks nothing was lost.

This is ``make soak`` (not part of ``make test`` or CI)::

    PYTHONPATH=$PWD python tests/tools/soak.py --minutes 30

It runs ``tests/distributed/elastic_train.py`` (the suite's elastic training script: DCP checkpoint
every step, committed by an atomic rename; docs/testing.md, "Elastic restarts") on 2 gloo ranks with
``scripts/demo.py``'s model, FSDP2 and full activation checkpointing. First one fault-free run gives
the reference parameters; then, round after round until the time is up, a run of the same steps gets
``--faults`` random faults at random steps on random ranks: a hard exit, a SIGKILL, a death inside a
save (a torn checkpoint), and a hang that the peers' collective timeout (``--collective-timeout``)
turns into an error. torchrun restarts the group after each (``--max-restarts`` = faults), and each
restart may resume with another parallelism and AC strategy (``--replan``). Every round must end
bitwise equal to the reference.

At the end it prints, and writes as JSON with ``--json``: the minutes, rounds, optimizer steps done
(redone ones included), restarts by kind (an ``unplanned`` restart is one no injected fault explains,
e.g. the stale-store trap), steps lost (trained, then redone after a fault) and the rounds whose
final check failed, each with its diagnosis and report. It exits with status 1 when any round failed.
No round starts that would likely end past ``--minutes``; on SIGTERM or Ctrl-C it kills the launch in
flight and prints the summary so far.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # suite_settings, for the ranks
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "distributed"))

from elastic_launch import Launch, mismatches, torchrun
from elastic_train import AC_STRATEGIES, FAULTS, PARALLELS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to soak (default: 30)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round (default: 30)")
    parser.add_argument("--faults", type=int, default=3, help="faults injected per round (default: 3)")
    parser.add_argument("--size", default="demo", help="model size of elastic_train.py (default: demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default: 0)")
    parser.add_argument(
        "--collective-timeout", type=float, default=15.0, help="FSDP_AC_TIMEOUT_S of the ranks (default: 15)"
    )
    parser.add_argument(
        "--replan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="resume each restart with a random parallelism and AC strategy (default: on)",
    )
    parser.add_argument(
        "--shared-store",
        action="store_true",
        help="keep torchrun's default store shared across restarts (shows the stale-address trap)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument(
        "--keep-failed",
        type=Path,
        default=Path("build/soak_failures"),
        help="where the logs and events of failed rounds are kept (default: build/soak_failures)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.faults < args.steps:
        parser.error(f"--faults must be at least 1 and below --steps ({args.steps}), got {args.faults}.")
    return args


def schedule(rng: random.Random, steps: int, faults: int) -> list[str]:
    """``faults`` random ``KIND@RANK:STEP`` items at increasing steps, so that each one happens."""
    at = sorted(rng.sample(range(1, steps), faults))
    return [f"{rng.choice(FAULTS)}@{rng.randrange(2)}:{step}" for step in at]


def trained_steps(launch: Launch, steps: int) -> int:
    """Optimizer steps the ranks computed, redone ones included, from the attempts' events.

    An attempt trains from its start step up to its fault: a hang stops before its step's update; the
    other faults after it (a save that dies still follows a finished update).
    """
    starts = [event["step"] for event in launch.events if event["event"] in ("start", "resume")]
    faults = launch.of("fault")
    total = 0
    for index, start in enumerate(starts):
        if index < len(faults):
            fault = faults[index]
            total += fault["step"] - start + (fault["kind"] != "hang")
        else:
            total += steps - start
    return total


def run_round(
    index: int, args: argparse.Namespace, rng: random.Random, root: Path, common: list[str]
) -> Launch:
    faults = schedule(rng, args.steps, args.faults)
    plans = ["fsdp2"], ["full"]
    if args.replan:
        plans = (
            ["fsdp2", *(rng.choice(PARALLELS) for _ in faults)],
            ["full", *(rng.choice(AC_STRATEGIES) for _ in faults)],
        )
    print(f"round {index}: faults {faults}, parallel {plans[0]}, ac {plans[1]}", flush=True)
    return torchrun(
        root / f"round{index}",
        *common,
        *("--parallel", ",".join(plans[0]), "--ac", ",".join(plans[1]), "--fault", ",".join(faults)),
        max_restarts=args.faults,
        env=_env(args),
        timeout_s=300 + args.faults * 2 * args.collective_timeout,
    )


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = {"FSDP_AC_TIMEOUT_S": str(args.collective_timeout)}
    if args.shared_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "0"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # `timeout` and schedulers stop with SIGTERM: end like Ctrl-C, so that the launch in flight is
    # killed (agents and ranks run in sessions of their own) and the summary is still printed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    rng = random.Random(args.seed)
    started = time.monotonic()
    common = ["--steps", str(args.steps), "--size", args.size]
    summary: dict[str, Any] = collections.defaultdict(int)
    restarts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fsdp_ac_soak_") as tmp:
        root = Path(tmp)
        reference = torchrun(root / "reference", *common, "--ac", "full", max_restarts=0, env=_env(args))
        if reference.final is None or reference.returncodes != [0]:
            print(f"The fault-free reference run failed:\n{reference.report()}", file=sys.stderr)
            return 1
        print(f"reference: {args.steps} steps in {reference.seconds:.0f} s", flush=True)
        index, longest = 0, reference.seconds
        # No round starts that would likely end past the deadline: the soak keeps to its minutes.
        while time.monotonic() - started + longest < args.minutes * 60:
            try:
                launch = run_round(index, args, rng, root, common)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: run_round killed its launch; report so far
                summary["interrupted"] = True
                break
            longest = max(longest, launch.seconds)
            faults = launch.of("fault")
            restarts.update(fault["kind"] for fault in faults)
            # A restart no injected fault explains: the agent restarted more often than faults were made.
            restarts["unplanned"] += max(len(launch.of("resume")) - len(faults), 0)
            done = trained_steps(launch, args.steps) if launch.final is not None else 0
            summary["steps"] += done
            summary["lost_steps"] += max(done - args.steps, 0)
            problems = mismatches(launch.final, reference.final)
            if launch.returncodes != [0] or problems:
                failures.append(f"round {index}: {problems[:3]}\n{launch.report()}")
                summary.setdefault("failures", []).append(f"round {index}: {launch.diagnosis()}")
                # The round's directory goes with the temporary one: keep what explains the failure.
                shutil.copytree(
                    root / f"round{index}",
                    args.keep_failed / f"round{index}",
                    ignore=shutil.ignore_patterns("checkpoints", "*.pt"),
                    dirs_exist_ok=True,
                )
            verdict = "ok" if launch.returncodes == [0] and not problems else f"FAILED: {launch.diagnosis()}"
            print(
                f"round {index}: {verdict} in {launch.seconds:.0f} s, "
                f"{len(launch.of('resume'))} restarts, {done} steps trained",
                flush=True,
            )
            index += 1
    summary.update(
        minutes=round((time.monotonic() - started) / 60, 1),
        rounds=index,
        steps_per_round=args.steps,
        restarts=dict(restarts),
        rounds_failed=len(failures),
        final_check=(
            f"{len(failures)} rounds differ or failed"
            if failures
            else "bitwise equal to the fault-free run"
            if index
            else "no round ran"
        ),
    )
    for failure in failures:
        print(failure, file=sys.stderr)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
