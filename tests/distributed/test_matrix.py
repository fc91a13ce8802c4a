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
- the parallel wrappers: DDP, FSDP1 and FSDP2 (every fp32 row's baseline) train alike, rank by rank:
  bitwise on two ranks, within the reference tolerances on more (:func:`test_ddp_fsdp1_fsdp2_agree`);
- names: every state dict the setup offers (``get_model_state_dict`` and
  ``get_optimizer_state_dict``, sharded and full; ``state_dict()``; FSDP1's FULL and SHARDED state
  dicts and ``FSDP.optim_state_dict``) holds exactly the unwrapped model's keys, and no key holds
  ``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module`` or ``_orig_mod``.

A failing cell does not hide the others: each test reports every failing cell of its row.
``test_matrix_with_torch_compile`` adds torch.compile in both nestings. AC before FSDP1 runs with
torch's ``ModuleWrapPolicy`` in the FULL_SHARD rows (torch's recipe, ``CheckpointWrapper(FSDP(block))``;
``test_fsdp1_ac_first.py`` restores it with DCP) and with ``fsdp_ac.ModulePolicy`` in the SHARD_GRAD_OP
rows. The one nesting whose state dicts torch gets wrong, two activation wrappers inside an FSDP1 unit
without ``use_orig_params``, is refused by fsdp_ac at wrap time (:func:`torch_limitation`,
``tests/test_wrappers.py``) and is not a cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from launcher import RankContext, run_on_ranks
from suite_settings import suite_nproc
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
from fsdp_ac.offload import DEFAULT_MIN_OFFLOAD_BYTES
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
        and setup.ac in ("offload_checkpoint", "offload_checkpoint_engine")
        and not setup.ac_first
    ):
        return FSDP1_NESTED_WRAPPERS_LIMITATION
    return None


PARALLEL_SETUPS = {
    "ddp": Setup("ddp"),
    "fsdp1-orig_params-full_shard": Setup("fsdp1"),
    "fsdp1-orig_params-shard_grad_op": Setup("fsdp1", sharding="SHARD_GRAD_OP", fsdp1_policy="fsdp_ac"),
    "fsdp1-flat_params-full_shard": Setup("fsdp1", use_orig_params=False),
    "fsdp1-flat_params-shard_grad_op": Setup(
        "fsdp1", use_orig_params=False, sharding="SHARD_GRAD_OP", fsdp1_policy="fsdp_ac"
    ),
    "fsdp2-reshard": Setup("fsdp2"),
    "fsdp2-no_reshard": Setup("fsdp2", reshard_after_forward=False),
    "fsdp2-bf16": Setup("fsdp2", bf16=True),
}
"""One row of the matrix each: the parallel wrapper and its options. With AC first, FSDP1's auto-wrap
policy decides the nesting: torch's ``ModuleWrapPolicy`` (the FULL_SHARD rows) gives torch's recipe,
``CheckpointWrapper(FSDP(block))``; ``fsdp_ac.ModulePolicy`` (the SHARD_GRAD_OP rows) wraps the
checkpoint wrapper, ``FSDP(CheckpointWrapper(block))``, the nesting AC after FSDP1 gives."""

COMPILE_PARALLEL = ("ddp", "fsdp1-orig_params-full_shard", "fsdp2-reshard")
"""Rows that also run with torch.compile (FSDP1 supports compile only with use_orig_params)."""

AGREEING_ROWS = tuple(name for name, setup in PARALLEL_SETUPS.items() if not setup.bf16)
"""Rows whose baselines must train as DDP's does (:func:`test_ddp_fsdp1_fsdp2_agree`); the bf16 row
computes in another precision, and its tolerances are against the single-process reference."""


