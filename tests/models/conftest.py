"""The model tests share a few training helpers from ``training.py`` next to this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
