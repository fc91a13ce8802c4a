"""Mutation smoke test: breaks fsdp_ac on purpose, one way at a time, and checks that the tests notice.

Run it as ``make mutants`` (``python tests/tools/mutants.py [KEY ...]``). For each mutant (a deliberate
breakage, below), the script copies the ``fsdp_ac`` package into a temporary directory, applies the
breakage there, and runs the tests chosen to catch it with that copy imported instead of the
package: the copy's directory is the working directory and comes first on ``PYTHONPATH``, so the
pytest process and the ranks that tests/distributed's launcher starts under torchrun (which inherit
both) import the broken copy. A mutant is *killed* when at least one of its tests fails, and
*survives* when they all pass.

Before any mutant, every anchor is checked (it must match exactly as often as stated, and the broken
module must still compile), and all the chosen tests run once on an unbroken copy, which must pass:
a test that fails anyway kills nothing. The script prints a table (mutant, tests run, tests failed,
result, time) and the failing tests of each mutant, and exits with status 1 if a mutant survived, an
anchor no longer matches (``anchor not found, update mutant X``), or the baseline failed.

Mutants are defined by anchors in the source (a regular expression and its replacement), so a
rewrite of the code they break makes the script fail loudly instead of testing nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "fsdp_ac"


@dataclass(frozen=True)
class Edit:
    """One substitution in one file of the package."""

    path: str
    """The file, relative to the package directory (``wrappers.py``)."""
    anchor: str
    """A regular expression (``re.MULTILINE | re.DOTALL``) that finds the code to break."""
    replacement: str
    """What replaces each match (``re.sub`` syntax: ``\\g<name>`` for a group)."""
    count: int = 1
    """How many times the anchor must match; any other number means the code changed."""


def literal(path: str, old: str, new: str, count: int = 1) -> Edit:
    """An edit that replaces the exact text ``old`` with ``new``."""
    return Edit(path, re.escape(old), new.replace("\\", "\\\\"), count)


def returns_early(path: str, function: str) -> Edit:
    """An edit that makes ``function`` (or method) return None before its first statement.

    Anchored on the ``def`` line and the docstring only, so the function's body may be rewritten.
    """
    anchor = rf'^(?P<indent> *)def {function}\(.*?:\n(?: +""".*?"""\n)?'
    return Edit(path, anchor, r"\g<0>\g<indent>    return\n")


@dataclass(frozen=True)
class Mutant:
    """A deliberate breakage of the package and the tests that must catch it."""

    key: str
    breakage: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    """pytest node ids or files, relative to the repository root."""


RECOMPUTE_TESTS = "tests/test_recompute.py::"
REPLAY_TESTS = "tests/test_replay.py::"
NAMES_TESTS = "tests/test_names.py::"
WRAPPER_TESTS = "tests/test_wrappers.py::"
POLICY_TESTS = "tests/test_policies.py::"
ENGINE_TESTS = "tests/test_offload_engine.py::"
NO_REENTRANT = "[CheckpointImpl.NO_REENTRANT]"
REENTRANT = "[CheckpointImpl.REENTRANT]"

MUTANTS = (
    Mutant(
        "a",
        "NO_REENTRANT checkpointing a no-op: the eager wrapper runs the module directly",
        (
            Edit(
                "wrappers.py",
                r'return self\.checkpoint_fn\(region, \*args(?:, determinism_check="none")?, \*\*kwargs\)',
                "return wrapped(*args, **kwargs)",
                count=2,
            ),
        ),
        (
            WRAPPER_TESTS + "test_gradients_equal_no_ac_bitwise[no_reentrant]",
            WRAPPER_TESTS + "test_keyword_arguments_reach_the_module" + NO_REENTRANT,
            RECOMPUTE_TESTS + "test_dropout_gradients_equal_no_ac_bitwise" + NO_REENTRANT,
            POLICY_TESTS + "test_every_input_form_selects_the_blocks[class_set]",
        ),
    ),
    Mutant(
        "a2",
        "compiled NO_REENTRANT checkpointing a no-op: under torch.compile the wrapper runs the module",
        (
            literal(
                "wrappers.py",
                "return self.checkpoint_fn(wrapped, *args, **kwargs)",
                "return wrapped(*args, **kwargs)",
            ),
        ),
        (WRAPPER_TESTS + "test_compiles_into_one_graph_with_correct_gradients",),
    ),
    Mutant(
        "b",
        "REENTRANT checkpointing a no-op: the wrapper runs the module directly",
        (
            literal(
                "wrappers.py",
                "return _reentrant_call(self.checkpoint_fn, region, args, kwargs)",
                "return wrapped(*args, **kwargs)",
            ),
        ),
        (
            WRAPPER_TESTS + "test_gradients_equal_no_ac_bitwise[reentrant]",
            WRAPPER_TESTS + "test_keyword_arguments_reach_the_module" + REENTRANT,
            RECOMPUTE_TESTS + "test_reentrant_trains_a_region_whose_inputs_need_no_gradient",
            RECOMPUTE_TESTS + "test_dropout_gradients_equal_no_ac_bitwise" + REENTRANT,
        ),
    ),
    Mutant(
        "c",
        "RNG state not preserved: preserve_rng_state=False forced in every checkpoint call",
        (
            literal(
                "wrappers.py",
                "self.checkpoint_fn(region, *args,",
                "self.checkpoint_fn(region, *args, preserve_rng_state=False,",
                count=2,
            ),
            literal(
                "wrappers.py",
                "_reentrant_call(self.checkpoint_fn, region,",
                "_reentrant_call(partial(self.checkpoint_fn, preserve_rng_state=False), region,",
            ),
        ),
        (
            RECOMPUTE_TESTS + "test_dropout_gradients_equal_no_ac_bitwise" + NO_REENTRANT,
            RECOMPUTE_TESTS + "test_dropout_gradients_equal_no_ac_bitwise" + REENTRANT,
        ),
    ),
    Mutant(
        "d",
        "replay flag never set: is_recomputing() stays False during the replay",
        (literal("recompute.py", "_RECOMPUTING.set(True)", "_RECOMPUTING.set(False)"),),
        (
            REPLAY_TESTS + "test_is_recomputing_is_true_in_forward_code_during_a_real_replay" + NO_REENTRANT,
            REPLAY_TESTS + "test_is_recomputing_is_true_in_forward_code_during_a_real_replay" + REENTRANT,
            REPLAY_TESTS + "test_replay_hook_overrides_the_rule_in_both_directions" + NO_REENTRANT,
        ),
    ),
    Mutant(
        "e",
        "no-grad bypass removed: calls without autograd go through the checkpoint path",
        (
            Edit(
                "wrappers.py",
                # The wrapper's own check, the one followed by its offload option (the offload
                # wrapper has the same two lines).
                r"^ +if not torch\.is_grad_enabled\(\):\n +return wrapped\(\*args, \*\*kwargs\)\n"
                r"(?= +if self\.offload is None:)",
                "",
            ),
        ),
        (
            REPLAY_TESTS + "test_no_grad_and_inference_calls_run_the_module_directly" + NO_REENTRANT,
            REPLAY_TESTS + "test_no_grad_and_inference_calls_run_the_module_directly" + REENTRANT,
        ),
    ),
    Mutant(
        "f",
        "offload a no-op: the saved-tensor hooks return every tensor as it is",
        (
            Edit(
                "offload.py",
                r"saved_tensors_hooks\(\w+, \w+\)",
                "saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor)",
                count=2,  # the synchronous path and the engine's
            ),
        ),
        # On the CPU only the test modes that copy CPU tensors can see offloading; their tests live here.
        ("tests/test_offload.py", "tests/test_offload_engine.py"),
    ),
    Mutant(
        "g",
        "state-dict prefix hook off: strip_prefix_on_save does nothing",
        (returns_early("names.py", "strip_prefix_on_save"),),
        (
            NAMES_TESTS + "test_root_wrapper_names_are_clean",
            NAMES_TESTS + "test_saved_metadata_uses_clean_names",
        ),
    ),
    Mutant(
        "h",
        "legacy keys not loaded: restore_prefix_on_load prefixes _checkpoint_wrapped_module keys again",
        (literal("names.py", " and not k.startswith(wrapped_prefix)", ""),),
        (  # keys with the wrapper prefix once and twice (a nested wrapper)
            NAMES_TESTS + "test_load_accepts_clean_and_legacy_keys_without_doubling[1]",
            NAMES_TESTS + "test_load_accepts_clean_and_legacy_keys_without_doubling[2]",
        ),
    ),
    Mutant(
        "h2",
        "load prefix hook off: restore_prefix_on_load does nothing (clean keys do not load)",
        (returns_early("names.py", "restore_prefix_on_load"),),
        (  # clean keys, and legacy keys through one of two nested wrappers
            NAMES_TESTS + "test_load_accepts_clean_and_legacy_keys_without_doubling[0]",
            NAMES_TESTS + "test_load_accepts_clean_and_legacy_keys_without_doubling[1]",
        ),
    ),
    Mutant(
        "i",
        "replay rule off: every hook that is not torch.distributed's is skipped in the replay",
        (
            Edit(
                "recompute.py",
                r"(?P<indent> +)decisions = self\._hook_log\.get\(",
                r"\g<indent>return _skip\n\g<0>",
            ),
        ),
        (
            REPLAY_TESTS + "test_value_changing_hooks_replay_and_observing_hooks_run_once" + NO_REENTRANT,
            REPLAY_TESTS + "test_value_changing_hooks_replay_and_observing_hooks_run_once" + REENTRANT,
            REPLAY_TESTS + "test_a_hook_that_replaces_a_module_tensor_replays" + NO_REENTRANT,
        ),
    ),
    Mutant(
        "j",
        "mutated buffers not restored after the replay",
        (Edit("recompute.py", r"snapshot = \[.*?\]\n", "snapshot = []\n"),),
        (
            RECOMPUTE_TESTS + "test_batchnorm_statistics_update_once_per_step" + NO_REENTRANT,
            RECOMPUTE_TESTS + "test_batchnorm_statistics_update_once_per_step" + REENTRANT,
            REPLAY_TESTS + "test_only_buffers_the_forward_mutates_are_restored" + NO_REENTRANT,
        ),
    ),
    Mutant(
        "k",
        "random-op guard off: random ops with preserve_rng_state=False are not refused",
        (Edit("recompute.py", r"guard = _RandomOpGuard\(.*?\n", "guard = _NO_CONTEXT\n"),),
        (RECOMPUTE_TESTS + "test_random_op_without_rng_state_is_refused_unless_allowed",),
    ),
    Mutant(
        "l",
        "saved-tensor audit off: a replay that differs from the forward is not named",
        (
            Edit(
                "recompute.py",
                r"audit = self\._audit\.comparing\(\) if .*?\n",
                "audit = _NO_CONTEXT\n",
            ),
            literal("recompute.py", "self._audit.check_count()", "pass"),
        ),
        (
            RECOMPUTE_TESTS + "test_a_replay_with_other_shapes_names_the_region",
            RECOMPUTE_TESTS + "test_optional_value_check_catches_a_replay_with_other_values",
        ),
    ),
    Mutant(
        "o1",
        "offload engine releases by host polling: originals go once the host sees their copies done",
        (
            literal(
                "offload.py",
                "while len(self._stash) > 1:",
                "while len(self._stash) > 1 and all(c.copied.query() for c in self._stash[0].copies):",
            ),
        ),
        (ENGINE_TESTS + "test_a_lagging_device_frees_originals_in_stream_order_and_holds_only_the_stash",),
    ),
    Mutant(
        "o1b",
        "offload engine lets go of an original without the compute stream waiting for its copy",
        (Edit("offload.py", r"copy\.transfers\.wait\(copy\.copied, [^\n]*\n", "pass\n"),),
        (ENGINE_TESTS + "test_a_lagging_device_frees_originals_in_stream_order_and_holds_only_the_stash",),
    ),
    Mutant(
        "o2",
        "offload engine prefetches a block's copies in forward order",
        (literal("offload.py", "for copy in reversed(earlier.copies):", "for copy in earlier.copies:"),),
        (ENGINE_TESTS + "test_reloads_go_in_backward_order_last_saved_first",),
    ),
    Mutant(
        "o2b",
        "offload engine prefetch skips copies the host does not see done (and marks the block reloading)",
        (
            literal(
                "offload.py",
                "if copy.source is None and copy.reload is None:",
                "if copy.source is None and copy.reload is None and copy.copied.query():",
            ),
        ),
        (ENGINE_TESTS + "test_backward_prefetches_one_block_ahead[offload]",),
    ),
    Mutant(
        "o3",
        "offload copies autocast's casts of the weights",
        (Edit("offload.py", r"return Decision\.WEIGHT_CAST", "pass"),),
        (ENGINE_TESTS + "test_autocast_weight_casts_stay_and_only_activations_move",),
    ),
    Mutant(
        "o4",
        "offload engine copies an expanded view at its full size (every tensor compacted)",
        (literal("offload.py", "span = None if end - offset > numel else (offset, end)", "span = None"),),
        (ENGINE_TESTS + "test_an_expanded_view_is_copied_at_its_storage_size_and_rebuilt_as_the_same_view",),
    ),
    Mutant(
        "o4b",
        "offload engine copies one storage once per save",
        (Edit("offload.py", r"copy = block\.storages\.get\(.*?\n", "copy = None\n"),),
        (ENGINE_TESTS + "test_one_storage_saved_twice_is_copied_once",),
    ),
    Mutant(
        "o5",
        "offload pool counts the bytes asked for, not what the pinned allocator holds",
        (literal("offload.py", "return 1 << max(nbytes - 1, 0).bit_length() if pinned else", "return"),),
        (ENGINE_TESTS + "test_the_pool_counts_pinned_buffers_as_the_allocator_rounds_them",),
    ),
    Mutant(
        "o5b",
        "offload pool keeps the buffers of every size for ever",
        (literal("offload.py", "self._drop(lambda buffer: buffer.step < self.step)", "pass"),),
        (ENGINE_TESTS + "test_sequence_lengths_that_change_every_step_do_not_grow_the_pool[no_cap]",),
    ),
    Mutant(
        "o6",
        "offload copies during CUDA graph capture",
        (
            literal(
                "offload.py",
                "if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():",
                "if False:",
            ),
        ),
        (
            ENGINE_TESTS + "test_offloading_under_cuda_graph_capture_raises_naming_the_fix[synchronous]",
            ENGINE_TESTS + "test_offloading_under_cuda_graph_capture_raises_naming_the_fix[engine]",
        ),
    ),
)


class MutantError(Exception):
    """A mutant cannot be applied as defined: the code it breaks has changed."""


def apply(mutant: Mutant, package: Path) -> None:
    """Applies ``mutant``'s edits to the package copy at ``package`` and checks that it compiles.

    Raises:
        MutantError: An anchor matches another number of times than stated, or a broken file no
            longer compiles.
    """
    sources: dict[Path, str] = {}
    for edit in mutant.edits:
        path = package / edit.path
        source = sources.get(path, path.read_text())
        pattern = re.compile(edit.anchor, re.MULTILINE | re.DOTALL)
        found = len(pattern.findall(source))
        if found != edit.count:
            raise MutantError(
                f"anchor not found, update mutant {mutant.key}: {PACKAGE}/{edit.path} matches "
                f"{edit.anchor!r} {found} time(s), expected {edit.count}."
            )
        sources[path] = pattern.sub(edit.replacement, source)
    for path, source in sources.items():
        try:
            compile(source, str(path), "exec")
        except SyntaxError as error:
            raise MutantError(f"mutant {mutant.key} does not compile ({error}); update its edits.") from error
        path.write_text(source)


@dataclass(frozen=True)
class Outcome:
    """What one pytest run of a mutant's tests gave."""

    ran: int
    failed: tuple[str, ...]
    returncode: int
    seconds: float
    output: str


