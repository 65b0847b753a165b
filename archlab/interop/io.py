"""Weights on disk: safetensors plus a JSON config. Nothing is ever unpickled.

* archlab's own folder: ``config.json`` (an archlab config, naming its class) + ``model.safetensors``;
  :func:`save_model` writes it atomically, :func:`load_model` rebuilds the model from it.
* Hugging Face folders: :func:`read_hf_folder` reads ``config.json`` and ``model.safetensors``
  (or a sharded ``model.safetensors.index.json``); :func:`write_hf_folder` writes one that
  ``from_pretrained`` loads. Family converters (``archlab.interop.gpt2`` etc.) map the keys.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model as _st_load_model, save_file, save_model as _st_save_model
from torch import Tensor, nn

from archlab.errors import CheckpointError, ConfigError
from archlab.nn.lora import adapt, lora_description
from archlab.quant import quantized_state, restore_quantized

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LORA_METADATA = "archlab_lora"  # safetensors metadata of a LoRA-adapted model: its adapters, as JSON
QUANT_METADATA = "archlab_quant"  # safetensors metadata of a quantized model: its quantized layers, as JSON
QUANT_FILE = "quantized.safetensors"  # beside WEIGHTS_FILE: those layers' integers and scales
PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt")


def atomic_dir(target: str | Path):
    """Context manager: yields a temporary sibling folder, renamed onto ``target`` only if the block succeeds.

    A kill at any moment leaves either the old ``target`` or the new one whole, never a half-written one.
    """
    return _AtomicDir(Path(target))


class _AtomicDir:
    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        umask = current_umask()  # mkdtemp makes the folder 0700 and safetensors its files 0600: give them
        os.chmod(self.tmp, 0o777 & ~umask)  # the modes of a plain mkdir / open (0755 / 0644 under umask 022)
        for f in self.tmp.rglob("*"):  # flush file contents before the rename makes them visible (subfolders too)
            if f.is_dir():
                os.chmod(f, 0o777 & ~umask)
                continue
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process's umask (os has no getter: set a common one for an instant and put the old one back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary sibling, flushed, then renamed over it (a kill leaves
    the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_not_under_file(path: Path, name: str, names: str, shown: str | None = None) -> None:
    """ConfigError when ``path``, or a folder above it, is a file: ``{name} {shown!r} is a file`` (or ``lies under
    ..., a file``) ``; {name} names {names}``. ``name``: the option or argument (``--out``, ``DST``); ``shown``: the
    path as the user wrote it (default ``str(path)``)."""
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == path else f"lies under {str(part)!r}, a file"
            raise ConfigError(f"{name} {shown if shown is not None else str(path)!r} {what}; {name} names {names}")


def as_float(value):
    """A JSON number (an int such as ``10000``) as a float; anything else (a string, a list) as it is, for the
    config's own type check to refuse naming its field (``float("abc")`` would raise a bare ValueError)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def id2label_count(hf: Mapping, source: str) -> int | None:
    """The classes a Hugging Face config's ``id2label`` names (``None`` without one); CheckpointError naming ``source``
    when it is not an object."""
    id2label = hf.get("id2label")
    if not id2label:
        return None
    if not isinstance(id2label, Mapping):
        raise CheckpointError(f"{source}: id2label={id2label!r} must be an object (class id -> label name)")
    return len(id2label)


def check_state_dict(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], source: str) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys, shape mismatches and integer (or bool)
    tensors stored for floating-point ones, if any; then :func:`check_finite` on the tensors ``got``."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    common = sorted(set(expected) & set(got))
    mismatched = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    # an int64 tensor copied into a float parameter is silently truncated weights: never a model's
    not_float = [
        f"{k}: checkpoint {_dtype(got[k])} vs model {_dtype(expected[k])}"
        for k in common
        if expected[k].is_floating_point() and not got[k].is_floating_point()
    ]
    if missing or unexpected or mismatched or not_float:
        parts = []
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched),
                    ("integer or bool tensors for floating-point ones", not_float))  # fmt: skip
        for title, items in problems:
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    check_finite(got, source)


