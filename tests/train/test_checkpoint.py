"""Training checkpoints: exact round trips, atomic writes (a write killed midway leaves the last one whole),
keep-last-k, and clear errors for missing or foreign folders."""

import json
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
