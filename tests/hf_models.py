"""Tiny Hugging Face models built from a config (no download), for tests that need a real one."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_llama(num_hidden_layers: int = 2) -> nn.Module:
    """A seeded ``LlamaForCausalLM`` (vocabulary 64, width 32, grouped-query attention); skips without
    ``transformers``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)