def _dtype(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """CheckpointError naming the floating-point tensors of ``state`` that hold NaN or infinity (a model with
    them computes NaN, or samples garbage, from its first forward)."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            bad.append(f"{name} ({nan} NaN, {inf} inf of {tensor.numel()})")
    if bad:
        shown = ", ".join(bad[:12]) + (f", ... ({len(bad)} tensors in all)" if len(bad) > 12 else "")
        raise CheckpointError(f"{source} holds non-finite weights: {shown}")


def _require_folder(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected {CONFIG_FILE} and {WEIGHTS_FILE} inside)")


def read_json(path: Path) -> dict:
    """The JSON object (a dict) in ``path``; CheckpointError naming the file when it is missing, unreadable,
    not JSON, or JSON of another kind (a list, a number)."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise CheckpointError(f"{path} holds a JSON {kind}, expected an object ({{...}})")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index names; refuses pickle files."""
    single, index = folder / WEIGHTS_FILE, folder / f"{WEIGHTS_FILE}.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        state: dict[str, Tensor] = {}
        where: dict[str, str] = {}  # tensor -> the shard it was read from
        for shard in _shard_names(index):
            for name, tensor in read_safetensors(folder / shard).items():
                if name in where:  # two values for one weight: either would be a silent guess
                    raise CheckpointError(
                        f"{index}: tensor {name!r} is stored in two shards, {where[name]} and {shard}"
                    )
                where[name], state[name] = shard, tensor
        return state
    pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); archlab never unpickles files. "
            "Convert them to safetensors with a tool you trust."
        )
    raise CheckpointError(f"no {WEIGHTS_FILE} in {folder}")


def _shard_names(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names (its ``weight_map`` values), each a file name inside
    the index's folder; CheckpointError naming the index for anything else."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: weight_map={weight_map!r} must be a non-empty object (tensor name -> shard file)"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index}: weight_map[{name!r}]={shard!r} must be the name of a shard file in {index.parent} "
                "(no folders, no path outside it)"
            )
    return sorted(set(weight_map.values()))


def read_hf_folder(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(config dict, state dict)`` of a Hugging Face model folder, read without network or pickle."""
    folder = Path(path)
    _require_folder(folder)
    return read_json(folder / CONFIG_FILE), read_weights(folder)


def write_hf_folder(path: str | Path, config: dict, state: Mapping[str, Tensor]) -> None:
    """Write ``config.json`` + ``model.safetensors`` atomically (tensors made contiguous and unshared)."""
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})


def drop_tied_head(state: dict[str, Tensor], *, head: str, embedding: str, tied: bool, source: str) -> None:
    """A Hugging Face folder of a tied model may store the LM head ``head`` beside the token ``embedding``
    it equals: drop it from ``state`` (the model ties them again). A head that differs from the embedding
    of a config that ties them raises CheckpointError naming ``source`` and both keys."""
    if not tied or head not in state:
        return
    if embedding not in state or not torch.equal(state[head], state[embedding]):
        raise CheckpointError(
            f"{source}: {head} differs from {embedding}, but the config ties them (tie_word_embeddings=true)"
        )
    del state[head]


def save_model(model: nn.Module, path: str | Path) -> None:
    """archlab's folder: the model's config (``model.config``) as JSON + its weights as safetensors."""
    with atomic_dir(path) as tmp:
        write_model(model, tmp)


def write_model(model: nn.Module, folder: Path) -> None:
    """The files of :func:`save_model` written into an existing ``folder`` (not atomic by itself: for
    callers that write more files into one :func:`atomic_dir`, such as training checkpoints)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json"):
        raise CheckpointError(f"{type(model).__name__} has no archlab config (model.config) to save")
    (folder / CONFIG_FILE).write_text(config.to_json() + "\n")
    metadata = {"format": "pt", "archlab": "1", "archlab_model": type(model).__name__}
    adapters = lora_description(model)
    if adapters:  # LoRA-adapted: load_model adapts the model it builds alike before reading the weights
        metadata[LORA_METADATA] = json.dumps(adapters)
    quantized = quantized_state(model)
    if quantized is None:
        _st_save_model(model, str(folder / WEIGHTS_FILE), metadata=metadata)
        return
    # quantized (archlab.quant): the float rest as usual, the quantized layers' integers and scales in QUANT_FILE
    description, tensors = quantized
    metadata[QUANT_METADATA] = json.dumps(description)
    names = tuple(f"{entry['name']}." for entry in description["layers"])
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(names)}
    first: dict[tuple[int, tuple[int, ...]], str] = {}  # a tied tensor stored once, as safetensors' save_model does
    kept = {k: v.detach().contiguous().clone() for k, v in state.items()
            if first.setdefault((v.data_ptr(), tuple(v.shape)), k) == k or not v.numel()}  # fmt: skip
    save_file(kept, str(folder / WEIGHTS_FILE), metadata=metadata)
    save_file(tensors, str(folder / QUANT_FILE), metadata={"format": "pt", "archlab": "1"})


