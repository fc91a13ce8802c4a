"""Policies: every input form, matching through wrappers, every-N, FSDP1/FSDP2 placement, alignment.

Tests that train a model the policy checkpointed count the ``Linear`` forwards rerun in backward
(``models.ForwardOpsInBackward``), so the chosen blocks are shown to be recomputed, not only wrapped.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import pytest
import torch
from hf_models import tiny_llama
from models import (
    LINEARS_RECOMPUTED_PER_BLOCK,
    SMALL_GPT,
    block_policy_specs,
    chain_of,
    recomputed_in_backward,
)
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers
from torch.distributed.fsdp.wrap import (
    CustomPolicy,
    ModuleWrapPolicy,
    size_based_auto_wrap_policy,
)

from fsdp_ac import (
    CheckpointImpl,
    CheckpointWrapper,
    ModulePolicy,
    apply_activation_checkpointing,
    check_alignment,
    checkpoint_wrapper,
    fully_shard_by_policy,
)
from fsdp_ac.reference_model import GPT, GPTConfig, TransformerBlock

BLOCK_NAMES = ["layers.0", "layers.1"]
CPU = torch.device("cpu")

SPECS: dict[str, Any] = {
    **block_policy_specs(),
    "class": TransformerBlock,
    "name": "TransformerBlock",
    "name_list": ["TransformerBlock"],
    "qualified_name": {"fsdp_ac.reference_model.TransformerBlock"},
    "module_policy": ModulePolicy({"TransformerBlock"}),
}
"""Every way to say "the transformer blocks"."""

RECOMPUTED_PER_BLOCK = LINEARS_RECOMPUTED_PER_BLOCK[CheckpointImpl.NO_REENTRANT]
"""``Linear`` forwards rerun in backward per block the default (non-reentrant) wrapper checkpoints."""


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def raw_layers(model: nn.Module) -> list[nn.Module]:
    """The slots of ``model.layers`` in the raw tree, through any FSDP1 root wrapper."""
    root = model._modules.get("_fsdp_wrapped_module", model)
    return list(root._modules["layers"]._modules.values())  # type: ignore[union-attr]


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_every_input_form_selects_the_blocks(gpt: GPT, tokens: torch.Tensor, spec_name: str) -> None:
    spec = SPECS[spec_name]
    assert ModulePolicy(spec).names(gpt) == BLOCK_NAMES
    wrapped = copy.deepcopy(gpt)
    apply_activation_checkpointing(wrapped, auto_wrap_policy=spec)
    assert [chain_of(layer) for layer in raw_layers(wrapped)] == ["CheckpointWrapper>TransformerBlock"] * 2
    loss_of(gpt, tokens).backward()
    assert recomputed_in_backward(loss_of(wrapped, tokens)) == len(BLOCK_NAMES) * RECOMPUTED_PER_BLOCK
    for expected, got in zip(gpt.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(got.grad, expected.grad)


def test_size_policy_selects_like_fsdp(gpt: GPT) -> None:
    policy = functools.partial(size_based_auto_wrap_policy, min_num_params=5000)
    ours, theirs = copy.deepcopy(gpt), copy.deepcopy(gpt)
    apply_activation_checkpointing(ours, auto_wrap_policy=ModulePolicy(policy))
    torch_wrappers.apply_activation_checkpointing(theirs, auto_wrap_policy=policy)
    assert [chain_of(m) for m in raw_layers(ours)] == [chain_of(m) for m in raw_layers(theirs)]
    checkpointed = [n for n, m in ours.named_modules() if isinstance(m, CheckpointWrapper)]
    assert ModulePolicy(policy).names(gpt) == checkpointed == ["layers.0.mlp", "layers.1.mlp"]


def test_a_wrapper_and_its_block_match_once(gpt: GPT) -> None:
    """``hasattr`` reaches through a wrapper, so torch's CustomPolicy matches wrapper and block."""
    has_attention = CustomPolicy(lambda m: hasattr(m, "attn"))
    apply_activation_checkpointing(gpt, auto_wrap_policy={TransformerBlock})
    wrappers = [layer for layer in gpt.layers]
    blocks = [layer._checkpoint_wrapped_module for layer in wrappers]
    assert set(has_attention._run_policy(gpt, set(), {})) == {*wrappers, *blocks}  # nested FSDP units
    # FSDP1 gets the outermost wrapper of each block (FSDP(CheckpointWrapper(block)), one unit each).
    assert list(ModulePolicy(has_attention)._run_policy(gpt, set(), {})) == wrappers
    assert list(ModulePolicy({TransformerBlock})._run_policy(gpt, set(), {"x": 1}).values()) == [{"x": 1}] * 2
    # Checkpointing again finds the blocks checkpointed already: nothing nests.
    apply_activation_checkpointing(gpt, auto_wrap_policy=has_attention)
    assert [chain_of(layer) for layer in raw_layers(gpt)] == ["CheckpointWrapper>TransformerBlock"] * 2


