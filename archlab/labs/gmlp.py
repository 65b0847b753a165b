r"""gMLP rivals attention: an MLP whose only token mixing is a spatial gate against a Transformer, same budget.

gMLP (:mod:`archlab.models.gmlp`, Liu et al. 2021) mixes tokens with a learned ``[N, N]`` matrix inside a
multiplicative gate, ``s(Z) = Z1 * (W LN(Z2) + b)``, and has no attention at all. The notes' claim is that with
this gating pure MLPs can rival attention on many tasks. The lab puts it against a Transformer of the same
width and depth, with the gMLP's channel width ``d_ffn`` chosen so that both have (nearly) the same number of
parameters, trained for the same steps on the same batches with the same optimiser and schedule, on two tasks:

* language modelling (causal): byte-level Python standard-library source, gMLP (causal gate) against GPT;
  scored by the held-out loss in nats per byte;
* classification (bidirectional): two strings of letters joined by ``|``; label 1 when the second is a copy of
  the first, 0 when one letter differs. Deciding needs every position compared with its partner ``K + 1``
  tokens away (token mixing); scored by held-out accuracy. gMLP classifier (mean pooling) against BERT
  (``[CLS]`` pooling), both from scratch.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from archlab.data import LMWindows
from archlab.data.loaders import ClassificationBatches
from archlab.errors import ConfigError
from archlab.labs.common import byte_lm_data, learned_too_little, train_task
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.labs.scaling import gpt_config
from archlab.models.bert import BertConfig, BertForSequenceClassification
from archlab.models.gmlp import GMLP, GMLPClassifier, GMLPClassifierConfig, GMLPConfig
from archlab.models.gpt import GPT

CORPUS_BYTES = 1_000_000
D_MODEL, LAYERS = 64, 2
LR = 3e-3
LOSS_MARGIN = 0.05  # "rivals" in language modelling: gMLP's held-out loss at most 5% above the Transformer's
ACCURACY_POINTS = 3.0  # "rivals" in classification: gMLP's held-out accuracy at most 3 points below
LEARNED_ACCURACY = 0.75  # the better classifier must reach this (chance 0.5) for the comparison to mean anything
LETTERS = 8  # the classification strings' alphabet: ids 0..7; 8 is "|", 9 is [CLS], 10 is padding (never used)
SEP, CLS, PAD = LETTERS, LETTERS + 1, LETTERS + 2
MODELS = ("Transformer", "gMLP")


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matching_ffn(target: int, build) -> int:
    """The even ``d_ffn >= 2`` whose model ``build(d_ffn)`` has the parameter count nearest ``target``. A gMLP's
    count is affine in ``d_ffn`` (``U``, ``V``, the gate's LayerNorm), so two models built on the meta device
    (no memory) give the line."""
    with torch.device("meta"):
        at2, at4 = parameters(build(2)), parameters(build(4))
    slope = (at4 - at2) / 2
    guess = 2 + (target - at2) / slope
    candidates = {max(2, 2 * int(guess // 2)), max(2, 2 * int(guess // 2) + 2)}
    return min(sorted(candidates), key=lambda f: abs(at2 + slope * (f - 2) - target))


def copy_or_edit(n: int, length: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples ``[CLS] x | y`` (``[n, 2 length + 2]`` ids) with ``x`` ``length`` random letters and ``y = x``
    (label 1) or ``x`` with one letter replaced by another (label 0), half each, from ``random.Random(seed)``."""
    if length < 1 or n < 1:
        raise ConfigError(f"copy_or_edit needs n >= 1 and length >= 1, got n={n}, length={length}")
    rng = random.Random(f"copy-or-edit:{seed}")
    rows, labels = [], []
    for i in range(n):
        x = [rng.randrange(LETTERS) for _ in range(length)]
        y = list(x)
        same = i % 2
        if not same:
            at = rng.randrange(length)
            y[at] = (y[at] + rng.randrange(1, LETTERS)) % LETTERS
        rows.append([CLS, *x, SEP, *y])
        labels.append(same)
    return torch.tensor(rows), torch.tensor(labels)


@torch.no_grad()
def lm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model(inputs) -> logits [B, T, V]`` on ``labels [B, T]``,
    in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).item()
    finally:
        model.train(was_training)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        return (model(inputs).argmax(-1) == labels).float().mean().item()
    finally:
        model.train(was_training)


