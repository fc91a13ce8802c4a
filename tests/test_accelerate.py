"""The Accelerate integration in one process: settings, plans, errors, and Accelerate's own defects.

The multi-process runs through ``accelerate launch`` are in ``tests/distributed/test_accelerate_launch.py``.
Every test that trains a checkpointed model counts what its backward recomputes (the blocks' GELU or
SiLU, forward-only operators; ``models.ForwardOpsInBackward``): equal gradients alone would also pass
with a wrapper that checkpointed nothing.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hf_models import tiny_llama
from models import SMALL_GPT, ForwardOpsInBackward, recomputed_in_backward
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from upstream import release, shows, shows_error

from fsdp_ac import ActivationPlan, clean_name, planner
from fsdp_ac.profiler import Profile, Workload, block_bytes, profile
from fsdp_ac.reference_model import GPT, GPTConfig
from fsdp_ac.strategies import Full, Offload, Selective

accelerate = pytest.importorskip("accelerate")
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

import fsdp_ac.accelerate as fsdp_ac_accelerate  # noqa: E402

DROPOUT_GPT = GPTConfig(**{**SMALL_GPT.__dict__, "n_layers": 4, "dropout": 0.2})
BLOCKS = ["layers.0", "layers.1", "layers.2", "layers.3"]
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("clean_environment")]


def gpt(config: GPTConfig = DROPOUT_GPT) -> GPT:
    torch.manual_seed(0)
    model = GPT(config)
    model._no_split_modules = ["TransformerBlock"]  # type: ignore[assignment]
    return model


def plugin(**kwargs: Any) -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(**{"fsdp_version": 2, "activation_checkpointing": True, **kwargs})


def fsdp_accelerator(fsdp_plugin: Any, prepared: list[bool] | None = None) -> Any:
    """An Accelerator running FSDP as far as fsdp_ac can tell; ``prepare`` returns its arguments."""

    def prepare(*args: Any, device_placement: Any = None) -> Any:
        if prepared is not None:
            prepared.append(fsdp_plugin.activation_checkpointing)
        return args[0] if len(args) == 1 else args

    return SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        state=SimpleNamespace(fsdp_plugin=fsdp_plugin),
        num_processes=1,
        is_main_process=True,
        prepare=prepare,
    )


def no_fsdp_accelerator() -> Any:
    return SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)


def gradients(model: nn.Module, seed: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """One step's gradients, and how many GELUs its backward reran: one per checkpointed block."""
    torch.manual_seed(seed)
    tokens = torch.randint(0, DROPOUT_GPT.vocab_size, (2, 12))
    logits = model(tokens)
    with ForwardOpsInBackward(torch.ops.aten.gelu.default) as gelus:
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}, gelus.count


def regions(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, CheckpointWrapper)]


# --- imports -------------------------------------------------------------------------------------


def test_fsdp_ac_and_the_integration_import_without_accelerate() -> None:
    code = "import sys; sys.modules['accelerate'] = None; import fsdp_ac, fsdp_ac.accelerate; print('ok')"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


# --- settings ------------------------------------------------------------------------------------


