r"""LoRA (Hu et al. 2021): train a low-rank update beside a frozen linear layer.

One adapted layer, ``x [..., d_in] -> [..., d_out]``::

    h = W x + b + (alpha / r) B A x        A [r, d_in] Kaiming-uniform, B [d_out, r] zeros

Only ``A`` and ``B`` train: ``r (d_in + d_out)`` parameters instead of ``d_in d_out``. Because ``B = 0``
at the start, the adapted model computes exactly what the base model did. :func:`merge_lora` folds
the update into the weight (``W <- W + (alpha / r) B A``: no extra cost at inference) and
:func:`unmerge_lora` takes it out again; :func:`unload_lora` merges and gives back plain ``nn.Linear``
layers. Dropout (``dropout``) acts on the adapter's input only: ``(alpha / r) B A dropout(x)``.

Choosing layers. ``targets`` are **glob patterns** (:func:`fnmatch.fnmatchcase`, case-sensitive)
matched against the full module names of ``model.named_modules()``, e.g.
``decoder.blocks.0.attn.in_proj``. ``*`` matches any run of characters, dots included::

    "*.in_proj"          every attention's fused [W_Q; W_K; W_V] projection (archlab MultiHeadAttention)
    "*.attn.*"           every Linear inside self-attention (in_proj and out_proj)
    "decoder.blocks.0.*" every Linear of the first decoder block

Globs rather than regular expressions: module names are dotted paths, and a glob reads like one.

Row blocks of fused projections. archlab fuses some projections into one Linear: attention's
``in_proj = [W_Q; W_K; W_V]``, a gated FFN's ``w_in = [W (gate); V (up)]``. The module holding such a
Linear names its row blocks (``fused_rows()``, e.g. ``{"in_proj": {"q": (0, A d_k), "k": ..., "v": ...}}``)
and a target ``GLOB:BLOCK`` adapts only those rows: ``"*.in_proj:q"`` and ``"*.in_proj:v"`` (the LoRA
paper's choice) give every fused projection one adapter per named block, ``h_q = W_Q x + (alpha / r) B_q
A_q x`` and likewise for ``v``, while the ``k`` rows stay ``W_K x``: exactly LoRA on separate ``q_proj`` and
``v_proj`` layers. A model class may name its usual targets in ``lora_names`` (:class:`archlab.models.llama.Llama`:
``q k v o gate up down``, Hugging Face's ``q_proj`` ... ``down_proj``), and those names are targets too.
Each pattern must match at least one ``nn.Linear``; one that matches none raises
:class:`~archlab.errors.ConfigError` naming it and listing the Linear layers there are
(:func:`linear_names`). :func:`apply_lora` freezes every parameter of the model, then adds the
adapters, so the adapters are all that trains.

An adapted layer (:class:`LoRALinear`) keeps the ``weight`` and ``bias`` attributes of the layer it
wraps: ``weight`` is the *effective* matrix ``W + (alpha / r) B A``, so code that reads a layer's
weight directly (archlab's cross-attention slices ``in_proj.weight``) sees the adapted layer too.
Saving and loading only the adapter weights: :mod:`archlab.interop.lora`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import check_positive, check_probability, check_type, require
from archlab.errors import ConfigError, ShapeError, unknown


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update: ``h = W x + b + (alpha / r) B A x``.

    ``x [..., d_in] -> [..., d_out]``. Submodules and parameters: ``base`` (the wrapped ``nn.Linear``,
    ``W [d_out, d_in]``, ``b [d_out]``), ``lora_A [r, d_in]``, ``lora_B [d_out, r]``.

    With ``blocks`` (``{name: (start, stop)}``, disjoint row ranges of ``W``) each block ``i`` has its own
    adapter, ``h[start_i:stop_i] += (alpha / r) B_i A_i x``, and the other rows none: ``lora_A [k r, d_in]``
    stacks ``A_1 .. A_k`` and ``lora_B [sum_i (stop_i - start_i), r]`` stacks ``B_1 .. B_k``, in row order.
    """

    def __init__(
        self, base: nn.Linear, r: int, alpha: float = 16.0, dropout: float = 0.0,
        blocks: Mapping[str, tuple[int, int]] | None = None,
    ):  # fmt: skip
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_lora_args(r, alpha, dropout)
        self.blocks = None if blocks is None else _check_blocks(blocks, base.out_features)
        check_rank(r, base, self.blocks)
        self.base = base
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        n_blocks, rows = (1, base.out_features) if self.blocks is None else (
            len(self.blocks), sum(stop - start for start, stop in self.blocks.values()))  # fmt: skip
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(n_blocks * r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the init nn.Linear gives its weight (fan-in d_in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A``, ``[d_out, d_in]`` (with blocks: ``(alpha / r) B_i A_i`` in block ``i``'s rows, 0 elsewhere)."""
        if self.blocks is None:
            return self.scaling * (self.lora_B @ self.lora_A)
        parts = [(b @ a).T for a, b in self._block_pairs()]  # [d_in, rows_i]
        return self.scaling * self._place(parts).T

    def _block_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(A_i [r, d_in], B_i [rows_i, r])`` of each block, in row order."""
        sizes = [stop - start for start, stop in self.blocks.values()]
        return list(zip(self.lora_A.split(self.r), self.lora_B.split(sizes), strict=True))

    def _place(self, parts: list[Tensor]) -> Tensor:
        """Block ``i``'s ``[..., rows_i]`` at its rows of ``[..., d_out]``, zeros in the rows of no block."""
        pieces, at = [], 0
        for part, (start, stop) in zip(parts, self.blocks.values(), strict=True):
            if start > at:
                pieces.append(part.new_zeros(*part.shape[:-1], start - at))
            pieces.append(part)
            at = stop
        if at < self.out_features:
            pieces.append(parts[-1].new_zeros(*parts[-1].shape[:-1], self.out_features - at))
        return torch.cat(pieces, dim=-1)

    @property
    def weight(self) -> Tensor:
        """The effective ``[d_out, d_in]`` matrix ``W + (alpha / r) B A`` (``W`` alone holds it once merged)."""
        return self.base.weight if self.merged else self.base.weight + self.delta_weight()

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_in] -> [..., d_out]``; the update runs as two thin matmuls, ``B (A x)``."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"LoRALinear built for input width d_in={self.in_features}, got shape {tuple(x.shape)}")
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise ConfigError("the LoRA adapters are merged into the weights and would not train: "
                                  "call unmerge_lora(model) before training")  # fmt: skip
            return self.base(x)
        u = F.linear(self.dropout(x), self.lora_A)  # [..., k r]: every block's A x in one product
        if self.blocks is None:
            return self.base(x) + self.scaling * F.linear(u, self.lora_B)
        parts = [F.linear(u_i, b) for u_i, (_, b) in zip(u.split(self.r, dim=-1), self._block_pairs(), strict=True)]
        return self.base(x) + self.scaling * self._place(parts)

    @torch.no_grad()
    def merge(self) -> None:
        """``W <- W + (alpha / r) B A``; the layer then computes ``W x + b`` alone."""
        if self.merged:
            raise ConfigError("this LoRA adapter is already merged")
        self.base.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- W - (alpha / r) B A``: the base weight back (up to rounding), the adapter separate again."""
        if not self.merged:
            raise ConfigError("this LoRA adapter is not merged")
        self.base.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        blocks = "" if self.blocks is None else f", blocks={list(self.blocks)}"
        return f"r={self.r}, alpha={self.alpha:g}{blocks}, merged={self.merged}"


def _check_blocks(blocks: Mapping[str, tuple[int, int]], rows: int) -> dict[str, tuple[int, int]]:
    """``blocks`` sorted by row, each ``0 <= start < stop <= rows`` and none overlapping (else ConfigError)."""
    if not isinstance(blocks, Mapping) or not blocks:
        raise ConfigError(f"blocks={blocks!r} must name one or more row ranges, e.g. {{'q': (0, 64)}}")
    out = {}
    for name, span in sorted(blocks.items(), key=lambda item: tuple(item[1])):
        if not (isinstance(span, tuple | list) and len(span) == 2 and all(isinstance(i, int) for i in span)
                and 0 <= span[0] < span[1] <= rows):  # fmt: skip
            raise ConfigError(f"LoRA block {name!r}: rows {span!r} must be (start, stop) with 0 <= start < stop <= {rows}")
        if out and span[0] < list(out.values())[-1][1]:
            raise ConfigError(f"LoRA blocks {list(out)[-1]!r} and {name!r} overlap: {list(out.values())[-1]} and {tuple(span)}")
        out[name] = (span[0], span[1])
    return out


# ================================================================================================
# Whole models
# ================================================================================================


def check_lora_args(r: int, alpha: float, dropout: float) -> None:
    """ConfigError unless ``r`` is an int > 0, ``alpha`` a finite number > 0 and ``dropout`` in [0, 1)."""
    check_type("r", r, int)
    check_positive("r", r)
    check_type("alpha", alpha, float)
    check_positive("alpha", alpha)
    require(math.isfinite(alpha), f"alpha={alpha!r} must be finite (the update (alpha / r) B A x is inf * 0 = nan "
            "while B = 0)")  # fmt: skip
    check_type("dropout", dropout, float)
    check_probability("dropout", dropout)


def check_rank(r: int, base: nn.Linear, blocks: Mapping[str, tuple[int, int]] | None, name: str = "") -> None:
    """ConfigError if ``r`` exceeds both widths of the matrix adapted (``d_in`` and ``d_out``, or a block's rows):
    ``B A`` has rank at most the smaller width, so such an ``r`` only adds parameters (``r = 10^6`` on a 48-wide
    layer asks gigabytes). ``r`` between the two widths stays allowed: one ``r`` for every layer of a model, a
    2-class head among them, is the usual choice."""
    spans = {"": (0, base.out_features)} if blocks is None else blocks
    block, (start, stop) = min(spans.items(), key=lambda item: item[1][1] - item[1][0])
    rows = stop - start
    if r > max(base.in_features, rows):
        layer = f"LoRA target {name!r}" if name else "LoRALinear"
        what = f"block {block!r}: {rows} rows" if block else f"d_out={rows}"
        raise ConfigError(f"{layer} [{base.out_features}, {base.in_features}]: r={r} exceeds both widths of the layer "
                          f"(d_in={base.in_features}, {what}); B A has rank at most {min(base.in_features, rows)}, so "
                          f"a larger r only adds parameters: choose r <= {min(base.in_features, rows)}")  # fmt: skip


def linear_names(model: nn.Module) -> list[str]:
    """The names of the ``nn.Linear`` layers LoRA can adapt (those not already wrapped), in module order."""
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in wrapped]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every adapted layer of ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _listing(names: list[str], limit: int = 12) -> str:
    if not names:
        return "(none)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter is reached, by ``id``: a tied weight has two or more."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> dict[str, dict[str, tuple[int, int]] | None]:
    """``{Linear name: its row blocks, or None for the whole layer}`` of the ``targets`` (see the module docstring)."""
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, Iterable) or not (targets := tuple(targets)) \
            or not all(isinstance(t, str) and t for t in targets):  # fmt: skip
        raise ConfigError(f"targets={targets!r} must be one or more non-empty glob patterns, e.g. ('*.in_proj',)")
    names = getattr(model, "lora_names", {})
    available = linear_names(model)
    adapted = list(lora_layers(model))
    chosen: dict[str, dict[str, tuple[int, int]] | None] = {}
    for target in targets:
        pattern, _, block = names.get(target, target).partition(":")
        hits = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        done = [n for n in adapted if fnmatch.fnmatchcase(n, pattern)]
        if done:
            each = "it" if len(done) == 1 else "each"
            raise ConfigError(f"LoRA target {target!r} matches {_listing(done, 4)}; {each} already has a LoRA adapter")
        if not hits:
            named = f" or one of {type(model).__name__}'s names ({', '.join(names)})" if names else ""
            quantized = getattr(model, "quant_report", None)  # set by archlab.quant.quantize (a layer above nn/)
            quantized = "" if quantized is None else (
                f"; this model's layers were quantized ({len(quantized.quantized)} by archlab.quant.quantize), and a "
                "quantized layer takes no adapter: apply LoRA to the float model")  # fmt: skip
            raise ConfigError(
                f"LoRA target {target!r} matches no nn.Linear in {type(model).__name__} (patterns are globs over "
                f"module names, '*' spans dots, ':BLOCK' picks a fused projection's rows{named}); "
                f"Linear layers: {_listing(available)}{quantized}"
            )
        for name in hits:
            rows = _block_rows(model, name, block, target) if block else None
            if name in chosen and (chosen[name] is None) != (rows is None):
                raise ConfigError(f"LoRA targets adapt {name!r} both whole and by row block ({target!r}): choose one")
            chosen[name] = None if rows is None else {**(chosen.get(name) or {}), **rows}
    return chosen


def _block_rows(model: nn.Module, name: str, block: str, target: str) -> dict[str, tuple[int, int]]:
    """``{block: (start, stop)}`` of the Linear ``name``, from its parent module's ``fused_rows()``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    fused = parent.fused_rows() if hasattr(parent, "fused_rows") else {}
    if child not in fused:
        raise ConfigError(f"LoRA target {target!r}: {name!r} is not a fused projection with named row blocks "
                          f"(only {', '.join(fused) or 'none'} in its {type(parent).__name__})")  # fmt: skip
    if block not in fused[child]:
        raise ConfigError(f"LoRA target {target!r}: " + unknown("row block", block, list(fused[child])) + f" of {name!r}")
    return {block: fused[child][block]}


def apply_lora(
    model: nn.Module, targets: str | Iterable[str], *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> nn.Module:
    """Freeze ``model`` and wrap each ``nn.Linear`` that ``targets`` name (globs, ``GLOB:BLOCK`` row blocks, or the
    model's ``lora_names``) in a :class:`LoRALinear`.

    Changes ``model`` in place and returns it. Every parameter of the model is frozen
    (``requires_grad=False``); only the new ``lora_A`` / ``lora_B`` train (to train a new head as well,
    ``model.classifier.requires_grad_(True)`` afterwards). A Linear whose weight is
    shared with another module (a head tied to the token embedding) is refused: merging an update
    into it would change the embedding too.
    """
    check_lora_args(r, alpha, dropout)
    layers = _resolve_targets(model, targets)
    return adapt(model, {name: {"r": r, "alpha": alpha, "dropout": dropout, "blocks": blocks}
                         for name, blocks in layers.items()})  # fmt: skip


def adapt(model: nn.Module, adapters: Mapping[str, Mapping]) -> nn.Module:
    """Freeze ``model`` and wrap the Linear layers named exactly in ``adapters`` (``{name: {"r", "alpha",
    "dropout", "blocks"}}``, ``blocks`` None or ``{name: (start, stop)}``: :func:`lora_description`'s form)."""
    parameter_names = _parameter_names(model)  # one pass over the model, not one per target
    for name, spec in adapters.items():
        if not name:
            raise ConfigError("apply_lora adapts the Linear layers inside a model; wrap a bare nn.Linear in LoRALinear")
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):  # every layer's rank checked before any is wrapped (else LoRALinear refuses)
            check_lora_args(spec["r"], spec["alpha"], spec["dropout"])
            blocks = spec.get("blocks")
            blocks = None if blocks is None else _check_blocks({k: tuple(v) for k, v in blocks.items()},
                                                                layer.out_features)  # fmt: skip
            check_rank(spec["r"], layer, blocks, name)
        own = f"{name}.weight"
        tied = next((other for other in parameter_names[id(model.get_submodule(name).weight)] if other != own), None)
        if tied is not None:
            raise ConfigError(
                f"LoRA target {name!r}: its weight is shared with {tied!r} (tied weights); an adapter could not be "
                "merged without changing that one too. Leave it out of targets"
            )
    model.requires_grad_(False)
    for name, spec in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        blocks = spec.get("blocks")
        blocks = None if blocks is None else {k: tuple(v) for k, v in blocks.items()}
        setattr(parent, child, LoRALinear(getattr(parent, child), spec["r"], spec["alpha"], spec["dropout"], blocks))
    return model


def lora_description(model: nn.Module) -> dict[str, dict]:
    """``{layer: {"r", "alpha", "dropout", "blocks"}}`` of every adapter, JSON-able: what :func:`adapt` rebuilds."""
    return {
        name: {"r": m.r, "alpha": m.alpha, "dropout": float(getattr(m.dropout, "p", 0.0)),
               "blocks": None if m.blocks is None else {k: list(v) for k, v in m.blocks.items()}}
        for name, m in lora_layers(model).items()
    }  # fmt: skip


def _require_adapters(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no LoRA adapters (apply_lora first)")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, ``W <- W + (alpha / r) B A``; returns ``model``."""
    layers = _require_adapters(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ConfigError(f"LoRA adapters already merged: {_listing(merged, 4)}")
    for m in layers.values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight; returns ``model``."""
    layers = _require_adapters(model)
    unmerged = [n for n, m in layers.items() if not m.merged]
    if unmerged:
        raise ConfigError(f"LoRA adapters not merged: {_listing(unmerged, 4)}")
    for m in layers.values():
        m.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the original linear layers back (state-dict keys as before
    :func:`apply_lora`); returns ``model``. Parameters stay frozen: ``model.requires_grad_(True)`` to train all."""
    for name, m in _require_adapters(model).items():
        if not m.merged:
            m.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base)
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapter parameters (every ``lora_A`` and ``lora_B``): what to hand the optimizer."""
    for m in lora_layers(model).values():
        yield m.lora_A
        yield m.lora_B


# ================================================================================================
# Report
# ================================================================================================


@dataclass(frozen=True)
class LoRAReport:
    """Trainable vs total parameters of an adapted model (each distinct Parameter counted once).

    ``adapters`` maps each adapted layer to ``(d_in, d_out, r)``; its adapter holds ``r (d_in + d_out)``.
    """

    trainable: int
    total: int
    adapters: dict[str, tuple[int, int, int]]

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"LoRA on {len(self.adapters)} layers: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({100 * self.fraction:.3f}%)")  # fmt: skip


def lora_report(model: nn.Module) -> LoRAReport:
    """Count trainable (``requires_grad``) and total parameters, and list the adapted layers."""
    params = list(model.parameters())  # distinct Parameters: tied ones once
    adapters = {n: (m.in_features, m.out_features, m.r) for n, m in lora_layers(model).items()}
    return LoRAReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        adapters=adapters,
    )
