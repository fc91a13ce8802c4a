"""Selective activation checkpointing: gradients, exact held bytes, recomputed FLOPs, learning, errors."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hf_models import tiny_llama
from models import SMALL_GPT
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils.flop_counter import FlopCounterMode

from fsdp_ac import (
    ActivationMemoryMeter,
    ActivationPlan,
    CheckpointImpl,
    CheckpointWrapper,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
)
from fsdp_ac.reference_model import GPT, MLP, GPTConfig, TransformerBlock

BATCH, SEQ = 2, 12
"""Shape of the ``tokens`` fixture."""
UNIT = BATCH * SEQ * SMALL_GPT.d_model * 4
"""Bytes of one fp32 activation of width d_model."""
LSE = BATCH * SMALL_GPT.n_heads * SEQ * 4
"""Bytes of the log-sum-exp the attention kernel saves besides its output."""
SAVED_PER_BLOCK = {
    "default": 3 * UNIT + UNIT + LSE + 4 * UNIT,  # QKV, attention (+ LSE), first MLP matmul
    "torchtitan": 3 * UNIT + UNIT + LSE + 4 * UNIT,  # matmuls 1 and 3 of 4: the same ones here
    "matmul": 3 * UNIT + UNIT + LSE + UNIT + 4 * UNIT + UNIT,  # and both output projections
    "attention": UNIT + LSE,
}
"""Bytes a block holds beyond its input under each preset (pre-LN block, fused QKV, 4x MLP)."""

CUSTOM_POLICIES: dict[str, Any] = {
    "op_list": [torch.ops.aten.addmm.default],
    "op_calls": ["aten.addmm.default#2"],  # the MLP's first matmul only, as the planner writes it
    "policy_fn": lambda ctx, op, *args, **kwargs: CheckpointPolicy.PREFER_RECOMPUTE,
}


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def step(
    model: nn.Module, inputs: torch.Tensor, loss_fn: Callable[..., torch.Tensor] = loss_of
) -> tuple[int, list[torch.Tensor]]:
    """One forward and backward; returns the bytes held for backward and the gradients."""
    with ActivationMemoryMeter(model) as meter:
        loss = loss_fn(model, inputs)
    return meter.held_bytes, backward(model, loss)


def gradients(
    model: nn.Module, inputs: torch.Tensor, loss_fn: Callable[..., torch.Tensor] = loss_of
) -> list[torch.Tensor]:
    """One forward and backward, unmeasured: torch.compile does not trace under a dispatch mode."""
    return backward(model, loss_fn(model, inputs))


def backward(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    loss.backward()
    grads = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def selective(model: nn.Module, save: Any = "default", **kwargs: Any) -> SelectiveCheckpoint:
    wrapper_fn = SelectiveCheckpoint(save, **kwargs)
    apply_activation_checkpointing(model, wrapper_fn, auto_wrap_policy={TransformerBlock})
    return wrapper_fn


@pytest.mark.parametrize("save", [*SelectiveCheckpoint.PRESETS, *CUSTOM_POLICIES])
def test_gradients_equal_no_ac_bitwise(gpt: GPT, tokens: torch.Tensor, save: str) -> None:
    wrapped = copy.deepcopy(gpt)
    selective(wrapped, CUSTOM_POLICIES.get(save, save))
    _, expected = step(gpt, tokens)
    for _ in range(2):  # the default preset learns on the first call and uses what it learned after
        _, grads = step(wrapped, tokens)
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)


def test_random_ops_replay_the_same_numbers(tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**{**SMALL_GPT.__dict__, "dropout": 0.3}))
    wrapped = copy.deepcopy(plain)
    selective(wrapped)
    for _ in range(2):
        torch.manual_seed(1)
        _, expected = step(plain, tokens)
        torch.manual_seed(1)
        _, grads = step(wrapped, tokens)
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("save", SelectiveCheckpoint.PRESETS)
def test_held_bytes_are_exactly_the_saved_outputs(gpt: GPT, tokens: torch.Tensor, save: str) -> None:
    full = copy.deepcopy(gpt)
    apply_activation_checkpointing(full, auto_wrap_policy={TransformerBlock})
    full_bytes, _ = step(full, tokens)
    wrapped = copy.deepcopy(gpt)
    selective(wrapped, save)
    first, _ = step(wrapped, tokens)
    second, _ = step(wrapped, tokens)
    assert second - full_bytes == SMALL_GPT.n_layers * SAVED_PER_BLOCK[save]
    # Learning costs the first block of the first step its two output projections, once.
    assert first - second == (2 * UNIT if save == "default" else 0)


def test_blocks_learn_separately_without_a_shared_object(gpt: GPT, tokens: torch.Tensor) -> None:
    shared, separate = copy.deepcopy(gpt), copy.deepcopy(gpt)
    selective(shared)
    for layer in separate.layers:
        apply_activation_checkpointing(layer, SelectiveCheckpoint(), auto_wrap_policy={"Attention", "MLP"})
    # Sub-blocks: each Attention and MLP is its own region and learns its own plan.
    first, _ = step(separate, tokens)
    second, _ = step(separate, tokens)
    assert first - second == SMALL_GPT.n_layers * 2 * UNIT
    assert step(shared, tokens)[0] - step(shared, tokens)[0] == 2 * UNIT


def recomputed_matmul_flops(model: nn.Module, tokens: torch.Tensor) -> int:
    """Matmul FLOPs of the backward pass (gradients plus any recomputation)."""
    loss = loss_of(model, tokens)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()["Global"]
    return int(counts.get(torch.ops.aten.addmm, 0) + counts.get(torch.ops.aten.mm, 0))


@pytest.mark.parametrize(
    ("save", "recomputed_per_block"),
    [
        ("default", 1),  # the attention output projection (d x d)
        ("torchtitan", 1),
        ("matmul", 0),
        ("attention", 8),  # QKV (3), projection (1), MLP in (4); the last matmul is never replayed
        (None, 8),  # full checkpointing
    ],
)
def test_recomputed_flops_are_counted(
    gpt: GPT, tokens: torch.Tensor, save: str | None, recomputed_per_block: int
) -> None:
    wrapped = copy.deepcopy(gpt)
    if save is None:
        apply_activation_checkpointing(wrapped, auto_wrap_policy={TransformerBlock})
    else:
        selective(wrapped, save)
    step(wrapped, tokens)  # learn
    extra = recomputed_matmul_flops(wrapped, tokens) - recomputed_matmul_flops(gpt, tokens)
    d_model = SMALL_GPT.d_model
    assert extra == SMALL_GPT.n_layers * recomputed_per_block * 2 * BATCH * SEQ * d_model * d_model


def test_learned_plan_names_the_saved_matmuls(gpt: GPT, tokens: torch.Tensor) -> None:
    wrapper_fn = selective(gpt)
    assert wrapper_fn.learned(gpt.layers[0]) is None
    step(gpt, tokens)
    # QKV (#0) and the MLP's first matmul (#2); the output projections (#1, #3) feed residual adds.
    expected = ["aten.addmm.default #0", "aten.addmm.default #2"]
    assert wrapper_fn.learned(gpt.layers[0]) == wrapper_fn.learned(gpt.layers[1]) == expected
    assert repr(wrapper_fn) == "SelectiveCheckpoint('default')"


class Branchy(nn.Module):
    """Runs an extra matmul for long inputs: the op sequence depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.extra = nn.Linear(8, 8)
        self.last = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if x.shape[0] > 4:
            h = torch.tanh(self.extra(h))
        return x + self.last(h)


