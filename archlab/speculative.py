r"""Speculative (draft-and-verify) decoding: a cheap draft proposes ``k`` tokens, the model checks them in one pass.

One round, for the sequence ``x`` so far (prompt + generated):

1. a draft proposes ``d_1 .. d_k`` with the distributions ``q_1 .. q_k`` it drew them from (a deterministic
   draft, such as prompt lookup, has a one-hot ``q_i``);
2. the model (the *target*) reads ``x``'s last token and ``d_1 .. d_k`` in one forward pass over its KV cache,
   giving ``p_1 .. p_{k+1}`` (``p_i``: its next-token distribution after ``x, d_1 .. d_{i-1}``);
3. ``d_i`` is accepted while ``u_i < p_i(d_i) / q_i(d_i)``, ``u_i ~ U(0, 1)``, i.e. with probability
   ``min(1, p/q)``; the first rejected position takes a token from ``norm(max(0, p_i - q_i))``, and when all
   ``k`` are accepted a bonus token comes from ``p_{k+1}``. Greedy decoding accepts ``d_i`` while it is
   ``argmax p_i`` and takes ``argmax p_i`` at the first mismatch;
4. the caches are cropped back to the accepted tokens (:meth:`archlab.nn.DecodingCache.crop`).

A round yields 1 to ``k + 1`` tokens for one pass of the target. The rule (Leviathan et al. 2023, Chen et
al. 2023) makes each token's distribution exactly the target's, whatever the draft: sampled output is
distributed as :func:`archlab.generation.generate` with ``do_sample=True`` (with the same ``temperature``,
``top_k``, ``top_p``, which act on ``p`` and on a draft model's ``q`` alike), and greedy output is
``generate``'s tokens. In float32 on a CPU with archlab's kernels (``k + 1 <= 12`` rows, 10 on AVX2
(:data:`archlab.nn.linear.KERNEL_FIRST_ROWS`): the products of :func:`archlab.kernels.f32_rows` and the attention of
:func:`archlab.kernels.cached_attention`, every other op row by row) a verify pass gives each position the logits
one-token steps give it, to the bit, so the tokens are equal near-ties included; elsewhere (other dtypes, devices,
wider passes) the target scores ``k + 1`` positions in one product instead of one at a time, so a near-tie may go the
other way. In bf16 (``precision="auto"`` on a CPU that computes bf16 natively) the two orders of rounding part
sooner: SmolLM2's greedy explanation of ``benchmarks/speculative.py``'s first abstract left plain greedy's at its 30th
token, so that benchmark and the equality tests decode in fp32. A good draft only makes it faster.

Drafts (:func:`make_draft` builds them from a name):

* ``"lookup"``, :class:`PromptLookup`: the longest recent n-gram of the text found earlier in the prompt or
  the text proposes what followed it there (2 tokens after a match of one token, ``k`` after a longer one); no model
  at all, and right often when the output quotes its input (explaining or summarising a given text, editing code);
* ``"layers:M"``, :class:`DraftModel` of :func:`first_layers`: the model's first ``M`` blocks with its final
  norm and LM head (the same weights, nothing copied); or any smaller model with the same vocabulary.

A verify pass multiplies ``k + 1`` rows by every weight, where a few rows cost little more than one: on archlab's
float32 kernel up to 12 rows, 10 on AVX2 (:func:`archlab.nn.linear.kernel_takes_rows`: the weights read in place),
else on oneDNN-packed copies of the weights (:func:`archlab.nn.linear.packed_for_rows`, made while decoding runs).

One sequence at a time here; many prompts verify their own drafts in one batch with
:func:`archlab.generation.generate_batch` (``draft="lookup"``) and :meth:`archlab.generation.RowBatch.verify`. The
target and a draft model need KV caches that can be cropped (GPT, Llama); other models are refused. The target may be
a compiled :class:`archlab.static_decoding.StaticDecoder` (its step and its verify pass each traced once; the same
tokens as its plain greedy decoding, in float32 and bfloat16 on archlab's kernels); a ``"layers:M"`` draft then
runs the decoder's model's first layers eagerly. Call ``model.eval()`` first if it has dropout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from archlab.errors import ConfigError, ShapeError
from archlab.generation import (
    _check_ids_in_vocab,
    _check_int,
    check_decoding,
    check_held,
    crop_to_shared,
    filter_logits,
    greedy_next,
    held_positions,
)
from archlab.models.decoder import DecoderLM
from archlab.nn.inputs import describe
from archlab.nn.linear import kernel_takes_rows, packed_for_rows

DRAFTS = ("lookup", "layers:M")  # the names make_draft knows
#: ``k``, the most tokens drafted per round by default (generate_speculative, Chat, the search explainer, the CLI):
#: on ``benchmarks/speculative.py``'s explanations prompt lookup gave 1.53x plain greedy at 5, 1.70x at 8, 1.74x at 12.
DRAFT_TOKENS = 8


@dataclasses.dataclass
class SpeculativeStats:
    """What a speculative run did; filled in as it decodes.

    Attributes:
        drafted: draft tokens the target checked.
        accepted: of those, the tokens kept.
        target_passes: forward passes of the target that produced tokens (plain decoding makes one per token;
            the prompt's prefill, which gives the first token, is one).
        draft_passes: forward passes of a draft model (0 for prompt lookup).
        generated: tokens yielded.
    """

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    draft_passes: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """``accepted / drafted``; None before anything was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_pass(self) -> float | None:
        """``generated / target_passes``: 1 for plain decoding, up to ``k + 1``."""
        return self.generated / self.target_passes if self.target_passes else None

    def as_dict(self) -> dict[str, Any]:
        rates = {"acceptance_rate": self.acceptance_rate, "tokens_per_pass": self.tokens_per_pass}
        return {**dataclasses.asdict(self), **rates}

    def summary(self) -> str:
        """One line: ``"12 of 20 drafted tokens accepted (60%), 1.80 tokens per pass of the model"``."""
        if not self.drafted:
            return f"nothing drafted; {self.generated} tokens in {self.target_passes} passes of the model"
        return (f"{self.accepted} of {self.drafted} drafted tokens accepted ({self.acceptance_rate:.0%}), "
                f"{self.tokens_per_pass:.2f} tokens per pass of the model")  # fmt: skip


class SpeculativeOutput(NamedTuple):
    """``sequences [1, n0 + t]`` (the prompt and its continuation) and the run's :class:`SpeculativeStats`."""

    sequences: Tensor
    stats: SpeculativeStats


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are chosen from logits, for the target and a draft model alike: greedy, or sampled after
    :func:`archlab.generation.filter_logits`, drawing from ``generator`` (None: the global RNG)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def probs(self, logits: Tensor) -> Tensor:
        """``logits [..., V] -> [..., V]``: the distribution tokens are sampled from."""
        filtered = filter_logits(logits.float(), temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return filtered.softmax(-1)

    def pick(self, logits: Tensor) -> tuple[int, Tensor | None]:
        """``logits [V]`` -> a token and the distribution ``q [V]`` it was drawn from (None when greedy)."""
        if not self.do_sample:
            return int(greedy_next(logits)), None
        q = self.probs(logits)
        return self.draw(q), q

    def draw(self, weights: Tensor) -> int:
        """One token from ``weights [V] >= 0`` (normalised here)."""
        return int(torch.multinomial(weights, 1, generator=self.generator))

    def uniform(self) -> float:
        device = None if self.generator is None else self.generator.device
        return float(torch.rand((), generator=self.generator, device=device))


class Draft(Protocol):
    """Proposes tokens to follow a sequence."""

    def propose(self, tokens: list[int], k: int, sampling: Sampling) -> tuple[list[int], Tensor | None]:
        """Up to ``k`` tokens to follow ``tokens`` (prompt + generated), and the distributions ``q [k', V]`` they
        were drawn from; ``None``: each was certain (a one-hot ``q``). May propose none."""
        ...


# ================================================================================================
# Drafts
# ================================================================================================


def prompt_lookup(tokens: Sequence[int], k: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """The ``<= k`` tokens that followed the longest match of ``tokens``' last ``n <= max_ngram`` tokens earlier
    in ``tokens`` (the most recent match of that length); ``[]`` when no match has ``min_ngram`` tokens or more
    (with ``min_ngram=1``: when the last token never occurred before).

    ``[5, 1, 2, 3, 9, 1, 2]``, ``k=2``: the suffix ``1 2`` occurred at 1..2, followed by ``3 9``: returns ``[3, 9]``.
    """
    length, end = longest_match(tokens, max_ngram)
    return [] if length < min_ngram else list(tokens[end + 1 : end + 1 + k])


def longest_match(tokens: Sequence[int], max_ngram: int) -> tuple[int, int]:
    """``(n, j)``: the longest suffix of ``tokens`` of ``n <= max_ngram`` tokens that also ends earlier, at ``j``
    (the most recent such place); ``(0, -1)`` when the last token never occurred before."""
    n, last = len(tokens), tokens[-1] if tokens else None
    best_len, best_end = 0, -1
    for j in range(n - 2, -1, -1):  # earlier places of the last token, most recent first
        if tokens[j] != last:
            continue
        m = 1
        while m < max_ngram and j - m >= 0 and tokens[j - m] == tokens[n - 1 - m]:
            m += 1
        if m > best_len:
            best_len, best_end = m, j
            if m == max_ngram:
                break
    return best_len, best_end


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Draft by copying (:func:`prompt_lookup`): what followed the longest earlier match of the text's last
    ``min_ngram`` to ``max_ngram`` tokens, up to ``k`` tokens, or up to ``one_token_drafts`` after a match of the
    last token alone (with ``min_ngram=1``).

    Measured on the explanations of ``benchmarks/speculative.py`` (SmolLM2-135M-Instruct, 434 greedy tokens), the
    token after a match of ``n`` tokens was the one that followed it in the text 24/88 times for ``n = 1``, 24/37
    for 2, 19/24 for 3 and 208/229 for 4 or more. A one-token match is a weak guess, but a pass of 3 rows costs
    about what one row costs (archlab's float32 kernel: 1.02-1.10x): so it drafts 2 tokens, longer matches ``k``.
    Replayed exactly on those replies with the pass costs of two runs (``benchmarks/draft_replay.py``, 2026-12-04)
    this gave 2.19x and 1.99x modelled against 2.05x and 1.89x for n-grams of 2-3 tokens drafting ``k`` (the default
    before); ``PromptLookup(max_ngram=3, min_ngram=2)`` is that policy.
    """

    max_ngram: int = 4
    min_ngram: int = 1
    one_token_drafts: int = 2

    def __post_init__(self) -> None:
        _check_int("max_ngram", self.max_ngram, 1)
        _check_int("min_ngram", self.min_ngram, 1)
        _check_int("one_token_drafts", self.one_token_drafts, 0)
        if self.min_ngram > self.max_ngram:
            raise ConfigError(f"min_ngram={self.min_ngram} must be <= max_ngram={self.max_ngram}")

    def propose(self, tokens: list[int], k: int, sampling: Sampling) -> tuple[list[int], Tensor | None]:
        length, end = longest_match(tokens, self.max_ngram)
        if length < self.min_ngram:
            return [], None
        most = min(k, self.one_token_drafts) if length == 1 else k
        return list(tokens[end + 1 : end + 1 + most]), None


class DraftModel:
    """Draft with a smaller decoder-only model that shares the target's vocabulary (e.g. :func:`first_layers`).

    It decodes ``k`` tokens with its own KV cache, chosen as the target chooses (greedy, or sampled with the
    same filters). Between rounds it keeps what it has read that is still part of the sequence and reads the
    rest, so one draft serves successive calls on a growing text (the turns of a chat).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache = _croppable_cache(model, "draft model")
        self.read: list[int] = []  # the tokens in self.cache
        self.device = next(model.parameters()).device

    def propose(self, tokens: list[int], k: int, sampling: Sampling) -> tuple[list[int], Tensor | None]:
        kept = crop_to_shared(self.cache, self.read, tokens)
        del self.read[kept:]
        new, drafts, qs = tokens[kept:], [], []
        step = _step(self.model, keep=1)
        for _ in range(k):
            logits = step(torch.tensor([new], device=self.device), self.cache)[0, -1]  # [V]
            self.read.extend(new)
            token, q = sampling.pick(logits)
            drafts.append(token)
            qs.append(q)
            new = [token]
        return drafts, (torch.stack(qs) if sampling.do_sample and qs else None)


def first_layers(model: DecoderLM, n_layers: int) -> DecoderLM:
    """A draft model: ``model``'s embeddings and first ``n_layers`` blocks, then its final norm and LM head.

    ``[B, N] -> [B, N, V]`` like ``model``. Every submodule is ``model``'s own (the same Parameters, nothing
    copied; a change to the model's weights is the draft's too); only the config (``n_layers``) is new.
    The early layers' hidden state read through the final norm and head is a rough next-token guess, the
    idea of early-exit drafting (self-speculative decoding: Zhang et al. 2023, LayerSkip: Elhoushi et al. 2024).
    """
    if not isinstance(model, DecoderLM):
        raise ConfigError(f"first_layers needs a decoder-only model (GPT, Llama), got {type(model).__name__}")
    total = model.config.n_layers
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or not 1 <= n_layers < total:
        raise ConfigError(f"n_layers={n_layers!r}: a draft from the first layers of this {total}-layer "
                          f"{type(model).__name__} takes 1 to {total - 1} of them")  # fmt: skip
    with torch.device("meta"):  # the skeleton allocates nothing; every part is replaced by the model's
        draft = type(model)(dataclasses.replace(model.config, n_layers=n_layers))
    for name, child in model.named_children():
        if name != "decoder":
            setattr(draft, name, child)
    draft.decoder.blocks = nn.ModuleList(model.decoder.blocks[:n_layers])
    draft.decoder.final_norm = model.decoder.final_norm
    unshared = [name for name, t in itertools.chain(draft.named_parameters(), draft.named_buffers()) if t.is_meta]
    if unshared:
        raise ConfigError(f"first_layers: {type(model).__name__} has parts it cannot share: {', '.join(unshared)}")
    return draft.train(model.training)


def make_draft(draft: str | Draft, model: nn.Module) -> Draft:
    """``"lookup"`` -> :class:`PromptLookup`; ``"layers:M"`` -> :class:`DraftModel` of ``first_layers(model, M)``;
    a draft object (anything with ``propose``) as it is."""
    if not isinstance(draft, str):
        if not callable(getattr(draft, "propose", None)):
            raise ConfigError(f"draft must be one of {DRAFTS} or a draft with propose(), got {type(draft).__name__}")
        return draft
    check_draft_name(draft)
    if draft == "lookup":
        return PromptLookup()
    from archlab.static_decoding import StaticDecoder

    if isinstance(model, StaticDecoder):  # a compiled target: its model's first layers draft, eagerly
        model = model.model
    return DraftModel(first_layers(model, int(draft.partition(":")[2])))


def check_draft_name(draft: str) -> None:
    """ConfigError unless ``draft`` is a name :func:`make_draft` knows (its form: the layer count is checked against
    the model by :func:`first_layers`); a front end checks it before it loads the model."""
    name, _, layers = draft.partition(":") if isinstance(draft, str) else ("", "", "")
    if draft != "lookup" and not (name == "layers" and layers.isdecimal()):  # (not "²": isdigit, but no int)
        raise ConfigError(f"draft={draft!r} is not one of {DRAFTS} (M: how many of the model's first layers draft)")


# ================================================================================================
# Decoding
# ================================================================================================


def _croppable_cache(model: Any, role: str, cache: Any = None):
    """``cache`` (None: a fresh cache of ``model``) if :meth:`crop` can roll it back; ConfigError for models without
    such a cache."""
    make = getattr(model, "decoder_step", None)
    if not isinstance(model, nn.Module) or make is None or not callable(getattr(model, "new_cache", None)):
        raise ConfigError(f"the {role} must be a decoder-only model with decoder_step() and new_cache() (GPT, Llama), "
                          f"got {type(model).__name__}")  # fmt: skip
    cache = model.new_cache() if cache is None else cache
    if not callable(getattr(cache, "crop", None)):
        raise ConfigError(
            f"the {role} {type(model).__name__} keeps a {type(cache).__name__}, which cannot be cropped back to the "
            "accepted tokens: speculative decoding needs a KV cache (GPT, Llama)"
        )
    return cache


def _step(model: nn.Module, keep: int | None):
    """``model``'s step returning the last ``keep`` positions' logits (None: all)."""
    if keep is not None and "logits_to_keep" in inspect.signature(model.decoder_step).parameters:
        return model.decoder_step(logits_to_keep=keep)
    return model.decoder_step()


@torch.no_grad()
def speculative_generate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    draft: str | Draft = "lookup",
    draft_tokens: int = DRAFT_TOKENS,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    cache: Any = None,
) -> SpeculativeOutput:
    """Continue ``input_ids [1, n0]`` by up to ``max_new_tokens`` with draft-and-verify decoding (module docstring).

    Returns ``sequences [1, n0 + t]`` and the :class:`SpeculativeStats`. The output is that of
    :func:`archlab.generation.generate` with the same arguments: the same tokens when greedy, the same
    distribution when sampling. A generated stop token ends the output (kept in it).

    Args:
        model: the target, a decoder-only model with a KV cache (GPT, Llama), in eval mode.
        input_ids: ``[1, n0]``: batch size 1.
        draft: ``"lookup"``, ``"layers:M"``, or a :class:`Draft` (see :func:`make_draft`).
        draft_tokens: ``k``, the most tokens drafted per round. 8: on ``benchmarks/speculative.py``'s explanations
            (SmolLM2-135M, one thread, loaded machine) prompt lookup gave 1.53x plain greedy's speed at ``k = 5``,
            1.70x at 8, 1.74x at 12 (thread CPU time).
        do_sample, temperature, top_k, top_p, seed: as :func:`~archlab.generation.generate`.
        stop_tokens: ids that end the output.
        cache: as :func:`speculative_stream`'s.
    """
    stats = SpeculativeStats()
    steps = list(speculative_stream(
        model, input_ids, max_new_tokens=max_new_tokens, draft=draft, draft_tokens=draft_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed, stats=stats, cache=cache,
    ))  # fmt: skip
    new = torch.cat(steps).to(input_ids)[None] if steps else input_ids[:, :0]
    return SpeculativeOutput(torch.cat([input_ids, new], dim=1), stats)


def speculative_stream(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    draft: str | Draft = "lookup",
    draft_tokens: int = DRAFT_TOKENS,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    stats: SpeculativeStats | None = None,
    cache: Any = None,
) -> Iterator[Tensor]:
    """:func:`speculative_generate`, token by token: yields each new token as a ``[1]`` tensor, as
    :func:`archlab.generation.stream` does, so a chat front end can use either. The arguments are checked
    at the call; ``stats`` (if given) is filled in as decoding runs. ``cache``: as :func:`~archlab.generation.stream`'s
    (the model's own, fresh or holding the first ``cache.length`` tokens of ``input_ids``; None: a new one); when the
    iteration ends it holds the sequence's first tokens, at most all but the last yielded."""
    stop = check_decoding(
        model, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, stop_tokens=stop_tokens, seed=seed,
    )  # fmt: skip
    if input_ids.shape[0] != 1:
        raise ShapeError(f"speculative decoding takes one sequence, input_ids [1, n0]; got {tuple(input_ids.shape)} "
                         "(its rows would accept different numbers of tokens): decode the rows one by one")  # fmt: skip
    _check_int("draft_tokens", draft_tokens, 1)
    if stats is not None and not isinstance(stats, SpeculativeStats):
        raise ConfigError(f"stats must be a SpeculativeStats, got {type(stats).__name__}")
    cache = _croppable_cache(model, "model", cache)
    check_held(cache, input_ids)
    drafter = make_draft(draft, model)
    generator = None if seed is None else torch.Generator(device=input_ids.device).manual_seed(seed)
    sampling = Sampling(do_sample, temperature, top_k, top_p, generator)
    return _speculate(model, cache, drafter, input_ids, max_new_tokens, draft_tokens, sampling, stop,
                      SpeculativeStats() if stats is None else stats)  # fmt: skip


@torch.no_grad()
def _speculate(model, cache, drafter, input_ids, max_new_tokens, k, sampling, stop, stats):
    """The rounds of :func:`speculative_stream` (arguments checked). The target's cache always holds every
    token of the sequence but the last, which the next round feeds with its drafts."""
    # the verify passes' k' + 1 rows: archlab's float32 kernel reads the weights in place; else oneDNN-packed copies,
    # made for this call (SmolLM2-135M's took 0.3-0.4 s, about 10 one-row steps)
    packing = contextlib.nullcontext() if kernel_takes_rows(k + 1) else packed_for_rows(model, k + 1)
    with packing:
        yield from _rounds(model, cache, drafter, input_ids, max_new_tokens, k, sampling, stop, stats)


def _rounds(model, cache, drafter, input_ids, max_new_tokens, k, sampling, stop, stats):
    """:func:`_speculate`'s loop. The prompt's prefill gives the first token, as :func:`archlab.generation.generate`'s
    does (the same pass over the same rows, so the same cache); then each round feeds the last token and the drafts."""
    if max_new_tokens == 0:
        return
    tokens = input_ids[0].tolist()
    logits = _step(model, keep=1)(input_ids[:, held_positions(cache) :], cache)[0, -1]  # [V]
    vocab_size = logits.shape[-1]
    _check_ids_in_vocab(vocab_size, **{f"stop_tokens[{i}]": s for i, s in enumerate(stop)})
    trusted = type(drafter) is PromptLookup  # copies tokens of the sequence: ids in the vocabulary, at most k
    new = [sampling.pick(logits)[0]]
    stats.target_passes += 1
    verify = _step(model, keep=None)
    produced = 0
    while True:
        for token in new:
            tokens.append(token)
            produced += 1
            stats.generated += 1
            yield torch.tensor([token], device=input_ids.device)
            if token in stop:
                return
        if produced == max_new_tokens:
            return
        most = min(k, max_new_tokens - produced - 1)
        proposal = drafter.propose(tokens, most, sampling)
        drafts, q = proposal if trusted else _check_proposal(proposal, most, vocab_size, sampling.do_sample)
        fed = torch.tensor([[tokens[-1], *drafts]], dtype=input_ids.dtype, device=input_ids.device)
        logits = verify(fed, cache)[0]  # [1 + k', V]: p_1 .. p_{k'+1}
        new = accept(drafts, q, logits, sampling)
        stats.drafted += len(drafts)
        stats.accepted += len(new) - 1
        stats.target_passes += 1
        stats.draft_passes += len(drafts) if isinstance(drafter, DraftModel) else 0
        cache.crop(len(tokens) + len(new) - 1)  # the sequence and the accepted drafts; the new last token is not read


def _check_proposal(proposal: Any, k: int, vocab_size: int, do_sample: bool) -> tuple[list[int], Tensor | None]:
    """A draft's ``propose(tokens, k, sampling)`` result as ``(drafts, q)``, or ConfigError before the verify pass:
    at most ``k`` int ids in ``[0, V)`` (more would decode past ``max_new_tokens``), and ``q`` None or ``[k', V]``."""
    if not isinstance(proposal, tuple) or len(proposal) != 2:
        raise ConfigError(f"draft.propose() must return (tokens, q): a list of token ids and None or their "
                          f"distributions q [k', V]; got {type(proposal).__name__} {proposal!r:.60}")  # fmt: skip
    drafts, q = proposal
    if not isinstance(drafts, list | tuple) or len(drafts) > k:
        got = f"{len(drafts)} tokens" if isinstance(drafts, list | tuple) else type(drafts).__name__
        raise ConfigError(f"draft.propose(tokens, k={k}, ...) must return a list of at most k={k} token ids, got {got}")
    for d in drafts:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < vocab_size:
            raise ConfigError(f"draft.propose() proposed token {d!r}: draft tokens must be int ids in the model's "
                              f"vocabulary [0, {vocab_size})")  # fmt: skip
    if do_sample and q is not None:
        if not isinstance(q, Tensor) or q.ndim != 2 or q.shape[0] != len(drafts):
            raise ConfigError(f"draft.propose()'s q must be None or the {len(drafts)} drafts' distributions "
                              f"[{len(drafts)}, V={vocab_size}], got {describe(q)}")  # fmt: skip
        if q.shape[-1] != vocab_size:
            raise ConfigError(
                f"the draft model's vocabulary ({q.shape[-1]} tokens) is not the model's ({vocab_size} tokens)"
            )
    return list(drafts), q


def accept(drafts: list[int], q: Tensor | None, logits: Tensor, sampling: Sampling) -> list[int]:
    """The verification rule: the accepted drafts and one token of the target's; ``1 .. k + 1`` tokens.

    ``drafts``: ``d_1 .. d_k``; ``q [k, V]`` their draft distributions (None: one-hot on ``d_i``);
    ``logits [k + 1, V]``: the target's at ``p_1 .. p_{k+1}``. Sampling accepts ``d_i`` with probability
    ``min(1, p_i(d_i) / q_i(d_i))``; the first rejection draws from ``norm(max(0, p_i - q_i))``, and with every
    draft accepted the last token comes from ``p_{k+1}``. Greedy keeps ``d_i`` while it is ``argmax p_i``.
    """
    if logits.ndim != 2 or logits.shape[0] != len(drafts) + 1:
        raise ShapeError(f"accept: logits must be [k + 1, V] = [{len(drafts) + 1}, V] for the {len(drafts)} drafts, "
                         f"got {tuple(logits.shape)}")  # fmt: skip
    if not sampling.do_sample:
        best = greedy_next(logits).tolist()
        n = next((i for i, d in enumerate(drafts) if d != best[i]), len(drafts))
        return [*drafts[:n], best[n]]
    p = sampling.probs(logits)
    for i, d in enumerate(drafts):
        p_d, q_d = float(p[i, d]), 1.0 if q is None else float(q[i, d])
        if sampling.uniform() * q_d < p_d:  # u < p/q: accepted
            continue
        q_i = torch.nn.functional.one_hot(torch.tensor(d), p.shape[-1]).to(p) if q is None else q[i]
        residual = (p[i] - q_i).clamp_min(0)
        return [*drafts[:i], sampling.draw(residual if float(residual.sum()) > 0 else p[i])]
    return [*drafts, sampling.draw(p[len(drafts)])]
