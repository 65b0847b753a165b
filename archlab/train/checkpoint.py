"""Training checkpoints: everything needed to continue a run exactly, written atomically, never pickled.

One checkpoint is one folder ``<run>/checkpoints/step-00001000/``::

    config.json, model.safetensors   the model, as archlab.interop.io.save_model writes it (load_model reads it)
    optimizer.safetensors            the optimiser's tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
    rng.safetensors                  torch (and CUDA) generator states, per rank
    trainer_state.json               step, TrainConfig, scheduler, the optimiser's other values (param groups),
                                     per rank: the batch source's position and the Python / NumPy RNG states

The folder is written under a hidden temporary name and renamed into place once complete
(:func:`archlab.interop.io.atomic_dir`), so a kill at any moment leaves the previous checkpoints whole and
no partial folder that :func:`latest_checkpoint` would pick. Loading reads safetensors and JSON only:
an untrusted checkpoint cannot run code.

Optimiser state dicts are flattened as ``{"state": {key: {name: value}}, "param_groups": [...]}`` ->
tensors named ``"<i>/<name>"`` (``i`` = position of ``key`` in the stored key list; keys are parameter
indices or names) + JSON for the rest; tuples (``betas``) come back as tuples.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from archlab.errors import CheckpointError
from archlab.interop.io import CONFIG_FILE, WEIGHTS_FILE, atomic_dir, read_json, read_safetensors, write_model

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT = "archlab-training-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMPORARY = re.compile(r"^\.step-\d+\.(tmp|old)-")


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """``root/step-<step, 8 digits>``."""
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (hidden temporaries are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint of the highest step under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted folders."""
    old = list_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def remove_temporaries(root: str | Path) -> list[Path]:
    """Delete hidden half-written folders a killed run left under ``root`` (call before a run starts)."""
    root = Path(root)
    stale = [p for p in root.iterdir() if _TEMPORARY.match(p.name)] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# -- optimiser state: tensors to safetensors, the rest to JSON -----------------------------------------


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> ``(tensors, json_part)``; :func:`unflatten_optimizer_state` inverts it."""
    keys = list(state["state"])
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(keys):
        for name, value in state["state"][key].items():
            if isinstance(value, Tensor):
                tensors[f"{i}/{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(i), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": groups}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    try:
        keys = meta["keys"]
        state: dict[Any, dict[str, Any]] = {key: dict(meta["scalars"].get(str(i), {})) for i, key in enumerate(keys)}
        for name, value in tensors.items():
            index, _, field = name.partition("/")
            state[keys[int(index)]][field] = value
        groups = [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in meta["param_groups"]
        ]
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the optimizer state in the checkpoint is malformed ({type(e).__name__}: {e})") from None
    return {"state": state, "param_groups": groups}


# -- random number generators ---------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """This process's RNG states: ``(JSON part: python, numpy; tensors: torch CPU and each CUDA device)``."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(mt), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return json_part, tensors


def restore_rng(json_part: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, mt, gauss = json_part["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# -- write and read ---------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    rng_tensors: dict[str, Tensor],
) -> Path:
    """Write one checkpoint folder atomically.

    Args:
        model: an unwrapped archlab model (``model.config``), as :func:`archlab.interop.io.save_model` takes.
        optimizer_state: ``optimizer.state_dict()`` (or a full state dict from ``torch.distributed.checkpoint``).
        state: the JSON-able rest (step, config, scheduler, per-rank data and RNG states); must hold ``step``.
        rng_tensors: generator states by name (e.g. ``"rank0/torch"``).
    """
    path = Path(path)
    tensors, optimizer_meta = flatten_optimizer_state(optimizer_state)
    with atomic_dir(path) as tmp:
        write_model(model, tmp)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE), metadata={"format": "pt"})
        # written last: list_checkpoints() only counts folders holding it
        (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, **state, "optimizer": optimizer_meta}, indent=1) + "\n")
    return path


@dataclass
class Checkpoint:
    """A checkpoint read back: ``state`` (trainer_state.json), the optimiser ``state_dict`` and RNG tensors."""

    path: Path
    state: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def weights(self) -> dict[str, Tensor]:
        """The model's tensors (tied parameters stored once, under one of their names)."""
        return read_safetensors(self.path / WEIGHTS_FILE)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a folder written by :func:`save_checkpoint`; a missing, foreign or corrupt one raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    state = read_json(path / STATE_FILE)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE_FILE} has format {state.get('format')!r}, expected {FORMAT!r}")
    for key in ("step", "optimizer", "train_config", "scheduler", "ranks"):
        if key not in state:
            raise CheckpointError(f"{path / STATE_FILE} lacks {key!r}")
    optimizer = unflatten_optimizer_state(read_safetensors(path / OPTIMIZER_FILE), state.pop("optimizer"))
    return Checkpoint(path, state, optimizer, read_safetensors(path / RNG_FILE))
