r"""gMLP (Liu et al. 2021, "Pay Attention to MLPs"): MLPs that mix tokens through a spatial gate.

No attention, no positional encoding: token mixing is a learned ``[N, N]`` matrix over positions,
so position is built into the weights and the length is fixed at ``max_len`` (shorter inputs use
its top-left block). One block, ``X [B, N, d] -> [B, N, d]``::

    Z  = GELU(LN(X) U)                           U [d, d_ffn]              channel projection
    Z1, Z2 = split(Z)                            each [B, N, d_ffn / 2]
    s(Z) = Z1 * (W LN(Z2) + b)                   W [N, N], b [N]; W mixes positions, per channel
    Y  = X + s(Z) V                              V [d_ffn / 2, d]

Spatial gating unit (SGU): ``W`` starts near zero and ``b`` at one, so ``s(Z) ~ Z1`` and each block
begins as a plain feed-forward block; the gate learns to bring in other tokens. A causal ``W``
(lower triangular) lets position ``i`` see only ``j <= i``: the language model. Two families:

* ``gmlp`` (:class:`GMLP`): causal language model, ``input_ids [B, N] -> logits [B, N, V]``;
* ``gmlp-classifier`` (:class:`GMLPClassifier`): bidirectional, mean over tokens, ``-> logits [B, C]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.config import Config, check_positive, check_probability, require
from archlab.errors import ConfigError, ShapeError
from archlab.models.base import ModelConfig
from archlab.models.registry import register_family, register_preset
from archlab.nn.inputs import check_token_ids
from archlab.nn.norm import LayerNorm


@dataclass(frozen=True)
class GMLPConfig(ModelConfig, Config):
    """A gMLP language model (causal spatial gating).

    Args:
        vocab_size: ``V``.
        max_len: ``N``, the fixed length the spatial weights ``W [N, N]`` cover.
        d_model: ``d``.
        d_ffn: channel projection width (even: the SGU splits it in two); ``None`` means ``6 d``
            (the paper's gMLP-S/B/L ratio).
        n_layers: blocks ``L``.
        dropout: on each block's output before the residual sum.
        eps: LayerNorm epsilon.
        init_eps: the spatial weights start ``U(-init_eps / N, init_eps / N)``, so ``|W Z2| <= init_eps
            max|Z2|``: near zero, as the paper asks.
    """

    vocab_size: int = 256
    max_len: int = 128
    d_model: int = 128
    d_ffn: int | None = None
    n_layers: int = 6
    dropout: float = 0.0
    eps: float = 1e-5
    init_eps: float = 1e-3

    @property
    def context_length(self) -> int:
        return self.max_len

    def validate(self) -> None:
        for name in ("vocab_size", "max_len", "d_model", "n_layers", "eps", "init_eps"):
            check_positive(name, getattr(self, name))
        if self.d_ffn is not None:
            check_positive("d_ffn", self.d_ffn)
            require(self.d_ffn % 2 == 0, f"d_ffn={self.d_ffn} must be even: the spatial gate splits it into two halves")
        check_probability("dropout", self.dropout)

    @property
    def context_limit(self) -> int:
        """``max_len``: the spatial weights ``W [N, N]`` cover no more positions."""
        return self.max_len

    @property
    def ffn_width(self) -> int:
        """``d_ffn``, or ``6 d`` when it is None."""
        return 6 * self.d_model if self.d_ffn is None else self.d_ffn


@dataclass(frozen=True)
class GMLPClassifierConfig(GMLPConfig):
    """A bidirectional gMLP sequence classifier: the :class:`GMLPConfig` fields plus ``n_classes`` ``C``."""

    n_classes: int = 2

    def validate(self) -> None:
        super().validate()
        require(self.n_classes >= 2, f"n_classes={self.n_classes!r} must be >= 2")


# ================================================================================================
# The spatial gating unit and the block
# ================================================================================================


class SpatialGatingUnit(nn.Module):
    """``s(Z) = Z1 * (W LN(Z2) + b)``: ``Z [B, n, d_ffn] -> [B, n, d_ffn / 2]``, ``n <= N``.

    ``W [N, N]`` mixes positions (the same for every channel), ``b [N]`` is a per-position offset;
    a length ``n < N`` uses ``W[:n, :n]`` and ``b[:n]``. ``causal``: ``W`` is masked to its lower
    triangle, so output ``i`` reads ``Z2_j`` for ``j <= i`` only (and, being a prefix, the first ``n``
    outputs do not change when later tokens are appended).
    """

    def __init__(self, d_ffn: int, max_len: int, *, causal: bool, eps: float = 1e-5, init_eps: float = 1e-3):
        super().__init__()
        if d_ffn % 2:
            raise ConfigError(f"d_ffn={d_ffn} must be even: the spatial gate splits it into two halves")
        self.d_ffn, self.max_len, self.causal = d_ffn, max_len, causal
        self.init_eps = init_eps
        self.norm = LayerNorm(d_ffn // 2, eps)
        self.weight = nn.Parameter(torch.empty(max_len, max_len))  # W
        self.bias = nn.Parameter(torch.empty(max_len))  # b
        if causal:
            self.register_buffer("mask", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``W ~ U(-init_eps / N, init_eps / N)``, ``b = 1``: ``s(Z) = Z1 (1 + O(init_eps))`` at the start."""
        bound = self.init_eps / self.max_len
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.ones_(self.bias)

    def spatial_weight(self, n: int) -> Tensor:
        """The ``[n, n]`` token-mixing matrix in use (lower triangular when causal)."""
        w = self.weight[:n, :n]
        return w.masked_fill(~self.mask[:n, :n], 0.0) if self.causal else w

    def forward(self, z: Tensor) -> Tensor:
        n = z.shape[1]
        z1, z2 = z.chunk(2, dim=-1)
        z2 = self.norm(z2)
        z2 = torch.einsum("ij,bjc->bic", self.spatial_weight(n), z2) + self.bias[:n, None]
        return z1 * z2

    def extra_repr(self) -> str:
        return f"d_ffn={self.d_ffn}, max_len={self.max_len}, causal={self.causal}"


class GMLPBlock(nn.Module):
    """``X + Dropout(s(GELU(LN(X) U)) V)``; ``[B, n, d] -> [B, n, d]``."""

    def __init__(self, d_model: int, d_ffn: int, max_len: int, *, causal: bool, dropout: float = 0.0,
                 eps: float = 1e-5, init_eps: float = 1e-3):  # fmt: skip
        super().__init__()
        self.norm = LayerNorm(d_model, eps)
        self.proj_in = nn.Linear(d_model, d_ffn)  # U
        self.sgu = SpatialGatingUnit(d_ffn, max_len, causal=causal, eps=eps, init_eps=init_eps)
        self.proj_out = nn.Linear(d_ffn // 2, d_model)  # V
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        z = F.gelu(self.proj_in(self.norm(x)))
        return x + self.drop(self.proj_out(self.sgu(z)))


# ================================================================================================
# Models
# ================================================================================================




class GMLPStack(nn.Module):
    """Token embedding, ``L`` gMLP blocks, final LayerNorm: ``input_ids [B, n] -> hidden [B, n, d]``."""

    def __init__(self, config: GMLPConfig, *, causal: bool):
        super().__init__()
        c = config
        self.config, self.causal = c, causal
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(
            GMLPBlock(c.d_model, c.ffn_width, c.max_len, causal=causal, dropout=c.dropout, eps=c.eps,
                      init_eps=c.init_eps)
            for _ in range(c.n_layers)
        )
        self.final_norm = LayerNorm(c.d_model, c.eps)
        nn.init.normal_(self.tok_emb.weight, 0.0, 0.02)

    def check_ids(self, input_ids: Tensor) -> None:
        c = self.config
        check_token_ids("input_ids", input_ids, c.vocab_size)
        b, n = input_ids.shape
        if n > c.max_len:
            raise ShapeError(f"input_ids has length {n}, past max_len={c.max_len}: gMLP's spatial weights are "
                             f"[max_len, max_len] and cannot extrapolate")  # fmt: skip

    def mix(self, x: Tensor) -> Tensor:
        """The blocks and final norm on embeddings ``x [B, n, d]`` -> ``[B, n, d]``."""
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        self.check_ids(input_ids)
        return self.mix(self.tok_emb(input_ids))


class GMLP(nn.Module):
    """gMLP language model (causal SGU): ``input_ids [B, n] -> logits [B, n, V]``, ``n <= max_len``.

    Submodules: ``gmlp`` (:class:`GMLPStack`, causal), ``lm_head`` (``[V, d]``, untied).
    """

    def __init__(self, config: GMLPConfig):
        super().__init__()
        if type(config) is not GMLPConfig:
            raise ConfigError(f"GMLP needs a GMLPConfig, got {type(config).__name__}")
        self.config = config
        self.gmlp = GMLPStack(config, causal=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        """``logits[:, i]`` predicts the token after ``input_ids[:, i]`` from tokens ``<= i`` only."""
        return self.lm_head(self.gmlp(input_ids))


class GMLPClassifier(nn.Module):
    """Bidirectional gMLP classifier: ``input_ids [B, n] -> logits [B, C]`` (mean of the final states, linear head).

    Submodules: ``gmlp`` (:class:`GMLPStack`, bidirectional), ``classifier`` (``[C, d]``).
    """

    def __init__(self, config: GMLPClassifierConfig):
        super().__init__()
        if not isinstance(config, GMLPClassifierConfig):
            raise ConfigError(f"GMLPClassifier needs a GMLPClassifierConfig, got {type(config).__name__}")
        self.config = config
        self.gmlp = GMLPStack(config, causal=False)
        self.classifier = nn.Linear(config.d_model, config.n_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.classifier(self.gmlp(input_ids).mean(dim=1))


register_family("gmlp", GMLPConfig, GMLP, "gMLP language model: MLP blocks with a causal spatial gating unit")
register_family(
    "gmlp-classifier", GMLPClassifierConfig, GMLPClassifier,
    "gMLP sequence classifier: bidirectional spatial gating, mean pooling", task="classification",
)  # fmt: skip
register_preset(
    "gmlp-lm-tiny", "gmlp", GMLPConfig(vocab_size=256, max_len=64, d_model=64, d_ffn=256, n_layers=2),
    "tiny byte-level gMLP language model: 2 blocks, d=64, d_ffn=256, fixed length 64",
)  # fmt: skip
register_preset(
    "gmlp-cls-tiny", "gmlp-classifier",
    GMLPClassifierConfig(vocab_size=256, max_len=64, d_model=64, d_ffn=256, n_layers=2, n_classes=2),
    "tiny gMLP token classifier: 2 blocks, d=64, d_ffn=256, length <= 64, 2 classes",
)  # fmt: skip