def test_environment_readers_parse_and_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    read = fsdp_ac_accelerate.environment_settings
    assert read() == {}
    for raw, parsed in [
        ("ALL", "all"),
        ("every:2", "every:2"),
        ("first: 3", "first:3"),
        ("budget:0.50", "budget:0.5"),
    ]:
        monkeypatch.setenv("FSDP_AC_POLICY", raw)
        assert read()["policy"] == parsed
    for bad in ("every:0", "every", "budget:1.5", "half"):
        monkeypatch.setenv("FSDP_AC_POLICY", bad)
        with pytest.raises(ValueError, match=r"FSDP_AC_POLICY must be one of all, none, every:N"):
            read()
    monkeypatch.delenv("FSDP_AC_POLICY")
    monkeypatch.setenv("FSDP_AC_STRATEGY", "selective:torchtitan")
    assert read()["strategy"] == Selective("torchtitan")
    monkeypatch.setenv("FSDP_AC_STRATEGY", "none")
    with pytest.raises(ValueError, match=r"FSDP_AC_STRATEGY must be one of full, selective"):
        read()
    monkeypatch.delenv("FSDP_AC_STRATEGY")
    monkeypatch.setenv("FSDP_AC_BLOCKS", " LlamaDecoderLayer, MLP ")
    assert read()["blocks"] == ("LlamaDecoderLayer", "MLP")
    monkeypatch.setenv("FSDP_AC_OFFLOAD", "Yes")
    monkeypatch.setenv("FSDP_AC_PIN_MEMORY", "0")
    monkeypatch.setenv("FSDP_AC_OFFLOAD_MIN_BYTES", "4096")
    assert (read()["offload"], read()["pin_memory"], read()["offload_min_bytes"]) == (True, False, 4096)
    monkeypatch.setenv("FSDP_AC_OFFLOAD_MIN_BYTES", "-1")
    with pytest.raises(ValueError, match=r"FSDP_AC_OFFLOAD_MIN_BYTES must be a non-negative integer"):
        read()
    monkeypatch.delenv("FSDP_AC_OFFLOAD_MIN_BYTES")
    monkeypatch.setenv("FSDP_AC_PLAN", "/nonexistent/plan.json")
    with pytest.raises(ValueError, match=r"FSDP_AC_PLAN names '/nonexistent/plan.json', which is not a file"):
        read()
    for name in ("PLAN", "OFFLOAD", "PIN_MEMORY"):
        monkeypatch.delenv(f"FSDP_AC_{name}")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"accelerate launch started 4 processes"):
        fsdp_ac_accelerate.prepare(no_fsdp_accelerator(), gpt())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_ac_accelerate.accelerate_fsdp_requested() is True


def test_accelerate_flags_become_settings() -> None:
    read = fsdp_ac_accelerate.read_settings
    assert read(no_fsdp_accelerator()).enabled is False
    settings = read(fsdp_accelerator(plugin(activation_checkpointing_offload=True)))
    assert (settings.enabled, settings.policy, str(settings.strategy), settings.offload) == (
        True,
        "all",
        "full+offload",
        True,
    )
    assert (settings.fsdp_version, settings.fsdp_active) == (2, True)
    assert read(fsdp_accelerator(plugin(activation_checkpointing=False))).enabled is False


def test_fsdp_ac_settings_turn_checkpointing_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    read = fsdp_ac_accelerate.read_settings
    monkeypatch.setenv("FSDP_AC_STRATEGY", "selective")
    settings = read(no_fsdp_accelerator())  # DDP: no Accelerate flag, fsdp_ac's setting turns it on
    assert (settings.enabled, settings.strategy) == (True, Selective())
    monkeypatch.setenv("FSDP_AC_POLICY", "none")
    off = read(fsdp_accelerator(plugin(activation_checkpointing_offload=True)))
    assert (off.enabled, off.offload) == (False, False)  # none wins over Accelerate's flags


def test_settings_that_do_not_fit_together_are_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    read = fsdp_ac_accelerate.read_settings
    monkeypatch.setenv("FSDP_AC_OFFLOAD", "true")
    with pytest.raises(
        ValueError, match=r"FSDP_AC_OFFLOAD asks to offload .* activation checkpointing is off"
    ):
        read(no_fsdp_accelerator())
    monkeypatch.setenv("FSDP_AC_STRATEGY", "selective")
    with pytest.raises(ValueError, match=r"combines with full checkpointing only, not with 'selective'"):
        read(no_fsdp_accelerator())
    monkeypatch.delenv("FSDP_AC_OFFLOAD")
    monkeypatch.setenv("FSDP_AC_POLICY", "budget:0.5")
    with pytest.raises(ValueError, match=r"budget:0.5 lets the memory planner choose.* so FSDP_AC_STRATEGY"):
        read(no_fsdp_accelerator())
    monkeypatch.delenv("FSDP_AC_STRATEGY")
    with pytest.raises(ValueError, match=r"so fsdp_activation_checkpointing_offload has nothing to set"):
        read(fsdp_accelerator(plugin(activation_checkpointing_offload=True)))
    monkeypatch.setenv("FSDP_AC_SAMPLE_SHAPE", "4x256")
    assert read(no_fsdp_accelerator()).sample_shape == (4, 256)
    monkeypatch.setenv("FSDP_AC_POLICY", "every:2")
    with pytest.raises(
        ValueError, match=r"FSDP_AC_SAMPLE_SHAPE gives the batch shape .* the policy is every:2"
    ):
        read(no_fsdp_accelerator())
    for bad in ("4,0", "four", ","):
        monkeypatch.setenv("FSDP_AC_SAMPLE_SHAPE", bad)
        with pytest.raises(ValueError, match=r"FSDP_AC_SAMPLE_SHAPE must be a shape of positive integers"):
            read(no_fsdp_accelerator())
    monkeypatch.delenv("FSDP_AC_SAMPLE_SHAPE")
    plan = tmp_path / "plan.json"
    ActivationPlan({"layers.0": "full"}).save(plan)
    monkeypatch.setenv("FSDP_AC_PLAN", str(plan))
    with pytest.raises(ValueError, match=r"FSDP_AC_PLAN gives an activation plan.* remove FSDP_AC_POLICY"):
        read(no_fsdp_accelerator())


