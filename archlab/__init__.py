"""archlab: the neural-network architectures of the transformer era, written once, verified, fast."""

from archlab.errors import ArchlabError, CheckpointError, ConfigError, DataError, ShapeError

__version__ = "0.1.0"
__all__ = ["ArchlabError", "CheckpointError", "ConfigError", "DataError", "ShapeError", "__version__"]
