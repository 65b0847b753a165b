"""What several labs share: short, seeded training loops (a GPT on LM windows; any model on one of
:mod:`archlab.train.tasks`' objectives), greedy decoding of a seq2seq model's validation pairs, the test that
the models learned enough for a lab to decide, the allocator's peak over a step, and the byte corpus of the
language-model labs cut into training bytes and held-out windows (no lab is registered here)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from archlab.data import ByteTokenizer, LMWindows, encode_texts, python_source, unigram_loss
from archlab.data.loaders import BatchSource
from archlab.errors import DataError
from archlab.generation import generate
from archlab.labs.registry import progress_bar
from archlab.models.gpt import GPT, GPTConfig
from archlab.train import build_optimizer, build_scheduler
from archlab.train.losses import IGNORE_INDEX
from archlab.train.schedules import WarmupCosine
from archlab.train.tasks import get_task, task_loss


@dataclass(frozen=True)
class ByteLMData:
    """The language-model labs' data (:func:`byte_lm_data`): Python standard-library source as bytes.

    Attributes:
        tokenizer: the :class:`~archlab.data.ByteTokenizer` (V = 256 + specials).
        train_ids: ``[n_train]`` the training texts' bytes, for :class:`~archlab.data.LMWindows`.
        held_out: ``[n_valid]`` int64, the held-out texts' bytes.
        inputs, labels: ``[W, N]`` the first ``W N`` held-out bytes as windows and the byte after each.
        unigram: the unigram baseline on ``labels`` (nats per byte, :func:`~archlab.data.unigram_loss`).
    """

    tokenizer: ByteTokenizer
    train_ids: np.ndarray
    held_out: Tensor
    inputs: Tensor
    labels: Tensor
    unigram: float


def byte_lm_data(max_bytes: int, seq_len: int, windows: int, *, unigram_bytes: int | None = None) -> ByteLMData:
    """The first ``max_bytes`` of :func:`~archlab.data.python_source`, its training texts as bytes and its held-out
    texts cut into ``windows`` windows of ``seq_len`` (inputs and next-byte labels, ``[windows, seq_len]``); the
    unigram baseline counts the training bytes (only the first ``unigram_bytes`` with it: a lab training on a
    prefix). DataError when the held-out text is shorter than the windows."""
    tokenizer = ByteTokenizer()
    corpus = python_source(max_bytes=max_bytes)
    train_ids = encode_texts(corpus.train_texts, tokenizer)
    held_out = torch.from_numpy(encode_texts(corpus.valid_texts, tokenizer).astype("int64"))
    total = windows * seq_len
    if held_out.numel() < total + 1:
        raise DataError(f"{windows} held-out windows of {seq_len} bytes need {total + 1:,} held-out bytes; "
                        f"max_bytes={max_bytes:,} gives {held_out.numel():,}")  # fmt: skip
    inputs, labels = held_out[:total].view(windows, seq_len), held_out[1 : total + 1].view(windows, seq_len)
    counted = train_ids if unigram_bytes is None else train_ids[:unigram_bytes]
    unigram = unigram_loss(counted, labels.flatten().numpy(), tokenizer.vocab_size)
    return ByteLMData(tokenizer, train_ids, held_out, inputs, labels, unigram)


def train_gpt(
    config: GPTConfig,
    batches: LMWindows,
    steps: int,
    *,
    lr: float,
    seed: int,
    clip: float = 1.0,
    evaluate_at: Collection[int] = (),
    evaluate: Callable[[GPT], float] | None = None,
    label: str = "GPT",
) -> tuple[GPT, dict[int, float]]:
    """A fresh GPT of ``config`` trained ``steps`` AdamW steps on ``batches`` (10% warmup, then cosine decay;
    gradients clipped to ``clip``); returns it and ``{step: evaluate(model)}`` after each step (1-based) in
    ``evaluate_at``; ``label`` names it on the progress bar (:func:`~archlab.labs.registry.progress_bar`). A bare
    loop rather than :class:`archlab.train.Trainer`, whose ``fit`` also reseeds
    Python's and NumPy's generators and writes a run folder."""
    torch.manual_seed(seed)
    model = GPT(config).train()
    optimizer = build_optimizer(model, lr=lr)
    scheduler = build_scheduler(optimizer, WarmupCosine(steps // 10, steps))
    scores = {}
    with progress_bar(steps, f"training {label}") as bar:
        for step in range(1, steps + 1):
            batch = batches.batch(step - 1)
            optimize(model, model.loss(batch["input_ids"], batch["labels"]), optimizer, scheduler, clip)
            bar.update()
            if evaluate is not None and step in evaluate_at:
                scores[step] = evaluate(model)
    return model, scores


def optimize(model: nn.Module, loss: torch.Tensor, optimizer, scheduler, clip: float) -> None:
    """One optimizer step of the labs' bare loops: backward, gradients clipped to ``clip``, step, schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()