def test_config_file_keys_with_the_environment_winning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ActivationPlan({"layers.1": "selective"}).save(tmp_path / "plan.json")
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "distributed_type: MULTI_GPU\n"
        "fsdp_config:\n"
        "  fsdp_ac_policy: every:2\n"
        "  fsdp_ac_blocks: [TransformerBlock]\n"
        "  fsdp_ac_offload: true\n"
        "  fsdp_ac_offload_min_bytes: 0\n"
        "  fsdp_ac_pin_memory: false\n"
    )
    monkeypatch.setenv("FSDP_AC_CONFIG_FILE", str(config))
    settings = fsdp_ac_accelerate.read_settings(no_fsdp_accelerator())
    assert (settings.enabled, settings.policy, settings.strategy, settings.blocks) == (
        True,
        "every:2",
        Offload(Full(), pin_memory=False, min_offload_bytes=0),
        ("TransformerBlock",),
    )
    assert (settings.offload_min_bytes, settings.pin_memory) == (0, False)
    monkeypatch.setenv("FSDP_AC_POLICY", "last:1")
    assert fsdp_ac_accelerate.read_settings(no_fsdp_accelerator()).policy == "last:1"
    # A plan path in the file is relative to the file; JSON config files work as well.
    json_config = tmp_path / "accelerate.json"
    json_config.write_text('{"fsdp_config": {"fsdp_ac_plan": "plan.json"}}')
    monkeypatch.delenv("FSDP_AC_POLICY")
    monkeypatch.setenv("FSDP_AC_CONFIG_FILE", str(json_config))
    model = gpt()
    assert fsdp_ac_accelerate.activation_plan(no_fsdp_accelerator(), model).strategies == {
        "layers.1": Selective()
    }


def test_config_file_mistakes_name_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "accelerate.yaml"
    monkeypatch.setenv("FSDP_AC_CONFIG_FILE", str(config))
    config.write_text("fsdp_config:\n  fsdp_ac_polcy: all\n")
    with pytest.raises(
        ValueError, match=r"unknown key fsdp_config.fsdp_ac_polcy; the fsdp_ac keys are fsdp_ac_policy"
    ):
        fsdp_ac_accelerate.read_settings(no_fsdp_accelerator())
    config.write_text("fsdp_ac_policy: all\n")
    with pytest.raises(
        ValueError, match=r"fsdp_ac_policy at the top level, .* move them into the fsdp_config"
    ):
        fsdp_ac_accelerate.read_settings(no_fsdp_accelerator())
    config.write_text("fsdp_config:\n  fsdp_ac_policy: every:0\n")
    with pytest.raises(ValueError, match=r"fsdp_config.fsdp_ac_policy in .*accelerate.yaml must be one of"):
        fsdp_ac_accelerate.read_settings(no_fsdp_accelerator())


# --- which blocks ----------------------------------------------------------------------------------


