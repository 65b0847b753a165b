r"""Compute, parameter and memory claims, counted from shapes: exact, analytic, seconds even at 175B.

Models are built on the ``meta`` device (shapes, no memory), so GPT-3's 175B shape costs nothing. Accounting
as :mod:`archlab.analysis.flops`: a multiply-add is 2 FLOPs, elementwise work is not counted. Per layer, for
``x [B, N, d]`` with ``A`` heads of ``d_k = d / A`` and an FFN of width ``d_ff = 4 d``::

    projections  W_Q, W_K, W_V, W_O         8 N d^2        (4 d^2 weights, whatever A is)
    scores       Q K^T and alpha V          4 N^2 d        (2 A N^2 d_k each: A d_k = d)
    FFN          W_1, W_2                   4 N d d_ff = 16 N d^2
    RNN layer    W_ih x_t + W_hh h_{t-1}    4 N d^2        (LSTM: 4 gates, 16 N d^2), N steps in sequence
    parameters   per block 4 d^2 + 2 d d_ff = 12 d^2   ->  N_params ~ 12 n_layer d^2
    LoRA         a rank-r adapter on a [d_out, d_in] weight trains r (d_in + d_out)
    memory       standard scores [B, A, N, M]: B A N M sizeof(dtype);  tiled (flash): O(N) beyond q, k, v

The labs: ``multihead-compute`` (A heads cost what one head costs), ``mlp-flops-share`` (FFN vs attention
FLOPs from GPT-2 small to GPT-3), ``param-formula`` (``12 n_layer d^2`` against exact counts),
``attention-memory`` (the 100K-token score matrix), ``flash-memory`` (O(N) working memory at 100K tokens),
``lora-params`` (LoRA's trainable fraction at 175B), ``attention-vs-recurrence`` (N^2 d vs N d^2, and the
sequential steps). All are deterministic: only ``attention-vs-recurrence`` draws (irrelevant) inputs.
"""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from archlab import kernels
from archlab.analysis import attention_bytes, count_flops, count_parameters, score_matrix_bytes
from archlab.labs.registry import LabResult, register_lab
from archlab.models import build_model, get_config
from archlab.nn import MultiHeadAttention
from archlab.nn.lora import LoRAReport, apply_lora, lora_report
from archlab.nn.recurrent import build_rnn

GPT3_175B = dict(d_model=12288, n_heads=96, n_layers=96, max_len=2048)  # Brown et al. 2020, table 2.1
GPT2 = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
GB = 1e9
MATMULS = ("aten.mm", "aten.addmm", "aten.bmm")
#: few-row products on archlab's float32 kernel (:func:`archlab.nn.linear.linear`, up to 4 rows): projections too
KERNEL_PRODUCTS = ("archlab_kernels.f32_rows",)


def gpt_config(name: str):
    """A GPT-2 preset's config, or ``gpt3-175b``: GPT-3's largest shape (96 x d=12288, 96 heads, 2048 ctx)."""
    return get_config("gpt2-small", **GPT3_175B) if name == "gpt3-175b" else get_config(name)


def on_meta(config) -> nn.Module:
    """The model of ``config`` built on the meta device (as ``archlab.cli.build_on_meta``)."""
    with torch.device("meta"):
        return build_model(config)


class _MatmulCalls(TorchDispatchMode):
    """Counts the matrix multiplications (``mm``, ``addmm``, ``bmm``, archlab's few-row product) that run inside it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += str(func.overloadpacket) in MATMULS + KERNEL_PRODUCTS
        return func(*args, **(kwargs or {}))


def torch_count(fn) -> tuple[dict[str, int], int]:
    """Run ``fn()`` under torch's own FLOP counter: FLOPs by aten op (``"aten.bmm"``...) and matmul calls."""
    with kernels.flop_counter(display=False) as counter, _MatmulCalls() as calls, torch.no_grad():
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}, calls.calls


# ================================================================================================
# multihead-compute
# ================================================================================================

MHA_WIDTH = 512
MHA_HEADS = (1, 2, 4, 8, 16, 32)


def mha_costs(d: int, heads: int, n: int) -> dict[str, int]:
    """``MultiHeadAttention(d, A)`` on ``x [1, N, d]`` (meta, math backend): parameters, archlab's FLOP count
    (``projections``, ``scores``), torch's total, and the bytes of its fp32 score matrix ``[1, A, N, N]``."""
    with torch.device("meta"):
        mha = MultiHeadAttention(d, heads, backend="math")
    x = torch.zeros(1, n, d, device="meta")
    flops = count_flops(mha, x).by_component
    by_op, _ = torch_count(partial(mha, x))
    return {
        "params": count_parameters(mha).total, "projections": flops["projections"], "scores": flops["attention"],
        "torch": sum(by_op.values()), "score_bytes": score_matrix_bytes(n, heads=heads),
    }  # fmt: skip


