"""The correctness matrix: DDP, FSDP1, FSDP2 x activation wrappers x nesting orders x state dicts (2 ranks).

Each test launches ``FSDP_AC_NPROC`` ranks (default 2; gloo on CPU, NCCL with a GPU per rank) once
for one parallel setup and runs every cell of its row as a sub-case: the setup without AC (the row's
baseline), then each activation wrapper applied before and after the parallel wrapper. Every cell
trains the reference GPT for three Adam steps and is checked for:

- the nesting: the wrappers sit where the order of application puts them;
- recomputation: backward runs each block's forward again exactly when the wrapper recomputes;
- ranks: parameters, optimizer state and gradients identical on every rank, bitwise;
- AC changes nothing: losses, first-step gradients, parameters and optimizer state equal the row's
  baseline bitwise (recomputation replays the same kernels on the same inputs);
- the reference: the baseline agrees with the unwrapped model trained in one process on the whole
  global batch (same data, same seed) within the tolerances below;
- names: every state dict the setup offers (``get_model_state_dict`` and
  ``get_optimizer_state_dict``, sharded and full; ``state_dict()``; FSDP1's FULL and SHARDED state
  dicts and ``FSDP.optim_state_dict``) holds exactly the unwrapped model's keys, and no key holds
  ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module`` or ``_orig_mod``.

A failing cell does not hide the others: each test reports every failing cell of its row.
``test_matrix_with_torch_compile`` adds torch.compile in both nestings. Nestings that torch cannot
save or load correctly are refused by fsdp_ac at wrap time (:func:`torch_limitation`,
``tests/test_wrappers.py``) and are not cells: AC before FSDP1 uses ``fsdp_ac.ModulePolicy``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from launcher import RankContext, run_on_ranks
from training import (
    AC_WRAPPERS,
    COMPILE_BACKEND,
    CONFIG,
    LR,
    STEPS,
    WRAPPER_SEGMENTS,
    Setup,
    build,
    digest,
    expected_nesting,
    first_layer_nesting,
    full_optimizer_state,
    full_parameters,
    lm_loss,
    optimizer_tensors,
    rank_batches,
    root_parameter_names,
    saved_keys,
    train,
    train_single_process,
)

from fsdp_ac import checkpoint_wrapper
from fsdp_ac.environment import suite_nproc
from fsdp_ac.reference_model import GPT, TransformerBlock

pytestmark = pytest.mark.distributed

REFERENCE_ATOL = 1e-5
"""Distributed vs single-process parameters after STEPS Adam steps, fp32 (see assert_matches_reference)."""
LOSS_RTOL = 1e-6
"""Mean of the ranks' losses vs the single-process loss, fp32: a few ulps."""
GRAD_RTOL = 1e-5
"""First-step gradients vs the single-process run, fp32, relative to each tensor's largest entry.
They differ by the summation order of the reduction only, about 2e-7 relative."""
BF16_LOSS_RTOL = 1e-3
"""bf16 compute (FSDP2 ``MixedPrecisionPolicy``) vs the fp32 reference: bf16 keeps 8 significant
bits (relative rounding 2**-9 = 2e-3 per op); the loss averages 64 positions, measured 5e-5."""
BF16_GRAD_RTOL = 5e-2
"""bf16 first-step gradients vs fp32: relative L2 error per tensor, measured up to 1.1e-2."""
BF16_UPDATE_RTOL = 0.25
"""bf16 parameters after STEPS steps vs fp32: the difference, relative (L2, per tensor) to how far
training moved the fp32 parameters; measured up to 0.13 (a bias with small updates). Adam normalises
each step to about LR, so a gradient whose bf16 rounding flips its sign changes the step by up to
2 LR: elementwise bounds would be either loose or flaky."""

FSDP1_NESTED_WRAPPERS_LIMITATION = (
    "torch 2.13: FSDP1 without use_orig_params finds the module that holds its flat parameter through "
    "FullyShardedDataParallel.module, which unwraps one activation wrapper only. With two inside the "
    "unit (offload around checkpoint, applied after FSDP1), the FULL state dict keeps a stray "
    "'layers.0._flat_param' and get_model_state_dict raises 'layers.0._flat_param contains "
    "_flat_param'. The same with torch's own wrappers; applied before FSDP1 (the wrappers outside the "
    "unit) it works. fsdp_ac's apply_activation_checkpointing refuses it at wrap time "
    "(tests/test_wrappers.py::test_two_wrappers_inside_an_fsdp1_flat_unit_are_refused)."
)


