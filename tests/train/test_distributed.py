"""Two CPU processes under torchrun (gloo) follow the one-process trajectory with the same global batch,
for DDP and for FSDP2, through a checkpoint and resume in the middle."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import CONFIG, model, source

from archlab.train import TrainConfig, Trainer, load_checkpoint
from archlab.train.distributed import DistEnv, all_reduce_sum, detect, gather_objects, no_sync

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE)])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / "dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    trainer = Trainer(model(), TrainConfig(**CONFIG), source(), out_dir=tmp_path_factory.mktemp("single"))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_trajectory(two_process_run, one_process, parallel):
    root = two_process_run / parallel / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    ck = load_checkpoint(root / "step-00000004")
    assert ck.state["world_size"] == 2 and len(ck.state["ranks"]) == 2
    assert [r["data"]["index"] for r in ck.state["ranks"]] == [8, 8]  # 4 steps x 2 micro-batches, on each rank
    weights = ck.weights()
    reference = one_process.model.state_dict()
    assert set(weights) <= set(reference)
    for name, w in weights.items():
        torch.testing.assert_close(w, reference[name], rtol=1e-9, atol=1e-11, msg=name)
    # and the optimiser state (by parameter name) matches too
    single = load_checkpoint(one_process.last_checkpoint).optimizer["state"]
    for name, state in ck.optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], single[name][key], rtol=1e-8, atol=1e-14, msg=f"{name}.{key}")


def test_one_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert detect() == DistEnv(0, 1, 0)
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, DistEnv()) is t and t.tolist() == [1.0, 2.0]
    assert gather_objects({"a": 1}, DistEnv()) == [{"a": 1}]
    with no_sync(torch.nn.Linear(1, 1), DistEnv(), sync=False):
        pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(Exception, match="RANK='x' must be a non-negative integer"):
        detect()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(Exception, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        detect()
