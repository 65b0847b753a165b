"""The encoder-decoder Transformer: presets and parameter counts, weight sharing, cached decoding,
masks, training, errors, serialisation, and parity with torch.nn.Transformer in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archlab.errors import ConfigError, ShapeError
from archlab.interop.io import load_model, save_model
from archlab.interop.torch_nn import copy_block_to_torch
from archlab.models import build_model, get_config
from archlab.models.transformer import EncoderDecoderTransformer, TransformerConfig

TINY = dict(vocab_size=40, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0, max_len=64)


def tiny(**overrides) -> EncoderDecoderTransformer:
    torch.manual_seed(0)
    return EncoderDecoderTransformer(TransformerConfig(**{**TINY, **overrides})).eval()


def ids(batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hand_count(V: int, d: int, d_ff: int, N: int) -> int:
    """Parameters of the paper's model with one shared embedding, written out sub-layer by sub-layer."""
    attention = 4 * d * d + 4 * d  # W_Q, W_K, W_V, W_O and their biases (A d_k = A d_v = d)
    ffn = d * d_ff + d_ff + d_ff * d + d  # W_1, b_1, W_2, b_2
    norm = 2 * d  # gamma, beta
    encoder_block = attention + ffn + 2 * norm
    decoder_block = 2 * attention + ffn + 3 * norm
    return V * d + N * encoder_block + N * decoder_block


# ------------------------------------------------------------------------------------------------
# presets and parameter counts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, d, d_ff, paper",
    [("transformer-base", 512, 2048, 65e6), ("transformer-big", 1024, 4096, 213e6)],
)
def test_preset_parameter_counts_match_hand_count_and_paper(preset, d, d_ff, paper):
    with torch.device("meta"):
        model = build_model(preset)
    n = sum(p.numel() for p in model.parameters())  # parameters() yields the tied matrix once
    assert n == hand_count(37000, d, d_ff, 6)
    # base: 63,082,496 (-3.0% of the paper's 65M); big: 214,245,376 (+0.6% of 213M)
    assert abs(n - paper) / paper < 0.04, n


def test_preset_hyperparameters():
    base, big = get_config("transformer-base"), get_config("transformer-big")
    shape = lambda c: (c.n_layers, c.d_model, c.n_heads, c.d_k, c.d_ff, c.dropout)  # noqa: E731
    assert shape(base) == (6, 512, 8, 64, 2048, 0.1)
    assert shape(big) == (6, 1024, 16, 64, 4096, 0.3)
    assert (base.positional, base.norm_first, base.share_embeddings) == ("sinusoidal", False, True)
    assert base.vocab_size == big.vocab_size == 37000


def test_tiny_preset_runs():
    model = build_model("transformer-tiny").eval()
    cfg = model.config
    src, tgt = ids(2, 7, cfg.vocab_size), ids(2, 5, cfg.vocab_size, seed=2)
    assert model(src, tgt).shape == (2, 5, cfg.vocab_size)


def test_shapes():
    model = tiny()
    src, tgt = ids(3, 7), ids(3, 5, seed=2)
    memory = model.encode(src)
    assert memory.shape == (3, 7, 32)
    assert model.decode(tgt, memory).shape == (3, 5, 40)
    torch.testing.assert_close(model(src, tgt), model.decode(tgt, memory))


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------
def test_embedding_matrix_is_shared_three_ways():
    model = tiny()
    assert model.src_embed.weight is model.tgt_embed.weight is model.lm_head.weight
    assert model.lm_head.bias is None
    untied = tiny(share_embeddings=False)
    weights = {id(untied.src_embed.weight), id(untied.tgt_embed.weight), id(untied.lm_head.weight)}
    assert len(weights) == 3


def test_embeddings_are_scaled_by_sqrt_d_model_before_adding_positions():
    model = tiny()
    src = ids(2, 6)
    seen = {}
    model.encoder.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    model.encode(src)
    pos = torch.arange(6, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, 32, 2, dtype=torch.float64)
    pe = torch.zeros(6, 32, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / 10000 ** (two_i / 32)), torch.cos(pos / 10000 ** (two_i / 32))
    expected = model.src_embed.weight[src] * math.sqrt(32) + pe.float()
    torch.testing.assert_close(seen["x"], expected)
    unscaled = tiny(scale_embeddings=False)
    unscaled.encoder.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    unscaled.encode(src)
    torch.testing.assert_close(seen["x"], unscaled.src_embed.weight[src] + pe.float())


# ------------------------------------------------------------------------------------------------
# incremental decoding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope", "alibi"])
def test_cached_decoding_equals_full_decoding(norm_first, positional):
    model = tiny(norm_first=norm_first, positional=positional)
    src, tgt = ids(2, 7), ids(2, 9, seed=3)
    src_mask = torch.ones(2, 7, dtype=torch.long)
    src_mask[1, 5:] = 0
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full = model.decode(tgt, memory, memory_mask=src_mask)
        step = model.decoder_step(memory, src_mask)
        cache = model.new_cache()
        pieces = [step(tgt[:, :3], cache)]  # a prompt of 3 tokens, then one token at a time
        for i in range(3, 9):
            pieces.append(step(tgt[:, i : i + 1], cache))
    assert cache.length == 9
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max() <= 1e-5