@register_lab(
    "multihead-compute",
    claim="Multi-head attention costs no additional compute: h heads x d_k dimensions = 1 head x d_model "
    "dimensions (same total FLOPs)",
    source="lesson 4 card 2",
    tags=("attention", "compute"),
)
def run_multihead(quick: bool, seed: int) -> LabResult:
    lengths = [128, 1024] if quick else [128, 1024, 8192]
    d = MHA_WIDTH
    rows, costs = [], {}
    for n in lengths:
        for a in MHA_HEADS:
            c = costs[n, a] = mha_costs(d, a, n)
            total = c["projections"] + c["scores"]
            rows.append([n, a, d // a, c["params"], c["projections"], c["scores"], total, c["torch"],
                         c["score_bytes"] / GB])  # fmt: skip
    spread = {
        key: max(max(costs[n, a][key] for a in MHA_HEADS) / min(costs[n, a][key] for a in MHA_HEADS) for n in lengths)
        for key in ("params", "projections", "scores", "torch")
    }
    agree = all(r[6] == r[7] for r in rows)
    supported = all(s == 1.0 for s in spread.values()) and agree
    n_mid = lengths[1]
    one, many = costs[n_mid, 1], costs[n_mid, MHA_HEADS[-1]]
    finding = (
        f"d={d}, A = 1..{MHA_HEADS[-1]}: every A has {one['params']:,} parameters and, at N={n_mid}, "
        f"{one['projections'] + one['scores']:,} FLOPs (projections 8Nd^2 = {one['projections']:,}, scores "
        f"4N^2d = {one['scores']:,}); largest/smallest across A = {max(spread.values()):.6g}, and torch's counter "
        f"{'agrees' if agree else 'disagrees'}. What grows with A is the score matrix: "
        f"{many['score_bytes'] / one['score_bytes']:.0f}x the fp32 bytes at A={MHA_HEADS[-1]}"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for n in lengths:
            ax1.plot(MHA_HEADS, [costs[n, a]["projections"] + costs[n, a]["scores"] for a in MHA_HEADS], "o-",
                     label=f"archlab, N={n}")  # fmt: skip
            ax1.plot(MHA_HEADS, [costs[n, a]["torch"] for a in MHA_HEADS], "k+", ms=10)
        ax1.plot([], [], "k+", label="torch flop_counter")
        ax1.set(xscale="log", yscale="log", xlabel="heads A (d_k = d / A)", ylabel="forward FLOPs (one layer)")
        for key, label in (("params", "parameters"), ("torch", "FLOPs"), ("score_bytes", "score-matrix bytes")):
            ax2.plot(MHA_HEADS, [costs[n_mid, a][key] / costs[n_mid, 1][key] for a in MHA_HEADS], "o-", label=label)
        ax2.set(xscale="log", yscale="log", xlabel="heads A", ylabel=f"relative to A=1 (N={n_mid})")
        for ax in (ax1, ax2):
            ax.set_xticks(MHA_HEADS, [str(a) for a in MHA_HEADS])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

    return LabResult(
        columns=["N", "A", "d_k", "params", "proj FLOPs", "score FLOPs", "FLOPs", "torch FLOPs", "scores GB"],
        rows=rows,
        criterion="for each N, the parameters, archlab's projection and score FLOPs and torch's FLOP total are "
        "each identical across A (largest/smallest = 1 exactly), and archlab's total equals torch's",
        supported=supported,
        finding=finding,
        plot=plot,
        notes="Shapes only (meta device, math backend), batch 1. FLOPs count matmuls; the elementwise softmax "
        f"over the A N^2 scores grows with A, but at A={MHA_HEADS[-1]} it is A / (4 d) = "
        f"{MHA_HEADS[-1] / (4 * d):.1%} of the score matmuls' FLOPs. Equal FLOPs is not equal speed: A thin "
        "matmuls of width d_k run less efficiently than one of width d; the standard score matrix also "
        "takes A times the memory",
    )


# ================================================================================================
# mlp-flops-share
# ================================================================================================


def layer_flops(config) -> tuple[int, dict[str, int]]:
    """A GPT config's parameter count and its forward FLOPs per layer over the full context ``max_len``:
    ``scores`` (QK^T, alpha V, counted dense), ``projections`` and ``feed_forward``, counted on meta."""
    model = on_meta(config).eval()
    ids = torch.zeros(1, config.max_len, dtype=torch.long, device="meta")
    flops = count_flops(model, ids).by_component
    per_layer = {name: flops[key] // config.n_layers
                 for name, key in (("scores", "attention"), ("projections", "projections"),
                                   ("feed_forward", "feed_forward"))}  # fmt: skip
    return count_parameters(model).total, per_layer


@register_lab(
    "mlp-flops-share",
    claim="At scale the MLP dominates FLOPs (Wei et al. 2024): at >1B params, FFN FLOPs > attention FLOPs",
    source="notes 3.2 and 8 (cheat-sheet: MLP cost)",
    tags=("compute", "scaling"),
)
def run_mlp_share(quick: bool, seed: int) -> LabResult:
    names = ["gpt2-small", "gpt2-xl"] if quick else [*GPT2, "gpt3-175b"]
    rows, points = [], []
    for name in names:
        config = gpt_config(name)
        params, f = layer_flops(config)
        n, d = config.max_len, config.d_model
        attention = f["projections"] + f["scores"]
        share, ratio = f["feed_forward"] / (f["feed_forward"] + attention), f["feed_forward"] / attention
        # per layer, FFN and projections grow like N and the scores like N^2: FFN = attention at N*
        crossover = (f["feed_forward"] - f["projections"]) * n / f["scores"]
        rows.append([name, params, d, n, f["feed_forward"], f["projections"], f["scores"], share, ratio, crossover])
        points.append((name, params, n, d, f, share))
    large = [r for r in rows if r[1] > 1e9]
    small = [r for r in rows if r[1] <= 1e9]
    supported = bool(large) and all(r[8] >= 1.2 for r in large)
    finding = "FFN / attention (projections + scores) FLOPs per layer at the model's own context: " + ", ".join(
        f"{r[0]} {r[8]:.2f} ({r[7]:.0%} FFN)" for r in rows
    )
    if small and all(r[8] > 1 for r in small):
        finding += (
            f". The FFN already dominates at {small[0][0]} ({small[0][1] / 1e6:.0f}M): the crossover is not a "
            f"parameter count but a context length, N* = 2d ("
            + ", ".join(f"{r[0]} {r[9]:,.0f}" for r in rows)
            + " tokens)"
        )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot([p[1] for p in points], [p[5] for p in points], "-", color="0.6")
        lengths = torch.logspace(6, 17, 100, base=2).tolist()
        for name, params, n, d, f, share in points:
            p, s, ffn = f["projections"] / n, f["scores"] / n**2, f["feed_forward"] / n  # per token, per token^2
            (line,) = ax2.plot(lengths, [ffn / (p + s * m) for m in lengths], label=f"{name} (d={d})")
            ax2.plot([n], [ffn / (p + s * n)], "o", color=line.get_color())
            ax1.plot([params], [share], "o", color=line.get_color(), label=name)
        ax1.axhline(0.5, color="k", lw=0.8, ls="--")
        ax1.axvline(1e9, color="r", lw=0.8, ls=":", label="1B params")
        ax1.set(xscale="log", xlabel="parameters", ylabel="FFN share of a layer's FLOPs (own context)", ylim=(0, 1))
        ax1.legend(fontsize=7, loc="lower right")
        ax2.axhline(1, color="k", lw=0.8, ls="--")
        ax2.set(xscale="log", yscale="log", xlabel="context length N (dot: the model's own)",
                ylabel="FFN / attention FLOPs per layer")  # fmt: skip
        ax2.legend(fontsize=7)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)

    return LabResult(
        columns=["model", "params", "d", "N", "FFN", "projections", "scores", "FFN share", "FFN/attn", "N* (FFN=attn)"],
        rows=rows,
        criterion="every model above 1B parameters has FFN FLOPs >= 1.2x attention FLOPs (projections + "
        "scores) per layer at its own context length; FLOPs from archlab's counter on the meta device",
        supported=supported,
        finding=finding,
        plot=plot,
        notes="Per token and layer, FFN 16 d^2, projections 8 d^2, scores 4 N d: with d_ff = 4d the FFN holds 2/3 "
        "of the matmul weights at any size, so it dominates whenever N < 2d (counted dense, as kernels compute "
        "causal attention; an ideal causal kernel halves the scores: N < 4d). GPT-3's shape is taken dense (the "
        "real model alternates dense and banded sparse layers). Embeddings and the LM head are left out",
    )


