"""The asynchronous offload engine: copies, host pool, cap, prefetch order, gradients.

On the CPU (``copy_cpu_tensors=True``) the engine's transfers are :class:`SynchronousTransfers`: they
copy at once and record every copy and wait, so the order a CUDA run would queue is checked here.
:class:`LaggingTransfers` plays a device that lags the host. The CUDA path's own tests are marked ``gpu``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import pickle
import sys
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch
from test_offload import Block, Saved, activation, assert_grads_bitwise, mlp, record_saved
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.testing._internal.two_tensor import TwoTensor

from fsdp_ac import (
    ActivationPlan,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)
from fsdp_ac.offload import (
    Decision,
    FlattenedCopy,
    HostPool,
    Offloaded,
    OffloadEngine,
    OffloadOptions,
    Operation,
    SynchronousTransfers,
    decide,
    host_bytes,
    offload_saved_tensors,
    unpack_saved_tensor,
)
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

CONFIG = GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_heads=4, n_layers=4)
TEST_MODE = OffloadOptions(pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True)


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> Saved:
    """Every tensor the offload hooks receive, with what their pack hook returned."""
    return record_saved(monkeypatch)


def wrap_blocks(model: GPT, engine: OffloadEngine, checkpoint: bool) -> GPT:
    """Offloads each transformer block through ``engine``, checkpointed when ``checkpoint``."""

    def wrap(block: nn.Module) -> nn.Module:
        inner = checkpoint_wrapper(block) if checkpoint else block
        return offload_wrapper(
            inner, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True, engine=engine
        )

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, TransformerBlock)
    )
    return model


def gpt_and_reference() -> tuple[GPT, GPT, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, copy.deepcopy(model), tokens


def step(model: nn.Module, tokens: torch.Tensor) -> None:
    model(tokens).square().mean().backward()


def record(engine: OffloadEngine) -> list[Operation]:
    transfers = engine.cpu_transfers
    assert isinstance(transfers, SynchronousTransfers)
    return transfers.operations


def operations(engine: OffloadEngine, kind: str) -> list[Operation]:
    return [op for op in record(engine) if op.kind == kind]


def first(engine: OffloadEngine, kind: str, block: int) -> int:
    """Where the first operation of ``kind`` for ``block`` lies in the engine's record."""
    return next(i for i, op in enumerate(record(engine)) if op.kind == kind and op.block == block)


class LaggingEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class LaggingTransfers(SynchronousTransfers):
    """A device that lags the host: a copy runs only when the test says so (:meth:`run`) or when the
    compute stream waits to read what a reload wrote.

    Device memory a queued copy reads or writes may be let go only after the compute stream waited for
    the copy; every call checks that no storage of a copy the compute stream has not waited for was
    freed (a reused block on a GPU). A reload's target holds NaN until its copy runs.
    """

    def __init__(self) -> None:
        super().__init__()
        # event, what to copy from, where to (host or a weak reference), whether the memory is alive
        self.queue: deque[tuple[LaggingEvent, Operation, torch.Tensor, Any, Any]] = deque()
        self.waited: set[int] = set()

    def copy(self, source: torch.Tensor, target: torch.Tensor, after: object, label: Operation) -> object:
        self.check()
        event = LaggingEvent()
        if label.kind == "to_host":  # what the source holds at this point of the compute stream
            ref = StorageWeakRef(source.untyped_storage())
            self.queue.append((event, label, source.clone(), target, lambda: not ref.expired()))
        else:
            target.fill_(float("nan"))
            alive = weakref.ref(target)
            self.queue.append((event, label, source, alive, lambda: alive() is not None))
        self.operations.append(label)
        return event

    def wait(self, event: object, label: Operation) -> None:
        self.check()
        self.operations.append(label)
        ids = [id(queued[0]) for queued in self.queue]
        if id(event) in ids:
            self.waited.update(ids[: ids.index(id(event)) + 1])  # the side stream runs in order
            if label.kind == "wait":  # the compute stream reads the reload next
                self.run(until=event)

    def run(self, until: object = None) -> None:
        """Runs the queued copies in order, up to ``until`` (all by default)."""
        self.check()
        while self.queue:
            event, label, source, target, alive = self.queue.popleft()
            if label.kind == "to_host":
                target.copy_(source)
            elif alive():
                target().copy_(source)
            event.done = True
            if event is until:
                return

    def check(self) -> None:
        for event, label, *_, alive in self.queue:
            assert id(event) in self.waited or alive(), f"{label}: memory let go before its copy ran"


