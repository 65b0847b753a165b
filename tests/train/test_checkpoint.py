"""Training checkpoints: exact round trips, atomic writes (a write killed midway leaves the last one whole),
keep-last-k, and clear errors for missing or foreign folders."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import archlab.train.checkpoint as ckpt_mod
from archlab.errors import CheckpointError
from archlab.interop.io import load_model
from archlab.models.registry import build_model
from archlab.train.checkpoint import (
    capture_rng,
    checkpoint_dir,
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_temporaries,
    restore_rng,
    save_checkpoint,
    unflatten_optimizer_state,
)

REPO = Path(__file__).resolve().parents[2]


def trained_optimizer():
    torch.manual_seed(0)
    model = build_model("gpt-nano")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    ids = torch.randint(0, 256, (2, 8))
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    return model, opt


def write(root, step, model, opt):
    rank0 = {"data": None, "batches_seen": 0, "rng": capture_rng()[0]}
    return save_checkpoint(
        checkpoint_dir(root, step), model=model, optimizer_state=opt.state_dict(),
        state={"step": step, "world_size": 1, "train_config": {}, "scheduler": {}, "ranks": [rank0]},
        rng_tensors={"rank0/torch": torch.get_rng_state()},
    )  # fmt: skip


def assert_same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, v in a["state"][k].items():
            assert torch.equal(v, b["state"][k][name]) if torch.is_tensor(v) else v == b["state"][k][name]


def test_optimizer_state_flattens_to_tensors_plus_json_and_back_exactly():
    _, opt = trained_optimizer()
    state = opt.state_dict()
    tensors, meta = flatten_optimizer_state(state)
    assert all(torch.is_tensor(t) for t in tensors.values())
    meta = json.loads(json.dumps(meta))  # the JSON part really is JSON
    back = unflatten_optimizer_state(tensors, meta)
    assert_same_optimizer_state(back, state)
    assert back["param_groups"][0]["betas"] == (0.9, 0.98)  # a tuple again
    # named keys (torch.distributed.checkpoint's full state dicts) work the same way
    named = {"state": {"a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"params": ["a.weight"], "lr": 0.1}]}
    assert_same_optimizer_state(unflatten_optimizer_state(*flatten_optimizer_state(named)), named)


def test_save_then_load_gives_everything_back(tmp_path):
    model, opt = trained_optimizer()
    path = write(tmp_path, 5, model, opt)
    ck = load_checkpoint(path)
    assert ck.step == 5 and ck.path == path
    assert_same_optimizer_state(ck.optimizer, opt.state_dict())
    assert torch.equal(ck.rng["rank0/torch"], torch.get_rng_state())
    again = load_model(path)  # the folder is also a plain archlab model folder
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert len({"lm_head.weight", "tok_emb.weight"} & set(ck.weights())) == 1  # the tied head is stored once


def test_rng_capture_and_restore():
    import random

    import numpy as np

    json_part, tensors = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(json.loads(json.dumps(json_part)), tensors)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained_optimizer()
    good = write(tmp_path, 1, model, opt)

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, 2, model, opt)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == [good.name]  # no partial folder, hidden or not
    assert load_checkpoint(good).step == 1


def test_a_process_killed_during_the_write_leaves_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch
        import archlab.train.checkpoint as c
        from archlab.models.registry import build_model
        model = build_model("gpt-nano")
        opt = torch.optim.AdamW(model.parameters())
        rank0 = {{"data": None, "batches_seen": 0, "rng": c.capture_rng()[0]}}
        kw = dict(model=model, optimizer_state=opt.state_dict(), rng_tensors={{"rank0/torch": torch.get_rng_state()}},
                  state={{"step": 1, "world_size": 1, "train_config": {{}}, "scheduler": {{}}, "ranks": [rank0]}})
        c.save_checkpoint(c.checkpoint_dir({str(tmp_path)!r}, 1), **kw)
        real = c.write_model
        def write_then_die(m, folder):
            real(m, folder)
            os._exit(9)  # killed after the weights, before the optimizer and the state file
        c.write_model = write_then_die
        c.save_checkpoint(c.checkpoint_dir({str(tmp_path)!r}, 2), **{{**kw, "state": {{**kw["state"], "step": 2}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step-00000002.tmp-")  # the half-written one, hidden
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 1)
    assert load_checkpoint(checkpoint_dir(tmp_path, 1)).step == 1
    assert [p.name for p in remove_temporaries(tmp_path)] == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_keep_last_k(tmp_path):
    model, opt = trained_optimizer()
    for step in (3, 10, 7, 12):
        write(tmp_path, step, model, opt)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000007", "step-00000010", "step-00000012"]
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step-00000003", "step-00000007"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000012"]
    assert latest_checkpoint(tmp_path).name == "step-00000012"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_missing_or_foreign_checkpoints_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_checkpoint(tmp_path / "nope")
    model, opt = trained_optimizer()
    path = write(tmp_path, 1, model, opt)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.safetensors"):
        load_checkpoint(path)
    path = write(tmp_path, 2, model, opt)
    (path / "optimizer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    path = write(tmp_path, 3, model, opt)
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        load_checkpoint(path)
    (path / "trainer_state.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


# -- a resume checks the optimiser and scheduler state against this run before it loads anything -----------------


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A 2-step gpt-nano run (constant schedule: a resume may raise ``steps``) with its checkpoint at step 2."""
    from train_fakes import LMSource

    from archlab.train import Trainer

    out = tmp_path_factory.mktemp("resume") / "run"
    Trainer(_nano(), _resumable(2), LMSource(batch_size=4), out_dir=out).fit()
    return out


