"""Activation plans: every strategy, one shared selective object, table, JSON, errors, FSDP1.

A plan that checkpoints is shown to recompute: backward counts the forward operators it reruns
(``models.ForwardOpsInBackward``), per strategy, so a wrapper that checkpointed nothing fails.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from hf_models import tiny_llama
from models import ForwardOpsInBackward, chain_of, recomputed_in_backward
from torch import nn

from fsdp_ac import (
    ActivationPlan,
    CheckpointWrapper,
    ModulePolicy,
    SelectiveCheckpoint,
    apply_activation_checkpointing,
)
from fsdp_ac.offload import OffloadOptions
from fsdp_ac.plan import PlanOrigin
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock
from fsdp_ac.strategies import STRATEGIES, Full, Offload

MIXED = {
    "layers.0": "full",
    "layers.1": "selective",
    "layers.2": "selective:matmul",
    "layers.3": "offload",
    "layers.4": "full+offload",
    "layers.5": "none",
}
"""One block per strategy."""

WRAPPERS_BY_STRATEGY = {
    "full": "CheckpointWrapper>TransformerBlock",
    "selective": "CheckpointWrapper>TransformerBlock",
    "selective:matmul": "CheckpointWrapper>TransformerBlock",
    "offload": "OffloadWrapper>TransformerBlock",
    "full+offload": "CheckpointWrapper>TransformerBlock",  # one wrapper that also offloads
    "none": "TransformerBlock",
}

RECOMPUTED_BY_STRATEGY = {
    "full": (1, 3, 3),
    "selective": (1, 0, 1),
    "selective:matmul": (1, 0, 0),
    "offload": (0, 0, 0),
    "full+offload": (1, 3, 3),
    "none": (0, 0, 0),
}
"""What a block reruns in backward: its GELU, and its ``Linear`` forwards (``addmm``) in the first
step and in later ones. Full checkpointing reruns 3 of 4 Linears (``models.LINEARS_RECOMPUTED_PER_BLOCK``);
"selective" saves every matmul while it learns, then all but ``attn.proj``, whose output only a
residual add reads; "selective:matmul" saves every matmul; offloading recomputes nothing."""

GELU = torch.ops.aten.gelu.default


@pytest.fixture
def six_blocks() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_heads=2, n_layers=6))


def grads(model: nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """The gradients of one step, and the GELUs and ``Linear`` forwards its backward reran."""
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    with ForwardOpsInBackward(GELU) as gelus, ForwardOpsInBackward() as linears:
        loss.backward()
    out = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out, (gelus.count, linears.count)


def test_each_strategy_wraps_as_named_and_keeps_gradients(six_blocks: GPT) -> None:
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    planned = copy.deepcopy(six_blocks)
    assert ActivationPlan(MIXED).apply(planned) is planned
    layers = list(planned.layers._modules.values())
    assert [chain_of(layer) for layer in layers] == [WRAPPERS_BY_STRATEGY[s] for s in MIXED.values()]
    assert [getattr(layer, "region_name", None) for layer in layers] == [*list(MIXED)[:5], None]
    assert layers[2].checkpoint_fn.keywords["context_fn"].args[0].owner.name == "matmul"
    assert [getattr(layer, "offload", None) for layer in layers] == [None] * 4 + [OffloadOptions(), None]
    expected, recomputed = grads(six_blocks, tokens)
    assert recomputed == (0, 0)
    for step in range(2):
        got_grads, recomputed = grads(planned, tokens)
        for got, want in zip(got_grads, expected, strict=True):
            assert torch.equal(got, want)
        per_block = [RECOMPUTED_BY_STRATEGY[s] for s in MIXED.values()]
        assert recomputed == (sum(r[0] for r in per_block), sum(r[1 + step] for r in per_block))


def test_blocks_with_one_preset_share_one_selective_object(six_blocks: GPT) -> None:
    ActivationPlan.from_policy(six_blocks, {TransformerBlock}, "selective").apply(six_blocks)
    owners = {layer.checkpoint_fn.keywords["context_fn"].args[0].owner for layer in six_blocks.layers}
    assert len(owners) == 1 and isinstance(owners.pop(), SelectiveCheckpoint)


def test_from_policy_with_every_n(six_blocks: GPT) -> None:
    plan = ActivationPlan.from_policy(six_blocks, ModulePolicy({"TransformerBlock"}).every(2), "full+offload")
    assert plan.strategies == dict.fromkeys(["layers.0", "layers.2", "layers.4"], Offload(Full()))
    assert list(plan) == ["layers.0", "layers.2", "layers.4"] and len(plan) == 3


def test_table(six_blocks: GPT) -> None:
    plan = ActivationPlan({"layers.0": "full", "layers.1": "selective:torchtitan", "lm_head": "none"})
    assert plan.table() == (
        "module    strategy\n"
        "--------  --------------------\n"
        "layers.0  full\n"
        "layers.1  selective:torchtitan\n"
        "lm_head   none"
    )
    block_params = f"{sum(p.numel() for p in six_blocks.layers[0].parameters()):,}"
    assert (
        plan.table(six_blocks).splitlines()[2]
        == f"layers.0  full                  TransformerBlock  {block_params}"
    )
    assert plan.table(six_blocks).splitlines()[4] == "lm_head   none                  Linear            512"


def test_json_round_trip(tmp_path: Path) -> None:
    plan = ActivationPlan(MIXED)
    assert json.loads(plan.to_json()) == {
        "format": "fsdp_ac.ActivationPlan",
        "version": 2,
        "origin": None,
        "strategies": MIXED,
    }
    version_1 = {"format": "fsdp_ac.ActivationPlan", "version": 1, "strategies": MIXED}
    assert ActivationPlan.from_json(json.dumps(version_1)) == plan  # plans made before origins load
    plan.save(tmp_path / "plan.json")
    loaded = ActivationPlan.load(tmp_path / "plan.json")
    assert loaded == plan and list(loaded) == list(MIXED)
    assert repr(loaded) == f"ActivationPlan({MIXED!r})"
    assert loaded != ActivationPlan({"layers.0": "full"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "does not parse"),
        ('{"strategies": {}}', 'expected a JSON object with "format": "fsdp_ac.ActivationPlan"'),
        (
            '{"format": "fsdp_ac.ActivationPlan", "version": 9, "strategies": {}}',
            "version 9 is not supported",
        ),
        (
            '{"format": "fsdp_ac.ActivationPlan", "version": 1, "strategies": []}',
            'needs a "strategies" object',
        ),
        (
            '{"format": "fsdp_ac.ActivationPlan", "version": 1, "strategies": {"a": "ful"}}',
            "Did you mean 'full'",
        ),
    ],
)
def test_bad_json_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ActivationPlan.from_json(text)


def test_invalid_plans_raise_with_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown strategy 'selective:fast' for module 'layers\.0'; use one of"
    ):
        ActivationPlan({"layers.0": "selective:fast"})
    with pytest.raises(ValueError, match="cannot name the root module"):
        ActivationPlan({"": "full"})
    with pytest.raises(ValueError, match=r"wraps both 'layers\.0' \(full\) and 'layers\.0\.mlp' \(offload\)"):
        ActivationPlan({"layers.0": "full", "layers.0.mlp": "offload"})
    with pytest.raises(TypeError, match="strategy names"):
        ActivationPlan({"layers.0": 1})  # type: ignore[dict-item]
    ActivationPlan({"layers.0": "none", "layers.0.mlp": "full", "layers.1": "full"})  # "none" never nests
    assert set(STRATEGIES) >= {"none", "full", "offload", "full+offload", "selective:default"}


def test_unknown_or_wrapped_modules_are_refused(six_blocks: GPT) -> None:
    with pytest.raises(
        ValueError, match=r"names 'layer.0', which is not a module of GPT\. Close names: 'layers.0'"
    ):
        ActivationPlan({"layer.0": "full"}).apply(six_blocks)
    apply_activation_checkpointing(six_blocks, auto_wrap_policy={TransformerBlock})
    with pytest.raises(ValueError, match=r"wraps 'layers\.1', but it is already wrapped"):
        ActivationPlan({"layers.1": "offload"}).apply(six_blocks)
    with pytest.raises(
        ValueError, match=r"'layers\.1\.mlp', but it lies inside 'layers\.1', which is already"
    ):
        ActivationPlan({"layers.1.mlp": "full"}).apply(six_blocks)
    with pytest.raises(ValueError, match="not a module of the model"):
        ActivationPlan({"nope": "full"}).table(six_blocks)


def test_hugging_face_plan_by_module_name() -> None:
    model = tiny_llama()
    planned = copy.deepcopy(model)
    ActivationPlan({"model.layers.0": "selective", "model.layers.1": "full+offload"}).apply(planned)
    assert isinstance(planned.model.layers._modules["0"], CheckpointWrapper)
    assert planned.model.layers._modules["1"].offload == OffloadOptions()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens, use_cache=False).loss.backward()
    for _ in range(2):
        loss = planned(tokens, labels=tokens, use_cache=False).loss
        # Both strategies rerun their layer's SiLU (selective saves matmuls only).
        assert recomputed_in_backward(loss, torch.ops.aten.silu.default) == 2
        for got, want in zip(planned.parameters(), model.parameters(), strict=True):
            assert torch.equal(got.grad, want.grad)
            got.grad = None


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_full_offload_inside_a_flat_fsdp1_unit_is_one_wrapper_with_clean_state_dicts(
    single_rank_group: None, six_blocks: GPT
) -> None:
    """Accelerate's FSDP1 default with offload reaches FSDP1 units without use_orig_params through the
    plan path: full+offload is one wrapper there, so the flat parameter stays out of the state dict."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    names = set(six_blocks.state_dict())
    baseline, model = (
        FSDP(
            copy.deepcopy(six_blocks),
            auto_wrap_policy=ModulePolicy({TransformerBlock}),
            use_orig_params=False,
            device_id=torch.device("cpu"),
        )
        for _ in range(2)
    )
    ActivationPlan({"layers.0": "full+offload", "layers.1": "offload"}).apply(model)
    layer = model._fsdp_wrapped_module.layers[0]
    assert chain_of(layer) == "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock"
    assert layer._fsdp_wrapped_module.offload == OffloadOptions()
    expected, recomputed = grads(baseline, tokens)
    assert recomputed[0] == 0
    got, recomputed = grads(model, tokens)
    assert recomputed[0] == 1  # the checkpointed block reran its GELU
    for got_grad, want in zip(got, expected, strict=True):  # the flat parameters' gradients
        assert torch.equal(got_grad, want)
    assert set(get_model_state_dict(model)) == names


