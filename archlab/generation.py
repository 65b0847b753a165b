r"""Generation over any model with a KV cache: greedy, sampling (temperature, top-k, top-p), beam search, and
batches of prompts of different lengths (:func:`generate_batch`). Draft-and-verify decoding is
:mod:`archlab.speculative`, on the same checks.

Everything here speaks one small protocol, so it serves a decoder-only GPT and an encoder-decoder
Transformer alike:

* a **step** ``step(tokens [B, n], cache) -> logits [B, n, V]``: feed ``n`` new tokens, get the
  next-token logits at each of them. With ``cache=None`` the step receives the whole sequence so far.
* a **cache** with ``reorder(index)`` (:class:`archlab.nn.DecodingCache`): row ``b`` becomes old row
  ``index[b]``; beam search calls it when beams are re-ranked. It must be fresh (empty) when given.

Where steps come from:

* decoder-only (GPT): pass the model itself; the functions call ``model.decoder_step(attention_mask)``
  and ``model.new_cache()``. ``attention_mask [B, n0]`` marks a left-padded prompt's real tokens.
  A model whose ``decoder_step`` takes ``logits_to_keep`` is asked for the last position's logits
  only (:func:`check_logits_to_keep`): the prompt's other positions need keys and values, not logits.
* encoder-decoder: pass ``model.decoder_step(memory, memory_mask)`` and ``cache=model.new_cache()``.
  For :func:`beam_search` the step must already serve ``B * beam_size`` rows, so build it from
  ``expand_for_beams(memory, beam_size)`` (and the same for ``memory_mask``): the beams of input ``b``
  are rows ``b * beam_size ... b * beam_size + beam_size - 1``.

Generation runs under ``torch.no_grad()`` and does not change the model's train/eval mode: call
``model.eval()`` first if it has dropout.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from archlab import kernels
from archlab.config import MAX_SEED
from archlab.errors import ConfigError, ShapeError
from archlab.nn.linear import KERNEL_FIRST_ROWS, kernel_takes_rows, packed_for_rows

#: ``(tokens [B, n], cache or None) -> logits [B, n, V]``.
Step = Callable[[Tensor, Any], Tensor]


# ================================================================================================
# Argument checks: a bad value raises ConfigError naming it, before any model call
# ================================================================================================


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an int >= {minimum}")


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ConfigError(f"temperature={temperature!r} must be a finite number > 0 (greedy decoding: do_sample=False)")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r} must be in (0, 1]")


def _check_seed(seed: int | None) -> None:
    if seed is not None:
        _check_int("seed", seed, 0)
        if seed > MAX_SEED:
            raise ConfigError(f"seed={seed!r} must be <= 2**64 - 1 (the largest seed torch takes)")


def check_sampling(
    temperature: float, top_k: int | None = None, top_p: float | None = None, seed: int | None = None
) -> None:
    """ConfigError naming the argument unless the sampling options are usable: ``temperature`` a finite number
    > 0, ``top_k`` an int >= 1, ``top_p`` in (0, 1], ``seed`` an int in [0, 2**64 - 1] (``None``: not given).
    What :func:`check_decoding` checks of them, for a front end (chat) to check before it loads a model."""
    _check_sampling(temperature, top_k, top_p)
    _check_seed(seed)


def check_logits_to_keep(logits_to_keep: Any) -> None:
    """A model's ``logits_to_keep``: ``None`` (every position's logits) or ``k >= 1`` (the last ``k``)."""
    if logits_to_keep is not None:
        _check_int("logits_to_keep", logits_to_keep, 1)


def _check_tokens(name: str, tokens: Any) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ShapeError(f"{name} must be a [B, n] tensor of token ids, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ShapeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ShapeError(f"{name} must be [B, n] with B, n >= 1 (a prompt or start token), got {tuple(tokens.shape)}")


def _check_ids_in_vocab(vocab_size: int, **ids: int | None) -> None:
    for name, value in ids.items():
        if value is not None and value >= vocab_size:
            raise ConfigError(f"{name}={value} is outside the model's vocabulary [0, {vocab_size})")


def context_limit(model: Any) -> int | None:
    """The most positions ``model`` can read (``model.config.context_limit``: a learned position table, a
    fixed-length layer, a trained context), or None where nothing limits it (relative positions, RoPE, RNNs)."""
    return getattr(getattr(model, "config", None), "context_limit", None)


def check_room(model: Any, n_prompt: int, max_new_tokens: int) -> None:
    """ConfigError, before decoding, unless the model's context (:func:`context_limit`) holds the positions decoding
    reads: the prompt's ``n_prompt`` and every new token but the last (the model would fail only on reaching them)."""
    limit, read = context_limit(model), n_prompt + max_new_tokens - 1
    if limit is not None and max_new_tokens > 0 and n_prompt > limit:
        raise ConfigError(
            f"the prompt's {n_prompt} tokens are past the context of {type(model).__name__} (max_len={limit}) "
            f"before any new token: shorten the prompt to at most {limit} tokens"
        )
    if limit is not None and max_new_tokens > 0 and read > limit:
        raise ConfigError(
            f"the prompt's {n_prompt} tokens + max_new_tokens={max_new_tokens} read {read} positions (every new token "
            f"but the last is fed back), past the context of {type(model).__name__} (max_len={limit}): "
            f"max_new_tokens <= {max(limit - n_prompt + 1, 0)} fits"
        )


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _check_left_padded(attention_mask: Any, ids_name: str, ids: Tensor) -> None:
    """ShapeError unless ``attention_mask`` is a tensor of ``ids``' shape ``[B, n0]`` whose rows are left-padded:
    padding (0) first, then real tokens (non-zero) up to the last position, which the next token follows. A row
    right-padded, or all padding, would continue from a padding position: a silently wrong continuation."""
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(ids.shape):
        raise ShapeError(f"attention_mask must match {ids_name} {tuple(ids.shape)}, got {_shape(attention_mask)}")
    real = attention_mask != 0
    bad = ~real[:, -1] | (real[:, 1:] < real[:, :-1]).any(dim=-1)  # [B]: ends in padding, or padding after a token
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ShapeError(f"attention_mask row {row} = {attention_mask[row].tolist()!s:.80} is not left-padded: "
                         "each row must be 0s (padding) then 1s (real tokens) up to its last position")  # fmt: skip


def expand_for_beams(tensor: Tensor, beam_size: int) -> Tensor:
    """``[B, ...] -> [B * beam_size, ...]``, each row repeated ``beam_size`` times in a row (the beam layout)."""
    _check_int("beam_size", beam_size, 1)
    return tensor.repeat_interleave(beam_size, dim=0)


# ================================================================================================
# Driving a step
# ================================================================================================


class _Stepper:
    """Feeds a step: with a cache only the tokens it has not seen yet, without one the whole prefix."""

    def __init__(self, step: Step, cache: Any):
        self.step, self.cache, self.fed = step, cache, held_positions(cache)

    def __call__(self, tokens: Tensor) -> Tensor:
        """``tokens [R, t]``: the whole sequences so far -> the last position's logits ``[R, V]``."""
        if self.cache is None:
            return self.step(tokens, None)[:, -1]
        new, self.fed = tokens[:, self.fed :], tokens.shape[1]
        return self.step(new, self.cache)[:, -1]

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def held_positions(cache: Any) -> int:
    """How many positions ``cache`` holds (``cache.length``; 0 for None or a cache that does not say)."""
    held = getattr(cache, "length", 0) if cache is not None else 0
    return held if isinstance(held, int) else 0


