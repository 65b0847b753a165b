"""LoRA adapters on disk: only the adapter weights, as safetensors plus a JSON description.

A folder written by :func:`save_lora` holds

* ``adapter_config.json``: ``{"format": "archlab-lora", "version": 1, "adapters": {name: {"r", "alpha",
  "dropout", "blocks"}}}``, one entry per adapted layer (its full module name; ``blocks`` null for a whole
  layer, else the row blocks ``{block: [start, stop]}`` of a fused projection, :class:`~archlab.nn.lora.LoRALinear`);
* ``adapter.safetensors``: ``{name}.lora_A [r, d_in]`` and ``{name}.lora_B [d_out, r]`` per layer (with ``k``
  blocks: ``[k r, d_in]`` and ``[rows of the blocks, r]``).

:func:`load_lora` puts them on a model of the same architecture: a plain one (it calls
:func:`~archlab.nn.lora.apply_lora` on exactly the recorded layers) or one already adapted on the
same layers. Kilobytes to megabytes, where the base model is gigabytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import atomic_dir, check_state_dict, read_json, read_safetensors
from archlab.nn.lora import LoRALinear, adapt, check_lora_args, lora_description, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "archlab-lora"


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name}.lora_A`` and ``{name}.lora_B`` of every adapted layer (detached views)."""
    state = {}
    for name, m in lora_layers(model).items():
        state[f"{name}.lora_A"] = m.lora_A.detach()
        state[f"{name}.lora_B"] = m.lora_B.detach()
    return state


def save_lora(model: nn.Module, folder: str | Path) -> None:
    """Write the adapters of ``model`` (not its base weights) to ``folder``, atomically."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no LoRA adapters to save (apply_lora first)")
    description = {
        "format": FORMAT,
        "version": 1,
        "adapters": lora_description(model),
    }
    with atomic_dir(folder) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.contiguous().clone() for k, v in lora_state_dict(model).items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "archlab": FORMAT})


def load_lora(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load adapters saved by :func:`save_lora` onto ``model`` (adapting it first if it is plain); returns it.

    Missing, unexpected or misshapen adapter tensors, an adapter for a layer the model lacks, or a
    folder of another kind raise :class:`CheckpointError` before the model is changed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} inside)")
    description = read_json(folder / ADAPTER_CONFIG)
    if description.get("format") != FORMAT or not isinstance(description.get("adapters"), dict):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not an archlab LoRA adapter description")
    adapters: dict = description["adapters"]
    for name, spec in adapters.items():
        try:
            check_lora_args(spec["r"], spec["alpha"], spec["dropout"])
            spec.setdefault("blocks", None)  # (version 1 folders written before row blocks: whole layers)
        except (ConfigError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{folder / ADAPTER_CONFIG}: adapter {name!r} has a bad description: {e}") from None
    state = read_safetensors(folder / ADAPTER_WEIGHTS)

    existing = lora_layers(model)
    if existing and set(existing) != set(adapters):
        raise CheckpointError(
            f"{folder}: the adapters are for layers {sorted(adapters)}, the model is adapted on {sorted(existing)}"
        )
    modules = dict(model.named_modules())
    missing = [n for n in adapters if n not in modules]
    if missing:
        raise CheckpointError(f"{folder}: {type(model).__name__} has no layers named {missing}")
    # the shapes the adapters must have, checked before the model is touched
    expected = {}
    for name, spec in adapters.items():
        layer = modules[name]
        if not isinstance(layer, nn.Linear) and name not in existing:
            raise CheckpointError(f"{folder}: {name!r} is a {type(layer).__name__} in this model, not an nn.Linear")
        try:  # the adapter's own shapes, built on the meta device
            probe = LoRALinear(nn.Linear(layer.in_features, layer.out_features, device="meta"), spec["r"],
                               spec["alpha"], spec["dropout"], spec["blocks"])  # fmt: skip
        except ConfigError as e:
            raise CheckpointError(f"{folder / ADAPTER_CONFIG}: adapter {name!r}: {e}") from None
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = probe.lora_A, probe.lora_B
    check_state_dict(expected, state, str(folder / ADAPTER_WEIGHTS))
    for name, m in existing.items():
        if m.merged:
            raise ConfigError(f"{name}: the model's adapters are merged; unmerge_lora(model) before loading new ones")
        if m.r != adapters[name]["r"] or m.alpha != float(adapters[name]["alpha"]):
            raise CheckpointError(
                f"{name}: the model's adapter has r={m.r}, alpha={m.alpha:g}; the saved one "
                f"r={adapters[name]['r']}, alpha={adapters[name]['alpha']}"
            )
        have = lora_description(model)[name]["blocks"]
        if have != adapters[name]["blocks"]:
            raise CheckpointError(f"{name}: the model's adapter covers row blocks {have}; the saved one "
                                  f"{adapters[name]['blocks']}")  # fmt: skip

    if not existing:
        adapt(model, adapters)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_A.copy_(state[f"{name}.lora_A"])
            m.lora_B.copy_(state[f"{name}.lora_B"])
    return model