def test_plan_inside_fsdp1_units(single_rank_group: None, six_blocks: GPT) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    blocks = ModulePolicy({TransformerBlock})
    model = FSDP(six_blocks, auto_wrap_policy=blocks, use_orig_params=True, device_id=torch.device("cpu"))
    ActivationPlan({"layers.0": "full", "layers.1": "selective"}).apply(model)
    layers = list(model._fsdp_wrapped_module.layers._modules.values())
    assert [chain_of(layer) for layer in layers[:3]] == [
        "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock",
        "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock",
        "FullyShardedDataParallel>TransformerBlock",
    ]
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    assert grads(model, tokens)[1] == (2, 3)  # full: GELU and 3 Linears; selective, learning: GELU
    with pytest.warns(UserWarning, match=r"AC region 'layers' spans 4 FSDP units"):
        ActivationPlan({"layers": "full"}).apply(
            FSDP(
                GPT(GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_heads=2, n_layers=4)),
                auto_wrap_policy=blocks,
                device_id=torch.device("cpu"),
            )
        )


ORIGIN = PlanOrigin("cpu", "float32", (2, 8, 16), torch.__version__, "GPT", "TransformerBlock", 6)
"""What a plan for ``six_blocks`` on tokens of shape (2, 8) was made for."""


