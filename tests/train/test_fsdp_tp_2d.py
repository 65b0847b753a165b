"""2D parallelism, ``parallel="fsdp+tp"``: FSDP2 over ``dp`` x tensor parallelism over ``tp``. On CPU gloo, 4 ranks
under torchrun (a 2 x 2 mesh, float64) give the one-process loss and gradients, each rank holding a quarter of the
block weights, and a Trainer run through a checkpoint and resume follows the one-process run step for step (losses,
gradient norms before clipping, weights, Adam moments). Slow: 4 processes (about 25 s on 2 idle cores). Fast:
the mesh arithmetic and the configuration errors, raised before any data is read."""

import sys
from pathlib import Path

import pytest
import torch

from archlab.errors import ConfigError
from archlab.parallel import local_parameter_bytes
from archlab.train import TrainConfig, Trainer, load_checkpoint
from archlab.train.distributed import DistEnv, data_parallel_env, mesh_shape
from archlab.train.logs import read_metrics

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from fsdp_tp_worker import CONFIG, batch, model, source  # noqa: E402
from torchrun import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks("fsdp_tp_worker.py", tmp_path_factory.mktemp("fsdp_tp"), 4, timeout=900)


@pytest.mark.slow
def test_fsdp_over_dp_and_tp_on_a_2x2_mesh_give_the_one_process_loss_and_gradients(four_ranks):
    got = torch.load(four_ranks / "2d.pt", weights_only=True)
    net = model()
    ids, labels = batch(net.config.vocab_size)
    loss = net(ids, labels=labels)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
    # the blocks: a quarter each (the norms, which tp leaves whole, a half: FSDP's dp share); the rest a half each
    whole, blocks = local_parameter_bytes(net), local_parameter_bytes(net.decoder.blocks)
    norms = sum(p.numel() * 8 for n, p in net.decoder.blocks.named_parameters() if "norm" in n)
    assert norms > 0
    assert got["bytes"].tolist() == [[(whole - blocks) // 2 + (blocks - norms) // 4 + norms // 2,
                                      (blocks - norms) // 4 + norms // 2]] * 4  # fmt: skip


@pytest.mark.slow
def test_a_fsdp_tp_run_follows_the_one_process_run_through_a_resume(four_ranks, tmp_path):
    """4 steps (2, a checkpoint, a fresh Trainer with other weights and RNG resumed to 4; 2 micro-batches a step,
    gradient checkpointing) on the 2 x 2 mesh vs one process on the same global batches: each step's loss and
    gradient norm (clip 0.5 clips every step: the norm is the global one over the 2D shards), the final weights
    and Adam moments; the copies a tp group holds of the parameters tensor parallelism leaves whole are still equal
    at the end."""
    single = Trainer(model(), TrainConfig(**{**CONFIG, "parallel": "ddp", "tp_size": None}), source(), out_dir=tmp_path)
    single.fit()
    got = read_metrics(four_ranks / "run" / "metrics.jsonl")["train"]
    want = read_metrics(tmp_path / "metrics.jsonl")["train"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"]  # each target counted once: the dp ranks split, the tp ranks do not add
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12, abs=1e-12), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-12), a["step"]
        assert b["grad_norm"] > CONFIG["clip"]
    copies = torch.load(four_ranks / "copies.pt", weights_only=True)
    assert copies["checked"] > 0 and copies["drift"] == 0  # the tp ranks' copies of the whole parameters stay equal
    ck = load_checkpoint(four_ranks / "run" / "checkpoints" / "step-00000004")
    assert ck.state["world_size"] == 2  # the dp ranks: each one's data position and RNG
    assert ck.state["train_config"]["parallel"] == "fsdp+tp" and ck.state["train_config"]["tp_size"] == 2
    expected = load_checkpoint(single.last_checkpoint)
    weights, ref = ck.weights(), expected.weights()
    assert set(weights) == set(ref)
    for name, w in weights.items():
        torch.testing.assert_close(w, ref[name], rtol=1e-9, atol=1e-11, msg=name)
    for name, state in ck.optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], expected.optimizer["state"][name][key], rtol=1e-8, atol=1e-14,
                                       msg=f"{name}.{key}")  # fmt: skip


# -- fast: configuration ------------------------------------------------------------------------------------------


