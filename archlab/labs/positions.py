r"""Positional encodings: why they are needed, and what the sinusoidal table and RoPE encode.

Three labs, all in float64 where the claim is an identity:

* ``position-needed``: self-attention without positions is permutation-equivariant. For a stack ``f``
  of encoder blocks and a permutation matrix ``P`` of the ``N`` tokens, ``f(P x) = P f(x)`` for
  ``x [B, N, d]``: reordering the words only reorders the outputs. Adding ``PE [N, d]`` (or rotating
  ``q, k`` by position) breaks the identity; so does a causal mask, which itself carries order.
* ``sinusoidal-offset``: with ``PE[pos, 2i] = sin(pos w_i)``, ``PE[pos, 2i+1] = cos(pos w_i)``,
  ``w_i = 10000^{-2i/d}``, each (sin, cos) pair at ``pos + k`` is the pair at ``pos`` rotated by
  ``k w_i``, so ``PE[pos + k] = PE[pos] M_k`` with ``M_k`` block-diagonal (one 2x2 rotation per
  frequency) for every ``pos``. The lab fits ``M_k [d, d]`` by least squares and compares it with the
  formula; ``PE PE^T`` then depends on ``pos - pos'`` only: ``sum_i cos((pos - pos') w_i)``.
* ``rope-distance``: RoPE rotates feature pair ``i`` of a query or key at position ``m`` by ``m theta_i``,
  ``theta_i = base^{-2i/d_k}``; so ``<R_m q, R_n k> = <R_{m-n} q, k>`` depends on ``m - n`` only. The
  score of one pair against distance ``r`` is ``s(r) = sum_i Re(z_i e^{i r theta_i})`` (``z_i`` the pair's
  complex product): a sum of cosines, which oscillates rather than decaying monotonically, while the
  slowest pairs turn by less than a radian over the whole context.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from archlab.labs.registry import LabResult, register_lab
from archlab.models import build_model
from archlab.nn.positional import RotaryPositionalEncoding, sinusoid_table

# ================================================================================================
# position-needed
# ================================================================================================


def equivariance_error(f: Callable[[Tensor], Tensor], x: Tensor, perm: Tensor) -> float:
    """``max |f(x[:, perm]) - f(x)[:, perm]| / max |f(x)|`` for ``x [B, N, ...]`` (tokens on dim 1):
    0 when ``f`` commutes with reordering the tokens."""
    y = f(x)
    return ((f(x[:, perm]) - y[:, perm]).abs().max() / y.abs().max()).item()


def _derangement(n: int, g: torch.Generator) -> Tensor:
    """A random permutation of ``n`` that moves every token (so no position keeps its token)."""
    while True:
        perm = torch.randperm(n, generator=g)
        if (perm != torch.arange(n)).all():
            return perm


STACKS = {"encoder": ("transformer-tiny", "encode"), "causal decoder": ("gpt-nano", "hidden_states")}
KINDS = ("none", "sinusoidal", "learned", "rope", "alibi")


def _stack(name: str, positional: str) -> tuple[Callable[[Tensor], Tensor], int]:
    """A random stack of :data:`STACKS`, float64, no dropout: (``ids [B, N] -> [B, N, d]``, vocabulary size)."""
    preset, method = STACKS[name]
    model = build_model(preset, positional=positional, dropout=0.0).double().eval()
    return getattr(model, method), model.config.vocab_size


@register_lab(
    "position-needed",
    claim="Self-attention dispenses with recurrence and convolution and discards word order, so a positional "
    "encoding is mandatory: it adds a positional fingerprint to the embeddings to restore token order",
    source='deck: positional encoding ("why is it mandatory"); lesson 4 card 3',
    tags=("attention", "positional"),
)
def run_position_needed(quick: bool, seed: int) -> LabResult:
    lengths = [16] if quick else [8, 32, 128]
    trials = 2 if quick else 5
    batch = 2 if quick else 4
    g = torch.Generator().manual_seed(seed)
    rows, errors = [], {}
    with torch.no_grad():
        for stack in STACKS:
            for kind in KINDS:
                f, vocab = _stack(stack, kind)
                for n in lengths:
                    worst = 0.0
                    for _ in range(trials):
                        ids = torch.randint(vocab, (batch, n), generator=g)
                        worst = max(worst, equivariance_error(f, ids, _derangement(n, g)))
                    errors[(stack, kind, n)] = worst
                    rows.append([f"{stack} ({STACKS[stack][0]})", kind, n, worst])
    nope = max(errors[("encoder", "none", n)] for n in lengths)
    with_pe = {kind: min(errors[("encoder", kind, n)] for n in lengths) for kind in KINDS[1:]}
    causal = min(errors[("causal decoder", "none", n)] for n in lengths)
    supported = nope <= 1e-12 and min(with_pe.values()) >= 0.01 and causal >= 0.01
    finding = (
        f"without positions the encoder stack is permutation-equivariant to {nope:.1e} (float64 rounding) at "
        f"N = {', '.join(map(str, lengths))}, so word order is invisible; with positions, reordering changes the "
        f"outputs by at least {', '.join(f'{v:.2g} ({k})' for k, v in with_pe.items())} of their scale. A causal "
        f"decoder without positions is not equivariant either ({causal:.2g}): the mask carries order"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        n, x = lengths[-1], torch.arange(len(KINDS))
        for shift, stack in ((-0.2, "encoder"), (0.2, "causal decoder")):
            ax1.bar(x + shift, [max(errors[(stack, k, n)], 1e-18) for k in KINDS], width=0.4, label=stack)
        ax1.set_xticks(x, KINDS)
        ax1.set(yscale="log", xlabel="positional encoding", ylabel="max |f(Px) - P f(x)| / max |f(x)|",
                title=f"N = {n}")  # fmt: skip
        for (stack, kind), style in ((("encoder", "none"), "o-"), (("encoder", "sinusoidal"), "s-"),
                                     (("causal decoder", "none"), "^--")):  # fmt: skip
            ax2.plot(lengths, [max(errors[(stack, kind, m)], 1e-18) for m in lengths], style, label=f"{stack}, {kind}")
        ax2.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="relative error")
        for ax in (ax1, ax2):
            ax.axhline(1e-12, color="gray", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    return LabResult(
        columns=["stack", "positions", "N", "max |f(Px) - Pf(x)| / max |f(x)|"],
        rows=rows,
        criterion="encoder stack without positions: relative error <= 1e-12 at every N (float64 rounding: "
        "equivariant); with sinusoidal, learned, RoPE or ALiBi positions: >= 0.01 at every N (10 orders of "
        "magnitude above rounding); causal decoder without positions: >= 0.01 (the mask alone breaks equivariance)",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"Random (untrained) float64 stacks from build_model('transformer-tiny') (2 post-norm encoder blocks, "
        f"d=64) and build_model('gpt-nano') (3 causal blocks, d=48), dropout off; the error is the worst over "
        f"{trials} random token sequences (batch {batch}) and permutations moving every token. Equivariance "
        "holds for any weights, trained or not; the size of the error with positions depends on the weights "
        "and on how large PE is next to the embeddings. The causal case is why decoder-only models without "
        "positional encoding (NoPE) can still learn positions: query i sees i keys, so order leaks through the "
        "mask; its first token sees only itself",
    )


# ================================================================================================
# sinusoidal-offset
# ================================================================================================


def frequencies(d_model: int) -> Tensor:
    """``w_i = 10000^{-2i/d}``, ``i < d/2``: the angular frequency of the sinusoid table's pair ``i`` (float64)."""
    return torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)