def test_ignored_modules_are_skipped(gpt: GPT) -> None:
    chosen = ModulePolicy({TransformerBlock})._run_policy(gpt, {gpt.layers[0]}, {})
    assert list(chosen) == [gpt.layers[1]]


def test_torchs_own_apply_accepts_the_policy(gpt: GPT) -> None:
    """Lightning's FSDPStrategy(activation_checkpointing_policy=...) calls torch's apply with it."""
    torch_wrappers.apply_activation_checkpointing(gpt, auto_wrap_policy=ModulePolicy({"TransformerBlock"}))
    assert [chain_of(layer) for layer in raw_layers(gpt)] == ["CheckpointWrapper>TransformerBlock"] * 2


def test_class_names_match_subclasses(gpt: GPT) -> None:
    class FSDPTransformerBlock(TransformerBlock):  # what FSDP2 turns a sharded block's class into
        pass

    gpt.layers[1].__class__ = FSDPTransformerBlock
    assert ModulePolicy("TransformerBlock").names(gpt) == BLOCK_NAMES
    assert ModulePolicy("FSDPTransformerBlock").names(gpt) == ["layers.1"]


def test_policy_that_matches_nothing_names_the_model_classes(gpt: GPT) -> None:
    message = (
        r"ModulePolicy\(\{'DecoderLayer'\}\) matched no submodule of GPT.*module classes are: "
        r"Attention, Dropout, Embedding, GPT, LayerNorm, Linear, MLP, ModuleList, TransformerBlock"
    )
    with pytest.raises(ValueError, match=message):
        apply_activation_checkpointing(gpt, auto_wrap_policy={"DecoderLayer"})
    with pytest.raises(ValueError, match="matched no submodule of GPT"):
        apply_activation_checkpointing(gpt, check_fn=lambda m: False)
    with pytest.raises(ValueError, match="matched no submodule"):
        ModulePolicy(ModuleWrapPolicy({nn.Conv2d}))._run_policy(gpt, set(), {})
    assert not any(isinstance(m, CheckpointWrapper) for m in gpt.modules())


