"""Run under ``torchrun --nproc_per_node=4`` by test_fsdp_tp_2d.py (gloo, CPU, float64): ``parallel="fsdp+tp"`` on
a ``2 x 2`` device mesh (``dp`` x ``tp``), wrapped as the Trainer wraps it (:func:`archlab.train.distributed.wrap`:
llama-tiny, GQA and SwiGLU, tensor-parallel over ``tp``, then each block and the whole model FSDP2-sharded over
``dp``).

* One forward and backward, each ``dp`` rank on half the batch: rank 0 writes the mean loss, the whole gradients
  (one-process layout) and every rank's parameter bytes to ``OUT/2d.pt``.
* ``Trainer`` with ``parallel="fsdp+tp"``: 2 steps with a checkpoint, then resumed in a fresh Trainer (other
  weights, other RNG states) to 4 steps; ``OUT/run`` (``metrics.jsonl`` has every step's loss and gradient norm).
  Then the largest difference between a tp group's copies of a parameter tensor parallelism leaves whole, and how
  many such parameters there are, to ``OUT/copies.pt``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from train_fakes import LMSource

from archlab.models.registry import build_model
from archlab.parallel import full_gradients, parameter_bytes_by_rank
from archlab.train import TrainConfig, Trainer
from archlab.train.distributed import data_parallel_env, detect, device_mesh, leave_process_group, wrap

#: 2 micro-batches of 4 sequences a step (each dp rank: 2), ragged targets, gradient checkpointing; clip 0.5 clips
#: (norms ~1.4-2.3)
CONFIG = dict(steps=4, batch_size=8, grad_accum=2, lr=1e-2, warmup=1, clip=0.5, weight_decay=0.1, eval_every=0,
              ckpt_every=2, keep_last=5, log_every=1, parallel="fsdp+tp", tp_size=2, grad_checkpointing=True,
              progress=False, tensorboard=False)  # fmt: skip


def model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("llama-tiny").double()


def batch(vocab: int):
    """``[4, 12]`` ids and labels, no ignored label: every ``dp`` half holds as many tokens, so the mean of the
    halves' mean losses is the whole batch's."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (4, 12), generator=g), torch.randint(0, vocab, (4, 12), generator=g)


def source(rank: int = 0, world_size: int = 1):
    return LMSource(batch_size=4, seq_len=12, ragged=True, rank=rank, world_size=world_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    env = detect()
    dist.init_process_group("gloo")
    mesh = device_mesh(env, "fsdp+tp", torch.device("cpu"), tp_size=2)
    dp = data_parallel_env(env, "fsdp+tp", 2, mesh)
    net = wrap(model(), env, "fsdp+tp", torch.device("cpu"), mesh=mesh)
    ids, labels = batch(net.config.vocab_size)
    half = slice(2 * dp.rank, 2 * dp.rank + 2)
    loss = net(ids[half], labels=labels[half])
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)  # over all 4 ranks: each dp half's loss twice (its 2 tp ranks)
    grads = full_gradients(net)  # collective
    every = parameter_bytes_by_rank(net)  # collective
    if env.is_main:
        torch.save({"loss": mean / env.world_size, "grads": grads, "bytes": torch.tensor(every)}, out / "2d.pt")

    config = TrainConfig(**CONFIG)
    Trainer(model(), config, source(dp.rank, dp.world_size), out_dir=out / "run").fit(until=2)
    torch.manual_seed(1234 + env.rank)  # other RNG states and weights: the resume must restore them
    trainer = Trainer(model(seed=99), config, source(dp.rank, dp.world_size), out_dir=out / "run")
    assert trainer.fit(resume=True).step == 4
    # the parameters tensor parallelism leaves whole (embeddings, norms, LM head: sharded over dp alone) have a copy
    # on each rank of a tp group; the copies must stay equal, bit for bit
    tp = trainer.mesh["tp"]
    drift = torch.zeros((), dtype=torch.float64)
    for name, p in trainer.model.named_parameters():
        if p.device_mesh.ndim == 1 and p.to_local().numel():  # (a tp group's ranks hold the same dp shard)
            local = p.to_local().detach().contiguous()
            copies = [torch.empty_like(local) for _ in range(tp.size())]
            dist.all_gather(copies, local, group=tp.get_group())
            drift = torch.maximum(drift, max((c - local).abs().max() for c in copies))
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    if env.is_main:
        torch.save({"drift": drift, "checked": sum(p.device_mesh.ndim == 1 for p in trainer.model.parameters())},
                   out / "copies.pt")  # fmt: skip
    leave_process_group()
