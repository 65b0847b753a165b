"""Model families, one file each; importing this package registers them all."""

from archlab.models.registry import build_model, get_config, get_preset, list_presets

__all__ = ["build_model", "get_config", "get_preset", "list_presets"]