def test_a_block_that_changes_path_learns_again() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(Branchy(), Branchy())
    wrapped = copy.deepcopy(plain)
    wrapper_fn = SelectiveCheckpoint()
    apply_activation_checkpointing(wrapped, wrapper_fn, auto_wrap_policy={Branchy})
    for rows in (6, 2, 2, 6, 6):
        x = torch.randn(rows, 8)
        plain(x).sum().backward()
        wrapped(x).sum().backward()
        for got, want in zip(wrapped.parameters(), plain.parameters(), strict=True):
            assert (got.grad is None and want.grad is None) or torch.equal(got.grad, want.grad)
            got.grad = want.grad = None
        saved = ["aten.addmm.default #0", "aten.addmm.default #1"] if rows > 4 else ["aten.addmm.default #0"]
        assert wrapper_fn.learned(wrapped[0]) == saved


def test_wrapping_again_is_idempotent_only_for_the_same_object(gpt: GPT) -> None:
    wrapper_fn = selective(gpt)
    apply_activation_checkpointing(gpt, wrapper_fn, auto_wrap_policy={TransformerBlock})
    assert all(type(layer._checkpoint_wrapped_module) is TransformerBlock for layer in gpt.layers)
    assert wrapper_fn(gpt.layers[0]) is gpt.layers[0]
    with pytest.raises(ValueError, match="already wrapped for activation checkpointing with other settings"):
        SelectiveCheckpoint("matmul")(gpt.layers[0])


