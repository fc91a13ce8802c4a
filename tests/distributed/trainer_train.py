"""The training script that ``test_trainers.py`` runs with ``accelerate launch`` or ``torchrun``:
Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` on a tiny ``LlamaForCausalLM`` with attention
dropout, and ``Trainer`` on a PEFT LoRA model of it (frozen base).

    accelerate launch --config_file CONFIG [-m fsdp_ac.run] tests/distributed/trainer_train.py OUT [--enable]
    torchrun --nproc_per_node 2 -m fsdp_ac.run tests/distributed/trainer_train.py OUT --kinds trainer

The script is what a user writes: it never calls ``accelerator.prepare`` or fsdp_ac, nor PEFT's
``enable_input_require_grads``. Checkpointing reaches it through ``-m fsdp_ac.run`` (zero code) or,
with ``--enable``, the one line ``fsdp_ac.accelerate.enable()``. For each trainer (``--kinds``:
``trainer``, ``sft``, ``peft``) it trains the same model on the same data twice: with
``FSDP_AC_POLICY=none`` (the reference: neither fsdp_ac nor Accelerate checkpoints) and with the
settings as configured. Each run records its logged losses, how many SiLUs (one per block, a
forward-only operator) the whole run executed, the checkpoint wrappers and parameter names, the
trained parameters, and the file ``trainer.save_model()`` wrote (a PEFT model's: its adapters); the
PEFT runs also record each step's full gradients of the adapters and whether the first layer's input
needed a gradient. The configured run of ``Trainer`` is then resumed from its mid-run checkpoint, and
records its parameters at the end.

On CPU Accelerate runs an FSDP config as DDP; the script then runs everything again with
Accelerate's state switched to FSDP (``accelerate_train.use_fsdp_on_cpu``), as the Accelerate tests do.
Each rank writes ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate_train import build, clean, full_state, use_fsdp_on_cpu
from models import ForwardOpsInBackward
from suite_settings import collective_timeout
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from fsdp_ac.accelerate import accelerate_fsdp_requested

STEPS = 4
SAVE_STEPS = 2
SILU = torch.ops.aten.silu.default
KINDS = ("trainer", "sft", "peft")


def dataset(rows: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (rows, 12), generator=generator)
    mask = torch.ones(12, dtype=torch.long)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": mask} for row in tokens]


def tokenizer() -> Any:
    """A 64-token word-level tokenizer made here (SFTTrainer needs one; no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        pad_token="t0",
        eos_token="t1",
    )


def make_trainer(kind: str, out: Path, on_fsdp_cpu: bool) -> Any:
    """``Trainer`` or ``SFTTrainer`` as a user sets it up; on CPU optionally forced onto FSDP."""
    common = {
        "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": SAVE_STEPS,
        "save_strategy": "steps",
        "report_to": [],
        "seed": 0,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # A hung rank fails within FSDP_AC_TIMEOUT_S instead of the default 30 minutes.
        "ddp_timeout": int(collective_timeout().total_seconds()),
    }
    model = build("llama")
    if kind in ("trainer", "peft"):
        base, args = transformers.Trainer, transformers.TrainingArguments(**common)
        data: Any = dataset()
        extra: dict[str, Any] = {}
        if kind == "peft":
            model = lora(model)
    else:
        import datasets
        from trl import SFTConfig, SFTTrainer

        base = SFTTrainer
        # SFTConfig turns Hugging Face's own checkpointing on by default; fsdp_ac refuses to checkpoint
        # the layers a second time, so a user turns it off (docs/integrations.md).
        args = SFTConfig(**common, max_length=12, packing=False, gradient_checkpointing=False)
        data = datasets.Dataset.from_list([{"input_ids": row["input_ids"].tolist()} for row in dataset()])
        extra = {"processing_class": tokenizer()}

    class OnFsdp(base):  # type: ignore[misc, valid-type]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if on_fsdp_cpu:
                use_fsdp_on_cpu(self.accelerator)
                self.is_fsdp_enabled = True

    return OnFsdp(model=model, args=args, train_dataset=data, **extra)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT LoRA model a user makes: the base frozen, adapters on attention and MLP, LoRA dropout."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: every adapter gets a gradient from step one
    )
    torch.manual_seed(1)
    return get_peft_model(model, config)


