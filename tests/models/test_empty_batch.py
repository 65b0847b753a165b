"""Every family refuses an empty batch (B = 0) alike, with a ShapeError naming its input and shape, before computing."""

from __future__ import annotations

import re

import pytest
import torch

from archlab.errors import ShapeError
from archlab.models import build_model

IDS = torch.zeros(0, 8, dtype=torch.long)
CASES = {  # a small preset of each family -> its forward's inputs with B = 0, and the name (a regex) of the refused one
    "gpt-nano": ((IDS,), "input_ids"),
    "llama-tiny": ((IDS,), "input_ids"),
    "bert-mini": ((IDS,), "input_ids"),
    "textcnn-deck": ((IDS,), "input_ids"),
    "gmlp-cls-tiny": ((IDS,), "input_ids"),
    "rwkv-tiny": ((IDS,), "input_ids"),
    "transformer-xl-tiny": ((IDS,), "input_ids"),
    "lstm-lm-small": ((IDS,), "input_ids"),
    "elmo-small": ((IDS,), "input_ids"),
    "wavenet-small": ((IDS,), "input_ids"),
    "transformer-tiny": ((IDS, IDS), "(src|tgt)_ids"),  # both empty: either is named
    "rnnsearch-small": ((IDS, IDS), "(src|tgt)_ids"),
    "vit-tiny": ((torch.zeros(0, 1, 8, 8),), "pixel_values"),
    "resnet-digits": ((torch.zeros(0, 1, 8, 8),), "images"),
    "mlp-digits": ((torch.zeros(0, 64),), "inputs"),
}
# the token families' shared check says "[B, N] with B, N >= 1"; the others "an empty batch (B=0, ...)"
EMPTY = r"(is an empty batch \(B=0, shape {shape}\)|must be \[B, N\] with B, N >= 1, got shape {shape})"


@pytest.mark.parametrize("preset", sorted(CASES))
def test_an_empty_batch_is_refused_naming_the_input_and_shape(preset):
    inputs, name = CASES[preset]
    model = build_model(preset).eval()
    with pytest.raises(ShapeError, match="^" + name + " " + EMPTY.format(shape=re.escape(str(tuple(inputs[0].shape))))):
        model(*inputs)