def test_cached_decoding_reads_the_packed_head_on_two_threads(monkeypatch):
    import archlab.nn.linear as linear_module

    monkeypatch.setattr(linear_module, "MIN_SPLIT_ELEMENTS", 0)  # pack even this tiny head
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny().double()
        src, tgt = ids(1, 7), ids(1, 5, seed=3)
        with torch.no_grad():
            memory = model.encode(src)
            full = model.decode(tgt, memory)
            cache = model.new_cache()
            assert cache.output.blocks.shape == (2, 32, 20)  # [threads, d, V / threads]
            cached = torch.cat([model.decode(tgt[:, i : i + 1], memory, cache=cache) for i in range(5)], dim=1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(cached, full, rtol=1e-12, atol=1e-12)


def test_cache_reorder_follows_the_beams():
    model = tiny()
    src, tgt = ids(1, 6), ids(2, 5, seed=4)
    with torch.no_grad():
        memory = model.encode(src).expand(2, -1, -1)  # one source, two beams
        step = model.decoder_step(memory)
        cache = model.new_cache()
        step(tgt[:, :4], cache)
        cache.reorder(torch.tensor([1, 1]))  # both beams continue beam 1
        last = step(tgt[[1, 1], 4:5], cache)
        full = model.decode(tgt[[1, 1]], memory)
    assert (last - full[:, 4:]).abs().max() <= 1e-5


def test_generation_protocol_greedy_and_beam_search():
    """archlab.generation drives decoder_step: with a cache it must pick the same tokens as without."""
    from archlab.generation import beam_search, expand_for_beams, generate

    model = tiny()
    src = ids(2, 6)
    src_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    start = torch.ones(2, 1, dtype=torch.long)
    memory = model.encode(src, src_mask)
    step = model.decoder_step(memory, src_mask)
    cached = generate(step, start, max_new_tokens=6, cache=model.new_cache())
    uncached = generate(step, start, max_new_tokens=6, use_cache=False)
    assert cached.shape == (2, 7) and torch.equal(cached, uncached)

    k = 3
    beams = model.decoder_step(expand_for_beams(memory, k), expand_for_beams(src_mask, k))
    with_cache = beam_search(beams, start, beam_size=k, max_new_tokens=5, eos_id=2, cache=model.new_cache())
    without = beam_search(beams, start, beam_size=k, max_new_tokens=5, eos_id=2, use_cache=False)
    for a, b in zip(with_cache, without, strict=True):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def test_source_padding_is_masked():
    model = tiny()
    src, tgt = ids(3, 8), ids(3, 5, seed=5)
    lengths = [8, 5, 3]
    src_mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    with torch.no_grad():
        batched = model(src, tgt, src_mask)
        garbage = src.masked_fill(src_mask == 0, 7)  # other pad content: no change
        torch.testing.assert_close(model(garbage, tgt, src_mask), batched, rtol=0, atol=1e-6)
        for row, n in enumerate(lengths):  # each row alone, unpadded
            alone = model(src[row : row + 1, :n], tgt[row : row + 1])
            torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-5)
        assert not torch.allclose(model(src, tgt), batched)  # without the mask, padding is attended


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def test_a_few_adam_steps_on_a_copy_task_lower_the_loss():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(TransformerConfig(**{**TINY, "vocab_size": 12, "dropout": 0.1})).train()
    bos, eos = 1, 2
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)

    def loss_on(src):
        tgt_in = torch.cat([torch.full((src.shape[0], 1), bos), src], dim=1)
        labels = torch.cat([src, torch.full((src.shape[0], 1), eos)], dim=1)
        logits = model(src, tgt_in)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    held_out = torch.randint(3, 12, (32, 6), generator=gen)
    with torch.no_grad():
        before = loss_on(held_out).item()
    for _ in range(60):
        loss = loss_on(torch.randint(3, 12, (32, 6), generator=gen))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = loss_on(held_out).item()
    assert after < 0.6 * before, (before, after)  # measured: 3.30 -> 1.39


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(d_model=500), ["d_model=500", "n_heads=8"]),
        (dict(n_layers=0), ["n_layers=0", "> 0"]),
        (dict(dropout=1.0), ["dropout=1.0", "[0, 1)"]),
        (dict(positional="sinus"), ["positional", "'sinus'", "sinusoidal"]),
        (dict(ffn="swiglu2"), ["ffn", "'swiglu2'"]),
        (dict(pad_id=37000), ["pad_id=37000", "vocab_size=37000"]),
        (dict(d_model="512"), ["d_model='512'", "integer"]),
        (dict(norm_first="yes"), ["norm_first='yes'", "true or false"]),
        (dict(d_model=24, n_heads=8, positional="rope"), ["rope", "d_k=3"]),
    ],
)
def test_bad_config_names_field_and_value(overrides, words):
    with pytest.raises(ConfigError) as info:
        TransformerConfig(**overrides)
    for word in words:
        assert word in str(info.value)


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'd_model'"):
        get_config("transformer-base", d_modle=256)


