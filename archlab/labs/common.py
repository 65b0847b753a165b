"""What several labs share: short, seeded training loops (a GPT on LM windows; any model on one of
:mod:`archlab.train.tasks`' objectives), greedy decoding of a seq2seq model's validation pairs, the test that
the models learned enough for a lab to decide, the allocator's peak over a step, the byte corpus of the
language-model labs cut into training bytes and held-out windows, and a speed ratio timed in alternating rounds
(no lab is registered here)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from archlab.data import ByteTokenizer, LMWindows, encode_texts, python_source, unigram_loss
from archlab.data.loaders import BatchSource
from archlab.errors import ConfigError, DataError
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


def value_range(values, spec: str = "") -> str:
    """``"lo to hi"`` of ``values`` formatted with ``spec``, or the one value when they all format alike (a quick
    run over one word or size has no range to state)."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo} to {hi}"


def peak_bytes(step) -> int:
    """The peak of bytes held by torch's CPU allocator while ``step()`` runs, above what it held at the start:
    the running sum of the allocations and frees (``torch.profiler`` with ``profile_memory``) in time order."""
    return memory_profile(step)["peak"]


def memory_profile(step, mark: str | None = None) -> dict[str, int]:
    """:func:`peak_bytes`'s measurement of ``step()``, split at the first ``torch.profiler.record_function(mark)``
    range it opens (None: no split): ``{"peak": the whole step's, "before": the peak before the mark, "at": bytes
    held when the mark opens}`` (bytes above what the allocator held at the start; ``before = at = peak`` when no
    mark opens)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    starts = [e.start_ns() for e in events if mark is not None and e.name() == mark]
    split = min(starts, default=None)
    held = peak = before = 0
    at = None
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if split is not None and at is None and event.start_ns() >= split:
            at, before = held, peak
        held += event.nbytes()
        peak = max(peak, held)
    if at is None:
        at, before = held, peak
    return {"peak": peak, "before": before, "at": at}


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


@dataclass(frozen=True)
class Speedup:
    """A lever's speed over its baseline, one figure per round of :func:`alternating_speedup`.

    ``base_rates[r]``, ``fast_rates[r]``: work per second (tokens/s) of the baseline and the lever in round ``r``;
    ``ratios[r] = fast_rates[r] / base_rates[r]``. The two calls of a round ran back to back, so a load that
    comes and goes between rounds slows both alike and cancels in that round's ratio: the median ratio is the
    figure to judge, the lowest and highest its spread."""

    base_rates: tuple[float, ...]
    fast_rates: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(f / b for b, f in zip(self.base_rates, self.fast_rates, strict=True))

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def low(self) -> float:
        return min(self.ratios)

    @property
    def high(self) -> float:
        return max(self.ratios)

    def straddles(self, factor: float) -> bool:
        """Whether the rounds fall on both sides of ``factor`` (some reach it, some do not)."""
        return self.low < factor <= self.high


def alternating_speedup(
    base: Callable[[], object],
    fast: Callable[[], object],
    rounds: int,
    base_work: float = 1.0,
    fast_work: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Speedup:
    """Time ``base()`` and ``fast()`` in ``rounds`` rounds, both once a round, and take each round's speed ratio.

    The order alternates (base first in even rounds, ``fast`` first in odd ones), so neither always runs on the
    caches or the load the other left. ``base_work``, ``fast_work``: the work one call does (tokens), so a
    lever that stops early is credited per token. ``clock``: seconds (a fake one in the tests). The caller warms
    both up first (the lab's reference outputs do)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds={rounds!r} must be an int >= 1 (one base and one lever call a round)")
    for name, work in (("base_work", base_work), ("fast_work", fast_work)):
        if not work > 0:
            raise ConfigError(f"{name}={work!r} must be > 0 (the work one call does, e.g. its new tokens)")

    def rate(fn: Callable[[], object], work: float) -> float:
        start = clock()
        fn()
        return work / (clock() - start)

    base_rates, fast_rates = [], []
    for r in range(rounds):
        if r % 2 == 0:
            base_rates.append(rate(base, base_work))
            fast_rates.append(rate(fast, fast_work))
        else:
            fast_rates.append(rate(fast, fast_work))
            base_rates.append(rate(base, base_work))
    return Speedup(tuple(base_rates), tuple(fast_rates))