def test_bad_arguments_raise_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"Unknown selective checkpointing preset 'titan'; use one of"):
        SelectiveCheckpoint("titan")
    with pytest.raises(TypeError, match=r"Use aten\.mm\.default"):
        SelectiveCheckpoint([torch.ops.aten.mm])
    with pytest.raises(ValueError, match="no operators to save"):
        SelectiveCheckpoint([])
    with pytest.raises(TypeError, match=r"needs CheckpointImpl\.NO_REENTRANT"):
        SelectiveCheckpoint(checkpoint_impl=CheckpointImpl.REENTRANT)
    with pytest.raises(TypeError, match="sets context_fn itself"):
        SelectiveCheckpoint(context_fn=lambda: None)


def test_named_calls_save_exactly_those_outputs(gpt: GPT, tokens: torch.Tensor) -> None:
    full = copy.deepcopy(gpt)
    apply_activation_checkpointing(full, auto_wrap_policy={TransformerBlock})
    full_bytes, expected_grads = step(full, tokens)
    # The third addmm of a block (the MLP's first matmul, 4 x d_model wide) and nothing else: not
    # even the attention output, which every preset saves.
    wrapped = copy.deepcopy(gpt)
    wrapper_fn = selective(wrapped, ["aten.addmm.default#2"])
    assert wrapper_fn.text == "aten.addmm.default#2"
    for _ in range(2):
        held, grads = step(wrapped, tokens)
        assert held - full_bytes == SMALL_GPT.n_layers * 4 * UNIT
        for got, want in zip(grads, expected_grads, strict=True):
            assert torch.equal(got, want)
    # The saved matmul is not recomputed: QKV (3) and the projection (1) are; the last never is.
    extra = recomputed_matmul_flops(wrapped, tokens) - recomputed_matmul_flops(gpt, tokens)
    assert extra == SMALL_GPT.n_layers * 4 * 2 * BATCH * SEQ * SMALL_GPT.d_model**2


def test_operator_names_read_back_from_text() -> None:
    text = SelectiveCheckpoint.from_text("aten.addmm.default#2, aten.bmm.default,aten.addmm.default#0").text
    assert text == "aten.bmm.default,aten.addmm.default#0,aten.addmm.default#2"
    assert SelectiveCheckpoint.from_text(text).text == text
    assert SelectiveCheckpoint.from_text("torchtitan").text == "torchtitan"
    assert SelectiveCheckpoint(lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE).text is None
    for bad in ("aten.nope.default#0", "aten.mm.default#x", "mm#0.x"):
        with pytest.raises(ValueError, match=r"namespace\.operator\.overload"):
            SelectiveCheckpoint.from_text(bad)
    plan = ActivationPlan({"layers.0": "selective:aten.addmm.default#2", "layers.1": "selective:matmul"})
    assert ActivationPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match=r"namespace\.operator\.overload"):
        ActivationPlan({"layers.0": "selective:aten.nope.default#0"})


def test_checkpoint_arguments_reach_the_wrapper() -> None:
    block = SelectiveCheckpoint("matmul", preserve_rng_state=False, allow_rng_divergence=True)(
        nn.Linear(2, 2)
    )
    assert isinstance(block, CheckpointWrapper)
    assert block.checkpoint_fn.keywords["preserve_rng_state"] is False
    assert block.allow_rng_divergence is True


def test_hugging_face_llama(tokens: torch.Tensor) -> None:
    """Separate Q/K/V and a gated MLP: the default preset saves what backward reads, not every other."""
    model = tiny_llama()

    def llama_loss(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
        # use_cache=False as with any checkpointing: a cache filled by the forward changes the replay.
        return m(t, labels=t, use_cache=False).loss

    _, expected = step(model, tokens, llama_loss)
    held = {}
    for save in ("default", "torchtitan", "matmul"):
        wrapped = copy.deepcopy(model)
        wrapper_fn = SelectiveCheckpoint(save)
        apply_activation_checkpointing(wrapped, wrapper_fn, auto_wrap_policy=model._no_split_modules)
        step(wrapped, tokens, llama_loss)
        held[save], grads = step(wrapped, tokens, llama_loss)
        for got, want in zip(grads, expected, strict=True):
            assert torch.equal(got, want)
        if save == "default":
            # q, k, v (#0-2), gate and up (#4, #5); o_proj (#3) and down_proj (#6) feed residual adds.
            assert wrapper_fn.learned(wrapped.model.layers[0]) == [
                f"aten.mm.default #{i}" for i in (0, 1, 2, 4, 5)
            ]
    # torchtitan's alternation recomputes k_proj and up_proj (cheaper memory, more recompute here).
    assert held["torchtitan"] < held["default"] < held["matmul"]


# torch.compile: every form in one graph per backend, since compiling is the slow part on CPU.

COMPILE_GPT = GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_heads=2, n_layers=7)
"""Seven blocks, one per selective form, so that one compilation covers every form."""