def train_task(
    model: nn.Module,
    task: str,
    batches: BatchSource,
    steps: int,
    *,
    lr: float,
    clip: float = 1.0,
    label_smoothing: float = 0.0,
    label: str = "model",
) -> nn.Module:
    """``model`` trained in place for ``steps`` AdamW steps on ``batches`` with the objective of ``task``
    (``seq2seq``, ``classification``, ``lm``: :data:`archlab.train.tasks.TASK_OBJECTIVES`, label-smoothed by
    ``label_smoothing``), 10% warmup then cosine decay, gradients clipped to ``clip``; returned in train mode.
    Seed the model's initialisation before building it; the batches are seeded by their source."""
    objective = get_task(task)
    model.train()
    optimizer = build_optimizer(model, lr=lr)
    scheduler = build_scheduler(optimizer, WarmupCosine(steps // 10, steps))
    with progress_bar(steps, f"training {label}") as bar:
        for step in range(steps):
            batch = batches.batch(step)
            terms, _ = objective.run(model, batch, label_smoothing)
            optimize(model, task_loss(terms, objective.counts(batch)), optimizer, scheduler, clip)
            bar.update()
    return model


@torch.no_grad()
def greedy_pairs(model: nn.Module, batches: BatchSource) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy-decode every validation pair of a :class:`~archlab.data.loaders.Seq2SeqBatches`:
    ``[(source ids, reference ids, output ids)]``, in order, without padding, BOS or EOS. ``model`` follows the
    encoder-decoder protocol (``encode``, ``decoder_step``, ``new_cache``: RNNenc, RNNsearch, the Transformer);
    it decodes at most ``len(reference) + 1`` tokens per batch row, so an over-long output is cut there."""
    was_training = model.training
    model.eval()
    eos = batches.eos_id
    out = []
    try:
        for batch in batches.eval_batches():
            src, mask, tgt_out = batch["src_ids"], batch["src_mask"], batch["tgt_out"]
            memory = model.encode(src, mask)
            ids = generate(model.decoder_step(memory, mask), batch["tgt_in"][:, :1], max_new_tokens=tgt_out.shape[1],
                           cache=model.new_cache(), stop_tokens=[eos], pad_id=eos)[:, 1:]  # fmt: skip
            for s, m, t, o in zip(src.tolist(), mask.tolist(), tgt_out.tolist(), ids.tolist()):
                source = [x for x, keep in zip(s, m) if keep]
                reference = [x for x in t if x not in (IGNORE_INDEX, eos)]
                out.append((source, reference, o[: o.index(eos)] if eos in o else o))
    finally:
        model.train(was_training)
    return out


def peak_bytes(step) -> int:
    """The peak of bytes held by torch's CPU allocator while ``step()`` runs, above what it held at the start:
    the running sum of the allocations and frees (``torch.profiler`` with ``profile_memory``) in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


#: A language-model lab decides only once its models learned: each held-out loss at least this many nats per
#: token below the unigram baseline. Below that the models differ by noise around the baseline and the lab's
#: criterion compares noise (its quick run's 40-odd steps stay there).
LEARNED_MARGIN = 0.5


def learned_too_little(losses: dict[str, float], unigram: float, margin: float = LEARNED_MARGIN) -> str:
    """``""`` when every held-out loss in ``losses`` (model -> nats per token) is at least ``margin`` below
    ``unigram``; otherwise why a verdict would mean nothing, with the models short of it (see ``LabResult.undecided``)."""
    short = {name: loss for name, loss in losses.items() if loss > unigram - margin}
    if not short:
        return ""
    figures = ", ".join(f"{name} {loss:.2f}" for name, loss in short.items())
    return (f"the models learned too little to judge: held-out loss of {figures} nats, less than {margin} below the "
            f"unigram baseline {unigram:.2f} (train longer: the full run)")  # fmt: skip
