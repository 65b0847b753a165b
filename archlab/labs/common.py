"""What several labs share: a short, seeded GPT training loop (no lab is registered here)."""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from archlab.data import LMWindows
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
) -> tuple[GPT, dict[int, float]]:
    """A fresh GPT of ``config`` trained ``steps`` AdamW steps on ``batches`` (10% warmup, then cosine decay;
    gradients clipped to ``clip``); returns it and ``{step: evaluate(model)}`` after each step (1-based) in
    ``evaluate_at``. A bare loop rather than :class:`archlab.train.Trainer`, whose ``fit`` also reseeds
    Python's and NumPy's generators and writes a run folder."""
    torch.manual_seed(seed)
    model = GPT(config).train()
    optimizer = build_optimizer(model, lr=lr)
    scheduler = build_scheduler(optimizer, WarmupCosine(steps // 10, steps))
    scores = {}
    for step in range(1, steps + 1):
        batch = batches.batch(step - 1)
        loss = model.loss(batch["input_ids"], batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        if evaluate is not None and step in evaluate_at:
            scores[step] = evaluate(model)
    return model, scores
