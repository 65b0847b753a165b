"""Metrics: perplexity, accuracy, exact match, and BLEU delegated to sacrebleu."""

import math

import pytest
import sacrebleu
import torch

from archlab.errors import DataError, ShapeError
from archlab.train.metrics import accuracy, bleu, exact_match, perplexity


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
