"""Building blocks: attention (plain and memory-saving), positional encodings, norms, feed-forward, blocks,
recurrent cells, causal convolutions, LoRA, fast linear layers and the fused LM loss. They know nothing of models.

The few-row product function of :mod:`archlab.nn.linear` is not re-exported here: as ``archlab.nn.linear``
it would hide that module. Import it from there (``from archlab.nn.linear import linear``).
"""

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
from archlab.nn.backends import BackendSpec, RelativeBias, check_backend, parse_backend, register_backend
from archlab.nn.blocks import BlockCache, Decoder, DecoderBlock, DecodingCache, Encoder, EncoderBlock
from archlab.nn.buffers import KeptDtypeBuffers
from archlab.nn.conv import (
    CausalConv1d,
    ConvCache,
    ConvQueue,
    GatedResidualUnit,
    doubling_dilations,
    receptive_field,
)
from archlab.nn.dropout import Dropout
from archlab.nn.efficient import (
    BigBirdPattern,
    FullPattern,
    LinformerAttention,
    Pattern,
    PerformerAttention,
    SlidingPattern,
    bigbird_attention,
    bigbird_layout,
    chunked_attention,
    elu_feature_map,
    favor_features,
    kernel_attention,
    linear_attention,
    orthogonal_gaussian,
    sliding_window_attention,
    tiled_attention,
)
from archlab.nn.feedforward import FeedForward, GatedFeedForward, build_feedforward
from archlab.nn.inputs import check_token_ids
from archlab.nn.linear import (
    Linear,
    PackedLinear,
    RefreshedCopies,
    head_logits,
    is_logits_head,
    kernel_takes_rows,
    onednn_packing_available,
    packed_for_rows,
    packs_bf16,
)
from archlab.nn.lora import (
    LoRALinear,
    LoRAReport,
    apply_lora,
    linear_names,
    lora_layers,
    lora_parameters,
    lora_report,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from archlab.nn.loss import linear_cross_entropy
from archlab.nn.norm import LayerNorm, RMSNorm, build_norm, layer_norm_equation
from archlab.nn.positional import (
    ALiBi,
    LearnedPositionalEncoding,
    NoPositionalEncoding,
    PositionalEncoding,
    RotaryPositionalEncoding,
    RowRotation,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    build_positional,
    sinusoid_table,
)
from archlab.nn.recurrent import (
    GRUCell,
    LSTMCell,
    RecurrentCache,
    RecurrentStack,
    RNNCell,
    build_cell,
    build_rnn,
    gru_step,
    lengths_from_mask,
    lstm_step,
    rnn_step,
    run_cell,
    run_rnn,
)

__all__ = [
    # attention
    "AdditiveScore", "AlignmentScore", "ContentScore", "DotScore", "GeneralScore", "KVCache", "LocationScore",
    "MultiHeadAttention", "ScaledDotScore", "attend", "build_score", "causal_mask", "masked_softmax",
    "padding_mask",
    # backends (specs and dispatch)
    "BackendSpec", "RelativeBias", "check_backend", "parse_backend", "register_backend",
    # efficient (memory-saving attention)
    "BigBirdPattern", "FullPattern", "LinformerAttention", "Pattern", "PerformerAttention",
    "SlidingPattern", "bigbird_attention", "bigbird_layout", "chunked_attention",
    "elu_feature_map", "favor_features", "kernel_attention", "linear_attention", "orthogonal_gaussian",
    "sliding_window_attention", "tiled_attention",
    # positional, norm, feedforward, blocks
    "ALiBi", "LearnedPositionalEncoding", "NoPositionalEncoding", "PositionalEncoding", "RotaryPositionalEncoding",
    "RowRotation", "SinusoidalPositionalEncoding", "alibi_slopes", "build_positional", "sinusoid_table",
    "LayerNorm", "RMSNorm", "build_norm", "layer_norm_equation",
    "Dropout", "FeedForward", "GatedFeedForward", "build_feedforward",
    "BlockCache", "Decoder", "DecoderBlock", "DecodingCache", "Encoder", "EncoderBlock",
    "KeptDtypeBuffers",
    # recurrent, conv
    "GRUCell", "LSTMCell", "RNNCell", "RecurrentCache", "RecurrentStack", "build_cell", "build_rnn", "gru_step",
    "lengths_from_mask", "lstm_step", "rnn_step", "run_cell", "run_rnn",
    "CausalConv1d", "ConvCache", "ConvQueue", "GatedResidualUnit", "doubling_dilations", "receptive_field",
    # LoRA
    "LoRALinear", "LoRAReport", "apply_lora", "linear_names", "lora_layers", "lora_parameters", "lora_report",
    "merge_lora", "unload_lora", "unmerge_lora",
    # linear layers, loss, input checks
    "Linear", "PackedLinear", "RefreshedCopies", "packed_for_rows", "onednn_packing_available", "packs_bf16",
    "head_logits", "is_logits_head",
    "kernel_takes_rows",
    "linear_cross_entropy", "check_token_ids",
]  # fmt: skip