def test_blocks_come_from_accelerates_settings_as_accelerate_picks_them() -> None:
    plan = fsdp_ac_accelerate.activation_plan
    by_name = plugin(
        auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["TransformerBlock"]
    )
    assert plan(fsdp_accelerator(by_name), gpt()).strategies == dict.fromkeys(BLOCKS, Full())
    from_model = plugin(auto_wrap_policy="transformer_based_wrap")  # the model's _no_split_modules
    assert plan(fsdp_accelerator(from_model), gpt()).strategies == dict.fromkeys(BLOCKS, Full())
    by_size = plugin(fsdp_version=1, auto_wrap_policy="size_based_wrap", min_num_params=10_000)
    assert list(plan(fsdp_accelerator(by_size), gpt())) == BLOCKS  # FSDP's own size rule picks blocks


def test_policies_pick_a_subset_of_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator = fsdp_accelerator(plugin(auto_wrap_policy="transformer_based_wrap"))
    expected = {
        "every:2": ["layers.0", "layers.2"],
        "first:1": ["layers.0"],
        "last:2": ["layers.2", "layers.3"],
    }
    for policy, blocks in expected.items():
        monkeypatch.setenv("FSDP_AC_POLICY", policy)
        assert list(fsdp_ac_accelerate.activation_plan(accelerator, gpt())) == blocks, policy
    monkeypatch.setenv("FSDP_AC_POLICY", "every:2")
    monkeypatch.setenv("FSDP_AC_STRATEGY", "selective:matmul")
    plan = fsdp_ac_accelerate.activation_plan(accelerator, gpt())
    assert plan.strategies == dict.fromkeys(["layers.0", "layers.2"], Selective("matmul"))


def test_reads_leave_accelerates_plugin_as_it_is() -> None:
    fsdp_plugin = plugin(auto_wrap_policy="transformer_based_wrap", activation_checkpointing_offload=True)
    before = dict(vars(fsdp_plugin))
    accelerator = fsdp_accelerator(fsdp_plugin)
    assert fsdp_ac_accelerate.read_settings(accelerator).offload is True
    assert list(fsdp_ac_accelerate.activation_plan(accelerator, gpt())) == BLOCKS
    assert vars(fsdp_plugin) == before  # Accelerate's own resolution ran on a copy


def test_no_wrap_with_checkpointing_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for no_blocks in (plugin(auto_wrap_policy="no_wrap"), plugin(auto_wrap_policy="size_based_wrap")):
        with pytest.raises(ValueError, match=r"NO_WRAP .* Set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"):
            fsdp_ac_accelerate.activation_plan(fsdp_accelerator(no_blocks), gpt())
    monkeypatch.setenv("FSDP_AC_BLOCKS", "TransformerBlock")  # naming the blocks is a deliberate choice
    assert (
        list(fsdp_ac_accelerate.activation_plan(fsdp_accelerator(plugin(auto_wrap_policy="no_wrap")), gpt()))
        == BLOCKS
    )


def test_a_policy_that_matches_nothing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac

    anonymous = GPT(SMALL_GPT)  # no _no_split_modules
    accelerator = fsdp_accelerator(plugin(auto_wrap_policy="transformer_based_wrap"))
    theirs = fsdp2_apply_ac(accelerator, GPT(SMALL_GPT))
    shows("accelerate", "a policy matching nothing checkpoints nothing, silently", regions(theirs) == [])
    with pytest.raises(ValueError, match=r"TRANSFORMER_BASED_WRAP, but no block class is known.*GPT has no"):
        fsdp_ac_accelerate.activation_plan(accelerator, anonymous)
    monkeypatch.setenv("FSDP_AC_POLICY", "all")
    with pytest.raises(ValueError, match=r"nothing names the blocks of GPT.* Set FSDP_AC_BLOCKS"):
        fsdp_ac_accelerate.activation_plan(no_fsdp_accelerator(), anonymous)
    monkeypatch.setenv("FSDP_AC_BLOCKS", "LlamaDecoderLayer")
    with pytest.raises(ValueError, match=r"matched no submodule of GPT.*TransformerBlock"):
        fsdp_ac_accelerate.activation_plan(no_fsdp_accelerator(), anonymous)


