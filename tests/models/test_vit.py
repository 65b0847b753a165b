"""The Vision Transformer against the deck's card: patches, linear projection, [class] token, positions, encoder."""

from __future__ import annotations

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model, get_config
from archlab.models.vit import ViT, ViTConfig


def small(**overrides) -> ViTConfig:
    base = dict(image_size=32, patch_size=8, n_channels=3, d_model=24, n_heads=3, n_layers=1, d_ff=48, n_classes=5)
    return ViTConfig(**{**base, **overrides})


# ------------------------------------------------------------------------------------------------
# patches and sequence length
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size, patch_size, n_patches",
    [(224, 16, 196), (224, 14, 256), (224, 32, 49), (32, 8, 16), (8, 2, 16), (8, 4, 4)],
)
def test_number_of_patches_and_sequence_length(image_size, patch_size, n_patches):
    """``(H / P)^2`` patches, and one more token, the [class] token, in the encoder's sequence."""
    config = small(image_size=image_size, patch_size=patch_size, d_model=8, n_heads=2, d_ff=8)
    assert config.n_patches == (image_size // patch_size) ** 2 == n_patches
    assert config.seq_len == 1 + n_patches
    model = ViT(config).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert model.embed_patches(x).shape == (2, n_patches, 8)
        assert model.hidden_states(x).shape == (2, 1 + n_patches, 8)
        assert model(x).shape == (2, 5)
    assert model.positional.embedding.weight.shape == (1 + n_patches, 8)


def test_patch_embedding_is_flatten_then_linear_projection():
    """The deck: cut P x P patches, flatten each, project linearly. Written out by hand in float64."""
    torch.manual_seed(0)
    model = ViT(small()).double()
    P, d = 8, 24
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    E = model.patch_embed.weight.reshape(d, 3 * P * P)  # [d, C P P], flattened (c, row, col) like the patches
    b = model.patch_embed.bias
    expected = []
    for row in range(32 // P):  # raster order: left to right, top to bottom
        for col in range(32 // P):
            patch = x[:, :, row * P : (row + 1) * P, col * P : (col + 1) * P]  # [B, C, P, P]
            expected.append(patch.reshape(2, -1) @ E.T + b)  # flatten, then linear projection
    expected = torch.stack(expected, dim=1)  # [B, n_patches, d]
    torch.testing.assert_close(model.embed_patches(x), expected, atol=1e-12, rtol=0)

    # the same with unfold + one matmul: all patches at once
    patches = x.unfold(2, P, P).unfold(3, P, P)  # [B, C, 4, 4, P, P]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * P * P)
    torch.testing.assert_close(model.embed_patches(x), patches @ E.T + b, atol=1e-12, rtol=0)


def test_embedding_prepends_class_token_and_adds_positions():
    torch.manual_seed(0)
    model = ViT(small()).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = model.embed(x)
    pos = model.positional.embedding.weight
    torch.testing.assert_close(tokens[:, 0], (model.cls_token[0, 0] + pos[0]).expand(2, -1), atol=0, rtol=0)
    torch.testing.assert_close(tokens[:, 1:], model.embed_patches(x) + pos[1:], atol=0, rtol=0)


def test_classification_reads_the_class_token():
    torch.manual_seed(0)
    model = ViT(small()).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    hidden = model.hidden_states(x)
    torch.testing.assert_close(model(x), model.head(hidden[:, 0]), atol=0, rtol=0)
    headless = ViT(small(n_classes=0)).double().eval()
    assert headless.head is None
    assert headless(x).shape == (2, 24)
    mean = ViT(small(pooling="mean")).double().eval()
    torch.testing.assert_close(mean(x), mean.head(mean.hidden_states(x)[:, 1:].mean(1)), atol=0, rtol=0)


def test_float32_pixels_into_float64_model():
    model = ViT(small()).double().eval()
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x.double()), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# bad configs and bad inputs: archlab errors naming the values, before any computation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30, patch_size=8), "image_size=30 is not divisible by patch_size=8"),
        (dict(d_model=24, n_heads=5), "d_model=24 is not divisible by n_heads=5"),
        (dict(patch_size=0), "patch_size=0 must be > 0"),
        (dict(n_classes=-1), "n_classes=-1 must be >= 0"),
        (dict(pooling="max"), "pooling: unknown value 'max'"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(backend="flash"), "backend: unknown value 'flash'"),
    ],
)
def test_bad_config_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small(**overrides)


