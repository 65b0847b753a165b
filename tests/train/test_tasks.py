"""Each task's objective against a direct computation on the model's own outputs (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, DataError
from archlab.generation import generate
from archlab.models.bert import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel
from archlab.models.registry import TASKS, build_model
from archlab.train.tasks import TASK_OBJECTIVES, get_task, seq2seq_generation_metrics, summarize, task_loss

TIGHT = dict(rtol=1e-12, atol=1e-12)
BERT = BertConfig(vocab_size=50, max_len=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0, attn_dropout=0.0)


def objective(task, model, batch, eps):
    terms, stats = get_task(task).run(model, batch, eps)
    return task_loss(terms, get_task(task).counts(batch)), stats


def test_every_registry_task_has_an_objective():
    assert tuple(TASK_OBJECTIVES) == TASKS
    with pytest.raises(ConfigError, match="unknown task 'lmm'.*'lm'"):
        get_task("lmm")


def test_lm_objective_is_smoothed_cross_entropy_of_next_token_logits():
    torch.manual_seed(0)
    model = build_model("gpt-nano").double()
    ids = torch.randint(0, 256, (3, 9))
    labels = ids[:, 1:].clone()
    labels[0, 5:] = -100
    batch = {"input_ids": ids[:, :-1], "labels": labels}
    with torch.no_grad():  # the logits path (evaluation); training takes GPT's fused loss, tests/train/test_fused_lm.py
        loss, stats = objective("lm", model, batch, 0.1)
    logits = model(batch["input_ids"])
    want = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(loss, want, **TIGHT)
    nll = F.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(stats["nll"], nll, **TIGHT)
    assert int(stats["targets"]) == 21 and int(stats["tokens"]) == 24 and int(stats["samples"]) == 3
    metrics = summarize({k: float(v) for k, v in stats.items()}, "lm")
    assert metrics["ppl"] == pytest.approx(torch.exp(nll / 21).item(), rel=1e-12)


def mlm_batch(nsp: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[1:, 6] = ids[1:, 6]
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}
    if nsp:
        batch["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    return batch


@pytest.mark.parametrize("nsp", [False, True])
def test_mlm_objective_is_masked_token_loss_plus_next_sentence_loss(nsp):
    torch.manual_seed(0)
    model = BertForPreTraining(BERT).double()
    batch = mlm_batch(nsp)
    loss, stats = objective("mlm", model, batch, 0.0)
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    want = F.cross_entropy(out.mlm_logits.reshape(-1, 50), batch["labels"].reshape(-1))
    if nsp:
        want = want + F.cross_entropy(out.nsp_logits, batch["next_sentence_label"])
        assert int(stats["nsp_count"]) == 4
    else:
        assert "nsp_count" not in stats
    torch.testing.assert_close(loss, want, **TIGHT)
    assert int(stats["targets"]) == 7


def test_mlm_needs_a_model_with_pretraining_heads():
    with pytest.raises(ConfigError, match="mlm_logits.*BertForPreTraining"):
        objective("mlm", BertModel(BERT), mlm_batch(False), 0.0)


def test_seq2seq_objective_scores_tgt_out_given_tgt_in():
    torch.manual_seed(0)
    model = build_model("transformer-tiny", dropout=0.0).double()
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, 128, (2, 7), generator=g)
    src_mask = torch.ones(2, 7, dtype=torch.bool)
    src_mask[1, 5:] = False
    tgt = torch.randint(3, 128, (2, 6), generator=g)
    tgt_out = tgt.clone()
    tgt_out[0, 4:] = -100
    batch = {"src_ids": src, "src_mask": src_mask, "tgt_in": tgt, "tgt_out": tgt_out}
    loss, stats = objective("seq2seq", model, batch, 0.1)
    logits = model(src, tgt, src_mask=src_mask)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 128), tgt_out.reshape(-1), label_smoothing=0.1), **TIGHT)
    assert int(stats["targets"]) == 10 and int(stats["tokens"]) == 26


def test_classification_objective_with_and_without_attention_mask():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BERT, 3).double().eval()
    ids = torch.randint(1, 50, (4, 6))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    labels = torch.tensor([0, 2, 1, 2])
    loss, stats = objective("classification", model, {"inputs": ids, "attention_mask": mask, "labels": labels}, 0.0)
    torch.testing.assert_close(loss, F.cross_entropy(model(ids, attention_mask=mask), labels), **TIGHT)
    assert int(stats["targets"]) == 4
    vit = build_model("vit-tiny").double()
    images = torch.randn(3, vit.config.n_channels, vit.config.image_size, vit.config.image_size, dtype=torch.float64)
    labels = torch.tensor([1, 0, 9])
    loss, stats = objective("classification", vit, {"inputs": images, "labels": labels}, 0.1)
    torch.testing.assert_close(loss, F.cross_entropy(vit(images), labels, label_smoothing=0.1), **TIGHT)
    assert int(stats["tokens"]) == 0 and int(stats["samples"]) == 3  # pixels are not tokens


def test_custom_objective_is_what_compute_loss_returns():
    from train_fakes import RegressionModel, RegressionSource

    model = RegressionModel()
    batch = next(iter(RegressionSource()))
    loss, stats = objective("custom", model, batch, 0.0)
    torch.testing.assert_close(loss, model.compute_loss(batch)[0])
    assert summarize({k: float(v) for k, v in stats.items()}, "custom")["mse"] == pytest.approx(loss.item())
    with pytest.raises(ConfigError, match="compute_loss"):
        objective("custom", torch.nn.Linear(2, 2), batch, 0.0)


def test_missing_keys_raise_data_errors_before_the_model_runs():
    with pytest.raises(DataError, match="a lm batch needs keys input_ids, labels; missing labels"):
        get_task("lm").counts({"input_ids": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(DataError, match="missing tgt_out"):
        get_task("seq2seq").counts({"src_ids": 0, "tgt_in": 0})
    with pytest.raises(DataError, match="must be a dict"):
        get_task("classification").counts([1, 2])


def test_generation_metrics_count_exact_matches_and_bleu():
    """Targets set to the model's own greedy output are matched exactly; corrupting one row is not."""
    torch.manual_seed(0)
    model = build_model("transformer-tiny").eval()
    bos = 1
    src = torch.randint(3, 128, (4, 6))
    greedy = generate(model.decoder_step(model.encode(src)), torch.full((4, 1), bos), max_new_tokens=6,
                      cache=model.new_cache())[:, 1:]  # fmt: skip
    eos = next(t for t in range(128) if not (greedy == t).any())  # an id greedy decoding never stops on
    tgt_in = torch.cat([torch.full((4, 1), bos), greedy[:, :-1]], dim=1)
    batch = {"src_ids": src, "tgt_in": tgt_in, "tgt_out": greedy}
    model.train()
    result = seq2seq_generation_metrics(model, [batch], eos_id=eos)
    assert result == {"exact_match": 1.0, "bleu": pytest.approx(100.0)}
    assert model.training  # the mode is restored
    wrong = dict(batch, tgt_out=greedy.clone())
    wrong["tgt_out"][0, 0] = (greedy[0, 0] + 1) % 128
    result = seq2seq_generation_metrics(model, [wrong], eos_id=eos)
    assert result["exact_match"] == 0.75 and result["bleu"] < 100
    padded = dict(batch, tgt_out=greedy.clone())
    padded["tgt_out"][:, 4:] = -100  # only the first 4 positions are scored
    padded["tgt_out"][:, 3] = eos  # ... and the reference ends with EOS, which greedy never emits
    assert seq2seq_generation_metrics(model, [padded], eos_id=eos)["exact_match"] == 0.0


def test_custom_perplexities_are_exp_of_the_mean_nll():
    stats = {"batches": 2.0, "forward_nll": 1.0 + 3.0, "forward_ppl": math.exp(1.0) + math.exp(3.0), "mse": 5.0}
    metrics = summarize(stats, "custom")
    assert metrics["forward_nll"] == 2.0 and metrics["mse"] == 2.5
    assert metrics["forward_ppl"] == pytest.approx(math.exp(2.0), rel=1e-12)  # not (e + e^3) / 2
