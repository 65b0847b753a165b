"""Run under ``torchrun --nproc_per_node=2`` by test_distributed.py, for DDP and for FSDP2, in float64:

* gpt-nano (task ``lm``): 2 steps (2 micro-batches per step, ragged targets, gradient checkpointing), then
  resumed from its checkpoint in a fresh Trainer to 4 steps; rank 0 writes ``OUT/<parallel>/checkpoints``.
* a tiny ELMo (task ``custom``: ``compute_loss`` through the wrapper's ``forward``; its scalar mix gets no
  gradient) on token windows, evaluated every 2 steps, the same 2 + resumed 2 steps; ``OUT/elmo-<parallel>``.
* :class:`ScaledRegressionModel` (task ``custom``, a 0-dim parameter FSDP2 cannot shard) 4 steps; rank 0
  writes its losses and full final state to ``OUT/scaled-<parallel>.pt``.

The test compares them with one process on the same global batches."""

import sys
from pathlib import Path

import numpy as np
import torch
from train_fakes import LMSource, RegressionSource, ScaledRegressionModel

from archlab.data import TokenWindows
from archlab.models.registry import build_model
from archlab.train import TrainConfig, Trainer
from archlab.train.distributed import detect, full_model_state

CONFIG = dict(steps=4, batch_size=16, grad_accum=2, lr=1e-2, warmup=1, clip=1.0, weight_decay=0.1, eval_every=0,
              ckpt_every=2, keep_last=5, grad_checkpointing=True, progress=False, tensorboard=False)  # fmt: skip
CUSTOM = dict(CONFIG, task="custom", eval_every=2, log_every=1, grad_checkpointing=False)
VOCAB = 50


def model(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt-nano", max_len=32).double()


def source(rank=0, world_size=1):
    return LMSource(batch_size=8, seq_len=12, ragged=True, rank=rank, world_size=world_size)


def elmo(seed=0):
    torch.manual_seed(seed)
    return build_model("elmo-small", vocab_size=VOCAB, d_model=8, d_cell=16, n_layers=2).double()


def windows(rank=0, world_size=1):
    """Global micro-batches of 8 windows of 10 tokens; validation: 2 batches, the last row padded."""
    ids = np.random.default_rng(0).integers(0, VOCAB, 600)
    return TokenWindows(ids[:500], seq_len=10, batch_size=8, rank=rank, world_size=world_size, valid=ids[500:])


def scaled(seed=0):
    torch.manual_seed(seed)
    return ScaledRegressionModel().double()


def regression(rank=0, world_size=1):
    return RegressionSource(batch_size=8, rank=rank, world_size=world_size, dtype=torch.float64)


def losses_by_step(trainer, steps):
    """The training loss of each step (a Trainer without out_dir logs nothing, so step by step)."""
    return [trainer.fit(until=s).train["loss"] for s in range(1, steps + 1)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    env = detect()
    for parallel in ("ddp", "fsdp"):
        config = TrainConfig(parallel=parallel, **CONFIG)
        Trainer(model(), config, source(env.rank, env.world_size), out_dir=out / parallel).fit(until=2)
        torch.manual_seed(1234 + env.rank)  # other RNG states and (below) weights: resume must restore them all
        result = Trainer(model(seed=99), config, source(env.rank, env.world_size), out_dir=out / parallel).fit(resume=True)
        assert result.step == 4

        config = TrainConfig(parallel=parallel, **CUSTOM)
        for start, net, resume in ((0, elmo(), False), (2, elmo(seed=99), True)):
            data = windows(env.rank, env.world_size)
            trainer = Trainer(net, config, data, eval_batches=data.eval_batches, out_dir=out / f"elmo-{parallel}")
            assert trainer.fit(resume=resume, until=start + 2).step == start + 2

        trainer = Trainer(scaled(), config, regression(env.rank, env.world_size))
        losses = losses_by_step(trainer, config.steps)
        state = full_model_state(trainer.model, env)  # collective: every rank calls it
        if env.is_main:
            torch.save({"losses": losses, "state": state}, out / f"scaled-{parallel}.pt")
