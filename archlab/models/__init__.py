"""Model families, one file each; importing this package registers them all (every module but the registry)."""

import importlib
import pkgutil

from archlab.models.registry import build_model, get_config, get_preset, list_presets

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["build_model", "get_config", "get_preset", "list_presets"]
