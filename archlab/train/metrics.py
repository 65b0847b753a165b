"""Evaluation metrics: perplexity, accuracy, exact match, and BLEU / chrF through sacrebleu (not re-implemented).

* perplexity = ``exp(mean NLL per target token)``.
* accuracy = fraction of targets whose argmax prediction is right (ignored targets skipped).
* exact match = fraction of sequences predicted exactly.
* BLEU = ``sacrebleu.corpus_bleu(hypotheses, [references]).score``, in ``[0, 100]``.
* chrF = ``sacrebleu.corpus_chrf(hypotheses, [references]).score`` (character n-grams up to 6), in ``[0, 100]``.

:func:`text_metric` picks between the last two by the references: BLEU's geometric mean includes the
precision of 4-grams, so on outputs of one to three words (a reversed or sorted string, a sum) it is 0 by
construction, whatever the quality; such outputs get chrF, which scores their characters.
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


#: BLEU's highest n-gram order (sacrebleu's default): references shorter than this many words on average
#: are scored with chrF by :func:`text_metric`.
BLEU_MAX_ORDER = 4


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 4-grams, brevity penalty, ``13a`` tokenisation), one reference each."""
    import sacrebleu

    _check_strings("BLEU", hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta = 2, spaces ignored), one reference each."""
    import sacrebleu

    _check_strings("chrF", hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def mean_words(texts: Sequence[str]) -> float:
    """Words per text under BLEU's ``13a`` tokenisation (``"1969-07-20"`` is 5: the dashes count), on average."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    return sum(len(tokenize(t).split()) for t in texts) / len(texts) if texts else 0.0


def text_metric(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[str, float]:
    """The corpus metric that fits the outputs: ``("bleu", BLEU)`` when the references average at least
    :data:`BLEU_MAX_ORDER` words, else ``("chrf", chrF)`` (see the module docstring)."""
    _check_strings("a text metric", hypotheses, references)
    if mean_words(references) >= BLEU_MAX_ORDER:
        return "bleu", bleu(hypotheses, references)
    return "chrf", chrf(hypotheses, references)


def _check_strings(metric: str, hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bad = [type(h).__name__ for h in (*hypotheses, *references) if not isinstance(h, str)]
    if bad:
        raise DataError(f"{metric} compares strings; got a {bad[0]} (detokenize the ids first)")
