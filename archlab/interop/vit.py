r"""archlab :class:`~archlab.models.vit.ViT` <-> Hugging Face ``ViTModel`` / ``ViTForImageClassification``.

Key layout. Hugging Face checkpoints on disk (the hub's, and what ``save_pretrained`` writes) use the
names below; ``ViTForImageClassification`` puts ``vit.`` before every backbone key. transformers 5
renames the modules in memory (``layers.i.attention.q_proj``, ``mlp.fc1``, ...); :func:`from_hf_state_dict`
accepts both spellings, :func:`to_hf_state_dict` writes the on-disk one, which every transformers
version loads::

    embeddings.cls_token [1, 1, d]                          cls_token
    embeddings.position_embeddings [1, N, d]                positional.embedding.weight [N, d]
    embeddings.patch_embeddings.projection.{weight,bias}    patch_embed (Conv2d, kernel = stride = P)
    encoder.layer.i.layernorm_before                        encoder.blocks.i.attn_norm
    encoder.layer.i.attention.attention.{query,key,value}   encoder.blocks.i.attn.in_proj (rows q, k, v)
    encoder.layer.i.attention.output.dense                  encoder.blocks.i.attn.out_proj
    encoder.layer.i.layernorm_after                         encoder.blocks.i.ffn_norm
    encoder.layer.i.intermediate.dense                      encoder.blocks.i.ffn.w1
    encoder.layer.i.output.dense                            encoder.blocks.i.ffn.w2
    layernorm                                               encoder.final_norm
    classifier                                              head

The pooler. ``ViTModel(add_pooling_layer=True)`` adds ``pooler.dense`` (``tanh(W h_class + b)``), which
no ViT output archlab computes depends on (``ViTForImageClassification`` does not use it either).
archlab maps ``ViTModel(add_pooling_layer=False)``: reading a checkpoint, ``pooler.*`` tensors are
ignored; writing, none are written, so load the folder with ``ViTModel.from_pretrained(folder,
add_pooling_layer=False)`` or ``ViTForImageClassification.from_pretrained(folder)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import as_float, check_state_dict, id2label_count, read_hf_folder, write_hf_folder
from archlab.models.vit import ViT, ViTConfig

MODEL_TYPE = "vit"
BACKBONE_PREFIX = "vit."  # ViTForImageClassification's backbone
POOLER_PREFIX = "pooler."

# transformers 5 in-memory names -> on-disk names (after the layer prefix is rewritten)
_V5_RENAMES = (
    ("attention.q_proj.", "attention.attention.query."),
    ("attention.k_proj.", "attention.attention.key."),
    ("attention.v_proj.", "attention.attention.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
_V5_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")

# per-layer sub-modules: archlab name -> HF name (attention q/k/v handled apart: they are fused here)
_LAYER_MAP = {
    "attn_norm": "layernorm_before",
    "attn.out_proj": "attention.output.dense",
    "ffn_norm": "layernorm_after",
    "ffn.w1": "intermediate.dense",
    "ffn.w2": "output.dense",
}
_QKV = ("query", "key", "value")


# ================================================================================================
# Configs
# ================================================================================================


def _square(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"Hugging Face config {name}={list(value)}: archlab's ViT takes square sizes only")
        value = value[0]
    return value  # ViTConfig checks it is an integer (int() would cut 32.5 to 32, or fail on "abc" bare)


def _num_labels(hf: Mapping[str, Any]) -> int:
    """HF's rule: ``id2label`` decides; else ``num_labels``; else the default 2."""
    count = id2label_count(hf, "Hugging Face ViT config")
    return hf.get("num_labels", 2) if count is None else count


