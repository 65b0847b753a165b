r"""Batch sources: the training data of every task, as endless, resumable, shardable streams of batches.

A batch source is an iterator of batches (dicts of tensors) that never ends. Batch ``s`` of the stream
is a pure function of ``(seed, s)``, so

* ``state_dict()`` is ``{"kind", "step", "seed", "batch_size"}`` (JSON ints and a string) and
  ``load_state_dict(state)`` resumes with exactly the batches that would have come next;
* sharding is a slice: with ``world_size`` W each *global* batch of ``batch_size`` B rows is built
  once and rank r gets rows ``[r B/W, (r+1) B/W)``, so the ranks' batches are disjoint and their
  concatenation in rank order is the single-process batch (B must be divisible by W). Padding is to
  the longest row of the global batch, so even padded shapes agree.

``eval_batches()`` yields a fixed, finite validation sequence covering every validation example once
(or every token once, for LM); it ignores sharding, so every rank sees the same sequence.

The batches, by task (the ``TASKS`` contract of :mod:`archlab.models.registry`; ``-100`` = ignored label)::

    lm              LMWindows             input_ids [B, T], labels [B, T] = input_ids shifted left by one
    custom (ELMo)   TokenWindows          input_ids [B, N] (+ attention_mask [B, N] in validation)
    mlm             MLMBatches            input_ids, attention_mask (1 real / 0 pad), token_type_ids,
                                          labels [B, T] (-100 where not masked), next_sentence_label [B]
    seq2seq         Seq2SeqBatches        src_ids [B, N], src_mask bool [B, N] (True = real),
                                          tgt_in [B, M] = <s> y, tgt_out [B, M] = y </s> (-100 on padding)
    classification  ClassificationBatches inputs [B, ...], labels [B] (+ attention_mask for padded ids)

Random numbers come from ``numpy.random.default_rng([seed, stream, index])`` (one stream for training
batches, one for epoch orders, one for validation masks), never from global state.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from archlab.data.corpora import id_dtype
from archlab.data.tokenizers import Tokenizer
from archlab.errors import ConfigError, DataError, ShapeError

Batch = dict[str, Tensor]
IGNORE_INDEX = -100  # label value the losses skip
_TRAIN, _EPOCH, _EVAL = 0, 1, 2  # random streams


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}")


def as_token_array(ids: Any, name: str = "ids") -> np.ndarray:
    """A 1-D array of non-negative token ids (numpy, torch or list), kept in a compact integer dtype."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ShapeError(f"{name} must be a 1-D sequence of token ids, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{name} holds a negative token id ({int(arr.min())})")
    return arr.astype(id_dtype(int(arr.max(initial=0)) + 1), copy=False)


class _Ragged:
    """Variable-length id sequences in one flat array: sequence i is ``flat[offsets[i]:offsets[i+1]]``."""

    def __init__(self, seqs: Sequence[Sequence[int]], name: str) -> None:
        seqs = [s.tolist() if isinstance(s, (Tensor, np.ndarray)) else s for s in seqs]
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        flat = list(itertools.chain.from_iterable(seqs))
        self.flat = as_token_array(np.asarray(flat) if flat else np.zeros(0, np.int64), name).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def padded(
        self, rows: np.ndarray, width: int, fill: int, prefix: int | None = None, suffix: int | None = None
    ) -> Tensor:
        """``[len(rows), width]``: ``prefix? + seq + suffix?`` left-aligned, then ``fill``."""
        out = np.full((len(rows), width), fill, dtype=np.int64)
        start = 0 if prefix is None else 1
        if prefix is not None:
            out[:, 0] = prefix
        for j, i in enumerate(rows):
            n = self.lengths[i]
            out[j, start : start + n] = self.flat[self.offsets[i] : self.offsets[i] + n]
            if suffix is not None:
                out[j, start + n] = suffix
        return torch.from_numpy(out)


