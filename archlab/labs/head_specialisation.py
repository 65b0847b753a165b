r"""Heads specialise without supervision: a small GPT trained only to predict the next token grows heads of
distinct kinds, read off their attention patterns (lesson 4 card 2: positional, copy heads; deck: one head follows
the next-word alignment while another links related words).

Data: repeated random token sequences over ``V`` symbols, the classic trigger of induction heads: ``P`` uniform
random symbols (``P`` drawn per sequence, 5..20) repeated over the whole window, so from the second time through,
the symbol after the previous occurrence of the current one is the answer. A fixed offset cannot copy (``P``
varies); an induction head can, and needs two layers: a previous-token head writes ``x_{j-1}`` into position ``j``,
then a head of the next layer at query ``i`` attends to the key ``j`` whose previous token is ``x_i`` and reads
``x_j``. Nothing tells a head what to do; the loss is the plain next-token cross-entropy. Positions are RoPE:
relative, so a previous-token head is the same map at every position (with learned absolute positions, the same
data and seed taught the model a smeared, position-specific way to copy, with no head attending to the token after
the previous occurrence).

Each head is then classified from its weights ``alpha [N, N]`` on probes of uniform random symbols repeated once,
at two periods ``P`` (:data:`PROBE_PERIODS`, :func:`head_scores`, :func:`classify_head`)::

    copy/induction   the induction score alpha[i, i-P+1] (attention to the token after the previous occurrence of
                     x_i, which is x_{i-P} in the repeat) or the copy score alpha[i, i-P] (the previous occurrence
                     itself), mean over the repeat, the smaller of the two periods'             >= 0.4
                     (a head that follows the period, not a fixed offset)
    previous-token   mean_i alpha[i, i-1]                                                           >= 0.4
    positional/local the largest mean weight on one fixed offset alpha[i, i-k] (k != 1; k = 0 is the token
                     itself), or the weight on the window of keys i-3 .. i                     >= 0.4 / 0.6
    other            none of these (e.g. a head parked on the first token, or a broad average)

The same census of the model at initialisation is the control: specialisation must come from training.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

import torch
from torch import Tensor

from archlab.analysis.attention_maps import AttentionMaps, capture_attention, draw_map, maps_from_capture
from archlab.errors import ShapeError
from archlab.labs.common import learned_too_little, train_gpt
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.models.gpt import GPT, GPTConfig

VOCAB = 64
SEQ_LEN = 48
PERIODS = (5, 20)  # the repeated sequences' period P, drawn per sequence
PROBE_PERIODS = (9, 14)
KINDS = ("previous-token", "copy/induction", "positional/local", "other")
THRESHOLDS = {"previous-token": 0.4, "copy/induction": 0.4, "offset": 0.4, "local": 0.6}
LOCAL_WINDOW = 3  # keys i-3 .. i
D_MODEL, HEADS, LAYERS = 64, 4, 2
LR = 3e-3
POSITIONS = "rope"
FULL_STEPS = 1200


# ================================================================================================
# Data
# ================================================================================================


def repeat_sequence(n: int, generator: torch.Generator) -> Tensor:
    """``n`` symbols: ``P`` uniform random ones (``P`` drawn from :data:`PERIODS`) repeated over the window,
    ``x_i = x_{i-P}``: from the second time through, the symbol after the previous occurrence is the answer."""
    period = int(torch.randint(PERIODS[0], PERIODS[1] + 1, (1,), generator=generator))
    first = torch.randint(0, VOCAB, (period,), generator=generator)
    return first.repeat(n // period + 1)[:n]


def sequence(generator: torch.Generator) -> Tensor:
    """``[SEQ_LEN + 1]`` symbols of a :func:`repeat_sequence`."""
    return repeat_sequence(SEQ_LEN + 1, generator)


class HeadBatches:
    """Batches of :func:`sequence` for :func:`~archlab.labs.common.train_gpt`: ``batch(step)`` is the same for the same
    seed and step (``input_ids`` and next-token ``labels``, ``[B, SEQ_LEN]``)."""

    def __init__(self, batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = torch.stack([sequence(generator) for _ in range(self.batch_size)])
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def probes(n: int, seed: int, period: int) -> Tensor:
    """``[n, 2 P]``: uniform random symbols repeated once at period ``P``: copying is the only structure."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, VOCAB, (n, period), generator=generator)
    return torch.cat([first, first], dim=1)


# ================================================================================================
# Classifying a head from its weights
# ================================================================================================