def test_tp_size_defaults_to_2_under_fsdp_tp_and_belongs_to_it_alone():
    assert TrainConfig(parallel="fsdp+tp").tp_group_size == 2
    assert TrainConfig(parallel="fsdp+tp", tp_size=4).tp_group_size == 4
    assert TrainConfig(parallel="tp").tp_group_size is None and TrainConfig().tp_group_size is None
    config = TrainConfig(parallel="fsdp+tp", tp_size=4)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"tp_size=0 must be > 0"):
        TrainConfig(parallel="fsdp+tp", tp_size=0)
    with pytest.raises(ConfigError, match=r"tp_size=2 applies to parallel='fsdp\+tp' only, and parallel='tp'"):
        TrainConfig(parallel="tp", tp_size=2)
    with pytest.raises(ConfigError, match=r"tp_size=2 applies to parallel='fsdp\+tp' only, and parallel='ddp'"):
        TrainConfig(tp_size=2)


def test_a_2d_mesh_puts_tp_groups_on_consecutive_ranks_and_splits_the_data_over_dp():
    """Rank r of 8 with tp_size 2 sits at (r // 2, r % 2): it reads the data of dp rank r // 2 of 4."""
    for rank in range(8):
        env = DistEnv(rank, 8, rank)
        assert mesh_shape(env, "fsdp+tp", 2) == (4, 2)
        dp = data_parallel_env(env, "fsdp+tp", 2)
        assert (dp.rank, dp.world_size, dp.group) == (rank // 2, 4, None)
        assert data_parallel_env(env, "fsdp+tp", 8).world_size == 1  # all 8 in one tp group: no data split
        assert data_parallel_env(env, "fsdp", None) == env and data_parallel_env(env, "tp", None) == DistEnv()
    assert mesh_shape(DistEnv(0, 8, 0), "tp") == (8,)
    assert mesh_shape(DistEnv(0, 8, 0), "fsdp") is None and mesh_shape(DistEnv(), "fsdp+tp", 2) is None
    with pytest.raises(ConfigError, match=r"train.tp_size=3 must divide the number of processes, WORLD_SIZE=8"):
        mesh_shape(DistEnv(0, 8, 0), "fsdp+tp", 3)


class DataRead(Exception):
    """Raised by the stand-in for build_data: the checks before it passed."""


@pytest.mark.parametrize(("preset", "train", "message"), [
    ("llama-tiny", {"tp_size": 3}, r"train.tp_size=3 must divide the number of processes, WORLD_SIZE=4"),
    ("llama-tiny", {"tp_size": 4}, r"train.tp_size=4: tensor parallelism over 4 ranks splits n_kv_heads=2 by rank, "
                                   r"but 4 does not divide it; use a train.tp_size that divides"),
    ("gpt-nano", {}, r"train.tp_size=2: tensor parallelism over 2 ranks splits n_heads=3 by rank"),
    ("bert-mini", {}, r"train.parallel='fsdp\+tp' shards decoder-only LMs .* a Bert\w* trained on task 'mlm'"),
])  # fmt: skip
def test_a_fsdp_tp_run_the_mesh_cannot_split_fails_before_its_data_is_read(monkeypatch, preset, train, message):
    from archlab.train import run as run_module
    from archlab.train.run import RunSpec, prepare

    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(name, value)  # as under torchrun with 4 processes

    def build_data(*args, **kwargs):
        raise AssertionError("the data was prepared before the fsdp+tp checks")

    monkeypatch.setattr(run_module, "build_data", build_data)
    with pytest.raises(ConfigError, match=message):
        prepare(RunSpec(preset, train={"parallel": "fsdp+tp", **train}))


def test_a_fsdp_tp_run_reads_its_dp_ranks_share_of_the_data(monkeypatch):
    """Rank 3 of 4 with tp_size 2 is dp rank 1 of 2: it builds dp rank 1's shard of a global batch of 8."""
    from archlab.train import run as run_module
    from archlab.train.run import RunSpec, prepare

    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")):
        monkeypatch.setenv(name, value)
    seen = {}

    def build_data(*args, **kwargs):
        seen.update(kwargs)
        raise DataRead

    monkeypatch.setattr(run_module, "build_data", build_data)
    with pytest.raises(DataRead):
        prepare(RunSpec("llama-tiny", train={"parallel": "fsdp+tp", "batch_size": 8, "grad_accum": 2}))
    assert (seen["rank"], seen["world_size"], seen["batch_size"]) == (1, 2, 4)  # micro-batch 2 per dp rank, 2 ranks
