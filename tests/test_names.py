"""Names through wrappers: parameters, buffers, modules, state dicts, load reports, optimizers."""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from models import ConvNet, TiedHead
from torch import nn
from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as torch_wrappers

import fsdp_ac.names
from fsdp_ac import (
    apply_activation_checkpointing,
    checkpoint_wrapper,
    clean_name,
    clean_state_dict,
    offload_wrapper,
)
from fsdp_ac.reference_model import GPT, TransformerBlock

PREFIX = "_checkpoint_wrapped_module"


def nested_wrapper(module: nn.Module) -> nn.Module:
    return offload_wrapper(checkpoint_wrapper(module))


WRAPPER_FNS = {
    "checkpoint": checkpoint_wrapper,
    "offload": offload_wrapper,
    "offload_around_checkpoint": nested_wrapper,
}


def wrapped_copy(model: nn.Module, wrapper_fn, types=(TransformerBlock,)) -> nn.Module:  # type: ignore[no-untyped-def]
    copy_ = copy.deepcopy(model)
    apply_activation_checkpointing(
        copy_, checkpoint_wrapper_fn=wrapper_fn, check_fn=lambda m: isinstance(m, types)
    )
    return copy_


def names(pairs) -> list[str]:  # type: ignore[no-untyped-def]
    return [name for name, _ in pairs]


def module_names(model: nn.Module) -> list[str]:
    """Module names in order of first appearance (a wrapper shares its name with what it wraps)."""
    return list(dict(model.named_modules()))


@pytest.mark.parametrize("wrapper_name", sorted(WRAPPER_FNS))
def test_names_from_root_match_unwrapped_model(gpt: GPT, wrapper_name: str) -> None:
    wrapped = wrapped_copy(gpt, WRAPPER_FNS[wrapper_name])
    assert isinstance(wrapped.layers[0], torch_wrappers.ActivationWrapper)
    assert names(wrapped.named_parameters()) == names(gpt.named_parameters())
    assert names(wrapped.named_parameters(remove_duplicate=False)) == names(
        gpt.named_parameters(remove_duplicate=False)
    )
    assert names(wrapped.named_buffers()) == names(gpt.named_buffers())
    assert module_names(wrapped) == module_names(gpt)
    assert list(wrapped.state_dict()) == list(gpt.state_dict())
    for name, param in gpt.named_parameters():
        assert torch.equal(wrapped.get_parameter(name), param)
    for name, module in gpt.named_modules():
        if name:
            assert type(wrapped.get_submodule(name)) in (type(module), type(wrapped.layers[0]))


@pytest.mark.parametrize("wrapper_name", sorted(WRAPPER_FNS))
def test_names_from_inner_modules_match_unwrapped_model(gpt: GPT, wrapper_name: str) -> None:
    wrapped = wrapped_copy(gpt, WRAPPER_FNS[wrapper_name])
    for inner_wrapped, inner_plain in ((wrapped.layers, gpt.layers), (wrapped.layers[1], gpt.layers[1])):
        assert names(inner_wrapped.named_parameters()) == names(inner_plain.named_parameters())
        assert module_names(inner_wrapped) == module_names(inner_plain)
        assert list(inner_wrapped.state_dict()) == list(inner_plain.state_dict())
    assert wrapped.layers[1].get_parameter("attn.qkv.weight") is wrapped.layers[1].attn.qkv.weight


def test_wrapper_and_wrapped_module_share_one_clean_name(gpt: GPT) -> None:
    wrapped = wrapped_copy(gpt, nested_wrapper)
    pairs = list(wrapped.named_modules())
    assert not any(PREFIX in name for name, _ in pairs)
    outer = wrapped.layers[0]
    inner = getattr(outer, PREFIX)
    block = getattr(inner, PREFIX)
    assert [m for name, m in pairs if name == "layers.0"] == [outer, inner, block]
    # The last module under a name is the unwrapped model's module there.
    assert dict(pairs)["layers.0"] is block
    assert sum(isinstance(m, TransformerBlock) for m in wrapped.modules()) == len(gpt.layers)
    assert len(list(wrapped.modules())) == len(list(gpt.modules())) + 2 * len(gpt.layers)


