"""The kill campaign, kept (slow tier): ``archlab train`` SIGKILLed at 12 seeded moments (during checkpoint
writes, during pruning, and at random), resumed each time, finishes bit-identical to an uninterrupted run.

``ARCHLAB_TEST_PAUSE`` (honoured by archlab.train.checkpoint only when set) makes every checkpoint write
pause between its files and every pruning pause between its rename and its deletion, so the test can see
those windows open (a hidden ``.step-*.tmp-*`` or ``.step-*.old-*`` folder) and kill inside them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archlab.train.checkpoint import list_checkpoints
from archlab.train.logs import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS, KEEP = 40, 2
SETS = [
    "model.n_layers=1", "model.dropout=0.1", "data.source=stdlib", "data.tokenizer=byte", "data.max_bytes=50000",
    "data.seq_len=16", "train.batch_size=4", f"train.steps={STEPS}", "train.warmup=2", "train.ckpt_every=2",
    f"train.keep_last={KEEP}", "train.eval_every=4", "train.eval_batches=2", "train.progress=false",
]  # fmt: skip
PAUSE = 0.4  # seconds each write and each deletion stays open
KILLS = 12


def start(out: Path) -> subprocess.Popen:
    """``archlab train gpt-nano --out OUT --resume ...`` (the first start finds nothing to resume: step 0)."""
    argv = ["train", "gpt-nano", "--out", str(out), "--resume", *[a for s in SETS for a in ("--set", s)]]
    code = "import sys; from archlab.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "ARCHLAB_TEST_PAUSE": str(PAUSE), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def hidden(root: Path, kind: str) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".step-") and f".{kind}-" in p.name] if root.is_dir() else []


def kill_during(proc: subprocess.Popen, root: Path, kind: str, rng: random.Random, limit: float = 120.0) -> bool:
    """SIGKILL ``proc`` while a checkpoint is being written (``tmp``) or pruned (``old``), or at a random
    moment (``random``); False when the run ended first."""
    if kind == "random":
        deadline = time.monotonic() + rng.uniform(1.0, 8.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
    else:
        deadline = time.monotonic() + limit
        while not hidden(root, kind) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, PAUSE / 2))  # somewhere inside the open window
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[dict]]]:
    last = list_checkpoints(out / "checkpoints")[-1]
    assert last.name == f"step-{STEPS:08d}"
    tensors = {**load_file(str(last / "model.safetensors")), **{f"opt/{k}": v for k, v in
               load_file(str(last / "optimizer.safetensors")).items()}}  # fmt: skip
    return tensors, read_metrics(out / "metrics.jsonl")


def finish(out: Path) -> None:
    proc = start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]


def test_runs_killed_at_random_moments_finish_bit_identical(tmp_path):
    finish(tmp_path / "straight")
    rng = random.Random(20261202)
    kinds = ["tmp", "old", "random"] * (KILLS // 3)
    rng.shuffle(kinds)
    killed = tmp_path / "killed"
    landed = []
    for kind in kinds:
        root = killed / "checkpoints"
        if kill_during(start(killed), root, kind, rng):
            landed.append((kind, sorted(hidden(root, "tmp") + hidden(root, "old"))))
    finish(killed)  # the last resume runs to the end

    assert len(landed) >= 10, landed
    assert sum(1 for kind, seen in landed if kind == "tmp" and seen) >= 3, landed  # killed mid-write
    assert sum(1 for kind, seen in landed if kind == "old" and seen) >= 3, landed  # killed mid-pruning
    straight, resumed = final_state(tmp_path / "straight"), final_state(killed)
    assert straight[0].keys() == resumed[0].keys()
    assert all(torch.equal(straight[0][k], resumed[0][k]) for k in straight[0])  # weights and Adam moments
    for split, fields in (("train", ("loss", "lr", "grad_norm")), ("eval", ("loss", "accuracy"))):
        a, b = straight[1][split], resumed[1][split]
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [[r[f] for f in fields] for r in a] == [[r[f] for f in fields] for r in b], split
    root = killed / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in range(STEPS - 2 * (KEEP - 1), STEPS + 1, 2)]
