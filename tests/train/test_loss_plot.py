"""loss.png: the training and validation curves, and the unigram baseline as a labelled line when the run knows it."""

from __future__ import annotations

import pytest

from archlab.train import logs
from archlab.train.logs import loss_figure
from archlab.train.run import RunSpec, train_run

RECORDS = {"train": [{"step": s, "loss": 6.0 - 0.1 * s} for s in range(1, 11)], "eval": [{"step": 10, "loss": 5.2}]}


def labelled(fig) -> dict[str, object]:
    (ax,) = fig.axes
    return {line.get_label(): line for line in ax.lines}


def test_the_baseline_is_a_labelled_horizontal_line():
    lines = labelled(loss_figure(RECORDS, unigram_loss=5.5))
    assert set(lines) == {"train loss", "eval loss", "unigram baseline 5.50"}
    assert list(lines["unigram baseline 5.50"].get_ydata()) == [5.5, 5.5]
    (ax,) = loss_figure(RECORDS, unigram_loss=5.5).axes
    assert "unigram baseline 5.50" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(labelled(loss_figure(RECORDS))) == {"train loss", "eval loss"}  # no baseline known: none drawn


def test_a_run_draws_its_unigram_baseline(tmp_path, monkeypatch):
    drawn = []
    real = logs.loss_figure
    monkeypatch.setattr(logs, "loss_figure", lambda records, **kw: drawn.append(kw) or real(records, **kw))
    spec = RunSpec("gpt-nano", {"n_layers": 1}, {"max_bytes": 60_000, "vocab_size": 300, "seq_len": 16},
                   {"steps": 2, "batch_size": 4, "eval_batches": 1, "progress": False, "tensorboard": False})  # fmt: skip
    summary = train_run(spec, tmp_path / "run", echo=lambda line: None)
    assert drawn == [{"unigram_loss": pytest.approx(summary["unigram_loss"])}]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
