r"""Encoder-only for classification, decoder-only for generation, encoder-decoder for translation (lesson 4 card 4).

The three families of archlab, at about the same parameters (width ``d = 64``, ``A = 4`` heads, 4 blocks: BERT's
4 encoder blocks, GPT's 4 decoder blocks, the Transformer's 2 + 2), are each trained on three synthetic tasks
for the same steps, batches and seed. Every task maps a source ``x`` to a target ``y``; each family reads it in
its own natural way::

    encoder-only   [x SEP MASK ... MASK] -> every masked position predicts its y_j at once (BERT's MLM head)
    decoder-only   [x SEP y]             -> y_j predicted from x and y_<j (GPT, causal)
    enc-dec        encode(x), decode [BOS y]  -> y_j from the encoder's memory and y_<j (cross-attention)

    classification  x: 11 random symbols; y: 1 token, whether most of them are "low" (ids < S/2): a count over
                    the whole input
    generation      a Markov chain over the symbols (3 successors each, probabilities 0.6 / 0.3 / 0.1):
                    x its first 8 tokens, y the next 8: a continuation to generate
    translation     x: 10 random symbols; y: x reversed and mapped through a fixed permutation

The score is the held-out negative log-likelihood per target token each model assigns to ``y`` (nats; lower is
better): the autoregressive families' likelihood is exact, the encoder's is its factorised guess of all
positions at once. The card's choice is the "natural fit" for a task when its score is the best of the three or
within ``MARGIN`` of the best.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.labs.common import optimize
from archlab.labs.registry import LabResult, one_thread, progress_bar, register_lab
from archlab.models.bert import BertConfig, BertForPreTraining
from archlab.models.gpt import GPT, GPTConfig
from archlab.models.transformer import EncoderDecoderTransformer, TransformerConfig
from archlab.train import build_optimizer, build_scheduler
from archlab.train.schedules import WarmupCosine

SYMBOLS = 12  # S: ids 0 .. S-1; then the special tokens
SEP, MASK, BOS, PAD = SYMBOLS, SYMBOLS + 1, SYMBOLS + 2, SYMBOLS + 3
VOCAB = SYMBOLS + 4
D_MODEL, HEADS, LR, BATCH = 64, 4, 2e-3, 64
FULL_STEPS = 300
MARGIN = 0.05  # nats per target token: "within the margin of the best"
LEARNED = 0.2  # nats per target token below the uniform guess that the best model of a task must reach
ARCHS = ("encoder-only", "decoder-only", "encoder-decoder")
TASKS = ("classification", "generation", "translation")
CARD = {"classification": "encoder-only", "generation": "decoder-only", "translation": "encoder-decoder"}
UNIFORM = {"classification": float(torch.log(torch.tensor(2.0))), "generation": float(torch.log(torch.tensor(12.0))),
           "translation": float(torch.log(torch.tensor(12.0)))}  # fmt: skip


def build(arch: str, seed: int) -> nn.Module:
    """A fresh model of ``arch`` (``ARCHS``), seeded: width ``D_MODEL``, ``HEADS`` heads, 4 blocks in all."""
    torch.manual_seed(seed)
    if arch == "encoder-only":
        return BertForPreTraining(BertConfig(vocab_size=VOCAB, max_len=32, d_model=D_MODEL, n_heads=HEADS, n_layers=4,
                                             d_ff=4 * D_MODEL, dropout=0.0, attn_dropout=0.0, pad_id=PAD))  # fmt: skip
    if arch == "decoder-only":
        return GPT(GPTConfig(vocab_size=VOCAB, max_len=32, d_model=D_MODEL, n_heads=HEADS, n_layers=4, dropout=0.0,
                             attn_dropout=0.0))  # fmt: skip
    return EncoderDecoderTransformer(TransformerConfig(vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, n_layers=2,
                                                       d_ff=4 * D_MODEL, dropout=0.0, max_len=32, norm_first=True,
                                                       pad_id=PAD))  # fmt: skip


class TaskData:
    """Seeded ``(x [B, Nx], y [B, T])`` batches of one task (module docstring); the rule (chain, permutation) is
    fixed by ``rule_seed``, the examples by the generator passed to :meth:`batch`."""

    def __init__(self, task: str, rule_seed: int = 0):
        self.task = task
        g = torch.Generator().manual_seed(rule_seed)
        self.permutation = torch.randperm(SYMBOLS, generator=g)  # translation: y = pi(reverse(x))
        self.successors = torch.stack([torch.randperm(SYMBOLS, generator=g)[:3] for _ in range(SYMBOLS)])  # [S, 3]
        self.probs = torch.tensor([0.6, 0.3, 0.1])

    def batch(self, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.task == "classification":
            x = torch.randint(0, SYMBOLS, (size, 11), generator=gen)
            return x, ((x < SYMBOLS // 2).sum(1, keepdim=True) > 5).long()  # token 0 / 1
        if self.task == "translation":
            x = torch.randint(0, SYMBOLS, (size, 10), generator=gen)
            return x, self.permutation[x.flip(1)]
        seq = [torch.randint(0, SYMBOLS, (size,), generator=gen)]
        for _ in range(15):
            pick = torch.multinomial(self.probs.expand(size, 3), 1, generator=gen)[:, 0]
            seq.append(self.successors[seq[-1], pick])
        seq = torch.stack(seq, 1)  # [B, 16]
        return seq[:, :8], seq[:, 8:]


def target_logits(arch: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Each family's logits for the target positions: ``x [B, Nx], y [B, T] -> [B, T, V]`` (module docstring)."""
    b, nx = x.shape
    sep = torch.full((b, 1), SEP)
    if arch == "encoder-only":
        return model(torch.cat([x, sep, torch.full_like(y, MASK)], 1)).mlm_logits[:, nx + 1 :]
    if arch == "decoder-only":
        return model(torch.cat([x, sep, y[:, :-1]], 1))[:, nx:]
    return model(x, torch.cat([torch.full((b, 1), BOS), y[:, :-1]], 1))


