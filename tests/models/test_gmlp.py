"""gMLP: the spatial gating unit against its equation, its near-identity init, causality of the
language model (gradient test), the classifier's bidirectionality, shapes, errors, presets, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.interop.io import load_model, save_model
from archlab.models import build_model, get_config
from archlab.models.gmlp import (
    GMLP,
    GMLPBlock,
    GMLPClassifier,
    GMLPClassifierConfig,
    GMLPConfig,
    SpatialGatingUnit,
)
from archlab.models.registry import FAMILIES


def tiny(**overrides) -> GMLPConfig:
    return GMLPConfig(**{**dict(vocab_size=37, max_len=12, d_model=16, d_ffn=24, n_layers=2), **overrides})


def randomized(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn (the near-zero spatial init would make token mixing almost invisible)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m


# ------------------------------------------------------------------------------------------------
# the spatial gating unit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_sgu_equals_its_equation(causal):
    """s(Z)[b, i, c] = Z1[b, i, c] * (sum_j W[i, j] LN(Z2)[b, j, c] + b_i), W masked to j <= i when causal."""
    sgu = randomized(SpatialGatingUnit(6, 9, causal=causal)).double()
    z = torch.randn(2, 7, 6, dtype=torch.float64)  # n = 7 < N = 9: the top-left block of W
    z1, z2 = z[..., :3], z[..., 3:]
    mu, var = z2.mean(-1, keepdim=True), z2.var(-1, unbiased=False, keepdim=True)
    z2 = (z2 - mu) / torch.sqrt(var + 1e-5) * sgu.norm.weight + sgu.norm.bias
    expected = torch.empty(2, 7, 3, dtype=torch.float64)
    for i in range(7):
        gate = sgu.bias[i] + sum(sgu.weight[i, j] * z2[:, j] for j in range(7) if j <= i or not causal)
        expected[:, i] = z1[:, i] * gate
    torch.testing.assert_close(sgu(z), expected, atol=1e-12, rtol=0)


def test_sgu_init_is_near_identity_on_the_gate():
    """The paper: W near zero and b = 1, so s(Z) = Z1 (1 + O(eps)) and each block starts as a plain FFN."""
    torch.manual_seed(0)
    sgu = SpatialGatingUnit(32, 16, causal=False, init_eps=1e-3).double()
    assert torch.all(sgu.bias == 1) and sgu.weight.abs().max() <= 1e-3 / 16
    z = torch.randn(4, 16, 32, dtype=torch.float64)
    z1, z2n = z[..., :16], sgu.norm(z[..., 16:])
    deviation = (sgu(z) - z1).abs()
    assert deviation.max() <= 1e-3 * (z1.abs() * z2n.abs().max()).max()
    assert deviation.max() > 0  # the gate does read the other tokens, a little
    with torch.no_grad():
        sgu.weight.zero_()
    assert torch.equal(sgu(z), z1)  # W = 0, b = 1: exactly the identity on Z1
    # the whole block at init is a feed-forward block on each token: x + V(first half of GELU(U LN(x)))
    block = GMLPBlock(8, 32, 16, causal=True).double()
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    ffn = x + block.proj_out(F.gelu(block.proj_in(block.norm(x)))[..., :16])
    assert (block(x) - ffn).abs().max() < 1e-3 * ffn.abs().max()


def test_causal_sgu_masks_the_upper_triangle():
    sgu = randomized(SpatialGatingUnit(4, 5, causal=True))
    w = sgu.spatial_weight(5)
    assert torch.equal(w, torch.tril(w)) and torch.all(torch.tril(w) == torch.tril(sgu.weight))
    bidirectional = randomized(SpatialGatingUnit(4, 5, causal=False))
    assert torch.equal(bidirectional.spatial_weight(3), bidirectional.weight[:3, :3])


# ------------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------------


def _jacobian_blocks(stack, n: int) -> torch.Tensor:
    """|d out[:, t] / d x[:, s]| summed over batch and features: [n (t), n (s)]."""
    x = torch.randn(2, n, stack.config.d_model, dtype=torch.float64, requires_grad=True)
    out = stack.mix(x)
    rows = []
    for t in range(n):
        (g,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        rows.append(g.abs().sum(dim=(0, 2)))
    return torch.stack(rows)


def test_language_model_never_depends_on_later_tokens():
    m = randomized(GMLP(tiny())).double()
    dependence = _jacobian_blocks(m.gmlp, 10)
    assert torch.all(dependence.triu(diagonal=1) == 0)  # exactly zero: later tokens never reach earlier outputs
    lower = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.all(dependence[lower] > 0)  # and every token up to t does


def test_classifier_is_bidirectional():
    m = randomized(GMLPClassifier(GMLPClassifierConfig(**tiny().to_dict(), n_classes=3))).double()
    dependence = _jacobian_blocks(m.gmlp, 10)
    assert torch.all(dependence > 0)


def test_shapes_and_prefix_consistency():
    lm = randomized(GMLP(tiny())).eval()
    ids = torch.randint(0, 37, (3, 12))
    with torch.no_grad():
        full = lm(ids)
        assert full.shape == (3, 12, 37)
        # a shorter input uses the top-left block of W: the causal outputs of a prefix do not change
        torch.testing.assert_close(lm(ids[:, :5]), full[:, :5], atol=1e-6, rtol=0)
    cls = GMLPClassifier(GMLPClassifierConfig(**tiny().to_dict(), n_classes=4))
    assert cls(ids).shape == (3, 4)
    assert cls(ids[:, :3]).shape == (3, 4)


def test_registry_and_presets():
    assert FAMILIES["gmlp"].task == "lm" and FAMILIES["gmlp-classifier"].task == "classification"
    assert isinstance(build_model("gmlp-lm-tiny"), GMLP)
    assert isinstance(build_model("gmlp-cls-tiny"), GMLPClassifier)
    config = get_config("gmlp-cls-tiny")
    assert GMLPClassifierConfig.from_json(config.to_json()) == config
    assert tiny(d_ffn=None).ffn_width == 6 * 16


@pytest.mark.parametrize("preset", ["gmlp-lm-tiny", "gmlp-cls-tiny"])
def test_save_and_load_round_trip(preset, tmp_path):
    m = randomized(build_model(preset)).eval()
    save_model(m, tmp_path / preset)
    back = load_model(tmp_path / preset)
    assert type(back) is type(m) and back.config == m.config
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_ffn=25), "d_ffn=25 must be even"),
        (dict(d_model=0), "d_model=0 must be > 0"),
        (dict(max_len=-1), "max_len=-1 must be > 0"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(n_layers=2.0), "n_layers=2.0 must be an integer"),
        (dict(max_lenght=4), "did you mean 'max_len'"),
    ],
)
def test_bad_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny().replace(**overrides)


def test_bad_inputs():
    lm = GMLP(tiny())
    with pytest.raises(ShapeError, match="id 37, outside the vocabulary"):
        lm(torch.tensor([[0, 37]]))
    with pytest.raises(ShapeError, match="length 13, past max_len=12"):
        lm(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ShapeError, match="integer token ids"):
        lm(torch.zeros(1, 4))
    with pytest.raises(ShapeError, match=r"\[B, N\]"):
        lm(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="n_classes=1 must be >= 2"):
        GMLPClassifierConfig(**tiny().to_dict(), n_classes=1)
    with pytest.raises(ConfigError, match="needs a GMLPConfig"):
        GMLP(GMLPClassifierConfig(**tiny().to_dict()))
    with pytest.raises(ConfigError, match="needs a GMLPClassifierConfig"):
        GMLPClassifier(tiny())


# ------------------------------------------------------------------------------------------------
# a few training steps per preset
# ------------------------------------------------------------------------------------------------


def _train(model, batch_fn, steps=15, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_fn(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lm_preset_trains():
    torch.manual_seed(0)
    m = build_model("gmlp-lm-tiny").train()
    data = torch.tensor([list(range(40, 56)) * 4] * 4)[:, :64]  # [4, 64], a repeating pattern

    def loss(model):
        logits = model(data[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), data[:, 1:].reshape(-1))

    losses = _train(m, loss)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_classifier_preset_trains():
    torch.manual_seed(0)
    m = build_model("gmlp-cls-tiny").train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (32, 20), generator=g)
    labels = (ids < 128).sum(dim=1).gt(10).long()  # more low bytes than high ones

    def loss(model):
        return F.cross_entropy(model(ids), labels)

    losses = _train(m, loss)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
