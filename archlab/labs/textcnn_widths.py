r"""TextCNN's multi-width design: parallel kernels of several widths against one width, at equal parameters.

The deck describes TextCNN (Kim 2014, :mod:`archlab.models.textcnn`) as applying multiple parallel kernel widths
at once (a width-2 kernel beside a width-4 one) "to capture diverse n-gram features" before the classifier.
The lab tests whether the several widths earn their place: Kim's widths 3, 4 and 5 with ``c`` filters each
against a model with a single width (3, 4 or 5) and ``c'`` filters, ``c'`` chosen so that the convolutions and
classifier hold (nearly) the same number of parameters; the embedding table is the same in all. Every model is
Kim's CNN-rand (one fine-tuned channel from random vectors, max-over-time pooling, dropout 0.5), trained for the
same steps on the same batches from several seeds, on a real text task: which of six standard-library packages
(asyncio, email, http, logging, unittest, xml) a docstring comes from (the built-in search corpus, the split of
the ``lora-finetune`` lab), tokenised into lowercase words.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from archlab.data.loaders import ClassificationBatches
from archlab.errors import DataError
from archlab.labs.common import train_task
from archlab.labs.lora_finetune import PACKAGES, accuracy, docstring_task
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.models.textcnn import TextCNN, TextCNNConfig

PAD, UNK = 0, 1
MIN_COUNT = 2  # a word seen fewer times in the training texts is <unk>
MAX_WORDS = 64
D_EMBED, FILTERS = 32, 32  # the multi-width model: FILTERS per width
MULTI = (3, 4, 5)  # Kim's widths
LR = 3e-3
MARGIN = 0.0  # the multi-width model's mean accuracy must exceed every single width's by more than this (points)
LEARNED = 0.5  # the best model's mean held-out accuracy (chance 1/6) for the comparison to mean anything


def words(text: str) -> list[str]:
    """Lowercase word tokens: runs of letters, digits and underscores."""
    return re.findall(r"\w+", text.lower())


def build_vocabulary(texts: list[str], min_count: int = MIN_COUNT) -> dict[str, int]:
    """``{word: id}`` for the words seen at least ``min_count`` times, ids from 2 (0 is padding, 1 is <unk>), most
    frequent first (ties alphabetical)."""
    counts = Counter(w for t in texts for w in words(t))
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {w: i + 2 for i, w in enumerate(kept)}


def encode(texts: list[str], vocabulary: dict[str, int], max_words: int = MAX_WORDS) -> list[list[int]]:
    """Each text's first ``max_words`` word ids (unknown words -> <unk>)."""
    return [[vocabulary.get(w, UNK) for w in words(t)[:max_words]] for t in texts]


def matching_filters(target: int, width: int, n_classes: int) -> int:
    """The filter count ``c'`` of a single ``width``-wide kernel whose convolution and classifier parameters
    (``c' (d h + 1)`` and ``(c' + 1) C``) are nearest ``target``."""
    per_filter = D_EMBED * width + 1 + n_classes
    return max(1, round((target - n_classes) / per_filter))


