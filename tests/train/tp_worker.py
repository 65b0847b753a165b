"""Run under ``torchrun --nproc_per_node=2`` by test_tensor_parallel.py (gloo, CPU, float64):

* llama-tiny (GQA: A = 4 query heads, G = 2 KV heads, SwiGLU) and a 4-head gpt-nano (GELU FFN, learned
  positions): :func:`archlab.parallel.tensor_parallel`, then logits and the gradients of the fused loss; rank 0
  writes them whole, in the one-process layout, with each rank's parameter bytes, to ``OUT/<preset>.pt``.
* ``Trainer`` with ``parallel="tp"``: llama-tiny 2 steps with a checkpoint, then resumed in a fresh Trainer to
  4 steps (``OUT/run``).
* bf16 (float32 llama-tiny, weights cast once per step) under ``tp`` and under ``ddp``: 3 steps' losses to
  ``OUT/bf16.pt``. The test compares everything with one process."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from train_fakes import LMSource

from archlab.models.registry import build_model
from archlab.parallel import full_gradients, parameter_bytes_by_rank, tensor_parallel
from archlab.train import TrainConfig, Trainer
from archlab.train.distributed import detect, leave_process_group

PRESETS = {"llama-tiny": {}, "gpt-nano": {"n_heads": 4}}
CONFIG = dict(steps=4, batch_size=8, grad_accum=2, lr=1e-2, warmup=1, clip=0.5, weight_decay=0.1, eval_every=0,
              ckpt_every=2, keep_last=5, parallel="tp", progress=False, tensorboard=False)  # fmt: skip


def model(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(preset, **PRESETS[preset]).double()


def batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = torch.randint(0, vocab, (2, 12), generator=g)
    labels[1, 7:] = -100
    return ids, labels


def source():
    return LMSource(batch_size=4, seq_len=12, ragged=True)


BF16 = dict(steps=3, batch_size=4, precision="bf16", warmup=0, eval_every=0, ckpt_every=0, progress=False,
            tensorboard=False)  # fmt: skip


def bf16_model():
    torch.manual_seed(0)
    return build_model("llama-tiny")


def bf16_source(rank=0, world_size=1, parallel="ddp"):
    """Under tp every rank reads the whole batch; under ddp its share."""
    if parallel == "tp":
        rank, world_size = 0, 1
    return LMSource(batch_size=4, seq_len=16, rank=rank, world_size=world_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    env = detect()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (env.world_size,))
    for preset in PRESETS:
        net = tensor_parallel(model(preset), mesh)
        ids, labels = batch(net.config.vocab_size)
        logits = net(ids)
        net(ids, labels=labels).backward()
        grads = full_gradients(net)  # collective
        every = parameter_bytes_by_rank(net)  # collective: [(all parameters, decoder blocks)] by rank
        if env.is_main:
            torch.save({"logits": logits.detach(), "grads": grads, "bytes": torch.tensor(every)}, out / f"{preset}.pt")

    config = TrainConfig(**CONFIG)
    Trainer(model("llama-tiny"), config, source(), out_dir=out / "run").fit(until=2)
    torch.manual_seed(1234 + env.rank)  # other RNG states and weights: the resume must restore them
    result = Trainer(model("llama-tiny", seed=99), config, source(), out_dir=out / "run").fit(resume=True)
    assert result.step == 4

    losses = {}
    for parallel in ("tp", "ddp"):
        trainer = Trainer(bf16_model(), TrainConfig(parallel=parallel, **BF16), bf16_source(env.rank, env.world_size, parallel))
        stream = trainer._stream()
        losses[parallel] = [trainer.train_step(stream)["loss"] for _ in range(BF16["steps"])]
    if env.is_main:
        torch.save(losses, out / "bf16.pt")
    leave_process_group()