def torch_limitation(setup: Setup) -> str | None:
    """Why torch cannot run ``setup``: cells the rows leave out, refused by fsdp_ac at wrap time."""
    if (
        setup.parallel == "fsdp1"
        and not setup.use_orig_params
        and setup.ac == "offload_checkpoint"
        and not setup.ac_first
    ):
        return FSDP1_NESTED_WRAPPERS_LIMITATION
    return None


PARALLEL_SETUPS = {
    "ddp": Setup("ddp"),
    "fsdp1-orig_params-full_shard": Setup("fsdp1"),
    "fsdp1-orig_params-shard_grad_op": Setup("fsdp1", sharding="SHARD_GRAD_OP"),
    "fsdp1-flat_params-full_shard": Setup("fsdp1", use_orig_params=False),
    "fsdp1-flat_params-shard_grad_op": Setup("fsdp1", use_orig_params=False, sharding="SHARD_GRAD_OP"),
    "fsdp2-reshard": Setup("fsdp2"),
    "fsdp2-no_reshard": Setup("fsdp2", reshard_after_forward=False),
    "fsdp2-bf16": Setup("fsdp2", bf16=True),
}
"""One row of the matrix each: the parallel wrapper and its options."""

COMPILE_PARALLEL = ("ddp", "fsdp1-orig_params-full_shard", "fsdp2-reshard")
"""Rows that also run with torch.compile (FSDP1 supports compile only with use_orig_params)."""


def row(base: Setup) -> list[Setup]:
    """The baseline without AC, then every activation wrapper after and before the parallel wrapper.

    Cells that torch cannot run (:func:`torch_limitation`) are left out: fsdp_ac refuses them at wrap
    time, which tests/test_wrappers.py checks.
    """
    # AC before FSDP1 goes with fsdp_ac's policy, which makes FSDP(CheckpointWrapper(block)); with
    # torch's, FSDP1 would nest the unit inside the wrapper, which fsdp_ac refuses (tests/test_wrappers.py).
    policy = "fsdp_ac" if base.parallel == "fsdp1" else base.fsdp1_policy
    cells = [
        dataclasses.replace(base, ac=ac, ac_first=first, fsdp1_policy=policy if first else base.fsdp1_policy)
        for ac in AC_WRAPPERS
        for first in (False, True)
    ]
    return [base, *(cell for cell in cells if torch_limitation(cell) is None)]


def compile_row(base: Setup) -> list[Setup]:
    """Compiled blocks without AC (the baseline), AC around compiled blocks, then compiled layers
    around AC (AC applied before and after the parallel wrapper)."""
    first = dataclasses.replace(base, fsdp1_policy="fsdp_ac") if base.parallel == "fsdp1" else base
    return [
        dataclasses.replace(base, compile="inside"),
        dataclasses.replace(first, ac="no_reentrant", compile="inside"),
        dataclasses.replace(first, ac="no_reentrant", compile="outside"),
        dataclasses.replace(base, ac="no_reentrant", ac_first=False, compile="outside"),
    ]


def cell_on_rank(ctx: RankContext, setup: Setup) -> dict[str, Any]:
    """Trains one cell; every rank returns digests and names, rank 0 the tensors too."""
    trained = train(ctx, setup)
    params = full_parameters(trained.model)
    optimizer = optimizer_tensors(full_optimizer_state(trained.model, trained.optimizer))
    result: dict[str, Any] = {
        "nesting": first_layer_nesting(trained.model),
        "gelu_calls": trained.gelu_calls,
        "losses": trained.losses,
        "digests": {
            "params": digest(params),
            "optimizer": digest(optimizer),
            "first_grads": digest(trained.first_grads),
        },
        "keys": saved_keys(trained.model, trained.optimizer, setup),
        "parameter_names": root_parameter_names(trained.model),
    }
    if ctx.rank == 0:
        result.update(params=params, optimizer=optimizer, first_grads=trained.first_grads)
    return result


@functools.cache
def reference(nproc: int) -> dict[str, Any]:
    result = train_single_process(nproc)
    torch.manual_seed(0)
    result["initial_params"] = GPT(CONFIG).state_dict()
    return result


# --- checks ------------------------------------------------------------------------------------------


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert list(actual) == list(expected), what
    for name, value in actual.items():
        torch.testing.assert_close(
            value, expected[name], rtol=0, atol=0, msg=lambda m, n=name: f"{what}, {n}: {m}"
        )


