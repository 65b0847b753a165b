"""count_flops against a hand computation and against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch

from archlab import kernels
from archlab.analysis.flops import FlopCounter, count_flops
from archlab.errors import DataError
from archlab.models import build_model
from archlab.nn import MultiHeadAttention


def transformer_by_hand(B, M, N, V=128, d=64, d_ff=256, L=2) -> dict[str, int]:
    """One forward of the encoder-decoder: B pairs, M source and N target tokens (2 FLOPs per multiply-add)."""
    return {
        # QK^T and alpha V: 2 A n m (d_k + d_v) = 4 n m d per layer; encoder self, decoder self, decoder cross
        "attention": L * (4 * B * M * M * d + 4 * B * N * N * d + 4 * B * N * M * d),
        # W_Q, W_K, W_V, W_O (4 d^2) per token; cross-attention: W_Q, W_O on N targets, W_K, W_V on M sources
        "projections": L * (2 * 4 * d * d * B * M + 2 * 4 * d * d * B * N + 2 * 2 * d * d * (B * N + B * M)),
        "feed_forward": L * 2 * 2 * d * d_ff * (B * M + B * N),
        "output_head": 2 * d * V * B * N,
        "embeddings": 0,  # lookups
        "other": 0,
    }


def test_transformer_tiny_matches_hand_count():
    model = build_model("transformer-tiny").eval()
    src, tgt = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    report = count_flops(model, src, tgt)
    assert report.by_component == transformer_by_hand(B=2, M=7, N=5)
    per_token = report.per_token(2 * 5)
    assert per_token["output_head"] == 2 * 64 * 128


def test_agrees_with_torch_flop_counter():
    """torch counts every matmul it sees; with the math backend attention is two plain matmuls."""
    model = build_model("transformer-tiny", norm_first=True, ffn="swiglu").eval()
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.backend = "math"
    src, tgt = torch.randint(0, 128, (3, 6)), torch.randint(0, 128, (3, 4))
    with kernels.flop_counter(display=False) as counter, torch.no_grad():
        model(src, tgt)
    assert count_flops(model, src, tgt).total == counter.get_total_flops()


def test_cached_decoding_counts_each_projection_once():
    model = build_model("transformer-tiny").eval()
    src, tgt = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 5))
    step = model.decoder_step(model.encode(src))
    with FlopCounter(model) as whole, torch.no_grad():
        step(tgt, None)
    with FlopCounter(model) as incremental, torch.no_grad():
        cache = model.new_cache()
        for i in range(5):
            step(tgt[:, i : i + 1], cache)
    full, summed = whole.report.by_component, incremental.report.by_component
    assert summed["projections"] == full["projections"]  # same tokens, K/V of memory once
    assert summed["feed_forward"] == full["feed_forward"]
    # the cache's packed LM head is bypassed while the counter watches the head module
    assert summed["output_head"] == full["output_head"] == 2 * 64 * 128 * 5
    d, L, N, M = 64, 2, 5, 7
    assert full["attention"] == L * (4 * N * N * d + 4 * N * M * d)  # dense causal
    assert summed["attention"] == L * (4 * (N * (N + 1) // 2) * d + 4 * N * M * d)  # step t sees t keys


def test_meta_device_big_model():
    with torch.device("meta"):
        model = build_model("transformer-big")
        src, tgt = torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long)
    report = count_flops(model, src, tgt)
    assert report.by_component == transformer_by_hand(B=1, M=10, N=10, V=37000, d=1024, d_ff=4096, L=6)


def test_errors():
    with pytest.raises(DataError, match="nn.Module"):
        count_flops(lambda x: x, torch.zeros(1))
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(DataError, match="n_tokens=0"):
        count_flops(build_model("transformer-tiny"), ids, ids).per_token(0)


# ------------------------------------------------------------------------------------------------
# Transformer-XL: keys from [memory; segment], Dai's position term, W_R on the rows of R
# ------------------------------------------------------------------------------------------------


def transformer_xl_by_hand(B, N, M, V=256, d=64, d_ff=256, L=2, relative=True) -> dict[str, int]:
    """One segment of N tokens with a memory of M per layer (keys: M + N). d_k = d_v = d / A."""
    K = M + N  # noqa: N806
    return {
        # Q K^T and alpha V: 4 B N K d; Dai's (q_i + v)^T W_R R_t for K distances: 2 B N K d
        "attention": L * (4 * B * N * K * d + (2 * B * N * K * d if relative else 0)),
        # W_Q, W_O on the N segment tokens; W_K, W_V on the K context tokens; W_R on the K rows of R, once
        "projections": L * (2 * 2 * d * d * B * N + 2 * 2 * d * d * B * K + (2 * d * d * K if relative else 0)),
        "feed_forward": L * 2 * 2 * d * d_ff * B * N,
        "output_head": 2 * d * V * B * N,  # tied to the embedding, applied once
        "embeddings": 0,
        "other": 0,
    }


def xl_memory(B, M, d=64, L=2, device=None) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(B, M, d, device=device) for _ in range(L))


@pytest.mark.parametrize("positional", ["relative", "rope"])
def test_transformer_xl_matches_hand_count(positional):
    model = build_model("transformer-xl-tiny", positional=positional).eval()
    ids = torch.randint(0, 256, (2, 5))
    relative = positional == "relative"
    assert count_flops(model, ids).by_component == transformer_xl_by_hand(B=2, N=5, M=0, relative=relative)
    memory = xl_memory(B=2, M=7)
    assert count_flops(model, ids, memory).by_component == transformer_xl_by_hand(B=2, N=5, M=7, relative=relative)


def test_transformer_xl_on_meta_device():
    """The inspect path: model and inputs on meta, nothing computed; the same count as on real tensors."""
    with torch.device("meta"):
        model = build_model("transformer-xl-tiny")
        ids = torch.zeros(3, 32, dtype=torch.long)
    assert count_flops(model, ids).by_component == transformer_xl_by_hand(B=3, N=32, M=0)
    memory = xl_memory(B=3, M=32, device="meta")
    assert count_flops(model, ids, memory).by_component == transformer_xl_by_hand(B=3, N=32, M=32)


def test_transformer_xl_agrees_with_torch_flop_counter():
    """Every matmul torch sees (projections, W_R, the position term, Q K^T, A V, FFN, head), counted by torch."""
    model = build_model("transformer-xl-tiny", backend="math").eval()
    ids, memory = torch.randint(0, 256, (2, 6)), xl_memory(B=2, M=9)
    with kernels.flop_counter(display=False) as counter, torch.no_grad():
        model(ids, memory)
    report = count_flops(model, ids, memory)
    assert report.total == counter.get_total_flops()
    assert report.total == sum(transformer_xl_by_hand(B=2, N=6, M=9).values())


def rwkv_by_hand(tokens: int, d=64, d_att=64, d_ff=256, L=2, V=256) -> dict[str, int]:  # noqa: N803
    """rwkv-tiny: per token and layer 2 x (W_k, W_v, W_r [d_att, d], W_o [d, d_att]) and 2 x (W_k [d_ff, d],
    W_r [d, d], W_v [d, d_ff]); the WKV recurrence is elementwise (not counted)."""
    return {"attention": 0, "projections": tokens * L * 2 * 4 * d * d_att,
            "feed_forward": tokens * L * 2 * (2 * d * d_ff + d * d), "output_head": tokens * 2 * d * V,
            "embeddings": 0, "other": 0}  # fmt: skip


def test_rwkv_matches_hand_count_and_torch_flop_counter():
    model = build_model("rwkv-tiny").eval()
    ids = torch.randint(0, 256, (2, 9))
    assert count_flops(model, ids).by_component == rwkv_by_hand(2 * 9)
    one = ids[:, :1]  # one token: the recurrent WKV (no matmul), so torch sees exactly the weight matmuls
    with kernels.flop_counter(display=False) as counter, torch.no_grad():
        model(one)
    assert count_flops(model, one).total == counter.get_total_flops() == sum(rwkv_by_hand(2).values())


@pytest.mark.parametrize("n_tokens", [float("nan"), "8", 2.5, True])
def test_per_token_needs_a_positive_integer_count(n_tokens):
    report = count_flops(torch.nn.Linear(4, 4), torch.zeros(2, 4))
    with pytest.raises(DataError, match=r"n_tokens=.* must be an integer > 0"):
        report.per_token(n_tokens)