# ================================================================================================
# param-formula
# ================================================================================================

DECK_PARAMS, DECK_LAYERS, HEAD_WIDTH = 178e9, 80, 128


def deck_example_config():
    """The deck's ``~80 layers for 178B``: 80 layers at the width ``12 L d^2 = 178B`` gives, in heads of 128."""
    heads = round(math.sqrt(DECK_PARAMS / (12 * DECK_LAYERS)) / HEAD_WIDTH)
    return get_config("gpt2-small", **{**GPT3_175B, "n_layers": DECK_LAYERS, "n_heads": heads,
                                       "d_model": heads * HEAD_WIDTH})  # fmt: skip


def param_counts(config) -> tuple[int, int]:
    """Exact parameters of ``config``'s model (meta): the total, and the blocks' (total less embeddings and head)."""
    report = count_parameters(on_meta(config))
    return report.total, report.total - report.by_component["embeddings"] - report.by_component["output_head"]


@register_lab(
    "param-formula",
    claim="N ~ 2 d n_layer (2 d_attn + d_ff) ~ 12 n_layer d^2 (d_attn = d_ff / 4 = d); e.g. ~80 layers for a "
    "178B-parameter model",
    source="deck: scaling laws (parameter estimation)",
    tags=("parameters", "scaling"),
)
def run_param_formula(quick: bool, seed: int) -> LabResult:
    names = ["gpt2-small", "gpt2-xl", "gpt3-175b"] if quick else [*GPT2, "gpt3-175b"]
    rows = []
    for name in names:
        config = gpt_config(name)
        total, blocks = param_counts(config)
        estimate = 12 * config.n_layers * config.d_model**2
        rows.append([name, config.n_layers, config.d_model, total, blocks, estimate, (total - estimate) / total,
                     (blocks - estimate) / blocks])  # fmt: skip
    example = deck_example_config()
    example_total, _ = param_counts(example)
    example_off = example_total / DECK_PARAMS - 1
    gpt3_d = GPT3_175B["d_model"]
    layers_at_gpt3_width = DECK_PARAMS / (12 * gpt3_d**2)
    errors = [r[6] for r in rows]
    shrinking = all(b < a for a, b in zip(errors, errors[1:]))
    blocks_ok = all(abs(r[7]) < 0.005 for r in rows)
    largest_ok = rows[-1][3] > 1e11 and errors[-1] < 0.01
    supported = shrinking and blocks_ok and largest_ok and abs(example_off) < 0.02
    finding = (
        f"12 L d^2 misses the exact count by {errors[0]:.1%} at {rows[0][0]} (the embeddings), "
        f"{errors[-1]:.2%} at {rows[-1][0]} ({rows[-1][3] / 1e9:.1f}B), and the blocks alone by at most "
        f"{max(abs(r[7]) for r in rows):.2%}; the deck's example: 80 layers at the formula's width "
        f"d={example.d_model:,} count {example_total / 1e9:.1f}B ({example_off:+.1%} from 178B), while at "
        f"GPT-3's d={gpt3_d:,} 178B would take {layers_at_gpt3_width:.0f} layers"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot([r[3] for r in rows], [abs(r[6]) for r in rows], "o-", label="vs exact total")
        ax1.plot([r[3] for r in rows], [abs(r[7]) for r in rows], "s-", label="vs blocks (no embeddings)")
        ax1.set(xscale="log", yscale="log", xlabel="exact parameters", ylabel="|relative error| of 12 L d^2")
        ax1.legend(fontsize=8)
        widths = torch.linspace(6000, 20000, 100).tolist()
        ax2.plot(widths, [DECK_PARAMS / (12 * w**2) for w in widths], label="L = 178B / (12 d^2)")
        ax2.plot([example.d_model], [DECK_LAYERS], "o", label=f"deck: 80 layers (d={example.d_model:,})")
        ax2.plot([gpt3_d], [GPT3_175B["n_layers"]], "s", label="GPT-3 175B (96 layers)")
        ax2.set(xlabel="width d", ylabel="layers L")
        ax2.legend(fontsize=8)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)

    return LabResult(
        columns=["model", "L", "d", "exact", "blocks", "12 L d^2", "err total", "err blocks"],
        rows=rows,
        criterion="12 L d^2 within 0.5% of the blocks' parameters (attention + FFN + norms) of every model; its "
        "error against the exact total shrinks at each step up in size and is < 1% at the 175B shape; an "
        "80-layer model at the width the formula gives for 178B (heads of 128) counts within 2% of 178B",
        supported=supported,
        finding=finding,
        plot=plot,
        notes="Exact counts by archlab.analysis.count_parameters on models built on the meta device (tied LM "
        "head counted once, vocabulary 50,257, learned positions). The deck gives no width for its example; the "
        "formula fixes d ~ 13.6K for 80 layers, an aspect ratio d / L ~ 170 (GPT-3: 128)",
    )