def crop_to_shared(cache: Any, read: Sequence[int], tokens: Sequence[int]) -> int:
    """Crop ``cache``, which holds the tokens ``read``, to the longest prefix ``read`` shares with ``tokens``, never
    all of ``tokens`` (the last is still to be fed, for the next logits): what a cache kept from an earlier call on
    a growing text (a draft model's, a chat's) can reuse. Returns the positions kept."""
    kept = 0
    for held, token in zip(read, tokens[: len(tokens) - 1]):
        if held != token:
            break
        kept += 1
    cache.crop(kept)
    return kept


def check_held(cache: Any, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
    """ConfigError unless a given ``cache`` is fresh, or holds fewer positions than ``input_ids [B, n0]`` has tokens
    (it is taken to hold their first ``cache.length``: a conversation's earlier turns), with no padding mask."""
    held = held_positions(cache)
    if held and (held >= input_ids.shape[1] or attention_mask is not None):
        given = " (given)" if attention_mask is not None else ""
        raise ConfigError(
            f"cache holds {held} positions: a reused cache holds the first tokens of input_ids, which must have more "
            f"(it has {input_ids.shape[1]}), without an attention_mask{given}"
        )


def _steps_rows(model: nn.Module) -> bool:
    """Whether ``model`` decodes padded rows: ``decoder_step(attention_mask)`` and ``new_cache()`` (GPT, Llama)."""
    make = getattr(model, "decoder_step", None)
    return callable(make) and "attention_mask" in inspect.signature(make).parameters and callable(
        getattr(model, "new_cache", None))  # fmt: skip


def _stepper(model_or_step: Any, attention_mask: Tensor | None, cache: Any, use_cache: bool) -> _Stepper:
    if cache is not None and not use_cache:
        raise ConfigError("cache was given but use_cache=False; pass one or the other")
    if cache is not None and not callable(getattr(cache, "reorder", None)):
        raise ConfigError(f"cache must have a reorder(index) method (a DecodingCache), got {type(cache).__name__}")
    if isinstance(model_or_step, nn.Module):
        model = model_or_step
        make = getattr(model, "decoder_step", None)
        if not _steps_rows(model):
            raise ConfigError(
                f"model_or_step: {type(model).__name__} has no decoder_step(attention_mask) and new_cache(); "
                "for an encoder-decoder model pass model.decoder_step(memory, memory_mask) and cache=model.new_cache()"
            )
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(make).parameters else {}
        step = make(attention_mask=attention_mask, **last_only)
        if use_cache and cache is None:
            cache = model.new_cache()
        return _Stepper(step, cache if use_cache else None)
    if not callable(model_or_step):
        raise ConfigError(f"model_or_step must be a model or a step callable, got {type(model_or_step).__name__}")
    if attention_mask is not None:
        raise ConfigError("attention_mask is used with a model; a bare step must handle padding itself")
    if use_cache and cache is None:
        raise ConfigError("a bare step needs the cache it decodes into: pass cache=model.new_cache(), or use_cache=False")
    return _Stepper(model_or_step, cache)


# ================================================================================================
# Sampling filters, written once
# ================================================================================================


def filter_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    r"""Temperature, then top-k, then top-p (nucleus) on ``logits [..., V]``; removed tokens get ``-inf``.

    * temperature: ``logits / T`` (``T < 1`` sharpens, ``T > 1`` flattens); below 1 as ``(logits - max) / T``, the
      same distribution, so that a tiny ``T`` (``1e-40``) cannot overflow to ``inf`` (and ``NaN`` probabilities).
    * top-k: keep the ``k`` largest logits (ties with the ``k``-th are kept).
    * top-p: keep the smallest set of most likely tokens whose probability reaches ``p``: token ``i``
      (in descending order) stays iff the mass strictly before it is ``< p``.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature < 1.0:  # (logits - max) <= 0: a tiny T sends it to -inf, never +inf; the max stays 0 (not 0 / 0)
        shifted = logits - logits.amax(dim=-1, keepdim=True)
        logits = torch.where(shifted < 0, shifted / temperature, shifted)
    elif temperature > 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def greedy_next(logits: Tensor) -> Tensor:
    """``logits [..., V]`` -> the greedy token ``[...]``: the index of the largest logit, the first of equal ones
    (``argmax``'s choice, as ``torch.max`` documents it too). Taken through ``torch.max`` because its CPU reduction is
    the faster one in bfloat16: a ``[10, 49152]`` bf16 row block 212 against 885 us for ``argmax``, one row 44 against
    177 (2 threads, AMD EPYC AVX512-BF16, 2026-12-05), a bf16 batch step's 4%; the same index to the bit
    (``tests/test_generation.py``)."""
    return torch.max(logits, dim=-1).indices


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row from ``logits [B, V]`` after :func:`filter_logits`; returns ``[B]``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = f"{_shape(logits)} {logits.dtype}" if isinstance(logits, Tensor) else _shape(logits)
        raise ShapeError(f"logits must be a float tensor [B, V], got {got}")
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ================================================================================================
# Greedy and sampled generation
# ================================================================================================


@torch.no_grad()
def generate(
    model_or_step: nn.Module | Step,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    do_sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    cache: Any = None,
) -> Tensor:
    """Continue ``input_ids [B, n0]`` by up to ``max_new_tokens``; returns ``[B, n0 + t]``, ``t <= max_new_tokens``.

    Greedy (``argmax``) unless ``do_sample``; sampling applies :func:`filter_logits` (temperature,
    top-k, top-p), which act only when sampling. A row that emits one of ``stop_tokens`` keeps it and
    is finished: its later positions hold ``pad_id``. Generation ends early once every row is finished.
    :func:`stream` takes the same arguments and yields each step's tokens as they are chosen.

    Args:
        model_or_step: a decoder-only model (``decoder_step(attention_mask)`` + ``new_cache()``, e.g.
            :class:`archlab.models.gpt.GPT`) or a step callable (see the module docstring).
        input_ids: ``[B, n0]`` prompt; left-padded when ``attention_mask`` says so.
        attention_mask: ``[B, n0]``, 1 for real tokens (models only).
        stop_tokens: ids that end a row; needs ``pad_id``.
        pad_id: filler for finished rows.
        seed: seeds a private ``torch.Generator``: the same seed gives the same samples. ``None`` uses
            the global RNG.
        use_cache: feed only the new token each step (KV cache); ``False`` recomputes the whole prefix
            each step (slow; the reference the cached path is tested against).
        cache: the cache to decode into: a fresh one for a bare step (a model makes its own); or one that already
            holds the first ``cache.length`` tokens of ``input_ids`` (a conversation's earlier turns, read before):
            only the rest of the prompt is fed (its logits those of the whole prompt's prefill up to float rounding).
    """
    steps = list(stream(
        model_or_step, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
        temperature=temperature, do_sample=do_sample, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
        pad_id=pad_id, seed=seed, use_cache=use_cache, cache=cache,
    ))  # fmt: skip
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1).to(input_ids.dtype)], dim=1)


def stream(
    model_or_step: nn.Module | Step,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    do_sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    cache: Any = None,
) -> Iterator[Tensor]:
    """:func:`generate`, one step at a time: yields the ``[B]`` tokens of each new position as it is chosen.

    The arguments are checked when ``stream`` is called (before any model call); decoding runs as the
    caller iterates, so a chat front end can print each token as it arrives and stop when it likes
    (closing the iterator ends the decoding). The tokens are those :func:`generate` returns, step by step.
    """
    stop = check_decoding(
        model_or_step, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
    )  # fmt: skip
    if pad_id is not None:
        _check_int("pad_id", pad_id, 0)
    if stop and pad_id is None:
        raise ConfigError(f"stop_tokens={stop} needs pad_id: finished rows are filled with it")
    if attention_mask is not None:
        _check_left_padded(attention_mask, "input_ids", input_ids)
    check_held(cache, input_ids, attention_mask)
    stepper = _stepper(model_or_step, attention_mask, cache, use_cache)
    return _decode(stepper, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, stop, pad_id, seed)


def check_decoding(
    model_or_step: Any,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Iterable[int],
    seed: int | None,
) -> list[int]:
    """The checks every decoding loop makes before its first model call (ConfigError / ShapeError naming the
    argument): the prompt ``input_ids [B, n0]``, ``max_new_tokens``, the sampling options (which act only when
    ``do_sample``), ``seed``, and the context (:func:`check_room`). Returns ``stop_tokens`` as a list."""
    _check_tokens("input_ids", input_ids)
    _check_int("max_new_tokens", max_new_tokens, 0)
    _check_sampling(temperature, top_k, top_p)
    if not do_sample and (temperature != 1.0 or top_k is not None or top_p is not None):
        raise ConfigError(
            f"temperature={temperature}, top_k={top_k}, top_p={top_p} only act when sampling: pass do_sample=True"
        )
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
        raise ConfigError(f"stop_tokens={stop_tokens!r:.60} must be a list of token ids (empty: none)")
    stop = list(stop_tokens)
    for s in stop:
        _check_int("stop_tokens[i]", s, 0)
    _check_seed(seed)
    check_room(model_or_step, input_ids.shape[1], max_new_tokens)
    return stop


@torch.no_grad()
def _decode(stepper, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, stop, pad_id, seed):
    """The decoding loop of :func:`stream` (arguments already checked): yields ``next_ids [B]`` per step."""
    device = input_ids.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    stop_ids = torch.tensor(stop, dtype=input_ids.dtype, device=device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    tokens = input_ids
    for t in range(max_new_tokens):
        logits = stepper(tokens)  # [B, V]
        if t == 0:
            _check_ids_in_vocab(logits.shape[-1], pad_id=pad_id, **{f"stop_tokens[{i}]": s for i, s in enumerate(stop)})
        if do_sample:
            next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        else:
            next_ids = greedy_next(logits)
        if pad_id is not None:
            next_ids = next_ids.masked_fill(finished, pad_id)
        tokens = torch.cat([tokens, next_ids[:, None].to(tokens.dtype)], dim=1)
        yield next_ids
        if stop:
            finished |= torch.isin(next_ids, stop_ids)
            if bool(finished.all()):
                break


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_tokens: Iterable[int] = (),
    batch_size: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    draft: str | Any | None = None,
    draft_tokens: int | None = None,
    stats: Any = None,
) -> list[list[int]]:
    """Continue several prompts of different lengths together; returns each prompt's new tokens, in order.

    Up to ``B = batch_size`` prompts (lists of token ids) decode as one batch (:func:`_decode_rows`): left-padded to
    the longest into ``[B, n0]`` with an ``attention_mask`` marking the real tokens and prefilled together, then
    every step one forward pass over the rows still open, a ``B``-row product costing far less than ``B`` one-row
    ones: up to :data:`archlab.nn.linear.KERNEL_FIRST_ROWS` rows (12 on AVX-512) on archlab's float32 kernel, which
    reads the weights in place (a bf16 model's up to 16 rows on its bfloat16 kernel where the CPU has AVX512-BF16),
    past it on oneDNN-packed copies of the weights
    (:func:`archlab.nn.linear.packed_for_rows`: they take the weights' memory again during the call). The copies are
    made only past the kernel's rows (and then serve the prefill too); up to them the prefill runs on ``F.linear``
    (MKL's sgemm, whose sums err less than oneDNN's). A row that emits a stop token or reaches ``max_new_tokens``
    leaves the batch: its cache rows and mask row are dropped (the cache's ``reorder``), so later steps compute only
    open rows. With more prompts than ``B`` (continuous batching), the waiting prompts take freed rows at once:
    prefilled together into a cache of their own (``empty_like``: the batch's packed head shared, not copied again),
    lined up with the batch (the side holding fewer positions padded in front with masked zero keys and values: the
    cache's ``pad_front``) and joined (``join``), so the batch stays full while prompts wait. Prompts start longest
    first; the output order is the prompts' order. Refilling costs a prefill per refill and a cache as long as the
    whole job: on SmolLM2 (12 prompts, README Speed) 6 refilled rows were slower than two batches of 6, and one
    batch of all prompts fastest; use ``batch_size`` where memory bounds the rows.

    The decoder gives each row the positions it would have alone
    (:func:`archlab.models.decoder.positions_from_mask`; RoPE rotates at them), the prefill attends each row over its
    own tokens by the call its prompt alone makes (:func:`archlab.nn.attention._attend_rows_alone`; sdpa under the
    padding mask rounded otherwise, in bfloat16 enough to part 6 of the speculative benchmark's 10 SmolLM2 rows from
    their decoding alone), and no query attends the padding, so with greedy decoding each row's tokens are those
    ``generate`` gives its prompt alone where the products compute a row as they do alone: the prefill's (MKL's and
    oneDNN's products of 126-1,440 rows gave each row the same bits in a batch as alone, float32 and bfloat16, at
    AVX-512 and capped at AVX2; a prompt no longer than the kernels' rows is prefilled alone on archlab's kernel
    instead, which may round otherwise), and the steps' on archlab's kernels (float32 on a CPU, up to
    ``KERNEL_FIRST_ROWS`` rows; bfloat16 up to 16 rows with AVX512-BF16; 10 of 10 rows in both on SmolLM2).
    Elsewhere rows may part at floating-point near-ties.
    A step's attention (float32 or bfloat16, CPU) runs on archlab's kernel, each row reading only its own keys
    (:func:`archlab.kernels.cached_attention_padded`; sdpa under the padding mask elsewhere).
    A row ends at its first stop token, which its output keeps; the others go on.
    With ``do_sample=True`` (``temperature``, ``top_k``, ``top_p``, ``seed`` as in :func:`generate`) every row
    samples from its own distribution, the draws shared out from one generator.

    With ``draft="lookup"`` (or a :class:`archlab.speculative.PromptLookup`) every pass also verifies each row's own
    prompt-lookup drafts (speculative decoding in the batch: :func:`archlab.speculative.accept`'s rule, greedy or
    sampled, so the output is what the rows give without drafts, greedy up to floating-point near-ties): row ``r`` is
    fed its last token and up to :func:`drafts_per_row` ``(R, draft_tokens, ...)`` drafts (a pass of at most
    :func:`pass_rows` tokens; 16 in bf16: 7 drafts a row for 2 rows, 3 for 4, none from 9), the shorter rows padded,
    and keeps what its logits accept; rows that keep fewer move on in the cache
    (:func:`archlab.nn.attention.rewind_rows`), so every row still ends at the last position. Drafts and rows compete
    for the same few-row product, so it pays where rows are few and quote their prompts (explanations of a given
    text): SmolLM2 explaining abstracts (``benchmarks/speculative.py --only batched --rows B``, bf16, AMD EPYC) 2 rows
    at a time 1.42x the rows without drafts, 4 rows 1.01-1.13x, all 10 at once 1.00x (no drafts until rows leave).

    Args:
        model: a decoder-only model with ``decoder_step(attention_mask)`` and ``new_cache()`` (GPT, Llama; the
            recurrent models too while every prompt fits in one batch).
        prompts: ``P >= 1`` non-empty lists of token ids.
        max_new_tokens: at most this many new tokens per row.
        stop_tokens: ids that end a row.
        batch_size: ``B``, the most rows decoded at once (default ``P``: all together). ``B < P`` needs a cache
            with ``pad`` and ``join`` (the KV cache of GPT and Llama).
        draft: None, or ``"lookup"`` / a :class:`~archlab.speculative.PromptLookup`: drafts verified in each pass
            (a KV cache that can ``rewind_rows``: GPT, Llama).
        draft_tokens: the most drafts a row verifies in a pass (fewer as rows are more: :func:`drafts_per_row`;
            default :data:`archlab.speculative.DRAFT_TOKENS`).
        stats: a :class:`archlab.speculative.SpeculativeStats` to fill in: every row's drafts and accepted drafts,
            the tokens, and the passes of the model (a prefill or a batched step: one pass for all its rows).

    Returns:
        ``P`` lists: row ``b``'s new tokens, up to and including its stop token (at most ``max_new_tokens``).
    """
    if isinstance(prompts, (str, bytes, Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ConfigError(f"prompts must be a non-empty list of token-id lists, got {_shape(prompts)}")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise ConfigError(f"prompts[{i}] must be a non-empty list of token ids, got {prompt!r:.60}")
        for token in prompt:
            _check_int(f"prompts[{i}][j]", token, 0)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a decoder-only model (GPT, Llama), got {type(model).__name__}")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    lookup, draft_tokens = _row_drafts(draft, draft_tokens)
    from archlab.speculative import SpeculativeStats

    if stats is not None and not isinstance(stats, SpeculativeStats):
        raise ConfigError(f"stats must be None or an archlab.speculative.SpeculativeStats, got {type(stats).__name__}")
    rows = min(batch_size or len(prompts), len(prompts))
    longest = max(prompts, key=len)
    device = next(model.parameters()).device
    stop = check_decoding(
        model, torch.tensor([longest], device=device), max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
    )  # fmt: skip
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    copies = rows > 1 and not kernel_takes_rows(rows)  # past the kernel's rows a copy pays for every step
    packing = packed_for_rows(model, rows) if copies else contextlib.nullcontext()
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else None
    with packing:  # B-row products on oneDNN-packed weights (archlab.nn.linear)
        return _decode_rows(model, prompts, rows, max_new_tokens, stop, sampling, seed, lookup, draft_tokens, stats)


def _row_drafts(draft: Any, draft_tokens: Any) -> tuple[Any, int]:
    """``generate_batch``'s ``draft`` as a :class:`~archlab.speculative.PromptLookup` (None: no drafts) and its
    ``draft_tokens``, or :class:`ConfigError` naming what is allowed: each row drafts from its own tokens, so no draft
    model."""
    from archlab.speculative import DRAFT_TOKENS, PromptLookup

    draft_tokens = DRAFT_TOKENS if draft_tokens is None else draft_tokens
    _check_int("draft_tokens", draft_tokens, 1)
    if draft is None or isinstance(draft, PromptLookup):
        return draft, draft_tokens
    if isinstance(draft, str) and draft == "lookup":
        return PromptLookup(), draft_tokens
    raise ConfigError(f"draft={draft!r}: generate_batch drafts by prompt lookup, 'lookup' or a PromptLookup (a "
                      f"draft model would need a batch of its own: use speculative_generate per prompt)")  # fmt: skip


def _left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """``R`` prompts -> ``input_ids [R, n]`` left-padded (with 0) to the longest, ``n``, and ``attention_mask [R, n]``
    (1 on the real tokens)."""
    n = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, n - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, n - len(prompt) :] = 1
    return input_ids, attention_mask


class _Rows:
    """The open rows of :func:`_decode_rows` and :class:`RowBatch`: ``prompt [R]`` (each row's key), the cache, and
    ``mask [R, M]`` (1 where row ``r``'s cached position ``j`` holds a real token), ``M`` the cache's length. The rows
    are left-padded: each row's tokens are contiguous and end at the last position."""

    JOIN = ("pad_front", "join", "empty_like")  # what a cache needs for rows to join

    def __init__(self, model: nn.Module, prompt: list, input_ids: Tensor, attention_mask: Tensor, cache: Any = None):
        """Prefill ``input_ids [R, n]`` (left-padded, as ``attention_mask [R, n]`` marks) into ``cache`` (empty;
        default a fresh ``model.new_cache()``); :attr:`logits` ``[R, V]``: the next token's."""
        self.model, self.prompt = model, prompt
        self.cache = model.new_cache() if cache is None else cache
        self.mask = attention_mask
        self.logits = self._rebuilt()(input_ids, self.cache)[:, -1]

    @classmethod
    def alone(cls, model: nn.Module, key: Any, tokens: Sequence[int], cache: Any) -> _Rows:
        """One row, ``key``: ``tokens`` prefilled on their own into the empty ``cache``, unmasked, as :func:`generate`
        prefills a prompt (the same kernels, so the same keys, values and logits)."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=next(model.parameters()).device)
        return cls(model, [key], ids, torch.ones_like(ids), cache=cache)

    def _rebuilt(self) -> Step:
        """The model's steps for these rows, on ``mask`` (every later position counts as real), built once per
        change of the rows or positions, not per step: :meth:`step`'s (the last position's logits) and
        :meth:`feed`'s (every fed position's). Where no row is padded the model gets no mask: its step is then
        the one a row alone takes."""
        mask = None if bool(self.mask.all()) else self.mask
        self._step = _stepper(self.model, mask, self.cache, True).step
        self._feed_step = self.model.decoder_step(attention_mask=mask)
        return self._step

    def step(self, next_ids: Tensor) -> None:
        """Feed each row's ``next_ids [R]``: :attr:`logits` become the following token's."""
        self.logits = self._step(next_ids[:, None], self.cache)[:, -1]

    def keep(self, index: Tensor) -> None:
        """Keep the rows ``index [R']`` (in that order)."""
        self.cache.reorder(index)
        self.prompt = [self.prompt[i] for i in index.tolist()]
        self.logits = self.logits[index]
        self._grow()
        self.mask = self.mask[index]
        self._rebuilt()

    def join(self, other: _Rows) -> None:
        """Append ``other``'s rows after these. The side holding fewer positions is first padded in front by the
        difference (zero keys and values, masked: the cache's ``pad_front``), so every row's tokens end at the last
        position. Positions are counted from the mask, so no token's key or value changes."""
        self._grow()
        other._grow()
        gap = self.cache.length - other.cache.length
        shorter = other if gap > 0 else self
        shorter.cache.pad_front(abs(gap))
        shorter.mask = torch.cat([shorter.mask.new_zeros(shorter.mask.shape[0], abs(gap)), shorter.mask], dim=1)
        self.cache.join(other.cache)
        self.prompt = self.prompt + other.prompt
        self.logits = torch.cat([self.logits, other.logits])
        self.mask = torch.cat([self.mask, other.mask])
        self._rebuilt()

    def _grow(self) -> None:
        """``mask`` to the cache's length: the tokens fed since the step was built are real."""
        fed = self.cache.length - self.mask.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], fed)], dim=1)

    def feed_ragged(self, tokens: list[list[int]]) -> tuple[Tensor, list[int]]:
        """Feed row ``r`` its ``tokens[r]`` (``n_r >= 1`` ids) in one pass of ``[R, max n_r]``, a shorter row padded
        at its end with its last token again (causal: its real positions do not read the padding); returns the logits
        ``[R, max n_r, V]`` and each row's padding, which the caller forgets (:meth:`rewind_rows`)."""
        width = max(len(t) for t in tokens)
        ids = [list(t) + [t[-1]] * (width - len(t)) for t in tokens]
        return self.feed(torch.tensor(ids, dtype=torch.long, device=self.mask.device)), [width - len(t) for t in tokens]

    def verify(self, tokens: list[list[int]], chooser: Any) -> list[list[int]]:
        """A speculative round of every row in one pass: ``tokens[r]`` is row ``r``'s last chosen token and its drafts
        (none or more; :meth:`feed_ragged`); each row keeps what :func:`archlab.speculative.accept` takes from its own
        logits (``chooser``: a :class:`~archlab.speculative.Sampling`) and forgets its rejected drafts and padding in
        one move of the rows (:meth:`rewind_rows`). Returns each row's new tokens: its accepted drafts and one of its
        own, the last not yet fed."""
        from archlab.speculative import accept

        logits, pads = self.feed_ragged(tokens)
        new = [accept(list(t[1:]), None, logits[r, : len(t)], chooser) for r, t in enumerate(tokens)]
        self.rewind_rows([pad + len(t) - len(n) for pad, t, n in zip(pads, tokens, new, strict=True)])
        return new

    def feed(self, tokens: Tensor) -> Tensor:
        """Feed each row ``tokens [R, n]`` (all real); returns the logits at each of them ``[R, n, V]``
        (:attr:`logits`: the last position's)."""
        out = self._feed_step(tokens, self.cache)
        self.logits = out[:, -1]
        return out

    def rewind_rows(self, n: Sequence[int]) -> None:
        """Row ``r`` forgets the last ``n[r]`` positions fed to it (rejected drafts, a ragged step's padding); every row
        still ends at the last position: a row forgetting more than the least moves on, its mask with it
        (:func:`archlab.nn.attention.rewind_rows`), and the leading positions no row reads then are dropped."""
        if not any(n):
            return
        self._grow()
        least = min(n)
        length = self.mask.shape[1] - least
        self.cache.rewind_rows(list(n))
        self.mask = torch.stack([torch.cat([self.mask.new_zeros(e - least), self.mask[r, : length - (e - least)]])
                                 for r, e in enumerate(n)])  # fmt: skip
        self._rebuilt()
        self.compact()  # the rows moved on: leading positions no row reads

    def compact(self) -> None:
        """Drop the leading positions that every row masks (the cache's ``drop_front``): no row reads them."""
        self._grow()
        read = self.mask.any(dim=0)
        start = int(read.int().argmax()) if bool(read.any()) else self.mask.shape[1]
        if start:
            self.cache.drop_front(start)
            self.mask = self.mask[:, start:]
            self._rebuilt()


def _fill_from_end(going: Tensor) -> Tensor:
    """The rows to keep, ``going [R]`` (True: the row goes on) -> ``index [R']``: each freed row among the first
    ``R'`` takes an open row from the end, the others stay where they are. So ``index[b] >= b``, and the cache moves
    only those rows within its storage (:meth:`archlab.nn.attention.KVCache.reorder`) where keeping the rows in order
    copies every row after the first freed one. ``[1, 0, 1, 0, 1] -> [0, 4, 2]``."""
    flags = going.tolist()
    kept = sum(flags)
    movers = iter([row for row in range(kept, len(flags)) if flags[row]])
    return torch.tensor([row if flags[row] else next(movers) for row in range(kept)], dtype=torch.long,
                        device=going.device)


def pass_rows(model: nn.Module) -> int:
    """The most tokens a batched pass verifying drafts feeds (padding included): the rows archlab's kernel takes
    first for ``model``'s weights, so the pass stays a few-row product: 16 for bfloat16 on ``bf16_rows``, for float32
    :data:`archlab.nn.linear.KERNEL_FIRST_ROWS` (12 with AVX-512, 10 with AVX2; ``f32_rows`` at 16 rows ran SmolLM2's
    products 1.5x slower than at 10), 16 elsewhere. Measured (docs/speed.md): batching 10 SmolLM2 prompts in fp32 with
    a budget of 16 ran 0.92x the batch without drafts."""
    weight = next((p for p in model.parameters() if p.ndim == 2), None)
    if weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32 and kernels.f32_kernel():
        return KERNEL_FIRST_ROWS[kernels.f32_kernel()]
    return kernels.BF16_MAX_ROWS


def drafts_per_row(rows: int, most: int, budget: int) -> int:
    """The most drafts each of ``rows`` rows verifies in one batched pass of at most ``budget`` tokens (a row fed
    its last token and its drafts, the shorter rows padded; :func:`pass_rows`): ``budget // rows - 1``, at most
    ``most``, at least 0. 16 tokens: 8 drafts for one row (``most = 8``), 7 each for 2, 3 for 4, 1 for 8, none
    from 9."""
    return max(0, min(most, budget // rows - 1))


def _decode_rows(model, prompts, batch_size, max_new_tokens, stop, sampling, seed, lookup=None, most=0, stats=None
                 ) -> list[list[int]]:  # fmt: skip
    """The loop of :func:`generate_batch` (arguments checked): greedy, or :func:`sample_next` with ``sampling``'s
    options, over at most ``batch_size`` open rows. Returns each prompt's new tokens.

    Each round records every open row's new tokens (picked from its logits, or those its verified drafts gave); the
    rows that stop (a stop token, or ``max_new_tokens`` reached) are dropped from the cache and the mask
    (``reorder``: every cache kind selects rows so); the others take one pass; then waiting prompts fill the freed
    rows (:class:`_Rows`: prefilled at the batch's length, joined). With ``lookup`` (a
    :class:`~archlab.speculative.PromptLookup`) each row's pass also verifies up to
    :func:`drafts_per_row` ``(rows, most, pass_rows(model))`` drafts of its own (:func:`_verify_rows`). ``stats``
    (a :class:`~archlab.speculative.SpeculativeStats`, or None) counts the passes, drafts and tokens.
    """
    from archlab.speculative import SpeculativeStats

    stats = SpeculativeStats() if stats is None else stats
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first
    first, waiting = sorted(waiting[:batch_size]), waiting[batch_size:]  # the first batch in the prompts' order
    cache = model.new_cache()
    needs = _Rows.JOIN if lookup is None else (*_Rows.JOIN, "rewind_rows")
    if (waiting or lookup is not None) and not all(callable(getattr(cache, name, None)) for name in needs):
        why, fix = (f"batch_size={batch_size} < {len(prompts)} prompts refills rows", "batch_size=None") if waiting \
            else ("draft= verifies drafts in each row", "draft=None")  # fmt: skip
        raise ConfigError(f"{why}, which needs a cache with {' and '.join(f'{n}()' for n in needs)} (GPT, Llama); "
                          f"{type(model).__name__} keeps a {type(cache).__name__}: pass {fix}")  # fmt: skip
    batch = _Rows(model, first, *_left_padded([prompts[i] for i in first], device), cache=cache)
    stats.target_passes += 1
    _check_ids_in_vocab(batch.logits.shape[-1], **{f"stop_tokens[{i}]": s for i, s in enumerate(stop)})
    out: list[list[int]] = [[] for _ in prompts]
    pending: list[list[int] | None] = [None] * len(first)  # each row's tokens from its verified drafts, if any
    budget = pass_rows(model)
    while batch.prompt:
        new = _picked(batch.logits, pending, sampling, generator)
        going = torch.tensor([_record(out[row], tokens, max_new_tokens, stop)
                              for row, tokens in zip(batch.prompt, new, strict=True)], device=device)  # fmt: skip
        last = torch.tensor([tokens[-1] for tokens in new], dtype=torch.long, device=device)
        if not bool(going.all()):
            if not waiting and not bool(going.any()):
                break
            open_rows = _fill_from_end(going)
            batch.keep(open_rows)
            last = last[open_rows]
        pending = [None] * len(batch.prompt)
        rows = batch.prompt
        drafting = drafts_per_row(len(rows), most, budget) if rows and lookup is not None else 0
        if drafting:
            pending = _verify_rows(batch, last, [prompts[r] + out[r] for r in rows],
                                   [max_new_tokens - len(out[r]) - 1 for r in rows], lookup, drafting, sampling,
                                   generator, stats)  # fmt: skip
            stats.target_passes += 1
        elif rows:
            batch.step(last)
            stats.target_passes += 1
        if waiting and len(batch.prompt) < batch_size:
            admitted, waiting = waiting[: batch_size - len(batch.prompt)], waiting[batch_size - len(batch.prompt) :]
            input_ids, attention_mask = _left_padded([prompts[i] for i in admitted], device)
            new_rows = _Rows(model, admitted, input_ids, attention_mask, cache=batch.cache.empty_like())
            stats.target_passes += 1
            pending += [None] * len(admitted)
            if batch.prompt:
                batch.join(new_rows)  # lined up: the side holding fewer positions padded in front
            else:
                batch = new_rows
    stats.generated += sum(len(o) for o in out)
    return out


def _picked(logits: Tensor, pending: list, sampling: dict | None, generator) -> list[list[int]]:
    """Each row's new tokens: its ``pending`` ones, else one picked from its ``logits [R, V]`` (all such rows in one
    :func:`greedy_next` or :func:`sample_next` call)."""
    picking = [r for r, tokens in enumerate(pending) if tokens is None]
    if picking:
        rows = logits if len(picking) == len(pending) else logits[picking]
        ids = greedy_next(rows) if sampling is None else sample_next(rows, generator=generator, **sampling)
        for r, token in zip(picking, ids.tolist(), strict=True):
            pending[r] = [token]
    return pending


def _record(out: list[int], tokens: list[int], max_new_tokens: int, stop: Sequence[int]) -> bool:
    """Append ``tokens`` to a row's ``out`` up to its first stop token or ``max_new_tokens``; whether it goes on."""
    for token in tokens:
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            return False
    return True


def _verify_rows(batch: _Rows, last: Tensor, sequences: list[list[int]], rooms: list[int], lookup: Any,
                 most: int, sampling: dict | None, generator, stats: Any) -> list[list[int] | None]:  # fmt: skip
    """One pass of every row of ``batch`` fed its ``last [R]`` token and up to ``most`` prompt-lookup drafts from its
    ``sequences[r]`` (the prompt and the tokens so far), at most ``rooms[r]`` (what ``max_new_tokens`` leaves); each
    row keeps what :func:`archlab.speculative.accept` takes, the rows' cache positions lined up again
    (:meth:`_Rows.verify`). Returns each row's new tokens (its accepted drafts and one token of its own), or all
    None where no row drafted (then the pass was a plain step: :attr:`_Rows.logits` are the next tokens'). The drafts
    and those accepted are added to ``stats``."""
    from archlab.speculative import Sampling

    chooser = Sampling(sampling is not None, **(sampling or {}), generator=generator)
    drafts = [lookup.propose(seq, min(most, room), chooser)[0] for seq, room in zip(sequences, rooms, strict=True)]
    if not any(drafts):
        batch.step(last)
        return [None] * len(drafts)
    new = batch.verify([[token, *d] for token, d in zip(last.tolist(), drafts, strict=True)], chooser)
    stats.drafted += sum(len(d) for d in drafts)
    stats.accepted += sum(len(tokens) - 1 for tokens in new)
    return new


class RowBatch:
    """Rows decoded as one batch that join and leave at any time: continuous batching for sequences that arrive
    while others decode (the search page's explanation streams), on the rows of :func:`generate_batch`.

    A row is prefilled on its own (:meth:`prefill` ``(key, prompt)``: its first token's logits ``[V]``), waits with
    its cache until :meth:`join` adds it to the batch, and leaves by :meth:`remove`. :meth:`step` feeds every joined
    row its next ``n_b >= 1`` tokens in one forward pass (``B`` rows: one pass, far cheaper than ``B`` one-row passes
    where a step streams the weights) and returns each row's logits ``[n_b, V]``; :meth:`rewind` forgets positions
    fed last, as many in every row or a count for each (the drafts that each row's verification rejected), and
    :meth:`verify` is both for a speculative round of every row (each keeping the drafts its own logits accept). The
    caller chooses the tokens (greedy, sampled, verified drafts); the last token it chose is fed by the next pass.

    Rows are left-padded, as in :func:`generate_batch`: each row's tokens are contiguous and end at the batch's last
    position, masked zero keys and values before them. A row joining a batch of another length is lined up by
    padding the shorter side in front (the cache's ``pad_front``; positions are counted from the mask, so no key or
    value changes), and when rows leave, the leading positions every remaining row masks are dropped (the cache's
    ``drop_front``), so a batch that never empties holds about as many positions as its longest row. Rows that forget
    different numbers of positions are lined up again by moving the rows that forget more (the cache's
    ``rewind_rows``: zeros in front, no key or value changed). Each row's
    logits are those it gets decoded alone; in float32 on a CPU where archlab's kernels take the batch's rows, to the
    bit (as :func:`generate_batch`). Not thread-safe: one thread calls every method.

    Args:
        model: a decoder-only model with ``decoder_step(attention_mask)`` and ``new_cache()`` whose cache can
            ``pad_front``, ``join``, ``rewind_rows``, ``drop_front``, ``empty_like`` and ``reorder`` (GPT, Llama); made
            once: every row's cache is its ``empty_like()``.
    """

    CACHE_METHODS = ("pad_front", "join", "rewind_rows", "drop_front", "empty_like", "reorder")

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module) or not _steps_rows(model):
            raise ConfigError(f"model must be a decoder-only model with decoder_step(attention_mask) and new_cache() "
                              f"(GPT, Llama), got {type(model).__name__}")  # fmt: skip
        self._empty = model.new_cache()
        missing = [m for m in self.CACHE_METHODS if not callable(getattr(self._empty, m, None))]
        if missing:
            raise ConfigError(f"{type(model).__name__} keeps a {type(self._empty).__name__}, which has no "
                              f"{', '.join(missing)}(): rows joining and leaving need a KV cache (GPT, Llama)")  # fmt: skip
        self.model, self.device = model, next(model.parameters()).device
        self._batch: _Rows | None = None  # the joined rows, in order (their keys: _batch.prompt)
        self._waiting: dict[Any, _Rows] = {}  # prefilled, not joined
        self._pads: list[int] | None = None  # the last ragged step's padding of each row, not yet forgotten

    @property
    def joined(self) -> list:
        """The keys of the rows in the batch, in row order."""
        return [] if self._batch is None else list(self._batch.prompt)

    @property
    def waiting(self) -> list:
        """The keys of the rows prefilled and not joined."""
        return list(self._waiting)

    @property
    def length(self) -> int:
        """The positions the batch's cache holds (0 without rows; a ragged step's padding included until it is
        forgotten)."""
        return 0 if self._batch is None else self._batch.cache.length

    @torch.no_grad()
    def prefill(self, key: Any, prompt: Sequence[int]) -> Tensor:
        """Prefill the row ``key`` (any hashable, not in use) with ``prompt`` (token ids) on its own; returns the
        logits ``[V]`` of its first new token. The row waits until :meth:`join`."""
        if key in self._waiting or key in self.joined:
            raise ConfigError(f"row key={key!r} is in use; remove it first or take another")
        if isinstance(prompt, (str, bytes, Tensor)) or not isinstance(prompt, Sequence) or not prompt:
            raise ConfigError(f"prompt must be a non-empty list of token ids, got {prompt!r:.60}")
        for token in prompt:
            _check_int("prompt[j]", token, 0)
        rows = _Rows.alone(self.model, key, prompt, self._empty.empty_like())
        self._waiting[key] = rows
        return rows.logits[0]

    @torch.no_grad()
    def join(self, key: Any) -> None:
        """Add the prefilled row ``key`` to the batch: the next :meth:`step` feeds it."""
        rows = self._waiting.pop(key, None)
        if rows is None:
            raise ConfigError(f"row key={key!r} is not waiting to join (prefill it first); waiting: {self.waiting}")
        if self._batch is None:
            self._batch = rows
            return
        self._settle()
        self._batch.join(rows)

    @torch.no_grad()
    def step(self, tokens: dict[Any, Sequence[int]]) -> dict[Any, Tensor]:
        """Feed every joined row its ``tokens[key]`` (``n_key >= 1`` ids) in one forward pass of ``[B, max n]``;
        returns each row's logits ``[n_key, V]`` at its tokens (the last: its next token's). A row fed fewer tokens
        than the longest is padded at its end (its last token again; causal, so its real positions do not read them);
        the padding is forgotten with the next :meth:`rewind`, or before the next pass, in one move of the rows."""
        keys = self._fed("step", tokens)
        out, self._pads = self._batch.feed_ragged([tokens[k] for k in keys])
        return {k: out[i, : len(tokens[k])] for i, k in enumerate(keys)}

    @torch.no_grad()
    def verify(self, tokens: dict[Any, Sequence[int]], sampling: Any = None) -> dict[Any, list[int]]:
        """A speculative round of every joined row in one pass: ``tokens[key]`` is the row's last chosen token and its
        drafts (none or more). Each row keeps the drafts :func:`archlab.speculative.accept` takes from its own logits
        (``sampling``: a :class:`~archlab.speculative.Sampling`, default greedy) and forgets the others, the rows
        lined up again in one move. Returns each row's new tokens: its accepted drafts and one of its own, the last
        of which the next :meth:`step` or :meth:`verify` feeds."""
        from archlab.speculative import Sampling

        keys = self._fed("verify", tokens)
        new = self._batch.verify([list(tokens[k]) for k in keys], Sampling() if sampling is None else sampling)
        return dict(zip(keys, new, strict=True))

    def _fed(self, method: str, tokens: dict[Any, Sequence[int]]) -> list:
        """The joined rows' keys in row order, once the last ragged step's padding is forgotten and ``tokens`` (what
        ``method`` feeds) is checked: every joined row, a non-empty list of ints >= 0 each."""
        self._settle()
        keys = self.joined
        if not keys or set(tokens) != set(keys):
            raise ConfigError(f"{method} feeds every joined row: got rows {sorted(tokens, key=repr)}, joined "
                              f"{sorted(keys, key=repr)}")  # fmt: skip
        for k in keys:
            if isinstance(tokens[k], (str, bytes, Tensor)) or not isinstance(tokens[k], Sequence) or not tokens[k]:
                raise ConfigError(f"{method}'s tokens[{k!r}] must be a non-empty list of token ids, got "
                                  f"{tokens[k]!r:.60}")  # fmt: skip
            for token in tokens[k]:
                _check_int(f"{method}'s tokens[{k!r}][j]", token, 0)
        return keys

    def rewind(self, n: int | dict[Any, int]) -> None:
        """Forget the last ``n`` positions fed to every joined row, or ``n[key]`` to each row named (rejected
        drafts; a row not named keeps its positions); a row's next :meth:`step` continues after its positions kept.
        Rows that forget different numbers are lined up again by moving the rows that forget more (their keys and
        values unchanged: :func:`archlab.nn.attention.rewind_rows`)."""
        keys = self.joined
        counts = dict.fromkeys(keys, n) if not isinstance(n, dict) else n
        unknown = [k for k in counts if k not in keys]
        if unknown:
            raise ConfigError(f"rewind names rows {unknown} that are not joined; joined: {keys}")
        held = self._held()
        for k, count in counts.items():
            _check_int(f"n[{k!r}]" if isinstance(n, dict) else "n", count, 0)
            if count > held[k]:
                raise ConfigError(f"rewind n={count} for row {k!r}: the row holds {held[k]} positions")
        self._settle([counts.get(k, 0) for k in keys])

    def _held(self) -> dict[Any, int]:
        """Each joined row's real positions (a ragged step's padding not counted)."""
        if self._batch is None:
            return {}
        self._batch._grow()
        real = self._batch.mask.sum(dim=1).tolist()
        return {k: int(r) - pad for k, r, pad in zip(self.joined, real, self._pads or [0] * len(real), strict=True)}

    def _settle(self, more: list[int] | None = None) -> None:
        """Forget the last ragged step's padding and ``more [B]`` positions of each joined row, in one move."""
        counts = self._pads or [0] * len(self.joined)
        if more is not None:
            counts = [a + b for a, b in zip(counts, more, strict=True)]
        self._pads = None
        if any(counts):
            self._batch.rewind_rows(counts)

    @torch.no_grad()
    def remove(self, keys: Iterable[Any]) -> None:
        """Drop the rows ``keys`` (joined or waiting; unknown keys are ignored), then the positions no row reads."""
        keys = set(keys)
        for key in keys & set(self._waiting):
            del self._waiting[key]
        if self._batch is None or not keys & set(self._batch.prompt):
            return
        kept = [i for i, key in enumerate(self._batch.prompt) if key not in keys]
        if not kept:
            self._batch, self._pads = None, None
            return
        self._pads = None if self._pads is None else [self._pads[i] for i in kept]
        self._batch.keep(torch.tensor(kept, device=self.device))
        self._settle()
        self._batch.compact()  # the positions only the removed rows read


# ================================================================================================
# Beam search
# ================================================================================================


class BeamSearchOutput(NamedTuple):
    """``sequences [B, n0 + t]`` (the best hypothesis per input, padded after its end) and its ``scores [B]``."""

    sequences: Tensor
    scores: Tensor


@torch.no_grad()
def beam_search(
    model_or_step: nn.Module | Step,
    start_tokens: Tensor,
    *,
    beam_size: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    attention_mask: Tensor | None = None,
    cache: Any = None,
    use_cache: bool = True,
) -> BeamSearchOutput:
    r"""Beam search: keep the ``K = beam_size`` best partial sequences of each input.

    A hypothesis ``y`` of ``L`` generated tokens scores ``sum_t log p(y_t | y_<t) / L^length_penalty``
    (``length_penalty > 0`` favours longer ones). Each step, every open beam is extended by every
    token; the best ``2K`` extensions are ranked: those ending in ``eos_id`` (or reaching
    ``max_new_tokens``) and ranked within the top ``K`` join the input's ``K`` best finished
    hypotheses; the best ``K`` that did not end stay open, and the cache is reordered to follow them.
    An input is done once it holds ``K`` finished hypotheses and its best open beam, normalised at
    the current length, cannot beat the worst of them. These are the rules of Hugging Face's beam
    search with ``early_stopping=False``.

    Args:
        model_or_step: a decoder-only model, or a step serving ``B * K`` rows (beams of input ``b`` in
            rows ``b K .. b K + K - 1``; build encoder-decoder steps from :func:`expand_for_beams`).
        start_tokens: ``[B, n0]``: the prompt, or the decoder's start token; expanded here to the
            ``B * K`` rows.
        attention_mask: ``[B, n0]`` prompt padding mask (models only); expanded here.
        eos_id: the token that ends a hypothesis.
        pad_id: filler after a hypothesis' end; default ``eos_id`` (or 0).
        cache: a fresh cache for a bare step, sized for ``B * K`` rows.

    Returns:
        :class:`BeamSearchOutput`: ``sequences [B, n0 + t]``, ``scores [B]``.
    """
    _check_tokens("start_tokens", start_tokens)
    _check_int("beam_size", beam_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 0)
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) \
            or not math.isfinite(length_penalty):  # fmt: skip
        raise ConfigError(f"length_penalty={length_penalty!r} must be a finite number")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None:
            _check_int(name, value, 0)
    if attention_mask is not None:
        _check_left_padded(attention_mask, "start_tokens", start_tokens)
    check_room(model_or_step, start_tokens.shape[1], max_new_tokens)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    b, n0 = start_tokens.shape
    k, steps, device = beam_size, max_new_tokens, start_tokens.device
    if steps == 0:
        return BeamSearchOutput(start_tokens.clone(), torch.zeros(b, device=device))
    mask = None if attention_mask is None else expand_for_beams(attention_mask, k)
    stepper = _stepper(model_or_step, mask, cache, use_cache)

    full_len = n0 + steps
    running = expand_for_beams(start_tokens, k).view(b, k, n0)  # open beams [B, K, n0 + t]
    finished = start_tokens[:, None, :].new_full((b, k, full_len), pad)  # K best ended hypotheses
    finished[:, :, :n0] = start_tokens[:, None, :]
    finished_len = torch.zeros(b, k, dtype=torch.long, device=device)
    finished_valid = torch.zeros(b, k, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    batch_base = torch.arange(b, device=device)[:, None] * k

    for t in range(steps):
        logits = stepper(running.reshape(b * k, -1))  # [B K, V]
        if t == 0:
            v = logits.shape[-1]
            _check_ids_in_vocab(v, eos_id=eos_id, pad_id=pad_id)
            dtype = torch.promote_types(logits.dtype, torch.float32)
            # only beam 0 is live at first, so the K beams do not start as K copies of one token
            running_scores = torch.zeros(b, k, dtype=dtype, device=device)
            running_scores[:, 1:] = float("-inf")
            finished_scores = torch.full((b, k), float("-inf"), dtype=dtype, device=device)
        length = t + 1
        norm = length**length_penalty
        log_probs = torch.log_softmax(logits.to(dtype), dim=-1).view(b, k, v)
        total = (running_scores[:, :, None] + log_probs).view(b, k * v)
        cand_scores, flat = total.topk(min(2 * k, k * v), dim=-1)  # [B, C], best first
        origin, token = flat // v, flat % v  # the beam each candidate extends, and its token
        cand = torch.cat([_gather_rows(running, origin), token[..., None].to(running.dtype)], dim=-1)  # [B, C, n0 + L]
        ends = (token == eos_id) if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
        if length == steps:
            ends = torch.ones_like(ends)

        # 1. ended candidates ranked within the top K join the finished pool (inputs not yet done)
        top_k_rank = torch.arange(cand.shape[1], device=device) < k
        joins = ends & top_k_rank[None, :] & ~done[:, None]
        pool_scores = torch.cat([finished_scores, torch.where(joins, cand_scores / norm, float("-inf"))], dim=1)
        pool_valid = torch.cat([finished_valid, joins], dim=1)
        cand_full = cand.new_full((b, cand.shape[1], full_len), pad)
        cand_full[..., : n0 + length] = cand
        pool = torch.cat([finished, cand_full], dim=1)
        pool_len = torch.cat([finished_len, torch.full_like(token, length)], dim=1)
        keep = pool_scores.topk(k, dim=-1).indices
        finished, finished_scores = _gather_rows(pool, keep), pool_scores.gather(1, keep)
        finished_valid, finished_len = pool_valid.gather(1, keep), pool_len.gather(1, keep)

        # 2. the best K candidates that did not end stay open
        open_scores = cand_scores.masked_fill(ends, float("-inf"))
        best = open_scores.topk(k, dim=-1).indices
        running_scores, running = open_scores.gather(1, best), _gather_rows(cand, best)

        # 3. an input is done when its best open beam cannot beat its worst finished hypothesis
        full = finished_valid.all(dim=-1)
        done |= full & (running_scores[:, 0] / norm <= finished_scores.min(dim=-1).values)
        if length == steps or bool(done.all()):
            break
        stepper.reorder((batch_base + origin.gather(1, best)).view(-1))

    out_len = n0 + int(finished_len[:, 0].max())
    return BeamSearchOutput(finished[:, 0, :out_len], finished_scores[:, 0])


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x [B, R, L]``, ``index [B, C]`` -> ``[B, C, L]`` with row ``c`` = ``x[b, index[b, c]]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
