"""Training checkpoints: everything needed to continue a run exactly, written atomically, never pickled.

One checkpoint is one folder ``<run>/checkpoints/step-00001000/``::

    config.json, model.safetensors   the model, as archlab.interop.io.save_model writes it (load_model reads it)
    optimizer.safetensors            the optimiser's tensors (AdamW: step, exp_avg, exp_avg_sq per parameter)
    rng.safetensors                  torch (and CUDA) generator states, per rank
    trainer_state.json               step, TrainConfig, scheduler, the optimiser's other values (param groups),
                                     per rank: the batch source's position and the Python / NumPy RNG states

The folder is written under a hidden temporary name and renamed into place once complete
(:func:`archlab.interop.io.atomic_dir`), and deleted (pruning) by renaming it to a hidden name first, so a
checkpoint folder is complete or absent: a kill at any moment leaves the previous checkpoints whole and no
partial folder that :func:`latest_checkpoint` would pick (hidden leftovers, and any ``step-*`` folder
lacking a file, are cleared by :func:`remove_temporaries` when a run starts). Loading reads safetensors and
JSON only, and checks every value a resume uses (:func:`check_state`): an untrusted checkpoint cannot run
code, nor fail halfway through a resume.

Optimiser state dicts are flattened as ``{"state": {key: {name: value}}, "param_groups": [...]}`` ->
tensors named ``"<i>/<name>"`` (``i`` = position of ``key`` in the stored key list; keys are parameter
indices or names) + JSON for the rest; tuples (``betas``) come back as tuples.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_dir,
    check_not_under_file,
    read_config,
    read_json,
    read_safetensors,
    write_model,
)
from archlab.train.config import TrainConfig

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT = "archlab-training-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMPORARY = re.compile(r"^\.step-\d+\.(tmp|old)-")
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """``root/step-<step, 8 digits>``."""
    return Path(root) / f"step-{step:08d}"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-*`` folder under ``root``, complete or not, by step."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))


def is_complete(path: Path) -> bool:
    """Whether the folder holds every file of a checkpoint."""
    return all((path / f).is_file() for f in CHECKPOINT_FILES)


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (hidden temporaries and incomplete folders are
    not listed)."""
    return [p for _, p in step_dirs(Path(root)) if is_complete(p)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint of the highest step under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder all at once: renamed to a hidden ``.step-*.old-<pid>`` first (atomic), then
    removed, so a kill midway leaves a hidden folder :func:`remove_temporaries` clears, never a visible
    half-deleted checkpoint."""
    hidden = path.with_name(f".{path.name}.old-{os.getpid()}")
    if hidden.exists():  # left by a killed deletion in a process that had our pid
        shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    _pause_for_tests("prune")
    shutil.rmtree(hidden, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted folders."""
    old = list_checkpoints(root)[:-keep_last] if keep_last > 0 else []
    for path in old:
        remove_checkpoint(path)
    return old


def remove_temporaries(root: str | Path) -> list[Path]:
    """Delete what a killed run can leave under ``root`` (call before a run starts): hidden half-written or
    half-deleted folders, and visible ``step-*`` folders that lack a checkpoint file (left by archlab before
    deletions were atomic, or damaged by hand): none of them can be resumed from."""
    root = Path(root)
    stale = [p for p in root.iterdir() if _TEMPORARY.match(p.name)] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    incomplete = [p for _, p in step_dirs(root) if not is_complete(p)]
    for path in incomplete:
        remove_checkpoint(path)
    return stale + incomplete


def check_writable_folder(path: str | Path, setting: str) -> None:
    """ConfigError naming ``setting`` unless ``path`` is a folder this process may write in, or one it may create
    (its nearest existing parent is such a folder). Nothing is created: call it before any work."""
    path = Path(path)
    check_not_under_file(path, setting, "a folder (new or existing)")
    for part in (path, *path.parents):
        if not part.exists():
            continue
        if not os.access(part, os.W_OK | os.X_OK):
            where = "" if part == path else f" ({str(part)!r} is not)"
            raise ConfigError(f"{setting} {str(path)!r} is not writable{where}: a read-only file system or no "
                              f"permission; choose another {setting}")  # fmt: skip
        return


def _pause_for_tests(moment: str) -> None:
    """Sleep ``ARCHLAB_TEST_PAUSE`` seconds at ``moment`` ("write": between a checkpoint's files, "prune":
    inside a deletion) when that variable is set: the kill test (tests/train/test_kill_resume.py) uses it
    to land SIGKILLs inside those windows. Unset, as always outside that test, it costs one lookup."""
    pause = os.environ.get("ARCHLAB_TEST_PAUSE")
    if pause:
        time.sleep(float(pause))


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


def unflatten_optimizer_state(
    tensors: dict[str, Tensor], meta: dict[str, Any], where: str = "the checkpoint"
) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; CheckpointError naming ``where`` for a malformed state."""
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
        raise CheckpointError(f"the optimizer state in {where} is malformed ({type(e).__name__}: {e})") from None
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
        _pause_for_tests("write")
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / RNG_FILE), metadata={"format": "pt"})
        # written last: list_checkpoints() only counts folders holding it
        (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, **state, "optimizer": optimizer_meta}, indent=1) + "\n")
    return path


def check_model_config(path: Path, config: Any) -> None:
    """CheckpointError unless the checkpoint's ``config.json`` is ``config`` (the run's model), naming the
    file and each field that differs."""
    saved = read_config(path)
    if saved != config:
        theirs, ours = saved.to_dict(), config.to_dict() if hasattr(config, "to_dict") else {}
        changed = [f"{k}={v!r} (this run: {ours.get(k)!r})" for k, v in theirs.items() if v != ours.get(k)]
        what = "; ".join(changed) or f"a {type(saved).__name__}, the run has a {type(config).__name__}"
        raise CheckpointError(f"{path / CONFIG_FILE} does not hold this run's model: {what}")


def check_like(template: Any, value: Any, where: str) -> None:
    """CheckpointError unless ``value`` (read from JSON) has the structure of ``template`` (what this run's
    own object gives): the same keys, list lengths and kinds of values (a float slot takes an integer; JSON's
    NaN and Infinity only where the template is not finite either), so that a ``load_state_dict`` taking it
    cannot fail midway or take a string for a number."""

    def fail(path: str, got: Any, allowed: str) -> None:
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        raise CheckpointError(f"{where}{path}={shown} must be {allowed}")

    def walk(t: Any, v: Any, path: str) -> None:
        if isinstance(t, dict):
            if not isinstance(v, dict) or set(map(str, t)) != set(v):
                fail(path, v, f"an object with the keys {sorted(map(str, t))}")
            for k in t:
                walk(t[k], v[str(k)], f"{path}.{k}")
        elif isinstance(t, list | tuple):
            if not isinstance(v, list | tuple) or len(v) != len(t):
                fail(path, v, f"a list of {len(t)} entries")
            for i, (a, b) in enumerate(zip(t, v)):
                walk(a, b, f"{path}[{i}]")
        elif isinstance(t, bool) or t is None or isinstance(t, str):
            if type(v) is not type(t):
                fail(path, v, {bool: "true or false", str: "a string"}.get(type(t), "null"))
        elif isinstance(t, int | float):
            if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(t, int) and not isinstance(v, int)):
                fail(path, v, "an integer" if isinstance(t, int) else "a number")
            if isinstance(v, float) and not math.isfinite(v) and not (isinstance(t, float) and not math.isfinite(t)):
                fail(path, v, "a finite number")

    walk(template, value, "")


#: AdamW's state of a parameter once it has taken a step (``amsgrad`` adds ``max_exp_avg_sq``).
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")
#: The values of an optimiser param group that shape the update (``fused``, ``foreach``, ...: only how it runs).
GROUP_VALUES = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "initial_lr")
#: The scheduler's counters, which move with the step; the rest of its state is the schedule itself.
_SCHEDULER_COUNTERS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial")


def check_optimizer_state(
    stored: dict[str, Any], groups: list[dict[str, Any]], names: list[list[set[str]]], shapes: dict[str, Tensor],
    step: int, path: Path,
) -> None:  # fmt: skip
    """CheckpointError, before a resume loads anything, unless the optimiser state read from checkpoint ``path``
    (:func:`unflatten_optimizer_state`'s dict, keyed by parameter name) is this run's at ``step``.

    ``groups``: this run's param groups at ``step`` (:data:`GROUP_VALUES`, ``lr`` as the schedule sets it);
    ``names``: per group, per parameter, the names it goes by (a tied one has several); ``shapes``: the model's
    tensors by name. Each parameter's state is AdamW's (:data:`ADAMW_STATE`): finite moments of the parameter's
    shape (torch's fused AdamW reads any other shape out of bounds) and ``step`` in ``[0, step]``; a parameter
    may have none (no gradient yet), but a checkpoint past step 0 holds some."""
    where, tensors = path / STATE_FILE, path / OPTIMIZER_FILE

    def fail(file: Path, what: str, allowed: str) -> None:
        raise CheckpointError(f"{file}: {what} must be {allowed}")

    for i, (ours, theirs) in enumerate(zip(groups, stored["param_groups"])):
        params = theirs.get("params")
        if not isinstance(params, list) or len(params) != len(names[i]):
            fail(where, f"optimizer.param_groups[{i}].params={params!r:.80}", f"a list of {len(names[i])} names")
        for j, (name, aliases) in enumerate(zip(params, names[i])):
            if name not in aliases:
                fail(where, f"optimizer.param_groups[{i}].params[{j}]={name!r}", f"this run's {sorted(aliases)[0]!r}")
        for key in GROUP_VALUES:
            if key not in ours:
                continue
            same = math.isclose(theirs[key], ours[key], rel_tol=1e-9) if key == "lr" else theirs[key] == ours[key]
            if not same:
                fail(where, f"optimizer.param_groups[{i}].{key}={theirs[key]!r}",
                     f"{ours[key]!r} (this run's at step {step})")  # fmt: skip
    state = stored["state"]
    if step > 0 and not state:
        fail(tensors, f"the optimizer state at step {step} is empty", "AdamW's moments of the trained parameters")
    keys = set(ADAMW_STATE) | ({"max_exp_avg_sq"} if groups and groups[0].get("amsgrad") else set())
    for name, entry in state.items():
        if name not in shapes:
            fail(tensors, f"the state of {name!r}", "of a parameter of this model")
        if set(entry) != keys:
            fail(tensors, f"the state of {name!r}={sorted(entry)}", f"AdamW's {sorted(keys)}")
        count = entry["step"]
        if not (isinstance(count, Tensor) and count.numel() == 1 and 0 <= float(count) <= step):
            shown = f"{count.dtype} {tuple(count.shape)}" if isinstance(count, Tensor) else repr(count)
            shown = float(count) if isinstance(count, Tensor) and count.numel() == 1 else shown
            fail(tensors, f"{name}: step={shown}", f"one number in [0, {step}] (the checkpoint's step)")
        for key in sorted(keys - {"step"}):
            t, want = entry[key], tuple(shapes[name].shape)
            if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != want:
                shown = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                fail(tensors, f"{name}: {key}={shown}", f"a floating-point tensor of the parameter's shape {want}")
            if not bool(torch.isfinite(t).all()) or (key != "exp_avg" and bool((t < 0).any())):
                fail(tensors, f"{name}: {key}", "finite" + (" and >= 0" if key != "exp_avg" else ""))


def check_scheduler_state(stored: dict[str, Any], ours: dict[str, Any], step: int, path: Path) -> None:
    """CheckpointError unless the scheduler state read from checkpoint ``path`` is this run's schedule (base rates,
    the schedule's fields) with ``last_epoch`` (the steps taken) at the checkpoint's ``step``."""
    where = path / STATE_FILE
    if stored.get("last_epoch") != step:
        raise CheckpointError(f"{where}: scheduler.last_epoch={stored.get('last_epoch')!r} must be {step}, the step")
    for key, value in ours.items():
        if key not in _SCHEDULER_COUNTERS and stored.get(key) != value:
            raise CheckpointError(f"{where}: scheduler.{key}={stored.get(key)!r:.80} must be {value!r:.80} (this "
                                  "run's schedule)")  # fmt: skip


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
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    state = read_json(path / STATE_FILE)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE_FILE} has format {state.get('format')!r}, expected {FORMAT!r}")
    for key in ("step", "optimizer", "train_config", "scheduler", "ranks"):
        if key not in state:
            raise CheckpointError(f"{path / STATE_FILE} lacks {key!r}")
    rng = read_safetensors(path / RNG_FILE)
    check_state(state, rng, path)
    optimizer = unflatten_optimizer_state(read_safetensors(path / OPTIMIZER_FILE), state.pop("optimizer"),
                                          f"{path / OPTIMIZER_FILE} and {path / STATE_FILE}")  # fmt: skip
    return Checkpoint(path, state, optimizer, rng)


def check_state(state: dict[str, Any], rng: dict[str, Tensor], path: Path) -> None:
    """CheckpointError naming ``trainer_state.json``, the key and the value of anything a resume could not
    use: ``step`` and ``world_size`` (integers), ``train_config`` (a valid TrainConfig), ``scheduler`` (an
    object), one ``ranks`` entry per process with its ``batches_seen`` and RNG states. Each RNG state is
    tried on a throwaway generator (Python, NumPy, torch), so a malformed one is refused here, before the
    resume changes anything."""
    where = path / STATE_FILE

    def bad(key: str, value: Any, allowed: str) -> CheckpointError:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return CheckpointError(f"{where}: {key}={shown} must be {allowed}")

    def count(key: str, value: Any, least: int) -> None:
        if type(value) is not int or value < least:
            raise bad(key, value, f"an integer >= {least}")

    count("step", state["step"], 0)
    count("world_size", state.get("world_size", 1), 1)
    if not isinstance(state["train_config"], dict):
        raise bad("train_config", state["train_config"], "an object (the run's TrainConfig)")
    try:
        TrainConfig.from_dict(state["train_config"])
    except ConfigError as e:
        raise CheckpointError(f"{where}: train_config: {e}") from None
    if not isinstance(state["scheduler"], dict):
        raise bad("scheduler", state["scheduler"], "an object (the scheduler's state_dict)")
    ranks, world = state["ranks"], state.get("world_size", 1)
    if not isinstance(ranks, list) or len(ranks) != world:
        raise bad("ranks", ranks, f"a list of {world} entries (one per process)")
    for r, entry in enumerate(ranks):
        if not isinstance(entry, dict) or not {"data", "batches_seen", "rng"} <= set(entry):
            raise bad(f"ranks[{r}]", entry, "an object with data, batches_seen and rng")
        count(f"ranks[{r}].batches_seen", entry["batches_seen"], 0)
        rng_json = entry["rng"]
        try:
            version, mt, gauss = rng_json["python"]
            random.Random().setstate((version, tuple(mt), gauss))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError):
            raise bad(f"ranks[{r}].rng.python", rng_json.get("python") if isinstance(rng_json, dict) else rng_json,
                      "a Python random state [version, 625 integers, gauss]") from None  # fmt: skip
        try:
            name, keys, pos, has_gauss, cached = rng_json["numpy"]
            np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError):
            raise bad(f"ranks[{r}].rng.numpy", rng_json.get("numpy"),
                      "a NumPy random state [name, 624 integers, pos, has_gauss, cached]") from None  # fmt: skip
        tensor = rng.get(f"rank{r}/torch")
        try:
            torch.Generator().set_state(tensor)
        except (TypeError, RuntimeError):
            shown = None if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
            raise CheckpointError(f"{path / RNG_FILE}: rank{r}/torch={shown} must be a torch CPU generator "
                                  "state (uint8)") from None  # fmt: skip
