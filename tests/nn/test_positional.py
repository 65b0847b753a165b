"""Positional encodings (``archlab/nn/positional.py``) checked against the formulas, computed independently.

* sinusoidal: ``sinusoid_table`` against the deck's ``PE(pos, 2i) = sin(pos / 10000^{2i/d})``,
  ``PE(pos, 2i+1) = cos(...)`` evaluated with the ``math`` module; ``add_to_input`` against table slices;
  the deck's claim that ``PE(pos + k)`` is one fixed linear map of ``PE(pos)``, fitted by least squares on
  some positions, checked on held-out ones and against the block-diagonal rotation the trigonometry predicts;
* learned: the 32,001st token of a ``max_len=32000`` table raises ``ShapeError`` before any lookup;
* RoPE: scores depend only on ``m - n``, norms are kept, offsets agree with a longer pass, a partial
  ``rotary_dim`` leaves the tail alone, and everything matches a complex-number formulation;
* ALiBi: slopes against literal powers of two (the paper's rule for non powers of two) and the bias
  against ``-m_h |offset + i - j|`` written as loops.

float64, max abs error <= 1e-10 unless stated; fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.nn import positional
from archlab.nn.positional import (
    ALiBi,
    LearnedPositionalEncoding,
    NoPositionalEncoding,
    RotaryPositionalEncoding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
    build_positional,
    check_rope_width,
    sinusoid_table,
)

F64 = torch.float64
TOL = 1e-10


def max_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=F64)
    b = torch.as_tensor(b, dtype=F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def deck_pe(pos: int, d: int) -> list[float]:
    """The deck's formula, one position, plain Python floats."""
    row = []
    for j in range(d):
        two_i = j - (j % 2)
        angle = pos / (10000.0 ** (two_i / d))
        row.append(math.sin(angle) if j % 2 == 0 else math.cos(angle))
    return row


# ------------------------------------------------------------------------------------------------
# Sinusoidal
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 7])
def test_sinusoid_table_equals_deck_formula(d):
    positions = [0, 1, 2, 3, 17, 511, 1000, 4999, 5000, 5001, 12345, 99999]
    for pos in positions:
        row = sinusoid_table(1, d, offset=pos, dtype=F64)[0]
        assert max_err(row, deck_pe(pos, d)) <= TOL, pos
    # a whole table starting at an odd offset, row by row
    table = sinusoid_table(40, d, offset=4987, dtype=F64)
    expected = [deck_pe(4987 + r, d) for r in range(40)]
    assert table.shape == (40, d)
    assert max_err(table, expected) <= TOL


def test_sinusoid_table_float32_is_rounded_from_float64():
    t64 = sinusoid_table(10, 32, offset=5000, dtype=F64)
    t32 = sinusoid_table(10, 32, offset=5000)
    assert t32.dtype == torch.float32
    assert torch.equal(t32, t64.float())


def test_add_to_input_is_x_plus_table_slice_at_offset():
    torch.manual_seed(0)
    d = 12
    pe = SinusoidalPositionalEncoding(d, initial_length=64)
    x = torch.randn(2, 5, d, dtype=F64)
    for offset in (0, 1, 7, 59):
        out = pe.add_to_input(x, offset=offset)
        assert max_err(out, x + sinusoid_table(5, d, offset=offset, dtype=F64)) <= TOL
        expected = x + torch.tensor([deck_pe(offset + r, d) for r in range(5)], dtype=F64)
        assert max_err(out, expected) <= TOL


def test_sinusoidal_grows_beyond_initial_length():
    torch.manual_seed(1)
    d = 8
    pe = SinusoidalPositionalEncoding(d, initial_length=4)
    assert pe.table.shape[0] == 4
    x = torch.randn(1, 6, d, dtype=F64)
    out = pe.add_to_input(x, offset=5000)  # far past the table: positions 5000..5005
    assert pe.table.shape[0] >= 5006
    expected = x + torch.tensor([deck_pe(5000 + r, d) for r in range(6)], dtype=F64)
    assert max_err(out, expected) <= TOL
    # earlier positions are still right after growth
    assert max_err(pe.add_to_input(x, offset=0), x + sinusoid_table(6, d, dtype=F64)) <= TOL


