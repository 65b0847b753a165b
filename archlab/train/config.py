"""``TrainConfig``: every knob of a training run in one frozen, validated, JSON round-trippable dataclass.

The default recipe is the paper's optimiser, Adam with ``beta = (0.9, 0.98)``, ``eps = 1e-9`` (as AdamW,
weight decay off unless asked), with a cosine schedule after a linear warmup of 10% of the run (at most 100
steps), peaking at ``lr = 2e-3``: defaults under which the small models archlab trains on a CPU learn within a
few hundred steps (``gpt-nano`` for 200 steps stayed above the unigram baseline with the earlier 3e-4 and 100
warmup steps). ``schedule="noam"`` is the paper's schedule ``lrate = d_model^-0.5 min(step^-0.5, step warmup^-1.5)``;
there ``lr`` is the factor in front of the formula (1.0 = the paper), which is why ``lr`` defaults to ``None``
(see :attr:`peak_lr`).
"""

from __future__ import annotations

import dataclasses
import math

from archlab.config import MAX_SEED, Config, check_choice, check_positive, check_probability, require
from archlab.models.registry import TASKS

SCHEDULES = ("cosine", "constant", "noam")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp", "tp", "fsdp+tp")
#: ``parallel`` values whose parameters FSDP2 shards, and those whose blocks tensor parallelism splits.
SHARDED = ("fsdp", "fsdp+tp")
TENSOR_PARALLEL = ("tp", "fsdp+tp")
#: ``tp_size=None`` under ``fsdp+tp``: ranks per tensor-parallel group.
DEFAULT_TP_SIZE = 2

#: What the learning rate is when ``lr=None``: the paper's formula as is for ``noam``, a peak otherwise.
DEFAULT_LR = {"noam": 1.0, "cosine": 2e-3, "constant": 2e-3}
#: ``warmup=None``: this share of the run's steps, at most :data:`WARMUP_CAP` steps (see ``TrainConfig.warmup_steps``).
WARMUP_FRACTION = 0.1
WARMUP_CAP = 100