class _EpochOrder:
    """The infinite stream of example indices: epoch e is a permutation of range(n) drawn from (seed, e).

    Element ``i`` of the stream is ``perm_{i // n}[i % n]``: batches may straddle epochs, none is dropped.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = _rng(self.seed, _EPOCH, epoch).permutation(self.n)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> np.ndarray:
        i = np.arange(start, start + count)
        epochs, pos = i // self.n, i % self.n
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            hit = epochs == e
            out[hit] = self._perm(int(e))[pos[hit]]
        return out


class BatchSource(ABC):
    """The contract of every batch source (see the module docstring).

    Args:
        batch_size: the global batch ``B`` (all ranks together); each rank gets ``B / world_size`` rows.
        seed: the stream's seed (a non-negative integer).
        rank, world_size: this process's place in data-parallel training.
    """

    def __init__(self, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("world_size", world_size, 1)
        _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ConfigError(f"rank={rank} must be < world_size={world_size}")
        if batch_size % world_size:
            raise ConfigError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.step = 0  # index of the next global batch

    def _check_fits(self, n: int, what: str) -> None:
        """A global batch holds distinct examples: ``batch_size`` may not exceed the ``n`` training ``what``."""
        if self.batch_size > n:
            raise ConfigError(f"batch_size={self.batch_size} is larger than the training set ({n} {what}): a batch "
                              f"would hold the same example twice; batch_size must be <= {n}")  # fmt: skip

    @property
    def local_batch_size(self) -> int:
        """Rows per rank: ``batch_size // world_size``."""
        return self.batch_size // self.world_size

    def _rows(self, global_rows: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch's rows."""
        b = self.local_batch_size
        return global_rows[self.rank * b : (self.rank + 1) * b]

    @abstractmethod
    def batch(self, step: int) -> Batch:
        """This rank's part of global batch ``step`` (a pure function of seed and step)."""

    @abstractmethod
    def eval_batches(self) -> Iterator[Batch]:
        """The validation batches: fixed, finite, the same on every rank."""

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> Batch:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: resuming from it yields exactly the batches that would have come next."""
        return {"kind": type(self).__name__, "step": self.step, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a source over the same data and settings)."""
        expected = {"kind": type(self).__name__, "seed": self.seed, "batch_size": self.batch_size}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(
                    f"data state has {key}={state.get(key)!r} but this {type(self).__name__} has "
                    f"{key}={value!r}; resume with the same data settings"
                )
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise DataError(f"data state has step={step!r}; expected a non-negative integer")
        self.step = step


# -- language modelling ------------------------------------------------------------------------------------
class LMWindows(BatchSource):
    r"""Random windows of ``T + 1`` tokens from one long id array: next-token prediction.

    Global batch ``s`` takes B window starts uniform in ``[0, n - T - 1]`` drawn from ``(seed, s)``::

        w = ids[start : start + T + 1]        input_ids = w[:-1]  [T],  labels = w[1:]  [T]

    Resume state is O(1) (the step). Validation: ``valid`` cut into consecutive windows with stride
    T (every token after the first is a label exactly once); the last window is padded, its padded
    labels -100 (a causal model's real positions never see the padding after them).

    Args:
        ids: training token ids ``[n]`` (e.g. :func:`archlab.data.corpora.encode_texts`); needs ``n >= T + 1``.
        seq_len: ``T``.
        valid: validation token ids, or None.
        max_eval_batches: cap on :meth:`eval_batches` (None: all of ``valid``).
    """

    def __init__(self, ids: Any, *, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, valid: Any = None, max_eval_batches: int | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        _check_int("seq_len", seq_len, 1)
        if max_eval_batches is not None:
            _check_int("max_eval_batches", max_eval_batches, 1)
        self.ids = as_token_array(ids, "ids")
        self.seq_len, self.max_eval_batches = int(seq_len), max_eval_batches
        if len(self.ids) < seq_len + 1:
            raise DataError(
                f"ids has {len(self.ids)} tokens; windows of seq_len + 1 = {seq_len + 1} need at least that many"
            )
        self.valid = None if valid is None else as_token_array(valid, "valid")
        if self.valid is not None and len(self.valid) < 2:
            raise DataError(f"valid has {len(self.valid)} tokens; at least 2 are needed for one prediction")
        self._offsets = np.arange(seq_len + 1)

    def batch(self, step: int) -> Batch:
        starts = _rng(self.seed, _TRAIN, step).integers(0, len(self.ids) - self.seq_len, size=self.batch_size)
        window = torch.from_numpy(self.ids[self._rows(starts)[:, None] + self._offsets].astype(np.int64))
        return {"input_ids": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous()}

    def eval_batches(self) -> Iterator[Batch]:
        if self.valid is None:
            raise DataError("this LMWindows has no validation ids (pass valid=)")
        T, n = self.seq_len, len(self.valid)
        starts = np.arange(0, n - 1, T)  # window k predicts valid[kT+1 : kT+T+1]
        for b, first in enumerate(range(0, len(starts), self.batch_size)):
            if self.max_eval_batches is not None and b >= self.max_eval_batches:
                return
            rows = starts[first : first + self.batch_size]
            idx = rows[:, None] + self._offsets  # [b, T + 1]
            real = idx < n
            window = np.where(real, self.valid[np.minimum(idx, n - 1)].astype(np.int64), 0)
            labels = np.where(real[:, 1:], window[:, 1:], IGNORE_INDEX)
            yield {"input_ids": torch.from_numpy(window[:, :-1].copy()), "labels": torch.from_numpy(labels)}


# -- masked language modelling -------------------------------------------------------------------------------
class TokenWindows(LMWindows):
    r"""Whole windows of ``N`` tokens, for a model that makes its own targets from them (ELMo's biLM
    predicts each token from the left and from the right)::

        training    {"input_ids": [B, N]}                          every token real
        validation  {"input_ids": [B, N], "attention_mask": [B, N]}  1 = real; the last row right-padded

    They are the windows of an :class:`~archlab.data.LMWindows` with ``T = N - 1`` (same starts, same
    resume state, same sharding), kept whole: ``input_ids = [w_0 .. w_{N-2}] + [w_{N-1}]`` (its inputs
    plus its last label). Validation windows start every ``N - 1`` tokens, so each window's first token
    is the previous one's last and every validation token after the first is a forward target once.
    (``self.seq_len`` is that LMWindows' ``T = N - 1``; ``self.window`` is ``N``.)
    """

    def __init__(self, ids: Any, *, seq_len: int, **kwargs: Any) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ConfigError(f"seq_len={seq_len!r} must be an integer >= 2: a token window needs two tokens")
        ids = as_token_array(ids, "ids")
        if len(ids) < seq_len:
            raise DataError(f"ids has {len(ids)} tokens; windows of seq_len={seq_len} tokens need at least that many")
        super().__init__(ids, seq_len=seq_len - 1, **kwargs)
        self.window = seq_len

    def batch(self, step: int) -> Batch:
        lm = super().batch(step)
        return {"input_ids": torch.cat([lm["input_ids"], lm["labels"][:, -1:]], dim=1)}

    def eval_batches(self) -> Iterator[Batch]:
        for lm in super().eval_batches():
            last = lm["labels"][:, -1:]
            real = torch.cat([torch.ones_like(last, dtype=torch.bool), lm["labels"] != IGNORE_INDEX], dim=1)  # [b, N]
            ids = torch.cat([lm["input_ids"], last.clamp(min=0)], dim=1)  # a padded last label (-100) becomes id 0
            yield {"input_ids": ids, "attention_mask": real.long()}


class MLMBatches(BatchSource):
    r"""BERT's pre-training batches from one long id array: masked LM, with next-sentence prediction.

    Each row is ``[CLS] A [SEP] B [SEP]`` of exactly ``T`` tokens (so attention_mask is all 1), with
    ``|A| + |B| = T - 3``, ``|A|`` uniform in ``[1, T - 4]``, A starting at a random position.
    With probability 1/2 B is the text that follows A (``next_sentence_label`` 0), else text from a
    random position (label 1), as in Hugging Face's ``BertForPreTraining``. ``nsp=False`` gives
    ``[CLS] A [SEP]`` with ``|A| = T - 2`` and no ``next_sentence_label``. ``token_type_ids`` are 0 up to the
    first [SEP], 1 after.

    Masking (Devlin et al. 2019): each non-special position is selected with probability ``mask_prob``
    (0.15); a selected token becomes [MASK] with probability 0.8, a token uniform over the whole
    vocabulary with 0.1, and stays itself with 0.1. ``labels`` hold the original id at selected
    positions and -100 elsewhere.

    Validation: consecutive spans of ``valid`` (A and its true or a random B), with split points, NSP
    choices and masks drawn from a fixed stream: the same batches every call.

    Args:
        ids: training token ids ``[n]``; tokenizer: gives V and the ``[CLS] [SEP] [MASK]`` ids;
        seq_len: ``T`` (>= 5 with NSP, >= 3 without); valid: validation ids or None.
    """

    def __init__(self, ids: Any, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, nsp: bool = True, mask_prob: float = 0.15, valid: Any = None,
                 max_eval_batches: int | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        _check_int("seq_len", seq_len, 5 if nsp else 3)
        if not isinstance(mask_prob, (int, float)) or isinstance(mask_prob, bool) or not 0 < mask_prob < 1:
            raise ConfigError(f"mask_prob={mask_prob!r} must be a number in (0, 1)")
        if max_eval_batches is not None:
            _check_int("max_eval_batches", max_eval_batches, 1)
        missing = [r for r in ("cls", "sep", "mask") if tokenizer.specials.get(r) is None]
        if missing:
            raise DataError(
                f"MLM needs a tokenizer with [CLS], [SEP] and [MASK]; this {tokenizer.kind} tokenizer lacks "
                f"{', '.join(missing)}"
            )
        self.ids = as_token_array(ids, "ids")
        self.vocab_size = tokenizer.vocab_size
        self.cls_id, self.sep_id, self.mask_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id
        self.seq_len, self.nsp, self.mask_prob = int(seq_len), bool(nsp), float(mask_prob)
        self.max_eval_batches = max_eval_batches
        self.n_content = seq_len - (3 if nsp else 2)
        if len(self.ids) < self.n_content + 1:
            raise DataError(
                f"ids has {len(self.ids)} tokens; MLM rows of seq_len={seq_len} need more than {self.n_content}"
            )
        self.valid = None if valid is None else as_token_array(valid, "valid")
        if self.valid is not None and len(self.valid) < self.n_content + 1:
            raise DataError(
                f"valid has {len(self.valid)} tokens; MLM rows of seq_len={seq_len} need more than {self.n_content}"
            )

    def _rows_from(self, ids: np.ndarray, starts: np.ndarray, rng: np.random.Generator) -> Batch:
        """Build and mask rows whose A spans start at ``starts`` [b]; every random draw comes from ``rng``."""
        b, T, n = len(starts), self.seq_len, self.n_content
        j = np.arange(T)[None, :]  # [1, T]
        if self.nsp:
            len_a = rng.integers(1, n, size=b)[:, None]  # |A| in [1, n - 1], |B| = n - |A| >= 1
            is_random = rng.random(b) < 0.5
            random_b = rng.integers(0, len(ids) - n + 1, size=b)
            b_start = np.where(is_random, random_b, starts + len_a[:, 0])[:, None]
            sep_a, sep_b = 1 + len_a, T - 1
            src = np.where(j <= sep_a, starts[:, None] + j - 1, b_start + j - sep_a - 1)
            special = (j == 0) | (j == sep_a) | (j == sep_b)
            types = (j > sep_a).astype(np.int64)
        else:
            src = starts[:, None] + j - 1
            special = (j == 0) | (j == T - 1)
            types = np.zeros((b, T), dtype=np.int64)
        tokens = np.where(special, 0, ids[np.clip(src, 0, len(ids) - 1)].astype(np.int64))
        tokens[:, 0] = self.cls_id
        tokens = np.where(special & (j > 0), self.sep_id, tokens)
        selected = (rng.random((b, T)) < self.mask_prob) & ~special
        how = rng.random((b, T))
        replacement = rng.integers(0, self.vocab_size, size=(b, T))
        labels = np.where(selected, tokens, IGNORE_INDEX)
        tokens = np.where(selected & (how < 0.8), self.mask_id, tokens)
        tokens = np.where(selected & (how >= 0.8) & (how < 0.9), replacement, tokens)
        batch = {
            "input_ids": torch.from_numpy(tokens),
            "attention_mask": torch.ones((b, T), dtype=torch.int64),
            "token_type_ids": torch.from_numpy(np.broadcast_to(types, (b, T)).copy()),
            "labels": torch.from_numpy(labels),
        }
        if self.nsp:
            batch["next_sentence_label"] = torch.from_numpy(is_random.astype(np.int64))
        return batch

    def _global_starts(self, ids: np.ndarray, rng: np.random.Generator, b: int) -> np.ndarray:
        # A and (for IsNext) B must fit: the pair spans n_content tokens from the start.
        return rng.integers(0, len(ids) - self.n_content + 1, size=b)

    def batch(self, step: int) -> Batch:
        rng = _rng(self.seed, _TRAIN, step)
        full = self._rows_from(self.ids, self._global_starts(self.ids, rng, self.batch_size), rng)
        b = self.local_batch_size
        return {k: v[self.rank * b : (self.rank + 1) * b] for k, v in full.items()}

    def eval_batches(self) -> Iterator[Batch]:
        if self.valid is None:
            raise DataError("this MLMBatches has no validation ids (pass valid=)")
        starts = np.arange(0, len(self.valid) - self.n_content + 1, self.n_content)
        for k, first in enumerate(range(0, len(starts), self.batch_size)):
            if self.max_eval_batches is not None and k >= self.max_eval_batches:
                return
            yield self._rows_from(self.valid, starts[first : first + self.batch_size], _rng(self.seed, _EVAL, k))


# -- sequence to sequence ----------------------------------------------------------------------------------
class Seq2SeqBatches(BatchSource):
    r"""Padded (source, target) batches for an encoder-decoder, teacher-forced::

        src_ids  [B, N]  x, then <pad>             src_mask [B, N] bool, True on x
        tgt_in   [B, M]  <s> y, then <pad>         (the decoder's input)
        tgt_out  [B, M]  y </s>, then -100         (what it must predict: tgt_in shifted left by one)

    ``N`` and ``M = max |y| + 1`` are the longest in the global batch. Training walks an endless
    stream of epochs, each a fresh permutation of the pairs (a batch may straddle two epochs).

    Args:
        pairs: ``(source ids, target ids)``; sources must be non-empty.
        pad_id, bos_id, eos_id: the special ids (see :meth:`from_text` to take them from a tokenizer).
        valid: validation pairs, batched in order by :meth:`eval_batches`.
    """

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, pad_id: int,
                 bos_id: int, eos_id: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 valid: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            _check_int(name, value, 0)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.src, self.tgt = self._store(pairs, "pairs")
        self._check_fits(len(self.src), "pairs")
        self.valid = None if valid is None else self._store(valid, "valid")
        self.order = _EpochOrder(len(self.src), self.seed)

    @classmethod
    def from_text(cls, pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, *,
                  valid: Sequence[tuple[str, str]] | None = None, **kwargs: Any) -> Seq2SeqBatches:  # fmt: skip
        """Encode string pairs with ``tokenizer`` (which gives pad/bos/eos); ``kwargs`` as for the constructor."""
        missing = [r for r in ("pad", "bos", "eos") if tokenizer.specials.get(r) is None]
        if missing:
            raise DataError(
                f"seq2seq needs pad, bos and eos tokens; this {tokenizer.kind} tokenizer lacks {', '.join(missing)}"
            )

        def encode(ps):
            return None if ps is None else [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in ps]

        return cls(encode(pairs), valid=encode(valid), pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                   eos_id=tokenizer.eos_id, **kwargs)  # fmt: skip

    @staticmethod
    def _store(pairs, name: str) -> tuple[_Ragged, _Ragged]:
        if not pairs:
            raise DataError(f"{name} is empty")
        src = _Ragged([p[0] for p in pairs], f"{name} source")
        tgt = _Ragged([p[1] for p in pairs], f"{name} target")
        empty = np.flatnonzero(src.lengths == 0)
        if empty.size:
            raise DataError(f"{name}[{int(empty[0])}] has an empty source (an encoder needs at least one token)")
        return src, tgt

    def _collate(self, src: _Ragged, tgt: _Ragged, rows: np.ndarray, width_rows: np.ndarray) -> Batch:
        n, m = int(src.lengths[width_rows].max()), int(tgt.lengths[width_rows].max()) + 1
        src_ids = src.padded(rows, n, self.pad_id)
        return {
            "src_ids": src_ids,
            "src_mask": torch.from_numpy(np.arange(n)[None, :] < src.lengths[rows][:, None]),
            "tgt_in": tgt.padded(rows, m, self.pad_id, prefix=self.bos_id),
            "tgt_out": tgt.padded(rows, m, IGNORE_INDEX, suffix=self.eos_id),
        }

    def batch(self, step: int) -> Batch:
        rows = self.order.take(step * self.batch_size, self.batch_size)
        return self._collate(self.src, self.tgt, self._rows(rows), rows)

    def eval_batches(self) -> Iterator[Batch]:
        if self.valid is None:
            raise DataError("this Seq2SeqBatches has no validation pairs (pass valid=)")
        src, tgt = self.valid
        for first in range(0, len(src), self.batch_size):
            rows = np.arange(first, min(first + self.batch_size, len(src)))
            yield self._collate(src, tgt, rows, rows)


# -- classification ----------------------------------------------------------------------------------------
class ClassificationBatches(BatchSource):
    r"""Shuffled (input, label) batches: ``inputs`` [B, ...] and ``labels`` [B] (int64).

    ``inputs`` is either a tensor ``[n, ...]`` (features ``[n, d]``, images ``[n, C, H, W]``, equal-length
    ids ``[n, N]``), whose rows are taken as they are, or a list of id sequences of different lengths,
    right-padded with ``pad_id`` to the longest in the global batch, with ``attention_mask`` [B, N]
    (1 real / 0 pad). Epochs as in :class:`Seq2SeqBatches`.

    Args:
        inputs, labels: the training examples; labels are class ids ``>= 0``.
        valid: ``(inputs, labels)`` for :meth:`eval_batches`, or None.
        pad_id: needed when inputs are id sequences.
    """

    def __init__(self, inputs: Tensor | Sequence[Sequence[int]], labels: Any, *, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, valid: tuple[Any, Any] | None = None,
                 pad_id: int | None = None) -> None:  # fmt: skip
        super().__init__(batch_size, seed=seed, rank=rank, world_size=world_size)
        if pad_id is not None:
            _check_int("pad_id", pad_id, 0)
        self.pad_id = pad_id
        self.inputs, self.labels = self._store(inputs, labels, "")
        self._check_fits(len(self.labels), "examples")
        self.valid = None if valid is None else self._store(*valid, "valid ")
        self.order = _EpochOrder(len(self.labels), self.seed)

    @classmethod
    def from_text(
        cls, texts: Sequence[str], labels: Sequence[int], tokenizer: Tokenizer, *, max_length: int,
        valid: tuple[Sequence[str], Sequence[int]] | None = None, min_length: int = 1, **kwargs: Any,
    ) -> ClassificationBatches:  # fmt: skip
        """``[CLS] text [SEP]`` id sequences (truncated to ``max_length`` tokens in all) with the tokenizer's pad.

        A sequence shorter than ``min_length`` is padded to it with pad tokens that count as part of the text
        (``attention_mask`` 1 there): Kim's padding of short sentences for a model that needs ``min_length``
        real tokens in every row (a TextCNN: its widest kernel).
        """
        _check_int("max_length", max_length, 3)
        _check_int("min_length", min_length, 1)
        if min_length > max_length:
            raise ConfigError(f"max_length={max_length} is below min_length={min_length}, the shortest row the model "
                              "takes")  # fmt: skip
        if tokenizer.pad_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
            raise DataError(
                f"classification of text needs pad, [CLS] and [SEP] tokens; this {tokenizer.kind} tokenizer lacks one"
            )

        def encode(ts):
            cut = max_length - 2
            rows = [[tokenizer.cls_id, *ids[:cut], tokenizer.sep_id] for ids in tokenizer.encode_batch(list(ts))]
            return [row + [tokenizer.pad_id] * (min_length - len(row)) for row in rows]

        valid = None if valid is None else (encode(valid[0]), valid[1])
        return cls(encode(texts), labels, valid=valid, pad_id=tokenizer.pad_id, **kwargs)

    def _store(self, inputs, labels, prefix: str) -> tuple[Tensor | _Ragged, Tensor]:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.numel() == 0:
            raise ShapeError(
                f"{prefix}labels must be a non-empty 1-D sequence of class ids, got shape {list(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.min() < 0:
            raise DataError(f"{prefix}labels must be non-negative integer class ids")
        if isinstance(inputs, Tensor):
            if inputs.ndim < 1 or inputs.shape[0] != labels.shape[0]:
                raise ShapeError(f"{prefix}inputs have {inputs.shape[0] if inputs.ndim else 0} rows but there are "
                                 f"{labels.shape[0]} labels")  # fmt: skip
            return inputs, labels.long()
        if self.pad_id is None:
            raise ConfigError("inputs given as id sequences need pad_id= (or pass a tensor)")
        ragged = _Ragged(inputs, f"{prefix}inputs")
        if len(ragged) != labels.shape[0]:
            raise ShapeError(f"{prefix}inputs have {len(ragged)} sequences but there are {labels.shape[0]} labels")
        if (ragged.lengths == 0).any():
            raise DataError(f"{prefix}inputs[{int(np.flatnonzero(ragged.lengths == 0)[0])}] is empty")
        return ragged, labels.long()

    def _collate(self, inputs, labels: Tensor, rows: np.ndarray, width_rows: np.ndarray) -> Batch:
        if isinstance(inputs, Tensor):
            index = torch.from_numpy(rows)
            return {"inputs": inputs.index_select(0, index), "labels": labels.index_select(0, index)}
        width = int(inputs.lengths[width_rows].max())
        mask = np.arange(width)[None, :] < inputs.lengths[rows][:, None]
        return {
            "inputs": inputs.padded(rows, width, self.pad_id),
            "labels": labels.index_select(0, torch.from_numpy(rows)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        }

    def batch(self, step: int) -> Batch:
        rows = self.order.take(step * self.batch_size, self.batch_size)
        return self._collate(self.inputs, self.labels, self._rows(rows), rows)

    def eval_batches(self) -> Iterator[Batch]:
        if self.valid is None:
            raise DataError("this ClassificationBatches has no validation set (pass valid=)")
        inputs, labels = self.valid
        for first in range(0, len(labels), self.batch_size):
            rows = np.arange(first, min(first + self.batch_size, len(labels)))
            yield self._collate(inputs, labels, rows, rows)
