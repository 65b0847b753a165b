"""Generation: greedy (cached == uncached == Hugging Face), left padding, sampling, top-k/top-p, stop
tokens, beam search (== greedy at beam 1, == Hugging Face's num_beams, better than greedy where it must be),
and the step protocol with an encoder-decoder style cross-attention cache."""

from __future__ import annotations

import math

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.generation import (
    beam_search,
    expand_for_beams,
    filter_logits,
    generate,
    generate_batch,
    greedy_next,
    sample_next,
    stream,
)
from archlab.models.gpt import GPT, GPTConfig
from archlab.models.llama import Llama, LlamaConfig
from archlab.nn import Decoder

V = 23


def gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=V, max_len=64, d_model=32, n_heads=4, n_layers=2, dropout=0.0, attn_dropout=0.0)
    m = GPT(GPTConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # peaky, varied next-token distributions instead of GPT-2 init's near-uniform ones
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


@pytest.fixture(scope="module")
def pair():
    """An HF GPT2LMHeadModel and the archlab GPT with the same weights."""
    transformers = pytest.importorskip("transformers")
    from archlab.interop.gpt2 import archlab_state_from_gpt2, config_from_gpt2

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
        bos_token_id=0, eos_token_id=1, pad_token_id=5,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = GPT(config_from_gpt2(hf.config.to_dict())).eval()
    ours.load_state_dict(archlab_state_from_gpt2(hf.state_dict()))
    return hf, ours


def left_padded_prompts(seed: int = 1):
    """Three prompts of lengths 4, 6, 2, left-padded to 6 with id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ---------------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------------


def test_greedy_cached_equals_uncached_equals_hugging_face(pair):
    hf, ours = pair
    ids, mask = left_padded_prompts()
    cached = generate(ours, ids, attention_mask=mask, max_new_tokens=20)
    uncached = generate(ours, ids, attention_mask=mask, max_new_tokens=20, use_cache=False)
    with torch.no_grad():
        reference = hf.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=5
        )
    assert cached.shape == (3, 26)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)
    assert len(set(cached[:, 6:].flatten().tolist())) > 4  # not a degenerate repetition


def test_stop_tokens_end_rows_like_hugging_face(pair):
    hf, ours = pair
    ids, mask = left_padded_prompts()
    free = generate(ours, ids, attention_mask=mask, max_new_tokens=20)
    stop = int(free[1, 6 + 3])  # the 4th token row 1 generates becomes the stop token
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=20, stop_tokens=[stop], pad_id=5)
    with torch.no_grad():
        reference = hf.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=stop, pad_token_id=5
        )
    assert torch.equal(out, reference)
    for row in range(3):
        new = out[row, 6:].tolist()
        if stop in new:
            end = new.index(stop)
            assert all(t == 5 for t in new[end + 1 :])
            assert new[: end + 1] == free[row, 6 : 6 + end + 1].tolist()  # identical up to the stop
    assert out[1, 6 + 3] == stop


def test_generation_ends_when_every_row_stopped():
    m = gpt()
    ids = torch.randint(2, V, (2, 3))
    free = generate(m, ids, max_new_tokens=10)
    stops = {int(free[0, 3]), int(free[1, 3])}  # each row's first new token
    out = generate(m, ids, max_new_tokens=10, stop_tokens=stops, pad_id=0)
    assert torch.equal(out, free[:, :4])


@pytest.mark.parametrize("positional", ["learned", "rope", "alibi", "sinusoidal"])
def test_left_padded_batch_equals_each_row_alone(positional):
    m = gpt(positional=positional)
    ids, mask = left_padded_prompts()
    batch = generate(m, ids, attention_mask=mask, max_new_tokens=12)
    for row in range(3):
        real = ids[row : row + 1, mask[row].bool()]
        alone = generate(m, real, max_new_tokens=12)
        assert torch.equal(batch[row, 6:], alone[0, real.shape[1] :]), row


def decoder(family: str, seed: int = 2) -> GPT | Llama:
    """``gpt-learned``, ``gpt-rope`` or ``llama``, matrices ``N(0, 0.3)``: greedy decoding of seed 2 does not
    collapse into a repeated token for any of the three (with the norms randomised too, GPT's does)."""
    if family == "llama":
        m = Llama(LlamaConfig(vocab_size=V, max_len=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=48))
    else:
        m = GPT(GPTConfig(vocab_size=V, max_len=64, d_model=32, n_heads=4, n_layers=2, positional=family[4:]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return m.eval()


@pytest.mark.parametrize("family", ["gpt-learned", "gpt-rope", "llama"])
def test_generate_batch_equals_one_prompt_at_a_time(family):
    m = decoder(family)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (5, 1, 8, 3)]

    def alone(prompt, **options):
        return generate(m, torch.tensor([prompt]), max_new_tokens=15, **options)[0, len(prompt) :].tolist()

    free = [alone(p) for p in prompts]
    assert sum(len(set(row)) for row in free) > 16  # varied rows, not one repeated token
    assert generate_batch(m, prompts, max_new_tokens=15) == free
    stops = [free[0][2], free[2][6]]  # rows end at different steps (or run to max_new_tokens)
    stopped = [alone(p, stop_tokens=stops, pad_id=0) for p in prompts]
    assert len({len(row) for row in stopped}) >= 2 and min(len(row) for row in stopped) <= 3
    assert generate_batch(m, prompts, max_new_tokens=15, stop_tokens=stops) == stopped


def test_generate_batch_samples_reproducibly_and_checks_its_prompts():
    m = gpt()
    prompts = [[3, 4, 5], [6]]
    first = generate_batch(m, prompts, max_new_tokens=8, do_sample=True, temperature=0.9, seed=4)
    assert first == generate_batch(m, prompts, max_new_tokens=8, do_sample=True, temperature=0.9, seed=4)
    assert [len(row) for row in first] == [8, 8]
    for bad, message in [([], "non-empty list"), ([[1, 2], []], r"prompts\[1\]"), ([[1, -2]], r"prompts\[0\]\[j\]=-2"),
                         (torch.ones(2, 3, dtype=torch.long), "non-empty list"), (["ab"], r"prompts\[0\]")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            generate_batch(m, bad, max_new_tokens=4)


def test_max_new_tokens_zero_returns_the_prompt():
    m = gpt()
    ids = torch.randint(0, V, (2, 4))
    assert torch.equal(generate(m, ids, max_new_tokens=0), ids)
    assert torch.equal(beam_search(m, ids, beam_size=3, max_new_tokens=0).sequences, ids)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    m = gpt()
    ids = torch.randint(0, V, (3, 4))
    a = generate(m, ids, max_new_tokens=15, do_sample=True, seed=7)
    b = generate(m, ids, max_new_tokens=15, do_sample=True, seed=7)
    c = generate(m, ids, max_new_tokens=15, do_sample=True, seed=8)
    uncached = generate(m, ids, max_new_tokens=15, do_sample=True, seed=7, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, uncached)
    assert not torch.equal(a, c)
    greedy = generate(m, ids, max_new_tokens=15)
    assert not torch.equal(a, greedy)
    assert torch.equal(generate(m, ids, max_new_tokens=15, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(generate(m, ids, max_new_tokens=15, do_sample=True, temperature=1e-4, seed=3), greedy)


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([0.125, 0.5, 0.05, 0.25, 0.075])  # descending: ids 1, 3, 0, 4, 2
    logits = probs.log()[None]  # mass before each, in that order: 0, 0.5, 0.75, 0.875, 0.95
    cases = [(0.3, {1}), (0.7, {1, 3}), (0.8, {1, 3, 0}), (0.9, {1, 3, 0, 4}), (0.96, {0, 1, 2, 3, 4}),
             (1.0, {0, 1, 2, 3, 4})]  # fmt: skip
    for top_p, kept in cases:
        filtered = filter_logits(logits, top_p=top_p)[0]
        assert set(torch.nonzero(filtered.isfinite()).flatten().tolist()) == kept, top_p
        assert probs[sorted(kept)].sum() >= top_p - 1e-6  # the nucleus reaches p ...
        assert probs[sorted(kept)].sum() - probs[sorted(kept)].min() < top_p  # ... and no smaller one does
        torch.testing.assert_close(filtered[sorted(kept)].softmax(-1), probs[sorted(kept)] / probs[sorted(kept)].sum())


def test_top_k_and_temperature_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, [0, 3]]).all()
    assert torch.equal(filter_logits(logits, top_k=2)[0, [1, 2]], logits[0, [1, 2]])
    assert torch.equal(filter_logits(logits, top_k=10), logits)
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    # temperature first, then top-p: at T=0.5 token 1 alone carries > 0.8 of the mass
    assert set(torch.nonzero(filter_logits(logits, temperature=0.5, top_p=0.8)[0].isfinite()).flatten().tolist()) == {1}


def test_sampling_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(6000, 3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, generator=g), minlength=3) / 6000
    torch.testing.assert_close(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)
    counts = torch.bincount(sample_next(logits, top_k=2, generator=g), minlength=3) / 6000
    torch.testing.assert_close(counts, torch.tensor([2 / 3, 1 / 3, 0.0]), atol=0.03, rtol=0)
    # one row's logits are [1, V]: a bare [V] (which torch.multinomial takes, returning a 0-d id) is refused
    for bad in (torch.zeros(3), torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long), [[0.0, 1.0]]):
        with pytest.raises(ShapeError, match=r"logits must be a float tensor \[B, V\], got"):
            sample_next(bad)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens=-1 must be an int >= 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), "top_k=0 must be an int >= 1"),
        (dict(do_sample=True, temperature=0.0), "temperature=0.0 must be a finite number > 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature=-1.0"),
        (dict(temperature=0.7), "only act when sampling: pass do_sample=True"),
        (dict(stop_tokens=[3]), r"stop_tokens=\[3\] needs pad_id"),
        (dict(pad_id=V), f"pad_id={V} is outside the model's vocabulary"),
        (dict(stop_tokens=[V + 4], pad_id=0), rf"stop_tokens\[0\]={V + 4} is outside"),
    ],
)
def test_generate_argument_errors(kwargs, message):
    m = gpt()
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate(m, torch.zeros(1, 2, dtype=torch.long), **args)


