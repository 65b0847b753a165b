"""Run a worker script under ``torchrun --standalone`` with 2 CPU (gloo) processes, for the distributed tests."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_two_ranks(worker: str, out: Path) -> Path:
    """Run ``tests/train/<worker>`` on 2 ranks with ``out`` as its argument; fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE)])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(HERE / worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out
