"""Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` under ``accelerate launch``, checkpointed by fsdp_ac
without a change to the training script (``trainer_train.py``).

- ``accelerate launch --config_file trainer_fsdp2.yaml -m fsdp_ac.run trainer_train.py``: the zero-code
  runner with Accelerate's ``fsdp_activation_checkpointing`` flag. Without GPUs Accelerate runs the
  FSDP config as DDP, and the script runs again with Accelerate's FSDP2 path forced on the CPU.
- ``accelerate launch --config_file ddp.yaml trainer_train.py --enable``: the one line
  ``fsdp_ac.accelerate.enable()``, with ``fsdp_ac_policy: every:2`` from the config file.

On every rank, for both trainers, against the same run with ``FSDP_AC_POLICY=none`` (attention dropout
on): the logged losses and trained parameters, bitwise; the blocks checkpointed, and the SiLUs the run
executed (one per block per forward, one more per checkpointed block in backward: recomputation
happened); clean parameter names; the file ``trainer.save_model()`` wrote (its keys a plain model's,
loaded strictly into one, its values the trained ones); and a run resumed from the mid-run Trainer
checkpoint that ends with the same parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_train import build
from test_accelerate_launch import HERE, LAUNCH_TIMEOUT_S, launch, tolerance

pytest.importorskip("trl")
from trainer_train import SAVE_STEPS, STEPS

pytestmark = pytest.mark.distributed

LAYERS = ["model.layers.0", "model.layers.1"]
KINDS = ("trainer", "sft")


def max_diff(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert run.keys() == reference.keys()
    return max((run[name] - reference[name]).abs().max().item() for name in run)


def check_phase(results: list[dict[str, Any]], phase: str, regions: list[str]) -> None:
    """Every rank, both trainers: fsdp_ac's run against the run without checkpointing."""
    plain = build("llama")
    for rank, rank_results in enumerate(results):
        for kind in KINDS:
            runs, where = rank_results[phase][kind], (phase, kind, f"rank {rank}")
            reference, run = runs["none"], runs["configured"]
            assert len(run["losses"]) == STEPS, where
            torch.testing.assert_close(
                torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=0, atol=tolerance()
            )
            assert max_diff(run["params"], reference["params"]) <= tolerance(), where
            assert (reference["checkpoints"], run["checkpoints"]) == ([], regions), where
            forward = STEPS * len(LAYERS)
            assert (reference["silus"], run["silus"]) == (forward, forward + STEPS * len(regions)), where
            assert run["names"] == reference["names"], where
            assert not [n for n in run["names"] if "_checkpoint_wrapped_module" in n], where
            assert max_diff(run["params"], results[0][phase][kind]["configured"]["params"]) == 0, where
            if rank == 0:
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
def test_trainer_and_sft_trainer_through_the_runner_with_the_config_flag(tmp_path: Path) -> None:
    results = launch("trainer_fsdp2.yaml", tmp_path, ["-m", "fsdp_ac.run", str(HERE / "trainer_train.py")])
    for phase in results[0]:
        check_phase(results, phase, LAYERS)
    if "fsdp" in results[0]:  # Accelerate ran the FSDP config as DDP, then as FSDP2 on the CPU
        assert results[0]["as_configured"]["trainer"]["configured"]["distributed_type"].endswith("MULTI_CPU")
        assert results[0]["fsdp"]["sft"]["configured"]["distributed_type"].endswith("FSDP")


@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_trainer_and_sft_trainer_with_enable_in_the_script(tmp_path: Path) -> None:
    results = launch("ddp.yaml", tmp_path, [str(HERE / "trainer_train.py")], ["--enable"])
    assert list(results[0]) == ["as_configured"]
    check_phase(results, "as_configured", LAYERS[::2])  # fsdp_ac_policy: every:2
