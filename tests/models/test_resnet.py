"""The ResNet-style CNN (He et al. 2015, CIFAR networks): the paper's parameter counts, the block and its
option-A shortcut written out, plain vs residual gradients at 20 / 56 / 110 layers, 1202 layers finite, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import training

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model, get_config
from archlab.models.mlp import gradient_vs_depth
from archlab.models.resnet import BasicBlock, ResNet, ResNetConfig


def digits():
    return training.digits(flat=False)


def count_by_formula(c: ResNetConfig) -> int:
    """Stem conv + BN; per block two 3x3 convs (no bias) and two BNs; the classifier. Option A adds nothing."""
    total, c_in = c.in_channels * c.widths[0] * 9 + 2 * c.widths[0], c.widths[0]
    for w in c.widths:
        for _ in range(c.blocks_per_stage):
            total += c_in * w * 9 + w * w * 9 + 4 * w
            c_in = w
    return total + c_in * c.n_classes + c.n_classes


@pytest.mark.parametrize(
    "preset, depth, params",
    [("resnet-20", 20, 269_722), ("resnet-56", 56, 853_018), ("resnet-110", 110, 1_727_962),
     ("resnet-plain-56", 56, 853_018), ("resnet-digits", 20, 269_434)],
)  # fmt: skip
def test_preset_depths_and_parameter_counts(preset, depth, params):
    """The paper's table 6: ResNet-20 0.27M, 56 0.85M, 110 1.7M parameters (1202: next section)."""
    config = get_config(preset)
    assert config.depth == depth
    with torch.device("meta"):
        model = build_model(preset)
    assert sum(p.numel() for p in model.parameters()) == params == count_by_formula(config)
    weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weighted) == depth


def test_block_equation_and_option_a_shortcut():
    """``relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))``; where the block halves the map and doubles the
    width, the shortcut is ``x[:, :, ::2, ::2]`` with zero channels appended (float64, eval-mode BN)."""
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2, residual=True).double().eval()
    for bn in (block.bn1, block.bn2):  # non-trivial running statistics and affine parameters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)

    def bn(h, m):
        return (h - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]  # fmt: skip

    f = bn(F.conv2d(torch.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1)),
                    block.conv2.weight, padding=1), block.bn2)  # fmt: skip
    shortcut = torch.zeros(2, 8, 3, 3, dtype=torch.float64)
    shortcut[:, :4] = x[:, :, ::2, ::2]
    torch.testing.assert_close(block(x), torch.relu(f + shortcut), atol=1e-10, rtol=0)
    plain = BasicBlock(4, 8, stride=2, residual=False).double().eval()
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(plain(x), torch.relu(f), atol=1e-10, rtol=0)


def test_same_width_block_shortcut_is_identity():
    block = BasicBlock(5, 5, stride=1, residual=True).double().eval()
    x = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    assert torch.equal(block.shortcut(x), x)


def test_stage_shapes_and_global_pooling():
    model = ResNet(ResNetConfig(in_channels=1, widths=(4, 6, 8), blocks_per_stage=1)).eval()
    x = torch.randn(2, 1, 8, 8)
    h = F.relu(model.stem_bn(model.stem(x)))
    sizes = []
    for stage in model.stages:
        h = stage(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
    torch.testing.assert_close(model.features(x), h.mean(dim=(2, 3)))
    assert model(x).shape == (2, 10)
    headless = ResNet(ResNetConfig(in_channels=1, widths=(4, 6, 8), blocks_per_stage=1, n_classes=0))
    assert headless.head is None and headless(x).shape == (2, 8)


# ------------------------------------------------------------------------------------------------
# card 4: depth
# ------------------------------------------------------------------------------------------------


def test_plain_gradient_drifts_exponentially_with_depth_residual_does_not():
    """First-layer vs output-layer gradient norm at 20, 56, 110 layers (random 1x8x8 batch, fresh nets).
    Plain (with BatchNorm, as in the paper): ~7x, ~2e3x, ~5e6x: it explodes exponentially with depth.
    Residual: ~0.5 at every depth."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    plain = gradient_vs_depth(get_config("resnet-digits-plain"), (20, 56, 110), x, y)
    residual = gradient_vs_depth(get_config("resnet-digits"), (20, 56, 110), x, y)
    assert plain[56].ratio > 30 * plain[20].ratio and plain[110].ratio > 300 * plain[56].ratio, plain
    assert plain[110].ratio > 1e4 * plain[20].ratio
    for depth in (56, 110):
        assert 0.5 < residual[depth].ratio / residual[20].ratio < 2, residual
        assert residual[depth].ratio < 1


def test_1202_layers_forward_backward_finite():
    """ResNet-1202 (the card's 1000 layers; the paper's 19.4M parameters) on 3x8x8 inputs: builds, and a
    training step's gradients are finite."""
    torch.manual_seed(0)
    model = build_model("resnet-1202")
    assert model.config.depth == 1202
    assert sum(p.numel() for p in model.parameters()) == 19_421_274 == count_by_formula(model.config)
    loss = F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([3, 7]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_with_depth():
    config = get_config("resnet-20")
    assert config.with_depth(110).blocks_per_stage == 18 and config.with_depth(1202).depth == 1202
    with pytest.raises(ConfigError, match=r"depth=21 must be 6 n \+ 2 for 3 stages .* e.g. 8, 20, 56, 110"):
        config.with_depth(21)
    assert ResNetConfig(widths=(8, 16)).with_depth(18).blocks_per_stage == 4


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(widths=()), "at least one stage"),
        (dict(widths=(16, 0)), r"widths\[1\]=0 must be > 0"),
        (dict(blocks_per_stage=0), "blocks_per_stage=0 must be > 0"),
        (dict(n_classes=-1), "n_classes=-1 must be >= 0"),
        (dict(in_channels=0), "in_channels=0 must be > 0"),
        (dict(residual=1), "residual=1 must be true or false"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ResNetConfig(**overrides)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(2, 3, 8, 8), "C=3 channels, but the model takes in_channels=1"),
        (torch.zeros(2, 1, 3, 8), "3x8 pixels are too small for 3 stages, which halve the map 2 times: need at least 4x4"),
        (torch.zeros(2, 8, 8), r"must be \[B, C, H, W\], got \(2, 8, 8\)"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "dtype torch.uint8"),
    ],
)
def test_bad_images(x, message):
    with pytest.raises(ShapeError, match=message):
        build_model("resnet-digits")(x)


