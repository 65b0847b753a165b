r"""One objective per task of ``archlab.models.registry.TASKS``: what the model is fed, what it is scored on.

Each task turns a batch (a dict of tensors, the formats of ``archlab.data``) into *loss terms*, each a
sum over its targets, plus summable statistics::

    counts(batch)        -> {term: number of targets}          known before the forward pass
    run(model, batch, e) -> ({term: sum of losses}, stats)     stats: summable tensors (tokens, correct, ...)

The loss minimised over a step is ``sum_t  S_t / C_t``, with ``S_t`` and ``C_t`` summed over all the
micro-batches and ranks of that step. Normalising by the step's total count (not averaging micro-batch
means) makes ``k`` micro-batches of ``B / k`` give the gradient of one batch of ``B`` even when padding
leaves them different numbers of targets.

=============== ====================================================== ==============================
task            model call                                             terms
=============== ====================================================== ==============================
lm              ``model(input_ids) -> [B, N, V]``; labels = next ids   ``token``: smoothed CE per label
                or the fused loss (below) when training
mlm             ``model(input_ids, attention_mask=, token_type_ids=)`` ``token`` (masked positions) and
                ``-> .mlm_logits [B, N, V], .nsp_logits [B, 2]``       ``nsp`` when ``next_sentence_label``
seq2seq         ``model(src_ids, tgt_in, src_mask=) -> [B, M, V]``     ``token``: smoothed CE on ``tgt_out``
classification  ``model(inputs[, attention_mask=]) -> [B, C]``         ``sample``: smoothed CE per sample
                (the mask when ``forward`` takes one)
custom          ``model.compute_loss(batch) -> (loss, metrics)``       ``batch``: the mean loss it returns
=============== ====================================================== ==============================

Statistics: ``samples``, ``tokens`` (input positions, for tokens/s), ``targets``, ``nll`` (plain
``-log p`` summed, for perplexity), ``correct``; ``nsp_*`` for next-sentence prediction; for ``custom``,
whatever numbers ``compute_loss`` reports, averaged over batches by :func:`summarize` (in float64; not its
``loss``, which is the loss it returns: the trainer reports its own objective under that name).

The ``custom`` call. DDP prepares its gradient hooks, FSDP gathers the shards, only around ``forward``:
calling ``compute_loss`` on the bare model would bypass them. So the trainer runs a module whose
``forward(batch)`` is ``model.compute_loss(batch)`` (``Task.method``, :func:`archlab.train.distributed.wrap`).
``compute_loss`` need not use every parameter (ELMo's scalar mix gets no gradient while its biLM
trains), so DDP looks for unused ones (``Task.find_unused``, as for ``mlm``, whose NSP head is idle on
batches without next-sentence labels).

The fused LM loss. A model whose ``forward`` takes ``labels=`` and ``label_smoothing=`` and then returns
the mean smoothed loss (GPT: the LM head fused with the cross-entropy by chunks, no ``[B, N, V]`` logits
kept, see :func:`archlab.nn.loss.linear_cross_entropy`) is trained through that call: ``token = mean * C``
with ``C`` the kept labels. It is called through the wrapped module, so DDP / FSDP hooks fire. Without
logits there is no ``correct`` count, so such a run's *training* metrics have no accuracy, and with
``eps > 0`` no ``nll`` / ``ppl`` either (with ``eps = 0`` the loss is the NLL). Evaluation runs without
gradients and takes the logits path, so evaluation metrics always have all of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.errors import ConfigError, DataError, ShapeError, unknown
from archlab.train.distributed import MethodAsForward
from archlab.train.losses import IGNORE_INDEX, token_losses
from archlab.train.metrics import perplexity, text_metric

Batch = dict[str, Any]
Terms = dict[str, Tensor]
Stats = dict[str, Tensor]

TOKEN_TASKS = ("lm", "mlm", "seq2seq")  # tasks whose NLL is per token, so perplexity means something
_STAT_KEYS = ("samples", "tokens", "targets", "nll", "correct", "nsp_count", "nsp_nll", "nsp_correct", "batches")


def _require(task: str, batch: Batch, keys: Iterable[str], optional: Iterable[str] = ()) -> None:
    """DataError unless ``batch`` is a dict holding tensors under ``keys`` (and under ``optional`` where not None)."""
    if not isinstance(batch, dict):
        raise DataError(f"a {task} batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise DataError(
            f"a {task} batch needs keys {', '.join(keys)}; missing {', '.join(missing)} (got {', '.join(batch)})"
        )
    used = [*keys, *(k for k in optional if batch.get(k) is not None)]
    loose = {k: type(batch[k]).__name__ for k in used if not isinstance(batch[k], Tensor)}
    if loose:
        raise DataError(f"a {task} batch must hold tensors; " + ", ".join(f"{k} is a {t}" for k, t in loose.items()))


def _token_terms(logits: Tensor, labels: Tensor, eps: float) -> tuple[Tensor, Stats]:
    """Sum of smoothed losses over the kept labels, and the NLL / accuracy statistics."""
    if logits.ndim != labels.ndim + 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ShapeError(f"labels {tuple(labels.shape)} do not match the model's logits {tuple(logits.shape)}")
    loss, nll, keep = token_losses(_full(logits), labels, eps)
    correct = ((logits.argmax(-1) == labels) & keep).sum()
    return loss.sum(), {"targets": keep.sum(), "nll": nll.sum().detach(), "correct": correct}


def _full(logits: Tensor) -> Tensor:
    """Losses in at least float32 (bf16/fp16 logits from autocast are upcast; float64 stays)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _n(x: Tensor | int) -> Tensor:
    return torch.as_tensor(x)


