r"""The number of heads at fixed compute: too few or too many hurts, and so does a small ``d_k`` (the deck's
ablations, Vaswani et al. 2017 table 3, rows A).

With ``A`` heads of width ``d_k = d / A`` the attention's parameters and FLOPs do not depend on ``A``
(lab ``multihead-compute``), so a sweep of ``A`` at fixed ``d`` changes only how the ``d`` dimensions are cut:
``A = 1`` is one ``d``-wide attention pattern per position, ``A = d / 4`` is sixteen patterns of 4-dimensional
keys. The lab trains byte-level GPTs that differ only in ``A`` on the same batches of Python's standard-library
source, from the same seed, and scores each on the same held-out bytes.
"""

from __future__ import annotations

import torch

from archlab.data import LMWindows
from archlab.labs.common import byte_lm_data, learned_too_little, train_gpt
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.models.gpt import GPTConfig

CORPUS_BYTES = 1_000_000
D_MODEL, LAYERS, SEQ_LEN, LR = 64, 2, 64, 3e-3
HEAD_COUNTS = (1, 2, 4, 8, 16)  # d_k = 64, 32, 16, 8, 4
MARGIN = 0.02  # nats / byte: "hurts" = at least this much above the best head count's held-out loss


def judge(losses: dict[int, float]) -> tuple[bool, int]:
    """``losses[A]`` -> (supported, the best ``A``): the best head count is neither the fewest nor the most, and
    both extremes are at least :data:`MARGIN` worse than it."""
    best = min(losses, key=losses.get)
    fewest, most = min(losses), max(losses)
    interior = best not in (fewest, most)
    return interior and all(losses[a] >= losses[best] + MARGIN for a in (fewest, most)), best


@register_lab(
    "heads-fixed-compute",
    claim="At constant computation, changing the number of heads degrades quality if there are too few or too many "
    "(h = 8 was best at d = 512); reducing the key size d_k hurts quality",
    source="deck: ablations of heads and attention dimensions (Vaswani et al. 2017, table 3)",
    tags=("attention", "training"),
    minutes=2.5,  # CPU time of the full run (one thread); 10 min of wall time on the shared machine it ran on
)
def run(quick: bool, seed: int) -> LabResult:
    steps, batch_size, windows, counts = (20, 8, 16, (1, 4, 16)) if quick else (400, 16, 64, HEAD_COUNTS)
    data = byte_lm_data(CORPUS_BYTES, SEQ_LEN, windows)
    tokenizer, train_ids, unigram = data.tokenizer, data.train_ids, data.unigram
    inputs, labels = data.inputs, data.labels
    total = windows * SEQ_LEN
    batches = LMWindows(train_ids, seq_len=SEQ_LEN, batch_size=batch_size, seed=seed)

    losses, params = {}, {}
    with one_thread():
        for heads in counts:
            config = GPTConfig(vocab_size=tokenizer.vocab_size, max_len=SEQ_LEN, d_model=D_MODEL, n_heads=heads,
                               n_layers=LAYERS, dropout=0.0, attn_dropout=0.0)  # fmt: skip
            model = train_gpt(config, batches, steps, lr=LR, seed=seed, label=f"A={heads}")[0].eval()
            with torch.no_grad():
                losses[heads] = model.loss(inputs, labels).item()
            params[heads] = sum(p.numel() for p in model.parameters())

    supported, best = judge(losses)
    undecided = learned_too_little({f"A={a}": x for a, x in losses.items()}, unigram)
    rows = [[a, D_MODEL // a, params[a], losses[a], losses[a] - losses[best]] for a in counts]
    finding = (
        f"d={D_MODEL}, {steps} steps: held-out loss "
        + ", ".join(f"A={a} (d_k={D_MODEL // a}) {losses[a]:.3f}" for a in counts)
        + f" nats/byte; the best is A={best}; the fewest heads are {losses[counts[0]] - losses[best]:+.3f} from it, "
        f"the most (d_k={D_MODEL // counts[-1]}) {losses[counts[-1]] - losses[best]:+.3f}; parameters equal at every A "
        f"({params[counts[0]]:,})"
    )

    def plot(fig) -> None:
        ax = fig.subplots()
        ax.plot(list(counts), [losses[a] for a in counts], "o-")
        for a in counts:
            ax.annotate(f"d_k={D_MODEL // a}", (a, losses[a]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(counts), [str(a) for a in counts])
        ax.minorticks_off()
        ax.set(xlabel=f"heads A (d_k = {D_MODEL} / A)", ylabel="held-out loss (nats / byte)")
        ax.grid(alpha=0.3)

    return LabResult(
        columns=["heads A", "d_k", "parameters", "held-out loss", "minus the best"],
        rows=rows,
        criterion=f"the lowest held-out loss is at an A strictly between {counts[0]} and {counts[-1]}, and both "
        f"A={counts[0]} and A={counts[-1]} are >= {MARGIN} nats/byte above it",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"byte-level GPTs (d={D_MODEL}, {LAYERS} blocks, learned positions), {steps} AdamW steps of "
        f"{batch_size} x "
        f"{SEQ_LEN} bytes, lr {LR} (10% warmup, cosine), one seed, {total} held-out predictions (unigram baseline "
        f"{unigram:.2f}). The paper's rows A vary h at d=512 on translation; here d={D_MODEL}, so A=4 has the "
        "paper's h/d ratio only roughly. 'Smaller d_k hurts' is read from the same sweep (d_k = d / A); the paper's "
        "rows B shrink d_k at fixed h, which GPTConfig (d_k = d / A) does not offer",
    )
