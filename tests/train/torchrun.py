"""Run a worker script under ``torchrun --standalone`` with N CPU (gloo) processes, for the distributed tests."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_ranks(worker: str, out: Path, ranks: int, *, timeout: float = 300) -> Path:
    """Run ``tests/train/<worker>`` on ``ranks`` processes (one thread each) with ``out`` as its argument; fail with
    its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE)])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(HERE / worker),
           str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def run_two_ranks(worker: str, out: Path) -> Path:
    """:func:`run_ranks` with 2 processes."""
    return run_ranks(worker, out, 2)