def test_config_json_round_trip():
    config = get_config("resnet-plain-110")
    assert ResNetConfig.from_json(config.to_json()) == config


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, channels, size, learns",
    [("resnet-digits", 1, 8, True), ("resnet-digits-plain", 1, 8, True), ("resnet-20", 3, 16, True),
     ("resnet-plain-20", 3, 16, True), ("resnet-56", 3, 8, True), ("resnet-plain-56", 3, 8, False),
     ("resnet-110", 3, 8, True), ("resnet-plain-110", 3, 8, False)],
)  # fmt: skip
def test_presets_train_a_few_steps(preset, channels, size, learns):
    """Digits for the digits presets; for the CIFAR ones, tiny synthetic images (class = brightest channel
    plus the quadrant of a bright square), smaller than 32x32 to stay fast (the net is fully convolutional).

    Every preset takes 4 AdamW steps with finite losses, and every parameter tensor gets a finite, non-zero
    gradient. The residual nets and the 20-layer plain ones learn: the loss falls by more than 15% in 4 steps
    (it fell by 24-99% on seeds 0-2, with native and with AVX2 kernels). The 56- and 110-layer plain nets are card 4's
    degradation: their loss wanders near ln 10 ~ 2.3 (up or down by rounding noise), so no fall is asserted
    for them; that they fail to learn is the slow test below.
    """
    torch.manual_seed(0)
    if channels == 1:
        x, y = digits()
        x, y = x[:64], y[:64]
    else:
        y = torch.randint(0, 10, (32,))
        x = 0.1 * torch.randn(32, 3, size, size)
        half = size // 2
        for i, label in enumerate(y.tolist()):
            x[i, label % 3] += 0.5
            r, c = divmod(label % 4, 2)
            x[i, :, r * half : (r + 1) * half, c * half : (c + 1) * half] += 1.0
    model = build_model(preset).train()
    losses = training.fit(model, lambda: F.cross_entropy(model(x), y), 4)
    assert all(math.isfinite(v) for v in losses), losses
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    if learns:
        assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.slow
def test_plain_110_fails_on_digits_resnet_110_learns():
    """3 epochs on 1500 digits, 297 held out: ResNet-110 > 90%, plain-110 near chance, plain-20 > 75%."""

    def accuracy(preset: str, **overrides) -> float:
        return training.digits_accuracy(preset, 3, flat=False, **overrides)

    plain_20 = accuracy("resnet-digits-plain")
    plain_110 = accuracy("resnet-digits-plain", blocks_per_stage=18)
    resnet_110 = accuracy("resnet-digits", blocks_per_stage=18)
    print(f"digits accuracy after 3 epochs: plain-20 {plain_20:.3f}, plain-110 {plain_110:.3f}, ResNet-110 {resnet_110:.3f}")
    assert plain_20 > 0.75
    assert plain_110 < 0.3
    assert resnet_110 > 0.9