def test_the_origin_travels_in_json_and_a_matching_model_applies_silently(
    six_blocks: GPT, recwarn: pytest.WarningsRecorder
) -> None:
    plan = ActivationPlan({f"layers.{i}": "full" for i in range(6)}, ORIGIN)
    loaded = ActivationPlan.from_json(plan.to_json())
    assert loaded == plan and loaded.origin == ORIGIN
    assert loaded != ActivationPlan(plan.strategies)
    loaded.apply(six_blocks)
    for _ in range(2):  # the first step's check removes itself; the recompute in backward is unaffected
        six_blocks(torch.randint(0, 32, (2, 8))).sum().backward()
    assert not [w for w in recwarn if "activation plan" in str(w.message)]


def test_a_plan_applied_elsewhere_warns_naming_each_difference(six_blocks: GPT) -> None:
    origin = PlanOrigin("cuda", "bfloat16", (4, 8, 16), "2.0.0", "Llama", "TransformerBlock", 8)
    plan = ActivationPlan({f"layers.{i}": "full" for i in range(5)}, origin)
    with pytest.warns(UserWarning, match="to a model") as caught:
        plan.apply(six_blocks)
    message = str(caught[0].message)
    for difference in (
        f"torch {torch.__version__} (planned for 2.0.0)",
        "model class GPT (planned for Llama)",
        "TransformerBlock count 6 (planned for 8)",
        "TransformerBlock blocks the plan does not name: layers.5",
    ):
        assert difference in message
    with pytest.warns(UserWarning, match="to inputs") as caught:
        six_blocks(torch.randint(0, 32, (2, 8)))
    message = str(caught[0].message)
    for difference in (
        "device cpu (planned for cuda)",
        "dtype float32 (planned for bfloat16)",
        "block input shape (2, 8, 16) (planned for (4, 8, 16))",
    ):
        assert difference in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        six_blocks(torch.randint(0, 32, (2, 8)))  # the inputs are checked at the first step only
