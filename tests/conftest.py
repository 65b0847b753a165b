"""Suite-wide settings.

Most tests run tiny tensors, for which one intra-op thread is fastest and avoids OpenMP threads
spinning against each other on a busy 2-core runner. Tests that time nothing are unaffected in
what they check. Nothing here touches the network: HF models are built from configs.
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from archlab.hardware import describe_cpu, kernel_capability

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# torch.compile's on-disk cache (inductor) of its own for each test session: the machine-wide one
# (/tmp/torchinductor_<user>) is shared by runs under different kernel caps and code revisions, and
# with it the compiled-decoding tests aborted (native) or gave NaN logits (AVX2-capped), both passing
# with a fresh one (issue 14). Removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="archlab-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


KERNEL_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def pytest_sessionstart(session):
    """Say which CPU kernels this run uses (also under ``-q``), and stop if a requested cap did not take.

    ``make test-avx2`` caps ATen, oneDNN and MKL at AVX2 through KERNEL_CAP_VARIABLES; ATen reports the
    capability it dispatches to, so a cap that torch ignored (a typo, an unknown value) fails the run here
    instead of silently testing the native kernels twice.
    """
    capability = kernel_capability()
    caps = ", ".join(f"{name}={os.environ[name]}" for name in KERNEL_CAP_VARIABLES if name in os.environ)
    line = f"CPU: {describe_cpu()}; caps: {caps or 'none (native)'}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
    requested = os.environ.get("ATEN_CPU_CAPABILITY")
    if requested and requested.upper() != capability:
        pytest.exit(f"ATEN_CPU_CAPABILITY={requested} was not applied: torch dispatches to {capability}", returncode=4)