def _optional(batch: Batch, *keys: str) -> dict[str, Tensor]:
    return {k: batch[k] for k in keys if batch.get(k) is not None}


# -- the tasks ----------------------------------------------------------------------------------------


def lm_counts(batch: Batch) -> dict[str, int]:
    _require("lm", batch, ("input_ids", "labels"))
    return {"token": int((batch["labels"] != IGNORE_INDEX).sum())}


def unwrapped(model: nn.Module) -> nn.Module:
    """The module under any DDP / ``torch.compile`` wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def forward_parameters(model: nn.Module) -> set[str]:
    """The argument names of ``forward`` of the model under any DDP / ``torch.compile`` wrapper."""
    return set(inspect.signature(unwrapped(model).forward).parameters)


def has_fused_lm_loss(model: nn.Module) -> bool:
    """Whether the model takes ``forward(..., labels=, label_smoothing=)`` (the fused LM loss, module docstring)."""
    return {"labels", "label_smoothing"} <= forward_parameters(model)


def lm_run(model: nn.Module, batch: Batch, eps: float) -> tuple[Terms, Stats]:
    ids, labels = batch["input_ids"], batch["labels"]
    sizes = {"samples": _n(ids.shape[0]), "tokens": _n(ids.numel())}
    if torch.is_grad_enabled() and has_fused_lm_loss(model):  # training: the fused head + loss
        if tuple(labels.shape) != tuple(ids.shape):
            raise ShapeError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(ids.shape)}")
        targets = (labels != IGNORE_INDEX).sum()
        token = model(ids, labels=labels, label_smoothing=eps) * targets
        stats = {"targets": targets} if eps else {"targets": targets, "nll": token.detach()}
        return {"token": token}, {**sizes, **stats}
    token, stats = _token_terms(model(ids), labels, eps)
    return {"token": token}, {**sizes, **stats}


def mlm_counts(batch: Batch) -> dict[str, int]:
    _require("mlm", batch, ("input_ids", "labels"), ("attention_mask", "token_type_ids", "next_sentence_label"))
    counts = {"token": int((batch["labels"] != IGNORE_INDEX).sum())}
    if batch.get("next_sentence_label") is not None:
        counts["nsp"] = int(batch["next_sentence_label"].numel())
    return counts


def mlm_run(model: nn.Module, batch: Batch, eps: float) -> tuple[Terms, Stats]:
    ids = batch["input_ids"]
    out = model(ids, **_optional(batch, "attention_mask", "token_type_ids"))
    if not hasattr(out, "mlm_logits"):
        raise ConfigError(
            f"task 'mlm' needs a model whose output has .mlm_logits (and .nsp_logits), such as BertForPreTraining; "
            f"{type(model).__name__} returned {type(out).__name__}"
        )
    token, stats = _token_terms(out.mlm_logits, batch["labels"], eps)
    terms = {"token": token}
    stats.update(samples=_n(ids.shape[0]), tokens=_n(ids.numel()))
    if batch.get("next_sentence_label") is not None:  # NSP: plain cross-entropy on the [CLS] head
        nsp_label = batch["next_sentence_label"]
        terms["nsp"] = F.cross_entropy(_full(out.nsp_logits), nsp_label, reduction="sum")
        stats.update(
            nsp_count=_n(nsp_label.numel()), nsp_nll=terms["nsp"].detach(),
            nsp_correct=(out.nsp_logits.argmax(-1) == nsp_label).sum(),
        )  # fmt: skip
    return terms, stats


def seq2seq_counts(batch: Batch) -> dict[str, int]:
    _require("seq2seq", batch, ("src_ids", "tgt_in", "tgt_out"), ("src_mask",))
    return {"token": int((batch["tgt_out"] != IGNORE_INDEX).sum())}


def seq2seq_run(model: nn.Module, batch: Batch, eps: float) -> tuple[Terms, Stats]:
    src, tgt_in = batch["src_ids"], batch["tgt_in"]
    logits = model(src, tgt_in, src_mask=batch.get("src_mask"))
    token, stats = _token_terms(logits, batch["tgt_out"], eps)
    return {"token": token}, {"samples": _n(src.shape[0]), "tokens": _n(src.numel() + tgt_in.numel()), **stats}


def classification_counts(batch: Batch) -> dict[str, int]:
    _require("classification", batch, ("inputs", "labels"), ("attention_mask", "token_type_ids"))
    return {"sample": int((batch["labels"] != IGNORE_INDEX).sum())}


def classification_run(model: nn.Module, batch: Batch, eps: float) -> tuple[Terms, Stats]:
    inputs = batch["inputs"]
    accepted = forward_parameters(model)  # a model without masks (gMLP: fixed length) reads the padding as tokens
    logits = model(inputs, **_optional(batch, *(k for k in ("attention_mask", "token_type_ids") if k in accepted)))
    sample, stats = _token_terms(logits, batch["labels"], eps)
    tokens = inputs.numel() if not inputs.dtype.is_floating_point else 0  # token ids, not pixels or features
    return {"sample": sample}, {"samples": _n(inputs.shape[0]), "tokens": _n(tokens), **stats}


def custom_counts(batch: Batch) -> dict[str, int]:
    return {"batch": 1}


def custom_run(model: nn.Module, batch: Batch, eps: float) -> tuple[Terms, Stats]:
    """``model``: the model (evaluation), or when training the trainer's module, whose ``forward`` calls
    ``model.compute_loss`` (:class:`~archlab.train.distributed.MethodAsForward`, maybe inside DDP)."""
    if isinstance(unwrapped(model), MethodAsForward):
        loss, metrics = model(batch)
    elif callable(getattr(model, "compute_loss", None)):
        loss, metrics = model.compute_loss(batch)
    else:
        raise ConfigError(
            f"task 'custom' needs model.compute_loss(batch) -> (loss, metrics); {type(model).__name__} has none"
        )
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ShapeError(f"compute_loss must return a scalar loss tensor first, got {type(loss).__name__}")
    metrics = {k: v for k, v in dict(metrics).items() if k != "loss"}  # the trainer reports the loss (module docstring)
    stats = {k: torch.as_tensor(v, dtype=torch.float64).detach() for k, v in metrics.items()}
    return {"batch": loss}, {"batches": _n(1), **stats}


@dataclass(frozen=True)
class Task:
    """A training objective: ``counts(batch)`` then ``run(model, batch, label_smoothing)`` (module docstring).

    ``method``: the model's method training calls instead of ``forward`` (``custom``: ``compute_loss``), which
    the trainer's wrapping must route through ``forward`` (:func:`archlab.train.distributed.wrap`).
    ``find_unused``: some parameters may get no gradient in a step, which DDP must be told.
    """

    name: str
    counts: Callable[[Batch], dict[str, int]]
    run: Callable[[nn.Module, Batch, float], tuple[Terms, Stats]]
    method: str | None = None
    find_unused: bool = False


TASK_OBJECTIVES: dict[str, Task] = {
    "lm": Task("lm", lm_counts, lm_run),
    "mlm": Task("mlm", mlm_counts, mlm_run, find_unused=True),
    "seq2seq": Task("seq2seq", seq2seq_counts, seq2seq_run),
    "classification": Task("classification", classification_counts, classification_run),
    "custom": Task("custom", custom_counts, custom_run, method="compute_loss", find_unused=True),
}


def get_task(name: str) -> Task:
    if name not in TASK_OBJECTIVES:
        raise ConfigError(unknown("task", name, TASK_OBJECTIVES))
    return TASK_OBJECTIVES[name]


def task_loss(terms: Terms, totals: dict[str, int | float]) -> Tensor:
    """``sum_t terms[t] / totals[t]``: the micro-batch's share of the step's loss (totals of 0 contribute 0)."""
    return sum(s / max(totals[t], 1) for t, s in terms.items())  # type: ignore[return-value]


def summarize(stats: dict[str, float], task: str) -> dict[str, float]:
    """Summed statistics -> readable metrics: ``nll``, ``ppl`` (token tasks), ``accuracy``, ``nsp_*``, custom means
    (a custom ``X_ppl`` beside an ``X_nll`` becomes ``exp`` of the mean ``X_nll``). A ``loss`` among ``stats``
    (the trainer's objective, summed over the step) is left out: it is no custom statistic to average."""
    out: dict[str, float] = {}
    if stats.get("targets"):  # nll and correct are absent on the fused LM path (module docstring)
        if "nll" in stats:
            out["nll"] = stats["nll"] / stats["targets"]
            if task in TOKEN_TASKS:
                out["ppl"] = perplexity(out["nll"])
        if "correct" in stats:
            out["accuracy"] = stats["correct"] / stats["targets"]
    if stats.get("nsp_count"):
        out["nsp_nll"] = stats["nsp_nll"] / stats["nsp_count"]
        out["nsp_accuracy"] = stats["nsp_correct"] / stats["nsp_count"]
    batches = stats.get("batches") or 1
    out.update({k: v / batches for k, v in stats.items() if k not in _STAT_KEYS and k != "loss"})
    for name in [k for k in out if k.endswith("_ppl") and f"{k[:-4]}_nll" in out]:  # custom: exp(mean nll),
        out[name] = perplexity(out[f"{name[:-4]}_nll"])  # not the mean of the batches' perplexities
    return out


# -- generation metrics for seq2seq: exact match and BLEU or chrF -------------------------------------------


@torch.no_grad()
def seq2seq_generation_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    eos_id: int,
    detokenize: Callable[[list[int]], str] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Greedy-decode every source and score it: ``exact_match`` (every kept ``tgt_out`` position, EOS
    included, predicted) and the text metric that fits the references, ``bleu`` or ``chrf``
    (``archlab.train.metrics.text_metric``: chrF for outputs under 4 words, where BLEU is 0 by construction),
    on ``detokenize``-d strings cut at EOS (ids joined by spaces when ``detokenize`` is None). Decoding starts from ``tgt_in[:, 0]`` (BOS) and runs at most
    ``M = tgt_out.shape[1]`` steps. The model is put in eval mode and restored."""
    from archlab.generation import generate

    was_training = model.training
    model.eval()
    matches, rows, hyps, refs = 0, 0, [], []
    detok = detokenize or (lambda ids: " ".join(map(str, ids)))
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            seq2seq_counts(batch)  # key check
            device = next(model.parameters()).device
            src, tgt_out = batch["src_ids"].to(device), batch["tgt_out"].to(device)
            src_mask = batch.get("src_mask")
            src_mask = None if src_mask is None else src_mask.to(device)
            memory = model.encode(src, src_mask)
            out = generate(
                model.decoder_step(memory, src_mask), batch["tgt_in"][:, :1].to(device),
                max_new_tokens=tgt_out.shape[1], cache=model.new_cache(), stop_tokens=[eos_id], pad_id=eos_id,
            )[:, 1:]  # fmt: skip
            pred = torch.full_like(tgt_out, eos_id)
            pred[:, : out.shape[1]] = out
            keep = tgt_out != IGNORE_INDEX
            matches += int(((pred == tgt_out) | ~keep).all(dim=1).sum())
            rows += tgt_out.shape[0]
            for p, t, k in zip(pred.tolist(), tgt_out.tolist(), keep.tolist()):
                ref = [x for x, kk in zip(t, k) if kk]
                hyps.append(detok(_until(p, eos_id)))
                refs.append(detok(_until(ref, eos_id)))
    finally:
        model.train(was_training)
    if not rows:
        raise DataError("seq2seq_generation_metrics got no batches")
    name, score = text_metric(hyps, refs)
    return {"exact_match": matches / rows, name: score}


def _until(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
