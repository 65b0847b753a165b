"""archlab's blocks and stacks (``archlab/nn/blocks.py``) against PyTorch's reference Transformer layers.

Every archlab parameter is randomised (norm gains and offsets included), then copied into the
PyTorch module, and both run in float64, eval mode, no dropout; max abs error <= 1e-10:

* ``EncoderBlock`` vs ``torch.nn.TransformerEncoderLayer(batch_first=True)``,
* ``DecoderBlock`` vs ``torch.nn.TransformerDecoderLayer`` (causal target mask, memory key padding),
* ``Encoder`` / ``Decoder`` vs ``torch.nn.TransformerEncoder`` / ``TransformerDecoder`` (pre-norm
  stacks get PyTorch's ``norm=`` final LayerNorm),

for post-norm and pre-norm, ReLU and GELU, with and without key padding masks. Name mapping:
``self_attn -> attn``, ``multihead_attn -> cross_attn``, ``linear1/2 -> ffn.w1/w2``,
``norm1/2/3 -> attn_norm / cross_norm / ffn_norm`` (encoder: ``norm1/2 -> attn_norm / ffn_norm``).
archlab's ``in_proj`` has the ``[3d, d]`` layout of ``in_proj_weight``. archlab masks are True =
attend (``[B, 1, 1, M]``); PyTorch's key padding masks are True = ignore.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archlab.interop.torch_nn import copy_attention_to_torch, copy_block_to_torch
from archlab.nn.blocks import Decoder, DecoderBlock, Encoder, EncoderBlock

F64 = torch.float64
TOL = 1e-10
D, HEADS, D_FF = 16, 4, 24


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def copy_mha(src, dst: nn.MultiheadAttention) -> None:
    assert dst.in_proj_weight.shape == src.in_proj.weight.shape == (3 * D, D)
    copy_attention_to_torch(src, dst)


copy_encoder_block = copy_decoder_block = copy_block_to_torch


def torch_layer_kwargs(norm_first: bool, activation: str) -> dict:
    return dict(dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first, dtype=F64)


def key_padding(lengths: list[int], total: int) -> torch.Tensor:
    """``[B, total]`` True at padding (PyTorch's convention)."""
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def archlab_mask(pad: torch.Tensor | None) -> torch.Tensor | None:
    """PyTorch key padding (True = ignore) -> archlab key mask ``[B, 1, 1, M]`` (True = attend)."""
    return None if pad is None else (~pad)[:, None, None, :]


def causal_float_mask(n: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=F64)


CASES = [(nf, act) for nf in (False, True) for act in ("relu", "gelu")]
CASE_IDS = [f"{'pre' if nf else 'post'}-{act}" for nf, act in CASES]


@pytest.mark.parametrize(("norm_first", "activation"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padmask"])
def test_encoder_block_matches_torch(norm_first, activation, padded):
    torch.manual_seed(0)
    ours = randomize(EncoderBlock(D, HEADS, D_FF, ffn=activation, norm_first=norm_first).double(), 1).eval()
    ref = nn.TransformerEncoderLayer(D, HEADS, D_FF, **torch_layer_kwargs(norm_first, activation)).eval()
    copy_encoder_block(ours, ref)
    x = torch.randn(3, 7, D, dtype=F64)
    pad = key_padding([7, 4, 1], 7) if padded else None
    expected = ref(x, src_key_padding_mask=pad)
    out = ours(x, mask=archlab_mask(pad))
    assert max_err(out, expected) <= TOL
    if padded:  # the mask matters: without it the outputs differ
        assert max_err(ours(x), expected) > 1e-3


@pytest.mark.parametrize(("norm_first", "activation"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padmask"])
def test_decoder_block_matches_torch(norm_first, activation, padded):
    torch.manual_seed(2)
    ours = randomize(DecoderBlock(D, HEADS, D_FF, ffn=activation, norm_first=norm_first).double(), 3).eval()
    ref = nn.TransformerDecoderLayer(D, HEADS, D_FF, **torch_layer_kwargs(norm_first, activation)).eval()
    copy_decoder_block(ours, ref)
    x = torch.randn(3, 6, D, dtype=F64)
    memory = torch.randn(3, 5, D, dtype=F64)
    mem_pad = key_padding([5, 2, 3], 5) if padded else None
    expected = ref(x, memory, tgt_mask=causal_float_mask(6), tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    out = ours(x, memory, memory_mask=archlab_mask(mem_pad))
    assert max_err(out, expected) <= TOL
    # causal is the default; without it the outputs differ
    assert max_err(ours(x, memory, memory_mask=archlab_mask(mem_pad), causal=False), expected) > 1e-3
    if padded:
        assert max_err(ours(x, memory), expected) > 1e-3


@pytest.mark.parametrize(("norm_first", "activation"), CASES, ids=CASE_IDS)
def test_decoder_block_with_target_padding_matches_torch(norm_first, activation):
    """Target key padding combined with the causal mask (both in archlab's ``mask`` / ``causal``)."""
    torch.manual_seed(4)
    ours = randomize(DecoderBlock(D, HEADS, D_FF, ffn=activation, norm_first=norm_first).double(), 5).eval()
    ref = nn.TransformerDecoderLayer(D, HEADS, D_FF, **torch_layer_kwargs(norm_first, activation)).eval()
    copy_decoder_block(ours, ref)
    x = torch.randn(2, 6, D, dtype=F64)
    memory = torch.randn(2, 4, D, dtype=F64)
    tgt_pad = key_padding([6, 3], 6)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)  # bool like the padding mask: True = ignore
    expected = ref(x, memory, tgt_mask=future, tgt_key_padding_mask=tgt_pad)
    assert max_err(ours(x, memory, mask=archlab_mask(tgt_pad)), expected) <= TOL


@pytest.mark.parametrize(("norm_first", "activation"), CASES, ids=CASE_IDS)
def test_encoder_stack_matches_torch(norm_first, activation):
    torch.manual_seed(6)
    n_layers = 3
    ours = randomize(Encoder(n_layers, D, HEADS, D_FF, ffn=activation, norm_first=norm_first).double(), 7).eval()
    layer = nn.TransformerEncoderLayer(D, HEADS, D_FF, **torch_layer_kwargs(norm_first, activation))
    final = nn.LayerNorm(D, dtype=F64) if norm_first else None
    ref = nn.TransformerEncoder(layer, n_layers, norm=final, enable_nested_tensor=False).eval()
    for src, dst in zip(ours.blocks, ref.layers, strict=True):
        copy_encoder_block(src, dst)
    if norm_first:
        with torch.no_grad():
            ref.norm.load_state_dict(ours.final_norm.state_dict())
    else:
        assert isinstance(ours.final_norm, nn.Identity)
    x = torch.randn(2, 5, D, dtype=F64)
    pad = key_padding([5, 3], 5)
    assert max_err(ours(x), ref(x)) <= TOL
    assert max_err(ours(x, mask=archlab_mask(pad)), ref(x, src_key_padding_mask=pad)) <= TOL


@pytest.mark.parametrize(("norm_first", "activation"), CASES, ids=CASE_IDS)
def test_decoder_stack_matches_torch(norm_first, activation):
    torch.manual_seed(8)
    n_layers = 2
    ours = randomize(Decoder(n_layers, D, HEADS, D_FF, ffn=activation, norm_first=norm_first).double(), 9).eval()
    layer = nn.TransformerDecoderLayer(D, HEADS, D_FF, **torch_layer_kwargs(norm_first, activation))
    final = nn.LayerNorm(D, dtype=F64) if norm_first else None
    ref = nn.TransformerDecoder(layer, n_layers, norm=final).eval()
    for src, dst in zip(ours.blocks, ref.layers, strict=True):
        copy_decoder_block(src, dst)
    if norm_first:
        with torch.no_grad():
            ref.norm.load_state_dict(ours.final_norm.state_dict())
    x = torch.randn(2, 6, D, dtype=F64)
    memory = torch.randn(2, 4, D, dtype=F64)
    mem_pad = key_padding([4, 2], 4)
    expected = ref(x, memory, tgt_mask=causal_float_mask(6), tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    assert max_err(ours(x, memory, memory_mask=archlab_mask(mem_pad)), expected) <= TOL


def test_encoder_decoder_together_match_torch_transformer():
    """Encoder output fed as the decoder's memory: archlab's pair vs ``torch.nn.Transformer`` (post-norm, the paper)."""
    torch.manual_seed(10)
    enc = randomize(Encoder(2, D, HEADS, D_FF).double(), 11).eval()
    dec = randomize(Decoder(2, D, HEADS, D_FF).double(), 12).eval()
    ref = nn.Transformer(D, HEADS, 2, 2, D_FF, dropout=0.0, batch_first=True, dtype=F64).eval()
    for src, dst in zip(enc.blocks, ref.encoder.layers, strict=True):
        copy_encoder_block(src, dst)
    for src, dst in zip(dec.blocks, ref.decoder.layers, strict=True):
        copy_decoder_block(src, dst)
    # nn.Transformer always adds final norms; make them the identity so the post-norm stacks compare
    with torch.no_grad():
        for norm in (ref.encoder.norm, ref.decoder.norm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    src, tgt = torch.randn(2, 5, D, dtype=F64), torch.randn(2, 4, D, dtype=F64)
    pad = key_padding([5, 3], 5)
    expected = ref(src, tgt, tgt_mask=causal_float_mask(4), src_key_padding_mask=pad, memory_key_padding_mask=pad)
    # torch's final norms (gain 1, offset 0) act on each stack's output, the decoder's memory included
    def ln(t):
        return nn.functional.layer_norm(t, (D,))

    memory = ln(enc(src, mask=archlab_mask(pad)))
    assert max_err(memory, ref.encoder(src, src_key_padding_mask=pad)) <= TOL
    ours = ln(dec(tgt, memory, memory_mask=archlab_mask(pad)))
    assert max_err(ours, expected) <= TOL