def _spied(model):
    """``model`` whose forward passes (one per decoding step) are counted in ``model.steps``."""
    model.steps = 0
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))  # every step embeds its tokens
    embedding.register_forward_pre_hook(lambda *_: setattr(model, "steps", model.steps + 1))
    return model


@pytest.mark.parametrize("search", ["generate", "beam_search"])
def test_a_prompt_plus_new_tokens_past_a_hard_context_is_refused_before_decoding(search):
    """A learned position table (GPT) or a trained context (Llama) ends at max_len = 64: decoding 3 + 63 tokens
    feeds 65 positions (the last new token is not fed back)."""
    from archlab.models import build_model

    run = {"generate": lambda m, n: generate(m, torch.ones(1, 3, dtype=torch.long), max_new_tokens=n),
           "beam_search": lambda m, n: beam_search(m, torch.ones(1, 3, dtype=torch.long), beam_size=2,
                                                  max_new_tokens=n).sequences}
    torch.manual_seed(0)
    for model in (gpt(), build_model("llama-tiny", vocab_size=V, max_len=64).eval()):
        _spied(model)
        with pytest.raises(ConfigError, match=rf"prompt's 3 tokens \+ max_new_tokens=63 read 65 positions .* past the "
                                              rf"context of {type(model).__name__} \(max_len=64\): max_new_tokens <= 62"):
            run[search](model, 63)
        assert model.steps == 0  # refused before the first step
        assert run[search](model, 62).shape[1] <= 65  # the whole context is usable