COMPILED_RECOMPUTE = {
    # As in eager, with one rule of the compiled backward: a block's last matmul feeds only its
    # output, which the next region keeps as its input, so it is replayed in the last block only.
    "layers.0": ["attn.proj"],  # "default", learned uncompiled: the projection feeds a residual add
    "layers.1": ["attn.proj"],  # "torchtitan": recomputes matmuls 2 and 4
    "layers.2": [],  # "matmul"
    "layers.3": ["attn.proj", "attn.qkv", "mlp.fc"],  # "attention"
    "layers.4": [],  # [aten.addmm.default]
    "layers.5": ["attn.proj", "attn.qkv"],  # ["aten.addmm.default#2"]: saves mlp.fc only
    # Recomputes everything; its output feeds ln_f outside any region, so it is recomputed too.
    "layers.6": ["attn.proj", "attn.qkv", "mlp.fc", "mlp.proj"],
}
"""Linear layers whose forward matmul is replayed in the compiled backward, by block."""


def every_selective_form(model: GPT) -> GPT:
    """Checkpoints each block of ``model`` with another form: the presets through a plan, then custom."""
    presets = ("default", "torchtitan", "matmul", "attention")
    ActivationPlan({f"layers.{i}": f"selective:{preset}" for i, preset in enumerate(presets)}).apply(model)
    for i, policy in enumerate(CUSTOM_POLICIES.values(), start=len(presets)):
        model.layers[i] = SelectiveCheckpoint(policy)(model.layers[i])
    return model