def without_key_biases(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the attention key biases.

    Their gradient is zero analytically (softmax ignores a shift shared by all keys), so it is pure
    rounding noise, about 1e-9, and Adam's normalised update turns that noise into steps of up to LR
    whose sign depends on summation order. Only comparisons with the single-process run, whose order
    differs, leave them out; they never change the model's output.
    """
    kept = dict(tensors)
    for name, value in tensors.items():
        if name.endswith("attn.qkv.bias"):
            query, _, value_ = value.split(CONFIG.d_model)
            kept[name] = torch.cat([query, value_])
    return kept


def assert_matches_reference(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Parameters agree with the single-process run to REFERENCE_ATOL, but for Adam's amplified noise.

    A weight whose gradient is nearly zero gets an Adam step whose size is about LR whatever the
    gradient's magnitude, so fp32 rounding noise in its gradient can move it by up to LR per step in
    either direction. Such weights are rare; a real defect moves many. So at most 0.1% of each
    tensor's elements may differ by more than REFERENCE_ATOL, and none by more than one step per step.
    """
    assert list(actual) == list(expected)
    for name, value in actual.items():
        diff = (value - expected[name]).abs()
        noisy = (diff > REFERENCE_ATOL).float().mean().item()
        assert noisy <= 1e-3, f"{name}: {noisy:.2%} of elements differ by more than {REFERENCE_ATOL}"
        assert diff.max().item() <= LR * STEPS, f"{name}: differs by {diff.max().item():g}"


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in actual.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(
            value, expected[name], rtol=0, atol=GRAD_RTOL * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def relative_l2(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    return ((actual - expected).norm() / scale.norm().clamp_min(1e-30)).item()


def check_bf16_against_reference(result: dict[str, Any], ref: dict[str, Any], losses: torch.Tensor) -> None:
    torch.testing.assert_close(losses, ref["losses"], rtol=BF16_LOSS_RTOL, atol=0)
    grads = without_key_biases(result["first_grads"])
    for name, expected in without_key_biases(ref["first_grads"]).items():
        error = relative_l2(grads[name], expected, expected)
        assert error <= BF16_GRAD_RTOL, f"first-step gradient of {name}: relative error {error:.3g}"
    params = without_key_biases(result["params"])
    initial = without_key_biases(ref["initial_params"])
    for name, expected in without_key_biases(ref["params"]).items():
        error = relative_l2(params[name], expected, expected - initial[name])
        assert error <= BF16_UPDATE_RTOL, f"{name}: differs by {error:.3g} of the fp32 update"


def check_against_reference(setup: Setup, per_rank: list[dict[str, Any]], ref: dict[str, Any]) -> None:
    """The baseline agrees with the single-process run (see the tolerances at the top)."""
    mean_losses = torch.stack([result["losses"] for result in per_rank]).mean(0)
    if setup.bf16:
        check_bf16_against_reference(per_rank[0], ref, mean_losses)
        return
    torch.testing.assert_close(mean_losses, ref["losses"], rtol=LOSS_RTOL, atol=0)
    assert_grads_close(without_key_biases(per_rank[0]["first_grads"]), without_key_biases(ref["first_grads"]))
    assert_matches_reference(without_key_biases(per_rank[0]["params"]), without_key_biases(ref["params"]))


def check_names(setup: Setup, result: dict[str, Any], ref: dict[str, Any]) -> None:
    """Every saved key is the unwrapped model's, and no key carries a wrapper's attribute name."""
    for method, keys in result["keys"].items():
        leaked = [key for key in keys if any(segment in key for segment in WRAPPER_SEGMENTS)]
        assert not leaked, f"{method} leaks wrapper names: {leaked[:3]}"
        if "optim" in method:
            # FSDP1 lists the members of its flat parameters in its own order: compared sorted.
            assert sorted(keys) == sorted(ref["param_names"]), f"{method}: {sorted(keys)}"
        else:
            assert keys == ref["state_dict_keys"], f"{method}: {keys}"
    if not (setup.parallel == "fsdp1" and not setup.use_orig_params):
        # FSDP1 without use_orig_params registers flat parameters instead of the model's own.
        assert result["parameter_names"] == ref["param_names"], "named_parameters() from the root"


def check_cell(
    setup: Setup, per_rank: list[dict[str, Any]], baseline: list[dict[str, Any]], ref: dict[str, Any]
) -> None:
    for rank, result in enumerate(per_rank):
        assert result["nesting"] == expected_nesting(setup), f"rank {rank}: nesting {result['nesting']}"
        if result["gelu_calls"] is not None:
            # One GELU per block forward; with recomputation, backward runs it again (AC that did
            # nothing would pass every equality below).
            runs = 2 if setup.recomputes else 1
            assert result["gelu_calls"] == STEPS * CONFIG.n_layers * runs, f"rank {rank}: GELU calls"
        assert result["digests"] == per_rank[0]["digests"], f"rank {rank} differs from rank 0"
        torch.testing.assert_close(result["losses"], baseline[rank]["losses"], rtol=0, atol=0)
        check_names(setup, result, ref)
    for what in ("first_grads", "params", "optimizer"):
        assert_bitwise(per_rank[0][what], baseline[0][what], f"{what} vs the baseline without AC")


def check_row(setups: list[Setup], results: list[list[dict[str, Any]]]) -> None:
    """Checks every cell; fails once, listing every failing cell with its first failed check."""
    ref = reference(len(results[0]))
    baseline = results[0]
    failures = []
    for setup, per_rank in zip(setups, results, strict=True):
        try:
            if setup is setups[0]:
                check_against_reference(setup, per_rank, ref)
            check_cell(setup, per_rank, baseline, ref)
        except AssertionError as error:
            failures.append(f"{setup!r}: {error}")
    assert not failures, f"{len(failures)} of {len(setups)} cells failed:\n\n" + "\n\n".join(failures)


# --- the tests --------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("parallel", PARALLEL_SETUPS)
def test_matrix_row(parallel: str) -> None:
    setups = row(PARALLEL_SETUPS[parallel])
    check_row(setups, run_on_ranks(cell_on_rank, setups, timeout_s=500))


@pytest.mark.timeout(600)
def test_matrix_with_torch_compile() -> None:
    """AC inside and outside compiled code, for DDP, FSDP1 and FSDP2, with the aot_eager backend.

    A subset: NO_REENTRANT only, since compiling is the slow part on CPU (inductor's C++ code
    generation takes about 25 s per block on two cores; aot_eager keeps Dynamo and AOT autograd,
    where checkpointing meets the compiler). Each row's baseline is the compiled model without AC.
    """
    rows = [compile_row(PARALLEL_SETUPS[name]) for name in COMPILE_PARALLEL]
    setups = [setup for cells in rows for setup in cells]
    results = run_on_ranks(cell_on_rank, setups, timeout_s=500)
    failures = []
    for index, cells in enumerate(rows):
        start = index * len(cells)
        try:
            check_row(cells, results[start : start + len(cells)])
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n\n".join(failures)


def gpu_activation_bytes_on_rank(ctx: RankContext, setup: Setup) -> int:
    """CUDA memory that the first step's forward and loss hold for backward on this rank."""
    model = build(ctx, setup)
    tokens = rank_batches(ctx, setup)[0]
    before = torch.cuda.memory_allocated(ctx.device)
    loss = lm_loss(model, tokens)
    held = torch.cuda.memory_allocated(ctx.device) - before
    loss.backward()
    return held


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    torch.cuda.device_count() < suite_nproc(), reason="needs a CUDA GPU per rank (FSDP_AC_NPROC)"
)
def test_offload_keeps_activations_off_the_gpu() -> None:
    """Offloading frees GPU memory; the rows check that it changes nothing (on CPU, where their
    offload cells copy CPU tensors into separate CPU memory, too)."""
    base = PARALLEL_SETUPS["fsdp2-reshard"]
    setups = [base, *(dataclasses.replace(base, ac=ac) for ac in ("offload", "offload_checkpoint"))]
    setups.append(dataclasses.replace(base, ac="offload", ac_first=False))
    results = run_on_ranks(gpu_activation_bytes_on_rank, setups)
    for setup, per_rank in zip(setups[1:], results[1:], strict=True):
        for rank, held in enumerate(per_rank):
            assert held < results[0][rank], (
                f"{setup!r} on rank {rank}: {held} bytes, {results[0][rank]} without"
            )


def _compile_and_step(wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> dict[str, int]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    block = wrap(TransformerBlock(CONFIG))
    block.compile(backend=COMPILE_BACKEND)
    block(torch.randn(2, 8, CONFIG.d_model, requires_grad=True)).sum().backward()
    outcome = {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }
    torch._dynamo.reset()
    return outcome


def test_torch_checkpoint_wrapper_compiles_into_one_graph() -> None:
    """The premise of the next test: torch's own wrapper compiles without a graph break."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper as torch_wrapper,
    )

    assert _compile_and_step(torch_wrapper) == {"graphs": 1, "graph_breaks": 0}


def test_fsdp_ac_checkpoint_wrapper_compiles_into_one_graph() -> None:
    assert _compile_and_step(checkpoint_wrapper) == {"graphs": 1, "graph_breaks": 0}