def row(base: Setup) -> list[Setup]:
    """The baseline without AC, then every activation wrapper after and before the parallel wrapper.

    Cells that torch cannot run (:func:`torch_limitation`) are left out: fsdp_ac refuses them at wrap
    time, which tests/test_wrappers.py checks.
    """
    cells = [
        dataclasses.replace(base, ac=ac, ac_first=first) for ac in AC_WRAPPERS for first in (False, True)
    ]
    return [base, *(cell for cell in cells if torch_limitation(cell) is None)]


def compile_row(base: Setup) -> list[Setup]:
    """Compiled blocks without AC (the baseline), AC around compiled blocks, then compiled layers
    around AC (AC applied before and after the parallel wrapper). AC before FSDP1 goes with fsdp_ac's
    policy here, so each compiled layer is an FSDP unit; the rows without compile cover torch's recipe."""
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


def check_training(setup: Setup, per_rank: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """The nesting, the recomputation, ranks in sync, and training bitwise equal to the baseline."""
    for rank, result in enumerate(per_rank):
        assert result["nesting"] == expected_nesting(setup), f"rank {rank}: nesting {result['nesting']}"
        # One GELU per block forward; with recomputation, backward runs it again (AC that did nothing
        # would pass every equality below). Compiled cells count the replays only (see Trained).
        runs = int(setup.recomputes) + (0 if setup.compile else 1)
        assert result["gelu_calls"] == STEPS * CONFIG.n_layers * runs, f"rank {rank}: GELU calls"
        assert result["digests"] == per_rank[0]["digests"], f"rank {rank} differs from rank 0"
        torch.testing.assert_close(result["losses"], baseline[rank]["losses"], rtol=0, atol=0)
    for what in ("first_grads", "params", "optimizer"):
        assert_bitwise(per_rank[0][what], baseline[0][what], f"{what} vs the baseline without AC")


def check_cell(
    setup: Setup, per_rank: list[dict[str, Any]], baseline: list[dict[str, Any]], ref: dict[str, Any]
) -> None:
    check_training(setup, per_rank, baseline)
    for result in per_rank:
        check_names(setup, result, ref)


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


def check_agrees_with_ddp(per_rank: list[dict[str, Any]], ddp: list[dict[str, Any]]) -> None:
    """One row's baseline against DDP's, on every rank: bitwise on up to two ranks, else as the reference.

    Each wrapper reduces gradients its own way: DDP divides by the world size and all-reduces, FSDP1
    divides by a pre-factor, reduce-scatters and divides by the rest, FSDP2 reduce-scatters with
    ``AVG``. On two ranks these agree bitwise (``a/2 + b/2 == (b + a)/2``: halving is exact and one
    sum commutes). On three, the order of the sums and the divisions differ: gradients by a few ulps
    (measured 3e-8), which Adam turns into parameters up to 4.4e-6 apart after STEPS steps, so the
    single-process reference's tolerances apply.
    """
    bitwise = len(ddp) <= 2
    for rank, (result, expected) in enumerate(zip(per_rank, ddp, strict=True)):
        rtol = 0 if bitwise else LOSS_RTOL
        torch.testing.assert_close(
            result["losses"],
            expected["losses"],
            rtol=rtol,
            atol=0,
            msg=lambda m, r=rank: f"rank {r} loss: {m}",
        )
        if bitwise:
            assert result["digests"] == expected["digests"], f"rank {rank}: {result['digests']}"
        else:
            assert result["digests"] == per_rank[0]["digests"], f"rank {rank} differs from rank 0"
    if bitwise:
        for what in ("first_grads", "params", "optimizer"):
            # Sorted: FSDP1 lists the members of its flat parameters in its own order.
            assert_bitwise(dict(sorted(per_rank[0][what].items())), dict(sorted(ddp[0][what].items())), what)
    else:
        assert_grads_close(
            without_key_biases(per_rank[0]["first_grads"]), without_key_biases(ddp[0]["first_grads"])
        )
        assert_matches_reference(
            without_key_biases(per_rank[0]["params"]), without_key_biases(ddp[0]["params"])
        )


@pytest.mark.timeout(300)
def test_ddp_fsdp1_fsdp2_agree() -> None:
    """Every fp32 row's baseline (FSDP1 and FSDP2 in each option) trains as DDP does, rank by rank.

    AC cells need no check here: each row holds them bitwise to its baseline.
    """
    results = run_on_ranks(cell_on_rank, [PARALLEL_SETUPS[name] for name in AGREEING_ROWS], timeout_s=240)
    ddp = results[AGREEING_ROWS.index("ddp")]
    failures = []
    for name, per_rank in zip(AGREEING_ROWS, results, strict=True):
        try:
            check_agrees_with_ddp(per_rank, ddp)
        except AssertionError as error:
            failures.append(f"{name}: {error}")
    assert not failures, f"{len(failures)} rows differ from DDP:\n\n" + "\n\n".join(failures)


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


def gpu_activation_bytes_on_rank(ctx: RankContext, setup: Setup) -> dict[str, int]:
    """CUDA memory that the first step's forward and loss hold for backward on this rank.

    ``held``: what ``memory_allocated`` grew by. ``in_blocks``: the bytes of the distinct CUDA
    storages that the blocks save for backward and an offload wrapper would move (at least
    ``DEFAULT_MIN_OFFLOAD_BYTES``, not a parameter), counted without AC only.
    """
    model = build(ctx, setup)
    tokens = rank_batches(ctx, setup)[0]
    inside = [0]
    saved: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        base = tensor if tensor._base is None else tensor._base  # linear saves its weight transposed
        parameter = base.is_leaf and base.requires_grad
        if inside[0] and tensor.is_cuda and not parameter and storage.nbytes() >= DEFAULT_MIN_OFFLOAD_BYTES:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(module: torch.nn.Module, args: Any) -> None:
        inside[0] += 1

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        inside[0] -= 1

    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    handles = [
        hook
        for block in blocks
        for hook in (block.register_forward_pre_hook(enter), block.register_forward_hook(leave))
    ]
    counting = torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor)
    before = torch.cuda.memory_allocated(ctx.device)
    # Offload's own hooks sit inside the blocks and take precedence, so only the setup without AC counts.
    with counting if setup.ac is None else contextlib.nullcontext():
        loss = lm_loss(model, tokens)
    held = torch.cuda.memory_allocated(ctx.device) - before
    for handle in handles:
        handle.remove()
    loss.backward()
    return {"held": held, "in_blocks": sum(saved.values())}


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    torch.cuda.device_count() < suite_nproc(), reason="needs a CUDA GPU per rank (FSDP_AC_NPROC)"
)
def test_offload_keeps_activations_off_the_gpu() -> None:
    """Offloading frees at least every byte the blocks save without AC, on every rank.

    The copy to the CPU is synchronous, so each saved CUDA tensor of a block is released before the
    next block runs; the allocator rounds allocations up, so freeing a storage lowers
    ``memory_allocated`` by at least its size. On the CPU the rows' offload cells copy CPU tensors into
    separate CPU memory (``copy_cpu_tensors=True``), so they check that real copies change nothing.
    """
    base = PARALLEL_SETUPS["fsdp2-reshard"]
    setups = [base, *(dataclasses.replace(base, ac=ac) for ac in ("offload", "offload_checkpoint"))]
    setups.append(dataclasses.replace(base, ac="offload", ac_first=False))
    results = run_on_ranks(gpu_activation_bytes_on_rank, setups)
    for rank, without in enumerate(results[0]):
        assert without["in_blocks"] > 0, f"rank {rank}: the blocks saved no CUDA activations"
        for setup, per_rank in zip(setups[1:], results[1:], strict=True):
            freed = without["held"] - per_rank[rank]["held"]
            assert freed >= without["in_blocks"], (
                f"{setup!r} on rank {rank}: holds {per_rank[rank]['held']} bytes, {without['held']} "
                f"without; freed {freed}, but the blocks save {without['in_blocks']}"
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
