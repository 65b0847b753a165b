"""RNNenc and RNNsearch: attention over real source tokens only, padding invariance, decoding (greedy ==
argmax fed back, beam 1 == greedy, cached == uncached), the fixed context vector of RNNenc, errors,
a few training steps per preset, and (slow) learning to reverse strings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.generation import beam_search, expand_for_beams
from archlab.models import build_model
from archlab.models.registry import FAMILIES
from archlab.models.seq2seq import RNNenc, RNNencConfig, RNNsearch, RNNsearchConfig
from archlab.nn.attention import SCORES

F64 = torch.float64
V = 23
SIZES = dict(vocab_size=V, d_embed=6, d_encoder=5, d_decoder=7, d_maxout=4)
SCORE_NAMES = sorted(SCORES)


def search(seed: int = 0, **overrides) -> RNNsearch:
    cfg = {**SIZES, "d_attn": 8, "max_src_len": 12, **overrides}
    if cfg.get("score") in ("dot", "scaled_dot", "content"):
        cfg["d_decoder"] = 2 * cfg["d_encoder"]
    return _randomized(RNNsearch(RNNsearchConfig(**cfg)), seed)


def enc(seed: int = 0, **overrides) -> RNNenc:
    return _randomized(RNNenc(RNNencConfig(**{**SIZES, **overrides})), seed)


def _randomized(m, seed):
    torch.manual_seed(seed)
    with torch.no_grad():  # larger than the init: saturating gates, peaked attention
        for p in m.parameters():
            p.uniform_(-0.8, 0.8)
    return m.to(F64).eval()


def padded_batch():
    """Two sources, the second right-padded with junk ids (3 real tokens of 6)."""
    torch.manual_seed(1)
    src = torch.randint(3, V, (2, 6))
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    tgt_in = torch.randint(3, V, (2, 5))
    return src, mask, tgt_in


# ---------------------------------------------------------------------------------------------
# attention and padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_attention_sums_to_one_over_real_tokens_and_is_zero_on_padding(score):
    m = search(score=score)
    src, mask, tgt_in = padded_batch()
    logits, alpha = m(src, tgt_in, mask, return_attention=True)
    assert logits.shape == (2, 5, V) and alpha.shape == (2, 5, 6)  # [B, M, N]
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 5, dtype=F64), atol=1e-12, rtol=0)
    assert torch.all(alpha[1, :, 3:] == 0)
    assert torch.all(alpha[1, :, :3] > 0)


@pytest.mark.parametrize("make", [enc, *[lambda s=s: search(score=s) for s in SCORE_NAMES]],
                         ids=["rnnenc", *[f"rnnsearch-{s}" for s in SCORE_NAMES]])  # fmt: skip
def test_padding_the_source_changes_nothing(make):
    m = make()
    src, mask, tgt_in = padded_batch()
    padded = m(src, tgt_in, mask)
    alone = m(src[1:, :3], tgt_in[1:])
    torch.testing.assert_close(padded[1:], alone, atol=1e-10, rtol=0)
    other_junk = src.clone()
    other_junk[1, 3:] = (src[1, 3:] + 5) % V
    torch.testing.assert_close(m(other_junk, tgt_in, mask), padded, atol=1e-10, rtol=0)
    # the unmasked batch does read those tokens: the check above can fail
    assert (m(src, tgt_in)[1] - padded[1]).abs().max() > 1e-6


def test_attention_weights_are_the_alignment_equation():
    """alpha_ij = softmax_j v_a^T tanh(W_s s_{i-1} + W_h h_j), with s_{i-1} recomputed step by step."""
    m = search()
    src, mask, tgt_in = padded_batch()
    _, alpha = m(src, tgt_in, mask, return_attention=True)
    h = m.encode(src, mask)
    s = m.init_state(h)
    score = m.score
    e = m.tgt_embed(tgt_in)
    for i in range(tgt_in.shape[1]):
        energies = (torch.tanh(score.W_s(s)[:, None, :] + score.W_h(h)) @ score.v_a.weight[0])  # [B, N]
        expected = torch.softmax(energies.masked_fill(~mask, float("-inf")), -1)
        torch.testing.assert_close(alpha[:, i], expected, atol=1e-12, rtol=0)
        c = (expected[:, :, None] * h).sum(1)
        s = m.cell(torch.cat([e[:, i], c], -1), s)


# ---------------------------------------------------------------------------------------------
# RNNenc: the source only through c
# ---------------------------------------------------------------------------------------------


def _swap_final_state(model, final_state):
    """A forward hook making the encoder GRU report ``final_state`` as its last state (outputs untouched)."""
    return model.encoder.register_forward_hook(lambda mod, args, out: (out[0], final_state))


def test_rnnenc_decoder_sees_the_source_only_through_c():
    """Source B with source A's final encoder state gives exactly A's output; RNNsearch does not."""
    torch.manual_seed(2)
    src_a, src_b = torch.randint(3, V, (1, 6)), torch.randint(3, V, (1, 6))
    tgt_in = torch.randint(3, V, (1, 5))
    for m, only_through_c in ((enc(), True), (search(), False)):
        out_a, out_b = m(src_a, tgt_in), m(src_b, tgt_in)
        assert (out_a - out_b).abs().max() > 1e-3
        _, h_a = m.encoder(m.src_embed(src_a))
        handle = _swap_final_state(m, h_a)
        out_b_with_c_a = m(src_b, tgt_in)
        handle.remove()
        if only_through_c:
            torch.testing.assert_close(out_b_with_c_a, out_a, atol=0, rtol=0)
        else:
            torch.testing.assert_close(out_b_with_c_a, out_b, atol=0, rtol=0)
    # the memory of RNNenc is c alone: [B, 1, H_enc]
    assert enc().encode(src_a).shape == (1, 1, 5)


def test_rnnenc_context_gradient_reaches_every_source_token():
    """c = h_N depends on the whole source: d logits / d E[x_j] != 0 for every j (through c alone)."""
    m = enc()
    src = torch.randint(3, V, (1, 6))
    emb = m.src_embed(src).detach().requires_grad_()
    _, c = m.encoder(emb)
    logits = m.decode(torch.randint(3, V, (1, 4)), c.transpose(0, 1))
    logits.sum().backward()
    assert torch.all(emb.grad.abs().sum(-1) > 0)


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [enc, search], ids=["rnnenc", "rnnsearch"])
def test_greedy_equals_argmax_of_teacher_forced_logits(make):
    m = make()
    src, mask, _ = padded_batch()
    out = m.greedy(src, mask, bos_id=1, max_new_tokens=7)
    assert out.shape == (2, 8) and torch.all(out[:, 0] == 1)
    logits = m(src, out[:, :-1], mask)
    assert torch.equal(logits.argmax(-1), out[:, 1:])


@pytest.mark.parametrize("make", [enc, search], ids=["rnnenc", "rnnsearch"])
def test_beam_of_one_is_greedy_and_cached_beams_equal_uncached(make):
    m = make()
    src, mask, _ = padded_batch()
    for eos in (None, 2):
        greedy = m.greedy(src, mask, bos_id=1, max_new_tokens=7, eos_id=eos, pad_id=0)
        one = m.beam(src, mask, bos_id=1, beam_size=1, max_new_tokens=7, eos_id=eos, pad_id=0)
        assert torch.equal(one.sequences, greedy[:, : one.sequences.shape[1]])
    beams = 3
    cached = m.beam(src, mask, bos_id=1, beam_size=beams, max_new_tokens=7, eos_id=2)
    memory = m.encode(src, mask)  # the Transformer's protocol: decoder_step(memory, src_mask)
    step = m.decoder_step(expand_for_beams(memory, beams), expand_for_beams(mask, beams))
    uncached = beam_search(step, torch.ones(2, 1, dtype=torch.long), beam_size=beams, max_new_tokens=7, eos_id=2,
                           use_cache=False)  # fmt: skip
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-10, rtol=0)


def test_decode_in_pieces_with_a_cache_equals_one_pass():
    m = search()
    src, mask, tgt_in = padded_batch()
    memory = m.encode(src, mask)
    full, alpha = m.decode(tgt_in, memory, mask, return_attention=True)
    cache = m.new_cache()
    first = m.decode(tgt_in[:, :2], memory, mask, cache=cache)
    rest, alpha_rest = m.decode(tgt_in[:, 2:], memory, mask, cache=cache, return_attention=True)
    assert cache.length == 5
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-12, rtol=0)
    torch.testing.assert_close(alpha_rest, alpha[:, 2:], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# errors, registry, presets
# ---------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(ConfigError, match="score: unknown value 'additiv' \\(did you mean 'additive'\\?\\)"):
        RNNsearchConfig(**SIZES, score="additiv")
    with pytest.raises(ConfigError, match="score: unknown value 'luong'; known: additive, content, dot"):
        RNNsearchConfig(**SIZES, score="luong")
    with pytest.raises(ConfigError, match=r"score='dot' .* d_decoder=7 must equal 2 \* d_encoder = 10"):
        RNNsearchConfig(**SIZES, score="dot")
    with pytest.raises(ConfigError, match="d_maxout=0 must be > 0"):
        RNNencConfig(**{**SIZES, "d_maxout": 0})
    with pytest.raises(ConfigError, match="grad_clip=-1 must be > 0"):
        RNNencConfig(**SIZES, grad_clip=-1)
    assert RNNsearchConfig().grad_clip == 1.0 and RNNencConfig(**SIZES, grad_clip=None).grad_clip is None
    with pytest.raises(ConfigError, match="RNNenc needs an RNNencConfig, got RNNsearchConfig"):
        RNNenc(RNNsearchConfig(**SIZES))


def test_input_errors_before_any_computation():
    m = search(score="location")
    src, mask, tgt_in = padded_batch()
    with pytest.raises(ShapeError, match=r"src_ids holds token id 23, outside the vocabulary: .*vocab_size=23"):
        m(torch.tensor([[3, 23]]), tgt_in[:1])
    with pytest.raises(ShapeError, match="tgt_in holds token id -4"):
        m(src, torch.tensor([[1, -4], [1, 2]]), mask)
    with pytest.raises(ShapeError, match=r"src_mask must be \[B, N\] = \[2, 6\] like src_ids .*got \(2, 5\)"):
        m(src, tgt_in, mask[:, :5])
    with pytest.raises(ShapeError, match="recurrent models need right padding"):
        m(src, tgt_in, mask.flip(1))
    with pytest.raises(ShapeError, match="src_ids has batch 2 but tgt_in has batch 1"):
        m(src, tgt_in[:1], mask)
    with pytest.raises(ShapeError, match="src_ids has N=13 tokens .* max_src_len=12"):
        m(torch.randint(3, V, (1, 13)), tgt_in[:1])
    with pytest.raises(ConfigError, match=r"bos_id=23 must be a token id in \[0, vocab_size=23\)"):
        m.greedy(src, mask, bos_id=23, max_new_tokens=3)
    with pytest.raises(ConfigError, match="beam_size=0 must be an int >= 1"):
        m.beam(src, mask, bos_id=1, beam_size=0, max_new_tokens=3)
    with pytest.raises(ShapeError, match=r"memory must be the encoder output \[B=2, N, 10\]"):
        m.decode(tgt_in, torch.zeros(2, 6, 7, dtype=F64))
    with pytest.raises(ShapeError, match=r"RNNenc's memory is the one context vector c, \[B, 1, 5\]"):
        enc().decode(tgt_in, torch.zeros(2, 6, 5, dtype=F64))


def test_registry_presets_and_sizes():
    assert FAMILIES["rnnenc"].task == FAMILIES["rnnsearch"].task == "seq2seq"
    with torch.device("meta"):
        big = build_model("rnnsearch-50")
    assert big.encoder.bidirectional and big.encoder.hidden_size == 1000
    assert big.score.v_a.weight.shape == (1, 1000) and big.lm_head.weight.shape == (30000, 500)
    assert build_model("rnnsearch-small", score="general").score.W_a.weight.shape == (64, 128)  # W_a [d_q, d_h]


def copy_batch(gen, b=16, n=6, vocab=64):
    src = torch.randint(3, vocab, (b, n), generator=gen)
    tgt = torch.cat([src, torch.full((b, 1), 2)], 1)  # copy, then eos
    tgt_in = torch.cat([torch.full((b, 1), 1), src], 1)
    return src, tgt_in, tgt


@pytest.mark.parametrize("preset", ["rnnenc-small", "rnnsearch-small"])
def test_preset_trains_a_few_steps(preset):
    torch.manual_seed(0)
    m = build_model(preset).train()
    gen = torch.Generator().manual_seed(0)
    src, tgt_in, tgt = copy_batch(gen)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(m(src, tgt_in).flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# slow: learning to reverse strings
# ---------------------------------------------------------------------------------------------

PAD, BOS, EOS, LETTERS = 0, 1, 2, 10


def reversal_batch(gen, b, lo=3, hi=8):
    """Sources of ``lo..hi`` letters (right-padded); targets the reversed letters then EOS."""
    lengths = torch.randint(lo, hi + 1, (b,), generator=gen)
    n = int(lengths.max())
    mask = torch.arange(n)[None] < lengths[:, None]
    src = torch.randint(3, 3 + LETTERS, (b, n), generator=gen).masked_fill(~mask, PAD)
    tgt = torch.full((b, n + 1), PAD)
    for i, length in enumerate(lengths.tolist()):
        tgt[i, :length] = src[i, :length].flip(0)
        tgt[i, length] = EOS
    shifted = tgt[:, :-1].masked_fill(tgt[:, :-1] == EOS, PAD)
    tgt_in = torch.cat([torch.full((b, 1), BOS), shifted], 1)  # teacher forcing: BOS, y_1, ..., y_{M-1}
    return src, mask, tgt_in, tgt


def exact_match(m, n=500, seed=1) -> float:
    src, mask, _, tgt = reversal_batch(torch.Generator().manual_seed(seed), n)
    out = m.greedy(src, mask, bos_id=BOS, max_new_tokens=tgt.shape[1], eos_id=EOS, pad_id=PAD)[:, 1:]
    out = F.pad(out, (0, max(0, tgt.shape[1] - out.shape[1])), value=PAD)[:, : tgt.shape[1]]
    return (out == tgt).all(1).float().mean().item()


def train_reversal(preset: str, steps: int, **overrides) -> float:
    """``steps`` AdamW steps (lr 3e-3, cosine-decayed to 0) on batches of 64 reversals; exact match after.

    The decay matters: at a constant 3e-3 the exact match at a given step rides on loss spikes (RNNsearch with
    the general score: 0.99 at step 200, 0.896 at step 300 with AVX-512 kernels, 0.998 with AVX2 kernels);
    decayed, the run ends settled (>= 0.998 for every score, with either kernel set)."""
    torch.manual_seed(0)
    m = build_model(preset, vocab_size=3 + LETTERS, **overrides).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        src, mask, tgt_in, tgt = reversal_batch(gen, 64)
        loss = F.cross_entropy(m(src, tgt_in, mask).flatten(0, 1), tgt.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        schedule.step()
    return exact_match(m.eval())


@pytest.mark.slow
def test_rnnsearch_learns_reversal_and_beats_rnnenc_on_the_same_budget():
    """600 AdamW steps of 64 strings of 3-8 letters: RNNsearch >= 90% exact match, RNNenc well below."""
    search_em = train_reversal("rnnsearch-small", 600)
    enc_em = train_reversal("rnnenc-small", 600)
    print(f"\nreversal exact match after 600 steps: RNNsearch {search_em:.3f}, RNNenc {enc_em:.3f}")
    assert search_em >= 0.9
    assert enc_em < search_em


@pytest.mark.slow
@pytest.mark.parametrize("score,overrides", [("general", {}), ("dot", {"d_decoder": 128}), ("location", {})])
def test_rnnsearch_with_luong_scores_learns_reversal(score, overrides):
    em = train_reversal("rnnsearch-small", 300, score=score, **overrides)
    print(f"\nreversal exact match after 300 steps, score={score}: {em:.3f}")
    assert em >= 0.9