def test_sinusoidal_float64_after_float32_run_is_not_float32_rounded():
    """Regression: the table was a float32 buffer, so float64 inputs got float32-rounded encodings (~3e-8)."""
    pe = SinusoidalPositionalEncoding(8, initial_length=16)
    pe.add_to_input(torch.zeros(1, 3, 8), offset=5)  # a float32 call first
    pe.double()
    out = pe.add_to_input(torch.zeros(1, 3, 8, dtype=F64), offset=100)
    assert out.dtype == F64
    assert max_err(out[0], [deck_pe(100 + r, 8) for r in range(3)]) <= 1e-15


def test_sinusoidal_uses_only_the_input_hook():
    torch.manual_seed(2)
    pe = SinusoidalPositionalEncoding(8)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    q2, k2 = pe.transform_qk(q, k, offset=3)
    assert q2 is q and k2 is k
    assert pe.attention_bias(3, 5, offset=2) is None
    assert pe.state_dict() == {}  # nothing learned, nothing saved


def _rotation_blocks(d: int, k: int) -> np.ndarray:
    """The map the trigonometry predicts: for row vectors, ``PE(pos + k) = PE(pos) @ M`` with
    ``M`` block diagonal, block ``i`` = ``[[cos k w_i, -sin k w_i], [sin k w_i, cos k w_i]]``."""
    m = np.zeros((d, d))
    for i in range(d // 2):
        w = 1.0 / 10000.0 ** (2 * i / d)
        c, s = math.cos(k * w), math.sin(k * w)
        m[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, -s], [s, c]]
    return m


@pytest.mark.parametrize("k", [1, 5, 137])
def test_pe_pos_plus_k_is_one_linear_map_of_pe_pos(k):
    d = 16
    rng = np.random.default_rng(k)
    train = np.sort(rng.choice(20000, size=200, replace=False))
    held_out = np.array([3, 4, 999, 5000, 5001, 12345, 25000, 31999])
    assert not set(held_out) & set(train)

    def pe(positions):
        return np.stack([sinusoid_table(1, d, offset=int(p), dtype=F64)[0].numpy() for p in positions])

    fitted, *_ = np.linalg.lstsq(pe(train), pe(train + k), rcond=None)  # PE(pos+k) ~= PE(pos) @ fitted
    assert np.abs(pe(held_out) @ fitted - pe(held_out + k)).max() <= 1e-8
    assert np.abs(fitted - _rotation_blocks(d, k)).max() <= 1e-8
    # and the predicted rotation itself maps the table exactly
    assert np.abs(pe(held_out) @ _rotation_blocks(d, k) - pe(held_out + k)).max() <= TOL


# ------------------------------------------------------------------------------------------------
# Learned
# ------------------------------------------------------------------------------------------------


def test_learned_past_its_table_raises_before_lookup():
    """The card's case: trained up to 32,000 tokens; the 32,001st token (position 32000) must fail."""
    torch.manual_seed(3)
    pe = LearnedPositionalEncoding(32000, 2)
    lookups = []
    pe.embedding.register_forward_pre_hook(lambda module, args: lookups.append(args))
    x = torch.zeros(1, 32001, 2)
    with pytest.raises(ShapeError) as info:
        pe.add_to_input(x)
    message = str(info.value)
    assert "32000" in message and "max_len=32000" in message
    assert "position 32000" in message
    assert lookups == []  # raised before any computation
    # offset: 10 tokens starting at 31991 end at position 32000: also past the table
    with pytest.raises(ShapeError, match=r"position 32000 .*max_len=32000"):
        pe.add_to_input(torch.zeros(1, 10, 2), offset=31991)
    assert lookups == []
    # exactly filling the table is fine
    assert pe.add_to_input(torch.zeros(1, 32000, 2)).shape == (1, 32000, 2)
    assert pe.add_to_input(torch.zeros(1, 9, 2), offset=31991).shape == (1, 9, 2)


