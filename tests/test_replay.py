"""The replay rule, side by side with torch's wrapper: what runs again when a region is recomputed.

Value-changing hooks run again in the replay (gradients equal to no AC, as with torch's wrapper);
observing hooks run once per step (torch's wrapper runs them twice); ``replay_hook`` overrides the
rule; ``torch.distributed`` hooks always replay; only mutated buffers are restored; eval-mode calls
with autograd on are checkpointed; the same holds under ``torch.compile``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import ConvNet, ForwardOpsInBackward, recomputed_in_backward
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.utils._python_dispatch import TorchDispatchMode
from upstream import shows

from fsdp_ac import (
    ActivationMemoryMeter,
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    is_recomputing,
    offload_wrapper,
    replay_hook,
)
from fsdp_ac.recompute import _is_framework_hook, has_user_hooks

IMPLS = list(CheckpointImpl)
Wrap = Callable[[nn.Module], nn.Module]


def ours(impl: CheckpointImpl) -> Wrap:
    return functools.partial(checkpoint_wrapper, checkpoint_impl=impl)


def theirs(impl: CheckpointImpl) -> Wrap:
    return functools.partial(torch_wrappers.checkpoint_wrapper, checkpoint_impl=impl)


def hooked_block(calls: list[str]) -> nn.Sequential:
    """Hooks of every kind on the inner modules: three change values, one only observes."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh())

    def returns_new_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls.append("returns")
        return output * 3 + 1

    def rewrites_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        calls.append("rewrites")
        return (args[0] * 2 - 1,)

    def scales_in_place(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        calls.append("in_place")
        output.mul_(0.5)

    def observes(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        calls.append("observes")

    block[0].register_forward_hook(returns_new_output)
    block[2].register_forward_pre_hook(rewrites_input)
    block[2].register_forward_hook(scales_in_place)
    block[1].register_forward_hook(observes)
    return block


def train_step(
    wrap: Wrap | None, compile_backend: str | None = None
) -> tuple[list[torch.Tensor], list[str], int]:
    """Gradients, hook calls and the forward ops recomputed in backward, for one step."""
    calls: list[str] = []
    block = hooked_block(calls)
    model = wrap(block) if wrap is not None else block
    if compile_backend is not None:
        torch._dynamo.reset()
        model = torch.compile(model, backend=compile_backend)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = model(x).square().sum()
    with ForwardOpsInBackward() as recomputed:
        loss.backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    return grads, calls, recomputed.count


def assert_equal_grads(expected: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    assert len(expected) == len(got)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(want, have), f"gradient {index} differs by {(want - have).abs().max().item()}"


@pytest.mark.parametrize("impl", IMPLS)
def test_value_changing_hooks_replay_and_observing_hooks_run_once(impl: CheckpointImpl) -> None:
    plain, plain_calls, plain_recomputed = train_step(None)
    assert plain_calls == ["returns", "observes", "rewrites", "in_place"]
    assert plain_recomputed == 0

    torch_grads, torch_calls, torch_recomputed = train_step(theirs(impl))
    assert_equal_grads(plain, torch_grads)
    shows("torch", "an observing hook fires again in backward", torch_calls.count("observes") == 2)

    grads, calls, recomputed = train_step(ours(impl))
    assert_equal_grads(plain, grads)  # every value-changing hook replayed: exact gradients
    assert recomputed == torch_recomputed == 3  # the region really was recomputed: its 3 Linears
    assert calls[:4] == plain_calls
    assert calls[4:] == ["returns", "rewrites", "in_place"]  # the observer is not replayed


@pytest.mark.parametrize("impl", IMPLS)
def test_a_hook_that_replaces_a_module_tensor_replays(impl: CheckpointImpl) -> None:
    """``weight_norm`` recomputes ``weight`` in a pre-hook that returns nothing and sets an attribute."""

    def run(wrap: Wrap | None) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        with pytest.warns(FutureWarning):
            inner = torch.nn.utils.weight_norm(nn.Linear(6, 6))
        block = nn.Sequential(inner, nn.Tanh(), nn.Linear(6, 6))
        model = wrap(block) if wrap is not None else block
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
        recomputed = recomputed_in_backward(model(x).square().sum())
        return [p.grad.clone() for p in block.parameters()], recomputed

    plain, _ = run(None)
    grads, recomputed = run(ours(impl))
    torch_grads, torch_recomputed = run(theirs(impl))
    assert_equal_grads(plain, grads)
    assert_equal_grads(plain, torch_grads)
    # Non-reentrant recomputation stops before the last Linear, whose output nothing saves.
    assert recomputed == torch_recomputed == (2 if impl is CheckpointImpl.REENTRANT else 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_replay_hook_overrides_the_rule_in_both_directions(impl: CheckpointImpl) -> None:
    seen: list[bool] = []
    counted: list[int] = []

    class Counter:
        def identity(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            counted.append(1)
            return output  # returns a value, but the same one: safe to run once per step

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    block[1].register_forward_hook(replay_hook(lambda m, a, o: seen.append(is_recomputing()), replay=True))
    marked = replay_hook(Counter().identity, replay=False)  # a bound method comes back wrapped
    block[0].register_forward_hook(marked)
    wrapped = checkpoint_wrapper(block, impl)
    x = torch.randn(2, 8, requires_grad=True)
    loss = wrapped(x).sum()
    with ForwardOpsInBackward() as recomputed:
        loss.backward()
    # Non-reentrant recomputation stops before the last Linear, whose output nothing saves.
    assert recomputed.count == (2 if impl is CheckpointImpl.REENTRANT else 1)
    assert seen == [False, True]  # forced into the replay, where is_recomputing() is True
    assert counted == [1]  # kept out of the replay although it returns a value

    # Unmarked, the rule decides: the identity hook returns a value, so it replays.
    counted.clear()
    block[0]._forward_hooks.clear()
    block[0].register_forward_hook(Counter().identity)
    wrapped(x).sum().backward()
    assert counted == [1, 1]
    with pytest.raises(TypeError, match="replay_hook marks a hook function"):
        replay_hook(3)  # type: ignore[type-var]


@pytest.mark.parametrize("impl", IMPLS)
def test_is_recomputing_is_true_in_forward_code_during_a_real_replay(impl: CheckpointImpl) -> None:
    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.seen: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(is_recomputing())
            return torch.tanh(self.linear(x))

    block = Recorder()
    checkpoint_wrapper(block, impl)(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert block.seen == [False, True]
    assert is_recomputing() is False
    torch_block = Recorder()
    theirs(impl)(torch_block)(torch.randn(2, 4, requires_grad=True)).sum().backward()
    shows("torch", "forward code cannot tell a replay", torch_block.seen == [False, False])


def test_distributed_hooks_always_replay() -> None:
    from torch.distributed._composable_state import _State

    class FakeState(_State):
        def hook(self, module: nn.Module, args: tuple[object, ...]) -> None:
            calls.append("state")

    calls: list[str] = []
    state = FakeState()

    @functools.wraps(state.hook)  # how FSDP2 wraps the hooks of a grouped unit
    def grouped(*args: Any) -> None:
        calls.append("grouped")

    assert _is_framework_hook(state.hook) and _is_framework_hook(grouped)
    assert _is_framework_hook(functools.partial(state.hook))
    assert not _is_framework_hook(lambda m, a: None)
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    block[0].register_forward_pre_hook(state.hook)
    block[1].register_forward_pre_hook(grouped)
    assert not has_user_hooks(block)
    checkpoint_wrapper(block)(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert calls == ["state", "grouped", "state", "grouped"]


def test_grouped_fsdp2_unit_inside_a_checkpointed_block_trains_like_no_ac(single_rank_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    def run(wrap: Wrap | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU())
        fully_shard([block[0], block[2]])  # one unit of two modules: hooks on each
        model = nn.Sequential(wrap(block) if wrap is not None else block, nn.Linear(8, 8))
        fully_shard(model)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
        loss = model(x).square().sum()
        with ForwardOpsInBackward() as recomputed:
            loss.backward()
        assert recomputed.count == (0 if wrap is None else 2)
        return [p.grad.full_tensor() for p in block.parameters()]

    plain = run(None)
    assert_equal_grads(plain, run(checkpoint_wrapper))
    assert_equal_grads(plain, run(torch_wrappers.checkpoint_wrapper))


def test_hooks_registered_after_the_forward_run_in_the_replay_as_in_torch() -> None:
    calls: list[bool] = []
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    wrapped = checkpoint_wrapper(block, CheckpointImpl.REENTRANT)
    loss = wrapped(torch.randn(2, 4, requires_grad=True)).sum()
    block[0].register_forward_hook(lambda m, a, o: calls.append(is_recomputing()))
    loss.backward()
    assert calls == [True]


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_regions_follow_the_same_rule(backend: str) -> None:
    plain, _, _ = train_step(None)
    eager_grads, eager_calls, eager_recomputed = train_step(ours(CheckpointImpl.NO_REENTRANT))
    grads, calls, recomputed = train_step(ours(CheckpointImpl.NO_REENTRANT), compile_backend=backend)
    assert_equal_grads(plain, grads)
    assert_equal_grads(eager_grads, grads)
    assert calls == eager_calls  # the observer once, value hooks replayed
    assert recomputed == eager_recomputed == 3  # the region's 3 Linears, recomputed eagerly
    _, torch_calls, _ = train_step(theirs(CheckpointImpl.NO_REENTRANT), compile_backend=backend)
    shows("torch", "compiled, an observing hook fires again", torch_calls.count("observes") == 2)


class BufferedBlock(nn.Module):
    """A constant table (never written), a step counter (written in place) and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(0, 1, 1 << 20).view(1024, 1024), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.linear = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_recomputing():
            self.steps += 1
        return torch.tanh(self.norm(self.linear(x)) * self.table[0, :16])


class CopyCounter(TorchDispatchMode):
    """Counts the elements that ``clone``/``copy_`` write while active."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            self.elements += out.numel()
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_only_buffers_the_forward_mutates_are_restored(impl: CheckpointImpl) -> None:
    def run(wrap: Wrap | None) -> tuple[dict[str, torch.Tensor], int, int]:
        torch.manual_seed(0)
        block = BufferedBlock()
        model = wrap(block) if wrap is not None else block
        for step in range(2):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step), requires_grad=True)
            loss = model(x).sum()
            with CopyCounter() as copies, ForwardOpsInBackward() as recomputed:
                loss.backward()
        return {k: v.clone() for k, v in block.state_dict().items()}, copies.elements, recomputed.count

    plain_state, plain_copies, _ = run(None)
    state, copies, recomputed = run(ours(impl))
    assert recomputed == 1
    for key, value in plain_state.items():
        assert torch.equal(state[key], value), key  # running statistics and the counter: once per step
    assert int(state["steps"]) == 2
    # Backward snapshots and restores only the mutated buffers (BatchNorm's mean, variance and
    # batch count, the step counter), never the 4 MiB table.
    assert copies - plain_copies == 2 * (16 + 16 + 1 + 1)
    torch_state, _, _ = run(theirs(impl))
    shows(
        "torch",
        "num_batches_tracked counted twice per step",
        int(torch_state["norm.num_batches_tracked"]) == 4,
    )


def test_batchnorm_on_cpu_is_restored_although_its_version_does_not_move() -> None:
    norm = nn.BatchNorm1d(4)
    before = norm.running_mean._version
    norm(torch.randn(8, 4, requires_grad=True))
    assert norm.running_mean._version == before  # the CPU kernel's in-place update is invisible
    model = ConvNet()
    model.block = checkpoint_wrapper(model.block)
    plain = ConvNet()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    plain(x).sum().backward()
    assert torch.equal(model.block[1].running_var, plain.block[1].running_var)


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_mode_with_autograd_on_still_checkpoints(impl: CheckpointImpl) -> None:
    def held(wrap: Wrap | None) -> tuple[int, int]:
        torch.manual_seed(0)
        model = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Dropout(0.5))
            for _ in range(3)
        )
        if wrap is not None:
            apply_activation_checkpointing(model, wrap, check_fn=lambda m: isinstance(m, nn.Sequential))
        model = nn.Sequential(*model)
        model.eval()  # dropout off, gradients still wanted (RL, LoRA evaluation with grads)
        with ActivationMemoryMeter(model) as meter:
            # An input that needs a gradient, which torch's reentrant wrapper needs in order to train.
            loss = model(torch.randn(32, 64, requires_grad=True)).square().sum()
        with ForwardOpsInBackward() as recomputed:
            loss.backward()
        return meter.held_bytes, recomputed.count

    plain_bytes, plain_recomputed = held(None)
    torch_bytes, torch_recomputed = held(theirs(impl))
    our_bytes, our_recomputed = held(ours(impl))
    assert plain_recomputed == 0 and our_recomputed == torch_recomputed == 6
    assert our_bytes == torch_bytes < plain_bytes / 2


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_and_inference_calls_run_the_module_directly(impl: CheckpointImpl) -> None:
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    calls: list[int] = []
    block.register_forward_hook(lambda m, a, o: calls.append(1))
    wrapped = checkpoint_wrapper(block, impl)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(wrapped(x), block(x))
    with torch.inference_mode():
        assert wrapped(x).is_inference()
    assert calls == [1, 1, 1]
    loss = wrapped(x.requires_grad_()).sum()
    with ForwardOpsInBackward() as recomputed:
        loss.backward()
    assert recomputed.count == 1  # with autograd on, the call was checkpointed
    assert calls == [1, 1, 1, 1]  # and the observing hook did not run again

    # Without autograd nothing is recomputed, so a random op needs no preserved RNG state: the module
    # runs as it is, drawing what it draws unwrapped (through the checkpoint path it would be refused).
    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    random_wrapped = checkpoint_wrapper(dropout, impl, preserve_rng_state=False)
    for no_autograd in (torch.no_grad, torch.inference_mode):
        with no_autograd():
            torch.manual_seed(1)
            got = random_wrapped(x)
            torch.manual_seed(1)
            assert torch.equal(got, dropout(x))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            lambda x: x,
            r"got the callable .*<lambda>: to checkpoint a function, call torch\.utils\.checkpoint",
        ),
        (torch.zeros(2), "got a Tensor: pass the module that computes it"),
        (nn.Linear, r"got the class Linear: pass an instance, e\.g\. checkpoint_wrapper\(Linear\(\.\.\.\)\)"),
        (3, "got int 3"),
    ],
)
def test_wrapping_a_non_module_says_what_was_passed(value: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        checkpoint_wrapper(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"apply_activation_checkpointing takes an nn\.Module instance"):
        apply_activation_checkpointing(value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"offload_wrapper takes an nn\.Module instance"):
        offload_wrapper(value)  # type: ignore[arg-type]
