"""A real ``lightning.Trainer`` on 2 ranks training a tiny ``LlamaForCausalLM`` (attention dropout)
checkpointed by fsdp_ac, against the same run without checkpointing (one launch, every case).

The strategies, with fsdp_ac applied in ``LightningModule.configure_model``:

- ``DDPStrategy``, on CPU (gloo) and GPUs;
- ``FSDPStrategy`` (FSDP1) with fsdp_ac's ``ModulePolicy`` as its ``auto_wrap_policy``: fsdp_ac wraps
  the blocks before Lightning shards, so each becomes ``FSDP(CheckpointWrapper(block))``, and
  Lightning skips its own checkpointing since the model has checkpointed layers. GPUs only: Lightning
  refuses ``FSDPStrategy`` with ``accelerator='cpu'`` ("requires a GPU accelerator"), and hands FSDP1
  no ``device_id`` on the CPU, where FSDP1 then refuses to run.

On every rank: losses and trained parameters equal the run without checkpointing bitwise; backward
recomputes each block's SiLU once per step; the parameter names and the keys of the checkpoint
``trainer.save_checkpoint`` writes are those of the run without checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_train import build
from launcher import RankContext, run_on_ranks
from models import ForwardOpsInBackward
from suite_settings import collective_timeout
from test_accelerate_launch import on_gpus, tolerance

import fsdp_ac

pytest.importorskip("lightning")
pytestmark = pytest.mark.distributed

STEPS = 2
LAYERS = 2
SILU = torch.ops.aten.silu.default
BLOCK = "LlamaDecoderLayer"


@dataclass(frozen=True)
class Case:
    strategy: str
    """``ddp`` or ``fsdp``."""
    ac: bool
    directory: str


def lightning_on_rank(ctx: RankContext, case: Case) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    class Llama(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: torch.nn.Module | None = None
            self.losses: list[torch.Tensor] = []
            self.recomputed: list[int] = []

        def configure_model(self) -> None:
            if self.model is not None:
                return
            self.model = build("llama")
            if case.ac:  # the one line: fsdp_ac's wrappers on the blocks fsdp_ac's policy selects
                fsdp_ac.apply_activation_checkpointing(
                    self.model, auto_wrap_policy=fsdp_ac.ModulePolicy(BLOCK)
                )

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            (tokens,) = batch
            loss = self.model(input_ids=tokens, labels=tokens).loss
            self.losses.append(loss.detach().cpu())
            return loss

        def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            with ForwardOpsInBackward(SILU) as recomputed:
                super().backward(loss, *args, **kwargs)
            self.recomputed.append(recomputed.count)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    if case.strategy == "ddp":
        strategy: Any = DDPStrategy(timeout=collective_timeout())
    else:
        strategy = FSDPStrategy(
            auto_wrap_policy=fsdp_ac.ModulePolicy(BLOCK),  # fsdp_ac's policy where Lightning takes one
            use_orig_params=True,
            timeout=collective_timeout(),
        )
    L.seed_everything(0, verbose=False)
    tokens = torch.randint(0, 64, (4 * ctx.world_size, 12), generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=2)
    trainer = L.Trainer(
        accelerator="cuda" if ctx.device.type == "cuda" else "cpu",
        devices=ctx.world_size,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Llama()
    trainer.fit(module, loader)
    checkpoint = Path(case.directory) / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    model = module.model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {
        "losses": torch.stack(module.losses),
        "recomputed": module.recomputed,
        "names": [name for name, _ in model.named_parameters()],
        "checkpointed": [n for n, m in model.named_modules() if isinstance(m, fsdp_ac.CheckpointWrapper)],
        "params": {key: value.clone() for key, value in state.items()},
    }
    trainer.strategy.barrier()
    if ctx.rank == 0:
        saved = torch.load(checkpoint, weights_only=False, map_location="cpu")["state_dict"]
        result["saved_keys"] = sorted(saved) if isinstance(saved, dict) else None
    return result


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict[Case, list[dict[str, Any]]]:
    directory = tmp_path_factory.mktemp("lightning")
    cases = [
        Case(strategy, ac, str(directory / f"{strategy}-{ac}"))
        for strategy in (("ddp", "fsdp") if on_gpus() else ("ddp",))
        for ac in (False, True)
    ]
    return dict(zip(cases, run_on_ranks(lightning_on_rank, cases, timeout_s=240), strict=True))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.gpu)])
def test_lightning_trains_as_without_checkpointing(
    launch: dict[Case, list[dict[str, Any]]], strategy: str
) -> None:
    if not on_gpus() and strategy == "fsdp":
        pytest.skip("Lightning runs FSDPStrategy only on GPUs")
    (reference_case,) = [c for c in launch if c.strategy == strategy and not c.ac]
    (case,) = [c for c in launch if c.strategy == strategy and c.ac]
    for rank, (run, reference) in enumerate(zip(launch[case], launch[reference_case], strict=True)):
        where = (strategy, f"rank {rank}")
        assert (run["recomputed"], reference["recomputed"]) == ([LAYERS] * STEPS, [0] * STEPS), where
        assert run["checkpointed"] == ["model.layers.0", "model.layers.1"], where
        torch.testing.assert_close(run["losses"], reference["losses"], rtol=0, atol=tolerance())
        assert run["params"].keys() == reference["params"].keys(), where
        for key, value in reference["params"].items():
            assert (run["params"][key] - value).abs().max() <= tolerance(), (where, key)
        assert run["names"] == reference["names"], where
        assert not [n for n in run["names"] if "_checkpoint_wrapped_module" in n], where
        if rank == 0:
            assert run["saved_keys"] == reference["saved_keys"], where
            assert run["saved_keys"] and not [k for k in run["saved_keys"] if "_checkpoint" in k], where
