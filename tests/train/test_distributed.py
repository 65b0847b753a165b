"""Two CPU processes under torchrun (gloo) follow the one-process trajectory with the same global batch,
for DDP and for FSDP2, through a checkpoint and resume in the middle: an ``lm`` model and ``custom`` ones
(ELMo, whose ``compute_loss`` must run through the wrapper's ``forward``; a model with a 0-dim parameter)."""

import json
from pathlib import Path

import pytest
import torch
from dist_worker import CONFIG, CUSTOM, elmo, losses_by_step, model, regression, scaled, source, windows
from torchrun import run_two_ranks
from train_fakes import RegressionModel

from archlab.errors import ConfigError
from archlab.train import TrainConfig, Trainer, load_checkpoint
from archlab.train.distributed import (
    DistEnv,
    MethodAsForward,
    all_reduce_sum,
    detect,
    gather_objects,
    init_distributed,
    leave_process_group,
    no_sync,
    wrap,
)
from archlab.train.tasks import get_task


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_ranks("dist_worker.py", tmp_path_factory.mktemp("dist"))


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


@pytest.fixture(scope="module")
def one_process_elmo(tmp_path_factory):
    data = windows()
    trainer = Trainer(elmo(), TrainConfig(**CUSTOM), data, eval_batches=data.eval_batches,
                      out_dir=tmp_path_factory.mktemp("single-elmo"))  # fmt: skip
    trainer.fit()
    return trainer


def logged_losses(run: Path) -> dict[tuple[str, int], float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["split"], r["step"]): r["loss"] for r in lines if "split" in r}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_custom_model_follows_the_one_process_trajectory(two_process_run, one_process_elmo, parallel):
    run, single = two_process_run / f"elmo-{parallel}", one_process_elmo
    # the losses of every step, and the evaluations at steps 2 and 4 (before and after the resume)
    losses, reference = logged_losses(run), logged_losses(single.out_dir)
    assert set(losses) == set(reference) == {("eval", 2), ("eval", 4), *(("train", i) for i in (1, 2, 3, 4))}
    for key, loss in reference.items():
        assert losses[key] == pytest.approx(loss, rel=1e-9, abs=0), key
    assert reference[("train", 4)] < reference[("train", 1)]
    # the final weights, under the bare model's names, and the optimiser state
    ck = load_checkpoint(run / "checkpoints" / "step-00000004")
    assert ck.state["world_size"] == 2 and ck.state["task"] == "custom"
    weights, expected = ck.weights(), single.model.state_dict()
    assert set(weights) == set(expected) and "mix.gamma" in weights
    for name, w in weights.items():
        torch.testing.assert_close(w, expected[name], rtol=1e-9, atol=1e-11, msg=name)
    state, single_state = ck.optimizer["state"], load_checkpoint(single.last_checkpoint).optimizer["state"]
    assert set(state) == set(single_state) and not any(name.startswith("mix.") for name in state)  # no gradient
    for name, moments in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            want = single_state[name][key]
            torch.testing.assert_close(moments[key], want, rtol=1e-8, atol=1e-14, msg=f"{name}.{key}")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_0_dim_parameter_is_replicated_and_its_gradient_averaged(two_process_run, parallel):
    run = torch.load(two_process_run / f"scaled-{parallel}.pt", weights_only=True)
    net, data = scaled(), iter(regression())
    with torch.no_grad():  # the logged loss of step 1: the mean of compute_loss over its 2 micro-batches
        first = (net.compute_loss(next(data))[0] + net.compute_loss(next(data))[0]).item() / 2
    trainer = Trainer(net, TrainConfig(**CUSTOM), regression())
    losses = losses_by_step(trainer, CUSTOM["steps"])
    assert losses[0] == pytest.approx(first, rel=1e-12)
    assert run["losses"] == pytest.approx(losses, rel=1e-9, abs=0)
    expected = trainer.model.state_dict()
    assert set(run["state"]) == set(expected) and run["state"]["scale"].ndim == 0
    assert not torch.equal(run["state"]["scale"], scaled().scale.detach())  # it trained
    for name, w in run["state"].items():
        torch.testing.assert_close(w, expected[name], rtol=1e-9, atol=1e-11, msg=name)


def test_a_custom_task_trains_through_a_forward_that_calls_compute_loss():
    task, net = get_task("custom"), RegressionModel()
    assert task.method == "compute_loss" and task.find_unused
    module = wrap(net, DistEnv(), "ddp", torch.device("cpu"), method=task.method)
    assert isinstance(module, MethodAsForward) and module.model is net
    assert [n for n, _ in module.named_parameters()] == [f"model.{n}" for n, _ in net.named_parameters()]
    batch = next(iter(regression()))
    net.double()
    wrapped_terms, wrapped_stats = task.run(module, batch, 0.0)  # training: through forward
    terms, stats = task.run(net, batch, 0.0)  # evaluation: the bare model
    torch.testing.assert_close(wrapped_terms["batch"], net.compute_loss(batch)[0], rtol=0, atol=0)
    torch.testing.assert_close(terms["batch"], wrapped_terms["batch"], rtol=0, atol=0)
    assert wrapped_stats.keys() == stats.keys() and float(wrapped_stats["mse"]) == float(stats["mse"])
    assert wrap(net, DistEnv(), "ddp", torch.device("cpu")) is net  # other tasks: the model itself
    with pytest.raises(ConfigError, match=r"calls model.compute_loss\(...\); Linear has no method 'compute_loss'"):
        wrap(torch.nn.Linear(2, 2), DistEnv(), "ddp", torch.device("cpu"), method="compute_loss")
    with pytest.raises(ConfigError, match=r"model.compute_loss\(...\); Linear has no method"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(**CUSTOM), regression())  # before any step


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


def test_leave_process_group_destroys_the_group_after_a_barrier(tmp_path, monkeypatch):
    """No group: nothing happens. A one-process gloo group: the barrier runs, then the group is gone."""
    import torch.distributed as dist

    leave_process_group()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls = []
    barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier") or barrier(*a, **k))
    leave_process_group()
    assert calls == ["barrier"] and not dist.is_initialized()


def test_world_size_set_by_hand_without_a_rendezvous_is_a_config_error(monkeypatch):
    """WORLD_SIZE=2 without torchrun's MASTER_ADDR / MASTER_PORT was a ValueError traceback from init_process_group."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 asks for 2 processes, but MASTER_ADDR and MASTER_PORT are not "
                                          "set: start them with torchrun --nproc_per_node=2"):
        init_distributed("cpu")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="but MASTER_ADDR is not set"):
        Trainer(torch.nn.Linear(2, 2), TrainConfig(**CUSTOM), regression())
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to meet
    assert init_distributed("cpu") == DistEnv(0, 1, 0)