def nll(arch: str, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean negative log-likelihood per target token (nats) and the argmax accuracy of ``y`` under ``model``."""
    logits = target_logits(arch, model, x, y)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()), (logits.argmax(-1) == y).float().mean()


def train(arch: str, task: str, steps: int, seed: int, valid: tuple[Tensor, Tensor]) -> tuple[float, float, int]:
    """A fresh ``arch`` trained ``steps`` AdamW steps on ``task`` -> (held-out NLL, accuracy, parameters)."""
    model = build(arch, seed).train()
    data, gen = TaskData(task), torch.Generator().manual_seed(seed + 1)
    optimizer = build_optimizer(model, lr=LR)
    scheduler = build_scheduler(optimizer, WarmupCosine(steps // 10, steps))
    with progress_bar(steps, f"training {arch} on {task}") as bar:
        for _ in range(steps):
            x, y = data.batch(BATCH, gen)
            optimize(model, nll(arch, model, x, y)[0], optimizer, scheduler, clip=1.0)
            bar.update()
    model.eval()
    with torch.no_grad():
        loss, acc = nll(arch, model, *valid)
    return loss.item(), acc.item(), sum(p.numel() for p in model.parameters())


def judge(scores: dict[tuple[str, str], float]) -> dict[str, bool]:
    """``scores[arch, task]``: held-out NLL -> per task, whether the card's choice is within ``MARGIN`` of the best."""
    return {t: scores[CARD[t], t] <= min(scores[a, t] for a in ARCHS) + MARGIN for t in TASKS}


@register_lab(
    "three-architectures",
    claim="Encoder-only (BERT) is the optimal choice for classification, decoder-only (GPT) for generation, "
    "encoder-decoder (T5) for translation",
    source="lesson 4 card 4 (architecture variant selection)",
    tags=("architecture", "training"),
    minutes=3.2,  # CPU time of the full run (one thread): 191 s; 7 min of wall time on the shared, loaded machine
)
def run(quick: bool, seed: int) -> LabResult:
    steps = 5 if quick else FULL_STEPS
    valid = {t: TaskData(t).batch(128 if quick else 512, torch.Generator().manual_seed(10_000 + seed)) for t in TASKS}
    scores, accs, params = {}, {}, {}
    with one_thread():
        for task in TASKS:
            for arch in ARCHS:
                scores[arch, task], accs[arch, task], params[arch] = train(arch, task, steps, seed, valid[task])
    fits = judge(scores)
    rows = [[arch, params[arch], *[scores[arch, t] for t in TASKS], *[accs[arch, t] for t in TASKS]] for arch in ARCHS]
    best = {t: min(scores[a, t] for a in ARCHS) for t in TASKS}
    short = {t: v for t, v in best.items() if v > UNIFORM[t] - LEARNED}
    undecided = ""
    if quick:
        undecided = f"the quick run trains {steps} steps only (the full run: {FULL_STEPS})"
    elif short:
        figures = ", ".join(f"{t} {v:.2f} (uniform {UNIFORM[t]:.2f})" for t, v in short.items())
        undecided = f"the models learned too little to judge: best held-out NLL {figures}, less than {LEARNED} below"
    finding = "; ".join(
        f"{t}: best {min(ARCHS, key=lambda a, t=t: scores[a, t])} "
        f"({', '.join(f'{a} {scores[a, t]:.3f}' for a in ARCHS)} nats/token), the card's {CARD[t]} "
        f"{'fits' if fits[t] else 'misses by ' + format(scores[CARD[t], t] - best[t], '.3f')}"
        for t in TASKS
    )

    def plot(fig) -> None:
        ax = fig.subplots(1, 1)
        width = 0.26
        for i, arch in enumerate(ARCHS):
            ax.bar([j + (i - 1) * width for j in range(len(TASKS))], [scores[arch, t] for t in TASKS], width,
                   label=f"{arch} ({params[arch]:,} params)")  # fmt: skip
        for j, t in enumerate(TASKS):
            ax.plot([j - 1.5 * width, j + 1.5 * width], [UNIFORM[t]] * 2, "k:", lw=1)
            ax.annotate("card", (j + (ARCHS.index(CARD[t]) - 1) * width, scores[CARD[t], t]), ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
        ax.set(xticks=range(len(TASKS)), xticklabels=list(TASKS), ylabel="held-out NLL per target token (nats)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    return LabResult(
        columns=["architecture", "parameters", *[f"{t} NLL" for t in TASKS], *[f"{t} acc" for t in TASKS]],
        rows=rows,
        criterion=f"for each task, the card's architecture has the lowest held-out NLL per target token of the three, "
        f"or is within {MARGIN} nats of the lowest (same steps, batches and seed)",
        supported=all(fits.values()),
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"d = {D_MODEL}, {HEADS} heads, 4 blocks each (enc-dec: 2 + 2, its decoder blocks carry "
        "cross-attention); "
        f"{steps} AdamW steps of {BATCH} fresh examples, lr {LR} (10% warmup, cosine), seed {seed}; "
        f"{len(next(iter(valid.values()))[0])} held-out examples per task; {SYMBOLS} symbols. The generation task's "
        "floor is the chain's entropy, 0.90 nats per token; the encoder predicts all 8 continuation tokens at once "
        "and cannot condition on its own earlier guesses. Tiny synthetic tasks: the card's reasons of cost "
        "(no generation overhead for classification) are not measured here, only fit",
    )
