"""Hostile inputs to the families' forward: refused with a ShapeError naming the input, before computing."""

from __future__ import annotations

import pytest
import torch

from archlab.errors import ShapeError
from archlab.models import build_model

TOKEN_PRESETS = ["gpt-nano", "llama-tiny", "bert-mini", "textcnn-deck", "gmlp-cls-tiny", "rwkv-tiny",
                 "transformer-xl-tiny", "lstm-lm-small", "elmo-small", "wavenet-small"]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
@pytest.mark.parametrize("preset", TOKEN_PRESETS)
def test_token_ids_of_a_dtype_no_embedding_takes_are_refused_naming_it(preset, dtype):
    # before: "Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, Int"
    model = build_model(preset).eval()
    with pytest.raises(ShapeError, match=rf"input_ids has dtype {dtype}; .*torch.long \(int64\) or (torch.)?int32"):
        model(torch.ones(2, 5, dtype=dtype))


@pytest.mark.parametrize("preset, inputs", [
    ("transformer-tiny", (torch.ones(1, 4, dtype=torch.uint8), torch.ones(1, 3, dtype=torch.long))),
    ("rnnsearch-small", (torch.ones(1, 4, dtype=torch.uint8), torch.ones(1, 3, dtype=torch.long))),
])  # fmt: skip
def test_seq2seq_source_ids_of_another_dtype_are_refused(preset, inputs):
    with pytest.raises(ShapeError, match=r"src_ids has dtype torch.uint8"):
        build_model(preset).eval()(*inputs)


@pytest.mark.parametrize("kwargs, name", [
    ({}, "input_ids"), ({"attention_mask": [[1, 1, 1]]}, "attention_mask"),
    ({"token_type_ids": [[0, 0, 0]]}, "token_type_ids"),
])  # fmt: skip
def test_bert_names_an_input_that_is_not_a_tensor(kwargs, name):
    model = build_model("bert-mini").eval()
    ids = [[1, 2, 3]] if name == "input_ids" else torch.tensor([[1, 2, 3]])
    with pytest.raises(ShapeError, match=rf"{name} must be a \[B, N\] tensor, got list"):
        model(ids, **kwargs)


@pytest.mark.parametrize("mask", [torch.full((2, 6), 2), torch.full((2, 6), 0.5)], ids=["two", "half"])
def test_the_encoder_decoder_refuses_a_source_mask_other_than_0_1(mask):
    # BERT and the decoders refused it; the encoder-decoder read any non-zero as a real token
    model = build_model("transformer-tiny").eval()
    src, tgt = torch.randint(0, 100, (2, 6)), torch.randint(0, 100, (2, 4))
    with pytest.raises(ShapeError, match=r"src_mask must hold only 0 \(padding\) and 1 \(real token\)"):
        model(src, tgt, mask)
    memory = model.encode(src)
    with pytest.raises(ShapeError, match=r"memory_mask must hold only 0 \(padding\) and 1"):
        model.decoder_step(memory, mask)