def test_learned_offset_adds_the_right_rows():
    torch.manual_seed(4)
    pe = LearnedPositionalEncoding(20, 6).double()
    x = torch.randn(3, 4, 6, dtype=F64)
    for offset in (0, 3, 16):
        out = pe.add_to_input(x, offset=offset)
        assert max_err(out, x + pe.embedding.weight[offset : offset + 4]) <= TOL
    # cached decoding: one token at a time equals the whole sequence
    steps = torch.cat([pe.add_to_input(x[:, t : t + 1], offset=t) for t in range(4)], dim=1)
    assert max_err(steps, pe.add_to_input(x)) <= TOL


def test_learned_bad_width_and_offset():
    pe = LearnedPositionalEncoding(8, 4)
    with pytest.raises(ShapeError, match="width 5.*d_model=4"):
        pe.add_to_input(torch.zeros(1, 2, 5))
    with pytest.raises(ShapeError, match="offset=-1"):
        pe.add_to_input(torch.zeros(1, 2, 4), offset=-1)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------


def _repeat_rows(vec: torch.Tensor, n: int) -> torch.Tensor:
    return vec.expand(n, vec.shape[-1]).clone()


@pytest.mark.parametrize("offset", [0, 1000])
def test_rope_scores_depend_only_on_m_minus_n(offset):
    torch.manual_seed(5)
    d, n = 16, 12
    rope = RotaryPositionalEncoding(d)
    q, k = torch.randn(d, dtype=F64), torch.randn(d, dtype=F64)
    rq = rope.rotate(_repeat_rows(q, n), offset=offset)  # row m = R_{offset+m} q
    rk = rope.rotate(_repeat_rows(k, n), offset=offset)
    scores = rq @ rk.T  # scores[m, n] = <R_m q, R_n k>
    for shift in range(1, 5):
        assert max_err(scores[shift:, shift:], scores[:-shift, :-shift]) <= TOL
    # and across offsets: same relative distance, very different absolute positions
    far_q = rope.rotate(q[None], offset=offset + 4321)
    far_k = rope.rotate(k[None], offset=offset + 4321 - 3)
    assert abs((far_q @ far_k.T).item() - scores[3, 0].item()) <= TOL
    # the positions do matter: the score is not the unrotated one
    assert abs(scores[3, 0].item() - (q @ k).item()) > 1e-3


def test_rope_preserves_norms():
    torch.manual_seed(6)
    rope = RotaryPositionalEncoding(32)
    x = torch.randn(2, 3, 50, 32, dtype=F64)
    y = rope.rotate(x, offset=7)
    assert max_err(y.norm(dim=-1), x.norm(dim=-1)) <= TOL
    assert max_err(rope.rotate(x[..., :1, :], offset=0), x[..., :1, :]) <= TOL  # R_0 = identity
    assert (y - x).abs().max() > 0.1


def test_rope_offset_equals_rows_of_a_longer_pass():
    torch.manual_seed(7)
    rope = RotaryPositionalEncoding(8)
    x = torch.randn(2, 2, 20, 8, dtype=F64)
    whole = rope.rotate(x)
    for start, stop in ((0, 1), (5, 6), (3, 11), (19, 20)):
        assert max_err(rope.rotate(x[..., start:stop, :], offset=start), whole[..., start:stop, :]) <= TOL
    # transform_qk uses the same offset for q and k
    q2, k2 = rope.transform_qk(x[..., 4:9, :], x[..., 4:9, :] * 2, offset=4)
    assert max_err(q2, whole[..., 4:9, :]) <= TOL
    assert max_err(k2, 2 * whole[..., 4:9, :]) <= TOL
    # a far offset grows the cos/sin cache
    far = RotaryPositionalEncoding(8)
    assert max_err(far.rotate(x[..., :2, :], offset=3000), _rope_complex(x[..., :2, :], 3000, 8)) <= TOL