#: Fields that shape the optimisation trajectory: a resumed run must keep them (see ``Trainer``); the warmup as
#: resolved, since ``warmup=None`` follows ``steps``.
TRAJECTORY_FIELDS = (
    "task", "lr", "schedule", "warmup_steps", "min_lr", "betas", "eps", "weight_decay", "clip", "grad_accum",
    "batch_size", "label_smoothing", "seed", "precision", "lora", "lora_r", "lora_alpha", "lora_dropout",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """A training run.

    Args:
        task: the objective (``lm | mlm | seq2seq | classification | custom``, see
            ``archlab.models.registry.TASKS``); ``auto`` takes the model family's ``task``.
        steps: optimiser steps in the whole run.
        batch_size: the global batch, in sequences (or samples) per optimiser step, over all
            accumulation micro-batches and all ranks. Whoever builds the batch source makes micro-batches
            of :meth:`micro_batch_size`; the trainer normalises the loss by the targets actually seen.
        lr: peak learning rate (``cosine``, ``constant``) or the factor on the paper's formula (``noam``);
            ``None`` means :data:`DEFAULT_LR` of the schedule.
        schedule: ``cosine`` (linear warmup, then cosine decay to ``min_lr``), ``constant`` (linear warmup,
            then flat), ``noam`` (the paper's warmup + inverse square root).
        warmup: warmup steps (the paper uses 4000 with ``noam``); ``None`` means :attr:`warmup_steps`' share of
            ``steps``, so a default suits the run's length.
        min_lr: where ``cosine`` ends.
        betas, eps: Adam's; the paper's ``(0.9, 0.98)`` and ``1e-9``.
        weight_decay: decoupled (AdamW) decay, applied to Linear/Conv weights only (see ``archlab.train.optim``).
        clip: max global gradient norm; ``None`` = no clipping (the norm is still logged).
        grad_accum: micro-batches per optimiser step.
        label_smoothing: ``eps_ls`` of the token losses (the paper: 0.1 for translation).
        eval_every: evaluate every k steps (and at the end); 0 = only at the end.
        eval_batches: at most this many evaluation batches each time; ``None`` = all of them.
        ckpt_every: write a checkpoint every k steps (and at the end); 0 = only at the end.
        keep_last: checkpoints kept on disk (older ones are deleted).
        log_every: a JSONL line of training metrics every k steps.
        seed: seeds Python, NumPy and torch at the start of a run (rank r uses ``seed + r``).
        precision: ``auto`` = bf16 where the device computes it natively (a CPU with AMX or AVX512-BF16, a
            GPU with bf16), fp32 where it would be emulated (:mod:`archlab.precision`); ``fp32``; ``bf16``
            wherever asked. bf16 keeps fp32 master weights and AdamW state and casts the weights once per step
            (:mod:`archlab.train.mixed`).
        compile: run the forward through ``torch.compile``.
        grad_checkpointing: recompute each block's activations in the backward pass (see
            ``archlab.train.blocks``); saves memory, costs one more forward.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``.
        parallel: under ``torchrun`` with several processes, ``ddp`` (replicated weights), ``fsdp``
            (FSDP2 ``fully_shard``: weights, gradients and optimiser state sharded) or ``tp`` (tensor parallelism
            of a decoder-only LM, :mod:`archlab.parallel`: each rank holds ``1/N`` of every block's heads and FFN
            units; the world size must divide ``n_heads``, ``n_kv_heads`` and ``d_ff``) or ``fsdp+tp`` (2D: the
            ``N`` ranks form a ``(dp, tp)`` mesh of ``N / tp_size`` x ``tp_size``; each block is tensor-parallel
            over the ``tp_size`` ranks of a row and FSDP2-sharded over the ``dp`` ranks of a column, so a rank holds
            ``1 / N`` of the block weights; the data is split over ``dp`` only: the ranks of one ``tp`` group read
            the same batch).
        tp_size: under ``fsdp+tp``, the ranks of one tensor-parallel group; ``None`` means :data:`DEFAULT_TP_SIZE`.
            It must divide the world size, ``n_heads``, ``n_kv_heads`` and ``d_ff``. Tensor parallelism
            all-reduces twice in every block's forward and backward, FSDP once per block: keep a ``tp`` group on
            one machine (torchrun numbers ranks machine by machine, and a ``tp`` group is ``tp_size`` consecutive
            ranks). Only ``fsdp+tp`` takes it (``tp`` uses every rank).
        lora: train LoRA adapters on these layers instead of every weight (:func:`archlab.nn.lora.apply_lora`'s
            targets: globs over module names, ``GLOB:BLOCK`` row blocks of a fused projection, or the family's
            names, e.g. ``["q", "v"]`` for a Llama); ``()`` trains every parameter.
        lora_r, lora_alpha, lora_dropout: the adapters' rank ``r``, scale ``alpha`` (update ``(alpha / r) B A x``)
            and input dropout.
        progress: show a tqdm bar (rank 0).
        tensorboard: also write TensorBoard events when ``tensorboard`` is installed.
    """

    task: str = "auto"
    steps: int = 1000
    batch_size: int = 32
    lr: float | None = None
    schedule: str = "cosine"
    warmup: int | None = None
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    clip: float | None = 1.0
    grad_accum: int = 1
    label_smoothing: float = 0.0
    eval_every: int = 100
    eval_batches: int | None = None
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"
    parallel: str = "ddp"
    tp_size: int | None = None
    lora: tuple[str, ...] = ()
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        check_choice("task", self.task, ("auto", *TASKS))
        for name in ("steps", "batch_size", "grad_accum", "keep_last", "log_every"):
            check_positive(name, getattr(self, name))
        for name in ("warmup", "eval_every", "ckpt_every", "seed"):
            if getattr(self, name) is not None:
                require(getattr(self, name) >= 0, f"{name}={getattr(self, name)!r} must be >= 0")
        require(self.seed <= MAX_SEED, f"seed={self.seed!r} must be <= 2**64 - 1 (the largest seed torch takes)")
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.lr is not None:
            check_positive("lr", self.lr)
            require(math.isfinite(self.lr), f"lr={self.lr!r} must be finite (a step of inf turns every weight to inf)")
        require(0.0 <= self.min_lr <= self.peak_lr,
                f"min_lr={self.min_lr!r} must be in [0, peak lr={self.peak_lr!r}]")  # fmt: skip
        require(self.schedule != "noam" or self.warmup_steps > 0, "schedule='noam' needs warmup > 0 (the paper: 4000)")
        require(self.schedule != "cosine" or self.steps > self.warmup_steps,
                f"schedule='cosine' needs steps > warmup; got steps={self.steps}, warmup={self.warmup}")  # fmt: skip
        for i, beta in enumerate(self.betas):
            require(0.0 <= beta < 1.0, f"betas[{i}]={beta!r} must be in [0, 1)")
        check_positive("eps", self.eps)
        require(0 <= self.weight_decay < math.inf, f"weight_decay={self.weight_decay!r} must be finite and >= 0")
        if self.clip is not None:
            check_positive("clip", self.clip)
        check_probability("label_smoothing", self.label_smoothing)
        if self.eval_batches is not None:
            check_positive("eval_batches", self.eval_batches)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_choice("parallel", self.parallel, PARALLEL)
        if self.tp_size is not None:
            check_positive("tp_size", self.tp_size)
            require(self.parallel == "fsdp+tp", f"tp_size={self.tp_size!r} applies to parallel='fsdp+tp' only, and "
                    f"parallel={self.parallel!r} (under 'tp' every rank is in the one tensor-parallel group)")
        if self.lora:
            require(all(isinstance(t, str) and t for t in self.lora),
                    f"lora={list(self.lora)!r} must name layers, e.g. ['q', 'v'] or ['*.in_proj']")  # fmt: skip
        check_positive("lora_r", self.lora_r)
        check_positive("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        require(self.batch_size % self.grad_accum == 0,
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")  # fmt: skip

    @property
    def warmup_steps(self) -> int:
        """``warmup``, or with ``None`` :data:`WARMUP_FRACTION` of ``steps`` rounded down, at most :data:`WARMUP_CAP`
        (at least 1 for ``noam``, whose formula divides by it): 3 for a 30-step run, 20 for 200, 100 from 1,000 on."""
        if self.warmup is not None:
            return self.warmup
        share = min(WARMUP_CAP, int(self.steps * WARMUP_FRACTION))
        return max(share, 1) if self.schedule == "noam" else share

    @property
    def tp_group_size(self) -> int | None:
        """Ranks per tensor-parallel group under ``fsdp+tp``: ``tp_size``, or :data:`DEFAULT_TP_SIZE` when it is None.
        None under the other ``parallel`` values (``tp``'s group is every rank, a number the config does not know)."""
        if self.parallel != "fsdp+tp":
            return None
        return DEFAULT_TP_SIZE if self.tp_size is None else self.tp_size

    @property
    def peak_lr(self) -> float:
        """``lr``, or the schedule's default when ``lr`` is None."""
        return DEFAULT_LR[self.schedule] if self.lr is None else self.lr

    def micro_batch_size(self, world_size: int = 1) -> int:
        """Sequences per micro-batch on one rank: ``batch_size / (grad_accum * world_size)``."""
        per_step = self.grad_accum * world_size
        require(self.batch_size % per_step == 0,
                f"batch_size={self.batch_size} is not divisible by grad_accum * world_size = "
                f"{self.grad_accum} * {world_size} = {per_step}")  # fmt: skip
        return self.batch_size // per_step
