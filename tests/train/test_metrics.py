"""Metrics: perplexity, accuracy, exact match, and BLEU / chrF delegated to sacrebleu."""

import math

import pytest
import sacrebleu
import torch

from archlab.errors import DataError, ShapeError
from archlab.train.metrics import accuracy, bleu, chrf, exact_match, mean_words, perplexity, text_metric


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e4) == math.inf


def test_accuracy_skips_ignored_targets():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # argmax 1, 0, 1
    assert accuracy(logits, torch.tensor([[1, 1, -100]])) == 0.5
    assert accuracy(logits, torch.tensor([[-100, -100, -100]])) == 0.0
    with pytest.raises(ShapeError):
        accuracy(logits, torch.tensor([1, 0]))


def test_exact_match():
    assert exact_match([[1, 2], [3], "abc"], [[1, 2], [4], "abc"]) == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        exact_match([[1], [2]], [[1]])


def test_bleu_is_sacrebleus_corpus_bleu():
    hyps = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
    refs = ["the cat sat on a mat", "the quick brown fox jumps", "hello world"]
    assert bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < bleu(hyps, refs) < 100
    assert bleu(refs, refs) == pytest.approx(100.0)
    with pytest.raises(DataError, match="detokenize"):
        bleu([[1, 2]], ["1 2"])


def test_chrf_is_sacrebleus_corpus_chrf():
    hyps, refs = ["olleh", "dcba", "xyz"], ["olleh", "abcd", "xy"]
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < chrf(hyps, refs) < 100 and chrf(refs, refs) == pytest.approx(100.0)
    with pytest.raises(DataError, match="chrF compares strings"):
        chrf([[1, 2]], ["1 2"])


def test_text_metric_scores_one_word_outputs_with_chrf_and_sentences_with_bleu():
    """Reversed strings are one word each: BLEU has no 4-gram to match and is 0 even for near misses."""
    hyps, refs = ["olleh", "dlrow", "abcde"], ["olleh", "dlrow", "abcdf"]  # two of three exact
    assert bleu(hyps, refs) == 0.0  # what used to be reported
    assert mean_words(refs) == 1.0
    name, score = text_metric(hyps, refs)
    assert name == "chrf" and score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score) and score > 50
    # ISO dates are 5 words under 13a (the dashes split), so they keep BLEU, as do sentences
    assert mean_words(["1969-07-20"]) == 5.0
    assert text_metric(["1969-07-20"], ["1969-07-20"]) == ("bleu", pytest.approx(100.0))
    sentences = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert text_metric(sentences, ["the cat sat on a mat", "the quick brown fox jumps"])[0] == "bleu"
    # the choice follows the references at exactly BLEU's order: 4 words is BLEU, 3 is chrF
    assert text_metric(["a b c d"], ["a b c d"])[0] == "bleu"
    assert text_metric(["a b c"], ["a b c"])[0] == "chrf"
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        text_metric(["a", "b"], ["a"])