def test_a_prompt_alone_past_the_context_says_to_shorten_the_prompt():
    """3 new tokens after a 70-token prompt on max_len=64: the prompt is the problem (no max_new_tokens >= 1 fits)."""
    m = _spied(gpt())
    for run in (lambda: generate(m, torch.ones(1, 70, dtype=torch.long), max_new_tokens=3),
                lambda: generate_batch(m, [[1] * 70, [2]], max_new_tokens=3)):  # fmt: skip
        with pytest.raises(ConfigError, match=r"the prompt's 70 tokens are past the context of GPT \(max_len=64\) "
                                              r"before any new token: shorten the prompt to at most 64 tokens"):
            run()
    assert m.steps == 0
    assert generate(m, torch.ones(1, 70, dtype=torch.long), max_new_tokens=0).shape == (1, 70)  # nothing to read


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing(temperature):
    """logits / 1e-40 overflowed to inf, inf - inf = NaN probabilities, and torch.multinomial raised a RuntimeError."""
    m = gpt()
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    sampled = generate(m, ids, max_new_tokens=6, do_sample=True, temperature=temperature, seed=1)
    assert torch.equal(sampled, generate(m, ids, max_new_tokens=6))
    logits = torch.tensor([[30.0, -5.0, 29.0, float("-inf")]])
    filtered = filter_logits(logits, temperature=temperature)
    assert not filtered.isnan().any() and filtered[0, 0] == 0 and filtered[0, 1:].eq(float("-inf")).all()
    torch.testing.assert_close(filter_logits(logits, temperature=0.5).softmax(-1), (logits / 0.5).softmax(-1))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(stop_tokens=3, pad_id=0), ConfigError, r"stop_tokens=3 must be a list of token ids \(empty: none\)"),
        (dict(stop_tokens=None), ConfigError, r"stop_tokens=None must be a list of token ids"),
        (dict(stop_tokens="12", pad_id=0), ConfigError, r"stop_tokens='12' must be a list of token ids"),
        (dict(attention_mask=[[1, 1, 1]]), ShapeError, r"attention_mask must match input_ids \(1, 3\), got list"),
        (dict(attention_mask=torch.tensor([[1, 1, 0]])), ShapeError,
         r"attention_mask row 0 = \[1, 1, 0\] is not left-padded: each row must be 0s \(padding\) then 1s"),
        (dict(attention_mask=torch.tensor([[1, 0, 1]])), ShapeError, r"row 0 = \[1, 0, 1\] is not left-padded"),
        (dict(attention_mask=torch.zeros(1, 3, dtype=torch.long)), ShapeError, r"row 0 = \[0, 0, 0\] is not left"),
    ],
)
def test_wrong_kinds_of_stop_tokens_and_masks_are_refused_before_decoding(kwargs, error, message):
    """A bare int or None as stop_tokens was a TypeError, a list as mask an AttributeError; a right-padded or
    all-padding mask continued from a padding position: a silently wrong continuation."""
    m = _spied(gpt())
    for run in (lambda: generate(m, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, **kwargs),
                lambda: stream(m, torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, **kwargs)):  # fmt: skip
        with pytest.raises(error, match=message):
            run()
    if "attention_mask" in kwargs:
        with pytest.raises(error, match=message.replace("input_ids", "start_tokens")):
            beam_search(m, torch.ones(1, 3, dtype=torch.long), beam_size=2, max_new_tokens=2, **kwargs)
    assert m.steps == 0
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert generate(m, torch.ones(2, 3, dtype=torch.long), max_new_tokens=2, attention_mask=left).shape == (2, 5)


