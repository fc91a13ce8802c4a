"""Hugging Face ``Trainer``, TRL's ``SFTTrainer`` and ``Trainer`` on a PEFT LoRA model, checkpointed by
fsdp_ac without a change to the training script (``trainer_train.py``).

- ``accelerate launch --config_file trainer_fsdp2.yaml -m fsdp_ac.run trainer_train.py``: the zero-code
  runner with Accelerate's ``fsdp_activation_checkpointing`` flag, all three. Without GPUs Accelerate
  runs the FSDP config as DDP, and the script runs again with Accelerate's FSDP2 path forced on the CPU.
- ``accelerate launch --config_file ddp.yaml trainer_train.py --enable``: the one line
  ``fsdp_ac.accelerate.enable()``, with ``fsdp_ac_policy: every:2`` from the config file.
- ``torchrun -m fsdp_ac.run trainer_train.py --kinds trainer`` with ``FSDP_AC_POLICY=last:1``: the
  runner under a plain ``torchrun`` (no Accelerate config; ``Trainer``'s Accelerator runs DDP).

On every rank, for each trainer, against the same run with ``FSDP_AC_POLICY=none`` (attention dropout
on): the logged losses and trained parameters, bitwise; the blocks checkpointed, and the SiLUs the run
executed (one per block per forward, one more per checkpointed block in backward: recomputation
happened); clean parameter names; the file ``trainer.save_model()`` wrote (its keys a plain model's,
loaded strictly into one, its values the trained ones); and a run resumed from the mid-run Trainer
checkpoint that ends with the same parameters. For the PEFT model: each step's full adapter gradients,
bitwise; no layer input needed a gradient and no ``enable_input_require_grads`` hook was added; the
adapter file that ``save_model`` wrote has PEFT's own keys and the trained adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_train import build
from test_accelerate_launch import HERE, LAUNCH_TIMEOUT_S, launch, on_gpus, tolerance

pytest.importorskip("trl")
from trainer_train import SAVE_STEPS, STEPS

pytestmark = pytest.mark.distributed

LAYERS = ["model.layers.0", "model.layers.1"]
KINDS = ("trainer", "sft", "peft")
RUNNER = ["-m", "fsdp_ac.run", str(HERE / "trainer_train.py")]
PEFT_PREFIX = "base_model.model."
ADAPTERS = 2 * 3 * len(LAYERS)
"""LoRA A and B on q_proj, v_proj and down_proj of each layer."""


def max_diff(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert run.keys() == reference.keys()
    return max((run[name] - reference[name]).abs().max().item() for name in run)


def check_peft(run: dict[str, Any], reference: dict[str, Any], rank: int, where: tuple[str, ...]) -> None:
    """The adapters' gradients, the frozen input, and the adapter file ``save_model`` wrote."""
    assert len(run["grads"]) == len(reference["grads"]) == STEPS, where
    for grads, expected in zip(run["grads"], reference["grads"], strict=True):
        assert len(expected) == ADAPTERS and all("lora_" in name for name in expected), where
        assert all(grad.abs().sum() > 0 for grad in expected.values()), where
        assert max_diff(grads, expected) <= tolerance(), where
    for record in (run, reference):  # the case PEFT's enable_input_require_grads is for, without it
        assert record["input_needs_grad"] and not any(record["input_needs_grad"]), where
        # enable_input_require_grads's hook is make_inputs_require_grads; FSDP2 may add its own.
        assert not [h for h in record["embedding_hooks"] if "inputs_require_grads" in h], where
    if rank == 0:
        saved = run["saved"]
        assert sorted(saved) == sorted(reference["saved"]) and len(saved) == ADAPTERS, where
        for (
            key,
            value,
        ) in saved.items():  # PEFT's own keys, e.g. base_model.model.model.layers.0...lora_A.weight
            assert key.startswith(PEFT_PREFIX + "model.layers.") and key.endswith(
                ("lora_A.weight", "lora_B.weight")
            ), key
            assert not [h for h in (".default", "_checkpoint_wrapped_module", "_fsdp") if h in key], key
            trained = run["params"][key.replace(".weight", ".default.weight")]
            assert torch.equal(value, trained), (where, key)
            assert (value - reference["saved"][key]).abs().max() <= tolerance(), (where, key)


