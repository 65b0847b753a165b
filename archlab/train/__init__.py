"""Training: one loop for every task (:mod:`~archlab.train.loop`), on one process or under torchrun.

    from archlab.train import TrainConfig, train
    result = train(model, batches, TrainConfig(steps=1000, lr=3e-4), out_dir="runs/gpt", eval_batches=val)

Pieces, each in its own module: ``config`` (TrainConfig), ``schedules``, ``losses`` (label smoothing),
``tasks`` (the objective of each task), ``optim`` (AdamW), ``checkpoint``, ``metrics``, ``logs``,
``blocks`` (gradient checkpointing), ``distributed`` (DDP / FSDP2 / tensor parallelism / FSDP2 x TP, 2D);
``run`` (:class:`RunSpec`: model + data + training as one JSON-able description, what ``archlab train`` runs)
and ``sources`` (:class:`DataConfig`).
"""

from archlab.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from archlab.train.config import TrainConfig
from archlab.train.distributed import DistEnv, init_distributed
from archlab.train.loop import FitResult, Trainer, train
from archlab.train.losses import label_smoothed_cross_entropy
from archlab.train.metrics import accuracy, bleu, chrf, exact_match, perplexity, text_metric
from archlab.train.optim import build_optimizer
from archlab.train.run import RunSpec, prepare, train_run
from archlab.train.schedules import NoamSchedule, WarmupConstant, WarmupCosine, build_schedule, build_scheduler
from archlab.train.sources import DataConfig, build_data
from archlab.train.tasks import TASK_OBJECTIVES, seq2seq_generation_metrics

__all__ = [
    "Checkpoint", "DataConfig", "DistEnv", "FitResult", "NoamSchedule", "RunSpec", "TASK_OBJECTIVES", "TrainConfig",
    "Trainer", "WarmupConstant", "WarmupCosine", "accuracy", "bleu", "build_data", "build_optimizer",
    "build_schedule", "build_scheduler", "chrf", "exact_match", "init_distributed", "label_smoothed_cross_entropy",
    "latest_checkpoint", "load_checkpoint", "perplexity", "prepare", "save_checkpoint",
    "seq2seq_generation_metrics", "text_metric", "train", "train_run",
]  # fmt: skip
