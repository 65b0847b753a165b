import torch

from archlab.labs import run_lab
from archlab.labs.vision import SHAPES, encoder_tokens
from archlab.models import build_model


def test_encoder_tokens_is_one_plus_the_patch_grid():
    with torch.device("meta"):
        model = build_model("vit-tiny")  # 8 x 8 digits, 2 x 2 patches
    assert encoder_tokens(model, 8, channels=1) == 1 + (8 // 2) ** 2 == model.config.seq_len


def test_quick_run_counts_256_patches_for_vit_l14_at_224():
    result = run_lab("vit-tokens", quick=True).result
    rows = {r[0]: r for r in result.rows}
    for name, (image, patch, *_) in SHAPES.items():
        assert rows[name][2] == 1 + (image // patch) ** 2
    assert rows["ViT-L/14 @224"][2] == 257 and rows["ViT-B/16 @224"][2] == 197
    assert rows["ViT-L/14 @224"][4] > 1.0  # fp32 GB: the "~1 GB" half holds
    assert result.verdict == "not supported"  # the card's 196 tokens do not
