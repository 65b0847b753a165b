r"""The training loop: one loop for every task, on one process or under ``torchrun``.

One optimiser step, read top to bottom (:meth:`Trainer.train_step`)::

    batches  = next k micro-batches of the batch source              (k = grad_accum)
    C_t      = targets of loss term t in all k batches, all ranks    (known before any forward)
    for each micro-batch b:                                           (gradients synchronised on the last)
        loss_b = sum_t S_t(b) / C_t ;  loss_b.backward()              S_t = summed (smoothed) losses
    stop with TrainingError if sum_b loss_b or the gradient norm is not finite
    clip the global gradient norm to `clip`; AdamW step; scheduler step

so ``k`` micro-batches of ``B / k`` take the same step as one batch of ``B``, and ``N`` ranks the same
step as one process with their union. Around it: evaluation every ``eval_every`` steps, a checkpoint
every ``ckpt_every`` steps (see :mod:`archlab.train.checkpoint`), metrics to the bar, ``metrics.jsonl``
and TensorBoard (:mod:`archlab.train.logs`).

Batch source: any iterable of batches (dicts of tensors, the formats of :mod:`archlab.data`). When it is
exhausted a new pass starts (``iter()`` again). For an exact resume it offers ``state_dict()`` /
``load_state_dict()`` (JSON-able, the position after the last batch handed out); a source without
them (a list) is replayed from its start and the batches already used are skipped. Under ``torchrun``
each rank's source yields that rank's share of the global batch.

``resume`` continues exactly: model, optimiser, scheduler, RNG (Python, NumPy, torch) and data position
come back, so ``N`` steps + resume + ``N`` steps gives the same weights, bit for bit on a CPU, as ``2N``
steps without a break.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from archlab.errors import CheckpointError, ConfigError, DataError, TrainingError
from archlab.interop.io import WEIGHTS_FILE, check_state_dict
from archlab.precision import choose_precision
from archlab.train import distributed as D
from archlab.train.blocks import enable_gradient_checkpointing
from archlab.train.checkpoint import (
    STATE_FILE,
    capture_rng,
    check_like,
    check_model_config,
    check_optimizer_state,
    check_scheduler_state,
    check_writable_folder,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_temporaries,
    restore_rng,
    save_checkpoint,
)
from archlab.train.config import SHARDED, TENSOR_PARALLEL, TRAJECTORY_FIELDS, TrainConfig
from archlab.train.logs import RunLog
from archlab.train.mixed import compute_weights
from archlab.train.optim import build_optimizer
from archlab.train.schedules import build_schedule, build_scheduler
from archlab.train.tasks import Batch, get_task, summarize, task_loss

CHECKPOINTS = "checkpoints"


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` ends with: the ``step`` reached, the last ``train`` and ``eval`` metrics,
    the last ``checkpoint`` written (None without an ``out_dir``) and the ``loss_plot`` PNG (if drawn)."""

    step: int
    train: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    loss_plot: Path | None = None


def resolve_task(model: nn.Module, task: str) -> str:
    """``task``, or with ``auto`` the task the model's registered family trains on."""
    if task != "auto":
        return task
    from archlab.models.registry import family_of

    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"task='auto' needs an archlab model with a config; {type(model).__name__} has none: set task")
    return family_of(config).task


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (a tied LM head and its embedding)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


