"""Analysis figures with grouped-query attention: the head counts come from the config, so the KV cache, the
projection FLOPs follow ``G = n_kv_heads``, against hand formulas and the model (the activation estimate: test_memory.py)."""

from __future__ import annotations

import pytest
import torch

from archlab.analysis.flops import count_flops
from archlab.analysis.memory import kv_cache_bytes
from archlab.models import build_model, get_config


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_bytes_equal_the_hand_formula_and_what_the_cache_holds(n_kv_heads):
    config = get_config("llama-tiny", n_kv_heads=n_kv_heads)  # L = 2, A = 4, d_k = 16
    model = build_model(config)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 20)), cache=cache)
    held = sum(b.self_attn.keys.nbytes + b.self_attn.values.nbytes for b in cache.blocks)
    hand = 2 * 2 * n_kv_heads * 16 * 20 * 3 * 4  # 2 L G d_k N B bytes
    assert kv_cache_bytes(config, batch=3, length=20, dtype=torch.float32) == hand == held


def test_kv_cache_of_the_presets():
    # SmolLM2-135M, 4,096 tokens in bf16: 2 x 30 layers x 3 KV heads x 64 x 4096 x 2 B = 94.4 MB (A / G = 3x less)
    assert kv_cache_bytes(get_config("smollm2-135m"), batch=1, length=4096, dtype="bf16") == 94_371_840
    # Llama-2-7B (multi-head, G = A = 32): 2 x 32 x 32 x 128 x 4096 x 2 B = 2 GiB per 4K-token sequence in fp16
    assert kv_cache_bytes(get_config("llama2-7b"), batch=1, length=4096, dtype="fp16") == 2 * 1024**3


@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_projection_and_attention_flops_follow_the_kv_heads(n_kv_heads):
    config = get_config("llama-tiny", n_kv_heads=n_kv_heads)
    with torch.device("meta"):
        model = build_model(config)
    b, n, d, a, d_k, L = 2, 10, 64, 4, 16, 2
    report = count_flops(model, torch.zeros(b, n, dtype=torch.long, device="meta"))
    weights = d * a * d_k + a * d_k * d + d * n_kv_heads * 2 * d_k  # W_Q, W_O, then W_K, W_V of G heads
    assert report.by_component["projections"] == L * 2 * weights * b * n
    assert report.by_component["attention"] == L * 2 * b * a * n * n * (2 * d_k)  # every query head attends