def test_positions_without_a_hard_limit_generate_past_max_len():
    """RoPE and ALiBi GPTs (relative positions) are not limited by max_len."""
    for positional in ("rope", "alibi"):
        model = gpt(positional=positional, max_len=8)
        assert generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=20).shape == (1, 23)


def test_protocol_errors():
    m = gpt()
    ids = torch.zeros(1, 2, dtype=torch.long)
    step = m.decoder_step()
    with pytest.raises(ConfigError, match="bare step needs the cache"):
        generate(step, ids, max_new_tokens=2)
    with pytest.raises(ConfigError, match="attention_mask is used with a model"):
        generate(step, ids, max_new_tokens=2, attention_mask=torch.ones_like(ids), use_cache=False)
    with pytest.raises(ConfigError, match="has no decoder_step"):
        generate(torch.nn.Linear(2, 2), ids, max_new_tokens=2)
    with pytest.raises(ShapeError, match="input_ids must be a"):
        generate(m, ids[0], max_new_tokens=2)
    with pytest.raises(ShapeError, match="attention_mask must match"):
        generate(m, ids, max_new_tokens=2, attention_mask=torch.ones(1, 3))
    with pytest.raises(ConfigError, match="beam_size=0"):
        beam_search(m, ids, beam_size=0, max_new_tokens=2)
    assert torch.equal(generate(step, ids, max_new_tokens=2, cache=m.new_cache()), generate(m, ids, max_new_tokens=2))


# ---------------------------------------------------------------------------------------------
# beam search
# ---------------------------------------------------------------------------------------------


def test_beam_size_1_is_greedy():
    m = gpt()
    ids = torch.randint(2, V, (3, 4))
    greedy = generate(m, ids, max_new_tokens=12)
    assert torch.equal(beam_search(m, ids, beam_size=1, max_new_tokens=12).sequences, greedy)
    stop = int(greedy[0, 7])
    greedy_stop = generate(m, ids, max_new_tokens=12, stop_tokens=[stop], pad_id=0)
    beam = beam_search(m, ids, beam_size=1, max_new_tokens=12, eos_id=stop, pad_id=0).sequences
    assert torch.equal(beam, greedy_stop[:, : beam.shape[1]])


