"""``fsdp_ac.accelerate.enable`` / ``disable`` and the ``fsdp_ac.run`` runner, in one process.

Routing replaces two methods of ``accelerate.Accelerator``; each test that turns it on turns it off
(the ``routing`` fixture) and checks that ``disable`` restored Accelerate's own functions. Every test
that trains counts what backward recomputes (the blocks' SiLU), so a routing that checkpointed nothing
fails. Multi-process runs (``Trainer``, TRL, ``accelerate launch -m fsdp_ac.run``) are in
``tests/distributed/test_trainers.py``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import tiny_llama
from models import recomputed_in_backward

from fsdp_ac import CheckpointWrapper

accelerate = pytest.importorskip("accelerate")
import fsdp_ac.accelerate as fsdp_ac_accelerate  # noqa: E402
import fsdp_ac.run  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("clean_environment")]
ACCELERATES_OWN = {name: accelerate.Accelerator.__dict__[name] for name in ("prepare", "prepare_model")}
SILU = torch.ops.aten.silu.default
BLOCKS = ["model.layers.0", "model.layers.1"]


@pytest.fixture
def routing() -> Iterator[None]:
    """Routing on for the test; afterwards off, with Accelerate's own methods back (checked)."""
    fsdp_ac_accelerate.enable()
    try:
        yield
    finally:
        fsdp_ac_accelerate.disable()
        assert {n: accelerate.Accelerator.__dict__[n] for n in ACCELERATES_OWN} == ACCELERATES_OWN


def checkpointed(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, CheckpointWrapper)]


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One training step's loss, gradients, and the SiLUs its backward recomputed."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks in every run
    loss = model(input_ids=tokens, labels=tokens).loss
    recomputed = recomputed_in_backward(loss, SILU)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, recomputed


def dropout_llama() -> torch.nn.Module:
    model = tiny_llama()
    model.config.attention_dropout = 0.2
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.2
    return model.train()


def test_enable_and_disable_swap_accelerates_methods_exactly() -> None:
    fsdp_ac_accelerate.disable()  # off already: nothing happens
    assert {n: accelerate.Accelerator.__dict__[n] for n in ACCELERATES_OWN} == ACCELERATES_OWN
    fsdp_ac_accelerate.enable()
    fsdp_ac_accelerate.enable()  # twice: still one layer of routing
    try:
        for name, own in ACCELERATES_OWN.items():
            routed = accelerate.Accelerator.__dict__[name]
            assert routed is not own and routed.__wrapped__ is own, name
    finally:
        fsdp_ac_accelerate.disable()
    assert {n: accelerate.Accelerator.__dict__[n] for n in ACCELERATES_OWN} == ACCELERATES_OWN


def test_disable_refuses_to_drop_a_later_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        fsdp_ac_accelerate.enable()
        patch.setattr(accelerate.Accelerator, "prepare_model", lambda self, model: model)
        with pytest.raises(RuntimeError, match="prepare_model was replaced after"):
            fsdp_ac_accelerate.disable()
    fsdp_ac_accelerate.disable()  # the other patch undone: routing comes off
    assert {n: accelerate.Accelerator.__dict__[n] for n in ACCELERATES_OWN} == ACCELERATES_OWN


def test_an_accelerate_with_other_internals_is_refused_naming_its_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import accelerate.accelerator

    monkeypatch.delattr(accelerate.accelerator, "fsdp2_apply_ac")
    monkeypatch.setattr(accelerate, "__version__", "9.0.0")
    checked = r"1\.15\.0 and 1\.16\.0\)\. Install accelerate==1\.16\.0"
    with pytest.raises(RuntimeError, match=r"cannot route Accelerate 9\.0\.0: its FSDP2 .* " + checked):
        fsdp_ac_accelerate.enable()
    assert {n: accelerate.Accelerator.__dict__[n] for n in ACCELERATES_OWN} == ACCELERATES_OWN


@pytest.mark.parametrize("call", ["prepare", "prepare_model", "fsdp_ac.accelerate.prepare"])
def test_routed_prepare_checkpoints_once_with_dropout_gradients_unchanged(
    real_accelerator: Any,
    routing: None,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
) -> None:
    """Every way to prepare, with routing on, checkpoints each block once (the settings: FSDP_AC_POLICY)."""
    loss, grads, recomputed = loss_and_grads(dropout_llama())
    assert recomputed == 0
    monkeypatch.setenv("FSDP_AC_POLICY", "all")
    model = dropout_llama()
    if call == "prepare":
        model = real_accelerator.prepare(model)
    elif call == "prepare_model":
        model = real_accelerator.prepare_model(model)
    else:  # a script that calls fsdp_ac's prepare itself while routing is on: still once
        model = fsdp_ac_accelerate.prepare(real_accelerator, model)
    assert checkpointed(model) == BLOCKS
    run_loss, run_grads, run_recomputed = loss_and_grads(model)
    assert run_recomputed == len(BLOCKS)
    assert torch.equal(run_loss, loss)
    assert run_grads.keys() == grads.keys()  # clean names
    for name, grad in grads.items():
        assert torch.equal(run_grads[name], grad), name


def test_evaluation_prepare_and_disabled_routing_leave_the_model_alone(
    real_accelerator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FSDP_AC_POLICY", "all")
    fsdp_ac_accelerate.enable()
    try:
        evaluated = real_accelerator.prepare_model(tiny_llama(), evaluation_mode=True)
        assert checkpointed(evaluated) == []
    finally:
        fsdp_ac_accelerate.disable()
    assert checkpointed(real_accelerator.prepare(tiny_llama())) == []


def test_runner_enables_routing_and_runs_the_script_as_main(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import accelerate
            import helper  # next to the script, as with python train.py
            RESULT = (__name__, sys.argv, hasattr(accelerate.Accelerator.prepare, "_fsdp_ac_route"))
            helper.results.append(RESULT)
            """
        )
    )
    (tmp_path / "helper.py").write_text("results = []\n")
    try:
        fsdp_ac.run.main([str(script), "--epochs", "1"])
        import helper  # type: ignore[import-not-found]

        assert helper.results == [("__main__", [str(script), "--epochs", "1"], True)]
    finally:
        fsdp_ac_accelerate.disable()
        import sys

        sys.path.remove(str(tmp_path))
        sys.modules.pop("helper", None)


def test_runner_without_a_script_says_how_to_call_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="needs the training script"):
        fsdp_ac.run.main([])
    with pytest.raises(SystemExit, match="no such training script"):
        fsdp_ac.run.main([str(tmp_path / "missing.py")])
    assert {n: accelerate.Accelerator.__dict__[n] for n in ACCELERATES_OWN} == ACCELERATES_OWN
