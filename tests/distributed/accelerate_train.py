"""The training script that ``test_accelerate_launch.py`` runs with ``accelerate launch``.

    accelerate launch --config_file CONFIG tests/distributed/accelerate_train.py OUT_DIR

For each model (the reference GPT with dropout, a tiny ``LlamaForCausalLM`` with attention dropout) it
trains two steps three ways from the same initialisation and data: Accelerate without activation
checkpointing (the reference), Accelerate's own checkpointing (what the config flag does today), and
``fsdp_ac.accelerate.prepare``. Every rank records its own numbers: its losses, the full gradients
of each step and the full parameters after training (which the reductions make the same on every
rank), which FSDP units and checkpoint wrappers each block got and the parameter names; for fsdp_ac
also the keys ``get_state_dict`` gives it, the parameters it holds after ``load_state`` read back
a checkpoint, and on the main process what ``save_state`` wrote. Each step also counts the blocks'
activation (GELU, or Llama's SiLU: forward-only operators) in backward, which only recomputation
runs: once per checkpointed block. Each rank writes
``OUT_DIR/rank<r>.pt``; the test checks every rank, and the ranks against each other.

Accelerate (1.15.0, 1.16.0) runs FSDP only on accelerators: without GPUs it runs an FSDP config as DDP
(``MULTI_CPU``) and drops activation checkpointing. The script first records that run as it is; then,
on CPU, it switches Accelerate's state to FSDP (see :func:`use_fsdp_on_cpu`) so that Accelerate's
FSDP1 and FSDP2 code paths run for real on gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from models import ForwardOpsInBackward
from suite_settings import collective_timeout
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, OffloadWrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, FullStateDictConfig
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

import fsdp_ac.accelerate
from fsdp_ac import ModulePolicy
from fsdp_ac.accelerate import accelerate_fsdp_requested
from fsdp_ac.reference_model import GPT, GPTConfig

MODELS = ("gpt", "llama")
VOCAB = 64
STEPS = 2
_HIDDEN_SEGMENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")
RECOMPUTED_OP = {"gpt": torch.ops.aten.gelu.default, "llama": torch.ops.aten.silu.default}
"""The forward-only operator each block of a model runs once; backward runs it only to recompute."""


def build(kind: str) -> nn.Module:
    """The model, initialised the same way in every run and on every rank."""
    torch.manual_seed(0)
    if kind == "gpt":
        config = GPTConfig(vocab_size=VOCAB, max_seq_len=16, d_model=32, n_heads=4, n_layers=2, dropout=0.1)
        model = GPT(config)
        model._no_split_modules = ["TransformerBlock"]  # how Hugging Face models name their blocks
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_dropout=0.1,
    )
    return LlamaForCausalLM(config)


def loss_of(model: nn.Module, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    if kind == "gpt":
        logits = model(tokens)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return model(input_ids=tokens, labels=tokens).loss


def clean(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _HIDDEN_SEGMENTS]
    return ".".join(parts)


def inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """FSDP units, checkpoint wrappers (selective ones too) and offload wrappers, by clean module name."""
    found: dict[str, Counter[str]] = {
        key: Counter() for key in ("units", "checkpoints", "selective", "offloads")
    }

    def visit(module: nn.Module, raw: str) -> None:
        name = clean(raw)
        if isinstance(module, (FSDPModule, FSDP1)):
            found["units"][name] += 1
        if isinstance(module, CheckpointWrapper):
            found["checkpoints"][name] += 1
            if "context_fn" in getattr(module.checkpoint_fn, "keywords", {}):
                found["selective"][name] += 1
        # full+offload is one checkpoint wrapper that offloads (fsdp_ac.strategies.Offload(Full())).
        if isinstance(module, OffloadWrapper) or (
            isinstance(module, CheckpointWrapper) and getattr(module, "offload", None) is not None
        ):
            found["offloads"][name] += 1
        for attr, child in module._modules.items():
            if child is not None:
                visit(child, f"{raw}.{attr}" if raw else attr)

    visit(inner(model), "")
    return {key: dict(counter) for key, counter in found.items()}


def applied(model: nn.Module) -> dict[str, str]:
    """What each checkpoint wrapper does, by clean module name: ``full``, or the selective choice (the
    calls whose outputs it saves), so that runs can be compared for the same plan."""
    found = {}
    for name, module in inner(model).named_modules():
        if isinstance(module, CheckpointWrapper):
            context_fn = getattr(module.checkpoint_fn, "keywords", {}).get("context_fn")
            block_kind = context_fn.args[0] if isinstance(context_fn, functools.partial) else None
            found[clean(name)] = repr(block_kind.owner) if block_kind is not None else "full"
    return found


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, FSDP1) and not model._use_orig_params:
        return flat_full_grads(model)
    summon = FSDP1.summon_full_params(model, with_grads=True) if isinstance(model, FSDP1) else None
    with summon or contextlib.nullcontext():
        grads = {}
        for name, param in inner(model).named_parameters():
            grad = param.grad
            if hasattr(grad, "full_tensor"):
                grad = grad.full_tensor()
            grads[clean(name)] = grad.detach().cpu().clone()
    return grads


def flat_full_grads(model: FSDP1) -> dict[str, torch.Tensor]:
    """Each parameter's whole gradient from FSDP1's flat-parameter shards (``summon_full_params``
    gives no gradients without ``use_orig_params``): gathered, then cut as the flat parameter records."""
    names = {module: clean(name) for name, module in model.named_modules()}
    grads = {}
    for unit in FSDP1.fsdp_modules(model):
        if unit._handle is None:
            continue
        flat = unit._handle.flat_param
        shards = [torch.empty_like(flat.grad) for _ in range(dist.get_world_size(unit.process_group))]
        dist.all_gather(shards, flat.grad.contiguous(), group=unit.process_group)
        whole = torch.cat(shards)
        views = iter(zip(flat._fqns, flat._shapes, strict=True))
        offset = 0
        for numel, padding in zip(flat._numels_with_padding, flat._is_padding_mask, strict=True):
            if not padding:
                fqn, shape = next(views)
                name = ".".join(part for part in (names[unit], clean(fqn)) if part)
                grads[name] = whole[offset : offset + numel].view(shape).detach().cpu().clone()
            offset += numel
    return dict(sorted(grads.items()))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on every rank (Accelerate's ``get_state_dict`` fills rank 0 only)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def fsdp_plugin(accelerator: Accelerator) -> FullyShardedDataParallelPlugin | None:
    return accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None


def train(accelerator: Accelerator, kind: str, mode: str) -> tuple[nn.Module, dict[str, Any]]:
    """Prepares a fresh model (``mode``: none, accelerate or fsdp_ac) and trains it for STEPS steps."""
    accelerator.free_memory()  # forget earlier runs' models: save_state saves every prepared model
    model = build(kind)
    if mode == "accelerate" and kind == "llama":
        # Accelerate's own AC leaves Hugging Face's cache on; with transformers 4.x the replay then
        # appends to it and backward fails (test_hugging_face_models_train_without_their_cache).
        model.config.use_cache = False
    plugin = fsdp_plugin(accelerator)
    if plugin is not None:
        # Accelerate's plugin resolves the block classes of the first model it prepares and keeps
        # them; a fresh launch per model would start from the config, as here.
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = transformer_auto_wrap_policy, None
    # FSDP1 without use_orig_params replaces the parameters by flat ones, which Accelerate does not
    # swap into an optimizer made before: the optimizer is made from the prepared model, as it asks.
    flat = plugin is not None and int(plugin.fsdp_version) == 1 and not plugin.use_orig_params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configured = plugin.activation_checkpointing if plugin is not None else False
        if plugin is not None and mode != "fsdp_ac":
            plugin.activation_checkpointing = mode == "accelerate"
        prepare = (
            functools.partial(fsdp_ac.accelerate.prepare, accelerator)
            if mode == "fsdp_ac"
            else accelerator.prepare
        )
        if flat:
            model = prepare(model)
            optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-2))
        else:
            model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        if plugin is not None:
            plugin.activation_checkpointing = configured
    record: dict[str, Any] = {
        "structure": structure(model),
        "applied": applied(model),
        "names": [name for name, _ in inner(model).named_parameters()],
        "warnings": [str(w.message) for w in caught if "fsdp_ac" in str(w.message)],
        "grads": [],
        "recomputed": [],
    }
    losses = []
    for step in range(STEPS):
        torch.manual_seed(1000 * step + accelerator.process_index)  # each rank its own batch
        tokens = torch.randint(0, VOCAB, (2, 12))
        loss = loss_of(model, kind, tokens)
        with ForwardOpsInBackward(RECOMPUTED_OP[kind]) as recomputed:
            accelerator.backward(loss)
        record["recomputed"].append(recomputed.count)
        losses.append(loss.detach().cpu())
        record["grads"].append(full_grads(model))
        optimizer.step()
        optimizer.zero_grad()
    record["losses"] = torch.stack(losses)
    record["params"] = full_state(model)
    return model, record


def checkpoints(accelerator: Accelerator, model: nn.Module, kind: str, directory: Path) -> dict[str, Any]:
    """State dicts through Accelerate, on every rank: the keys it gets, and what ``load_state`` restores.

    The main process reads the model file ``save_state`` wrote (a file, the same for every rank),
    loads it into a plain model, and writes the file back with every value changed; every rank then
    loads the checkpoint and records its full parameters, which must be those values.
    """
    state = accelerator.get_state_dict(model)
    record: dict[str, Any] = {"get_state_dict": list(state)}
    if state:
        build(kind).load_state_dict(state, strict=True)
    accelerator.save_state(directory)
    if accelerator.is_main_process:
        saved = read_model_file(directory)
        record["saved"] = list(saved)
        plain = build(kind)
        # strict=False: safetensors files keep one of two tied weights; the test checks what is missing.
        report = plain.load_state_dict(saved, strict=False)
        record["missing"], record["unexpected"] = list(report.missing_keys), list(report.unexpected_keys)
        perturbed = {k: v + 1 if v.is_floating_point() else v for k, v in saved.items()}
        write_model_file(directory, perturbed)
        record["written"] = perturbed
    accelerator.wait_for_everyone()
    accelerator.load_state(directory)
    record["loaded_keys"] = list(accelerator.get_state_dict(model))
    record["loaded"] = full_state(model)
    return record


def read_model_file(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "pytorch_model_fsdp_0").is_dir():  # FSDP SHARDED_STATE_DICT: a DCP checkpoint
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(directory / "pytorch_model_fsdp_0", directory / "dcp.pt")
        return torch.load(directory / "dcp.pt", weights_only=True)["model"]
    if (directory / "pytorch_model_fsdp.bin").exists():  # FSDP FULL_STATE_DICT
        return torch.load(directory / "pytorch_model_fsdp.bin", weights_only=True)
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def write_model_file(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """Writes ``state`` where and how :func:`read_model_file` found the model."""
    if (directory / "pytorch_model_fsdp_0").is_dir():
        from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

        shutil.rmtree(directory / "pytorch_model_fsdp_0")
        torch.save({"model": state}, directory / "dcp.pt")
        torch_save_to_dcp(directory / "dcp.pt", directory / "pytorch_model_fsdp_0")
    elif (directory / "pytorch_model_fsdp.bin").exists():
        torch.save(state, directory / "pytorch_model_fsdp.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in state.items()}, directory / "model.safetensors")


def use_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Switches Accelerate's state from the DDP it chose on CPU to the FSDP the config asked for.

    Accelerate (1.15.0, 1.16.0) takes its FSDP path only on accelerators. Its state lives in two shared dicts
    (AcceleratorState's and PartialState's); both get the FSDP type, and the device ``cpu``: on CPU
    Accelerate's device is ``cpu:0``, which FSDP1 rejects as its ``device_id`` (its compute device
    is ``cpu``).
    """
    state = accelerator.state
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerate builds it
    state.fsdp_plugin = plugin
    for shared in (state.__dict__, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
        shared["device"] = torch.device("cpu")
    if plugin.fsdp_version == 1:
        # torch's FSDP1 segfaults offloading a full state dict to the CPU it is on already, which
        # Accelerate's get_state_dict always asks for: keep the full state dict where it is.
        fsdp.FullStateDictConfig = full_state_dict_in_place  # what get_state_dict imports


def full_state_dict_in_place(offload_to_cpu: bool = False, rank0_only: bool = False) -> FullStateDictConfig:
    return FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only)


