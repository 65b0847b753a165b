"""The training tests import their fake batch sources from ``train_fakes.py`` next to this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