def test_buffers_and_direct_parameters_keep_clean_names() -> None:
    torch.manual_seed(0)
    plain = ConvNet()
    wrapped = copy.deepcopy(plain)
    wrapped.block = checkpoint_wrapper(wrapped.block)
    wrapped.head = checkpoint_wrapper(wrapped.head)
    assert names(wrapped.named_buffers()) == names(plain.named_buffers())
    assert names(wrapped.named_parameters()) == names(plain.named_parameters())
    assert "head.gain" in wrapped.state_dict()
    assert wrapped.get_buffer("block.1.running_mean") is wrapped.block[1].running_mean


def test_root_wrapper_names_are_clean(gpt: GPT) -> None:
    wrapped = checkpoint_wrapper(copy.deepcopy(gpt))
    assert names(wrapped.named_parameters()) == names(gpt.named_parameters())
    assert list(wrapped.state_dict()) == list(gpt.state_dict())
    result = wrapped.load_state_dict(gpt.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []


def legacy_keys(state_dict: dict, levels: int) -> dict:  # type: ignore[type-arg]
    """Spells block keys as an older tool wrote them: with the wrapper prefix, ``levels`` times."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            key = ".".join(["layers", index, *[PREFIX] * levels, rest])
        out[key] = value
    return out


@pytest.mark.parametrize("levels", [0, 1, 2])
def test_load_accepts_clean_and_legacy_keys_without_doubling(gpt: GPT, levels: int) -> None:
    source = copy.deepcopy(gpt)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1.0)
    target = wrapped_copy(gpt, nested_wrapper)
    result = target.load_state_dict(legacy_keys(source.state_dict(), levels), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (name, expected), (_, loaded) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, loaded), name


def test_load_reports_missing_and_unexpected_keys_in_clean_names(gpt: GPT) -> None:
    target = wrapped_copy(gpt, checkpoint_wrapper)
    state = legacy_keys(gpt.state_dict(), 1)
    del state[f"layers.0.{PREFIX}.ln_1.weight"]
    state[f"layers.1.{PREFIX}.bogus"] = torch.zeros(1)
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["layers.0.ln_1.weight"]
    assert result.unexpected_keys == ["layers.1.bogus"]
    with pytest.raises(RuntimeError) as error:
        target.load_state_dict(state)
    assert PREFIX not in str(error.value)
    assert '"layers.0.ln_1.weight"' in str(error.value)


def test_load_errors_name_tensors_in_clean_names(gpt: GPT) -> None:
    target = wrapped_copy(gpt, checkpoint_wrapper)
    state = gpt.state_dict()
    state["layers.0.ln_1.weight"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.0\.ln_1\.weight") as error:
        target.load_state_dict(state)
    assert PREFIX not in str(error.value)


def test_load_refuses_clean_and_legacy_spelling_of_one_key(gpt: GPT) -> None:
    target = wrapped_copy(gpt, checkpoint_wrapper)
    state = gpt.state_dict()
    state[f"layers.0.{PREFIX}.ln_1.weight"] = state["layers.0.ln_1.weight"].clone()
    with pytest.raises(ValueError, match="keep only one"):
        target.load_state_dict(state)


def torch_wrapped(model: nn.Module) -> nn.Module:
    copy_ = copy.deepcopy(model)
    torch_wrappers.apply_activation_checkpointing(copy_, check_fn=lambda m: isinstance(m, TransformerBlock))
    return copy_


MODEL_KINDS = {
    "plain": lambda m: copy.deepcopy(m),
    "torch_wrapped": torch_wrapped,
    "fsdp_ac_wrapped": lambda m: wrapped_copy(m, checkpoint_wrapper),
    "fsdp_ac_nested": lambda m: wrapped_copy(m, nested_wrapper),
}


@pytest.mark.parametrize("source_kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("target_kind", sorted(MODEL_KINDS))
def test_state_dict_round_trips_bitwise(gpt: GPT, source_kind: str, target_kind: str) -> None:
    torch.manual_seed(5)
    other = GPT(gpt.config)
    source = MODEL_KINDS[source_kind](other)
    target = MODEL_KINDS[target_kind](gpt)
    target.load_state_dict(source.state_dict(), strict=True)
    expected = other.state_dict()
    loaded = {clean_name(k): v for k, v in target.state_dict().items()}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    # And back again into the source kind.
    back = MODEL_KINDS[source_kind](gpt)
    back.load_state_dict(target.state_dict(), strict=True)
    for key, value in back.state_dict().items():
        assert torch.equal(value, expected[clean_name(key)]), key


def test_saved_metadata_uses_clean_names() -> None:
    plain = ConvNet()
    wrapped = copy.deepcopy(plain)
    wrapped.block = checkpoint_wrapper(wrapped.block)
    assert set(wrapped.state_dict()._metadata) == set(plain.state_dict()._metadata)  # type: ignore[attr-defined]


def test_saved_metadata_matches_unwrapped_model_for_nested_and_tensorless_modules() -> None:
    plain = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.BatchNorm1d(2))
    wrapped = copy.deepcopy(plain)
    wrapped[1] = checkpoint_wrapper(wrapped[1])  # no tensors: no key moves, its metadata still does
    wrapped[2] = nested_wrapper(wrapped[2])
    metadata = wrapped.state_dict()._metadata  # type: ignore[attr-defined]
    assert list(metadata) == list(plain.state_dict()._metadata)  # type: ignore[attr-defined]
    # BatchNorm's own version (2), not a wrapper's (1): it tells a load how to read the tensors.
    assert metadata["2"]["version"] == nn.BatchNorm1d._version == 2


def test_tied_weights_across_wrapper_stay_tied_and_load() -> None:
    torch.manual_seed(0)
    plain = TiedHead()
    wrapped = copy.deepcopy(plain)
    wrapped.out = checkpoint_wrapper(wrapped.out)
    wrapped.body = checkpoint_wrapper(wrapped.body)
    assert wrapped.out.weight is wrapped.embed.weight
    assert names(wrapped.named_parameters()) == names(plain.named_parameters())
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    torch.manual_seed(1)
    source = TiedHead()
    wrapped.load_state_dict(source.state_dict())
    assert wrapped.out.weight is wrapped.embed.weight
    assert torch.equal(wrapped.embed.weight, source.embed.weight)
    plain.load_state_dict(wrapped.state_dict())
    assert plain.out.weight is plain.embed.weight and torch.equal(plain.out.weight, source.out.weight)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        optimizer.step()


def test_optimizer_param_names_are_clean_and_state_loads_both_ways(gpt: GPT, tokens: torch.Tensor) -> None:
    wrapped = wrapped_copy(gpt, nested_wrapper)
    plain = copy.deepcopy(gpt)
    opt_wrapped = torch.optim.AdamW(wrapped.named_parameters(), lr=1e-2)
    opt_plain = torch.optim.AdamW(plain.named_parameters(), lr=1e-2)
    train_steps(wrapped, opt_wrapped, tokens, 2)
    train_steps(plain, opt_plain, tokens, 2)
    # state_dict() returns live tensors; a copy keeps the two optimizers independent.
    saved = copy.deepcopy(opt_wrapped.state_dict())
    param_names = saved["param_groups"][0]["param_names"]
    assert param_names == names(gpt.named_parameters())
    assert param_names == opt_plain.state_dict()["param_groups"][0]["param_names"]

    # Wrapped -> unwrapped: a fresh plain model takes the wrapped model's weights and optimizer state,
    # then trains on exactly as the wrapped model does.
    fresh = copy.deepcopy(gpt)
    fresh.load_state_dict(wrapped.state_dict())
    opt_fresh = torch.optim.AdamW(fresh.named_parameters(), lr=1e-2)
    opt_fresh.load_state_dict(saved)
    train_steps(fresh, opt_fresh, tokens, 1)
    train_steps(wrapped, opt_wrapped, tokens, 1)
    for (name, a), (_, b) in zip(fresh.named_parameters(), wrapped.named_parameters(), strict=True):
        assert torch.equal(a, b), name

    # Unwrapped -> wrapped.
    rewrapped = wrapped_copy(gpt, checkpoint_wrapper)
    rewrapped.load_state_dict(fresh.state_dict())
    opt_rewrapped = torch.optim.AdamW(rewrapped.named_parameters(), lr=1e-2)
    opt_rewrapped.load_state_dict(copy.deepcopy(opt_fresh.state_dict()))
    train_steps(rewrapped, opt_rewrapped, tokens, 1)
    train_steps(fresh, opt_fresh, tokens, 1)
    for (name, a), (_, b) in zip(fresh.named_parameters(), rewrapped.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_clean_name_removes_every_wrapper_segment() -> None:
    assert clean_name(f"a.{PREFIX}.{PREFIX}.b.weight") == "a.b.weight"
    assert clean_name(f"a.{PREFIX}") == "a"
    assert clean_name(PREFIX) == ""
    assert clean_name("a.b") == "a.b"


def test_clean_state_dict_loads_legacy_checkpoint_into_plain_model(gpt: GPT) -> None:
    legacy = legacy_keys(gpt.state_dict(), 2)
    plain = copy.deepcopy(gpt)
    plain.load_state_dict(clean_state_dict(legacy))
    with pytest.raises(ValueError, match="name the same tensor"):
        clean_state_dict({"a.w": torch.zeros(1), f"a.{PREFIX}.w": torch.zeros(1)})


def test_dcp_get_model_state_dict_has_clean_keys(gpt: GPT) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    wrapped = wrapped_copy(gpt, functools.partial(checkpoint_wrapper))
    assert list(get_model_state_dict(wrapped)) == list(get_model_state_dict(gpt))


class CountingDict(OrderedDict[str, Any]):
    """An ordered dict that counts the keys it yields, stores and removes: work measured without a clock."""

    def __init__(self) -> None:
        super().__init__()
        self.visits = 0

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self.visits += 1
            yield key

    def __reversed__(self) -> Iterator[str]:
        for key in super().__reversed__():
            self.visits += 1
            yield key

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(iter(self))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return [(key, self[key]) for key in self]

    def __setitem__(self, key: str, value: Any) -> None:
        self.visits += 1
        super().__setitem__(key, value)

    def pop(self, key: str, *default: Any) -> Any:
        self.visits += 1
        return super().pop(key, *default)


def stacked_blocks(blocks: int, wrapper_fn) -> nn.Module:  # type: ignore[no-untyped-def]
    """A model of ``blocks`` wrapped blocks of two Linear layers, between two unwrapped layers."""
    return nn.Sequential(
        nn.Linear(2, 2),
        nn.ModuleList(wrapper_fn(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) for _ in range(blocks)),
        nn.Linear(2, 2),
    )


def save_visits(model: nn.Module) -> tuple[int, int]:
    """Dict operations of one ``state_dict()`` call, and its number of keys."""
    destination = CountingDict()
    destination._metadata = CountingDict()  # type: ignore[attr-defined]
    model.state_dict(destination=destination)
    return destination.visits + destination._metadata.visits, len(destination)  # type: ignore[attr-defined]


@pytest.mark.parametrize("wrapper_name", sorted(WRAPPER_FNS))
def test_state_dict_work_grows_linearly_with_depth(wrapper_name: str) -> None:
    # Rewriting the whole dict in every wrapper's post-hook is quadratic: 16x the work for 4x the blocks.
    (small, small_keys), (large, large_keys) = (
        save_visits(stacked_blocks(blocks, WRAPPER_FNS[wrapper_name])) for blocks in (24, 96)
    )
    assert (small_keys, large_keys) == (24 * 4 + 4, 96 * 4 + 4)  # 4 tensors per block, 4 outside
    assert large / large_keys <= 1.05 * small / small_keys
    assert list(stacked_blocks(3, WRAPPER_FNS[wrapper_name]).state_dict()) == list(
        stacked_blocks(3, lambda m: m).state_dict()
    )


@pytest.mark.parametrize("wrapper_name", sorted(WRAPPER_FNS))
def test_load_report_work_grows_linearly_with_depth(
    wrapper_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    clean_name_ = fsdp_ac.names.clean_name

    def counting_clean_name(name: str) -> str:
        nonlocal calls
        calls += 1
        return clean_name_(name)

    monkeypatch.setattr(fsdp_ac.names, "clean_name", counting_clean_name)
    per_key = []
    for blocks in (24, 96):
        calls = 0
        model = stacked_blocks(blocks, WRAPPER_FNS[wrapper_name])
        # Every key missing: cleaning the whole report in every wrapper's post-hook is quadratic.
        result = model.load_state_dict({}, strict=False)
        assert result.missing_keys == list(stacked_blocks(blocks, lambda m: m).state_dict())
        per_key.append(calls / len(result.missing_keys))
    assert 0 < per_key[1] <= 1.05 * per_key[0]