def test_a_plan_file_is_checked_against_the_model_before_accelerate_prepares(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ActivationPlan({"layers.9": "full"}).save(tmp_path / "plan.json")
    monkeypatch.setenv("FSDP_AC_PLAN", str(tmp_path / "plan.json"))
    prepared: list[bool] = []
    with pytest.raises(
        ValueError, match=r"names 'layers.9', which is not a module of GPT. Close names: 'layers.3'"
    ):
        fsdp_ac_accelerate.prepare(fsdp_accelerator(plugin(), prepared), gpt())
    assert prepared == []


def test_engines_other_than_fsdp_and_ddp_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSDP_AC_POLICY", "all")
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=1)
    with pytest.raises(
        ValueError, match=r"checkpoints FSDP, DDP and one-process runs; this one is .*DEEPSPEED"
    ):
        fsdp_ac_accelerate.prepare(accelerator, gpt())


# --- Accelerate's own activation checkpointing, reproduced ------------------------------------------


def test_accelerates_fsdp2_checkpointing_crashes_with_no_wrap() -> None:
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac

    accelerator = fsdp_accelerator(plugin(auto_wrap_policy="no_wrap"))
    with shows_error(
        "accelerate", "fsdp2_apply_ac crashes with no_wrap", TypeError, "'NoneType' object is not"
    ):
        fsdp2_apply_ac(accelerator, gpt())
    with pytest.raises(ValueError, match=r"NO_WRAP.*Set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP"):
        fsdp_ac_accelerate.prepare(accelerator, gpt())  # fsdp_ac: an error naming the fix


def test_accelerates_fsdp2_checkpointing_changes_dropout_gradients_and_fsdp_acs_does_not() -> None:
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac

    expected, recomputed = gradients(gpt())
    assert recomputed == 0
    accelerator = fsdp_accelerator(plugin(auto_wrap_policy="transformer_based_wrap"))
    # Accelerate's wrappers use preserve_rng_state=False: the replay draws other dropout masks.
    their_grads, recomputed = gradients(fsdp2_apply_ac(accelerator, gpt()))
    shows("accelerate", "fsdp2_apply_ac checkpoints every block", recomputed == len(BLOCKS))
    theirs = {clean_name(n): g for n, g in their_grads.items()}
    differ = max((theirs[n] - g).abs().max().item() for n, g in expected.items()) > 1e-3
    shows("accelerate", "fsdp2_apply_ac's preserve_rng_state=False changes dropout gradients", differ)
    model = fsdp_ac_accelerate.prepare(accelerator, gpt())
    assert regions(model) == BLOCKS
    got, recomputed = gradients(model)
    assert recomputed == len(BLOCKS)
    assert got.keys() == expected.keys()
    assert all(torch.equal(g, expected[n]) for n, g in got.items())


# --- prepare ---------------------------------------------------------------------------------------


def test_prepare_switches_accelerates_checkpointing_off_during_the_call_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bool] = []
    fsdp_plugin = plugin(auto_wrap_policy="transformer_based_wrap", activation_checkpointing_offload=True)
    monkeypatch.setenv("FSDP_AC_OFFLOAD_MIN_BYTES", "0")
    monkeypatch.setenv("FSDP_AC_PIN_MEMORY", "false")
    model, optimizer = fsdp_ac_accelerate.prepare(fsdp_accelerator(fsdp_plugin, seen), gpt(), "optimizer")
    assert (seen, fsdp_plugin.activation_checkpointing, fsdp_plugin.activation_checkpointing_offload) == (
        [False],
        True,
        True,
    )
    assert optimizer == "optimizer"
    offloads = [m for m in model.modules() if isinstance(m, CheckpointWrapper) and m.offload is not None]
    assert len(offloads) == 4
    assert {(m.offload.pin_memory, m.offload.min_offload_bytes) for m in offloads} == {(False, 0)}
    assert gradients(model)[1] == len(BLOCKS)  # full+offload: offloaded and checkpointed


