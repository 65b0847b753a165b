"""archlab BERT (``archlab/models/bert.py``): behaviour the lessons claim, heads, input errors, presets.

Parity with Hugging Face lives in ``tests/parity/test_hf_bert.py``; this file checks what the
cards rely on: every token sees every other (bidirectional), padding is invisible to real tokens,
the masked-LM decoder is the word-embedding table, the classification (card 4) and cross-encoder
(card 5) heads learn, and bad input fails with a message naming the parameter before any compute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, DataError, ShapeError
from archlab.models import build_model, get_config
from archlab.models.bert import (
    BertConfig,
    BertCrossEncoder,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    pair_inputs,
)

TINY = BertConfig(vocab_size=50, max_len=16, type_vocab_size=2, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                  dropout=0.0, attn_dropout=0.0)  # fmt: skip
CLS, SEP = 1, 2


def tiny_model(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(TINY).eval()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- what the cards claim ------------------------------------------------------------------------


def test_output_shapes():
    model = tiny_model()
    ids = torch.randint(3, 50, (3, 7))
    hidden, pooled = model(ids)
    assert hidden.shape == (3, 7, 32) and pooled.shape == (3, 32)
    assert torch.all(pooled.abs() <= 1)  # tanh


def test_bidirectional_first_token_sees_last():
    """Card 4: 'URGENT: call me back' needs both parts; token 0's output depends on token N-1."""
    model = tiny_model()
    ids = torch.randint(3, 50, (1, 9))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 3) % 47 + 3
    with torch.no_grad():
        a, b = model(ids).hidden, model(changed).hidden
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_padding_does_not_change_real_tokens():
    model = tiny_model()
    real = torch.randint(3, 50, (1, 5))
    # pad with arbitrary ids (not pad_id): only the attention mask may hide them
    padded = torch.cat([real, torch.randint(3, 50, (1, 4))], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    with torch.no_grad():
        alone = model(real)
        batch = model(padded, attention_mask=mask)
        as_bool = model(padded, attention_mask=mask.bool())
    torch.testing.assert_close(batch.hidden[:, :5], alone.hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.pooled, alone.pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(as_bool.hidden, batch.hidden, atol=0, rtol=0)


def test_segments_matter():
    model = tiny_model()
    ids = torch.randint(3, 50, (1, 6))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        assert (model(ids).hidden - model(ids, token_type_ids=types).hidden).abs().max() > 1e-4
        torch.testing.assert_close(model(ids).hidden, model(ids, token_type_ids=torch.zeros_like(ids)).hidden)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = BertModel(TINY.replace(dropout=0.1, attn_dropout=0.1))
    ids = torch.randint(3, 50, (2, 8))
    model.train()
    assert not torch.equal(model(ids).hidden, model(ids).hidden)
    model.eval()
    assert torch.equal(model(ids).hidden, model(ids).hidden)


# -- pre-training heads --------------------------------------------------------------------------


def test_mlm_decoder_is_tied_to_word_embeddings():
    torch.manual_seed(0)
    model = BertForPreTraining(TINY).eval()
    d, v = TINY.d_model, TINY.vocab_size
    # no second [V, d] matrix: the head owns only dense (d*d + d), LayerNorm (2d), output bias (V); NSP: 2d + 2
    assert n_params(model) == n_params(model.bert) + (d * d + d) + 2 * d + v + (2 * d + 2)
    ids = torch.randint(3, 50, (2, 6))
    out = model(ids)
    assert out.mlm_logits.shape == (2, 6, v) and out.nsp_logits.shape == (2, 2)
    transform = model.mlm.norm(F.gelu(model.mlm.dense(out.hidden)))
    torch.testing.assert_close(out.mlm_logits, transform @ model.bert.embeddings.word.weight.T + model.mlm.bias)
    # the MLM loss trains the embedding table through the decoder too
    model.zero_grad()
    F.cross_entropy(out.mlm_logits.reshape(-1, v), ids.reshape(-1)).backward()
    grad_with_decoder = model.bert.embeddings.word.weight.grad.clone()
    unused_rows = torch.ones(v, dtype=torch.bool)
    unused_rows[ids.unique()] = False
    assert grad_with_decoder[unused_rows].abs().sum() > 0  # rows never looked up still get the decoder's gradient


# -- card 4: ticket classification ---------------------------------------------------------------


def test_sequence_classification_learns():
    torch.manual_seed(0)
    model = BertForSequenceClassification(TINY, n_classes=3)
    ids = torch.randint(3, 50, (6, 8))
    ids[:, 0] = CLS
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert model(ids).shape == (6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_classifier_on_an_existing_encoder():
    bert = tiny_model()
    clf = BertForSequenceClassification(TINY, 4, bert=bert)
    assert clf.bert is bert
    with pytest.raises(ConfigError, match="config"):
        BertForSequenceClassification(TINY.replace(n_layers=1), 4, bert=bert)
    with pytest.raises(ConfigError, match="n_classes=0"):
        BertForSequenceClassification(TINY, 0)


# -- card 5: cross-encoder re-ranker -------------------------------------------------------------


def test_pair_inputs_layout():
    batch = pair_inputs([[10, 11], [12]], [[20, 21, 22], [23]], cls_id=CLS, sep_id=SEP, pad_id=0, max_length=16)
    assert batch.input_ids.tolist() == [[CLS, 10, 11, SEP, 20, 21, 22, SEP], [CLS, 12, SEP, 23, SEP, 0, 0, 0]]
    assert batch.token_type_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 8, [1] * 5 + [0] * 3]


def test_pair_inputs_truncates_the_document_only():
    batch = pair_inputs([[10, 11]], [[20, 21, 22, 23]], cls_id=CLS, sep_id=SEP, max_length=7)
    assert batch.input_ids.tolist() == [[CLS, 10, 11, SEP, 20, 21, SEP]]
    with pytest.raises(DataError, match="query 0 has 5 tokens"):
        pair_inputs([[3] * 5], [[4]], cls_id=CLS, sep_id=SEP, max_length=7)
    with pytest.raises(DataError, match="2 queries but 1 documents"):
        pair_inputs([[3], [4]], [[5]], cls_id=CLS, sep_id=SEP)


def test_cross_encoder_scores_and_learns():
    torch.manual_seed(0)
    model = BertCrossEncoder(TINY, cls_id=CLS, sep_id=SEP)
    queries = [[5, 6], [7, 8, 9], [5, 6], [7, 8, 9]]
    docs = [[5, 6, 10], [7, 8, 9, 11], [30, 31], [40, 41, 42]]  # relevant docs share the query's tokens
    relevant = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert model.score_pairs(queries, docs).shape == (4,)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.binary_cross_entropy_with_logits(model.score_pairs(queries, docs), relevant)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    scores = model.score_pairs(queries, docs)
    assert scores[:2].min() > scores[2:].max()


# -- bad input: archlab errors naming the value, before any compute -----------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=torch.tensor([[1, 50]])), "input_ids holds 50, outside \\[0, vocab_size=50\\)"),
        (dict(input_ids=torch.tensor([[1, -1]])), "input_ids holds -1"),
        (dict(input_ids=torch.ones(1, 17, dtype=torch.long)), "N=17 tokens but max_len=16"),
        (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), "N=0"),
        (dict(input_ids=torch.ones(4, dtype=torch.long)), "must be \\[B, N\\]"),
        (dict(input_ids=torch.ones(1, 4)), "integer tensor"),
        (dict(input_ids=torch.ones(1, 4, dtype=torch.long), token_type_ids=torch.tensor([[0, 1, 2, 0]])),
         "token_type_ids holds 2, outside \\[0, type_vocab_size=2\\)"),
        (dict(input_ids=torch.ones(1, 4, dtype=torch.long), token_type_ids=torch.zeros(1, 3, dtype=torch.long)),
         "token_type_ids must have the shape"),
        (dict(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(2, 4)),
         "attention_mask must have"),
        (dict(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 2, 0]])),
         "only 0 \\(padding\\) and 1"),
    ],
)  # fmt: skip
def test_bad_input_raises_shape_error(kwargs, match):
    model = tiny_model()
    ids = kwargs.pop("input_ids")
    with pytest.raises(ShapeError, match=match):
        model(ids, **kwargs)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
        (dict(pad_id=50), "pad_id=50 must be in \\[0, vocab_size=50\\)"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(max_len=0), "max_len=0"),
        (dict(backend="flash"), "backend"),
    ],
)
def test_bad_config_raises_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TINY.replace(**overrides)


def test_config_json_round_trip():
    assert BertConfig.from_json(TINY.to_json()) == TINY


# -- presets -------------------------------------------------------------------------------------


def test_presets_build_and_count():
    """bert-base: 109,482,240 parameters, the count of Hugging Face's BertModel (pooler included)."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = build_model("bert-base")
        theirs = transformers.BertModel(transformers.BertConfig())
    assert isinstance(ours, BertModel)
    assert n_params(ours) == n_params(theirs) == 109_482_240
    with torch.device("meta"):
        assert n_params(build_model("bert-mini")) == 11_170_560
        assert n_params(build_model("minilm-l6")) == 22_713_216  # all-MiniLM-L6-v2's tensors, see test_minilm
    mini = get_config("minilm-l6")
    assert (mini.n_layers, mini.d_model, mini.n_heads, mini.d_ff, mini.vocab_size, mini.max_len) == (
        6, 384, 12, 1536, 30522, 512)  # fmt: skip
