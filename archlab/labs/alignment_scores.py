r"""The deck's six alignment score functions, each as the attention of one seq2seq model, on one task.

The deck's attention step is ``alpha_i = softmax_i a(s_t, h_i)``, ``c_t = sum_i alpha_i h_i``, with six scores
``a`` (:mod:`archlab.nn.attention`)::

    content-based  (Graves 2014)    cosine[s_t, h_i]
    additive       (Bahdanau 2015)  v_a^T tanh(W_a [s_t; h_i])
    location-based (Luong 2015)     alpha_t = softmax(W_a s_t)          no look at the keys at all
    general        (Luong 2015)     s_t^T W_a h_i
    dot-product    (Luong 2015)     s_t^T h_i
    scaled dot     (Vaswani 2017)   s_t^T h_i / sqrt(n)

Six RNNsearch models (:mod:`archlab.models.seq2seq`) that differ only in the score (same widths, seed, batches
and steps; the decoder is twice the encoder's width so that the parameter-free scores can compare ``s_t`` with
the annotations ``h_i = [->h_i; <-h_i]``) learn to reverse strings of 2-10 letters. Reversal needs a real
alignment: output letter ``i`` is source letter ``n - 1 - i``, which moves with the length ``n``. Each is scored
on held-out strings: greedy exact match, per-letter accuracy, and *alignment accuracy*, the fraction of output
steps whose largest attention weight falls on the source letter they copy (teacher-forced). The lab
``dot-vs-additive`` measures the scores' cost; this one their quality.
"""

from __future__ import annotations

import torch

from archlab.data.loaders import Seq2SeqBatches
from archlab.data.tokenizers import CharTokenizer
from archlab.labs.bottleneck import ALPHABET, copy_pairs, letter_accuracy
from archlab.labs.common import greedy_pairs, train_task
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.models.seq2seq import RNNsearch, RNNsearchConfig

#: the deck's six, in its order: (archlab's score name, the deck's name)
SCORES = (("content", "content-based (cosine)"), ("additive", "additive"), ("location", "location-based"),
          ("general", "general"), ("dot", "dot-product"), ("scaled_dot", "scaled dot-product"))  # fmt: skip
D_EMBED, D_ENCODER, D_DECODER = 32, 32, 64  # decoder = 2 x encoder: s_t and h_i have the same width
MAX_LEN = 10
LR = 3e-3
WORKS = 0.8  # a score "works": held-out exact match and alignment accuracy both at least this
LEARNED = 0.5  # the best score's exact match must reach this, else the run was too short to judge