class CompiledGraphs:
    """A backend that compiles as ``backend`` does and keeps the forward and backward graphs."""

    def __init__(self, backend: str) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        if backend == "inductor":
            from torch._inductor.compile_fx import compile_fx, compile_fx_inner

            self.backend: Any = functools.partial(compile_fx, inner_compile=self._keep(compile_fx_inner))
        else:
            from torch._dynamo.backends.debugging import aot_eager, boxed_nop

            keep = self._keep(boxed_nop)
            self.backend = functools.partial(aot_eager, fw_compiler=keep, bw_compiler=keep)

    def _keep(self, compiler: Callable[..., Any]) -> Callable[..., Any]:
        def keep(graph: torch.fx.GraphModule, inputs: Any, **kwargs: Any) -> Any:
            self.graphs.append(graph)
            return compiler(graph, inputs, **kwargs)

        return keep

    def recomputed_linears(self, model: nn.Module) -> list[str]:
        """Names of the Linear layers whose forward ``addmm`` runs again in a backward graph.

        Replayed forward operators keep the forward's ``nn_module_stack`` (keyed by module id);
        gradient operators carry theirs as ``fwd_nn_module_stack`` instead.
        """
        names = {str(id(module)): name for name, module in model.named_modules()}
        return sorted(
            names[next(reversed(node.meta["nn_module_stack"]))]
            for graph in self.graphs
            if any(n.name.startswith("tangents") for n in graph.graph.find_nodes(op="placeholder"))
            for node in graph.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)
            if "nn_module_stack" in node.meta
        )


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiles from scratch and leaves no compiled code to later tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_grads(
    model: nn.Module, tokens: torch.Tensor, backend: str
) -> tuple[list[torch.Tensor], CompiledGraphs]:
    """Gradients of one compiled step of ``model`` as a single graph, and the graphs compiled."""
    graphs = CompiledGraphs(backend)
    compiled = torch.compile(model, backend=graphs.backend, fullgraph=True, dynamic=False)
    # Scalar C++ code compiles faster than vectorised code on two cores; the partition is the same.
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False, "compile_threads": 1}):
        return gradients(compiled, tokens), graphs


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_every_form_compiles_as_one_graph_and_recomputes_what_its_policy_says(
    backend: str, fresh_dynamo: None, recwarn: pytest.WarningsRecorder
) -> None:
    torch.manual_seed(0)
    plain = GPT(COMPILE_GPT)
    model = every_selective_form(copy.deepcopy(plain))
    tokens = torch.randint(0, COMPILE_GPT.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    _, expected = step(plain, tokens)
    step(model, tokens)  # the default preset learns, uncompiled
    grads, graphs = compile_grads(model, tokens, backend)  # fullgraph=True: no graph break anywhere
    for got, want in zip(grads, expected, strict=True):
        if backend == "aot_eager":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert graphs.recomputed_linears(model) == sorted(
        f"{block}.{linear}" for block, linears in COMPILED_RECOMPUTE.items() for linear in linears
    )
    assert not [w for w in recwarn if "SelectiveCheckpoint" in str(w.message)]


def test_default_preset_under_compile_warns_until_learned_then_uses_the_plan(
    fresh_dynamo: None, tokens: torch.Tensor
) -> None:
    torch.manual_seed(0)
    plain = GPT(SMALL_GPT)
    model = copy.deepcopy(plain)
    wrapper_fn = selective(model)
    _, expected = step(plain, tokens)
    with pytest.warns(UserWarning, match=r"SelectiveCheckpoint\('default'\) has not learned yet") as record:
        grads, graphs = compile_grads(model, tokens, "aot_eager")
    unlearned = [w for w in record if "has not learned yet" in str(w.message)]
    assert len(unlearned) == 1  # once for the two blocks of one kind
    assert "TransformerBlock blocks" in str(unlearned[0].message)
    assert "set_stance('force_eager')" in str(unlearned[0].message)
    assert graphs.recomputed_linears(model) == []  # every matmul output saved, as "matmul" does
    assert wrapper_fn.learned(model.layers[0]) is None  # nothing is learned while tracing
    for got, want in zip(grads, expected, strict=True):
        assert torch.equal(got, want)

    # The remedy the warning names: one uncompiled step, then compile.
    torch._dynamo.reset()
    with torch.compiler.set_stance("force_eager"):
        gradients(torch.compile(model), tokens)
    assert wrapper_fn.learned(model.layers[0]) == ["aten.addmm.default #0", "aten.addmm.default #2"]
    grads, graphs = compile_grads(model, tokens, "aot_eager")
    # The last block's output feeds ln_f outside any region: it is recomputed, and its last matmul.
    recomputed = ["layers.0.attn.proj", "layers.1.attn.proj", "layers.1.mlp.proj"]
    assert graphs.recomputed_linears(model) == recomputed
    for got, want in zip(grads, expected, strict=True):
        assert torch.equal(got, want)


class ResidualMLP(nn.Module):
    """``x + mlp(ln(x))``: a block DTensor runs on CPU (it has no sharding rule for CPU attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(SMALL_GPT.d_model)
        self.mlp = MLP(SMALL_GPT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def test_dtensor_blocks_save_and_learn_as_plain_ones_eager_and_compiled(
    single_rank_group: None, fresh_dynamo: None
) -> None:
    """Replicated DTensor parameters and input on a one-rank mesh, against the same plain model."""
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    plain = nn.Sequential(ResidualMLP(), ResidualMLP())
    models = {"plain": plain, "dtensor": distribute_module(copy.deepcopy(plain), mesh)}
    x = torch.randn(BATCH, SEQ, SMALL_GPT.d_model)
    inputs = {"plain": x, "dtensor": distribute_tensor(x, mesh, [Replicate()])}

    def dtensor_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).pow(2).mean()

    baseline = {kind: step(model, inputs[kind], dtensor_loss) for kind, model in models.items()}
    for save in SelectiveCheckpoint.PRESETS:
        held = {}
        for kind, model in models.items():
            wrapped = copy.deepcopy(model)
            wrapper_fn = SelectiveCheckpoint(save)
            apply_activation_checkpointing(wrapped, wrapper_fn, auto_wrap_policy={ResidualMLP})
            step(wrapped, inputs[kind], dtensor_loss)
            held[kind], grads = step(wrapped, inputs[kind], dtensor_loss)
            for got, want in zip(grads, baseline[kind][1], strict=True):
                assert torch.equal(got, want)
            if save == "default":
                # The first matmul feeds the GELU, which reads it; the second feeds the residual add.
                assert wrapper_fn.learned(wrapped[0]) == ["aten.addmm.default #0"]
        # A DTensor holds a wrapper besides its local tensor: compare what checkpointing frees.
        assert held["dtensor"] - baseline["dtensor"][0] == held["plain"] - baseline["plain"][0], save
    # `wrapped` is the DTensor model with the learned default preset.
    compiled = torch.compile(wrapped, backend="aot_eager", fullgraph=True, dynamic=False)
    grads = gradients(compiled, inputs["dtensor"], dtensor_loss)
    for got, want in zip(grads, baseline["dtensor"][1], strict=True):
        assert torch.equal(got, want)


def _torch_sac_saving_matmuls(model: nn.Module, x: torch.Tensor) -> str:
    """What torch's own selective checkpointing does saving every matmul: recorded, not asserted."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.addmm.default])
    out = x
    for block in model:
        out = checkpoint(block, out, use_reentrant=False, context_fn=context)
    try:
        out.square().sum().backward()
    except RuntimeError as error:
        return f"torch {torch.__version__}: {error}"
    return f"torch {torch.__version__}: trains"


@pytest.mark.parametrize("relu", [False, True], ids=["mul_", "relu_inplace"])
@pytest.mark.parametrize(
    "save",
    [*SelectiveCheckpoint.PRESETS, "aten.addmm.default#0", "aten.addmm.default#0,aten.addmm.default#1"],
)
def test_outputs_modified_in_place_are_recomputed_not_saved(
    relu: bool, save: str, record_property: Callable[[str, object], None]
) -> None:
    from models import in_place_model

    model, x = in_place_model(relu), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    record_property("torch_sac", _torch_sac_saving_matmuls(copy.deepcopy(model), x))
    wrapped = copy.deepcopy(model)
    wrapper_fn = SelectiveCheckpoint.from_text(save)
    apply_activation_checkpointing(wrapped, wrapper_fn, auto_wrap_policy={type(model[0])})

    def loss(m: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return m(inputs).square().sum()

    _, expected = step(model, x, loss)
    full = copy.deepcopy(model)
    apply_activation_checkpointing(full, auto_wrap_policy={type(model[0])})
    full_bytes, _ = step(full, x, loss)
    for _ in range(2):
        held, grads = step(wrapped, x, loss)
        assert all(torch.equal(g, w) for g, w in zip(grads, expected, strict=True))
    # The mutated output is not held: at most the second matmul's output (16 floats per row saved).
    assert held - full_bytes <= len(model) * 4 * 8 * 4


def test_an_in_place_change_that_cannot_be_recomputed_stops_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import in_place_model

    monkeypatch.setattr("fsdp_ac.selective.uncache_selective_outputs", lambda caching, hit: False)
    model = in_place_model(relu=True)
    apply_activation_checkpointing(model, SelectiveCheckpoint("matmul"), auto_wrap_policy={type(model[0])})
    with pytest.raises(RuntimeError, match=r"aten.relu_.default modifies in place the output of aten.addmm"):
        model(torch.randn(4, 8))


def test_attention_calls_have_one_name_on_every_device(gpt: GPT, tokens: torch.Tensor) -> None:
    from fsdp_ac.selective import SDPA, op_call_name

    kernels = [
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    ]
    assert (
        {op_call_name(k, 0) for k in kernels}
        == {"aten.scaled_dot_product_attention.default#0"}
        == {op_call_name(SDPA, 0)}
    )
    # The CPU kernel's own name, as plans made before names were device-neutral write it, saves the same.
    held = []
    for name in (
        "aten.scaled_dot_product_attention.default#0",
        "aten._scaled_dot_product_flash_attention_for_cpu.default#0",
    ):
        model = copy.deepcopy(gpt)
        selective(model, [name])
        held.append(step(model, tokens)[0])
    full = copy.deepcopy(gpt)
    apply_activation_checkpointing(full, auto_wrap_policy={TransformerBlock})
    assert held[0] == held[1] == step(full, tokens)[0] + SMALL_GPT.n_layers * (UNIT + LSE)


def test_a_call_that_never_happens_raises_at_the_first_step(gpt: GPT, tokens: torch.Tensor) -> None:
    selective(gpt, ["aten.addmm.default#0", "aten.addmm.default#9", "aten.mm.default#0"])
    with pytest.raises(
        ValueError, match=r"saves aten.addmm.default#9, aten.mm.default#0 in TransformerBlock"
    ) as caught:
        gpt(tokens)
    assert (
        "calls are aten.addmm.default#0, aten.addmm.default#1, aten.addmm.default#2, aten.addmm.default#3"
        in str(caught.value)
        and "aten.scaled_dot_product_attention.default#0" in str(caught.value)
    )
