"""Run under ``torchrun --nproc_per_node=2`` by test_distributed.py: for DDP and for FSDP2, train a float64
gpt-nano 2 steps (2 micro-batches per step, ragged targets, gradient checkpointing), then resume it from
its checkpoint in a fresh Trainer to 4 steps. Rank 0 writes ``OUT/<parallel>/checkpoints``; the test
compares them with one process on the same global batches."""

import sys
from pathlib import Path

import torch
from train_fakes import LMSource

from archlab.models.registry import build_model
from archlab.train import TrainConfig, Trainer
from archlab.train.distributed import detect

CONFIG = dict(steps=4, batch_size=16, grad_accum=2, lr=1e-2, warmup=1, clip=1.0, weight_decay=0.1, eval_every=0,
              ckpt_every=2, keep_last=5, grad_checkpointing=True, progress=False, tensorboard=False)  # fmt: skip


def model(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt-nano", max_len=32).double()


def source(rank=0, world_size=1):
    return LMSource(batch_size=8, seq_len=12, ragged=True, rank=rank, world_size=world_size)


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
