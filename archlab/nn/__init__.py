"""Building blocks: attention, positional encodings, norms, feed-forward, blocks. They know nothing of models."""

from archlab.nn.attention import (
    AdditiveScore,
    AlignmentScore,
    ContentScore,
    DotScore,
    GeneralScore,
    KVCache,
    LocationScore,
    MultiHeadAttention,
    ScaledDotScore,
    attend,
    build_score,
    causal_mask,
    masked_softmax,
    padding_mask,
)
from archlab.nn.blocks import BlockCache, Decoder, DecoderBlock, DecodingCache, Encoder, EncoderBlock
from archlab.nn.feedforward import FeedForward, GatedFeedForward, build_feedforward
from archlab.nn.norm import LayerNorm, RMSNorm, build_norm, layer_norm_equation
from archlab.nn.positional import (
    ALiBi,
    LearnedPositionalEncoding,
    NoPositionalEncoding,
    PositionalEncoding,
    RotaryPositionalEncoding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    build_positional,
    sinusoid_table,
)

__all__ = [name for name in dir() if not name.startswith("_")]