def _nano():
    torch.manual_seed(0)
    return build_model("gpt-nano", max_len=32)


def _resumable(steps):
    from archlab.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=4, schedule="constant", warmup=0, eval_every=0, ckpt_every=0,
                       precision="fp32", progress=False, tensorboard=False)  # fmt: skip


def _edit_tensors(file, change):
    from safetensors.torch import load_file, save_file

    save_file(change(load_file(str(file))), str(file))


def _edit_state(file, change):
    file.write_text(json.dumps(change(json.loads(file.read_text()))))


def _optimizer(change):
    return lambda s: {**s, "optimizer": change(s["optimizer"])}


def _groups(**values):
    return _optimizer(lambda o: {**o, "param_groups": [{**g, **values} for g in o["param_groups"]]})


FIRST = "decoder.blocks.0.attn.in_proj.weight"


@pytest.mark.parametrize(
    "file, change, words",
    [  # the moments of another shape: torch's fused AdamW read out of bounds (a segmentation fault)
        ("optimizer.safetensors", lambda t: {k: v[:1] if v.ndim else v for k, v in t.items()},
         f"{FIRST}: exp_avg=torch.float32 (1, 48) must be a floating-point tensor of the parameter's shape (144, 48)"),
        # no moments at all, or one missing: the run went on with fresh ones (not an exact resume)
        ("optimizer.safetensors", lambda t: {}, f"optimizer.safetensors: the state of '{FIRST}'=[] must be AdamW's"),
        ("optimizer.safetensors", lambda t: {k: v for k, v in t.items() if k != "0/exp_avg"},
         f"the state of '{FIRST}'=['exp_avg_sq', 'step'] must be AdamW's"),
        # NaN moments: the run stopped at step 3 blaming the lr
        ("optimizer.safetensors", lambda t: {k: v.fill_(float("nan")) if k.endswith("sq") else v for k, v in t.items()},
         f"{FIRST}: exp_avg_sq must be finite and >= 0"),
        # the parameter names shuffled: the moments went to other parameters (NaN at step 3) or a KeyError in torch
        ("trainer_state.json", _optimizer(lambda o: {**o, "keys": o["keys"][::-1]}),
         "optimizer.safetensors: decoder.final_norm.bias: exp_avg=torch.float32 (144, 48) must be"),
        ("trainer_state.json", _optimizer(lambda o: {**o, "keys": [0] * len(o["keys"])}),
         "the state of 0 must be of a parameter of this model"),
        ("trainer_state.json", _optimizer(lambda o: {**o, "param_groups": [{**g, "params": ["x", *g["params"][1:]]}
                                                                           for g in o["param_groups"]]}),
         f"optimizer.param_groups[0].params[0]='x' must be this run's '{FIRST}'"),
        # a learning rate that is not the schedule's: NaN went through (NaN loss at step 4), 10.0 silently
        ("trainer_state.json", _groups(lr=float("nan")),
         "trainer_state.json: optimizer.param_groups[0].lr=nan must be a finite number"),
        ("trainer_state.json", _groups(lr=10.0),
         "trainer_state.json: optimizer.param_groups[0].lr=10.0 must be 0.002 (this run's at step 2)"),
        # the scheduler: a ZeroDivisionError, or base rates of 1e9 taken silently
        ("trainer_state.json", lambda s: {**s, "scheduler": {**s["scheduler"], "last_epoch": -7}},
         "scheduler.last_epoch=-7 must be 2, the step"),
        ("trainer_state.json", lambda s: {**s, "scheduler": {**s["scheduler"], "base_lrs": [1e9, 1e9]}},
         "scheduler.base_lrs=[1000000000.0, 1000000000.0] must be [0.002, 0.002] (this run's schedule)"),
    ],
)  # fmt: skip
def test_a_damaged_optimizer_or_scheduler_state_is_refused_before_the_resume_loads_anything(
    two_steps, tmp_path, file, change, words
):
    from train_fakes import LMSource

    from archlab.train import Trainer

    run = shutil.copytree(two_steps, tmp_path / "run")
    ckpt = latest_checkpoint(run / "checkpoints")
    (_edit_tensors if file.endswith(".safetensors") else _edit_state)(ckpt / file, change)
    model = _nano()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, _resumable(4), LMSource(batch_size=4), out_dir=run)
    with pytest.raises(CheckpointError) as e:
        trainer.fit(resume=True)
    assert str(e.value).startswith(f"{ckpt}/") and words in str(e.value)  # the file (.safetensors or .json) named
    assert trainer.step == 0 and not trainer.optimizer.state  # nothing loaded, nothing trained
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002"]


def test_an_undamaged_checkpoint_still_resumes(two_steps, tmp_path):
    from train_fakes import LMSource

    from archlab.train import Trainer

    run = shutil.copytree(two_steps, tmp_path / "run")
    assert Trainer(_nano(), _resumable(3), LMSource(batch_size=4), out_dir=run).fit(resume=True).step == 3