def build(score: str, vocab_size: int) -> RNNsearch:
    """RNNsearch with alignment score ``score``; every other size the same for all six."""
    return RNNsearch(RNNsearchConfig(vocab_size=vocab_size, d_embed=D_EMBED, d_encoder=D_ENCODER, d_decoder=D_DECODER,
                                     d_maxout=D_DECODER // 2, score=score, d_attn=D_DECODER, max_src_len=MAX_LEN + 1))  # fmt: skip


def alignment_hits(alpha: torch.Tensor, src_mask: torch.Tensor) -> tuple[int, int]:
    """For reversal: ``alpha [B, M, N]`` (teacher-forced attention, row ``i`` predicts output letter ``i``) and
    ``src_mask [B, N]`` (True on the ``n`` real source tokens, left-aligned) -> (rows whose argmax is source
    position ``n - 1 - i``, rows counted). Only rows ``i < n`` count (the EOS row copies no source letter)."""
    n = src_mask.sum(1)  # [B]
    i = torch.arange(alpha.shape[1])[None, :]  # [1, M]
    counted = i < n[:, None]  # [B, M]
    hits = (alpha.argmax(-1) == (n[:, None] - 1 - i)) & counted
    return int(hits.sum()), int(counted.sum())


@torch.no_grad()
def alignment_accuracy(model: RNNsearch, batches: Seq2SeqBatches) -> float:
    """Held-out alignment accuracy of :func:`alignment_hits` over ``batches.eval_batches()`` (eval mode)."""
    was_training = model.training
    model.eval()
    hits = counted = 0
    try:
        for batch in batches.eval_batches():
            _, alpha = model(batch["src_ids"], batch["tgt_in"], batch["src_mask"], return_attention=True)
            h, c = alignment_hits(alpha, batch["src_mask"])
            hits, counted = hits + h, counted + c
    finally:
        model.train(was_training)
    return hits / counted


def judge(scores: dict[str, dict[str, float]]) -> tuple[bool, list[str], str]:
    """``scores[name]``: ``exact`` and ``alignment`` -> (supported: every score works, the ones that do not, why
    undecided or "")."""
    failing = [name for name, m in scores.items() if min(m["exact"], m["alignment"]) < WORKS]
    best = max(m["exact"] for m in scores.values())
    undecided = (f"no score learned the task: best held-out exact match {best:.2f}, below {LEARNED} (train longer: "
                 "the full run)") if best < LEARNED else ""  # fmt: skip
    return not failing, failing, undecided


@register_lab(
    "alignment-scores",
    claim="Attention weights are a softmax over an alignment score a(s_t, h_i); the deck's six score functions "
    "(content-based cosine, additive, location-based, general, dot-product, scaled dot-product) each serve as that "
    "score, letting the decoder find the relevant source token",
    source="deck: attention mechanism equation; deck: alignment score functions (Graves 2014, Bahdanau 2015, "
    "Luong 2015, Vaswani 2017)",
    tags=("attention", "seq2seq", "training"),
    minutes=2.0,  # CPU time of the full run (one thread, 117 s); 30 min of wall time on the shared machine it ran on
)
def run(quick: bool, seed: int) -> LabResult:
    steps, n_valid = (12, 48) if quick else (400, 300)
    tokenizer = CharTokenizer(ALPHABET)
    train = [(s, s[::-1]) for s, _ in copy_pairs(20000, MAX_LEN, seed=seed, split="train")]
    valid = [(s, s[::-1]) for s, _ in copy_pairs(n_valid, MAX_LEN, seed=seed, split="valid")]
    batches = Seq2SeqBatches.from_text(train, tokenizer, batch_size=32, seed=seed, valid=valid)
    scores, params = {}, {}
    with one_thread():  # GRU steps on [32, 64] tensors: a second thread only waits
        for name, _ in SCORES:
            torch.manual_seed(seed)
            model = build(name, tokenizer.vocab_size)
            params[name] = sum(p.numel() for p in model.parameters())
            train_task(model, "seq2seq", batches, steps, lr=LR, label=name)
            decoded = greedy_pairs(model, batches)
            scores[name] = {
                "exact": sum(r == o for _, r, o in decoded) / len(decoded),
                "letters": sum(letter_accuracy(r, o) for _, r, o in decoded) / len(decoded),
                "alignment": alignment_accuracy(model, batches),
            }
    supported, failing, undecided = judge(scores)
    rows = [[label, params[name], scores[name]["exact"], scores[name]["letters"], scores[name]["alignment"]]
            for name, label in SCORES]  # fmt: skip
    ranked = sorted(SCORES, key=lambda s: -scores[s[0]]["exact"])
    finding = (
        "held-out exact match by score: " + ", ".join(f"{label} {scores[n]['exact']:.2f}" for n, label in ranked)
        + "; alignment accuracy " + ", ".join(f"{label} {scores[n]['alignment']:.2f}" for n, label in SCORES)
        + (f"; below {WORKS}: {', '.join(dict(SCORES)[n] for n in failing)}" if failing else
           f"; all six reach {WORKS} on both")
    )  # fmt: skip

    def plot(fig) -> None:
        ax = fig.subplots(1, 1)
        x = range(len(SCORES))
        width = 0.27
        for k, (key, label) in enumerate((("exact", "exact match"), ("letters", "letter accuracy"),
                                          ("alignment", "alignment accuracy"))):  # fmt: skip
            ax.bar([i + (k - 1) * width for i in x], [scores[n][key] for n, _ in SCORES], width, label=label)
        ax.axhline(WORKS, color="k", ls=":", lw=1, label=f"criterion {WORKS}")
        ax.set(xticks=list(x), xticklabels=[label for _, label in SCORES], ylim=(0, 1.05),
               title=f"RNNsearch reversing 2-{MAX_LEN} letters, {steps} steps, one score each")  # fmt: skip
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    return LabResult(
        columns=["score", "parameters", "exact match", "letter accuracy", "alignment accuracy"],
        rows=rows,
        criterion=f"same RNNsearch, seed, batches and steps, only the score differs: with every one of the six "
        f"scores the held-out exact match AND the alignment accuracy (argmax of the attention on the copied source "
        f"letter) reach {WORKS}",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"reversal of 2-{MAX_LEN} letters of {ALPHABET!r} ({len(train):,} training pairs, {len(valid)} held out, "
        f"no source on both sides); embedding {D_EMBED}, bi-GRU 2 x {D_ENCODER}, decoder GRU {D_DECODER}, maxout "
        f"{D_DECODER // 2}; additive hidden width {D_DECODER}; location-based: one weight row per source position "
        f"({MAX_LEN + 1}); {steps} AdamW steps of 32 pairs, lr {LR} (10% warmup, cosine), clip 1, one seed; greedy "
        "decoding. The parameter counts differ only by the score's own weights. The scaled dot product divides by "
        f"sqrt({2 * D_ENCODER}) (the deck's n is the width)",
    )
