"""Run under ``torchrun --nproc_per_node=4`` by test_fsdp_tp_2d.py (gloo, CPU, float64): 2D parallelism on a
``2 x 2`` device mesh (``dp`` x ``tp``). llama-tiny (GQA, SwiGLU) is made tensor-parallel over ``tp``
(:func:`archlab.parallel.tensor_parallel`), then each block and the whole model are sharded over ``dp`` with
FSDP2's ``fully_shard``; each ``dp`` rank takes half the batch. Rank 0 writes the mean loss, the whole gradients
(one-process layout) and every rank's block-parameter bytes to ``OUT/2d.pt``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from archlab.models.registry import build_model
from archlab.parallel import full_gradients, local_parameter_bytes, tensor_parallel


def model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("llama-tiny").double()


def batch(vocab: int):
    """``[4, 12]`` ids and labels, no ignored label: every ``dp`` half holds as many tokens, so the mean of the
    halves' mean losses is the whole batch's."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (4, 12), generator=g), torch.randint(0, vocab, (4, 12), generator=g)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    net = tensor_parallel(model(), mesh["tp"])
    for block in net.decoder.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(net, mesh=mesh["dp"])
    ids, labels = batch(net.config.vocab_size)
    half = slice(2 * mesh["dp"].get_local_rank(), 2 * mesh["dp"].get_local_rank() + 2)
    loss = net(ids[half], labels=labels[half])
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = full_gradients(net)  # collective
    local = torch.tensor([local_parameter_bytes(net.decoder.blocks)])
    every = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    if dist.get_rank() == 0:
        torch.save({"loss": mean / dist.get_world_size(), "grads": grads, "bytes": torch.cat(every)}, out / "2d.pt")
    dist.destroy_process_group()