def test_prepare_in_one_process_checkpoints_and_keeps_gradients(
    real_accelerator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSDP_AC_POLICY", "all")
    expected = gradients(gpt())[0]
    model = fsdp_ac_accelerate.prepare(real_accelerator, gpt())
    assert regions(model) == BLOCKS
    got, recomputed = gradients(model)
    assert all(torch.equal(g, expected[n]) for n, g in got.items())
    assert recomputed == len(BLOCKS)


def test_prepare_checkpoints_an_fsdp_config_that_accelerate_ran_without_fsdp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from accelerate.state import AcceleratorState, GradientState

    for key, value in {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_ACTIVATION_CHECKPOINTING": "true",
    }.items():
        monkeypatch.setenv(key, value)  # what accelerate launch sets for an FSDP config
    try:
        accelerator = accelerate.Accelerator(cpu=True)
        assert accelerator.distributed_type == DistributedType.NO
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = fsdp_ac_accelerate.prepare(accelerator, gpt())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert regions(model) == BLOCKS
    assert gradients(model)[1] == len(BLOCKS)
    assert any("configured for FSDP but runs DistributedType.NO" in str(w.message) for w in caught)


def test_prepare_refuses_processes_that_would_train_apart(
    real_accelerator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started two, Accelerate runs each alone
    with pytest.raises(ValueError, match=r"started 2 processes.*Accelerator\(cpu=True\)"):
        fsdp_ac_accelerate.prepare(real_accelerator, gpt())


def test_hugging_face_models_train_without_their_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac
    from torch.utils.checkpoint import CheckpointError

    theirs = fsdp2_apply_ac(fsdp_accelerator(plugin(auto_wrap_policy="transformer_based_wrap")), tiny_llama())
    tokens = torch.randint(0, 64, (2, 12))
    if int(release("transformers").split(".")[0]) < 5:  # 5.x keeps no cache in training
        claim = "Accelerate's AC with the cache on: the replay appends to the cache, backward fails"
        with shows_error("transformers", claim, CheckpointError, "different metadata"):
            theirs(input_ids=tokens, labels=tokens).loss.backward()
    model = tiny_llama()
    assert model.config.use_cache is True
    monkeypatch.setenv("FSDP_AC_STRATEGY", "selective")
    accelerator = fsdp_accelerator(plugin(auto_wrap_policy="transformer_based_wrap"))
    model = fsdp_ac_accelerate.prepare(accelerator, model)
    assert model.config.use_cache is False  # else the replay appends to the cache a second time
    assert regions(model) == ["model.layers.0", "model.layers.1"]
    # Selective AC matches forward and replay: the loss and every gradient are those of the model
    # without AC, bitwise (the same kernels on the same inputs; the model has no dropout).
    plain = tiny_llama()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    recomputed = []
    for trained in (plain, model):
        loss = trained(input_ids=tokens, labels=tokens).loss
        recomputed.append(recomputed_in_backward(loss, torch.ops.aten.silu.default))
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert recomputed == [0, 2]  # selective saves matmuls: each layer's SiLU reruns
    expected = {name: param.grad for name, param in plain.named_parameters()}
    actual = {clean_name(name): param.grad for name, param in model.named_parameters()}
    assert actual.keys() == expected.keys()
    assert all(grad is not None for grad in expected.values())
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)


# --- budget:F: the memory planner --------------------------------------------------------------------


class RecordedProfiles:
    """``fsdp_ac.accelerate.profile`` that keeps each workload it measured and the profile it gave."""

    def __init__(self) -> None:
        self.runs: list[tuple[Workload, Profile]] = []

    def __call__(self, workload: Workload, **kwargs: Any) -> Profile:
        measured = profile(workload, **kwargs)
        self.runs.append((workload, measured))
        return measured


def token_loader(shuffle: bool = True) -> torch.utils.data.DataLoader[Any]:
    """Hugging Face style batches: 4 dicts of input ids and an attention mask, 4 sequences each."""
    tokens = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(3))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in tokens]
    return torch.utils.data.DataLoader(rows, batch_size=4, shuffle=shuffle)


