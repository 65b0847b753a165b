"""Evaluation metrics: perplexity, accuracy, exact match, and BLEU through sacrebleu (not re-implemented).

* perplexity = ``exp(mean NLL per target token)``.
* accuracy = fraction of targets whose argmax prediction is right (ignored targets skipped).
* exact match = fraction of sequences predicted exactly.
* BLEU = ``sacrebleu.corpus_bleu(hypotheses, [references]).score``, in ``[0, 100]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from archlab.errors import DataError, ShapeError
from archlab.train.losses import IGNORE_INDEX


def perplexity(mean_nll: float) -> float:
    """``exp(mean_nll)``; ``inf`` past float range instead of an OverflowError."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def accuracy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """``logits [..., C]``, ``target [...]`` -> fraction of kept targets equal to ``argmax(logits)``."""
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ShapeError(f"target {tuple(target.shape)} must be logits {tuple(logits.shape)} without the class axis")
    keep = target != ignore_index
    total = int(keep.sum())
    return float(((logits.argmax(-1) == target) & keep).sum()) / total if total else 0.0


def exact_match(predictions: Sequence[Sequence], references: Sequence[Sequence]) -> float:
    """Fraction of positions ``i`` with ``predictions[i] == references[i]`` (as whole sequences or strings)."""
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        return 0.0
    return sum(list(p) == list(r) for p, r in zip(predictions, references)) / len(references)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 4-grams, brevity penalty, ``13a`` tokenisation), one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bad = [type(h).__name__ for h in (*hypotheses, *references) if not isinstance(h, str)]
    if bad:
        raise DataError(f"BLEU compares strings; got a {bad[0]} (detokenize the ids first)")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
