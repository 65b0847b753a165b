"""archlab blocks <-> ``torch.nn`` Transformer layers: the same weights, other names.

``MultiHeadAttention.in_proj`` has the layout of ``torch.nn.MultiheadAttention.in_proj_weight``
(rows ``[W_Q; W_K; W_V]``), so the mapping is one name per tensor:

    attn -> self_attn, cross_attn -> multihead_attn, ffn.w1/w2 -> linear1/2,
    attn_norm -> norm1, cross_norm -> norm2 (decoder), ffn_norm -> norm2 (encoder) / norm3 (decoder)
"""

from __future__ import annotations

import torch
from torch import nn

from archlab.nn.attention import MultiHeadAttention
from archlab.nn.blocks import DecoderBlock, EncoderBlock


@torch.no_grad()
def copy_attention_to_torch(src: MultiHeadAttention, dst: nn.MultiheadAttention) -> None:
    dst.in_proj_weight.copy_(src.in_proj.weight)
    dst.in_proj_bias.copy_(src.in_proj.bias)
    dst.out_proj.load_state_dict(src.out_proj.state_dict())


@torch.no_grad()
def copy_block_to_torch(src: EncoderBlock | DecoderBlock, dst: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer) -> None:
    """Copy an archlab encoder or decoder block's weights into the matching ``torch.nn`` layer."""
    copy_attention_to_torch(src.attn, dst.self_attn)
    dst.linear1.load_state_dict(src.ffn.w1.state_dict())
    dst.linear2.load_state_dict(src.ffn.w2.state_dict())
    dst.norm1.load_state_dict(src.attn_norm.state_dict())
    if isinstance(dst, nn.TransformerDecoderLayer):
        copy_attention_to_torch(src.cross_attn, dst.multihead_attn)
        dst.norm2.load_state_dict(src.cross_norm.state_dict())
        dst.norm3.load_state_dict(src.ffn_norm.state_dict())
    else:
        dst.norm2.load_state_dict(src.ffn_norm.state_dict())
