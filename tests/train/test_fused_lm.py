"""The lm task trains GPT through its fused LM head + loss (``GPT.forward(labels=)``): the same loss and the
same gradients as logits + cross-entropy, in float64; evaluation keeps the logits path (accuracy)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_fakes import LMSource

from archlab.errors import ConfigError
from archlab.models.registry import build_model
from archlab.train import TrainConfig, Trainer
from archlab.train.tasks import get_task, has_fused_lm_loss, summarize, task_loss

TIGHT = dict(rtol=1e-10, atol=1e-12)


class LogitsOnly(nn.Module):
    """The same GPT seen through a forward that only returns logits: the task's plain path."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids):
        return self.gpt(input_ids)


def nano():
    torch.manual_seed(0)
    return build_model("gpt-nano", max_len=32).double()


def ragged_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (3, 12), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, 6:] = -100
    labels[2, :2] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_path_gives_the_loss_and_gradients_of_logits_plus_cross_entropy(eps):
    model, batch = nano(), ragged_batch()
    task = get_task("lm")
    terms, stats = task.run(model, batch, eps)  # grad enabled: the fused path
    loss = task_loss(terms, task.counts(batch))
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(batch["input_ids"])
    want = F.cross_entropy(logits.reshape(-1, 256), batch["labels"].reshape(-1), label_smoothing=eps)
    want.backward()
    torch.testing.assert_close(loss, want, **TIGHT)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, **TIGHT, msg=name)

    kept = int((batch["labels"] != -100).sum())
    assert int(stats["targets"]) == kept == 26 and "correct" not in stats  # no logits, no accuracy
    if eps:
        assert "nll" not in stats  # the smoothed loss is not the NLL
    else:
        torch.testing.assert_close(stats["nll"], want.detach() * kept, **TIGHT)
        metrics = summarize({k: float(v) for k, v in stats.items()}, "lm")
        assert metrics["ppl"] == pytest.approx(want.exp().item(), rel=1e-10) and "accuracy" not in metrics


def test_evaluation_without_gradients_keeps_the_logits_path_and_its_accuracy():
    model, batch = nano(), ragged_batch()
    with torch.no_grad():
        _, stats = get_task("lm").run(model, batch, 0.0)
    assert "correct" in stats
    keep = batch["labels"] != -100
    hits = (model(batch["input_ids"]).argmax(-1) == batch["labels"]) & keep
    assert int(stats["correct"]) == int(hits.sum())


def test_a_trainer_step_on_the_fused_path_equals_one_on_logits():
    config = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup=1, label_smoothing=0.1, eval_every=0, ckpt_every=0,
                         progress=False, tensorboard=False)  # fmt: skip
    fused = Trainer(nano(), config, LMSource(batch_size=4, seq_len=10, ragged=True))
    plain = Trainer(LogitsOnly(nano()), config.replace(task="lm"), LMSource(batch_size=4, seq_len=10, ragged=True))
    assert has_fused_lm_loss(fused.module) and not has_fused_lm_loss(plain.module)
    a, b = fused.fit(), plain.fit()
    assert a.train["loss"] == pytest.approx(b.train["loss"], rel=1e-10)
    for (name, x), y in zip(fused.model.state_dict().items(), plain.model.gpt.state_dict().values()):
        torch.testing.assert_close(x, y, **TIGHT, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing torch._dynamo warns about torch.jit
def test_wrappers_are_seen_through():
    model = nano()
    assert has_fused_lm_loss(model) and has_fused_lm_loss(torch.compile(model))  # compile is lazy: nothing runs
    assert not has_fused_lm_loss(build_model("rnn-lm-small"))


def test_labels_do_not_go_with_a_cache():
    model = nano()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="labels= computes the loss of whole sequences"):
        model(ids, labels=ids, cache=model.new_cache())
    torch.testing.assert_close(model(ids, labels=ids), model.loss(ids, ids), rtol=0, atol=0)


def test_the_fused_loss_runs_under_bf16_autocast_in_float32():
    model = build_model("gpt-nano", max_len=32)
    batch = ragged_batch()
    exact = model(batch["input_ids"], labels=batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch["input_ids"], labels=batch["labels"])
    loss.backward()  # bf16 hidden states, float32 head: the gradients flow back in each one's dtype
    assert loss.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    assert abs(loss.item() - exact.item()) < 0.05  # bf16 blocks, float32 loss