class AdapterGradients(transformers.TrainerCallback):  # type: ignore[misc]
    """A ``TrainerCallback`` that keeps each step's full gradients of the trainable parameters (the
    adapters), by clean name, before the optimizer step; and whether the input of the first decoder
    layer needed a gradient in a training forward (no: the base, embeddings included, is frozen)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.input_needs_grad: list[bool] = []
        first = model.base_model.model.model.layers[0]
        first.register_forward_pre_hook(self._record_input, with_kwargs=True)

    def _record_input(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if torch.is_grad_enabled():
            self.input_needs_grad.append(hidden.requires_grad)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.steps.append(
            {
                clean(name).removeprefix("module."): full(parameter.grad)
                for name, parameter in model.named_parameters()
                if parameter.requires_grad
            }
        )


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A gradient on CPU, gathered from its shards under FSDP2 (every rank takes part)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu().clone()


def train(kind: str, out: Path, on_fsdp_cpu: bool, *, resume: bool = False) -> dict[str, Any]:
    trainer = make_trainer(kind, out, on_fsdp_cpu)
    gradients = None
    if kind == "peft":
        gradients = AdapterGradients(trainer.model)
        trainer.add_callback(gradients)
    with ForwardOpsInBackward(SILU) as silus:
        trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE_STEPS}") if resume else None)
    model = trainer.model_wrapped
    record: dict[str, Any] = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "silus": silus.count,
        "checkpoints": [
            clean(name).removeprefix("module.")
            for name, module in model.named_modules()
            if isinstance(module, CheckpointWrapper)
        ],
        "names": [name.removeprefix("module.") for name, _ in model.named_parameters()],  # DDP's prefix
        "params": full_state(model),
        "distributed_type": str(trainer.accelerator.distributed_type),
    }
    if gradients is not None:
        record["grads"], record["input_needs_grad"] = gradients.steps, gradients.input_needs_grad
        hooks = trainer.model.get_input_embeddings()._forward_hooks.values()
        record["embedding_hooks"] = [getattr(hook, "__qualname__", repr(hook)) for hook in hooks]
    if not resume:
        trainer.save_model(str(out / "saved"))
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            from safetensors.torch import load_file

            written = "adapter_model" if kind == "peft" else "model"
            record["saved"] = load_file(out / "saved" / f"{written}.safetensors")
    trainer.accelerator.wait_for_everyone()
    return record


def run_all(out: Path, on_fsdp_cpu: bool, kinds: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in kinds:
        configured_policy = os.environ.get("FSDP_AC_POLICY")
        os.environ["FSDP_AC_POLICY"] = "none"
        reference = train(kind, out / kind / "none", on_fsdp_cpu)
        del os.environ["FSDP_AC_POLICY"]
        if configured_policy is not None:  # set by the launch: the configured run's setting
            os.environ["FSDP_AC_POLICY"] = configured_policy
        configured = train(kind, out / kind / "configured", on_fsdp_cpu)
        results[kind] = {"none": reference, "configured": configured}
        if kind == "trainer":
            results[kind]["resumed"] = train(kind, out / kind / "configured", on_fsdp_cpu, resume=True)
    return results


def restore_indexed_cpu_storages() -> None:
    """Lets ``torch.load`` take ``map_location="cpu:0"``, as ``Trainer`` before transformers 5.18.0 asks.

    Its resume loads the optimizer with ``map_location=args.device``, which on a multi-process CPU run
    is ``cpu:0``, a location torch (2.13) cannot restore; 5.18.0 passes ``cpu``. A test-side stand-in
    for that fix, so that the resume is checked on setup.cfg's lower bound too.
    """

    def on_cpu(storage: Any, location: str) -> Any:
        return storage if location.startswith("cpu:") else None

    torch.serialization.register_package(30, lambda storage: None, on_cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--enable", action="store_true", help="the one-line way: enable() in the script")
    parser.add_argument("--kinds", default="trainer,sft", help=f"which of {KINDS}, comma-separated")
    options = parser.parse_args()
    kinds = options.kinds.split(",")
    if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 18):
        restore_indexed_cpu_storages()
    if options.enable:
        import fsdp_ac.accelerate

        fsdp_ac.accelerate.enable()
    rank = int(os.environ.get("RANK", "0"))
    phases = {"as_configured": run_all(options.out / "as_configured", False, kinds)}
    if accelerate_fsdp_requested() and not torch.cuda.is_available():
        phases["fsdp"] = run_all(options.out / "fsdp", True, kinds)
    torch.save(phases, options.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