def head_scores(weights: Tensor, period: int) -> dict[str, float]:
    """The pattern scores of one head from its causal weights ``[..., N, N]`` (averaged over leading dims) on a
    sequence repeated at ``period``: ``previous``, ``induction``, ``copy``, ``offset`` (the largest mean weight on one
    fixed offset other than 1, over the rows that have it) and ``local`` (see the module docstring)."""
    if weights.ndim < 2 or weights.shape[-1] != weights.shape[-2]:
        raise ShapeError(f"head_scores takes self-attention weights [..., N, N], got {tuple(weights.shape)}")
    n = weights.shape[-1]
    if not 1 <= period < n:
        raise ShapeError(f"period={period} must be in [1, N={n}): the sequence must repeat inside the window")
    w = weights.reshape(-1, n, n).double().mean(0)
    diagonals = [w.diagonal(-k).mean().item() for k in range(max(n // 2, 2))]  # mean_i alpha[i, i-k]
    repeat = torch.arange(period, n)
    rows = torch.arange(n)
    band = (rows[None, :] <= rows[:, None]) & (rows[None, :] >= rows[:, None] - LOCAL_WINDOW)
    return {
        "previous": diagonals[1],
        "induction": w[repeat, repeat - period + 1].mean().item(),
        "copy": w[repeat, repeat - period].mean().item(),
        "offset": max(d for k, d in enumerate(diagonals) if k != 1),
        "local": (w * band).sum(-1).mean().item(),
    }


def combine(scores: list[dict[str, float]]) -> dict[str, float]:
    """One head's scores over probes of several periods: copying must hold at each (the smallest), the rest averaged."""
    return {key: (min if key in ("induction", "copy") else statistics.fmean)([s[key] for s in scores])
            for key in scores[0]}  # fmt: skip


def classify_head(scores: dict[str, float]) -> str:
    """One of :data:`KINDS` from :func:`head_scores` (or :func:`combine`), tested in that order."""
    if max(scores["induction"], scores["copy"]) >= THRESHOLDS["copy/induction"]:
        return "copy/induction"
    if scores["previous"] >= THRESHOLDS["previous-token"]:
        return "previous-token"
    if scores["offset"] >= THRESHOLDS["offset"] or scores["local"] >= THRESHOLDS["local"]:
        return "positional/local"
    return "other"


@torch.no_grad()
def census(model: GPT, probes_by_period: dict[int, Tensor]) -> list[dict]:
    """Every head of ``model``, layer by layer: ``{"layer", "head", "kind", **scores}`` on the probes of each period
    (``{P: [n, 2 P]}``), combined (:func:`combine`)."""
    model.eval()
    per_period = {}
    for period, probe in probes_by_period.items():
        with capture_attention(model) as capture:
            model(probe, logits_to_keep=1)
        per_period[period] = [call.weights for call in capture.calls]  # [n, A, N, N] per layer
    heads = []
    for layer, first in enumerate(next(iter(per_period.values()))):
        for h in range(first.shape[1]):
            scores = combine([head_scores(weights[layer][:, h], p) for p, weights in per_period.items()])
            heads.append({"layer": layer, "head": h, "kind": classify_head(scores), **scores})
    return heads


@torch.no_grad()
def held_out_loss(model: GPT, batches: HeadBatches, step: int) -> float:
    """Next-token loss (nats) on one held-out batch of the training distribution."""
    model.eval()
    batch = batches.batch(step)
    return model.loss(batch["input_ids"], batch["labels"]).item()


@torch.no_grad()
def repeat_loss(model: GPT, probes_by_period: dict[int, Tensor]) -> float:
    """Loss (nats) on the probes' repeated halves, averaged over the periods: ``log V`` without copying, near 0 with
    an induction head."""
    model.eval()
    losses = []
    for period, probe in probes_by_period.items():
        logits = model(probe[:, :-1])[:, period - 1 :]
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), probe[:, period:].flatten()).item())
    return statistics.fmean(losses)


