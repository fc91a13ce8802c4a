"""PEFT/LoRA on a tiny ``LlamaForCausalLM`` (frozen base, attention and LoRA dropout), checkpointed by
fsdp_ac under FSDP2 and DDP on 2 ranks (one launch, every case).

Each decoder layer of the PEFT model is checkpointed by ``fsdp_ac.apply_activation_checkpointing``
with the non-reentrant and the reentrant implementation, without ``enable_input_require_grads``:
the embeddings are frozen, so no layer input needs a gradient, the case where torch's reentrant
checkpoint trains no adapter (PEFT's hook works around it). On every rank, against the same run
without checkpointing: losses and the adapters' full gradients of each step, bitwise; backward
recomputes each layer's SiLU once; the trainable parameters' names, the keys of
``get_peft_model_state_dict`` and of the file ``save_pretrained`` writes are PEFT's own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_train import build
from launcher import RankContext, run_on_ranks
from models import ForwardOpsInBackward
from test_accelerate_launch import tolerance

import fsdp_ac

pytest.importorskip("peft")
pytestmark = pytest.mark.distributed

STEPS = 2
LAYERS = 2
SILU = torch.ops.aten.silu.default
HIDDEN = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")


@dataclass(frozen=True)
class Case:
    parallel: str
    """``ddp`` or ``fsdp2`` (``fully_shard`` per decoder layer, then the root)."""
    ac: str | None
    """None (the reference), ``no_reentrant`` or ``reentrant``."""
    directory: str


def lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = build("llama")  # seeded; attention dropout 0.1
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: every adapter weight gets a gradient in step one
    )
    torch.manual_seed(1)
    return get_peft_model(model, config)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu().clone()


def peft_on_rank(ctx: RankContext, case: Case) -> dict[str, Any]:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = lora_llama().to(ctx.device)
    peft_model = model
    if case.parallel == "fsdp2":
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if case.ac is not None:
        impl = (
            fsdp_ac.CheckpointImpl.REENTRANT
            if case.ac == "reentrant"
            else fsdp_ac.CheckpointImpl.NO_REENTRANT
        )
        fsdp_ac.apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(fsdp_ac.checkpoint_wrapper, checkpoint_impl=impl),
            check_fn=lambda module: isinstance(module, LlamaDecoderLayer),
        )
    if case.parallel == "ddp":
        model = DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    result: dict[str, Any] = {"losses": [], "grads": [], "recomputed": []}
    for step in range(STEPS):
        torch.manual_seed(100 * step + ctx.rank)  # each rank its own batch and dropout masks
        tokens = torch.randint(0, 64, (2, 12), device=ctx.device)
        loss = model(input_ids=tokens, labels=tokens).loss
        with ForwardOpsInBackward(SILU) as recomputed:
            loss.backward()
        result["losses"].append(loss.detach().cpu())
        result["recomputed"].append(recomputed.count)
        result["grads"].append(
            {
                n: full(p.grad)
                for n, p in peft_model.named_parameters()
                if p.requires_grad and p.grad is not None
            }
        )
        optimizer.step()
        optimizer.zero_grad()
    result["trainable"] = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    result["adapter_keys"] = sorted(get_peft_model_state_dict(peft_model))
    state = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank == 0:
        directory = Path(case.directory)
        peft_model.save_pretrained(str(directory), state_dict=state)
        saved = load_file(directory / "adapter_model.safetensors")
        result["saved"] = {key: value.clone() for key, value in saved.items()}
    return result


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict[Case, list[dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("peft")
    cases = [
        Case(parallel, ac, str(directory / f"{parallel}-{ac}"))
        for parallel in ("ddp", "fsdp2")
        for ac in (None, "no_reentrant", "reentrant")
    ]
    return dict(zip(cases, run_on_ranks(peft_on_rank, cases, timeout_s=240), strict=True))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ac", ["no_reentrant", "reentrant"])
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_lora_adapters_train_as_without_checkpointing(
    launch: dict[Case, list[dict[str, Any]]], parallel: str, ac: str
) -> None:
    (reference_case,) = [c for c in launch if c.parallel == parallel and c.ac is None]
    (case,) = [c for c in launch if c.parallel == parallel and c.ac == ac]
    for rank, (run, reference) in enumerate(zip(launch[case], launch[reference_case], strict=True)):
        where = (parallel, ac, f"rank {rank}")
        lora = [n for n in reference["trainable"] if "lora_" in n]
        assert reference["trainable"] == lora and len(lora) == 2 * 3 * LAYERS, where  # base frozen
        assert run["trainable"] == reference["trainable"], where
        assert (run["recomputed"], reference["recomputed"]) == ([LAYERS] * STEPS, [0] * STEPS), where
        torch.testing.assert_close(
            torch.stack(run["losses"]), torch.stack(reference["losses"]), rtol=0, atol=tolerance()
        )
        for grads, expected in zip(run["grads"], reference["grads"], strict=True):
            assert grads.keys() == expected.keys() == set(lora), where  # every adapter got a gradient
            for name, grad in expected.items():
                assert grad.abs().sum() > 0, (where, name)
                torch.testing.assert_close(
                    grads[name], grad, rtol=0, atol=tolerance(), msg=str((where, name))
                )
        assert run["adapter_keys"] == reference["adapter_keys"], where
        assert not [k for k in run["adapter_keys"] if any(h in k for h in HIDDEN)], where
        if rank == 0:
            saved, expected_file = run["saved"], reference["saved"]
            assert sorted(saved) == sorted(expected_file) == run["adapter_keys"], where
            for key, value in expected_file.items():  # the trained adapters, as without checkpointing
                assert (saved[key] - value).abs().max() <= tolerance(), (where, key)
