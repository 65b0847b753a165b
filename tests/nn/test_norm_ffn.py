"""Norms and feed-forward networks (``archlab/nn/norm.py``, ``archlab/nn/feedforward.py``) against hand-written math.

* ``LayerNorm`` against ``torch.nn.LayerNorm`` (same gamma/beta) and against ``layer_norm_equation``
  (the deck's mu, sigma, z-score, gain/offset steps), and ``layer_norm_equation`` itself against the
  steps written as Python loops; normalisation is per token (changing one token changes only its row).
* ``RMSNorm`` against ``torch.nn.RMSNorm`` and ``g * x / sqrt(mean(x^2) + eps)``.
* ``FeedForward`` against ``max(0, x W1 + b1) W2 + b2`` by hand; the paper's size (d=512, d_ff=2048)
  has ``2 * 512 * 2048 + 2048 + 512`` parameters; ``GatedFeedForward`` against ``(act(x W) * (x V)) W2``.
* builders by name, and unknown names / wrong widths rejected with clear messages.

float64, max abs error <= 1e-10; fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.nn.feedforward import FeedForward, GatedFeedForward, build_feedforward
from archlab.nn.norm import LayerNorm, RMSNorm, build_norm, layer_norm_equation

F64 = torch.float64
TOL = 1e-10


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------


def deck_layer_norm_one_token(x: list[float], gamma: list[float], beta: list[float], eps: float) -> list[float]:
    """The deck's four steps for one token vector, in plain Python."""
    d = len(x)
    mu = sum(x) / d
    sigma = math.sqrt(sum((xi - mu) ** 2 for xi in x) / d + eps)
    return [g * (xi - mu) / sigma + b for xi, g, b in zip(x, gamma, beta, strict=True)]


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layer_norm_equals_torch_and_the_equation(eps):
    torch.manual_seed(0)
    d = 10
    ours = randomize(LayerNorm(d, eps=eps).double(), 1)
    ref = torch.nn.LayerNorm(d, eps=eps, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    x = torch.randn(3, 7, d, dtype=F64) * 4 + 2
    out = ours(x)
    assert max_err(out, ref(x)) <= TOL
    assert max_err(out, layer_norm_equation(x, ours.weight, ours.bias, eps)) <= TOL
    # the equation itself, against the deck's steps written out per token
    token = x[1, 3].tolist()
    by_hand = deck_layer_norm_one_token(token, ours.weight.tolist(), ours.bias.tolist(), eps)
    assert max_err(out[1, 3], torch.tensor(by_hand, dtype=F64)) <= TOL
    # gamma and beta really enter (not the identity-initialised values)
    assert max_err(out, F.layer_norm(x, (d,), eps=eps)) > 0.1


def test_layer_norm_without_bias_and_default_init():
    torch.manual_seed(2)
    x = torch.randn(4, 6, dtype=F64)
    ln = LayerNorm(6, bias=False).double()
    assert ln.bias is None and sum(p.numel() for p in ln.parameters()) == 6
    assert max_err(ln(x), layer_norm_equation(x, torch.ones(6, dtype=F64), None)) <= TOL
    out = ln(x)
    assert max_err(out.mean(-1), torch.zeros(4, dtype=F64)) <= TOL
    assert max_err(out.pow(2).mean(-1), x.var(-1, unbiased=False) / (x.var(-1, unbiased=False) + 1e-5)) <= TOL


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_is_per_token(kind):
    """Changing one token's vector changes only that token's output (no statistics across the sequence)."""
    torch.manual_seed(3)
    norm = randomize(build_norm(kind, 8).double(), 4)
    x = torch.randn(2, 5, 8, dtype=F64)
    y = x.clone()
    y[1, 2] = torch.randn(8, dtype=F64) * 100
    out_x, out_y = norm(x), norm(y)
    changed = (out_x - out_y).abs().amax(dim=-1) > 1e-6
    expected = torch.zeros(2, 5, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(changed, expected)
    assert torch.equal(out_x[0], out_y[0]) and torch.equal(out_x[1, :2], out_y[1, :2])
    # and a token's output is the norm of that token alone
    assert max_err(norm(x[1, 2][None]), out_x[1, 2][None]) <= TOL


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_rms_norm_equals_torch_and_formula(eps):
    torch.manual_seed(5)
    d = 9
    ours = randomize(RMSNorm(d, eps=eps).double(), 6)
    ref = torch.nn.RMSNorm(d, eps=eps, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    x = torch.randn(2, 4, d, dtype=F64) * 3 + 1
    out = ours(x)
    assert max_err(out, ref(x)) <= TOL
    formula = ours.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert max_err(out, formula) <= TOL
    token = x[1, 2].tolist()
    rms = math.sqrt(sum(v * v for v in token) / d + eps)
    by_hand = torch.tensor([g * v / rms for g, v in zip(ours.weight.tolist(), token, strict=True)], dtype=F64)
    assert max_err(out[1, 2], by_hand) <= TOL
    assert [n for n, _ in ours.named_parameters()] == ["weight"]  # no centring, no offset


def test_build_norm():
    assert isinstance(build_norm("layernorm", 4), LayerNorm)
    rms = build_norm("rmsnorm", 4, eps=1e-3)
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-3


# ------------------------------------------------------------------------------------------------
# Feed-forward
# ------------------------------------------------------------------------------------------------


def test_feedforward_relu_by_hand():
    torch.manual_seed(7)
    ffn = randomize(FeedForward(6, 24).double(), 8)
    x = torch.randn(2, 5, 6, dtype=F64)
    W1, b1 = ffn.w1.weight.T, ffn.w1.bias  # W1 in R^{d x d_ff}
    W2, b2 = ffn.w2.weight.T, ffn.w2.bias
    expected = torch.clamp(x @ W1 + b1, min=0.0) @ W2 + b2
    assert max_err(ffn(x), expected) <= TOL
    assert (x @ W1 + b1).min() < 0  # the ReLU actually cuts something
    # position-wise: each token on its own
    assert max_err(ffn(x[:, 3:4]), ffn(x)[:, 3:4]) <= TOL


def gelu_erf(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def silu(h):
    return h * torch.sigmoid(h)


@pytest.mark.parametrize(("activation", "fn"), [("gelu", gelu_erf), ("silu", silu), ("gelu_tanh", gelu_tanh)])
def test_feedforward_other_activations(activation, fn):
    torch.manual_seed(9)
    ffn = randomize(FeedForward(4, 8, activation=activation).double(), 10)
    x = torch.randn(3, 4, dtype=F64)
    expected = fn(x @ ffn.w1.weight.T + ffn.w1.bias) @ ffn.w2.weight.T + ffn.w2.bias
    assert max_err(ffn(x), expected) <= TOL


def test_feedforward_paper_size_parameter_count():
    ffn = FeedForward(512, 2048)
    assert sum(p.numel() for p in ffn.parameters()) == 2 * 512 * 2048 + 2048 + 512
    assert ffn.w1.weight.shape == (2048, 512) and ffn.w2.weight.shape == (512, 2048)
    assert sum(p.numel() for p in FeedForward(512, 2048, bias=False).parameters()) == 2 * 512 * 2048


@pytest.mark.parametrize(("gate", "act"), [("glu", torch.sigmoid), ("geglu", gelu_erf), ("swiglu", silu)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_feedforward_by_hand(gate, act, bias):
    torch.manual_seed(11)
    d, d_ff = 6, 10
    ffn = randomize(GatedFeedForward(d, d_ff, gate=gate, bias=bias).double(), 12)
    W = ffn.w_in.weight[:d_ff].T  # rows of w_in: W then V
    V = ffn.w_in.weight[d_ff:].T
    bW = ffn.w_in.bias[:d_ff] if bias else 0.0
    bV = ffn.w_in.bias[d_ff:] if bias else 0.0
    x = torch.randn(2, 3, d, dtype=F64)
    hidden = act(x @ W + bW) * (x @ V + bV)
    expected = hidden @ ffn.w2.weight.T + (ffn.w2.bias if bias else 0.0)
    assert max_err(ffn(x), expected) <= TOL
    n_params = 2 * d * d_ff + d_ff * d + ((2 * d_ff + d) if bias else 0)
    assert sum(p.numel() for p in ffn.parameters()) == n_params


def test_build_feedforward_names():
    for kind in ("relu", "gelu", "gelu_tanh", "silu"):
        ffn = build_feedforward(kind, 4, 8)
        assert type(ffn) is FeedForward and ffn.activation == kind
    for kind in ("glu", "geglu", "swiglu"):
        ffn = build_feedforward(kind, 4, 8, bias=False)
        assert type(ffn) is GatedFeedForward and ffn.gate == kind
        assert ffn.w_in.weight.shape == (16, 4) and ffn.w_in.bias is None


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "name", "suggestion"),
    [("norm", "layrnorm", "layernorm"), ("norm", "rms_norm", "rmsnorm"), ("ffn", "swiglue", "swiglu"), ("ffn", "reul", "relu")],
)
def test_unknown_names_suggest_the_closest(builder, name, suggestion):
    with pytest.raises(ConfigError) as info:
        build_norm(name, 4) if builder == "norm" else build_feedforward(name, 4, 8)
    message = str(info.value)
    assert f"{name!r}" in message
    assert f"did you mean {suggestion!r}" in message


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_wrong_width_names_both_widths(cls):
    norm = cls(8)
    with pytest.raises(ShapeError) as info:
        norm(torch.zeros(2, 3, 6))
    message = str(info.value)
    assert "d_model=8" in message and "width 6" in message and cls.__name__ in message


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="d_model=0"):
        LayerNorm(0)
    with pytest.raises(ConfigError, match="eps=0"):
        RMSNorm(4, eps=0)
    with pytest.raises(ConfigError, match="d_ff=-1"):
        FeedForward(4, -1)
    with pytest.raises(ConfigError, match="dropout=1.0"):
        GatedFeedForward(4, 8, dropout=1.0)