def read_config(folder: Path):
    """The archlab config in ``folder/config.json``; CheckpointError naming the file for anything wrong in it."""
    from archlab.models.registry import config_from_dict

    data = read_json(folder / CONFIG_FILE)
    if "class" not in data:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} is not an archlab config (no 'class' key); for a Hugging Face folder "
            "use the family converters or `archlab convert`"
        )
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model`. Missing, unexpected or misshapen tensors: CheckpointError."""
    from archlab.models.registry import build_model, check_fits_in_memory

    folder = Path(path)
    _require_folder(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        read_weights(folder)  # raises the precise error (pickle-only, or missing)
    try:
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
            model_class = metadata.get("archlab_model")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    try:  # a class of another family, or a size beyond memory
        check_fits_in_memory(config, model_class)
        model = build_model(config, model_class=model_class, init=False)  # every weight is loaded below
    except ConfigError as e:
        named = f" with the model class {model_class!r} that {weights.name}'s metadata names" if model_class else ""
        raise CheckpointError(f"{folder / CONFIG_FILE}{named}: {e}") from None
    if LORA_METADATA in metadata:
        _adapt_as_saved(model, metadata[LORA_METADATA], weights)
    state = read_safetensors(weights)
    quantized = _quantized_description(metadata, weights)
    names = tuple(f"{entry['name']}." for entry in quantized["layers"]) if quantized else ()
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(names)}
    # tied tensors are stored once; safetensors' load_model restores the ties
    tied = {k for k in expected if k not in state and any(expected[k] is expected[o] or
            expected[k].data_ptr() == expected[o].data_ptr() for o in state if o in expected)}
    check_state_dict({k: v for k, v in expected.items() if k not in tied}, state, str(weights))
    check_tied_copies_agree(expected, state, str(weights))
    keep_stored_float_dtypes(model, state, str(weights))
    if quantized:  # after the float dtype (the quantized layers keep their scales' own)
        restore_quantized(model, quantized, read_safetensors(folder / QUANT_FILE), str(folder / QUANT_FILE))
    _st_load_model(model, str(weights), strict=False, device=str(map_location))
    return model


def _quantized_description(metadata: Mapping[str, str], weights: Path) -> dict | None:
    """The quantized layers a saved model's metadata describes (:func:`archlab.quant.quantized_state`), or None."""
    if QUANT_METADATA not in metadata:
        return None
    try:
        description = json.loads(metadata[QUANT_METADATA])
        if not isinstance(description, dict) or not all(isinstance(e.get("name"), str) for e in description["layers"]):
            raise ValueError("each layer needs a name")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{weights}: its quantized layers ({QUANT_METADATA} metadata) are unreadable: {e}"
                              ) from None
    if not (weights.parent / QUANT_FILE).is_file():
        raise CheckpointError(f"{weights.parent / QUANT_FILE} is missing: {weights.name} names quantized layers that "
                              "it holds")
    return description


def check_tied_copies_agree(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    """CheckpointError when ``state`` stores two tensors the model ties (one storage in ``expected``, such as a tied
    head and its embedding) with different values: loading would keep one of them silently."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}  # (storage, shape) -> the first stored key on it
    for key in sorted(k for k in expected if k in state and expected[k].numel()):
        tie = (expected[key].data_ptr(), tuple(expected[key].shape))
        other = first.setdefault(tie, key)
        if other != key and not torch.equal(state[other], state[key]):
            raise CheckpointError(
                f"{source}: {other} and {key} differ, but the model ties them (one tensor); store them equal or once"
            )


def _adapt_as_saved(model: nn.Module, text: str, weights: Path) -> None:
    """Put the LoRA adapters that ``weights``' metadata describes (:func:`archlab.nn.lora.lora_description`) on ``model``."""
    try:
        adapters = json.loads(text)
        adapt(model, adapters)
    except (json.JSONDecodeError, ConfigError, AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{weights}: its LoRA adapters ({LORA_METADATA} metadata) do not fit the model: {e}") from None


def keep_stored_float_dtypes(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Give ``model`` the floating-point dtype its weights are stored in (float64, bf16, ...), or raise
    CheckpointError when ``state`` mixes several.

    Loading then copies the weights exactly: a model trained and saved in float64 comes back in float64,
    not rounded to the constructor's float32 (a float dtype is a precision the model was saved in, and
    archlab trains in any of them). Integer tensors for float ones are refused before, by check_state_dict.
    """
    dtypes = sorted({_dtype(t) for t in state.values() if t.is_floating_point()})
    if len(dtypes) > 1:
        example = {d: next(k for k, t in state.items() if _dtype(t) == d) for d in dtypes}
        shown = ", ".join(f"{d}: {k}" for d, k in example.items())
        raise CheckpointError(f"{source} mixes floating-point dtypes ({shown}); an archlab model is stored in one")
    if dtypes:
        model.to(getattr(torch, dtypes[0]))