# --- copies and gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [False, True], ids=["offload", "offload_around_checkpoint"])
def test_gradients_equal_without_offload_bitwise_and_every_copy_is_reloaded(
    checkpoint: bool, saved: Saved
) -> None:
    model, reference, tokens = gpt_and_reference()
    engine = OffloadEngine()
    wrap_blocks(model, engine, checkpoint)
    step(model, tokens)
    step(reference, tokens)
    assert_grads_bitwise(model, reference)
    handles = [packed for _, packed in saved if isinstance(packed, Offloaded)]
    to_host, to_device, waits = (operations(engine, kind) for kind in ("to_host", "to_device", "wait"))
    assert handles and len(to_host) == len({id(handle.copy) for handle in handles})
    # Every copy but the last block's (the stash, read in place) came back through a reload that the
    # compute stream waited for.
    reloaded = {(op.block, op.position) for op in to_host if op.block != CONFIG.n_layers - 1}
    assert [op.block for op in to_device].count(CONFIG.n_layers - 1) == 0
    assert {(op.block, op.position) for op in to_device} == reloaded
    assert {(op.block, op.position) for op in waits} == reloaded
    assert {op.block for op in to_host} == set(range(CONFIG.n_layers))
    handles.clear()
    saved.clear()  # the last references to the handles: autograd let them go in backward
    assert engine.pool.in_use_bytes == 0 and engine.pool.bytes > 0


def test_checkpointed_blocks_offload_only_their_inputs(saved: Saved) -> None:
    model, _, tokens = gpt_and_reference()
    engine = OffloadEngine()
    wrap_blocks(model, engine, checkpoint=True)
    step(model, tokens)
    copied = [tensor for tensor, packed in saved if isinstance(packed, Offloaded)]
    # One tensor per block: the residual stream entering it.
    assert [tuple(t.shape) for t in copied] == [(2, 12, CONFIG.d_model)] * CONFIG.n_layers
    saved.clear()
    plain, _, _ = gpt_and_reference()
    wrap_blocks(plain, OffloadEngine(), checkpoint=False)
    step(plain, tokens)
    assert len([p for _, p in saved if isinstance(p, Offloaded)]) > 4 * CONFIG.n_layers


