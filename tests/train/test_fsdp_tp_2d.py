"""2D parallelism (FSDP over ``dp`` x tensor parallelism over ``tp``) on CPU gloo: 4 ranks under torchrun give the
one-process loss and gradients, each rank holding a quarter of the block weights. Slow: 4 processes (about a
minute on 2 cores). ``archlab train`` does not take it as a ``parallel=`` value yet: this checks that PyTorch
composes the two on this backend, the step before the trainer does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archlab.models.registry import build_model

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fsdp_tp_worker import batch, model  # noqa: E402


@pytest.mark.slow
def test_fsdp_over_dp_and_tp_on_a_2x2_mesh_give_the_one_process_loss_and_gradients(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE)])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(HERE / "fsdp_tp_worker.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = torch.load(tmp_path / "2d.pt")

    net = model()
    ids, labels = batch(net.config.vocab_size)
    loss = net(ids, labels=labels)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
    whole = sum(p.numel() * p.element_size() for p in build_model("llama-tiny").double().decoder.blocks.parameters())
    norms = sum(p.numel() * 8 for n, p in net.decoder.blocks.named_parameters() if "norm" in n)  # sharded by dp only
    assert got["bytes"].tolist() == [(whole - norms) // 4 + norms // 2] * 4, (got["bytes"].tolist(), whole, norms)