def test_budget_plans_on_the_loaders_first_batch_and_holds_what_the_planner_predicts(
    real_accelerator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = RecordedProfiles()
    monkeypatch.setattr(fsdp_ac_accelerate, "profile", recorded)
    monkeypatch.setenv("FSDP_AC_POLICY", "budget:0.5")
    model, _ = fsdp_ac_accelerate.prepare(real_accelerator, tiny_llama(4), token_loader(shuffle=False))
    [(workload, measured)] = recorded.runs
    first = next(iter(token_loader(shuffle=False)))
    assert torch.equal(workload.batch, first["input_ids"])  # the loader's first batch, as is
    expected = planner.plan(measured, 0.5)
    applied = {clean_name(name) for name in regions(model)}
    checkpointed = {n for n, c in expected.choices.items() if c.strategy != "none"}
    assert applied == checkpointed and 0 < len(applied) < 4  # neither no AC nor all blocks
    # The model holds what the planner predicted, within the budget (the same batch and loss).
    held = block_bytes(workload, model)
    measured_bytes = held.outside + sum(held.held)
    assert measured_bytes <= expected.budget_bytes == int(0.5 * measured.no_ac_bytes)
    assert abs(measured_bytes - expected.predicted_bytes) <= 0.01 * expected.predicted_bytes
    plain = Workload(tiny_llama(4), workload.blocks, workload.batch, workload.loss)
    no_ac = block_bytes(plain)
    assert no_ac.outside + sum(no_ac.held) == measured.no_ac_bytes
    loss = workload.loss(model, workload.batch)
    assert recomputed_in_backward(loss, torch.ops.aten.silu.default) == len(applied)


def test_budget_with_a_sample_shape_plans_on_random_tokens_without_a_loader(
    real_accelerator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = RecordedProfiles()
    monkeypatch.setattr(fsdp_ac_accelerate, "profile", recorded)
    monkeypatch.setenv("FSDP_AC_POLICY", "budget:0.6")
    with pytest.raises(ValueError, match=r"was given no DataLoader.* Set FSDP_AC_SAMPLE_SHAPE"):
        fsdp_ac_accelerate.prepare(real_accelerator, gpt())
    monkeypatch.setenv("FSDP_AC_SAMPLE_SHAPE", "2,12")
    model = fsdp_ac_accelerate.prepare(real_accelerator, gpt())
    [(workload, measured)] = recorded.runs
    batch = workload.batch
    assert (batch.shape, batch.dtype) == ((2, 12), torch.int64)
    assert 0 <= int(batch.min()) and int(batch.max()) < DROPOUT_GPT.vocab_size  # token ids, not floats
    expected = planner.plan(measured, 0.6).to_activation_plan()
    checkpointed = [name for name, strategy in expected.strategies.items() if str(strategy) != "none"]
    assert regions(model) == checkpointed and checkpointed
    assert gradients(model)[1] == len(checkpointed)  # the GPT's loss is the sum of its logits: it ran


def test_an_impossible_budget_names_the_least_that_fits(
    real_accelerator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSDP_AC_POLICY", "budget:0.05")
    monkeypatch.setenv("FSDP_AC_SAMPLE_SHAPE", "2,12")
    with pytest.raises(
        planner.BudgetError, match=r"budget:0.05 is below .* to budget:(0\.\d+) or more"
    ) as caught:
        fsdp_ac_accelerate.activation_plan(real_accelerator, gpt())
    least = caught.value.args[0].rsplit("budget:", 1)[1].split(" ")[0]
    monkeypatch.setenv("FSDP_AC_POLICY", f"budget:{least}")
    plan = fsdp_ac_accelerate.activation_plan(real_accelerator, gpt())
    # The least budget (rounded up to 0.001) fits, with every block checkpointed.
    assert list(plan) == BLOCKS and "none" not in {str(strategy) for strategy in plan.strategies.values()}
    assert caught.value.smallest > 0


def test_budget_leaves_the_data_order_the_model_and_the_random_state_as_they_were(
    real_accelerator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(prepare: Any) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(7)
        model, loader = prepare(tiny_llama(4), token_loader(shuffle=True))
        order = [batch["input_ids"] for batch in loader]
        return (
            order,
            torch.get_rng_state(),
            {clean_name(n): p.detach().clone() for n, p in model.state_dict().items()},
        )

    order, rng, state = run(real_accelerator.prepare)
    monkeypatch.setenv("FSDP_AC_POLICY", "budget:0.5")
    planned_order, planned_rng, planned_state = run(
        functools.partial(fsdp_ac_accelerate.prepare, real_accelerator)
    )
    assert all(torch.equal(a, b) for a, b in zip(planned_order, order, strict=True))
    assert torch.equal(planned_rng, rng)
    assert planned_state.keys() == state.keys()
    assert all(torch.equal(planned_state[k], v) for k, v in state.items())