def judge(loss: dict[str, float], acc: dict[str, float]) -> tuple[bool, float, float]:
    """``(supported, gMLP's loss relative to the Transformer's - 1, accuracy gap in points)`` under the criterion."""
    excess = loss["gMLP"] / loss["Transformer"] - 1
    gap = 100 * (acc["Transformer"] - acc["gMLP"])
    return excess <= LOSS_MARGIN and gap <= ACCURACY_POINTS, excess, gap


@register_lab(
    "gmlp-vs-attention",
    claim="gMLP / gated MLPs prove that with clever gating, pure MLPs (no attention) can rival attention on many "
    "tasks",
    source="notes 4 (gMLP / gated MLPs; Liu et al. 2021, Pay Attention to MLPs)",
    tags=("training", "attention"),
    minutes=1.2,  # CPU time of the full run (one thread, 72 s); 11 min of wall time on the shared machine it ran on
)
def run(quick: bool, seed: int) -> LabResult:
    seq_len, lm_steps, windows = (32, 30, 16) if quick else (64, 400, 128)
    length, n_train, cls_steps = (5, 512, 30) if quick else (5, 8192, 600)
    data = byte_lm_data(CORPUS_BYTES, seq_len, windows)
    tokenizer, train_ids, lm_inputs, lm_labels, unigram = (data.tokenizer, data.train_ids, data.inputs, data.labels,
                                                           data.unigram)  # fmt: skip
    total = windows * seq_len
    lm_batches = LMWindows(train_ids, seq_len=seq_len, batch_size=16, seed=seed)

    gpt = gpt_config(D_MODEL, LAYERS, seq_len)
    lm_ffn = matching_ffn(parameters(GPT(gpt)), lambda f: GMLP(GMLPConfig(
        vocab_size=tokenizer.vocab_size, max_len=seq_len, d_model=D_MODEL, d_ffn=f, n_layers=LAYERS)))  # fmt: skip
    x_train, y_train = copy_or_edit(n_train, length, seed=seed)
    x_valid, y_valid = copy_or_edit(1000, length, seed=seed + 10_000)
    cls_batches = ClassificationBatches(x_train, y_train, batch_size=32, seed=seed)
    n = 2 * length + 2
    bert = BertConfig(vocab_size=PAD + 1, max_len=n, d_model=D_MODEL, n_heads=D_MODEL // 16, n_layers=LAYERS,
                      d_ff=4 * D_MODEL, dropout=0.0, attn_dropout=0.0, pad_id=PAD)  # fmt: skip
    cls_ffn = matching_ffn(parameters(BertForSequenceClassification(bert)), lambda f: GMLPClassifier(
        GMLPClassifierConfig(vocab_size=PAD + 1, max_len=n, d_model=D_MODEL, d_ffn=f, n_layers=LAYERS)))  # fmt: skip

    def lm_model(name: str) -> nn.Module:
        torch.manual_seed(seed)
        if name == "Transformer":
            return GPT(gpt)
        return GMLP(GMLPConfig(vocab_size=tokenizer.vocab_size, max_len=seq_len, d_model=D_MODEL, d_ffn=lm_ffn,
                               n_layers=LAYERS))  # fmt: skip

    def classifier(name: str) -> nn.Module:
        torch.manual_seed(seed)
        if name == "Transformer":
            return BertForSequenceClassification(bert)
        return GMLPClassifier(GMLPClassifierConfig(vocab_size=PAD + 1, max_len=n, d_model=D_MODEL, d_ffn=cls_ffn,
                                                   n_layers=LAYERS))  # fmt: skip

    loss, acc, lm_params, cls_params = {}, {}, {}, {}
    with one_thread():
        for name in MODELS:
            model = lm_model(name)
            lm_params[name] = parameters(model)
            train_task(model, "lm", lm_batches, lm_steps, lr=LR, label=f"{name} LM")
            loss[name] = lm_loss(model, lm_inputs, lm_labels)
            model = classifier(name)
            cls_params[name] = parameters(model)
            train_task(model, "classification", cls_batches, cls_steps, lr=LR, label=f"{name} classifier")
            acc[name] = accuracy(model, x_valid, y_valid)

    supported, excess, gap = judge(loss, acc)
    undecided = learned_too_little({f"{m} LM": loss[m] for m in MODELS}, unigram)
    if not undecided and max(acc.values()) < LEARNED_ACCURACY:
        undecided = (f"neither classifier learned the task: best held-out accuracy {max(acc.values()):.2f}, below "
                     f"{LEARNED_ACCURACY} (chance 0.5; train longer: the full run)")  # fmt: skip
    rows = [[m, lm_params[m], loss[m], cls_params[m], acc[m]] for m in MODELS]
    finding = (
        f"same steps and batches, parameters within {abs(lm_params['gMLP'] / lm_params['Transformer'] - 1):.1%} (LM) "
        f"and {abs(cls_params['gMLP'] / cls_params['Transformer'] - 1):.1%} (classifier): held-out LM loss gMLP "
        f"{loss['gMLP']:.3f} vs Transformer {loss['Transformer']:.3f} nats/byte ({excess:+.1%}); copy-or-edit "
        f"accuracy gMLP {acc['gMLP']:.3f} vs Transformer {acc['Transformer']:.3f} ({-gap:+.1f} points)"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        colours = ("tab:blue", "tab:orange")
        ax1.bar(MODELS, [loss[m] for m in MODELS], color=colours)
        ax1.axhline(unigram, color="gray", ls="-.", lw=0.8, label=f"unigram baseline {unigram:.2f}")
        ax1.axhline(loss["Transformer"] * (1 + LOSS_MARGIN), color="k", ls=":", lw=1,
                    label=f"Transformer + {LOSS_MARGIN:.0%} (criterion)")  # fmt: skip
        ax1.set(ylabel="held-out loss (nats / byte)", title=f"language modelling ({lm_steps} steps)")
        ax2.bar(MODELS, [acc[m] for m in MODELS], color=colours)
        ax2.axhline(0.5, color="gray", ls="-.", lw=0.8, label="chance")
        ax2.axhline(acc["Transformer"] - ACCURACY_POINTS / 100, color="k", ls=":", lw=1,
                    label=f"Transformer - {ACCURACY_POINTS:g} points (criterion)")  # fmt: skip
        ax2.set(ylabel="held-out accuracy", ylim=(0, 1.05), title=f"copy or one letter edited ({cls_steps} steps)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7, loc="lower right")

    return LabResult(
        columns=["model", "LM parameters", "held-out LM loss", "classifier parameters", "held-out accuracy"],
        rows=rows,
        criterion=f"at (nearly) equal parameters and the same steps, batches and optimiser: gMLP's held-out LM loss "
        f"is at most {LOSS_MARGIN:.0%} above the Transformer's AND its held-out classification accuracy at most "
        f"{ACCURACY_POINTS:g} points below",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"d={D_MODEL}, {LAYERS} blocks each; GPT: pre-norm, A={D_MODEL // 16}, d_ff={4 * D_MODEL}, learned "
        f"positions, head tied to the token table; gMLP LM: d_ffn={lm_ffn} (chosen to match the parameters; its "
        f"head is untied), causal spatial gate over {seq_len} positions. LM: {lm_steps} AdamW steps of 16 x "
        f"{seq_len} bytes, {total:,} held-out bytes (unigram {unigram:.2f}). Classification: strings of {length} "
        f"letters of {LETTERS}, {n_train:,} training examples (half copies), 1,000 held out, {cls_steps} steps of 32; "
        f"BERT (post-norm, A={D_MODEL // 16}, d_ff={4 * D_MODEL}) against a gMLP classifier with d_ffn={cls_ffn}. "
        f"Both lr {LR}, 10% warmup then cosine, clip 1, one seed, no tuning per model. Liu et al. compare at 10^7-10^8 "
        "parameters on ImageNet, C4 and GLUE (where gMLP lagged on tasks needing cross-sentence alignment until a "
        "tiny attention head was added); this is two small tasks at 10^5 parameters",
    )
