"""The report tests' lab result folders (tests/report/lab_results.py), written once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from lab_results import write_labs  # noqa: E402


@pytest.fixture(scope="session")
def labs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("labs")
    write_labs(root)
    return root