def config_from_hf(hf_config: Mapping[str, Any] | Any, *, n_classes: int | None = None) -> ViTConfig:
    """A :class:`ViTConfig` from a Hugging Face ViT config (a ``config.json`` dict or a ``ViTConfig``).

    ``n_classes``: the head size; by default ``num_labels`` if the config's ``architectures`` name
    ``ViTForImageClassification``, else 0 (a bare ``ViTModel``).
    Raises :class:`CheckpointError` for another model type or a variant archlab does not build
    (``qkv_bias=False``, an activation other than exact GELU, non-square sizes).
    """
    hf = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"config model_type={model_type!r}, expected {MODEL_TYPE!r} (a Hugging Face ViT)")
    if not hf.get("qkv_bias", True):
        raise CheckpointError("Hugging Face config qkv_bias=False: archlab's ViT has biases on q, k, v (allowed: True)")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"Hugging Face config hidden_act={act!r}: archlab's ViT uses exact GELU (allowed: 'gelu')")
    if n_classes is None:
        classifies = "ViTForImageClassification" in (hf.get("architectures") or [])
        n_classes = _num_labels(hf) if classifies else 0
    try:  # values go to ViTConfig as they are: it names a field whose value is not a number of its kind
        config = ViTConfig(
            image_size=_square("image_size", hf.get("image_size", 224)),
            patch_size=_square("patch_size", hf.get("patch_size", 16)),
            n_channels=hf.get("num_channels", 3),
            d_model=hf.get("hidden_size", 768),
            n_heads=hf.get("num_attention_heads", 12),
            n_layers=hf.get("num_hidden_layers", 12),
            d_ff=hf.get("intermediate_size", 3072),
            dropout=as_float(hf.get("hidden_dropout_prob", 0.0)),
            attn_dropout=as_float(hf.get("attention_probs_dropout_prob", 0.0)),
            eps=as_float(hf.get("layer_norm_eps", 1e-12)),
            n_classes=n_classes,
        )
    except ConfigError as e:
        raise CheckpointError(f"Hugging Face ViT config does not make a valid archlab ViTConfig: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != config.d_model // config.n_heads:
        raise CheckpointError(
            f"Hugging Face config head_dim={head_dim!r}: archlab's ViT needs head_dim = hidden_size / heads"
        )
    return config


def _check_convertible(config: ViTConfig) -> None:
    if config.pooling != "cls":
        raise ConfigError(
            f"pooling={config.pooling!r} has no Hugging Face ViT equivalent (it classifies from the [class] token); "
            "allowed for conversion: 'cls'"
        )


def architecture(config: ViTConfig) -> str:
    """The Hugging Face class holding these weights: ``ViTForImageClassification`` with a head, else ``ViTModel``."""
    return "ViTForImageClassification" if config.n_classes > 0 else "ViTModel"


def config_to_hf(config: ViTConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for ``config`` (``pooling='cls'`` only: ConfigError otherwise)."""
    _check_convertible(config)
    hf: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": [architecture(config)],
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.n_channels,
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_hidden_layers": config.n_layers,
        "intermediate_size": config.d_ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attn_dropout,
        "layer_norm_eps": config.eps,
        "qkv_bias": True,
        "initializer_range": 0.02,
        "encoder_stride": config.patch_size,
        "pooler_output_size": config.d_model,
        "pooler_act": "tanh",
    }
    if config.n_classes > 0:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.n_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.n_classes)}
    return hf


# ================================================================================================
# State dicts
# ================================================================================================


def _backbone_prefix(config: ViTConfig) -> str:
    return BACKBONE_PREFIX if config.n_classes > 0 else ""


def to_hf_state_dict(model: ViT) -> dict[str, Tensor]:
    """archlab ViT -> Hugging Face state dict in the on-disk layout (``vit.``-prefixed when it has a head)."""
    config = model.config
    _check_convertible(config)
    s, p = model.state_dict(), _backbone_prefix(config)
    d = config.d_model
    out = {
        f"{p}embeddings.cls_token": s["cls_token"],
        f"{p}embeddings.position_embeddings": s["positional.embedding.weight"].unsqueeze(0),
        f"{p}embeddings.patch_embeddings.projection.weight": s["patch_embed.weight"],
        f"{p}embeddings.patch_embeddings.projection.bias": s["patch_embed.bias"],
        f"{p}layernorm.weight": s["encoder.final_norm.weight"],
        f"{p}layernorm.bias": s["encoder.final_norm.bias"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"encoder.blocks.{i}.", f"{p}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            fused = s[f"{ours}attn.in_proj.{kind}"]
            for j, name in enumerate(_QKV):
                out[f"{theirs}attention.attention.{name}.{kind}"] = fused[j * d : (j + 1) * d]
            for a, h in _LAYER_MAP.items():
                out[f"{theirs}{h}.{kind}"] = s[f"{ours}{a}.{kind}"]
    if model.head is not None:
        out["classifier.weight"], out["classifier.bias"] = s["head.weight"], s["head.bias"]
    return out


def normalize_hf_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A HF ViT state dict in the on-disk layout: transformers-5 in-memory names renamed, ``pooler.*`` dropped.

    The ``vit.`` prefix of ``ViTForImageClassification`` is kept.
    """
    out = {}
    for key, value in state.items():
        prefix = BACKBONE_PREFIX if key.startswith(BACKBONE_PREFIX) else ""
        rest = key[len(prefix) :]
        if rest.startswith(POOLER_PREFIX):
            continue
        match = _V5_LAYER.match(rest)
        if match:
            layer, tail = match.groups()
            for new, old in _V5_RENAMES:
                if tail.startswith(new):
                    tail = old + tail[len(new) :]
                    break
            rest = f"encoder.layer.{layer}.{tail}"
        out[prefix + rest] = value
    return out


def _expected_hf_shapes(config: ViTConfig) -> dict[str, Tensor]:
    """Meta tensors with the shape of every key a HF checkpoint for ``config`` holds (no memory used)."""
    with torch.device("meta"):
        return to_hf_state_dict(ViT(config))


def from_hf_state_dict(state: Mapping[str, Tensor], config: ViTConfig, *, source: str = "state dict") -> dict[str, Tensor]:
    """Hugging Face ViT state dict (either key spelling, with or without ``vit.``) -> archlab ViT state dict.

    Missing, unexpected or misshapen tensors raise :class:`CheckpointError` naming them.
    """
    _check_convertible(config)
    state = normalize_hf_keys(state)
    p = _backbone_prefix(config)
    if not p and any(k.startswith(BACKBONE_PREFIX) for k in state):
        # ViTForImageClassification(num_labels=0) or its backbone taken alone: same tensors, prefixed
        state = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items()}
    elif p and not any(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {k if k.startswith("classifier.") else p + k: v for k, v in state.items()}
    check_state_dict(_expected_hf_shapes(config), state, source)

    out = {
        "cls_token": state[f"{p}embeddings.cls_token"],
        "positional.embedding.weight": state[f"{p}embeddings.position_embeddings"].squeeze(0),
        "patch_embed.weight": state[f"{p}embeddings.patch_embeddings.projection.weight"],
        "patch_embed.bias": state[f"{p}embeddings.patch_embeddings.projection.bias"],
        "encoder.final_norm.weight": state[f"{p}layernorm.weight"],
        "encoder.final_norm.bias": state[f"{p}layernorm.bias"],
    }
    for i in range(config.n_layers):
        ours, theirs = f"encoder.blocks.{i}.", f"{p}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}attn.in_proj.{kind}"] = torch.cat(
                [state[f"{theirs}attention.attention.{name}.{kind}"] for name in _QKV], dim=0
            )
            for a, h in _LAYER_MAP.items():
                out[f"{ours}{a}.{kind}"] = state[f"{theirs}{h}.{kind}"]
    if config.n_classes > 0:
        out["head.weight"], out["head.bias"] = state["classifier.weight"], state["classifier.bias"]
    return out


def from_hf(state: Mapping[str, Tensor], hf_config: Mapping[str, Any] | Any, *, source: str = "state dict") -> ViT:
    """An archlab ViT holding the weights of a HF ViT (state dict + config), in the weights' dtype.

    ``state`` in either key spelling, from ``ViTModel`` (any pooler is ignored) or
    ``ViTForImageClassification``; the head follows the weights (``classifier.weight`` present ->
    ``n_classes`` = its rows). Raises :class:`CheckpointError` for another ``model_type``, a variant
    archlab does not build, or missing / unexpected / misshapen tensors.
    """
    hf = dict(hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict())
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{source} holds model_type={hf.get('model_type')!r}, not a Hugging Face ViT ({MODEL_TYPE!r})")
    state = normalize_hf_keys(state)
    config = config_from_hf(hf, n_classes=_head_size(state, hf))
    weights = from_hf_state_dict(state, config, source=source)
    model = ViT(config)
    dtype = weights["patch_embed.weight"].dtype
    if dtype.is_floating_point:
        model.to(dtype)
    model.load_state_dict(weights)
    return model


def _head_size(state: Mapping[str, Tensor], hf: Mapping[str, Any]) -> int:
    head = state.get("classifier.weight")
    if head is None:
        return 0
    rows = head.shape[0]
    if "ViTForImageClassification" in (hf.get("architectures") or []) and _num_labels(hf) != rows:
        raise CheckpointError(f"config.json has num_labels={_num_labels(hf)} (id2label) but classifier.weight has {rows} rows")
    return rows


# ================================================================================================
# Folders
# ================================================================================================


def load_vit(folder: str | Path) -> ViT:
    """An archlab ViT from a Hugging Face ViT folder (``config.json`` + safetensors), offline, no pickle.

    Raises :class:`CheckpointError` as :func:`from_hf` does. The model is in eval mode, in the weights' dtype.
    """
    hf_config, state = read_hf_folder(folder)
    return from_hf(state, hf_config, source=str(Path(folder))).eval()


def save_vit(model: ViT, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face ViT folder that ``from_pretrained`` loads offline.

    With a head: ``ViTForImageClassification.from_pretrained(folder)``; without:
    ``ViTModel.from_pretrained(folder, add_pooling_layer=False)``. Written atomically.
    """
    if not isinstance(model, ViT):
        raise CheckpointError(f"save_vit takes an archlab ViT, got {type(model).__name__}")
    hf_config = config_to_hf(model.config)
    hf_config["dtype"] = str(model.patch_embed.weight.dtype).removeprefix("torch.")
    write_hf_folder(folder, hf_config, to_hf_state_dict(model))
