"""Suite-wide settings.

Most tests run tiny tensors, for which one intra-op thread is fastest and avoids OpenMP threads
spinning against each other on a busy 2-core runner. Tests that time nothing are unaffected in
what they check. Nothing here touches the network: HF models are built from configs.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
