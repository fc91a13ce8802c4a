"""The training script that ``test_trainers.py`` runs with ``accelerate launch``: Hugging Face
``Trainer`` and TRL's ``SFTTrainer`` on a tiny ``LlamaForCausalLM`` with attention dropout.

    accelerate launch --config_file CONFIG [-m fsdp_ac.run] tests/distributed/trainer_train.py OUT [--enable]

The script is what a user writes: it never calls ``accelerator.prepare`` or fsdp_ac. Checkpointing
reaches it through ``-m fsdp_ac.run`` (zero code) or, with ``--enable``, the one line
``fsdp_ac.accelerate.enable()``. For each trainer it trains the same model on the same data twice:
with ``FSDP_AC_POLICY=none`` (the reference: neither fsdp_ac nor Accelerate checkpoints) and with the
settings as configured. Each run records its logged losses, how many SiLUs (one per block, a
forward-only operator) the whole run executed, the checkpoint wrappers and parameter names, the
trained parameters, and the keys of the model ``trainer.save_model()`` wrote. The configured run of
``Trainer`` is then resumed from its mid-run checkpoint, and records its parameters at the end.

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
from accelerate_train import build, clean, full_state, use_fsdp_on_cpu
from models import ForwardOpsInBackward
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from fsdp_ac.environment import accelerate_fsdp_requested, collective_timeout

STEPS = 4
SAVE_STEPS = 2
SILU = torch.ops.aten.silu.default


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
    import transformers

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
    if kind == "trainer":
        base, args = transformers.Trainer, transformers.TrainingArguments(**common)
        data: Any = dataset()
        extra: dict[str, Any] = {}
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

    return OnFsdp(model=build("llama"), args=args, train_dataset=data, **extra)


def train(kind: str, out: Path, on_fsdp_cpu: bool, *, resume: bool = False) -> dict[str, Any]:
    trainer = make_trainer(kind, out, on_fsdp_cpu)
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
    if not resume:
        trainer.save_model(str(out / "saved"))
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            from safetensors.torch import load_file

            record["saved"] = load_file(out / "saved" / "model.safetensors")
    trainer.accelerator.wait_for_everyone()
    return record


def run_all(out: Path, on_fsdp_cpu: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in ("trainer", "sft"):
        os.environ["FSDP_AC_POLICY"] = "none"
        reference = train(kind, out / kind / "none", on_fsdp_cpu)
        del os.environ["FSDP_AC_POLICY"]
        configured = train(kind, out / kind / "configured", on_fsdp_cpu)
        results[kind] = {"none": reference, "configured": configured}
        if kind == "trainer":
            results[kind]["resumed"] = train(kind, out / kind / "configured", on_fsdp_cpu, resume=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--enable", action="store_true", help="the one-line way: enable() in the script")
    options = parser.parse_args()
    if options.enable:
        import fsdp_ac.accelerate

        fsdp_ac.accelerate.enable()
    rank = int(os.environ.get("RANK", "0"))
    phases = {"as_configured": run_all(options.out / "as_configured", on_fsdp_cpu=False)}
    if accelerate_fsdp_requested() and not torch.cuda.is_available():
        phases["fsdp"] = run_all(options.out / "fsdp", on_fsdp_cpu=True)
    torch.save(phases, options.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
