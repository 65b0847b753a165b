"""The interop tests import their GGUF writers from ``gguf_files.py`` next to this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