def copy_package(directory: Path) -> Path:
    """Copies the package (without bytecode) into ``directory``; returns the copy's path."""
    target = directory / PACKAGE
    shutil.copytree(REPO / PACKAGE, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def environment(directory: Path) -> dict[str, str]:
    """The environment that makes Python processes import the package from ``directory``.

    ``PYTHONPATH`` reaches the ranks torchrun starts; the launcher also passes them pytest's own
    ``sys.path``, whose first entry, the working directory, is ``directory`` as well.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_import(directory: Path) -> None:
    """Fails unless a Python process started as the tests are imports the package from ``directory``."""
    found = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=directory,
        env=environment(directory),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(directory.resolve()):
        raise SystemExit(f"The tests would import {PACKAGE} from {found}, not from the copy in {directory}.")


def run_tests(directory: Path, tests: Iterable[str], timeout_s: float) -> Outcome:
    """Runs ``tests`` with the package imported from ``directory``."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "--no-header",
        "-p",
        "no:cacheprovider",
        *(str(REPO / test) for test in tests),
    ]
    start = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=directory,
            env=environment(directory),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout if isinstance(expired.stdout, str) else ""
        return Outcome(0, (f"(timed out after {timeout_s:.0f} s)",), -1, time.monotonic() - start, output)
    output = done.stdout + done.stderr
    failed = tuple(
        node_id(line.split(" - ")[0].split(" ", 1)[1], directory)
        for line in output.splitlines()
        if line.startswith(("FAILED ", "ERROR "))
    )
    outcomes = r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)"
    summaries = [line for line in output.splitlines() if re.search(outcomes + r".* in [\d.]+s", line)]
    ran = sum(int(number) for number, _ in re.findall(outcomes, summaries[-1] if summaries else ""))
    return Outcome(ran, failed, done.returncode, time.monotonic() - start, output)