@pytest.mark.parametrize(("beam_size", "length_penalty"), [(3, 1.0), (4, 0.5), (4, 2.0), (2, 0.0)])
def test_beam_search_matches_hugging_face(pair, beam_size, length_penalty):
    hf, ours = pair
    ids, mask = left_padded_prompts()
    ours_out = beam_search(ours, ids, attention_mask=mask, beam_size=beam_size, max_new_tokens=12,
                           length_penalty=length_penalty, eos_id=1, pad_id=5)  # fmt: skip
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=beam_size,
                          length_penalty=length_penalty, early_stopping=False, eos_token_id=1, pad_token_id=5,
                          return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert torch.equal(ours_out.sequences, ref.sequences)
    torch.testing.assert_close(ours_out.scores, ref.sequences_scores, atol=1e-5, rtol=0)
    uncached = beam_search(ours, ids, attention_mask=mask, beam_size=beam_size, max_new_tokens=12,
                           length_penalty=length_penalty, eos_id=1, pad_id=5, use_cache=False)  # fmt: skip
    assert torch.equal(uncached.sequences, ours_out.sequences)


def markov_step(table: torch.Tensor):
    """A step whose next-token log-probabilities depend only on the last token: ``table [V, V]``."""

    def step(tokens, cache=None):
        return table[tokens]  # [B, n, V]

    return step


def test_beam_search_finds_what_greedy_misses():
    # 0 = start, 1 = eos. Greedy takes 2 (p=0.6) and then faces a flat 0.25 choice;
    # beam search finds 3 (p=0.4) followed by a sure eos: 0.4 > 0.6 * 0.25.
    p = torch.full((5, 5), 1e-9)
    p[0, 2], p[0, 3] = 0.6, 0.4
    p[2, 1:5] = 0.25
    p[3, 1] = 1.0
    p[4, 1] = 1.0
    table = (p / p.sum(-1, keepdim=True)).log()
    start = torch.zeros(1, 1, dtype=torch.long)
    greedy = generate(markov_step(table), start, max_new_tokens=2, use_cache=False)
    assert greedy.tolist() == [[0, 2, 1]]  # first of the tied 0.25s
    out = beam_search(markov_step(table), start, beam_size=2, max_new_tokens=4, eos_id=1, length_penalty=0.0,
                      use_cache=False)  # fmt: skip
    assert out.sequences.tolist() == [[0, 3, 1]]
    assert out.scores.item() == pytest.approx(math.log(0.4), abs=1e-6)
    # length_penalty=1 scores by the mean log-probability: same winner, score halved
    out = beam_search(markov_step(table), start, beam_size=2, max_new_tokens=4, eos_id=1, use_cache=False)
    assert out.scores.item() == pytest.approx(math.log(0.4) / 2, abs=1e-6)


def test_beam_search_over_an_encoder_decoder_step():
    """The enc-dec protocol: the caller expands memory by beam; the cache's cross-attention is reordered."""
    torch.manual_seed(0)
    d, vocab, beams = 16, 11, 3
    decoder = Decoder(2, d, 2, 32, cross_attention=True, norm_first=True).eval()
    embed, head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab)
    with torch.no_grad():
        for p in [*decoder.parameters(), *embed.parameters(), *head.parameters()]:
            p.normal_(0.0, 0.5)
    memory = torch.randn(2, 5, d)
    memory_mask = torch.ones(2, 5, dtype=torch.bool)
    memory_mask[1, 3:] = False

    def decoder_step(memory, memory_mask):
        key_mask = memory_mask[:, None, None, :]

        def step(tokens, cache=None):
            offset = 0 if cache is None else cache.length
            x = embed(tokens) + torch.arange(offset, offset + tokens.shape[1])[:, None] * 0.01
            return head(decoder(x, memory, memory_mask=key_mask, cache=cache))

        return step

    step = decoder_step(expand_for_beams(memory, beams), expand_for_beams(memory_mask, beams))
    start = torch.zeros(2, 1, dtype=torch.long)
    cached = beam_search(step, start, beam_size=beams, max_new_tokens=8, eos_id=1, cache=decoder.new_cache())
    uncached = beam_search(step, start, beam_size=beams, max_new_tokens=8, eos_id=1, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-5, rtol=0)
    greedy = generate(decoder_step(memory, memory_mask), start, max_new_tokens=8, cache=decoder.new_cache())
    one_step = decoder_step(memory, memory_mask)
    one_beam = beam_search(one_step, start, beam_size=1, max_new_tokens=8, cache=decoder.new_cache())
    assert torch.equal(one_beam.sequences, greedy)


