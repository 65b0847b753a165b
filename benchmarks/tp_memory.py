"""Parameter memory per rank under tensor parallelism (:mod:`archlab.parallel`), measured from each rank's shards.

Builds a decoder preset (random weights, float32), shards it over the ranks torchrun started (gloo on the CPU),
and prints for each rank the bytes of the parameters it holds: all of them, and those of the decoder blocks
(the part tensor parallelism splits; embeddings, norms and the LM head stay whole on every rank). Without
torchrun it prints the one-process figures.

    python benchmarks/tp_memory.py --preset gpt2-small
    torchrun --nproc_per_node=2 benchmarks/tp_memory.py --preset gpt2-small
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from archlab.models.registry import build_model
from archlab.parallel import parameter_bytes_by_rank, tensor_parallel
from archlab.train.distributed import detect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", help="a decoder-only preset (GPT or Llama)")
    args = parser.parse_args()
    env = detect()
    torch.manual_seed(0)
    model = build_model(args.preset)
    if env.distributed:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        tensor_parallel(model, init_device_mesh("cpu", (env.world_size,)))
    every = parameter_bytes_by_rank(model)  # a collective under torchrun
    if env.is_main:
        print(f"{args.preset}, {env.world_size} rank(s), float32 parameters held by each rank (MiB):")
        for rank, (total, blocks) in enumerate(every):
            print(f"  rank {rank}: {total / 2**20:8.1f} in all, {blocks / 2**20:8.1f} in the decoder blocks")
    if env.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