def test_bad_inputs_raise_shape_errors_before_computing():
    model = tiny()
    src, tgt = ids(2, 5), ids(2, 4)
    with pytest.raises(ShapeError, match=r"token id 40, outside the vocabulary: ids must be in \[0, vocab_size=40\)"):
        model(src, torch.tensor([[1, 2, 40, 3], [0, 0, 0, 0]]))
    with pytest.raises(ShapeError, match=r"token id -1, outside the vocabulary"):
        model.encode(torch.tensor([[1, -1]]))
    with pytest.raises(ShapeError, match="integer token ids"):
        model.encode(src.float())
    with pytest.raises(ShapeError, match=r"\[B, N\]"):
        model.encode(src[0])
    with pytest.raises(ShapeError, match="src_mask"):
        model(src, tgt, torch.ones(2, 4))
    with pytest.raises(ShapeError, match="memory"):
        model.decode(tgt, torch.zeros(3, 5, 32))
    with pytest.raises(ShapeError, match="max_len=64"):
        tiny(positional="learned").encode(ids(1, 65))


def test_out_of_range_target_is_caught_before_the_encoder_runs():
    model = tiny()
    ran = []
    model.encoder.register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises(ShapeError):
        model(ids(1, 4), torch.tensor([[99]]))
    assert not ran


# ------------------------------------------------------------------------------------------------
# configs and serialisation
# ------------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_preset_override():
    cfg = TransformerConfig(**TINY, positional="rope", norm_first=True)
    assert TransformerConfig.from_json(cfg.to_json()) == cfg
    with torch.device("meta"):
        model = build_model("transformer-base", n_layers=2)
    assert len(model.encoder.blocks) == len(model.decoder.blocks) == 2
    assert model.config == get_config("transformer-base").replace(n_layers=2)


@pytest.mark.parametrize("share", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip(tmp_path, share):
    model = tiny(share_embeddings=share, positional="learned")
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.src_embed.weight) == share
    src, tgt = ids(2, 6), ids(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), model(src, tgt))
    if not share:
        assert not torch.equal(loaded.lm_head.weight, loaded.src_embed.weight)


# ------------------------------------------------------------------------------------------------
# parity with torch.nn.Transformer (float64)
# ------------------------------------------------------------------------------------------------
def torch_reference(model: EncoderDecoderTransformer) -> nn.Transformer:
    cfg = model.config
    ref = nn.Transformer(
        cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.n_layers, cfg.d_ff, dropout=0.0,
        batch_first=True, norm_first=cfg.norm_first,
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        for ours, theirs in zip(model.encoder.blocks, ref.encoder.layers, strict=True):
            copy_block_to_torch(ours, theirs)
        for ours, theirs in zip(model.decoder.blocks, ref.decoder.layers, strict=True):
            copy_block_to_torch(ours, theirs)
    if cfg.norm_first:
        ref.encoder.norm.load_state_dict(model.encoder.final_norm.state_dict())
        ref.decoder.norm.load_state_dict(model.decoder.final_norm.state_dict())
    else:  # nn.Transformer always ends its stacks with a LayerNorm; a post-norm stack has none
        ref.encoder.norm = None
        ref.decoder.norm = None
    return ref


def sinusoids(n: int, d: int) -> torch.Tensor:
    pe = torch.zeros(n, d, dtype=torch.float64)
    for pos in range(n):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    return pe


@pytest.mark.filterwarnings("ignore:.*nested.tensor")  # torch's own encoder fast path, not ours
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_parity_with_torch_transformer_float64(norm_first):
    model = tiny(norm_first=norm_first).double()
    with torch.no_grad():  # non-trivial biases and norm parameters, so every one of them is checked
        gen = torch.Generator().manual_seed(6)
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    ref = torch_reference(model)
    src, tgt = ids(3, 7), ids(3, 6, seed=7)
    src_mask = torch.ones(3, 7, dtype=torch.bool)
    src_mask[1, 4:] = False
    src_mask[2, 2:] = False
    E, d = model.src_embed.weight, model.config.d_model
    with torch.no_grad():
        ours = model(src, tgt, src_mask)
        src_x = E[src] * math.sqrt(d) + sinusoids(7, d)
        tgt_x = E[tgt] * math.sqrt(d) + sinusoids(6, d)
        out = ref(
            src_x, tgt_x,
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64),
            src_key_padding_mask=~src_mask, memory_key_padding_mask=~src_mask, tgt_is_causal=True,
        )  # fmt: skip
        theirs = out @ E.T
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-10, err