def check_phase(
    results: list[dict[str, Any]], phase: str, regions: list[str], kinds: tuple[str, ...] = KINDS
) -> None:
    """Every rank, each trainer: fsdp_ac's run against the run without checkpointing."""
    plain = build("llama")
    assert list(results[0][phase]) == list(kinds)
    for rank, rank_results in enumerate(results):
        for kind in kinds:
            runs, where = rank_results[phase][kind], (phase, kind, f"rank {rank}")
            reference, run = runs["none"], runs["configured"]
            assert len(run["losses"]) == STEPS, where
            torch.testing.assert_close(
                torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=0, atol=tolerance()
            )
            assert max_diff(run["params"], reference["params"]) <= tolerance(), where
            prefix = PEFT_PREFIX if kind == "peft" else ""
            assert (reference["checkpoints"], run["checkpoints"]) == ([], [prefix + r for r in regions]), (
                where
            )
            forward = STEPS * len(LAYERS)
            assert (reference["silus"], run["silus"]) == (forward, forward + STEPS * len(regions)), where
            assert run["names"] == reference["names"], where
            assert not [n for n in run["names"] if "_checkpoint_wrapped_module" in n], where
            assert max_diff(run["params"], results[0][phase][kind]["configured"]["params"]) == 0, where
            if kind == "peft":
                check_peft(run, reference, rank, where)
            elif rank == 0:
                saved = run["saved"]
                assert sorted(saved) == sorted(plain.state_dict()), where
                plain.load_state_dict(saved, strict=True)
                assert max_diff(saved, {k: run["params"][k] for k in saved}) == 0, where
            if kind == "trainer":
                resumed = runs["resumed"]
                assert max_diff(resumed["params"], run["params"]) <= tolerance(), where
                remaining = STEPS - SAVE_STEPS
                assert resumed["silus"] == remaining * (len(LAYERS) + len(regions)), where


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_trainer_sft_trainer_and_peft_through_the_runner_with_the_config_flag(tmp_path: Path) -> None:
    results = launch("trainer_fsdp2.yaml", tmp_path, RUNNER, ["--kinds", ",".join(KINDS)])
    for phase in results[0]:
        check_phase(results, phase, LAYERS)
    if "fsdp" in results[0]:  # Accelerate ran the FSDP config as DDP, then as FSDP2 on the CPU
        assert results[0]["as_configured"]["trainer"]["configured"]["distributed_type"].endswith("MULTI_CPU")
        assert results[0]["fsdp"]["sft"]["configured"]["distributed_type"].endswith("FSDP")


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_trainer_and_sft_trainer_with_enable_in_the_script(tmp_path: Path) -> None:
    results = launch("ddp.yaml", tmp_path, [str(HERE / "trainer_train.py")], ["--enable"])
    assert list(results[0]) == ["as_configured"]
    check_phase(results, "as_configured", LAYERS[::2], ("trainer", "sft"))  # fsdp_ac_policy: every:2


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_trainer_through_the_runner_under_torchrun(tmp_path: Path) -> None:
    """Nothing configured: the runner checkpoints every block and rank 0 says so, once per prepare
    (the run and its resumption), with default logging; the reference sets FSDP_AC_POLICY=none."""
    results = launch(None, tmp_path, RUNNER, ["--kinds", "trainer"])
    assert list(results[0]) == ["as_configured"]
    configured = results[0]["as_configured"]["trainer"]["configured"]
    assert configured["distributed_type"].endswith("MULTI_GPU" if on_gpus() else "MULTI_CPU")
    check_phase(results, "as_configured", LAYERS, ("trainer",))
    said = "fsdp_ac: 2/2 LlamaDecoderLayer checkpointed (full; policy all from the default of fsdp_ac.run)"
    log = (tmp_path / "launch.log").read_text()  # both ranks' output: rank 0 alone speaks
    # transformers 4.x leaves the model's use_cache on, and the same line says fsdp_ac set it off.
    cache = "; set LlamaForCausalLM.config.use_cache = False"
    lines = [line for line in log.splitlines() if line.startswith("fsdp_ac: ")]
    assert len(lines) == 2 and all(line in (said, said + cache) for line in lines), lines