def node_id(reported: str, directory: Path) -> str:
    """A test id as pytest reports it, relative to ``directory`` (its working directory), made
    relative to the repository."""
    path, _, rest = reported.partition("::")
    located = Path(os.path.normpath(directory / path))
    return f"{located.relative_to(REPO) if located.is_relative_to(REPO) else path}::{rest}"


def result(outcome: Outcome) -> str:
    """killed, survived, or error (pytest could not run the tests: collection or usage error)."""
    if outcome.returncode == -1:
        return "killed (timeout)"
    if outcome.returncode == 0:
        return "survived"
    return "killed" if outcome.returncode == 1 and outcome.failed else "error"


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("keys", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unbroken package")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)
    unknown = set(args.keys) - {m.key for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; known: {[m.key for m in MUTANTS]}")
    mutants = [m for m in MUTANTS if not args.keys or m.key in args.keys]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.key}: {mutant.breakage}")
            for test in mutant.tests:
                print(f"    {test}")
        return 0

    with tempfile.TemporaryDirectory(prefix="fsdp_ac_mutants_") as scratch:
        for mutant in mutants:  # every anchor first, so a stale one fails before minutes of tests
            directory = Path(scratch, f"check_{mutant.key}")
            try:
                apply(mutant, copy_package(directory))
            except MutantError as error:
                print(error, file=sys.stderr)
                return 1
        baseline = Path(scratch, "baseline")
        copy_package(baseline)
        check_import(baseline)
        if not args.no_baseline:
            tests = list(dict.fromkeys(test for mutant in mutants for test in mutant.tests))
            outcome = run_tests(baseline, tests, args.timeout)
            print(f"baseline (no mutant): {outcome.ran} tests, {outcome.seconds:.0f} s", flush=True)
            if outcome.returncode != 0:
                print(tail(outcome.output), file=sys.stderr)
                print("The chosen tests must pass without a mutant; fix them first.", file=sys.stderr)
                return 1

        rows: list[tuple[Mutant, Outcome]] = []
        for mutant in mutants:
            directory = Path(scratch, mutant.key)
            apply(mutant, copy_package(directory))
            outcome = run_tests(directory, mutant.tests, args.timeout)
            rows.append((mutant, outcome))
            print(f"{mutant.key}: {result(outcome)} ({outcome.seconds:.0f} s)", flush=True)
            if result(outcome) == "error":
                print(tail(outcome.output), file=sys.stderr)

    print("\n| mutant | breakage | tests run | failed | result | time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mutant, outcome in rows:
        print(
            f"| {mutant.key} | {mutant.breakage} | {outcome.ran} | {len(outcome.failed)} | "
            f"{result(outcome)} | {outcome.seconds:.0f} s |"
        )
    print("\nFailing tests per mutant:")
    for mutant, outcome in rows:
        print(f"  {mutant.key}: {', '.join(outcome.failed) or '-'}")
    bad = [mutant.key for mutant, outcome in rows if not result(outcome).startswith("killed")]
    if bad:
        print(
            f"\nNot killed: {', '.join(bad)}. Strengthen the tests that should catch them.", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