def test_backward_reads_the_reloaded_copies_not_the_originals() -> None:
    """Zeroing the first block's originals after forward changes nothing: backward reads its copies
    (the second block's originals are the stash, read in place)."""
    offloaded, reference = mlp(), mlp()
    outputs: list[torch.Tensor] = []
    offloaded[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(8, 32)
    reference(x).square().sum().backward()
    engine = OffloadEngine()
    with offload_saved_tensors(offloaded, pin_memory=False, copy_cpu_tensors=True, engine=engine):
        hidden = offloaded[1](offloaded[0](x))
    with offload_saved_tensors(offloaded, pin_memory=False, copy_cpu_tensors=True, engine=engine):
        loss = offloaded[2](hidden).square().sum()
    outputs[0].data.zero_()
    loss.backward()
    assert_grads_bitwise(offloaded, reference)


def test_the_decision_is_the_synchronous_one(saved: Saved) -> None:
    """Parameters, buffers, their views and small tensors are kept; the same three are copied."""
    block = Block()
    engine = OffloadEngine()
    with offload_saved_tensors(
        block, pin_memory=False, min_offload_bytes=65, copy_cpu_tensors=True, engine=engine
    ):
        block(activation(8, 16))
    assert len(saved) == 6
    assert sum(isinstance(packed, Offloaded) for _, packed in saved) == 2  # x and scaled; small is 64 B
    assert len(operations(engine, "to_host")) == 2


def test_tensor_subclasses_are_offloaded_through_their_inner_tensors(saved: Saved) -> None:
    def run(engine: OffloadEngine | None) -> TwoTensor:
        torch.manual_seed(0)
        leaf = TwoTensor(torch.randn(64), torch.randn(64)).requires_grad_()
        context = offload_saved_tensors(
            nn.Identity(), pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True, engine=engine
        )
        with context if engine else contextlib.nullcontext():
            out = (leaf * 2).sin().sum()
        out.backward()
        return leaf.grad

    expected = run(None)
    engine = OffloadEngine()
    actual = run(engine)
    ((_, packed),) = saved
    assert isinstance(packed, FlattenedCopy)
    assert all(isinstance(packed.inner[name], Offloaded) for name in ("a", "b"))
    assert len(operations(engine, "to_host")) == 2
    for name in ("a", "b"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0)


def test_autocast_weight_casts_stay_and_only_activations_move(saved: Saved) -> None:
    def run(engine: OffloadEngine | None) -> nn.Module:
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(256, 256), nn.ReLU())
        x = torch.randn(128, 256, generator=torch.Generator().manual_seed(1), requires_grad=True)
        context = offload_saved_tensors(
            block, pin_memory=False, min_offload_bytes=0, copy_cpu_tensors=True, engine=engine
        )
        with torch.autocast("cpu", dtype=torch.bfloat16), context if engine else contextlib.nullcontext():
            loss = block(x * 1.0).float().sum()
        if engine is not None:
            # x's cast and ReLU's output, in bf16; the weight's cast (131,072 bytes) stays.
            assert engine.pool.in_use_bytes == 2 * 128 * 256 * 2
        loss.backward()
        return block

    reference = run(None)
    saved.clear()
    block = run(OffloadEngine())
    kept = [tensor for tensor, packed in saved if packed is tensor]
    assert [decide(t, TEST_MODE, frozenset()) for t in kept] == [Decision.WEIGHT_CAST]
    assert kept[0].shape == (256, 256) and kept[0].dtype == torch.bfloat16
    assert_grads_bitwise(block, reference)


def test_an_expanded_view_is_copied_at_its_storage_size_and_rebuilt_as_the_same_view(saved: Saved) -> None:
    engine = OffloadEngine()
    scores = torch.randn(4, 8, 64, 64, requires_grad=True)
    mask = torch.randn(1, 1, 64, 64).expand(4, 8, 64, 64)
    with engine.block(nn.Identity(), TEST_MODE):
        loss = (scores * 1.0 * mask).sum()  # mul saves the mask only
    with engine.block(nn.Identity(), TEST_MODE):
        pass  # the next block: the mask's original leaves the stash, backward reads the copy
    ((tensor, packed),) = saved
    assert engine.pool.in_use_bytes == 64 * 64 * 4  # not 4 * 8 times that
    rebuilt = unpack_saved_tensor(packed)
    assert (rebuilt.shape, rebuilt.stride(), rebuilt.storage_offset()) == (
        tensor.shape,
        tensor.stride(),
        tensor.storage_offset(),
    )
    assert rebuilt.untyped_storage().nbytes() == 64 * 64 * 4 and torch.equal(rebuilt, mask)
    loss.backward()
    assert scores.grad is not None and torch.equal(scores.grad, mask)


def test_one_storage_saved_twice_is_copied_once(saved: Saved) -> None:
    def run(engine: OffloadEngine | None) -> torch.Tensor:
        h = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with engine.block(nn.Identity(), TEST_MODE) if engine else contextlib.nullcontext():
            hidden = h * 1.0
            loss = (hidden * hidden).sum() + hidden[:32].sin().sum()  # hidden twice, and a view of it
        if engine is not None:
            with engine.block(nn.Identity(), TEST_MODE):
                pass  # the originals leave the stash: backward reads the copy
        loss.backward()
        assert h.grad is not None
        return h.grad

    expected = run(None)
    engine = OffloadEngine()
    torch.testing.assert_close(run(engine), expected, rtol=0, atol=0)
    handles = [packed for _, packed in saved if isinstance(packed, Offloaded)]
    assert len(handles) == 3 and len({id(handle.copy) for handle in handles}) == 1
    assert len(operations(engine, "to_host")) == 1 and engine.pool.bytes == 64 * 64 * 4
    del handles
    saved.clear()
    assert engine.pool.in_use_bytes == 0