# ================================================================================================
# attention-memory and flash-memory
# ================================================================================================

LONG = 100_000
MEM_HEADS, MEM_D_K = 16, 64  # d = 1024
DEVICE_BYTES = 80e9  # one 80 GB accelerator
CARD_STANDARD, CARD_FLASH = 40e12, 400e6


def memory_lengths(quick: bool) -> list[int]:
    return [1_000, 10_000, 50_000, LONG] if quick else [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, LONG]


@register_lab(
    "attention-memory",
    claim="For 100,000 tokens, standard attention needs 100K^2 x 4B = 40TB: impossible",
    source="lesson 8 card 3",
    tags=("attention", "memory"),
)
def run_attention_memory(quick: bool, seed: int) -> LabResult:
    rows = []
    for n in memory_lengths(quick):
        one = score_matrix_bytes(n)
        math_one = attention_bytes("math", n, heads=1, d_k=MEM_D_K)
        math_all = attention_bytes("math", n, heads=MEM_HEADS, d_k=MEM_D_K)
        rows.append([n, one / GB, MEM_HEADS * one / GB, math_one / GB, math_all / GB])
    scores, _, math_one, math_all = (c * GB for c in rows[-1][1:])
    arithmetic_ok = CARD_STANDARD / 2 <= scores <= 2 * CARD_STANDARD
    infeasible = math_one > DEVICE_BYTES
    finding = (
        f"the card's arithmetic is {'right' if arithmetic_ok else 'wrong'}: 100K^2 x 4 B = {scores:.1e} B = "
        f"{scores / GB:.0f} GB per head and sequence, {CARD_STANDARD / scores:,.0f}x less than the 40 TB it prints. "
        f"'Impossible' {'holds' if infeasible else 'does not hold'}: the standard (math) path keeps scores, masked "
        f"scores and weights, {math_one / GB:.0f} GB for one head and {math_all / 1e12:.1f} TB for {MEM_HEADS} "
        f"heads, against an {DEVICE_BYTES / GB:.0f} GB accelerator"
    )

    def plot(fig) -> None:
        ax = fig.subplots(1, 1)
        ns = [r[0] for r in rows]
        for col, label in ((1, "scores, 1 head"), (2, f"scores, {MEM_HEADS} heads"), (3, "math backend, 1 head"),
                           (4, f"math backend, {MEM_HEADS} heads")):  # fmt: skip
            ax.plot(ns, [r[col] * GB for r in rows], "o-", label=label)
        ax.plot([LONG], [CARD_STANDARD], "rX", ms=12, label="card: 40 TB")
        ax.axhline(DEVICE_BYTES, color="k", ls="--", lw=0.8, label="80 GB accelerator")
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel="bytes (fp32, batch 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return LabResult(
        columns=[
            "n",
            "scores GB (1 head)",
            f"scores GB ({MEM_HEADS} heads)",
            "math GB (1 head)",
            f"math GB ({MEM_HEADS} heads)",
        ],  # fmt: skip
        rows=rows,
        criterion="the fp32 score matrix of one head at n = 100K is within 2x of the card's 40 TB, and the standard "
        "(math backend) working set at 100K exceeds an 80 GB accelerator even for one head",
        supported=arithmetic_ok and infeasible,
        finding=finding,
        plot=plot,
        notes="Bytes from archlab.analysis.memory (score_matrix_bytes: B A N M sizeof(dtype); attention_bytes: "
        "what archlab's math backend allocates, causal: 3 score-sized tensors + boolean masks). The card's "
        "40 TB would be 1,000 such matrices, e.g. 32 layers x 32 heads kept for backward: a guess at its origin, "
        "not what it writes. Verdict on the card as written: the infeasibility holds, the number is 1000x off",
    )