def _rope_complex(x: torch.Tensor, offset: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Independent formulation: feature ``i`` and ``i + r/2`` are the real and imaginary parts of
    ``z_i``; position ``p`` multiplies ``z_i`` by ``exp(1j * p * base^(-2i/r))``. numpy complex128."""
    a = x.detach().numpy()
    half = rotary_dim // 2
    z = a[..., :half] + 1j * a[..., half:rotary_dim]
    pos = np.arange(offset, offset + a.shape[-2], dtype=np.float64)[:, None]
    theta = base ** (-2.0 * np.arange(half, dtype=np.float64) / rotary_dim)
    z = z * np.exp(1j * pos * theta)
    out = np.concatenate([z.real, z.imag, a[..., rotary_dim:]], axis=-1)
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    ("d_head", "rotary_dim", "base", "offset"), [(16, None, 10000.0, 0), (16, None, 500.0, 37), (12, 8, 10000.0, 5)]
)
def test_rope_matches_complex_formulation(d_head, rotary_dim, base, offset):
    torch.manual_seed(8)
    rope = RotaryPositionalEncoding(d_head, base=base, rotary_dim=rotary_dim)
    x = torch.randn(2, 3, 9, d_head, dtype=F64)
    expected = _rope_complex(x, offset, rotary_dim or d_head, base)
    assert max_err(rope.rotate(x, offset=offset), expected) <= TOL


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_rope_transform_qk_rotates_grouped_heads_like_the_complex_formulation(rotary_dim):
    """q with A = 6 heads and k with G = 2 (grouped-query attention) rotated together (one pass over both) equal
    the independent complex formulation, each at the same positions; then q and k of other head widths or batches
    go one at a time."""
    torch.manual_seed(11)
    rope = RotaryPositionalEncoding(12, rotary_dim=rotary_dim)
    q, k = torch.randn(2, 6, 4, 12, dtype=F64), torch.randn(2, 2, 4, 12, dtype=F64)
    rq, rk = rope.transform_qk(q, k, offset=21)
    assert rq.shape == q.shape and rk.shape == k.shape
    assert max_err(rq, _rope_complex(q, 21, rotary_dim or 12)) <= TOL
    assert max_err(rk, _rope_complex(k, 21, rotary_dim or 12)) <= TOL
    rq, rk = rope.transform_qk(q[:1], k, offset=3)  # batches differ: rotated apart
    assert max_err(rq, _rope_complex(q[:1], 3, rotary_dim or 12)) <= TOL
    assert max_err(rk, _rope_complex(k, 3, rotary_dim or 12)) <= TOL


def test_rope_partial_leaves_tail_unchanged():
    torch.manual_seed(9)
    rope = RotaryPositionalEncoding(12, rotary_dim=4)
    x = torch.randn(1, 2, 10, 12, dtype=F64)
    y = rope.rotate(x, offset=3)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert (y[..., :4] - x[..., :4]).abs().max() > 0.1
    assert max_err(y[..., :4], RotaryPositionalEncoding(4).rotate(x[..., :4], offset=3)) <= TOL


def test_rope_float32_matches_float64_and_cache_keyed_on_dtype():
    torch.manual_seed(10)
    rope = RotaryPositionalEncoding(8)
    x = torch.randn(1, 1, 5, 8, dtype=F64)
    y64 = rope.rotate(x, offset=2000)
    y32 = rope.rotate(x.float(), offset=2000)
    assert y32.dtype == torch.float32
    assert max_err(y32, y64) <= 1e-5
    assert max_err(rope.rotate(x, offset=2000), _rope_complex(x, 2000, 8)) <= TOL  # back to float64: exact again


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_dtype_change_keeps_the_encodings_float64_constants(dtype):
    """``module.to(dtype)`` (a bf16 model, ``model.float()``, ``load_model``'s dtype) leaves RoPE's frequencies and
    ALiBi's slopes float64, so the rotation and the bias are the float64 equation's rounded once to ``dtype``, at any
    position: rounded to bfloat16 first, RoPE's second pair turned about 0.3 rad too far at position 200 of a
    10,000-base table, and ALiBi's distances past 256 lost their integer steps."""
    rope = RotaryPositionalEncoding(8, base=100000.0).to(dtype)
    assert rope.inv_freq.dtype == F64
    assert torch.equal(rope.inv_freq, RotaryPositionalEncoding(8, base=100000.0).inv_freq)
    x = torch.randn(1, 1, 3, 8, dtype=F64, generator=torch.Generator().manual_seed(11))
    want = _rope_complex(x, 2000, 8, base=100000.0)
    got = rope.rotate(x.to(dtype), offset=2000)
    assert got.dtype == dtype and max_err(got, want) <= (2 ** -7 if dtype == torch.bfloat16 else 1e-5) * 4
    alibi = ALiBi(12).to(dtype)
    assert alibi.slopes.dtype == F64
    bias = alibi.attention_bias(1, 1001, offset=1000)  # distances 1000 .. 0
    assert torch.equal(bias, -alibi_slopes(12)[:, None, None] * torch.arange(1000, -1, -1, dtype=F64))


def test_rope_errors():
    with pytest.raises(ConfigError, match="rotary_dim=5"):
        RotaryPositionalEncoding(8, rotary_dim=5)
    with pytest.raises(ConfigError, match="rotary_dim=10"):
        RotaryPositionalEncoding(8, rotary_dim=10)
    with pytest.raises(ShapeError, match="d_head=8.*width 6"):
        RotaryPositionalEncoding(8).rotate(torch.zeros(1, 3, 6))
    with pytest.raises(ShapeError, match="offset=-2"):
        RotaryPositionalEncoding(8).rotate(torch.zeros(1, 3, 8), offset=-2)


# ------------------------------------------------------------------------------------------------
# ALiBi
# ------------------------------------------------------------------------------------------------


def test_alibi_slopes_power_of_two():
    assert alibi_slopes(8).tolist() == [2.0**-e for e in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    assert alibi_slopes(1).tolist() == [2.0**-8]
    assert alibi_slopes(16).tolist() == [2.0 ** (-e / 2) for e in range(1, 17)]


def test_alibi_slopes_non_power_of_two():
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads (2^-1, 2^-3) for the other 2
    assert alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    # 12 heads: the 8 slopes of 8 heads, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from the 16-head list
    expected12 = [2.0**-e for e in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
    assert max_err(alibi_slopes(12), expected12) <= 1e-15
    # 3 heads: 2^-4, 2^-8 then 2^-2
    assert alibi_slopes(3).tolist() == [2.0**-4, 2.0**-8, 2.0**-2]


@pytest.mark.parametrize(("heads", "n", "m", "offset"), [(8, 5, 5, 0), (6, 1, 9, 8), (3, 4, 11, 7), (12, 3, 3, 2)])
def test_alibi_bias_is_minus_slope_times_distance(heads, n, m, offset):
    alibi = ALiBi(heads)
    bias = alibi.attention_bias(n, m, offset)
    slopes = alibi_slopes(heads).tolist()
    assert bias.shape == (heads, n, m)
    expected = [[[-slopes[h] * abs(offset + i - j) for j in range(m)] for i in range(n)] for h in range(heads)]
    assert max_err(bias, expected) <= TOL
    x = torch.randn(1, 2, 4)
    assert alibi.add_to_input(x) is x
    assert alibi.state_dict() == {}


# ------------------------------------------------------------------------------------------------
# build_positional
# ------------------------------------------------------------------------------------------------


def test_build_positional_kinds():
    assert isinstance(build_positional("sinusoidal", d_model=8, n_heads=2), SinusoidalPositionalEncoding)
    learned = build_positional("learned", d_model=8, n_heads=2, max_len=33)
    assert isinstance(learned, LearnedPositionalEncoding) and learned.max_len == 33
    rope = build_positional("rope", d_model=8, n_heads=2, rope_base=500.0)
    assert isinstance(rope, RotaryPositionalEncoding) and rope.d_head == 4 and rope.base == 500.0
    alibi = build_positional("alibi", d_model=8, n_heads=2)
    assert isinstance(alibi, ALiBi) and alibi.slopes.tolist() == [2.0**-4, 2.0**-8]
    none = build_positional("none", d_model=8, n_heads=2)
    assert isinstance(none, NoPositionalEncoding)
    x = torch.randn(1, 3, 8)
    assert none.add_to_input(x) is x and none.attention_bias(3, 3) is None


@pytest.mark.parametrize(("name", "suggestion"), [("sinusoid", "sinusoidal"), ("alibii", "alibi"), ("learnt", "learned")])
def test_build_positional_unknown_name_suggests(name, suggestion):
    with pytest.raises(ConfigError) as info:
        build_positional(name, d_model=8, n_heads=2)
    message = str(info.value)
    assert f"did you mean {suggestion!r}" in message
    assert name in message and "positional" in message


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_rope_transform_qk_heads_rotates_stacked_q_and_k_as_transform_qk(rotary_dim):
    """q (A = 6 heads) and k (G = 2) stacked on the head axis, as self-attention's one product gives them, are
    rotated as :meth:`transform_qk` rotates them apart, and as the complex formulation."""
    torch.manual_seed(12)
    rope = RotaryPositionalEncoding(12, rotary_dim=rotary_dim)
    q, k = torch.randn(2, 6, 4, 12, dtype=F64), torch.randn(2, 2, 4, 12, dtype=F64)
    both = rope.transform_qk_heads(torch.cat([q, k], dim=1), 6, offset=17)
    rq, rk = rope.transform_qk(q, k, offset=17)
    assert torch.equal(both, torch.cat([rq, rk], dim=1))
    assert max_err(both, _rope_complex(torch.cat([q, k], dim=1), 17, rotary_dim or 12)) <= TOL


def test_transform_qk_heads_default_is_transform_qk_on_the_two_parts():
    """The default hook: an encoding that leaves q, k alone returns the stacked tensor itself (no op); one that
    treats them differently gets q and k apart, as its :meth:`transform_qk` defines them."""

    class Scales(NoPositionalEncoding):
        def transform_qk(self, q, k, offset=0):
            return 2 * q, 3 * k + offset

    qk = torch.randn(1, 5, 3, 4, dtype=F64)
    for encoding in (NoPositionalEncoding(), ALiBi(3), SinusoidalPositionalEncoding(4)):
        assert encoding.transform_qk_heads(qk, 3, offset=7) is qk
    out = Scales().transform_qk_heads(qk, 3, offset=7)
    assert torch.equal(out, torch.cat([2 * qk[:, :3], 3 * qk[:, 3:] + 7], dim=1))


def test_rope_rows_kept_between_calls_follow_offset_length_and_dtype():
    """Every layer of a decoding step asks for the same positions, so RoPE keeps the last rows; calls that move
    between offsets, lengths and dtypes (and past the table's first 256 positions) still rotate exactly."""
    torch.manual_seed(13)
    rope = RotaryPositionalEncoding(8)
    x = torch.randn(1, 2, 3, 8, dtype=F64)
    for offset, n in [(5, 3), (5, 3), (5, 1), (6, 1), (5, 3), (300, 3), (5, 2), (300, 3)]:
        assert max_err(rope.rotate(x[..., :n, :], offset), _rope_complex(x[..., :n, :], offset, 8)) <= TOL
        y32 = rope.rotate(x[..., :n, :].float(), offset)
        assert y32.dtype == torch.float32 and max_err(y32, _rope_complex(x[..., :n, :], offset, 8)) <= 1e-5


def test_rope_rows_made_during_inference_serve_training_after():
    """Generation runs under ``torch.inference_mode``; the cos/sin rows RoPE keeps from it must not be inference
    tensors, or the next training step's backward fails ("Inference tensors cannot be saved for backward")."""
    rope = RotaryPositionalEncoding(8)
    x = torch.randn(1, 2, 3, 8, dtype=F64)
    with torch.inference_mode():
        rope.rotate(x, offset=4)
    y = x.clone().requires_grad_()
    rope.rotate(y, offset=4).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


# ------------------------------------------------------------------------------------------------
# hostile inputs: refused by name before any computation; huge positions cost the rows asked
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: SinusoidalPositionalEncoding(4.0), "d_model=4.0 must be an integer"),
    (lambda: SinusoidalPositionalEncoding(True), "d_model=True must be an integer"),
    (lambda: sinusoid_table(2.5, 4), "n_positions=2.5 must be an integer"),
    (lambda: LearnedPositionalEncoding(10.0, 4), "max_len=10.0 must be an integer"),
    (lambda: RotaryPositionalEncoding(7), "d_head=7 must be even"),
    (lambda: RotaryPositionalEncoding(8.0), "d_head=8.0 must be an integer"),
    (lambda: RotaryPositionalEncoding(8, rotary_dim=4.0), "rotary_dim=4.0 must be an integer"),
    (lambda: RotaryPositionalEncoding(8, base=0.0), r"base=0.0 must be a finite number > 0"),
    (lambda: RotaryPositionalEncoding(8, base=-1.0), r"base=-1.0 must be a finite number > 0"),
    (lambda: RotaryPositionalEncoding(8, base=float("nan")), r"base=nan must be a finite number > 0"),
    (lambda: RotaryPositionalEncoding(8, base="1e4"), r"base='1e4' must be a finite number > 0"),
    (lambda: ALiBi(2.0), "n_heads=2.0 must be an integer"),
    (lambda: build_positional("rope", d_model=32, n_heads=0), "n_heads=0 must be > 0"),
    (lambda: check_rope_width("rope", 32, 0), "n_heads=0 must be > 0"),
])  # fmt: skip
def test_bad_sizes_and_bases_are_refused_by_name(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_bad_run_time_arguments_raise_shape_errors():
    with pytest.raises(ShapeError, match="offset=1.5 must be an int"):
        LearnedPositionalEncoding(10, 4).add_to_input(torch.zeros(1, 2, 4), offset=1.5)
    with pytest.raises(ShapeError, match=r"RoPE rotates x \[..., N, d_head=8\], got shape \(8,\)"):
        RotaryPositionalEncoding(8).rotate(torch.ones(8))
    with pytest.raises(ShapeError, match="end=-3 must be an int >= 0"):
        RotaryPositionalEncoding(8).tables(-3, torch.float32, "cpu")
    for n, m in ((-2, 3), (2, -3)):
        with pytest.raises(ShapeError, match=f"n_queries={n} by n_keys={m}: both must be >= 0"):
            ALiBi(2).attention_bias(n, m)


def test_huge_offsets_compute_their_rows_alone_to_the_bits_of_the_table(monkeypatch):
    """Past MAX_CACHED_ELEMENTS the rows asked are computed alone (offset 10**12 asked for a 10**12-row table
    before: an allocation of terabytes); they are the bits a table would hold."""
    x = torch.randn(2, 3, 5, 8, dtype=torch.float32)
    sin, rope = SinusoidalPositionalEncoding(8), RotaryPositionalEncoding(8)
    rows = torch.tensor([[300, 301, 302, 303, 304], [0, 0, 300, 301, 302]])
    cached = (sin.add_to_input(x, 300), rope.rotate(x, 300), rope.at_rows(rows).rotate(x))
    monkeypatch.setattr(positional, "MAX_CACHED_ELEMENTS", 64)  # tables of at most 8 sinusoid / 256 RoPE rows
    sin, rope = SinusoidalPositionalEncoding(8), RotaryPositionalEncoding(8)
    alone = (sin.add_to_input(x, 300), rope.rotate(x, 300), rope.at_rows(rows).rotate(x))
    for a, b in zip(cached, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sin.table.shape[0] <= 8 and (rope._cache is None or rope._cache[0] <= 256)
    monkeypatch.undo()
    far = 10**12
    xd = x.double()
    got = SinusoidalPositionalEncoding(8, initial_length=far).add_to_input(xd, far)
    assert max_err(got, xd + sinusoid_table(5, 8, far, dtype=F64)) == 0
    assert max_err(RotaryPositionalEncoding(8).rotate(xd, far), _rope_complex(xd, far, 8)) <= 1e-3  # angles ~1e12
    assert RotaryPositionalEncoding(8).at_rows(torch.full((2, 5), far)).rotate(xd).shape == xd.shape
