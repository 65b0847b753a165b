r"""Parameter counts by component, for any model.

``count_parameters(model)`` counts every distinct Parameter once (a matrix tied between the
embedding and the output layer counts once, under the first name that reaches it) and groups the
counts by what the parameter belongs to:

==================  ===========================================================================
``embeddings``      token, position, segment and patch embeddings: ``nn.Embedding``, archlab
                    positional encodings, and anything whose name contains ``embed`` or is a
                    ``cls_token``
``attention``       self-attention (``archlab.nn.MultiHeadAttention``, ``torch.nn.MultiheadAttention``),
                    and RWKV's time mixing (``TimeMix``: its attention-free token mixer, ``W_k, W_v,
                    W_r, W_o`` and the decays)
``cross_attention`` an attention module reached through an attribute named ``cross_attn``
                    (archlab) or ``multihead_attn`` (``torch.nn.TransformerDecoderLayer``)
``feed_forward``    ``archlab.nn.FeedForward`` / ``GatedFeedForward``, RWKV's channel mixing (``ChannelMix``),
                    and ``linear1`` / ``linear2`` of ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
``recurrent``       RNN / LSTM / GRU layers and cells (``torch.nn`` fused ones and ``archlab.nn.recurrent``)
``convolution``     ``nn.Conv1d`` / ``Conv2d`` (and archlab's causal dilated convolutions)
``norms``           ``LayerNorm`` / ``RMSNorm`` / ``BatchNorm`` (archlab's and torch's)
``output_head``     a module named ``head``, ``*_head``, ``classifier``, ``pooler`` or ``cls``,
                    with only the parameters not already counted (a tied head adds nothing)
``other``           everything else
==================  ===========================================================================

The classification looks at the parameter's owner and its ancestors, innermost first, so the
``in_proj`` Linear of an attention counts as attention and the LayerNorm inside a head as a norm.
The cards' estimate for a decoder-only stack, ``N ~ 12 n_layer d^2``, counts the attention and
feed-forward rows of this table.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from torch import nn

from archlab.errors import ConfigError, DataError, unknown
from archlab.models.rwkv import ChannelMix, TimeMix  # analysis sits above models
from archlab.nn.attention import MultiHeadAttention
from archlab.nn.feedforward import FeedForward, GatedFeedForward
from archlab.nn.norm import LayerNorm, RMSNorm
from archlab.nn.positional import PositionalEncoding
from archlab.nn.recurrent import GRUCell, LSTMCell, RecurrentStack, RNNCell

COMPONENTS = (
    "embeddings", "attention", "cross_attention", "feed_forward", "recurrent", "convolution", "norms", "output_head",
    "other",
)  # fmt: skip
LABELS = {
    "embeddings": "embeddings",
    "attention": "self-attention",
    "cross_attention": "cross-attention",
    "feed_forward": "feed-forward",
    "recurrent": "recurrent",
    "convolution": "convolution",
    "norms": "norms",
    "output_head": "output head",
    "other": "other",
}

ATTENTION_TYPES = (MultiHeadAttention, nn.MultiheadAttention, TimeMix)
FEED_FORWARD_TYPES = (FeedForward, GatedFeedForward, ChannelMix)
NORM_TYPES = (LayerNorm, RMSNorm, nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase, RecurrentStack, RNNCell, LSTMCell, GRUCell)
CONVOLUTION_TYPES = (nn.modules.conv._ConvNd,)
EMBEDDING_TYPES = (nn.Embedding, PositionalEncoding)
CROSS_ATTENTION_NAMES = ("cross_attn", "multihead_attn")
TORCH_LAYER_TYPES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
TORCH_FEED_FORWARD_NAMES = ("linear1", "linear2")
HEAD_NAMES = ("head", "classifier", "pooler", "cls")


@dataclass(frozen=True)
class ParamRow:
    """One distinct Parameter: its (first) name, its other names if tied, its component and size."""

    name: str
    component: str
    shape: tuple[int, ...]
    numel: int
    trainable: bool
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParamReport:
    """What :func:`count_parameters` returns.

    ``by_component`` has every key of :data:`COMPONENTS` (zeros included) in that order and sums
    to ``total``; ``rows`` lists each distinct Parameter once.
    """

    total: int
    trainable: int
    by_component: dict[str, int]
    rows: tuple[ParamRow, ...] = field(repr=False)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def tied(self) -> list[ParamRow]:
        """The Parameters reached under more than one name (weight tying)."""
        return [row for row in self.rows if row.aliases]

    def share(self, component: str) -> float:
        """Fraction of all parameters in ``component`` (0 for an empty model)."""
        if component not in self.by_component:
            raise ConfigError(unknown("component", component, COMPONENTS))
        return self.by_component[component] / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "by_component": dict(self.by_component),
            "tied": {row.name: list(row.aliases) for row in self.tied},
        }


def _path_components(module_name: str) -> list[str]:
    return [part for part in module_name.split(".") if part and not part.isdigit()]


def _is_head_name(part: str) -> bool:
    return part in HEAD_NAMES or part.endswith("_head")


def classify(module_path: list[tuple[str, nn.Module]], param_name: str) -> str:
    """The component of a parameter from its chain of owners ``[(attribute name, module), ...]``.

    The chain runs from the root's first child down to the module that owns the parameter
    directly; ``param_name`` is the parameter's own attribute name (``weight``, ``cls_token``...).
    """
    if "embed" in param_name or param_name in ("cls_token", "class_token"):
        return "embeddings"
    for depth in range(len(module_path) - 1, -1, -1):  # innermost owner first
        name, module = module_path[depth]
        if isinstance(module, ATTENTION_TYPES):
            return "cross_attention" if name in CROSS_ATTENTION_NAMES else "attention"
        if isinstance(module, FEED_FORWARD_TYPES):
            return "feed_forward"
        if name in TORCH_FEED_FORWARD_NAMES and depth and isinstance(module_path[depth - 1][1], TORCH_LAYER_TYPES):
            return "feed_forward"
        if isinstance(module, NORM_TYPES):
            return "norms"
        if isinstance(module, EMBEDDING_TYPES) or "embed" in name:
            return "embeddings"
        if isinstance(module, RECURRENT_TYPES):
            return "recurrent"
        if isinstance(module, CONVOLUTION_TYPES):
            return "convolution"
        if _is_head_name(name):
            return "output_head"
    return "other"


def count_parameters(model: nn.Module) -> ParamReport:
    """Count ``model``'s parameters, each distinct Parameter once, grouped by component.

    Works on models built on the ``meta`` device (nothing is allocated or read).
    """
    if not isinstance(model, nn.Module):
        raise DataError(f"count_parameters needs a torch.nn.Module, got {type(model).__name__}")
    owners: dict[int, list[str]] = {}  # id(param) -> every full name it is reachable under
    first: dict[int, tuple[list[tuple[str, nn.Module]], str, nn.Parameter]] = {}
    chains: dict[str, list[tuple[str, nn.Module]]] = {"": []}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if module_name:
            parent, _, attr = module_name.rpartition(".")
            chains[module_name] = [*chains[parent], (attr, module)]
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            key = id(param)
            if key not in owners:
                owners[key] = []
                first[key] = (chains[module_name], param_name, param)
            if full not in owners[key]:
                owners[key].append(full)

    by_component = dict.fromkeys(COMPONENTS, 0)
    rows = []
    for key, names in owners.items():
        chain, param_name, param = first[key]
        component = classify(chain, param_name)
        n = param.numel()
        by_component[component] += n
        rows.append(ParamRow(names[0], component, tuple(param.shape), n, param.requires_grad, tuple(names[1:])))
    total = sum(row.numel for row in rows)
    trainable = sum(row.numel for row in rows if row.trainable)
    return ParamReport(total, trainable, by_component, tuple(rows))


def human(n: int | float) -> str:
    """``63082496 -> '63.1M'``, ``213e6 -> '213M'``, ``2048 -> '2.0K'``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise ConfigError(f"human({n!r}): a count must be a number")
    if not math.isfinite(n):
        return str(n)  # 'nan', 'inf': not '0', nor 'infT'
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"
    return str(int(n))