def test_threaded_decoding_products_equal_the_plain_ones(monkeypatch):
    """Decoding on 2 threads splits each few-row product across them (archlab.nn.linear) and reads a
    packed LM head from the cache; logits equal the one-thread plain products and so do the tokens."""
    import archlab.nn.linear as linear_module

    monkeypatch.setattr(linear_module, "MIN_SPLIT_ELEMENTS", 0)  # split even this small model's matrices
    before = torch.get_num_threads()
    m = gpt(vocab_size=24).double()  # 24 rows divide into 2 blocks
    ids = torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(3))

    def decode(threads):
        torch.set_num_threads(threads)
        cache = m.new_cache()
        with torch.no_grad():
            logits = [m(ids, cache=cache)] + [m(ids[:, i : i + 1], cache=cache) for i in range(5)]
        assert (cache.output.blocks is None) == (threads == 1)
        return torch.cat(logits, dim=1), generate(m, ids, max_new_tokens=12)

    try:
        split_logits, split_tokens = decode(2)
        plain_logits, plain_tokens = decode(1)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(split_logits, plain_logits, rtol=1e-12, atol=1e-12)
    assert torch.equal(split_tokens, plain_tokens)


# ---------------------------------------------------------------------------------------------
# logits_to_keep: generation projects only the last position
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 3, 6, 50])
def test_logits_to_keep_is_the_last_positions_of_the_full_logits(keep):
    m = gpt().double()
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
        kept = m(ids, attention_mask=mask, logits_to_keep=keep)
        cache = m.new_cache()
        m(ids[:, :4], attention_mask=mask[:, :4], cache=cache)
        cached = m(ids[:, 4:], attention_mask=mask, cache=cache, logits_to_keep=keep)
    assert kept.shape == (3, min(keep, 6), V)
    torch.testing.assert_close(kept, full[:, -keep:], rtol=0, atol=1e-12)
    torch.testing.assert_close(cached, full[:, 4:][:, -keep:], rtol=0, atol=1e-12)


def test_generate_projects_only_the_last_position(pair, monkeypatch):
    """The prompt's prefill sends 1 row per sequence through the LM head, not all n0; tokens still equal HF's."""
    from archlab.nn.blocks import DecodingCache

    hf, ours = pair
    ids, mask = left_padded_prompts()
    rows, project = [], DecodingCache.project
    monkeypatch.setattr(DecodingCache, "project", lambda self, h, head: rows.append(h.shape[1]) or project(self, h, head))
    tokens = generate(ours, ids, attention_mask=mask, max_new_tokens=5)
    assert rows == [1] * 5
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=5)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "1"])
def test_logits_to_keep_must_be_a_positive_int(bad):
    m = gpt()
    ids = torch.randint(0, V, (1, 4))
    for call in (lambda: m(ids, logits_to_keep=bad), lambda: m.decoder_step(logits_to_keep=bad)):
        with pytest.raises(ConfigError, match=f"logits_to_keep={bad!r} must be an int >= 1"):
            call()
    with pytest.raises(ConfigError, match="logits_to_keep"):
        m(ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(49152,), (1, 49152), (10, 49152), (3, 2, 7)])
def test_greedy_next_is_argmax_first_of_ties(dtype, shape):
    """Logits drawn from 5 values (ties everywhere) and a NaN row: ``greedy_next`` gives ``argmax``'s index, the
    first of equal maxima, in every precision the decoders run (bf16 near-ties are common: 8-bit logits)."""
    g = torch.Generator().manual_seed(len(shape) * 31 + shape[-1])
    for _ in range(5):
        x = torch.randint(0, 5, shape, generator=g).to(dtype)
        got = greedy_next(x)
        assert got.shape == shape[:-1] and got.dtype == torch.int64
        assert torch.equal(got, x.argmax(-1))
        first = (x == x.max(-1, keepdim=True).values).int().argmax(-1)  # the first position holding the maximum
        assert torch.equal(got, first)
        x.view(-1, shape[-1])[0, shape[-1] // 2] = float("nan")
        assert torch.equal(greedy_next(x), x.argmax(-1))
