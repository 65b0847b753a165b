"""Damaged and hostile run files: each raises an archlab error naming the file (and the key, tensor or value)
before any computation, and a kill never leaves a run that cannot finish (issue 12, section 2, items 1-9)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from archlab.cli import main
from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop.io import load_model, read_hf_folder
from archlab.models.registry import build_model, get_config
from archlab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_temporaries,
)
from archlab.train.logs import read_metrics, repair_metrics
from archlab.train.run import open_run

SETS = [
    "--set", "model.n_layers=1", "--set", "data.max_bytes=60000", "--set", "data.vocab_size=280",
    "--set", "data.seq_len=16", "--set", "train.batch_size=4", "--set", "train.warmup=1",
    "--set", "train.eval_batches=2", "--set", "train.progress=false", "--set", "train.schedule=constant",
    "--set", "train.eval_every=2", "--set", "train.ckpt_every=2",
]  # fmt: skip


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(capsys, *argv) -> str:
    """The ``archlab: error: ...`` line that ends a refused command (exit 2; train prints its plan first)."""
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("archlab: error: "), (code, out, err)
    assert not re.search(r"^step \d+: validation", out, re.M)  # refused before training
    assert "Traceback" not in err
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "gpt-nano", "--out", str(out), "--set", "train.steps=4", *SETS]) == 0
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    """A fresh copy of a finished 4-step run (checkpoints at steps 2 and 4) to damage."""
    return shutil.copytree(trained, tmp_path / "run")


def last(run_dir):
    return latest_checkpoint(run_dir / "checkpoints")


def rewrite_weights(folder, change, metadata=None):
    path = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(change(load_file(str(path))), str(path), metadata={**meta, **(metadata or {})})


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


# -- 1. metadata naming another class ------------------------------------------------------------------------------


def test_weights_naming_a_class_of_another_family_are_refused(run_dir, capsys):
    ckpt = last(run_dir)
    rewrite_weights(ckpt, lambda s: s, metadata={"archlab_model": "BertModel"})
    for load in (load_model, open_run):
        with pytest.raises(CheckpointError, match=r"config\.json with the model class 'BertModel'.*BertConfig.*GPT"):
            load(ckpt)
    assert "'BertModel'" in error_line(capsys, "eval", run_dir, "--max-batches", "1")
    assert "'BertModel'" in error_line(capsys, "generate", run_dir, "--prompt", "a", "--max-new-tokens", "2")
    assert "'BertModel'" in error_line(capsys, "convert", ckpt, run_dir.parent / "converted")
    with pytest.raises(ConfigError, match="model class 'BertModel' is built from a BertConfig, not from a GPTConfig"):
        build_model(get_config("gpt-nano"), model_class="BertModel")


# -- 3. a config.json that is not a JSON object --------------------------------------------------------------------


@pytest.mark.parametrize("text, kind", [("[1, 2]", "array"), ('"gpt"', "string"), ("3", "number")])
def test_a_config_json_of_another_kind_is_refused_naming_the_file(run_dir, capsys, text, kind):
    ckpt = last(run_dir)
    (ckpt / "config.json").write_text(text)
    for read in (load_model, read_hf_folder):
        with pytest.raises(CheckpointError, match=rf"{ckpt / 'config.json'} holds a JSON {kind}, expected an object"):
            read(ckpt)
    assert f"holds a JSON {kind}" in error_line(capsys, "convert", ckpt, run_dir.parent / "converted")


# -- 4. trainer_state.json: every key a resume uses is checked at load ---------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: {**s, "step": "abc"}, "step='abc' must be an integer >= 0"),
        (lambda s: {**s, "step": -1}, "step=-1 must be an integer >= 0"),
        (lambda s: {**s, "scheduler": [1, 2]}, "scheduler=[1, 2] must be an object"),
        (lambda s: {**s, "ranks": {}}, "ranks={} must be a list of 1 entries"),
        (lambda s: {**s, "train_config": {**s["train_config"], "lr": "fast"}}, "train_config: lr='fast' must be"),
        (lambda s: {**s, "ranks": [{**s["ranks"][0], "batches_seen": 1.5}]}, "ranks[0].batches_seen=1.5 must be an integer"),
        (lambda s: {**s, "ranks": [{**s["ranks"][0], "rng": {**s["ranks"][0]["rng"], "python": [3, [1, 2], None]}}]},
         "ranks[0].rng.python=[3, [1, 2], None] must be a Python random state"),
        (lambda s: {**s, "ranks": [{**s["ranks"][0], "rng": {**s["ranks"][0]["rng"], "numpy": ["MT19937", [1], 0]}}]},
         "ranks[0].rng.numpy=['MT19937', [1], 0] must be a NumPy random state"),
    ],
)  # fmt: skip
def test_a_malformed_trainer_state_is_refused_naming_file_key_and_value(run_dir, capsys, change, words):
    ckpt = last(run_dir)
    edit_json(ckpt / "trainer_state.json", change)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt)
    assert str(e.value).startswith(f"{ckpt / 'trainer_state.json'}: ") and words in str(e.value)
    assert words in error_line(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")


def test_malformed_rng_scheduler_and_optimizer_values_are_refused(run_dir, capsys):
    ckpt = last(run_dir)
    rng = load_file(str(ckpt / "rng.safetensors"))
    save_file({"rank0/torch": rng["rank0/torch"][:10].clone()}, str(ckpt / "rng.safetensors"))
    with pytest.raises(CheckpointError, match=r"rng\.safetensors: rank0/torch=torch\.uint8 \(10,\) must be a torch"):
        load_checkpoint(ckpt)
    save_file(rng, str(ckpt / "rng.safetensors"))
    edit_json(ckpt / "trainer_state.json", lambda s: {**s, "scheduler": {**s["scheduler"], "last_epoch": "x"}})
    line = error_line(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")
    assert "trainer_state.json: scheduler.last_epoch='x' must be an integer" in line
    edit_json(ckpt / "trainer_state.json", lambda s: {**s, "scheduler": {**s["scheduler"], "last_epoch": 4}})
    edit_json(ckpt / "trainer_state.json", lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": [
        {**s["optimizer"]["param_groups"][0], "lr": "abc"}, *s["optimizer"]["param_groups"][1:]]}})
    line = error_line(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")
    assert "trainer_state.json: optimizer.param_groups[0].lr='abc' must be a number" in line


# -- 5. a metrics.jsonl cut by a kill -------------------------------------------------------------------------------


def test_a_metrics_file_cut_by_a_kill_is_repaired_and_the_run_finishes(run_dir, capsys):
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-9])  # the last record torn mid-write, no newline
    before = read_metrics(metrics)  # the torn line is skipped
    assert before["eval"][-1]["step"] == 2 and before["train"][-1]["step"] == 4
    code, out, err = run(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")
    assert code == 0, err
    assert "step 6: validation loss" in out
    lines = metrics.read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)  # no torn fragment left, nothing glued to it
    # the torn record was step 4's evaluation; training resumes after checkpoint 4, so only 6 is new
    assert [r["step"] for r in read_metrics(metrics)["eval"]] == [2, 6]


def test_a_bad_line_inside_metrics_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 1, "loss": 2.0}\n{"split": "tr\n{"split": "train", "step": 2, "loss": 1.0}\n')
    with pytest.raises(DataError, match=rf"{path}, line 2, is not JSON"):
        read_metrics(path)
    path.write_text('{"split": "train", "step": "one", "loss": 2.0}\n')
    with pytest.raises(DataError, match="line 1: .* must have a split name and an integer step"):
        read_metrics(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: '\\[1, 2\\]' must be a JSON object"):
        read_metrics(path)
    path.write_text('{"split": "train", "step": 1, "loss": 2.0}')  # whole, only its newline missing
    assert repair_metrics(path) and path.read_text().endswith("}\n") and read_metrics(path)["train"][0]["loss"] == 2.0
    assert not repair_metrics(path)


# -- 6, 7. non-finite and non-float weights -------------------------------------------------------------------------


def test_non_finite_weights_are_refused_naming_the_tensor(run_dir, capsys):
    ckpt = last(run_dir)
    rewrite_weights(ckpt, lambda s: {k: torch.full_like(v, float("nan")) for k, v in s.items()})
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'model.safetensors'} holds non-finite weights: .*\(\d+ NaN, 0"):
        load_model(ckpt)
    assert "non-finite weights" in error_line(capsys, "generate", run_dir, "--prompt", "a", "--greedy")
    assert "non-finite weights" in error_line(capsys, "eval", run_dir, "--max-batches", "1")
    assert "non-finite weights" in error_line(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")


def test_one_infinite_value_is_named(run_dir):
    ckpt = last(run_dir)

    def poison(state):
        name = sorted(state)[0]
        state[name].view(-1)[0] = float("inf")
        return state

    rewrite_weights(ckpt, poison)
    with pytest.raises(CheckpointError, match=r"non-finite weights: \S+ \(0 NaN, 1 inf of \d+\)"):
        load_model(ckpt)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_weights_for_float_parameters_are_refused(run_dir, capsys, dtype):
    ckpt = last(run_dir)
    rewrite_weights(ckpt, lambda s: {k: v.to(dtype) for k, v in s.items()})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"integer or bool tensors for floating-point ones: \S+: checkpoint {name} vs"):
        load_model(ckpt)
    assert f"checkpoint {name} vs model float32" in error_line(capsys, "eval", run_dir, "--max-batches", "1")


def test_float64_weights_load_as_float64_exactly_and_resume_refuses_them(run_dir, capsys):
    ckpt = last(run_dir)
    f32 = load_model(ckpt)
    rewrite_weights(ckpt, lambda s: {k: v.double() for k, v in s.items()})
    f64 = load_model(ckpt)
    assert {p.dtype for p in f64.parameters()} == {torch.float64}  # kept as stored, not rounded to float32
    for (k, a), (_, b) in zip(f32.state_dict().items(), f64.state_dict().items()):
        assert torch.equal(a.double(), b), k
    ids = torch.randint(0, f32.config.vocab_size, (2, 12))
    with torch.no_grad():  # the same weights in float64: logits agree to float32's rounding
        torch.testing.assert_close(f64(ids), f32(ids).double(), rtol=1e-4, atol=1e-4)
    rewrite_weights(ckpt, lambda s: {k: v.double() if i == 0 else v.float() for i, (k, v) in enumerate(sorted(s.items()))})
    with pytest.raises(CheckpointError, match="mixes floating-point dtypes"):
        load_model(ckpt)
    rewrite_weights(ckpt, lambda s: {k: v.double() for k, v in s.items()})
    assert "stores tensors in another dtype than the model's" in error_line(capsys, "train", run_dir, "--resume",
                                                                              "--set", "train.steps=6")  # fmt: skip


# -- 2, 8. the config.json of a checkpoint -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: {**c, "d_model": -5}, "d_model=-5 must be > 0"),
        (lambda c: {**c, "d_model": 2477280, "n_heads": 1}, "needs"),
        (lambda c: {**c, "eps": 0}, "eps=0 must be finite and > 0"),
    ],
)
def test_errors_from_a_checkpoints_config_name_the_file(run_dir, capsys, change, words):
    ckpt = last(run_dir)
    edit_json(ckpt / "config.json", change)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert str(e.value).startswith(str(ckpt / "config.json")) and words in str(e.value)
    assert str(ckpt / "config.json") in error_line(capsys, "eval", run_dir, "--max-batches", "1")


def test_resume_reads_the_checkpoints_config_and_refuses_another_model(run_dir, capsys):
    ckpt = last(run_dir)
    edit_json(ckpt / "config.json", lambda c: {**c, "dropout": 0.25})
    line = error_line(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")
    assert f"{ckpt / 'config.json'} does not hold this run's model: dropout=0.25 (this run: 0.0)" in line


# -- 9. checkpoint folders are complete or absent; a finished run says so ------------------------------------------


def test_a_half_deleted_checkpoint_is_ignored_and_cleaned(run_dir, capsys):
    root = run_dir / "checkpoints"
    partial = root / "step-00000003"
    partial.mkdir()
    shutil.copy(last(run_dir) / "config.json", partial)
    shutil.copy(last(run_dir) / "rng.safetensors", partial)
    (root / "step-00000009").mkdir()  # even the highest step: without its files it is not a checkpoint
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    assert open_run(run_dir).checkpoint.name == "step-00000004"
    code, _, err = run(capsys, "train", run_dir, "--resume", "--set", "train.steps=6")
    assert code == 0, err
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]


def test_pruning_renames_before_deleting(run_dir, monkeypatch):
    root = run_dir / "checkpoints"

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt  # the process dies after the rename, inside the deletion

    monkeypatch.setattr("archlab.train.checkpoint.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(root, 1)
    names = sorted(p.name for p in root.iterdir())
    assert names[0].startswith(".step-00000002.old-") and names[1:] == ["step-00000004"]  # hidden, not half-visible
    monkeypatch.undo()
    assert [p.name for p in remove_temporaries(root)] == names[:1]
    assert [p.name for p in root.iterdir()] == ["step-00000004"]


def test_resuming_a_finished_run_says_it_is_complete(run_dir, capsys):
    records = read_metrics(run_dir / "metrics.jsonl")
    final = {k: v for k, v in records["eval"][-1].items() if k not in ("split", "step")}
    code, out, err = run(capsys, "train", run_dir, "--resume")
    assert code == 0, err
    assert f"{run_dir} is already complete: its checkpoint is at train.steps=4, nothing to train" in out
    assert f"step 4: validation loss {final['loss']:.4f}" in out
    code, out, err = run(capsys, "train", run_dir, "--resume", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["already_complete"] and summary["step"] == 4
    assert summary["eval"] == final and summary["train"]["loss"] == records["train"][-1]["loss"]
    assert summary["checkpoint"].endswith("step-00000004")


def test_eval_without_the_runs_trained_tokenizer_is_refused_not_retrained(run_dir, capsys, monkeypatch):
    """A run's BPE tokenizer deleted: eval trained a new one on the data and reported on its ids (generate refused)."""
    import archlab.train.sources

    (run_dir / "tokenizer.json").unlink()
    monkeypatch.setattr(archlab.train.sources, "train_bpe", lambda *a, **k: pytest.fail("trained a tokenizer"))
    line = error_line(capsys, "eval", run_dir, "--max-batches", "1")
    assert line == (f"archlab: error: no tokenizer.json in {last(run_dir)} or its run folder: eval reads the validation "
                    "text with the bpe tokenizer the run trained, and one trained again could give other ids")