@pytest.mark.parametrize("engine", [False, True], ids=["synchronous", "engine"])
def test_offloading_under_cuda_graph_capture_raises_naming_the_fix(
    engine: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    block = mlp()
    context = offload_saved_tensors(
        block, pin_memory=False, copy_cpu_tensors=True, engine=OffloadEngine() if engine else None
    )
    with pytest.raises(RuntimeError, match=r"CUDA graph capture.*out of the captured region"), context:
        block(torch.randn(8, 32, requires_grad=True))


# --- the pool --------------------------------------------------------------------------------------


def test_the_pool_allocates_in_the_first_step_only() -> None:
    model, reference, tokens = gpt_and_reference()
    engine = OffloadEngine()
    wrap_blocks(model, engine, checkpoint=False)
    step(model, tokens)
    allocations, held = engine.pool.allocations, engine.pool.bytes
    copies = len(operations(engine, "to_host"))
    assert allocations > 0 and engine.pool.in_use_bytes == 0
    engine.cpu_transfers.operations.clear()
    model.zero_grad()
    step(model, tokens)
    assert len(operations(engine, "to_host")) == copies  # step 2 copied as much ...
    assert (engine.pool.allocations, engine.pool.bytes) == (allocations, held)  # ... into the same buffers
    assert engine.pool.in_use_bytes == 0
    # Blocks are numbered per step: the second forward starts at block 0 again.
    assert {op.block for op in operations(engine, "to_host")} == set(range(CONFIG.n_layers))
    step(reference, tokens)
    assert_grads_bitwise(model, reference)


def test_a_graph_freed_without_backward_gives_its_buffers_back() -> None:
    engine = OffloadEngine()
    block = mlp()
    with offload_saved_tensors(block, pin_memory=False, copy_cpu_tensors=True, engine=engine):
        loss = block(torch.randn(8, 32)).sum()
    assert engine.pool.in_use_bytes > 0
    del loss
    assert engine.pool.in_use_bytes == 0 and engine.pool.bytes > 0


def test_a_prefetched_block_that_backward_never_reads_is_given_back() -> None:
    engine = OffloadEngine()
    first_block, second_block = mlp(), mlp()
    x = torch.randn(8, 32, requires_grad=True)
    with offload_saved_tensors(first_block, pin_memory=False, copy_cpu_tensors=True, engine=engine):
        hidden = first_block(x)
    with offload_saved_tensors(second_block, pin_memory=False, copy_cpu_tensors=True, engine=engine):
        out = second_block(hidden).sum()
    torch.autograd.grad(out, hidden)  # backward reads the second block only
    assert operations(engine, "to_device") and not [op for op in operations(engine, "wait") if op.block == 0]
    assert {op.block for op in operations(engine, "to_device")} == {0}  # prefetched; block 1 is the stash
    assert engine.pool.in_use_bytes > 0
    del out, hidden
    assert engine.pool.in_use_bytes == 0


def test_the_pool_counts_pinned_buffers_as_the_allocator_rounds_them() -> None:
    assert [host_bytes(n, pinned=True) for n in (1, 1000, 1024, 80 * 2**20)] == [1, 1024, 1024, 2**27]
    assert host_bytes(1000, pinned=False) == 1000
    pool = HostPool(max_bytes=3000)
    transfers = SynchronousTransfers()
    taken = pool.acquire(1000, True, transfers)
    assert taken is not None and taken.tensor.numel() == 1024 and pool.bytes == pool.in_use_bytes == 1024
    assert pool.acquire(1025, True, transfers) is None  # 2,048 more would pass 3,000
    pool.release(taken, None)
    again = pool.acquire(900, True, transfers)  # the same power-of-two class
    assert again is taken and pool.allocations == 1


@pytest.mark.parametrize("max_host_bytes", [None, 2**30], ids=["no_cap", "cap"])
def test_sequence_lengths_that_change_every_step_do_not_grow_the_pool(max_host_bytes: int | None) -> None:
    engine = OffloadEngine(max_host_bytes=max_host_bytes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    for length in range(1000, 1010):
        with offload_saved_tensors(model, pin_memory=False, copy_cpu_tensors=True, engine=engine):
            loss = model(torch.randn(length, 64, requires_grad=True) * 1.0).sum()
        step_bytes = engine.pool.in_use_bytes
        loss.backward()
        # This step's buffers, and the last step's: those of older lengths were freed.
        assert step_bytes > 0 and engine.pool.bytes <= 2 * step_bytes
    # Each step: x, and ReLU's output (which the second Linear saves too: one copy).
    assert engine.pool.allocations == 10 * 2


# --- the host cap ----------------------------------------------------------------------------------


def test_past_the_cap_tensors_stay_with_one_warning() -> None:
    model, reference, tokens = gpt_and_reference()
    block_input_bytes = 2 * 12 * CONFIG.d_model * 4
    engine = OffloadEngine(max_host_bytes=2 * block_input_bytes)
    wrap_blocks(model, engine, checkpoint=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(model, tokens)
        step(model, tokens)  # said once per engine, not once per step
    assert ["max_host_bytes=" in str(w.message) for w in caught] == [True]
    # Each step: the first two blocks' inputs fit, the last two stayed.
    assert [op.block for op in operations(engine, "to_host")] == [0, 1] * 2
    assert engine.kept_for_cap == 4 and engine.pool.bytes == 2 * block_input_bytes
    model.zero_grad()
    step(model, tokens)
    step(reference, tokens)
    assert_grads_bitwise(model, reference)


def test_past_the_cap_the_engine_raises_when_asked() -> None:
    engine = OffloadEngine(max_host_bytes=100, on_cap="raise")
    with pytest.raises(RuntimeError, match=r"max_host_bytes=100.*on_cap='keep'"):
        with offload_saved_tensors(mlp(), pin_memory=False, copy_cpu_tensors=True, engine=engine):
            mlp()(torch.randn(8, 32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_host_bytes": -1}, "max_host_bytes"),
        ({"on_cap": "drop"}, "on_cap"),
        ({"prefetch_blocks": -1}, "prefetch_blocks"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OffloadEngine(**kwargs)  # type: ignore[arg-type]


# --- prefetch order --------------------------------------------------------------------------------


def run_order(prefetch_blocks: int, checkpoint: bool) -> OffloadEngine:
    """One step of the GPT on a lagging device; the record also says when each block's backward
    started ("backward": the gradient of its output is computed), and the step's gradients are
    checked."""
    model, reference, tokens = gpt_and_reference()
    engine = OffloadEngine(prefetch_blocks=prefetch_blocks)
    device = engine.cpu_transfers = LaggingTransfers()
    for index, block in enumerate(model.layers):
        mark = Operation("backward", index, 0)

        def hook(module: nn.Module, args: Any, out: torch.Tensor, mark: Operation = mark) -> None:
            if out.requires_grad:  # not the recomputation
                out.register_hook(lambda grad: device.operations.append(mark))

        block.register_forward_hook(hook)
    wrap_blocks(model, engine, checkpoint)
    step(model, tokens)
    device.run()
    step(reference, tokens)
    assert_grads_bitwise(model, reference)
    return engine


def last(engine: OffloadEngine, kind: str, block: int) -> int:
    """Where the last operation of ``kind`` for ``block`` lies in the engine's record."""
    return max(i for i, op in enumerate(record(engine)) if op.kind == kind and op.block == block)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["offload", "offload_around_checkpoint"])
def test_backward_prefetches_one_block_ahead(checkpoint: bool) -> None:
    engine = run_order(prefetch_blocks=1, checkpoint=checkpoint)
    final = CONFIG.n_layers - 1
    assert last(engine, "to_host", final) < first(engine, "to_device", final - 1)
    assert [op.block for op in operations(engine, "to_device")].count(final) == 0  # the stash
    for block in range(final):
        # Block k's reloads are issued once block k+1's backward started, before block k's, and
        # each of them before block k reads any: none is left to an on-demand reload.
        assert first(engine, "backward", block + 1) < first(engine, "to_device", block)
        assert first(engine, "to_device", block) < first(engine, "backward", block)
        assert last(engine, "to_device", block) < first(engine, "wait", block)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["offload", "offload_around_checkpoint"])
def test_without_prefetch_each_block_reloads_when_read(checkpoint: bool) -> None:
    engine = run_order(prefetch_blocks=0, checkpoint=checkpoint)
    for block in range(CONFIG.n_layers - 1):
        assert first(engine, "backward", block) < first(engine, "to_device", block)


def test_prefetch_two_blocks_ahead() -> None:
    engine = run_order(prefetch_blocks=2, checkpoint=True)
    for block in range(CONFIG.n_layers - 2):
        assert first(engine, "backward", block + 2) < first(engine, "to_device", block)
        assert first(engine, "to_device", block) < first(engine, "backward", block + 1)


def test_reloads_go_in_backward_order_last_saved_first() -> None:
    engine = run_order(prefetch_blocks=2, checkpoint=False)
    reloads = operations(engine, "to_device")
    blocks = list(dict.fromkeys(op.block for op in reloads))
    assert blocks == list(range(CONFIG.n_layers - 2, -1, -1))
    for block in blocks:
        positions = [op.position for op in reloads if op.block == block]
        assert len(positions) > 4 and positions == sorted(positions, reverse=True)


def test_a_lagging_device_frees_originals_in_stream_order_and_holds_only_the_stash() -> None:
    """No copy has run when forward ends, yet the engine holds only the last block's originals; an
    original is let go only after the compute stream waited for its copy (LaggingTransfers checks)."""
    model, reference, tokens = gpt_and_reference()
    engine = OffloadEngine()
    device = engine.cpu_transfers = LaggingTransfers()
    wrap_blocks(model, engine, checkpoint=False)
    loss = model(tokens).square().mean()
    assert device.queue and not any(queued[0].done for queued in device.queue)
    copies = [copy for block in engine._blocks for copy in block.copies]
    assert {copy.block.index for copy in copies if copy.source is not None} == {CONFIG.n_layers - 1}
    assert {copy.block.index for copy in copies} == set(range(CONFIG.n_layers))
    # One wait per block let go (for its last copy: the side stream runs in order).
    assert [op.block for op in operations(engine, "release")] == list(range(CONFIG.n_layers - 1))
    loss.backward()
    device.run()
    step(reference, tokens)
    assert_grads_bitwise(model, reference)


# --- the wrapper -----------------------------------------------------------------------------------


def test_the_wrapper_keeps_torch_signature_and_the_synchronous_default(saved: Saved) -> None:
    default = offload_wrapper(Block())
    assert default.engine is None
    engine = OffloadEngine()
    inner = Block()
    wrapper = offload_wrapper(inner, min_offload_bytes=0, copy_cpu_tensors=True, engine=engine)
    assert wrapper.engine is engine and "engine" not in vars(inner)
    assert copy.deepcopy(wrapper).engine is not engine  # a copied model gets its own pool
    capped = OffloadEngine(max_host_bytes=10, on_cap="raise", prefetch_blocks=3)
    for clone in (copy.deepcopy(capped), pickle.loads(pickle.dumps(capped))):
        assert clone is not capped and clone.pool is not capped.pool
        assert (clone.pool.max_bytes, clone.on_cap, clone.prefetch_blocks) == (10, "raise", 3)
    wrapper(activation(8, 16))
    assert sum(isinstance(p, Offloaded) for _, p in saved) == 3


def test_unpacking_a_handle_twice_reloads_again() -> None:
    """retain_graph: a second backward reads the host copy again."""
    engine = OffloadEngine()
    block = mlp()
    reference = mlp()
    x = torch.randn(8, 32)
    for _ in range(2):
        reference(x).square().sum().backward()
    with offload_saved_tensors(block, pin_memory=False, copy_cpu_tensors=True, engine=engine):
        loss = block(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert_grads_bitwise(block, reference)


# --- on a GPU --------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_activations_leave_the_gpu_and_gradients_are_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(1024, 1024), nn.GELU()) for _ in range(4))).cuda()
    reference = copy.deepcopy(model)
    engine = OffloadEngine()
    for i, layer in enumerate(model):
        model[i] = offload_wrapper(layer, engine=engine)
    x = torch.randn(2048, 1024, device="cuda")
    reference(x).square().mean().backward()
    allocations = []
    for _ in range(2):
        model.zero_grad()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        loss = model(x).square().mean()
        # No synchronisation: the host runs ahead of the GPU, yet the engine already let go of every
        # original but the last block's two (the stash), in stream order.
        held = torch.cuda.memory_allocated() - base
        assert held <= 2048 * 1024 * 4 * 3 + 2**20  # those and the output; without offload, 9 of 8 MiB
        loss.backward()
        torch.cuda.synchronize()
        allocations.append(engine.pool.allocations)
    assert allocations[0] == allocations[1] == 8 and engine.pool.in_use_bytes == 0
    assert all(b.tensor.is_pinned() for free in engine.pool._free.values() for b in free)
    assert_grads_bitwise(model, reference)


@pytest.mark.gpu
@needs_cuda
def test_cuda_engine_trains_the_gpt_exactly_with_checkpointing() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, max_seq_len=256, d_model=256, n_heads=4, n_layers=4)
    model = GPT(config).cuda()
    reference = copy.deepcopy(model)
    engine = OffloadEngine()
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: offload_wrapper(checkpoint_wrapper(m), engine=engine),
        check_fn=lambda m: isinstance(m, TransformerBlock),
    )
    tokens = torch.randint(0, 512, (4, 256), device="cuda")
    for net in (model, reference):
        net(tokens).square().mean().backward()
    torch.cuda.synchronize()
    assert engine.pool.allocations == config.n_layers
    assert_grads_bitwise(model, reference)


# --- the GPU benchmark's dry run -------------------------------------------------------------------


def test_the_gpu_offload_benchmark_runs_dry_on_the_cpu(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "offload_benchmark.py"
    spec = importlib.util.spec_from_file_location("fsdp_ac_offload_benchmark", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    out = tmp_path / "records.json"
    assert module.main(["--device", "cpu", "--tiny", "--json", str(out), "--check"]) == 0
    result = json.loads(out.read_text())
    records = {r["name"]: r for r in result["records"]}
    expected = {"no_ac", "full_ac", "ac_torch_save_on_cpu", "ac_fsdp_ac_offload", "stress_autocast"}
    assert expected <= set(records)
    assert all(r["grads_equal"] and r["step_ms"] > 0 for r in records.values())
    assert records["ac_fsdp_ac_offload"]["host_bytes"] == 3 * 2 * 16 * 32 * 4  # each block's input, pooled
    assert result["target_met"] is None  # no GPU memory to compare on the CPU
    # The memory probe, with the allocator's count faked at 0: it runs when the blocks' forward ends
    # and takes off their output, (2, 16, 32) floats. Gradients that differ fail --check.
    module.allocated = lambda device: 0
    module.equal = lambda grads, reference: False
    assert module.main(["--device", "cpu", "--tiny", "--json", str(out), "--check"]) == 1
    records = {r["name"]: r for r in json.loads(out.read_text())["records"]}
    assert {r["held_bytes"] for name, r in records.items() if "stress" not in name} == {-2 * 16 * 32 * 4}


def test_a_plan_offloads_through_the_engine_it_is_given() -> None:
    model, _, _ = gpt_and_reference()
    engine = OffloadEngine()
    plan = ActivationPlan({"layers.0": "offload", "layers.1": "full+offload", "layers.2": "full"})
    plan.apply(model, offload_engine=engine)
    assert [getattr(layer, "engine", None) for layer in model.layers] == [engine, engine, None, None]
    default, _, _ = gpt_and_reference()
    plan.apply(default)
    assert default.layers[0].engine is None and default.layers[1].engine is None