def run_models(
    accelerator: Accelerator, directory: Path | None, kinds: tuple[str, ...] = MODELS
) -> dict[str, Any]:
    results: dict[str, Any] = {"distributed_type": str(accelerator.distributed_type)}
    plugin = fsdp_plugin(accelerator)
    for kind in kinds:
        plain = build(kind)
        per_kind: dict[str, Any] = {"blocks": ModulePolicy(set(plain._no_split_modules)).names(plain)}
        per_kind["none"] = train(accelerator, kind, "none")[1]
        if plugin is not None or accelerate_fsdp_requested():
            per_kind["accelerate"] = train(accelerator, kind, "accelerate")[1]
        model, per_kind["fsdp_ac"] = train(accelerator, kind, "fsdp_ac")
        if directory is not None:
            per_kind["checkpoints"] = checkpoints(accelerator, model, kind, directory / kind)
        results[kind] = per_kind
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    # A hung or desynchronised rank fails within FSDP_AC_TIMEOUT_S instead of Accelerate's 30 minutes.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())])
    phases = {}
    on_cpu_fallback = accelerate_fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP
    if on_cpu_fallback:  # the GPT is enough to show what happens to checkpointing there
        phases["as_configured"] = run_models(accelerator, None, kinds=("gpt",))
    else:
        phases["as_configured"] = run_models(accelerator, out / "ckpt")
    if on_cpu_fallback:
        use_fsdp_on_cpu(accelerator)
        phases["fsdp"] = run_models(accelerator, out / "ckpt")
    torch.save(phases, out / f"rank{accelerator.process_index}.pt")
    accelerator.end_training()


if __name__ == "__main__":
    main()
