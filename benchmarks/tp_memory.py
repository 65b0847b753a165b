"""Parameter memory per rank under each ``train.parallel`` way of splitting a model, measured from each rank's shards.

Builds a decoder preset (random weights, float32), wraps it over the ranks torchrun started (gloo on the CPU) as
the Trainer does (:func:`archlab.train.distributed.wrap`: ``ddp`` replicated, ``fsdp`` FSDP2-sharded, ``tp``
tensor-parallel, ``fsdp+tp`` both on a ``(dp, tp)`` mesh), and prints for each rank the bytes of the parameters it
holds: all of them, and those of the decoder blocks (the part tensor parallelism splits; embeddings, norms and the
LM head stay whole under ``tp``, FSDP shards them too). Without torchrun it prints the one-process figures.

    python benchmarks/tp_memory.py --preset gpt2-small
    torchrun --nproc_per_node=2 benchmarks/tp_memory.py --preset gpt2-small
    torchrun --nproc_per_node=4 benchmarks/tp_memory.py --preset gpt2-small --parallel fsdp+tp --tp-size 2
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from archlab.models.registry import build_model
from archlab.parallel import parameter_bytes_by_rank
from archlab.train.config import PARALLEL
from archlab.train.distributed import detect, device_mesh, wrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", help="a decoder-only preset (GPT or Llama)")
    parser.add_argument("--parallel", default="tp", choices=PARALLEL, help="how the ranks split the model")
    parser.add_argument("--tp-size", type=int, default=2, help="ranks per tensor-parallel group under fsdp+tp")
    args = parser.parse_args()
    env = detect()
    torch.manual_seed(0)
    model = build_model(args.preset)
    how = args.parallel if env.distributed else "one process"
    if env.distributed:
        dist.init_process_group("gloo")
        cpu = torch.device("cpu")
        mesh = device_mesh(env, args.parallel, cpu, args.tp_size)
        wrap(model, env, args.parallel, cpu, mesh=mesh)  # in place for fsdp / tp / fsdp+tp; ddp keeps every weight
        if mesh is not None:
            how += " on a " + " x ".join(f"{n}={k}" for n, k in zip(mesh.mesh_dim_names, mesh.shape)) + " mesh"
    every = parameter_bytes_by_rank(model)  # a collective under torchrun
    if env.is_main:
        print(f"{args.preset}, {env.world_size} rank(s), {how}: float32 parameters held by each rank (MiB):")
        for rank, (total, blocks) in enumerate(every):
            print(f"  rank {rank}: {total / 2**20:8.1f} in all, {blocks / 2**20:8.1f} in the decoder blocks")
    if env.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