@register_lab(
    "flash-memory",
    claim="For 100,000 tokens, Flash attention needs O(n) memory, ~400MB, feasible (linear attention likewise "
    "O(n) ~400MB)",
    source="lesson 8 card 3",
    tags=("attention", "memory"),
)
def run_flash_memory(quick: bool, seed: int) -> LabResult:
    rows = []
    for n in memory_lengths(quick):
        b = {kind: attention_bytes(kind, n, heads=MEM_HEADS, d_k=MEM_D_K) for kind in ("chunked", "linear", "math")}
        rows.append([n, b["chunked"] / GB, b["linear"] / GB, b["math"] / GB, b["chunked"] / n])
    by_n = {r[0]: r for r in rows}
    half, full = by_n[LONG // 2], by_n[LONG]
    growth = {"flash": full[1] / half[1], "linear": full[2] / half[2], "math": full[3] / half[3]}
    flash, linear = full[1] * GB, full[2] * GB
    near = all(CARD_FLASH / 2 <= b <= 2 * CARD_FLASH for b in (flash, linear))
    supported = near and growth["flash"] <= 2.2 and growth["linear"] <= 2.2
    finding = (
        f"at n = 100K (d = {MEM_HEADS * MEM_D_K}: {MEM_HEADS} heads of {MEM_D_K}, fp32) archlab's tiled flash "
        f"attention adds {flash / 1e6:.0f} MB and linear attention {linear / 1e6:.0f} MB beyond q, k, v (the "
        f"card: ~400 MB), against {full[3]:,.0f} GB for the standard path; from 50K to 100K tokens they grow "
        f"{growth['flash']:.2f}x and {growth['linear']:.2f}x (O(n)), the standard path {growth['math']:.2f}x"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        ns = [r[0] for r in rows]
        for col, label in ((1, "flash (chunked)"), (2, "linear"), (3, "standard (math)")):
            ax1.plot(ns, [r[col] * GB for r in rows], "o-", label=label)
        ax1.plot([LONG], [CARD_FLASH], "rX", ms=12, label="card: ~400 MB")
        ax1.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel="bytes beyond q, k, v")
        ax2.plot(ns, [r[4] / 1e3 for r in rows], "o-", label="flash (chunked)")
        ax2.set(xscale="log", xlabel="sequence length n", ylabel="KB per token (levels off: O(n))", ylim=(0, None))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

    return LabResult(
        columns=["n", "flash GB", "linear GB", "math GB", "flash bytes/token"],
        rows=rows,
        criterion="at n = 100K, with d = 1024 (16 heads of 64) in fp32, the flash (chunked) and linear working "
        "memory are each within 2x of 400 MB, and each grows <= 2.2x from 50K to 100K tokens (O(n): 2x; the "
        "score matrix: 4x)",
        supported=supported,
        finding=finding,
        plot=plot,
        notes="Estimates from archlab.analysis.attention_bytes (checked against measured peaks in "
        "benchmarks/long_context.py): the output [N, d] (410 MB at d = 1024, fp32) dominates, so the card's "
        "400 MB matches a model of width ~1000; at d = 4096 it would be 4x that. The card's 'Sparse O(n sqrt n) "
        "~1.3GB' is not checked: archlab's sparse backends (sliding, bigbird) are tiled and O(n) too",
    )


# ================================================================================================
# lora-params
# ================================================================================================


def lora_counts(model: nn.Module, r: int) -> LoRAReport:
    """Trainable and total parameters of a copy of ``model`` with rank-``r`` LoRA on every attention's ``in_proj``."""
    return lora_report(apply_lora(copy.deepcopy(model), "*.in_proj", r=r))


def paper_trainable(n_layers: int, d: int, r: int) -> int:
    """LoRA on ``W_Q`` and ``W_V`` (each ``[d, d]``) of every layer: ``2 L r (d + d)``."""
    return n_layers * 2 * r * (d + d)


@register_lab(
    "lora-params",
    claim="LoRA freezes the base weights and trains tiny low-rank adapters: slash trainable parameters by "
    "10,000x; fine-tune 0.1% of weights with rank-r adapters",
    source="notes 4 and 8 (cheat-sheet: LoRA)",
    tags=("parameters", "fine-tuning"),
)
def run_lora(quick: bool, seed: int) -> LabResult:
    ranks = [4, 8] if quick else [1, 2, 4, 8, 16, 64]
    config = gpt_config("gpt3-175b")
    model = on_meta(config)
    base = count_parameters(model).total
    rows = []
    for r in ranks:
        report = lora_counts(model, r)
        paper = paper_trainable(config.n_layers, config.d_model, r)
        rows.append([r, paper, report.trainable, report.total, base / paper, paper / report.total])
    reduction4 = next(row[4] for row in rows if row[0] == 4)
    small_ranks = [row for row in rows if row[0] <= 8]
    near_10k = 5_000 <= reduction4 <= 20_000
    under_01 = all(row[5] <= 1e-3 for row in small_ranks)
    rank_at_01 = 1e-3 * base / paper_trainable(config.n_layers, config.d_model, 1)
    finding = (
        f"on GPT-3's 175B shape ({base / 1e9:.1f}B parameters), LoRA on W_Q and W_V trains "
        + ", ".join(f"{row[1] / 1e6:.1f}M at r={row[0]} ({row[4]:,.0f}x fewer, {row[5]:.3%})" for row in rows)
        + f"; at r=4 that is {reduction4:,.0f}x ({'within' if near_10k else 'not within'} 2x of 10,000x). "
        f"r = {small_ranks[0][0]}..{small_ranks[-1][0]} trains {small_ranks[0][5]:.4%}-{small_ranks[-1][5]:.3%} "
        f"of the weights ({'under' if under_01 else 'above'} 0.1%): '0.1%' is the share at r ~ {rank_at_01:.0f} "
        "(1,000x), ten times what 10,000x means"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        rs = [row[0] for row in rows]
        ax1.plot(rs, [row[4] for row in rows], "o-")
        ax1.axhline(10_000, color="r", ls="--", lw=0.8, label="claim: 10,000x")
        ax1.set(xscale="log", yscale="log", xlabel="rank r", ylabel="total / trainable parameters")
        ax2.plot(rs, [100 * row[5] for row in rows], "o-")
        ax2.axhline(0.1, color="r", ls="--", lw=0.8, label="claim: 0.1%")
        ax2.set(xscale="log", yscale="log", xlabel="rank r", ylabel="trainable share of weights (%)")
        for ax in (ax1, ax2):
            ax.set_xticks(rs, [str(r) for r in rs])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

    return LabResult(
        columns=[
            "r",
            "trainable (W_Q, W_V)",
            "trainable (apply_lora)",
            "total with adapters",
            "reduction",
            "trainable share",
        ],  # fmt: skip
        rows=rows,
        criterion="on the GPT-3 175B shape, LoRA on W_Q and W_V at r = 4 trains 5,000-20,000x fewer parameters "
        "than the model has (10,000x within 2x), and every r <= 8 trains <= 0.1% of the weights",
        supported=near_10k and under_01,
        finding=finding,
        plot=plot,
        notes="The LoRA paper's GPT-3 setting adapts W_Q and W_V: r (d + d) each, 4.7M trainable at r = 1 and "
        "37.7M at r = 8, as in its table 4. archlab fuses W_Q, W_K, W_V into one in_proj, so apply_lora adapts "
        "the fused [3d, d] weight; its r (d + 3d) per layer equals the two separate adapters' count exactly (the "
        "'apply_lora' column, from lora_report on the meta model), though it is not the same update. Parameters "
        "only: optimizer state and activations set the memory saving (the paper: 3x less GPU memory)",
    )


# ================================================================================================
# attention-vs-recurrence
# ================================================================================================

RECURRENCE_HEADS = 4


def layer_costs(d: int, n: int, generator: torch.Generator) -> dict[str, int]:
    """Forward FLOPs (torch's counter) and matmul calls of one self-attention layer (``MultiHeadAttention``,
    math backend) and of one RNN and LSTM layer (archlab's cells, written out) on ``x [1, N, d]``."""
    mha = MultiHeadAttention(d, RECURRENCE_HEADS, backend="math").eval()
    rnn, lstm = build_rnn("rnn", d, d, fused=False), build_rnn("lstm", d, d, fused=False)
    x = torch.randn(1, n, d, generator=generator)
    attn, attn_calls = torch_count(partial(mha, x))
    rnn_flops, rnn_calls = torch_count(partial(rnn, x))
    lstm_flops, _ = torch_count(partial(lstm, x))
    archlab = count_flops(mha, x).by_component
    return {
        "scores": attn.get("aten.bmm", 0),
        "projections": sum(attn.get(op, 0) for op in ("aten.addmm", "aten.mm") + KERNEL_PRODUCTS),
        "archlab": archlab["attention"] + archlab["projections"], "rnn": sum(rnn_flops.values()),
        "lstm": sum(lstm_flops.values()), "attn_calls": attn_calls, "rnn_calls": rnn_calls,
    }  # fmt: skip


@register_lab(
    "attention-vs-recurrence",
    claim="Complexity per layer: self-attention O(N^2 d), recurrent O(N d^2); sequential operations: "
    "self-attention O(1), recurrent O(N)",
    source="deck: self-attention vs recurrent layers",
    tags=("attention", "recurrent", "compute"),
)
def run_recurrence(quick: bool, seed: int) -> LabResult:
    widths = [64] if quick else [64, 128]
    lengths = [16, 64, 256] if quick else [16, 32, 64, 128, 256, 512]
    g = torch.Generator().manual_seed(seed)
    rows, costs = [], {}
    for d in widths:
        for n in lengths:
            c = costs[d, n] = layer_costs(d, n, g)
            rows.append([d, n, c["scores"], c["projections"], c["rnn"], c["lstm"], c["scores"] / c["rnn"],
                         (c["scores"] + c["projections"]) / c["lstm"], c["attn_calls"], c["rnn_calls"]])  # fmt: skip
    exact = all(
        c["scores"] == 4 * n * n * d and c["projections"] == 8 * n * d * d and c["rnn"] == 4 * n * d * d
        and c["lstm"] == 16 * n * d * d and c["archlab"] == c["scores"] + c["projections"]
        for (d, n), c in costs.items()
    )  # fmt: skip
    crossover = all((r[6] > 1) == (r[1] > r[0]) and (r[6] == 1) == (r[1] == r[0]) for r in rows)
    constant = len({r[8] for r in rows}) == 1
    linear = all(r[9] == 2 * r[1] for r in rows)
    supported = exact and crossover and constant and linear
    d0 = widths[0]
    at = {r[1]: r for r in rows if r[0] == d0}
    finding = (
        f"torch's FLOP counter gives exactly 4N^2d for QK^T and alpha V, 8Nd^2 for the projections, 4Nd^2 per "
        f"RNN and 16Nd^2 per LSTM layer; scores / RNN = N / d ({at[lengths[0]][6]:g} at N={lengths[0]}, d={d0}; "
        f"{at[lengths[-1]][6]:g} at N={lengths[-1]}), equal at N = d. Attention runs {rows[0][8]} matmuls at "
        f"every N, the RNN 2N ({at[lengths[-1]][9]:,} at N={lengths[-1]})"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        for d in widths:
            (line,) = ax1.plot(lengths, [costs[d, n]["scores"] for n in lengths], "o-", label=f"scores 4N^2d (d={d})")
            ax1.plot(
                lengths,
                [costs[d, n]["rnn"] for n in lengths],
                "s--",
                color=line.get_color(),
                label=f"RNN 4Nd^2 (d={d})",
            )
            ax1.axvline(d, color=line.get_color(), lw=0.8, ls=":")
        ax1.set(xscale="log", yscale="log", xlabel="sequence length N (dotted: N = d)", ylabel="forward FLOPs")
        ax2.plot(lengths, [costs[d0, n]["attn_calls"] for n in lengths], "o-", label="self-attention")
        ax2.plot(lengths, [costs[d0, n]["rnn_calls"] for n in lengths], "s-", label="RNN")
        ax2.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="matmul calls per forward")
        for ax in (ax1, ax2):
            ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    return LabResult(
        columns=[
            "d",
            "N",
            "scores",
            "projections",
            "RNN",
            "LSTM",
            "scores/RNN",
            "attn layer/LSTM",
            "attn matmuls",
            "RNN matmuls",
        ],  # fmt: skip
        rows=rows,
        criterion="torch.utils.flop_counter on archlab's layers gives exactly 4 N^2 d (scores), 8 N d^2 "
        "(projections, equal to archlab's counter), 4 N d^2 (RNN) and 16 N d^2 (LSTM) at every size; scores/RNN "
        "is < 1 below N = d, 1 at N = d, > 1 above; attention issues the same number of matmuls at every N and "
        "the RNN 2N",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"Batch 1, {RECURRENCE_HEADS} heads, float32 on the CPU, elementwise work not counted. The O(N^2 d) vs "
        "O(N d^2) comparison leaves out attention's own projections (8 N d^2): a whole self-attention layer "
        "costs more than an RNN layer at every N, and as much as an LSTM layer at N = 2d. Of the RNN's 2N "
        "matmuls, the N products W_ih x_t could be batched; the N products W_hh h_(t-1) depend on each other",
    )
