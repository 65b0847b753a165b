"""The registry of model families and named presets.

A family registers its config class and module class once; a preset is a name for a config of a
family (``gpt2-small``, ``transformer-base``). ``build_model("gpt2-small", n_layers=2)`` builds a
preset with overrides; ``build_model(config)`` builds from a config object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from archlab.config import Config
from archlab.errors import ConfigError, unknown


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type[Config]
    model_cls: type[nn.Module]
    description: str
    task: str = "lm"  # the training objective archlab.train uses by default (see TASKS)
    train_cls: type[nn.Module] | None = None  # the class trained for that task, when not model_cls


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    config: Config
    description: str


FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, Preset] = {}
MODEL_CLASSES: dict[str, type[nn.Module]] = {}  # every class buildable from its config alone, by name


def register_model_class(model_cls: type[nn.Module]) -> None:
    """A class besides a family's base one (a model with heads) that ``load_model`` may rebuild."""
    MODEL_CLASSES[model_cls.__name__] = model_cls


# The training objectives, and what a model trained on each takes and returns (archlab.train relies on it):
#   lm              model(input_ids [B, N]) -> logits [B, N, V]          (next-token prediction)
#   mlm             model(input_ids, attention_mask=, token_type_ids=) -> .mlm_logits [B, N, V], .nsp_logits [B, 2]
#   seq2seq         model(src_ids [B, N], tgt_in [B, M], src_mask=[B, N] bool) -> logits [B, M, V]
#   classification  model(inputs) -> logits [B, C]
#   custom          model.compute_loss(batch: dict) -> (loss scalar, metrics dict)  (e.g. ELMo's joint loss)
TASKS = ("lm", "mlm", "seq2seq", "classification", "custom")


def register_family(
    name: str,
    config_cls: type[Config],
    model_cls: type[nn.Module],
    description: str,
    *,
    task: str = "lm",
    train_cls: type[nn.Module] | None = None,
) -> None:
    if task not in TASKS:
        raise ConfigError(unknown("task", task, TASKS))
    FAMILIES[name] = Family(name, config_cls, model_cls, description, task, train_cls)
    register_model_class(model_cls)
    if train_cls is not None:
        register_model_class(train_cls)


def register_preset(name: str, family: str, config: Config, description: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(unknown("family", family, FAMILIES))
    if not isinstance(config, FAMILIES[family].config_cls):
        raise ConfigError(f"preset {name!r}: config is a {type(config).__name__}, family {family!r} needs "
                          f"a {FAMILIES[family].config_cls.__name__}")
    PRESETS[name] = Preset(name, family, config, description)


def _loaded() -> None:
    import archlab.models  # noqa: F401  (importing the package registers every family)


def family_of(config: Config) -> Family:
    _loaded()
    for fam in FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam
    raise ConfigError(f"no registered family uses {type(config).__name__}")


def get_preset(name: str) -> Preset:
    _loaded()
    if name not in PRESETS:
        raise ConfigError(unknown("preset", name, PRESETS))
    return PRESETS[name]


def get_config(name: str, **overrides: Any) -> Config:
    """The config of preset ``name`` with ``overrides`` applied (validated; unknown keys rejected)."""
    config = get_preset(name).config
    return config.replace(**overrides) if overrides else config


def config_from_dict(data: dict[str, Any]) -> Config:
    """A config from its JSON dict, which names its class (``{"class": "GPTConfig", ...}``)."""
    _loaded()
    data = dict(data)
    name = data.pop("class", None)
    for fam in FAMILIES.values():
        if fam.config_cls.__name__ == name:
            return fam.config_cls.from_json(json.dumps({"class": name, **data}))
    raise ConfigError(unknown("config class", str(name), [f.config_cls.__name__ for f in FAMILIES.values()]))


def build_model(spec: str | Config, *, model_class: str | None = None, **overrides: Any) -> nn.Module:
    """A model from a preset name (with overrides) or from a config object.

    ``model_class`` picks a registered class other than the family's base one (e.g. ``BertForPreTraining``).
    """
    config = get_config(spec, **overrides) if isinstance(spec, str) else (spec.replace(**overrides) if overrides else spec)
    if model_class is None:
        return family_of(config).model_cls(config)
    _loaded()
    if model_class not in MODEL_CLASSES:
        raise ConfigError(unknown("model class", model_class, MODEL_CLASSES))
    return MODEL_CLASSES[model_class](config)


def list_presets() -> list[Preset]:
    _loaded()
    return sorted(PRESETS.values(), key=lambda p: (p.family, p.name))