def test_bad_specs_raise_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"auto_wrap_policy such as ModuleWrapPolicy"):
        ModulePolicy(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module classes or class names, got 3"):
        ModulePolicy({TransformerBlock, 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module classes or class names"):
        ModulePolicy(int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty collection"):
        ModulePolicy(set())


def deep_gpt(n_layers: int = 8) -> GPT:
    return GPT(GPTConfig(vocab_size=16, max_seq_len=4, d_model=8, n_heads=2, n_layers=n_layers))


@pytest.mark.parametrize(
    ("derive", "expected"),
    [
        (lambda p: p.every(1), [0, 1, 2, 3, 4, 5, 6, 7]),
        (lambda p: p.every(2), [0, 2, 4, 6]),
        (lambda p: p.every(3), [0, 3, 6]),
        (lambda p: p.every(9), [0]),
        (lambda p: p.first(3), [0, 1, 2]),
        (lambda p: p.last(2), [6, 7]),
        (lambda p: p.last(20), [0, 1, 2, 3, 4, 5, 6, 7]),
        (lambda p: p.every(2).last(2), [4, 6]),
        (lambda p: p.first(5).every(2), [0, 2, 4]),
    ],
)
def test_every_first_last(derive: Any, expected: list[int]) -> None:
    blocks = ModulePolicy({TransformerBlock})
    model = deep_gpt()
    assert derive(blocks).names(model) == [f"layers.{i}" for i in expected]
    apply_activation_checkpointing(model, auto_wrap_policy=derive(blocks))
    assert [
        i for i, layer in enumerate(raw_layers(model)) if isinstance(layer, CheckpointWrapper)
    ] == expected
    tokens = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    assert recomputed_in_backward(loss_of(model, tokens)) == len(expected) * RECOMPUTED_PER_BLOCK
    # Derived policies leave the original alone, and checkpointing twice picks the same blocks.
    assert blocks.names(model) == [f"layers.{i}" for i in range(8)]
    apply_activation_checkpointing(model, auto_wrap_policy=derive(blocks))
    assert [chain_of(layer).count("CheckpointWrapper") for layer in raw_layers(model)] == [
        int(i in expected) for i in range(8)
    ]


def test_every_n_repr_and_errors() -> None:
    blocks = ModulePolicy({TransformerBlock, "MLP"})
    assert repr(blocks.every(2).last(3)) == "ModulePolicy({'MLP', 'TransformerBlock'}).every(2).last(3)"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            blocks.every(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"first\(\) takes a positive integer"):
        blocks.first(0)


def test_hugging_face_block_names(tokens: torch.Tensor) -> None:
    model = tiny_llama(3)
    wrapped = copy.deepcopy(model)
    policy = ModulePolicy(set(model._no_split_modules))
    assert policy.names(model) == [f"model.layers.{i}" for i in range(3)]
    assert policy.every(2).names(model) == ["model.layers.0", "model.layers.2"]
    apply_activation_checkpointing(wrapped, auto_wrap_policy=model._no_split_modules)
    assert all(isinstance(layer, CheckpointWrapper) for layer in wrapped.model.layers._modules.values())
    model(tokens, labels=tokens).loss.backward()
    # Each layer's MLP activation (SiLU, a forward-only operator) reruns once: all 3 are recomputed.
    silu = torch.ops.aten.silu.default
    assert recomputed_in_backward(wrapped(tokens, labels=tokens).loss, silu) == 3
    for (name, expected), (wrapped_name, got) in zip(
        model.named_parameters(), wrapped.named_parameters(), strict=True
    ):
        assert name == wrapped_name
        assert torch.equal(got.grad, expected.grad), name


# --- FSDP1 and FSDP2 on one rank (the 2-rank versions live in tests/distributed) --------------------


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("ac_first", [True, False], ids=["ac_first", "fsdp_first"])
@pytest.mark.parametrize("spec_name", ["class_set", "name", "module_wrap_policy", "custom_policy"])
def test_fsdp1_same_policy_gives_one_unit_and_one_region_per_block(
    single_rank_group: None, gpt: GPT, tokens: torch.Tensor, ac_first: bool, spec_name: str
) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    policy = ModulePolicy(SPECS[spec_name])
    model: nn.Module = copy.deepcopy(gpt)
    if ac_first:
        apply_activation_checkpointing(model, auto_wrap_policy=policy)
    model = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=CPU)
    if not ac_first:
        apply_activation_checkpointing(model, auto_wrap_policy=policy)
    expected = "FullyShardedDataParallel>CheckpointWrapper>TransformerBlock"
    assert [chain_of(layer) for layer in raw_layers(model)] == [expected] * 2
    assert sum(isinstance(m, FSDP) for m in model.modules()) == 3  # the root and one per block
    assert check_alignment(model, strict=True) == []
    plain = FSDP(copy.deepcopy(gpt), auto_wrap_policy=policy, use_orig_params=True, device_id=CPU)
    assert recomputed_in_backward(loss_of(plain, tokens)) == 0
    assert recomputed_in_backward(loss_of(model, tokens)) == len(BLOCK_NAMES) * RECOMPUTED_PER_BLOCK
    for expected_param, got in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(got.grad, expected_param.grad)


@pytest.mark.parametrize("ac_first", [True, False], ids=["ac_first", "fsdp_first"])
def test_fsdp2_helper_shards_the_policy_blocks(
    single_rank_group: None, gpt: GPT, tokens: torch.Tensor, ac_first: bool
) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    mesh = init_device_mesh("cpu", (1,))
    policy = ModulePolicy({"TransformerBlock"})
    model = copy.deepcopy(gpt)
    if ac_first:
        apply_activation_checkpointing(model, auto_wrap_policy=policy)
    assert fully_shard_by_policy(model, policy, mesh=mesh) is model
    fully_shard_by_policy(model, policy, mesh=mesh)  # twice changes nothing
    if not ac_first:
        apply_activation_checkpointing(model, auto_wrap_policy=policy)
    expected = (
        "FSDPCheckpointWrapper>TransformerBlock" if ac_first else "CheckpointWrapper>FSDPTransformerBlock"
    )
    assert [chain_of(layer) for layer in raw_layers(model)] == [expected] * 2
    assert sum(isinstance(m, FSDPModule) for m in model.modules()) == 3
    assert check_alignment(model, strict=True) == []
    loss_of(gpt, tokens).backward()
    assert recomputed_in_backward(loss_of(model, tokens)) == len(BLOCK_NAMES) * RECOMPUTED_PER_BLOCK
    for expected_param, got in zip(gpt.parameters(), model.parameters(), strict=True):
        assert torch.equal(got.grad.full_tensor(), expected_param.grad)


# --- alignment checks ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_region_spanning_units_warns_and_strict_raises(
    single_rank_group: None, gpt: GPT, use_orig_params: bool
) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    apply_activation_checkpointing(gpt, auto_wrap_policy={"ModuleList"})
    model = FSDP(
        gpt,
        auto_wrap_policy=ModulePolicy({TransformerBlock}),
        use_orig_params=use_orig_params,
        device_id=CPU,
    )
    message = "AC region 'layers' spans 2 FSDP units ('layers.0', 'layers.1')"
    with pytest.warns(UserWarning, match=re.escape(message)):
        problems = check_alignment(model)
    assert len(problems) == 1 and problems[0].startswith(message)
    assert "pass the same fsdp_ac.ModulePolicy to FSDP" in problems[0]
    with pytest.raises(ValueError, match="spans 2 FSDP units"):
        check_alignment(model, strict=True)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_unit_splitting_a_region_warns(single_rank_group: None, gpt: GPT, use_orig_params: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    apply_activation_checkpointing(gpt, auto_wrap_policy={TransformerBlock})
    model = FSDP(
        gpt,
        auto_wrap_policy=ModulePolicy({"MLP"}),
        use_orig_params=use_orig_params,
        device_id=CPU,
    )
    with pytest.warns(UserWarning) as record:
        problems = check_alignment(model)
    assert problems == [str(w.message) for w in record]
    assert [p.split(":")[0] for p in problems] == [
        "FSDP unit 'layers.0.mlp' splits AC region 'layers.0'",
        "FSDP unit 'layers.1.mlp' splits AC region 'layers.1'",
    ]
    assert "belong to 'layers.0.mlp' inside it and to the root unit around it" in problems[0]


def test_fsdp2_helper_warns_about_misaligned_regions(single_rank_group: None, gpt: GPT) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    apply_activation_checkpointing(gpt, auto_wrap_policy={TransformerBlock})
    with pytest.warns(UserWarning, match="splits AC region") as record:
        fully_shard_by_policy(gpt, {"Attention"}, mesh=init_device_mesh("cpu", (1,)))
    assert [str(w.message).split(":")[0] for w in record] == [
        "FSDP unit 'layers.0.attn' splits AC region 'layers.0'",
        "FSDP unit 'layers.1.attn' splits AC region 'layers.1'",
    ]
    assert {w.filename for w in record} == {__file__}  # the warnings point at the caller


def test_no_fsdp_units_nothing_to_check(gpt: GPT) -> None:
    apply_activation_checkpointing(gpt, auto_wrap_policy={"ModuleList"})
    assert check_alignment(gpt, strict=True) == []
    assert check_alignment(checkpoint_wrapper(nn.Linear(2, 2))) == []
    assert ModulePolicy({TransformerBlock}).names(GPT(SMALL_GPT)) == BLOCK_NAMES
