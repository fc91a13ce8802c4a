"""The reference GPT: shapes, tied embeddings, causality and config validation."""

from __future__ import annotations

import pytest
import torch

from fsdp_ac.reference_model import GPT, GPTConfig


def test_logits_shape_and_tied_embeddings(gpt: GPT, tokens: torch.Tensor) -> None:
    assert gpt(tokens).shape == (*tokens.shape, gpt.config.vocab_size)
    assert gpt.lm_head.weight is gpt.tok_emb.weight


def test_attention_is_causal(gpt: GPT, tokens: torch.Tensor) -> None:
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % gpt.config.vocab_size
    assert torch.equal(gpt(tokens)[:, :-1], gpt(changed)[:, :-1])
    assert not torch.equal(gpt(tokens)[:, -1], gpt(changed)[:, -1])


def test_bad_sizes_are_refused(gpt: GPT) -> None:
    with pytest.raises(ValueError, match="must divide"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        gpt(torch.zeros(1, gpt.config.max_seq_len + 1, dtype=torch.long))


def test_initial_loss_is_near_uniform(gpt: GPT, tokens: torch.Tensor) -> None:
    loss = torch.nn.functional.cross_entropy(gpt(tokens).flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(float(gpt.config.vocab_size))).item()) < 0.5
