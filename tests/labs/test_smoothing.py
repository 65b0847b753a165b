"""The label-smoothing lab: its teacher-forced scores against the cross-entropy by hand, the criterion on
constructed scores, and the quick run (undecided: 30 steps)."""

import pytest
import torch
import torch.nn.functional as F

from archlab.data.loaders import Seq2SeqBatches
from archlab.labs import run_lab
from archlab.labs.smoothing import EPSILONS, judge, teacher_forced
from archlab.models.transformer import EncoderDecoderTransformer, TransformerConfig


def test_teacher_forced_scores_are_the_plain_cross_entropy():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(TransformerConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=1, d_ff=32))
    pairs = [([5, 6, 7], [7, 6, 5]), ([8, 9], [9, 8]), ([5, 10, 11, 6], [6])]
    batches = Seq2SeqBatches(pairs, batch_size=2, pad_id=0, bos_id=1, eos_id=2, valid=pairs)
    got = teacher_forced(model, batches.eval_batches())
    model.eval()
    nll, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches.eval_batches():
            logits = model(b["src_ids"], b["tgt_in"], src_mask=b["src_mask"])
            keep = b["tgt_out"] != -100
            nll += F.cross_entropy(logits[keep], b["tgt_out"][keep], reduction="sum").item()
            correct += int((logits.argmax(-1)[keep] == b["tgt_out"][keep]).sum())
            n += int(keep.sum())
    assert got["nll"] == pytest.approx(nll / n, rel=1e-6)
    assert got["ppl"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-6)
    assert got["accuracy"] == correct / n
    assert model.training is False  # teacher_forced restored the mode it found


def test_judge_needs_both_halves_on_every_seed():
    plain, smoothed = EPSILONS
    assert judge({plain: [{"ppl": 1.2, "bleu": 80}], smoothed: [{"ppl": 1.4, "bleu": 82}]}) == (True, True, True)
    assert judge({plain: [{"ppl": 1.2, "bleu": 80}], smoothed: [{"ppl": 1.4, "bleu": 79}]}) == (True, False, False)
    assert judge({plain: [{"ppl": 1.2, "bleu": 80}, {"ppl": 1.2, "bleu": 80}],
                  smoothed: [{"ppl": 1.4, "bleu": 82}, {"ppl": 1.1, "bleu": 82}]}) == (False, True, False)  # fmt: skip


def test_quick_run_is_undecided():
    result = run_lab("label-smoothing", quick=True).result
    assert result.verdict == "undecided" and "accuracy below" in result.undecided
    assert [row[0] for row in result.rows] == list(EPSILONS)
    # the verdict judges perplexity and BLEU only: the text says accuracy is shown, not judged
    assert "'improves accuracy' is not judged" in result.criterion
    assert "shown but not part of the verdict" in result.notes