@register_lab(
    "head-specialisation",
    claim="Heads specialise automatically during training, without explicit supervision: trained only to predict "
    "the next token, different heads take up different patterns (positional heads attending nearby positions, "
    "copy heads attending repeated tokens)",
    source="lesson 4 card 2 (What different heads learn; Key insight); deck: multi-head attention",
    tags=("attention", "interpretability"),
    minutes=3.2,  # the full run's wall time, one thread: 189 s on the shared, loaded machine
)
def run(quick: bool, seed: int) -> LabResult:
    steps, batch_size = (80, 16) if quick else (FULL_STEPS, 32)
    config = GPTConfig(vocab_size=VOCAB, max_len=SEQ_LEN, d_model=D_MODEL, n_heads=HEADS, n_layers=LAYERS,
                       dropout=0.0, attn_dropout=0.0, positional=POSITIONS)  # fmt: skip
    batches = HeadBatches(batch_size, seed)
    probe_sets = {p: probes(32, seed + 7 + p, p) for p in PROBE_PERIODS}
    torch.manual_seed(seed)
    initial = census(GPT(config), probe_sets)
    checkpoints = [steps * k // 5 for k in range(1, 6)]

    def evaluate(model: GPT) -> float:
        loss = repeat_loss(model, probe_sets)
        model.train()
        return loss

    with one_thread():  # a model this small: a second thread only adds waiting
        model, curve = train_gpt(config, batches, steps, lr=LR, seed=seed, evaluate_at=checkpoints, evaluate=evaluate,
                                 label="GPT (heads)")  # fmt: skip
    trained = census(model, probe_sets)
    loss, copy_loss = held_out_loss(model, HeadBatches(64, seed + 1_000), 0), curve[steps]
    unigram = math.log(VOCAB)  # the symbols are uniform in the long run
    counts = {"init": Counter(h["kind"] for h in initial), "trained": Counter(h["kind"] for h in trained)}
    specialised = [k for k in KINDS[:3] if counts["trained"][k]]
    induction = [h for h in trained if h["kind"] == "copy/induction" and h["induction"] >= THRESHOLDS["copy/induction"]]
    supported = bool(induction) and len(specialised) >= 2 and counts["init"]["copy/induction"] == 0
    undecided = learned_too_little({"GPT": loss}, unigram)
    if quick and not supported:  # the quick run never gives the verdict the full run may contradict
        undecided = (f"quick run of {steps} steps: induction heads form after hundreds of steps (the full run: "
                     f"{FULL_STEPS}), so a census without them cannot decide"
                     + (f"; {undecided}" if undecided else ""))  # fmt: skip

    rows = [[f"L{h['layer']}H{h['head']}", i["kind"], h["kind"], h["previous"], h["induction"], h["copy"], h["offset"],
             h["local"]] for h, i in zip(trained, initial, strict=True)]  # fmt: skip
    census_text = ", ".join(f"{counts['trained'][k]} {k}" for k in KINDS)
    finding = (
        f"after {steps} steps (held-out loss {loss:.2f} nats vs {unigram:.2f} for a uniform guess; on the probes' "
        f"repeated halves {copy_loss:.2f}) the {LAYERS * HEADS} heads are: {census_text}; at initialisation: "
        + ", ".join(f"{counts['init'][k]} {k}" for k in KINDS)
    )
    best = max(trained, key=lambda h: max(h["induction"], h["copy"]))
    period = PROBE_PERIODS[0]
    sample = probe_sets[period][:1]
    with torch.no_grad(), capture_attention(model) as capture:
        model(sample, logits_to_keep=1)
    labels = [str(t) for t in sample[0].tolist()]
    maps = maps_from_capture(capture, {False: labels}, {False: labels})
    for amap in maps:  # the census's kinds in the title: what to look for in each head's map
        kinds = ", ".join(f"{h} {trained[amap.layer * HEADS + h]['kind']}" for h in range(HEADS))
        amap.title = f"layer {amap.layer} on a probe of period {period} (heads: {kinds})"
    attention = AttentionMaps("head-specialisation GPT (trained)", " ".join(labels), maps,
                              [f"a probe of {period} uniform random symbols repeated once (symbols as numbers)"])  # fmt: skip

    def plot(fig) -> None:
        grid = fig.add_gridspec(LAYERS, HEADS + 2)
        for layer, call in enumerate(capture.calls):
            for h in range(HEADS):
                ax = fig.add_subplot(grid[layer, h])
                kind = trained[layer * HEADS + h]["kind"]
                draw_map(ax, call.weights[0, h], labels, labels, f"L{layer}H{h}: {kind}")
                ax.tick_params(labelsize=3)
        ax = fig.add_subplot(grid[:, HEADS:])
        x = torch.arange(len(KINDS))
        ax.bar(x - 0.2, [counts["init"][k] for k in KINDS], 0.4, label="at init", color="#bbb")
        ax.bar(x + 0.2, [counts["trained"][k] for k in KINDS], 0.4, label="trained", color="#2a7")
        ax.set_xticks(x, [k.replace("/", "/\n") for k in KINDS], fontsize=7)
        ax.set_ylabel("heads")
        ax.set_title(f"census (maps: a probe of period {period})", fontsize=8)
        ax.legend(fontsize=7)

    return LabResult(
        columns=["head", "kind at init", "kind trained", "previous", "induction", "copy", "offset", "local"],
        rows=rows,
        criterion=f"after training, at least one induction head (induction score, the attention to the token after "
        f"the previous occurrence, >= {THRESHOLDS['copy/induction']} at both probe periods {PROBE_PERIODS}) and at "
        "least two of the three "
        f"specialised kinds among the {LAYERS * HEADS} heads; the same census at initialisation has no copy/induction "
        "head (specialisation comes from training)",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        attention=attention,
        notes=f"GPT of {LAYERS} layers x {HEADS} heads, d={D_MODEL}, {POSITIONS} positions, V={VOCAB} symbols, "
        f"windows of {SEQ_LEN}, {steps} AdamW steps of {batch_size} sequences (lr {LR}, warmup + cosine). Loss on "
        "the probes' repeated halves during training: " + ", ".join(f"{v:.2f} at step {k}" for k, v in curve.items())
        + f". Heads are classified on 32 probes per period {PROBE_PERIODS} of uniform random symbols repeated once; "
        f"thresholds: copy/induction >= {THRESHOLDS['copy/induction']} (the smaller period's score: a head at a fixed "
        f"offset matches one period only), previous-token >= {THRESHOLDS['previous-token']}, positional/local: one "
        f"fixed offset >= {THRESHOLDS['offset']} or keys i-{LOCAL_WINDOW}..i >= {THRESHOLDS['local']}. The strongest "
        f"copy/induction head is L{best['layer']}H{best['head']} (induction {best['induction']:.2f}, copy "
        f"{best['copy']:.2f}). Syntactic and semantic heads need language, which this synthetic task does not have",
    )