def offset_matrix(d_model: int, k: int) -> Tensor:
    """The formula's ``M_k [d, d]``: ``PE[pos + k] = PE[pos] M_k`` (rows are positions), one 2x2 rotation per
    frequency on features ``(2i, 2i+1)``: ``[[cos k w_i, -sin k w_i], [sin k w_i, cos k w_i]]``."""
    angle = k * frequencies(d_model)
    c, s = torch.cos(angle), torch.sin(angle)
    m = torch.zeros(d_model, d_model, dtype=torch.float64)
    i = torch.arange(0, d_model, 2)
    m[i, i], m[i, i + 1], m[i + 1, i], m[i + 1, i + 1] = c, -s, s, c
    return m


def fit_offset_matrix(pe: Tensor, k: int) -> tuple[Tensor, float]:
    """Least-squares ``M [d, d]`` with ``pe[pos] M ~ pe[pos + k]`` over every ``pos`` of ``pe [P, d]``, and
    its residual ``max |pe[:-k] M - pe[k:]|`` (minimum-norm solution where ``pe`` is rank-deficient)."""
    x, y = pe[:-k], pe[k:]
    m = torch.linalg.lstsq(x, y, driver="gelsd").solution
    return m, (x @ m - y).abs().max().item()


@register_lab(
    "sinusoidal-offset",
    claim="The sine/cosine encoding lets the model track relative positions, since for any fixed offset k, "
    "PE_{pos+k} can be computed as a linear function of PE_pos",
    source="deck: positional encoding formulas PE(pos, 2i) = sin(pos / 10000^{2i/d}), PE(pos, 2i+1) = cos(...)",
    tags=("positional",),
)
def run_sinusoidal_offset(quick: bool, seed: int) -> LabResult:
    del seed  # deterministic: the table has no randomness
    d, positions, short = (16, 1 << 14, 256) if quick else (64, 1 << 16, 1024)
    offsets = [1, 8, 64, 512] if quick else [2**j for j in range(13)]
    pe = sinusoid_table(positions, d, dtype=torch.float64)
    rows, curve = [], []
    for k in offsets:
        m, residual = fit_offset_matrix(pe, k)
        formula = offset_matrix(d, k)
        formula_residual = (pe[:-k] @ formula - pe[k:]).abs().max().item()
        mismatch = (m - formula).abs().max().item()
        curve.append((k, residual, formula_residual))
        rows.append([f"0..{positions - 1}", k, residual, formula_residual, mismatch])
    worst_res = max(c[1] for c in curve)
    worst_mismatch = max(r[4] for r in rows)
    formula_floor = max(c[2] for c in curve)
    # the short window: positions 0..short-1 barely turn the slow pairs, so the table is numerically rank-deficient
    m_short, res_short = fit_offset_matrix(pe[:short], 1)
    formula_short = (pe[: short - 1] @ offset_matrix(d, 1) - pe[1:short]).abs().max().item()
    mismatch_short = (m_short - offset_matrix(d, 1)).abs().max().item()
    rows.append([f"0..{short - 1}", 1, res_short, formula_short, mismatch_short])
    cond_long, cond_short = torch.linalg.cond(pe).item(), torch.linalg.cond(pe[:short]).item()
    # control: pos -> 2 pos is no linear map of PE (sin 2a = 2 sin a cos a), so its fit must leave a residual
    half = pe[: positions // 2]
    control = (half @ torch.linalg.lstsq(half, pe[::2], driver="gelsd").solution - pe[::2]).abs().max().item()
    gram = pe[:512] @ pe[:512].T  # [P, P]: sum_i cos((pos - pos') w_i)
    toeplitz = (gram[1:, 1:] - gram[:-1, :-1]).abs().max().item()
    supported = worst_res <= 1e-9 and worst_mismatch <= 1e-9 and control >= 0.1 and toeplitz <= 1e-9
    finding = (
        f"over {positions:,} positions (d={d}) one matrix maps PE_pos to PE_(pos+k) for every k tried up to "
        f"{offsets[-1]} with residual <= {worst_res:.1e} (the formula's own: <= {formula_floor:.1e}), "
        f"and the fitted M_k equals the block rotation to {worst_mismatch:.1e}; the non-linear control pos -> 2 pos "
        f"leaves {control:.2f}; PE PE^T is shift-invariant to {toeplitz:.1e}"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        ks, res, fres = zip(*curve)
        ax1.plot(ks, res, "o-", label="least-squares M_k")
        ax1.plot(ks, fres, "s--", label="formula M_k (block rotation)")
        ax1.axhline(control, color="tab:red", ls=":", label="control: PE_2pos from PE_pos")
        ax1.set(xscale="log", yscale="log", xlabel="offset k", ylabel="max |PE_pos M_k - PE_(pos+k)|")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=7)
        image = ax2.imshow(gram[:128, :128].numpy(), cmap="RdBu_r")
        ax2.set(xlabel="pos'", ylabel="pos", title="PE PE^T: constant along diagonals")
        fig.colorbar(image, ax=ax2, fraction=0.046)

    return LabResult(
        columns=["positions", "k", "fit residual", "formula residual", "max |M_fit - M_formula|"],
        rows=rows,
        criterion="over the long window, for every offset k: least-squares residual <= 1e-9 and max |M_fit - "
        "M_formula| <= 1e-9; a non-linear control (PE_2pos from PE_pos) leaves a residual >= 0.1; "
        "max |G[p+1, p'+1] - G[p, p']| <= 1e-9 for G = PE PE^T over 512 positions",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"float64 table from archlab.nn.positional.sinusoid_table; residuals of ~{formula_floor:.0e} are the "
        f"table's own rounding (sin of angles up to {positions:,}). The fit is unique only over a window long "
        f"enough for the slowest pairs (w = {frequencies(d)[-1].item():.2g}) to turn: the table's condition number is "
        f"{cond_long:.3g} over {positions:,} positions but {cond_short:.3g} over the first {short}, where the "
        f"least-squares map still fits (residual {res_short:.1e}) yet differs from the rotation by "
        f"{mismatch_short:.2g}: M_k exists, but a short context does not pin it down. Linear in PE_pos does not "
        "mean a trained model uses it",
    )


# ================================================================================================
# rope-distance
# ================================================================================================


def rope_scores(rope: RotaryPositionalEncoding, q: Tensor, k: Tensor, length: int) -> Tensor:
    """``s[.., r] = <R_r q, k>`` for ``r < length``: the score of a query ``r`` positions after its key.

    ``q, k [S, d_k]`` -> ``[S, length]``. By shift invariance it is also ``<R_{j+r} q, R_j k>`` for any ``j``.
    """
    rotated = rope.rotate(q[:, None, :].expand(-1, length, -1))  # [S, length, d_k]: q at positions 0..length-1
    return (rotated * k[:, None, :]).sum(-1)


def shift_error(rope: RotaryPositionalEncoding, q: Tensor, k: Tensor, shift: int) -> float:
    """``q, k [n, d_k]`` at positions ``0..n-1`` give scores ``S[i, j] = <R_i q_i, R_j k_j>``; the same content at
    positions ``shift..shift+n-1`` must give the same ``S``. Returns ``max |S_shift - S_0| / max |S_0|``."""
    s0 = rope.rotate(q) @ rope.rotate(k).T
    s1 = rope.rotate(q, offset=shift) @ rope.rotate(k, offset=shift).T
    return ((s1 - s0).abs().max() / s0.abs().max()).item()


def wiggles(curve: Tensor) -> tuple[Tensor, Tensor]:
    """For ``curve [..., L]``: the fraction of steps that go up (0 for a monotone decay) and the number of sign
    changes."""
    ups = (curve.diff(dim=-1) > 0).double().mean(-1)
    signs = (curve[..., 1:] * curve[..., :-1] < 0).sum(-1)
    return ups, signs


@register_lab(
    "rope-distance",
    claim="RoPE encodes relative position (scores depend on i - j), but does not always decay with distance, "
    "and its lowest frequencies spin so slowly that they are able to carry semantics",
    source="notes: RoPE section (Barbero et al. 2024); lesson 4 card 3 (RoPE: score depends on i - j)",
    tags=("attention", "positional"),
)
def run_rope_distance(quick: bool, seed: int) -> LabResult:
    d_k, length, samples = (64, 1024, 32) if quick else (128, 4096, 256)
    shifts = [1, 64, 4096] if quick else [1, 64, 4096, 32768]
    peak = length // 4  # r*: the distance the constructed pair prefers
    rope = RotaryPositionalEncoding(d_k)  # float64 tables; inputs float64 below
    g = torch.Generator().manual_seed(seed)
    rows = []

    pairs = torch.randn(2, 64, d_k, generator=g, dtype=torch.float64)
    shift_err = max(shift_error(rope, pairs[0], pairs[1], s) for s in shifts)
    rows += [["relative position", f"max shift error, shifts {shifts[0]}..{shifts[-1]}", shift_err]]

    ones = torch.ones(1, d_k, dtype=torch.float64)
    s_ones = rope_scores(rope, ones, ones, length)[0] / d_k  # normalised: s(0) = 1
    q = torch.randn(samples, d_k, generator=g, dtype=torch.float64)
    s_same = torch.cat([rope_scores(rope, c, c, length) for c in q.split(32)])  # q = k
    s_same = s_same / s_same[:, :1]
    ups_ones, signs_ones = wiggles(s_ones)
    ups_same, signs_same = wiggles(s_same)
    far = slice(length // 2, None)
    env_ones, env_same = s_ones[far].abs().max().item(), s_same[:, far].abs().max(-1).values.median().item()
    rows += [
        ["q = k = ones (RoFormer)", "fraction of steps up", ups_ones.item()],
        ["q = k = ones (RoFormer)", "sign changes", signs_ones.item()],
        ["q = k = ones (RoFormer)", f"max |s(r)| / s(0), r >= {length // 2}", env_ones],
        [f"q = k ~ N(0, I), {samples} draws", "fraction of steps up (min)", ups_same.min().item()],
        [f"q = k ~ N(0, I), {samples} draws", "sign changes (median)", signs_same.median().item()],
        [f"q = k ~ N(0, I), {samples} draws", f"max |s(r)| / s(0), r >= {length // 2} (median)", env_same],
    ]

    k_ind = torch.randn(samples, d_k, generator=g, dtype=torch.float64)
    s_ind = torch.cat([rope_scores(rope, a, b, length) for a, b in zip(q.split(32), k_ind.split(32), strict=True)])
    rms_ratio = (s_ind[:, far].pow(2).mean().sqrt() / s_ind[:, 0].pow(2).mean().sqrt()).item()
    rows += [["q, k ~ N(0, I) independent", f"RMS score at r >= {length // 2} / at r = 0", rms_ratio]]

    k_peak = rope.rotate(q[:1, None, :], offset=peak)[:, 0]  # k = R_{r*} q: scores peak at distance r*
    s_peak = rope_scores(rope, q[:1], k_peak, length)[0]
    argmax = int(s_peak.argmax())
    rows += [[f"k = R_(r*) q, r* = {peak}", "argmax_r s(r)", argmax],
             [f"k = R_(r*) q, r* = {peak}", "s(r*) / s(0)", (s_peak[peak] / s_peak[0]).item()]]  # fmt: skip

    angles = (length - 1) * rope.inv_freq  # [d_k / 2]: how far each pair turns over the context
    slow = int((angles < 1.0).sum())
    lowest = angles[-1].item()
    flip = math.pi / 2 / rope.inv_freq[-1].item()  # context at which the slowest pair reaches pi/2
    rows += [[f"pair {i} (theta = {rope.inv_freq[i].item():.3g})", f"rotation over {length} positions (rad)",
              angles[i].item()] for i in (0, d_k // 4, d_k // 2 - 2, d_k // 2 - 1)]  # fmt: skip
    rows += [["pairs turning < 1 rad", f"count of {d_k // 2}", slow]]
    slow_q = torch.zeros(1, d_k, dtype=torch.float64)
    slow_q[0, d_k // 2 - slow : d_k // 2] = slow_q[0, d_k - slow :] = 1.0  # content only in the slow pairs
    s_slow = rope_scores(rope, slow_q, slow_q, length)[0] / (2 * slow)
    fast_q = torch.zeros(1, d_k, dtype=torch.float64)
    fast_q[0, :slow] = fast_q[0, d_k // 2 : d_k // 2 + slow] = 1.0  # the same amount of content in the fastest pairs
    s_fast = rope_scores(rope, fast_q, fast_q, length)[0] / (2 * slow)
    rows += [["q = k in the slow pairs", "min_r s(r) / s(0)", s_slow.min().item()],
             ["q = k in as many fast pairs", "min_r s(r) / s(0)", s_fast.min().item()]]  # fmt: skip

    not_decaying = min(ups_ones.item(), ups_same.min().item()) >= 0.3 and rms_ratio >= 0.5 and argmax == peak
    supported = shift_err <= 1e-9 and not_decaying and lowest < 1.0 and s_slow.min().item() >= 0.5
    finding = (
        f"scores depend on i - j only (shift error {shift_err:.1e}); against distance they do not decay monotonically: "
        f"{ups_ones.item():.0%} of the steps go up for q = k = ones ({signs_ones.item()} sign changes up to "
        f"{length}), at least {ups_same.min().item():.0%} for random q = k, random independent pairs keep "
        f"{rms_ratio:.2f}x their RMS score far away, and k = R_(r*) q peaks at r = {argmax}. The slowest of the "
        f"{d_k // 2} pairs turns only {lowest:.2f} rad over {length} positions ({slow} turn < 1 rad): content in them "
        f"keeps >= {s_slow.min().item():.2f} of its score at every distance, against {s_fast.min().item():.2f} in "
        "the fastest"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        r = torch.arange(length)
        ax1.plot(r, s_same[0], lw=0.6, alpha=0.7, label="q = k random")
        ax1.plot(r, s_ones, lw=0.8, label="q = k = ones")
        ax1.plot(r, s_peak / s_peak[0], lw=0.6, alpha=0.7, label=f"k = R_(r*) q, r* = {peak}")
        ax1.plot(r, s_slow, lw=1.2, color="k", label=f"q = k in the {slow} slowest pairs")
        ax1.set(xscale="symlog", xlabel="distance r = i - j", ylabel="score s(r) / s(0)")
        ax1.grid(alpha=0.3)
        ax1.legend(fontsize=7)
        ax2.plot(range(d_k // 2), angles, "o", ms=3)
        ax2.axhline(1.0, color="tab:red", ls=":", label="1 rad")
        ax2.axhline(2 * math.pi, color="gray", ls="--", label="one turn")
        ax2.set(
            yscale="log", xlabel="pair i (theta_i = base^(-2i/d_k))", ylabel=f"rotation over {length} positions (rad)"
        )
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)

    return LabResult(
        columns=["case", "measurement", "value"],
        rows=rows,
        criterion="shift error <= 1e-9; not decaying: >= 30% of the steps r -> r+1 go up for q = k = ones and for "
        "every random q = k (0% for a monotone decay), independent random pairs keep >= 0.5x their RMS score at "
        "r >= L/2, and k = R_(r*) q peaks at r*; slow pairs: the slowest turns < 1 rad over the context L and content "
        "in the pairs turning < 1 rad keeps >= 0.5 of its score at every distance",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"archlab's RotaryPositionalEncoding, d_k = {d_k}, base 10000, context L = {length}, float64; random "
        f"vectors N(0, I). The all-ones and the expected q = k curve are the same, mean_i cos(r theta_i): its envelope "
        f"does fall (to {env_ones:.2f} past L/2), which is the decay RoFormer bounds; it is not monotone, and "
        "independent pairs do not share it. The slow pairs carry semantics only up to a length: the slowest reaches "
        f"pi/2 at {flip:,.0f} positions, after which a match in it also changes sign ('semantic attention with RoPE "
        "cannot be robust'); larger bases (Llama 3: 500000) push that further out. Whether trained models use the "
        "slow pairs for content is not tested here",
    )