def head_parameters(model: TextCNN) -> int:
    """The parameters outside the embedding table: convolutions and classifier."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embeddings."))


def judge(accuracies: dict[str, list[float]]) -> tuple[bool, float, str]:
    """``accuracies[model]``: held-out accuracy per seed, the multi-width model first -> (supported, the multi-width
    mean minus the best single width's mean in points, why undecided or "")."""
    means = {m: sum(a) / len(a) for m, a in accuracies.items()}
    multi, *singles = means
    lead = 100 * (means[multi] - max(means[s] for s in singles))
    best = max(means.values())
    undecided = (f"no model learned the task: best mean held-out accuracy {best:.2f}, below {LEARNED} (chance "
                 f"{1 / len(PACKAGES):.2f}; train longer: the full run)") if best < LEARNED else ""  # fmt: skip
    return lead > MARGIN, lead, undecided


@register_lab(
    "textcnn-widths",
    claim="TextCNN applies multiple parallel kernel widths simultaneously (e.g. width 2 beside width 4) to capture "
    "diverse n-gram features before the classification layers",
    source="deck: the multi-channel architectural design of TextCNN (Kim, 2014)",
    tags=("training", "convolution"),
    minutes=2.5,  # CPU time of the full run (one thread, 146 s); 44 min of wall time on the shared machine it ran on
)
def run(quick: bool, seed: int) -> LabResult:
    steps, seeds = (15, [seed]) if quick else (400, [seed + k for k in range(5)])
    texts, labels, held_texts, held_labels = docstring_task()
    vocabulary = build_vocabulary(texts)
    train_ids, held_ids = encode(texts, vocabulary), encode(held_texts, vocabulary)
    widest = max(MULTI)
    keep = [i for i, ids in enumerate(train_ids) if len(ids) >= widest]
    keep_held = [i for i, ids in enumerate(held_ids) if len(ids) >= widest]
    if not keep or not keep_held:
        raise DataError(f"no docstring has {widest} words: the corpus is not the built-in one")
    n_classes = len(PACKAGES)
    base = dict(vocab_size=len(vocabulary) + 2, n_classes=n_classes, d_embed=D_EMBED, channels=("non-static",),
                dropout=0.5)  # fmt: skip
    multi = TextCNNConfig(**base, kernels=tuple((w, FILTERS) for w in MULTI))
    target = head_parameters(TextCNN(multi))
    configs = {f"widths {', '.join(map(str, MULTI))} x {FILTERS}": multi}
    for w in MULTI:
        c = matching_filters(target, w, n_classes)
        configs[f"width {w} x {c}"] = TextCNNConfig(**base, kernels=((w, c),))

    accuracies: dict[str, list[float]] = {name: [] for name in configs}
    params = {}
    with one_thread():
        for s in seeds:
            batches = ClassificationBatches([train_ids[i] for i in keep], [labels[i] for i in keep], batch_size=32,
                                            seed=s, pad_id=PAD,
                                            valid=([held_ids[i] for i in keep_held], [held_labels[i] for i in keep_held]))  # fmt: skip
            for name, config in configs.items():
                torch.manual_seed(s)
                model = TextCNN(config)
                params[name] = head_parameters(model)
                train_task(model, "classification", batches, steps, lr=LR, label=f"{name} (seed {s})")
                accuracies[name].append(accuracy(model, batches))

    supported, lead, undecided = judge(accuracies)
    means = {m: sum(a) / len(a) for m, a in accuracies.items()}
    rows = [[name, params[name], means[name], min(a), max(a)] for name, a in accuracies.items()]
    multi_name = next(iter(configs))
    finding = (
        f"mean held-out accuracy over {len(seeds)} seed(s): {multi_name} {means[multi_name]:.3f}; single widths "
        + ", ".join(f"{n} {means[n]:.3f}" for n in list(configs)[1:])
        + f": the multi-width model leads the best single width by {lead:+.1f} points"
    )

    def plot(fig) -> None:
        ax = fig.subplots(1, 1)
        names = list(configs)
        for i, name in enumerate(names):
            ax.plot([i] * len(seeds), accuracies[name], "o", color="gray", alpha=0.6, ms=4)
        ax.bar(range(len(names)), [means[n] for n in names], alpha=0.6,
               color=["tab:orange"] + ["tab:blue"] * (len(names) - 1))  # fmt: skip
        ax.set(xticks=range(len(names)), xticklabels=[f"{n}\n({params[n]:,} params)" for n in names],
               ylabel="held-out accuracy (6 packages)", title=f"TextCNN, {steps} steps, dots: seeds, bars: mean")  # fmt: skip
        low = min(min(a) for a in accuracies.values())
        ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(max(a) for a in accuracies.values()) + 0.05))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")

    return LabResult(
        columns=["kernels", "conv + classifier parameters", "mean held-out accuracy", "min", "max"],
        rows=rows,
        criterion=f"at (nearly) equal convolution + classifier parameters and the same embeddings, steps and batches: "
        f"the multi-width model's mean held-out accuracy over {len(seeds)} seed(s) is higher than that of every "
        f"single-width model (by more than {MARGIN:g} points)",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"docstrings of {', '.join(PACKAGES)} ({len(keep)} training, {len(keep_held)} held out, texts of at least "
        f"{widest} words; first {MAX_WORDS} words), a vocabulary of {len(vocabulary):,} words seen >= {MIN_COUNT} "
        f"times; CNN-rand: one non-static {D_EMBED}-d channel from random vectors, max-over-time pooling over real "
        f"tokens only, dropout 0.5, {steps} AdamW steps of 32, lr {LR} (10% warmup, cosine), clip 1. Kim's CNN-rand "
        "used 300-d embeddings and 100 filters per width on sentences of thousands of examples; a held-out example "
        f"here is {100 / len(keep_held):.2f} points",
    )
