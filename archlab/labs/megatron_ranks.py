"""The ranks of the ``megatron-sharding`` lab (no lab is registered here): started by
:func:`archlab.labs.megatron.run_ranks` as ``torchrun --nproc_per_node=T -m archlab.labs.megatron_ranks OUT QUICK
SEED``. Each rank shards the lab's GPT (:func:`archlab.parallel.tensor_parallel`), takes the lab's training step
(:func:`archlab.labs.megatron.measure_step`) and rank 0 writes ``OUT/ranks.pt``: the logits, the whole gradients,
and per rank ``(parameter bytes, block parameter bytes)`` and the step peak."""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path, quick: bool, seed: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from archlab.labs.megatron import batch, measure_step, model
    from archlab.parallel import parameter_bytes_by_rank, tensor_parallel
    from archlab.train.distributed import detect, leave_process_group

    torch.set_num_threads(1)
    env = detect()
    dist.init_process_group("gloo")
    try:
        net = tensor_parallel(model(quick, seed), init_device_mesh("cpu", (env.world_size,)))
        logits, grads, peak = measure_step(net, *batch(quick, seed))
        held = parameter_bytes_by_rank(net)  # collectives: every rank takes part
        peaks = [torch.zeros(1, dtype=torch.long) for _ in range(env.world_size)]
        dist.all_gather(peaks, torch.tensor([peak]))
        if env.is_main:
            torch.save({"logits": logits, "grads": grads, "bytes": held, "peaks": [int(p) for p in peaks]},
                       out / "ranks.pt")  # fmt: skip
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other rank may never reach it
        raise
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), bool(int(sys.argv[2])), int(sys.argv[3]))