class Trainer:
    """Trains ``model`` on ``train_batches`` as ``config`` says; :meth:`fit` runs it.

    Args:
        model: an archlab model (or any module the task can call); moved to the run's device.
        config: the :class:`~archlab.train.config.TrainConfig`.
        train_batches: the batch source (module docstring).
        eval_batches: a finite iterable of batches evaluated each time (iterated anew each time), or a
            callable returning one; None = no evaluation.
        out_dir: where ``checkpoints/``, ``metrics.jsonl`` and ``loss.png`` go; None writes nothing.
        extra_metrics: ``f(model) -> {name: value}`` run at each evaluation (e.g.
            :func:`~archlab.train.tasks.seq2seq_generation_metrics`); the model is the unwrapped one.
        unigram_loss: the unigram baseline on the validation targets (nats per target), drawn on ``loss.png``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: Iterable[Batch],
        *,
        eval_batches: Iterable[Batch] | Callable[[], Iterable[Batch]] | None = None,
        out_dir: str | Path | None = None,
        extra_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
        unigram_loss: float | None = None,
    ):
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(train_batches, Iterable):
            raise DataError(f"train_batches must be an iterable of batches, got {type(train_batches).__name__}")
        if eval_batches is not None and not (isinstance(eval_batches, Iterable) or callable(eval_batches)):
            raise DataError(f"eval_batches must be an iterable of batches or a callable returning one, got "
                            f"{type(eval_batches).__name__}")  # fmt: skip
        every = config.eval_every or config.steps  # evaluations: every eval_every steps, and after the last step
        evaluations = config.steps // every + (config.steps % every != 0)
        if isinstance(eval_batches, Iterator) and evaluations > 1:
            raise DataError(f"eval_batches is an iterator ({type(eval_batches).__name__}), used up by the first of the "
                            f"evaluations every eval_every={config.eval_every} steps: pass a list, or a callable "
                            "returning the batches anew")  # fmt: skip
        self.config = c = config
        self.task = get_task(resolve_task(model, c.task))
        self.env = D.init_distributed(c.device)
        self.device = D.device_for(c.device, self.env)
        self.mesh = D.device_mesh(self.env, c.parallel, self.device, c.tp_group_size)  # tp, fsdp+tp; else None
        # the ranks that split the data: all but under tp (none) and fsdp+tp (the dp axis of the mesh)
        self.dp = D.data_parallel_env(self.env, c.parallel, c.tp_group_size, self.mesh)
        self.train_batches, self.eval_batches, self.extra_metrics = train_batches, eval_batches, extra_metrics
        self.out_dir = None if out_dir is None else Path(out_dir)
        if self.out_dir is not None:  # now, not when the first checkpoint is due
            check_writable_folder(self.out_dir, "out_dir")
            check_writable_folder(self.out_dir / CHECKPOINTS, "out_dir")
        self.unigram_loss = unigram_loss
        weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.precision = choose_precision(c.precision, self.device, weights)  # see archlab.precision
        # bf16: fp32 master weights cast once per step (archlab.train.mixed), an autocast region around the
        # forward for ops that meet fp32 buffers; under FSDP (sharded parameters) autocast alone
        self.autocast = torch.bfloat16 if self.precision.bf16 else None
        self.cast_once = self.precision.bf16 and not (self.env.distributed and c.parallel in SHARDED)

        # the model: unwrapped (`model`, what checkpoints hold), wrapped (`module`), compiled (`forward`)
        self.model = model.to(self.device)
        self.model_class = type(model).__name__  # before FSDP renames the class
        self.tied = _tied_names(self.model)
        self.shapes = {k: torch.empty_like(v, device="meta") for k, v in self.model.state_dict().items()}
        if c.grad_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.module = D.wrap(
            self.model, self.env, c.parallel, self.device, find_unused=self.task.find_unused, method=self.task.method,
            mesh=self.mesh,
        )
        self.forward = torch.compile(self.module) if c.compile else self.module

        self.optimizer = build_optimizer(self.model, lr=c.peak_lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        schedule = build_schedule(
            c.schedule, warmup=c.warmup_steps, total=c.steps, lr=c.peak_lr, min_lr=c.min_lr,
            d_model=getattr(getattr(model, "config", None), "d_model", None),
        )  # fmt: skip
        self.scheduler = build_scheduler(self.optimizer, schedule)
        self.step = 0
        self.batches_seen = 0  # micro-batches taken from the source (resume of sources without state_dict)
        self.last_checkpoint: Path | None = None
        self.log = RunLog(None, enabled=False, total=c.steps)

    # -- the run ------------------------------------------------------------------------------------------
    def fit(self, *, resume: bool | str | Path = False, until: int | None = None) -> FitResult:
        """Train to ``config.steps`` (or stop after step ``until``, as an interrupted run would).

        ``resume``: False starts at step 0; True continues from the latest checkpoint under
        ``out_dir/checkpoints`` if there is one; a path continues from that checkpoint.
        """
        c = self.config
        if until is not None and until < 1:
            raise ConfigError(f"until={until!r} must be a step >= 1")
        stop = c.steps if until is None else min(until, c.steps)
        resumed = self._resume(resume) if resume else False
        if not resumed and self.step == 0:  # (a second fit() on this Trainer simply goes on)
            seed_everything(c.seed + self.dp.rank)
        self.log = RunLog(
            self.out_dir, enabled=self.env.is_main, total=c.steps, initial=self.step,
            progress=c.progress, tensorboard=c.tensorboard, unigram_loss=self.unigram_loss,
        )  # fmt: skip
        if self.out_dir is not None and self.env.is_main:
            remove_temporaries(self.out_dir / CHECKPOINTS)
        if resume and not resumed:
            self.log.message(f"resume: no checkpoint under {self.out_dir / CHECKPOINTS}; starting at step 0")
        self._announce()
        result = FitResult(self.step)
        stream = self._stream()
        try:
            while self.step < stop:
                result.train = self.train_step(stream)
                if c.eval_every and self.step % c.eval_every == 0:
                    result.eval = self.evaluate()
                if c.ckpt_every and self.step % c.ckpt_every == 0:
                    self.save()
            if self.eval_batches is not None and not (c.eval_every and self.step % c.eval_every == 0):
                result.eval = self.evaluate()
            saved_now = self.last_checkpoint is not None and self._step_of(self.last_checkpoint) == self.step
            if self.out_dir is not None and not saved_now:
                self.save()
        except (MemoryError, RuntimeError) as e:  # a batch too large for this machine: say which setting, no traceback
            from archlab.models.registry import out_of_memory

            if not out_of_memory(e):
                raise
            per_pass = c.micro_batch_size(self.dp.world_size)
            raise TrainingError(f"step {self.step + 1}: batches of batch_size={c.batch_size} ({per_pass} per forward "
                                f"pass, grad_accum={c.grad_accum}) do not fit in this machine's memory; lower "
                                "batch_size or raise grad_accum (the last checkpoint is left as it was)"
                                ) from None  # fmt: skip
        finally:
            result.loss_plot = self.log.close()
        result.step, result.checkpoint = self.step, self.last_checkpoint
        return result

    def _announce(self) -> None:
        c = self.config
        how = ""
        if self.cast_once:
            how = "; fp32 master weights and AdamW, weights cast to bf16 once per step"
        elif self.precision.bf16:
            how = "; FSDP shards: bf16 autocast per forward, fp32 master weights and AdamW"
        self.log.message(self.precision.line("training") + how)
        if self.env.distributed:
            mesh = ""
            if self.mesh is not None:
                mesh = ", device mesh " + " x ".join(f"{n}={k}" for n, k in zip(self.mesh.mesh_dim_names, self.mesh.shape))
            if self.mesh is not None and self.mesh.ndim > 1:
                mesh += f" (the data split over dp's {self.dp.world_size} ranks; the ranks of a tp group read alike)"
            self.log.message(f"{c.parallel} on {self.env.world_size} processes ({self.device.type}){mesh}")
        if self.env.distributed and c.parallel in TENSOR_PARALLEL:
            from archlab.parallel import local_parameter_bytes

            mine, blocks = local_parameter_bytes(self.model), local_parameter_bytes(self.model.decoder.blocks)
            self.log.message(f"{c.parallel}: rank 0 holds {mine / 2**20:.1f} MiB of parameters, "
                             f"{blocks / 2**20:.1f} MiB of them in the decoder blocks")  # fmt: skip

    # -- one optimiser step ---------------------------------------------------------------------------------
    def train_step(self, stream: Iterator[Batch]) -> dict[str, float]:
        """Take ``grad_accum`` micro-batches from ``stream`` and make one optimiser step; returns its metrics."""
        c, env = self.config, self.dp
        started = time.perf_counter()
        micro = [next(stream) for _ in range(c.grad_accum)]
        totals = self._global_counts(micro)
        self.module.train()
        objective = torch.zeros((), dtype=torch.float64, device=self.device)
        stats: dict[str, Tensor] = {}
        with self._weights():
            for i, batch in enumerate(micro):
                batch = self._to_device(batch)
                with D.no_sync(self.module, env, sync=i == len(micro) - 1):
                    with self._autocast():
                        terms, batch_stats = self.task.run(self.forward, batch, c.label_smoothing)
                    loss = task_loss(terms, totals)
                    (loss * env.world_size).backward()  # DDP / FSDP average gradients over ranks; we want their sum
                objective += loss.detach().double()
                _add(stats, batch_stats)
        lr = self.optimizer.param_groups[0]["lr"]
        reduced = self._reduce({"loss": objective, **stats})
        if not math.isfinite(reduced["loss"]):
            raise self._diverged(f"the loss is {reduced['loss']}", lr)
        tp = self.env.distributed and c.parallel in TENSOR_PARALLEL
        grad_norm = D.clip_grad_norm(list(self.model.parameters()), c.clip or math.inf, tensor_parallel=tp)
        if not math.isfinite(grad_norm):
            raise self._diverged(f"the gradient norm is {grad_norm}", lr)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        elapsed = time.perf_counter() - started
        metrics = {"loss": reduced["loss"], **summarize(reduced, self.task.name), "lr": lr, "grad_norm": grad_norm}
        rate = reduced.get("tokens", 0.0) / elapsed if elapsed > 0 else 0.0
        metrics.update(tokens=reduced.get("tokens", 0.0), tokens_per_s=rate, step_s=elapsed)
        self.log.progress(self.step, metrics["loss"], lr, rate)
        if self.step % c.log_every == 0 or self.step == c.steps:
            self.log.record("train", self.step, metrics)
        return metrics

    def _global_counts(self, micro: list[Batch]) -> dict[str, int]:
        """Targets per loss term over the micro-batches of all ranks (validates the batches' keys first)."""
        local: dict[str, int] = {}
        for batch in micro:
            for term, n in self.task.counts(batch).items():
                local[term] = local.get(term, 0) + n
        names = sorted(local)
        counts = torch.tensor([float(local[n]) for n in names], dtype=torch.float64, device=self.device)
        summed = D.all_reduce_sum(counts, self.dp)
        return {n: int(v) for n, v in zip(names, summed.tolist())}

    def _reduce(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Sum each value over the ranks; one collective for all of them."""
        names = sorted(values)
        stacked = torch.stack([values[n].detach().to(self.device, torch.float64).reshape(()) for n in names])
        return dict(zip(names, D.all_reduce_sum(stacked, self.dp).tolist()))

    def _diverged(self, what: str, lr: float) -> TrainingError:
        kept = self.last_checkpoint or (latest_checkpoint(self.out_dir / CHECKPOINTS) if self.out_dir else None)
        where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was written yet"
        self.log.message(f"stopped at step {self.step + 1}: {what}")
        return TrainingError(
            f"{what} at step {self.step + 1} (lr={lr:.3g}); stopped before the optimizer step and {where}. "
            f"{'Resume from it' if kept else 'Start again'} with a lower lr, a longer warmup or clipping, or check "
            "the data."
        )

    def _weights(self):
        """bf16: the weights cast once for the step's forwards and backwards (:func:`compute_weights`)."""
        return compute_weights(self.model) if self.cast_once else contextlib.nullcontext()

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _stream(self) -> Iterator[Batch]:
        """Micro-batches forever: the source again and again (skipping those a resume already used)."""
        skip = self.batches_seen if not hasattr(self.train_batches, "load_state_dict") else 0
        while True:
            empty = True
            for batch in self.train_batches:
                empty = False
                if skip:
                    skip -= 1
                    continue
                self.batches_seen += 1
                yield batch
            if empty:
                raise DataError(
                    f"the training batch source yielded no batches (after {self.batches_seen} in all); an iterator "
                    "or generator is used up after one pass: pass an object whose iter() starts a new pass"
                )

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (the training objective), NLL, perplexity, accuracy over the evaluation batches; logged."""
        if self.eval_batches is None:
            return {}
        batches = self.eval_batches() if callable(self.eval_batches) else self.eval_batches
        if not isinstance(batches, Iterable):
            raise DataError(f"eval_batches() must return an iterable of batches, got {type(batches).__name__}")
        sums: dict[str, Tensor] = {}  # "loss.<term>", "count.<term>" and the task's statistics, over all batches
        was_training = self.model.training
        self.model.eval()
        try:
            for i, batch in enumerate(batches):
                if self.config.eval_batches is not None and i >= self.config.eval_batches:
                    break
                counts = self.task.counts(batch)
                with self._weights(), self._autocast():
                    terms, stats = self.task.run(self.model, self._to_device(batch), self.config.label_smoothing)
                _add(sums, {f"loss.{t}": v for t, v in terms.items()})
                _add(sums, {f"count.{t}": torch.tensor(float(n)) for t, n in counts.items()})
                _add(sums, stats)
        finally:
            self.model.train(was_training)
        if not sums:
            raise DataError("the evaluation batches are empty")
        reduced = self._reduce(sums)
        term_names = [k.removeprefix("loss.") for k in reduced if k.startswith("loss.")]
        loss = sum(reduced[f"loss.{t}"] / max(reduced[f"count.{t}"], 1.0) for t in term_names)
        body = {k: v for k, v in reduced.items() if not k.startswith(("loss.", "count."))}
        metrics = {"loss": loss, **summarize(body, self.task.name)}
        if self.extra_metrics is not None:
            metrics.update(self.extra_metrics(self.model))
        self.log.record("eval", self.step, metrics)
        return metrics

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part). None without out_dir."""
        if self.out_dir is None:
            return None
        env = self.env
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer, env)
        model = self._unsharded_model()
        rng_json, rng_tensors = capture_rng()
        data = self.train_batches.state_dict() if hasattr(self.train_batches, "state_dict") else None
        ranks = D.gather_objects({"data": data, "batches_seen": self.batches_seen, "rng": rng_json}, self.dp)
        rngs = D.gather_objects(rng_tensors, self.dp)
        path = checkpoint_dir(self.out_dir / CHECKPOINTS, self.step)
        if env.is_main:
            state = {
                "step": self.step, "task": self.task.name, "world_size": self.dp.world_size,
                "train_config": self.config.to_dict(), "scheduler": self.scheduler.state_dict(), "ranks": ranks,
            }  # fmt: skip
            tensors = {f"rank{r}/{name}": t for r, states in enumerate(rngs) for name, t in states.items()}
            save_checkpoint(path, model=model, optimizer_state=optimizer_state, state=state, rng_tensors=tensors)
            prune_checkpoints(self.out_dir / CHECKPOINTS, self.config.keep_last)
        D.barrier(env)
        self.last_checkpoint = path
        return path

    def _unsharded_model(self) -> nn.Module | None:
        """The model with whole tensors, for rank 0 to write: itself, or (FSDP) a copy built from the full state."""
        if not (self.env.distributed and self.config.parallel in (*SHARDED, *TENSOR_PARALLEL)):
            return self.model
        state = D.full_model_state(self.model, self.env)  # collective; the tensors land on rank 0
        if not self.env.is_main:
            return None
        from archlab.models.registry import build_model

        copy = build_model(self.model.config, model_class=self.model_class)
        with torch.no_grad():  # the trained dtypes (float64, bf16, ...), not the constructor's float32
            for name, tensor in [*copy.named_parameters(), *copy.named_buffers()]:
                if name in state:
                    tensor.data = tensor.data.to(state[name].dtype)
        copy.load_state_dict(state)
        return copy

    def _resume(self, resume: bool | str | Path) -> bool:
        """Load the checkpoint ``resume`` names (True: the latest); False when there is none to load."""
        if resume is True:
            if self.out_dir is None:
                raise ConfigError("resume=True looks for checkpoints under out_dir, but out_dir is None")
            path = latest_checkpoint(self.out_dir / CHECKPOINTS)
            if path is None:
                return False
        else:
            path = Path(resume)
        ckpt = load_checkpoint(path)
        self._check_resumable(ckpt.state, path)
        check_model_config(path, self.model.config)
        weights = ckpt.weights()
        for names in self.tied:  # a tied tensor is stored once: give it back all its names
            stored = next((n for n in names if n in weights), None)
            if stored is not None:
                weights.update({n: weights[stored] for n in names})
        check_state_dict(self.shapes, weights, str(path))
        recast = [f"{k}: {weights[k].dtype} vs model {v.dtype}" for k, v in self.shapes.items() if weights[k].dtype != v.dtype]
        if recast:  # an exact resume copies the weights as they are
            shown = ", ".join(recast[:6]) + (f", ... ({len(recast)} in all)" if len(recast) > 6 else "")
            raise CheckpointError(f"{path / WEIGHTS_FILE} stores tensors in another dtype than the model's: {shown}")
        mine = ckpt.state["ranks"][self.dp.rank]
        state_file = path / STATE_FILE
        check_like(self.scheduler.state_dict(), ckpt.state["scheduler"], f"{state_file}: scheduler")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        stored = [{k: g.get(k) for k in groups[0]} if isinstance(g, dict) else g for g in ckpt.optimizer["param_groups"]]
        check_like(groups, stored, f"{state_file}: optimizer.param_groups")  # lr, betas, ... as this run's
        # the values too: the schedule at the checkpoint's step, AdamW's moments of each parameter's shape
        check_scheduler_state(ckpt.state["scheduler"], self.scheduler.state_dict(), ckpt.step, path)
        lrs = [base * at(ckpt.step) for base, at in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        aliases: dict[int, set[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), set()).add(name)
        names = [[aliases[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
        at_step = [{**g, "lr": lr} for g, lr in zip(groups, lrs)]
        check_optimizer_state(ckpt.optimizer, at_step, names, self.shapes, ckpt.step, path)
        resumes_data = mine["data"] is not None and hasattr(self.train_batches, "load_state_dict")
        if resumes_data:
            check_like(self.train_batches.state_dict(), mine["data"], f"{state_file}: ranks[{self.dp.rank}].data")
        D.load_full_model_state(self.model, weights)
        D.load_full_optimizer_state(self.model, self.optimizer, ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        if resumes_data:
            self.train_batches.load_state_dict(mine["data"])
        prefix = f"rank{self.dp.rank}/"
        restore_rng(mine["rng"], {k.removeprefix(prefix): v for k, v in ckpt.rng.items() if k.startswith(prefix)})
        self.step, self.batches_seen, self.last_checkpoint = ckpt.step, mine["batches_seen"], path
        return True

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        saved = TrainConfig.from_dict(state["train_config"])
        fields = list(TRAJECTORY_FIELDS) + (["steps"] if self.config.schedule == "cosine" else [])
        changed = [f"{f}: {getattr(saved, f)!r} -> {getattr(self.config, f)!r}" for f in fields
                   if getattr(saved, f) != getattr(self.config, f)]  # fmt: skip
        if changed:  # the CLI's way to new settings: model.init (archlab.train.run), which reads a run's tokenizer
            run = self.out_dir if self.out_dir is not None and (self.out_dir / "run.json").is_file() else "RUN_DIR"
            raise ConfigError(
                f"cannot resume {path} exactly: the run changed {'; '.join(changed)}. Resume with the "
                "checkpoint's values, or start a new run from its weights (archlab.interop.io.load_model): for a "
                f"run on text, `archlab train {run} --set model.init={path} --set data.tokenizer=auto --out NEW_DIR` "
                "with the new --set values"
            )
        if state["world_size"] != self.dp.world_size:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} process(es) and this run has {self.dp.world_size}; "
                "resume with the same number of processes (each rank's data position and RNG are in it)"
            )
        if self.config.steps < int(state["step"]):
            raise ConfigError(f"steps={self.config.steps} but {path} is already at step {state['step']}")

    @staticmethod
    def _step_of(path: Path) -> int:
        return int(path.name.split("-")[1])


def _add(into: dict[str, Tensor], values: dict[str, Tensor]) -> None:
    for k, v in values.items():
        v = v.detach() if isinstance(v, Tensor) else torch.as_tensor(v)
        into[k] = into[k] + v if k in into else v


def train(
    model: nn.Module,
    train_batches: Iterable[Batch],
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    eval_batches: Iterable[Batch] | Callable[[], Iterable[Batch]] | None = None,
    resume: bool | str | Path = False,
    extra_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
) -> FitResult:
    """Train ``model`` on ``train_batches`` (see :class:`Trainer`); the one call a script or the CLI needs."""
    trainer = Trainer(
        model, config or TrainConfig(), train_batches, eval_batches=eval_batches, out_dir=out_dir,
        extra_metrics=extra_metrics,
    )  # fmt: skip
    return trainer.fit(resume=resume)
