"""The registry of model families and named presets.

A family registers its config class and module class once; a preset is a name for a config of a
family (``gpt2-small``, ``transformer-base``). ``build_model("gpt2-small", n_layers=2)`` builds a
preset with overrides; ``build_model(config)`` builds from a config object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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
# every class buildable from its config alone, by name: (the class, the config class it is built from)
MODEL_CLASSES: dict[str, tuple[type[nn.Module], type[Config]]] = {}


def register_model_class(model_cls: type[nn.Module], config_cls: type[Config]) -> None:
    """A class besides a family's base one (a model with heads) that ``load_model`` may rebuild from a
    ``config_cls``."""
    MODEL_CLASSES[model_cls.__name__] = (model_cls, config_cls)


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
    register_model_class(model_cls, config_cls)
    if train_cls is not None:
        register_model_class(train_cls, config_cls)


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
    if not isinstance(name, str):  # e.g. "preset": null in a run file, or --set model.preset=5
        raise ConfigError(f"preset={name!r} must be a preset name (a string); known: {', '.join(sorted(PRESETS))}")
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


def build_model(
    spec: str | Config, *, model_class: str | None = None, init: bool = True, **overrides: Any
) -> nn.Module:
    """A model from a preset name (with overrides) or from a config object.

    ``model_class`` picks a registered class other than the family's base one (e.g. ``BertForPreTraining``);
    it must be built from the config's class. A size the allocator refuses becomes a ConfigError with the
    model's bytes and the memory available; what reads configs from outside (files, the command line) calls
    :func:`check_fits_in_memory` first, so that a model too large to build is refused before any allocation.
    ``init=False`` leaves the random draws of the weights' initialisation out (:class:`WithoutRandomInit`) for a
    caller that loads every weight next (:func:`archlab.interop.io.load_model`).
    """
    config = get_config(spec, **overrides) if isinstance(spec, str) else (spec.replace(**overrides) if overrides else spec)
    model_cls = model_class_for(config, model_class)
    try:
        if not init:
            with WithoutRandomInit():
                return model_cls(config)
        return model_cls(config)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise too_large(config, model_cls) from None


class WithoutRandomInit(TorchFunctionMode):
    """While active (in this thread), the random draws of weight initialisation fill their tensor with zeros (a
    memset, not a draw): the functions of ``torch.nn.init`` that hand themselves to a mode (``normal_``,
    ``uniform_``, ``kaiming_uniform_``; the mode then does not see their inner draw) and ``Tensor.normal_`` /
    ``uniform_``, which the others draw with (zeros end ``trunc_normal_``'s loop, which redraws values outside its
    bounds). A model built so holds zeros where its constructor draws weights: only for a model whose every weight
    is loaded next. SmolLM2-135M's draws took 1.3 s of a 2.3 s load (2 cores) and moved the global random state,
    which a load now leaves alone."""

    SKIPPED = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_,
                         nn.init.kaiming_uniform_})  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            tensor = args[0] if args else kwargs["tensor"]  # torch.nn.init's functions name it tensor
            with torch.no_grad():  # as the draws are made (a parameter's in-place fill)
                return tensor.zero_()
        return func(*args, **(kwargs or {}))


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's refusal: Python's or NumPy's MemoryError, torch's OutOfMemoryError (a
    GPU) or the CPU allocator's RuntimeError."""
    return isinstance(error, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def model_class_for(config: Config, model_class: str | None = None) -> type[nn.Module]:
    """The class ``build_model(config, model_class=...)`` builds: the family's, or a registered one made from
    the config's class (ConfigError otherwise)."""
    if model_class is None:
        return family_of(config).model_cls
    _loaded()
    if model_class not in MODEL_CLASSES:
        raise ConfigError(unknown("model class", model_class, MODEL_CLASSES))
    model_cls, config_cls = MODEL_CLASSES[model_class]
    if type(config) is not config_cls:
        raise ConfigError(f"model class {model_class!r} is built from a {config_cls.__name__}, "
                          f"not from a {type(config).__name__}")  # fmt: skip
    return model_cls


def model_bytes(config: Config, model_cls: type[nn.Module]) -> int:
    """Bytes of the parameters and buffers ``model_cls(config)`` allocates, counted on the meta device
    (nothing is allocated; it costs about one more construction of the model)."""
    from archlab.analysis.memory import module_bytes  # (analysis sits above models: imported when used)

    return module_bytes(build_on_meta(config, model_cls))


def build_on_meta(config: Config, model_cls: type[nn.Module] | None = None) -> nn.Module:
    """``model_cls(config)`` (default: the family's class) on the meta device: shapes only, nothing allocated;
    ConfigError naming the sizes when a tensor would hold more than 2^63 elements (even its shape overflows)."""
    model_cls = model_class_for(config) if model_cls is None else model_cls
    with torch.device("meta"), WithoutRandomInit():  # a draw on the meta device has no values to make
        try:
            return model_cls(config)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            raise ConfigError(f"{model_cls.__name__} of {_largest_sizes(config)}: a parameter of this model would "
                              "hold more than 2^63 elements; no machine can build it") from None  # fmt: skip


def check_fits_in_memory(config: Config, model_class: str | None = None) -> None:
    """ConfigError, before anything is allocated, when the model ``build_model(config, model_class=...)``
    would build needs more bytes than the memory available now (an absurd ``d_model`` or ``max_len``)."""
    from archlab.analysis.memory import available_memory

    model_cls = model_class_for(config, model_class)
    available = available_memory()
    if available is not None and model_bytes(config, model_cls) > available:
        raise too_large(config, model_cls)


def too_large(config: Config, model_cls: type[nn.Module]) -> ConfigError:
    """The error for a model too large for this machine: its bytes, the config's largest sizes, the memory."""
    from archlab.analysis.memory import available_memory, format_bytes

    needed, available = model_bytes(config, model_cls), available_memory()
    has = "an unknown amount" if available is None else format_bytes(available)
    return ConfigError(
        f"{model_cls.__name__} of {_largest_sizes(config)} needs {format_bytes(needed)} for its "
        f"parameters and buffers; this machine has {has} of memory available"
    )


def _largest_sizes(config: Config) -> str:
    """The config's three largest integer fields, ``"d_model=..., max_len=..., ..."``: what makes a model large."""
    sizes = sorted(((v, k) for k, v in config.to_dict().items() if type(v) is int), reverse=True)[:3]
    return ", ".join(f"{k}={v}" for v, k in sizes)


def list_presets() -> list[Preset]:
    _loaded()
    return sorted(PRESETS.values(), key=lambda p: (p.family, p.name))
