"""Hostile inputs to the public building blocks: each is refused with a ShapeError naming the value, before computing
(before: a deep PyTorch error, or a silent wrong result)."""

from __future__ import annotations

import pytest
import torch

from archlab.errors import ShapeError
from archlab.nn import (
    Decoder,
    DecoderBlock,
    DecodingCache,
    FeedForward,
    GatedFeedForward,
    LocationScore,
    attend,
    build_rnn,
    causal_mask,
    masked_softmax,
    run_rnn,
    sinusoid_table,
)

Q, K, V = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)


def test_a_boolean_bias_is_refused_not_added_as_ones():
    with pytest.raises(ShapeError, match=r"bias must be a float tensor.*torch.bool.*mask="):
        attend(Q, K, V, bias=torch.ones(4, 5, dtype=torch.bool))


@pytest.mark.parametrize("k, v, words", [
    (K.double(), V.double(), r"share one floating-point dtype, got torch.float32, torch.float64, torch.float64"),
    (K.long(), V, r"share one floating-point dtype, got torch.float32, torch.int64, torch.float32"),
])  # fmt: skip
def test_q_k_v_of_other_dtypes_are_refused_naming_them(k, v, words):
    with pytest.raises(ShapeError, match=words):
        attend(Q, k, v)


def test_a_mask_that_is_not_a_tensor_is_named():
    with pytest.raises(ShapeError, match=r"mask must be a torch.Tensor, got list"):
        attend(Q, K, V, mask=[[True] * 5] * 4)


def test_masked_softmax_refuses_a_float_mask_and_one_that_does_not_broadcast():
    with pytest.raises(ShapeError, match=r"mask must be boolean.*torch.float32"):
        masked_softmax(torch.randn(2, 3), torch.ones(2, 3))
    with pytest.raises(ShapeError, match=r"mask of shape \(3, 2\) does not broadcast to the scores' shape \(2, 3\)"):
        masked_softmax(torch.randn(2, 3), torch.ones(3, 2, dtype=torch.bool))


def test_causal_mask_refuses_negative_and_fractional_sizes():
    with pytest.raises(ShapeError, match=r"n_queries=-1 must be an integer >= 0"):
        causal_mask(-1)
    with pytest.raises(ShapeError, match=r"n_keys=2.5 must be an integer >= 0"):
        causal_mask(2, 2.5)


def test_a_score_refuses_query_and_keys_of_different_batches():
    # the location score ignores the keys' content: it returned [3, 5] scores for 2 rows of keys
    with pytest.raises(ShapeError, match=r"query \(3, 4\) and keys \(2, 5, 4\).*same leading dims"):
        LocationScore(4, max_keys=8)(torch.randn(3, 4), torch.randn(2, 5, 4))


@pytest.mark.parametrize("ffn", [FeedForward(16, 32), GatedFeedForward(16, 32)], ids=["plain", "gated"])
def test_a_feedforward_refuses_another_width_naming_it(ffn):
    with pytest.raises(ShapeError, match=r"d_model=16: x must be float \[\.\.\., d_model\], got \(\(2, 5, 17\)"):
        ffn(torch.randn(2, 5, 17))
    with pytest.raises(ShapeError, match=r"x must be float \[\.\.\., d_model\], got \(\(2, 5, 16\), torch.int64\)"):
        ffn(torch.ones(2, 5, 16, dtype=torch.long))  # ids where vectors go: torch said "mat1 and mat2 ... dtype"


def test_attention_refuses_integer_vectors_naming_the_dtype():
    from archlab.nn import MultiHeadAttention

    with pytest.raises(ShapeError, match=r"x must hold floating-point vectors \[B, N, d_model\], got dtype torch.int"):
        MultiHeadAttention(16, 4)(torch.ones(2, 5, 16, dtype=torch.long))


def test_a_decoder_refuses_a_cache_of_another_depth():
    decoder = Decoder(2, 16, 4, 32, cross_attention=False).eval()
    with pytest.raises(ShapeError, match=r"cache must be a DecodingCache of this decoder's 2 blocks"):
        decoder(torch.randn(1, 3, 16), cache=DecodingCache(1))


def test_a_block_without_cross_attention_refuses_memory_it_would_ignore():
    block = DecoderBlock(16, 4, 32, cross_attention=False).eval()
    with pytest.raises(ShapeError, match=r"memory was given, but this DecoderBlock has no cross-attention"):
        block(torch.randn(1, 3, 16), torch.randn(1, 4, 16))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("lengths, words", [
    (torch.tensor([3]), r"lengths must be an integer \[B\] = \[2\] tensor.*\(1,\)"),  # fused: row 1 was dropped
    (torch.tensor([6, 3]), r"lengths holds 6; each must be in \[1, N=5\]"),
    (torch.tensor([0, 3]), r"lengths holds 0; each must be in \[1, N=5\]"),
    (torch.tensor([3.0, 2.0]), r"lengths must be an integer \[B\].*float32"),
])  # fmt: skip
def test_run_rnn_refuses_lengths_that_do_not_fit_the_batch(fused, lengths, words):
    with pytest.raises(ShapeError, match=words):
        run_rnn(build_rnn("gru", 4, 8, fused=fused), torch.randn(2, 5, 4), lengths=lengths)


def test_sinusoid_table_refuses_a_negative_length():
    with pytest.raises(ShapeError, match=r"n_positions=-1 and offset=0 must be >= 0"):
        sinusoid_table(-1, 4)