def test_unknown_config_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'patch_size'"):
        ViTConfig.from_dict({"patch_sise": 16})


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((2, 1, 32, 32), torch.float32, "C=1 channels, but the model takes n_channels=3"),
        ((2, 3, 30, 30), torch.float32, "image size 30x30 is not a multiple of patch_size=8"),
        ((2, 3, 32, 36), torch.float32, "image size 32x36 is not a multiple of patch_size=8"),
        ((2, 3, 16, 16), torch.float32, "image size 16x16 != the model's image_size=32"),
        ((3, 32, 32), torch.float32, r"must be \[B, C, H, W\], got \(3, 32, 32\)"),
        ((2, 3, 32, 32), torch.uint8, "dtype torch.uint8"),
    ],
)
def test_bad_pixels_raise_shape_error(shape, dtype, message):
    model = ViT(small())
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ShapeError, match=message):
        model(x)


# ------------------------------------------------------------------------------------------------
# presets and registry
# ------------------------------------------------------------------------------------------------


def count_by_formula(c: ViTConfig) -> int:
    """Parameters counted from the architecture, term by term."""
    d, f = c.d_model, c.d_ff
    patch = c.n_channels * c.patch_size**2 * d + d  # E and its bias
    tokens = d + c.seq_len * d  # [class] + position table
    block = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 2 * (2 * d)  # attention + MLP + two LayerNorms
    return patch + tokens + c.n_layers * block + 2 * d + (d * c.n_classes + c.n_classes)


@pytest.mark.parametrize(
    "preset, params",
    [("vit-base-16", 86_567_656), ("vit-large-16", 304_326_632), ("vit-tiny", 136_138)],
)
def test_preset_parameter_counts(preset, params):
    with torch.device("meta"):  # no memory, no init time
        model = build_model(preset)
    assert sum(p.numel() for p in model.parameters()) == params == count_by_formula(model.config)


def test_presets():
    base = get_config("vit-base-16")
    assert (base.image_size, base.patch_size, base.d_model, base.n_layers, base.n_heads, base.d_ff, base.n_classes) == (
        224, 16, 768, 12, 12, 3072, 1000,
    )  # fmt: skip
    tiny = get_config("vit-tiny")
    assert (tiny.image_size, tiny.n_channels, tiny.n_patches, tiny.n_classes) == (8, 1, 16, 10)
    assert isinstance(build_model("vit-tiny"), ViT)


def test_config_json_round_trip():
    config = small(pooling="mean", dropout=0.1)
    assert ViTConfig.from_json(config.to_json()) == config


# ------------------------------------------------------------------------------------------------
# learning: scikit-learn's 8x8 digits (shipped with the package, no download)
# ------------------------------------------------------------------------------------------------


def digits(n: int | None = None):
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8], pixels 0..16 -> 0..1
    y = torch.tensor(data.target)
    return (x, y) if n is None else (x[:n], y[:n])


def test_vit_tiny_loss_falls_on_real_digits():
    """A few full-batch Adam steps on 128 real digits. Without warmup a ViT starts slowly (lr 1e-3 makes
    the loss bounce around ln 10 for ~40 steps, exactly as Hugging Face's ViT does from the same weights),
    so the fast test uses a small learning rate."""
    torch.manual_seed(0)
    x, y = digits(128)
    model = build_model("vit-tiny").train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(2.30, abs=0.1)  # chance: ln 10
    assert max(losses[-5:]) < 0.8 * losses[0], losses


@pytest.mark.slow
def test_vit_tiny_learns_digits():
    """Trained on 1,500 digits (20 epochs, warmup), it classifies the 297 held-out ones with > 90% accuracy."""
    torch.manual_seed(0)
    x, y = digits()
    perm = torch.randperm(len(x))
    train, test = perm[:1500], perm[1500:]
    model = build_model("vit-tiny").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    for _ in range(20):
        for batch in train[torch.randperm(len(train))].split(64):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            warmup.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
    assert accuracy > 0.9, accuracy
