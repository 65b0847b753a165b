"""Tensor parallelism over 2 CPU processes (torchrun, gloo): the one-process logits and gradients in float64,
each rank holding half of every block's weights; a ``parallel="tp"`` training run through a checkpoint and
resume follows the one-process run; refusals when the world size does not divide the heads or FFN width."""


import pytest
import torch
from torchrun import run_two_ranks
from tp_worker import BF16, CONFIG, PRESETS, batch, bf16_model, bf16_source, model, source

from archlab.errors import ConfigError
from archlab.models.registry import build_model
from archlab.parallel import _grouped_rows, check_tensor_parallel, local_parameter_bytes
from archlab.train import TrainConfig, Trainer, load_checkpoint


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_two_ranks("tp_worker.py", tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_two_ranks_give_the_one_process_logits_and_gradients(two_ranks, preset):
    run = torch.load(two_ranks / f"{preset}.pt", weights_only=True)
    net = model(preset)
    ids, labels = batch(net.config.vocab_size)
    logits = net(ids)
    net(ids, labels=labels).backward()
    torch.testing.assert_close(run["logits"], logits.detach(), rtol=1e-12, atol=1e-12)
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert set(run["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(run["grads"][name], g, rtol=1e-10, atol=1e-12, msg=name)
    # each rank holds half of the blocks' weights (norms aside: they stay whole) and all of the rest
    whole_blocks = local_parameter_bytes(net.decoder.blocks)
    norms = sum(p.numel() * p.element_size() for n, p in net.decoder.blocks.named_parameters() if "norm" in n)
    biases = sum(p.numel() * p.element_size() for n, p in net.decoder.blocks.named_parameters()
                 if n.endswith("out_proj.bias") or n.endswith("w2.bias"))  # row-parallel biases: whole  # fmt: skip
    for total, blocks in run["bytes"].tolist():
        assert blocks == (whole_blocks - norms - biases) // 2 + norms + biases
        assert total - blocks == local_parameter_bytes(net) - whole_blocks


def test_a_tp_run_follows_the_one_process_run_through_a_resume(two_ranks, tmp_path):
    config = TrainConfig(**{**CONFIG, "parallel": "ddp"})
    single = Trainer(model("llama-tiny"), config, source(), out_dir=tmp_path)
    single.fit()
    ck = load_checkpoint(two_ranks / "run" / "checkpoints" / "step-00000004")
    assert ck.state["world_size"] == 1 and ck.state["train_config"]["parallel"] == "tp"
    weights, expected = ck.weights(), single.model.state_dict()
    assert set(weights) == set(load_checkpoint(single.last_checkpoint).weights())  # (a tied tensor stored once)
    for name, w in weights.items():
        torch.testing.assert_close(w, expected[name], rtol=1e-9, atol=1e-11, msg=name)
    moments, want = ck.optimizer["state"], load_checkpoint(single.last_checkpoint).optimizer["state"]
    for name, state in moments.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], want[name][key], rtol=1e-8, atol=1e-14, msg=f"{name}.{key}")


def test_bf16_under_tp_and_ddp_follows_one_process(two_ranks):
    """The once-per-step bf16 cast works on DTensor shards (tp) and under DDP; the losses of 3 steps match one bf16
    process within bf16 reduction-order noise (tp sums the row-parallel halves in another order)."""
    runs = torch.load(two_ranks / "bf16.pt", weights_only=True)
    trainer = Trainer(bf16_model(), TrainConfig(**BF16), bf16_source())
    stream = trainer._stream()
    single = [trainer.train_step(stream)["loss"] for _ in range(BF16["steps"])]
    assert single[-1] < single[0]
    for parallel in ("tp", "ddp"):
        assert runs[parallel] == pytest.approx(single, abs=5e-3), parallel


def test_the_world_size_must_divide_heads_kv_heads_and_the_ffn():
    check_tensor_parallel(build_model("llama-tiny").config, 2)
    with pytest.raises(ConfigError, match=r"splits n_heads=3 by rank, but 2 does not divide it"):
        check_tensor_parallel(build_model("gpt-nano").config, 2)
    with pytest.raises(ConfigError, match=r"splits n_kv_heads=2 by rank, but 4 does not divide it"):
        check_tensor_parallel(build_model("llama-tiny").config, 4)
    with pytest.raises(ConfigError, match=r"splits d_ff=176 by rank, but 3 does not divide it"):
        check_tensor_parallel(build_model("llama-tiny", n_heads=6, n_kv_heads=3, d_model=48).config, 3)
    with pytest.raises(ConfigError, match="alibi"):
        check_tensor_parallel(build_model("gpt-nano", n_heads=4, positional="alibi").config, 2)
    with pytest.raises(ConfigError, match="parallel: unknown value"):
        TrainConfig(parallel="pp")


def test_fused_rows_are_regrouped_rank_by_rank():
    """[Q; K; V] with Q of 4 rows, K and V of 2 -> rank 0: Q_0 K_0 V_0, rank 1: Q_1 K_1 V_1."""
    assert _grouped_rows([4, 2, 2], 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert _grouped_rows([4, 2, 2], 1).tolist() == list(range(8))


@pytest.mark.parametrize(("preset", "message"), [
    ("gpt-nano", r"splits n_heads=3 by rank, but 2 does not divide it"),
    ("bert-mini", r"shards decoder-only LMs .* a Bert\w* trained on task 'mlm'"),
])  # fmt: skip
def test_a_tp_run_the_ranks_cannot_split_fails_before_its_data_is_read(monkeypatch, preset, message):
    from archlab.train import run as run_module
    from archlab.train.run import RunSpec, prepare

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)  # as under torchrun with 2 processes

    def build_data(*args, **kwargs):
        raise AssertionError("the data was prepared before the tp check")

    monkeypatch.setattr(run_module, "build_data", build_data)
    with pytest.raises(ConfigError, match=message):
        prepare(RunSpec(preset, train={"parallel": "tp"}))


@pytest.mark.parametrize("size", [0, -2, True, 2.0, "2", None])
def test_a_world_size_that_is_not_an_int_of_at_least_1_is_refused(size):
    """``"2"`` and None failed in a comparison (TypeError); True and 2.0 passed as 1 and 2 ranks."""
    with pytest.raises(ConfigError, match=r"tensor parallelism needs at least 1 rank, got .*an int >= 1"):
        check_tensor_parallel(build_model("llama-tiny").config, size)


def test_tensor_parallel_refuses_what_is_not_a_device_mesh():
    from archlab.parallel import tensor_parallel

    with pytest.raises(ConfigError, match="tensor_parallel takes a 1-D DeviceMesh.*got int"):
        tensor_parallel(build_model("llama-tiny"), 2)
