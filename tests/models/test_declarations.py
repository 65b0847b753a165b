"""Every family's config declares what the rest of archlab asks of it (archlab.models.base), and the
declarations agree with the model it builds (on the meta device: nothing allocated)."""

from __future__ import annotations

import pytest
import torch

from archlab.models import build_model
from archlab.models.base import INPUTS, ModelConfig
from archlab.models.registry import FAMILIES, PRESETS
from archlab.nn.attention import MultiHeadAttention


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_declarations_agree_with_the_model(family):
    name = next(n for n, p in PRESETS.items() if p.family == family)
    config = PRESETS[name].config
    assert isinstance(config, ModelConfig) and config.inputs in INPUTS
    assert (config.inputs == "tokens") == hasattr(config, "vocab_size"), name
    context = config.context_length
    assert context is None or (isinstance(context, int) and context > 0)
    with torch.device("meta"):
        model = build_model(config)
    attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    shape = config.attention_shape
    assert (shape is None) == (not attention), name
    if shape is not None:
        assert {(m.n_heads, m.n_kv_heads, m.d_model) for m in attention} == {(shape.n_heads, shape.n_kv_heads, shape.d_model)}
        self_attention = [m for m in attention if not any(m is getattr(b, "cross_attn", None) for b in model.modules())]
        assert len(self_attention) % shape.n_layers == 0, name  # the encoder-decoder has L of each stack
