"""What several labs share: a short, seeded GPT training loop, and the test that its models learned enough for
a lab to decide (no lab is registered here)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from archlab.data import LMWindows
from archlab.labs.registry import progress_bar
from archlab.models.gpt import GPT, GPTConfig
from archlab.train import build_optimizer, build_scheduler
from archlab.train.schedules import WarmupCosine


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
            loss = model.loss(batch["input_ids"], batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            bar.update()
            if evaluate is not None and step in evaluate_at:
                scores[step] = evaluate(model)
    return model, scores


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
