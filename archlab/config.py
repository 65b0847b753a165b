"""The configuration convention every archlab family follows.

A family's config is a frozen dataclass deriving from :class:`Config`. It is validated on
construction (``__post_init__`` calls :meth:`Config.validate`); a bad value raises
:class:`~archlab.errors.ConfigError` naming the field, the value and what is allowed. Configs
round-trip through plain dicts and JSON, and unknown keys are rejected with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Self

from archlab.errors import ConfigError, unknown


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of all archlab configs: frozen, validated, JSON round-trippable."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints.get(f.name, Any))
            check_shared_field(f.name, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for any bad value. Subclasses extend this."""

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict; an unknown key raises ConfigError with the closest valid name."""
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise ConfigError(f"{cls.__name__}: " + unknown("key", key, names))
        hints = typing.get_type_hints(cls)
        # JSON has no tuples: a list given for a tuple field becomes a tuple, nested ones too
        data = {k: _tuples(v) if _holds_tuple(hints.get(k)) else v for k, v in data.items()}
        return cls(**data)

    def replace(self, **overrides: Any) -> Self:
        """A copy with some fields changed (validated again); unknown fields are rejected."""
        merged = {**self.to_dict(), **overrides}
        return type(self).from_dict(merged)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps({"class": type(self).__name__, **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        data = json.loads(text)
        name = data.pop("class", cls.__name__)
        if name != cls.__name__:
            raise ConfigError(f"config is a {name}, not a {cls.__name__}")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        return cls.from_json(Path(path).read_text())


# -- validation helpers: one message style everywhere --------------------------------------------
#: The largest seed archlab takes (training, decoding): torch's generators take seeds in ``[0, 2^64 - 1]``.
MAX_SEED = 2**64 - 1
#: The most layers one stack of a config may have (``n_layers``, ``text_n_layers``, ``blocks_per_stage``, ...):
#: the deepest Transformers published have about 1,000 (DeepNet, 2022); archlab builds a module per layer, and
#: ``archlab inspect`` / ``archlab train``'s memory check build (or trace) the model layer by layer on the meta
#: device, at 5-20 ms a layer, so a depth of a million would run for hours before saying anything.
MAX_LAYERS = 1024
#: The config fields that count stacked layers (besides every field whose name ends in ``layers``).
_DEPTH_FIELDS = ("blocks_per_stage", "n_stacks")

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _holds_tuple(annotation: Any) -> bool:
    """A field that takes a tuple: ``tuple[...]`` or a union with one (``tuple[str, ...] | None``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_holds_tuple(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is tuple


def _tuples(value: Any) -> Any:
    """``[[3, 100], [4, 100]] -> ((3, 100), (4, 100))``: JSON lists back into the tuples a config holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # annotations we do not model are not checked


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is tuple:  # "a list (each an integer)", "a list of 2 (a number, a number)"
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each {_describe(args[0])})"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})" if args else "a list"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_type(name: str, value: Any, annotation: Any) -> None:
    """ConfigError unless ``value`` fits the field's annotation (``int`` refuses bools and floats)."""
    if not _matches(value, annotation):
        raise ConfigError(f"{name}={value!r} must be {_describe(annotation)}")


def check_shared_field(name: str, value: Any) -> None:
    """The rules of the fields every family means the same by, checked for every config in one place:

    * no number is NaN (every range check ``a <= x < b`` is False for NaN, and ``not x < a`` passes it);
    * ``eps`` (a norm's or Adam's ``x / sqrt(var + eps)``) is finite and > 0: ``eps=inf`` makes every
      LayerNorm output its bias alone, ``eps<=0`` divides by zero on a constant input;
    * ``vocab_size`` is >= 2: a one-token vocabulary has nothing to predict (the loss is 0 by construction);
    * a count of stacked layers (``n_layers``, ``reason_layers``, ``blocks_per_stage``, ...) is <= MAX_LAYERS.
    """
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name}=nan must be a number, not NaN")
    if name == "eps" and isinstance(value, int | float) and not (0 < value < math.inf):
        raise ConfigError(f"eps={value!r} must be finite and > 0")
    if name == "vocab_size" and isinstance(value, int) and value < 2:
        raise ConfigError(f"vocab_size={value!r} must be >= 2 (a vocabulary of one token has nothing to predict)")
    if (name.endswith("layers") or name in _DEPTH_FIELDS) and isinstance(value, int) and value > MAX_LAYERS:
        raise ConfigError(f"{name}={value!r} must be <= {MAX_LAYERS} (archlab.config.MAX_LAYERS: the deepest "
                          "networks published have about 1,000 layers a stack)")  # fmt: skip


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def check_positive(name: str, value: int | float) -> None:
    require(value > 0, f"{name}={value!r} must be > 0")


def check_probability(name: str, value: float) -> None:
    require(0.0 <= value < 1.0, f"{name}={value!r} must be in [0, 1)")


def check_choice(name: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: " + unknown("value", value, choices))


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    require(value % by == 0, f"{name}={value} is not divisible by {by_name}={by}")
