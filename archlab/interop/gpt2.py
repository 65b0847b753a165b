r"""GPT-2 <-> archlab: Hugging Face ``GPT2LMHeadModel`` state dicts, configs and folders.

The mapping, per block ``i`` (HF ``transformer.h.{i}.`` <-> archlab ``decoder.blocks.{i}.``)::

    ln_1             attn_norm         LayerNorm before attention
    attn.c_attn      attn.in_proj      fused [W_Q; W_K; W_V], heads side by side in each block
    attn.c_proj      attn.out_proj     W_O
    ln_2             ffn_norm          LayerNorm before the FFN
    mlp.c_fc         ffn.w1            W_1  [d -> d_ff]
    mlp.c_proj       ffn.w2            W_2  [d_ff -> d]

and ``transformer.wte`` <-> ``tok_emb``, ``transformer.wpe`` <-> ``pos.embedding``,
``transformer.ln_f`` <-> ``decoder.final_norm``, ``lm_head`` <-> ``lm_head`` (tied to the token
embedding). HF's ``Conv1D`` stores its weight as ``[in, out]`` (``y = x W + b``), the transpose of
``nn.Linear``'s ``[out, in]``; its fused ``c_attn`` output splits into q, k, v and each into heads
exactly as archlab's ``in_proj`` rows do, so a transpose is the whole conversion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_state_dict,
    drop_tied_head,
    read_hf_folder,
    write_hf_folder,
)
from archlab.models.gpt import GPT, GPTConfig

# (HF name, archlab name, HF Conv1D weight that needs a transpose)
_BLOCK_KEYS = (
    ("ln_1.weight", "attn_norm.weight", False),
    ("ln_1.bias", "attn_norm.bias", False),
    ("attn.c_attn.weight", "attn.in_proj.weight", True),
    ("attn.c_attn.bias", "attn.in_proj.bias", False),
    ("attn.c_proj.weight", "attn.out_proj.weight", True),
    ("attn.c_proj.bias", "attn.out_proj.bias", False),
    ("ln_2.weight", "ffn_norm.weight", False),
    ("ln_2.bias", "ffn_norm.bias", False),
    ("mlp.c_fc.weight", "ffn.w1.weight", True),
    ("mlp.c_fc.bias", "ffn.w1.bias", False),
    ("mlp.c_proj.weight", "ffn.w2.weight", True),
    ("mlp.c_proj.bias", "ffn.w2.bias", False),
)
_TOP_KEYS = (
    ("transformer.wte.weight", "tok_emb.weight"),
    ("transformer.wpe.weight", "pos.embedding.weight"),
    ("transformer.ln_f.weight", "decoder.final_norm.weight"),
    ("transformer.ln_f.bias", "decoder.final_norm.bias"),
    ("lm_head.weight", "lm_head.weight"),
)
_HF_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_ARCHLAB_BLOCK = re.compile(r"^decoder\.blocks\.(\d+)\.(.+)$")
# Buffers older GPT-2 checkpoints carry (the causal mask); not weights, HF ignores them too.
_LEGACY_BUFFERS = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")

# HF activation_function -> archlab ffn, and back
_FROM_HF_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                       "silu": "silu", "swish": "silu"}  # fmt: skip
_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
GPT2_EOS = 50256  # GPT-2's <|endoftext|>


# ================================================================================================
# State dicts
# ================================================================================================


def _rename(state: Mapping[str, Tensor], top: dict[str, str], block: dict[str, tuple[str, bool]], pattern, prefix: str):
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = pattern.match(key)
        if m and m.group(2) in block:
            name, transpose = block[m.group(2)]
            out[f"{prefix}{m.group(1)}.{name}"] = value.t().contiguous() if transpose else value
        else:
            out[key] = value  # unknown: passed through, so a key check names it as unexpected
    return out


def archlab_state_from_gpt2(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF ``GPT2LMHeadModel`` state dict -> archlab :class:`GPT` state dict (Conv1D weights transposed).

    Keys without the ``transformer.`` prefix (``GPT2Model`` checkpoints) are accepted; legacy mask
    buffers (``attn.bias``, ``attn.masked_bias``) are dropped; unknown keys pass through unchanged.
    A missing ``lm_head.weight`` (tied models store only ``wte``) is filled with the token embedding.
    """
    state = normalize_gpt2_keys(state)
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    top = dict(_TOP_KEYS)
    block = {hf: (ours, t) for hf, ours, t in _BLOCK_KEYS}
    return _rename(state, top, block, _HF_BLOCK, "decoder.blocks.")


def gpt2_state_from_archlab(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """archlab :class:`GPT` state dict -> HF ``GPT2LMHeadModel`` state dict (``lm_head.weight`` included)."""
    top = {ours: hf for hf, ours in _TOP_KEYS}
    block = {ours: (hf, t) for hf, ours, t in _BLOCK_KEYS}
    return _rename(state, top, block, _ARCHLAB_BLOCK, "transformer.h.")


def normalize_gpt2_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Add the ``transformer.`` prefix where a ``GPT2Model`` checkpoint lacks it; drop legacy mask buffers."""
    out = {}
    for key, value in state.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = f"transformer.{key}"
        if not _LEGACY_BUFFERS.match(key):
            out[key] = value
    return out


# ================================================================================================
# Configs
# ================================================================================================


def config_from_gpt2(hf: Mapping, *, source: str = "GPT-2 config") -> GPTConfig:
    """An HF ``GPT2Config`` dict (``config.json``) -> :class:`GPTConfig`; missing keys take HF's defaults.

    GPT-2 variants archlab does not implement raise :class:`CheckpointError` (cross-attention layers,
    unscaled or layer-scaled attention, unknown activations). ``embd_pdrop`` is not kept apart from
    ``resid_pdrop``: archlab's one ``dropout`` takes ``resid_pdrop`` (dropout acts only in training).
    """
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(f"{source} describes a {model_type!r} model (config model_type), not 'gpt2'")
    unsupported = [
        (hf.get("add_cross_attention", False), "add_cross_attention=true (GPT-2 with cross-attention)"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights=false (unscaled attention)"),
        (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
    ]
    for flag, what in unsupported:
        if flag:
            raise CheckpointError(f"{source}: archlab's GPT does not implement {what}")
    activation = hf.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in _FROM_HF_ACTIVATION:
        raise CheckpointError(
            f"{source}: activation_function={activation!r} is not supported; "
            f"known: {', '.join(sorted(_FROM_HF_ACTIVATION))}"
        )
    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            max_len=hf.get("n_positions", 1024),
            d_model=hf.get("n_embd", 768),
            n_heads=hf.get("n_head", 12),
            n_layers=hf.get("n_layer", 12),
            d_ff=hf.get("n_inner"),
            dropout=hf.get("resid_pdrop", 0.1),
            attn_dropout=hf.get("attn_pdrop", 0.1),
            positional="learned",
            norm_first=True,
            ffn=_FROM_HF_ACTIVATION[activation],
            eps=hf.get("layer_norm_epsilon", 1e-5),
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_gpt2(config: GPTConfig) -> dict:
    """:class:`GPTConfig` -> an HF ``config.json`` dict for ``GPT2LMHeadModel``.

    Only GPT-2's own design converts: learned positions, pre-norm, biases, a plain FFN whose
    activation HF knows. Anything else raises :class:`ConfigError` naming the field.
    """
    required = {"positional": "learned", "norm_first": True, "bias": True, "d_k": None}  # GPT-2's d_k is d / A
    for name, value in required.items():
        if getattr(config, name) != value:
            raise ConfigError(f"GPT-2 format needs {name}={value!r}, this model has {name}={getattr(config, name)!r}")
    if config.ffn not in _TO_HF_ACTIVATION:
        raise ConfigError(f"GPT-2 format needs ffn in {sorted(_TO_HF_ACTIVATION)}, this model has ffn={config.ffn!r}")
    eos = GPT2_EOS if config.vocab_size > GPT2_EOS else None  # GPT-2's tokenizer id, when the vocabulary has it
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.max_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": _TO_HF_ACTIVATION[config.ffn],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attn_dropout,
        "layer_norm_epsilon": config.eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


# ================================================================================================
# Folders
# ================================================================================================


def load_gpt2(folder: str | Path) -> GPT:
    """A :class:`GPT` from a Hugging Face GPT-2 folder (``config.json`` + safetensors); no network, no pickle.

    Weights are copied into the model's float32 parameters; the model is returned in eval mode (as
    ``from_pretrained`` does). A folder of another architecture, or weights that do not fit the
    config (missing, unexpected or misshapen tensors, named by their HF keys), raise CheckpointError.
    """
    folder = Path(folder)
    hf_config, raw = read_hf_folder(folder)
    if "class" in hf_config:
        raise CheckpointError(f"{folder} is an archlab folder, not a Hugging Face one: use archlab.interop.io.load_model")
    config = config_from_gpt2(hf_config, source=str(folder / CONFIG_FILE))
    state = normalize_gpt2_keys(raw)
    drop_tied_head(state, head="lm_head.weight", embedding="transformer.wte.weight", tied=config.tie_embeddings,
                   source=str(folder))  # fmt: skip
    with torch.device("meta"):  # names and shapes only: weights that do not fit are refused before any allocation
        expected = gpt2_state_from_archlab(GPT(config).state_dict())
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    check_state_dict(expected, state, str(folder / WEIGHTS_FILE))
    model = GPT(config)
    model.load_state_dict(archlab_state_from_gpt2(state))
    return model.eval()


def save_gpt2(model: GPT, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face GPT-2 folder that ``GPT2LMHeadModel.from_pretrained`` loads offline.

    Written atomically. A tied head is stored once (as ``transformer.wte.weight``), as HF does.
    """
    if not isinstance(model, GPT):
        raise ConfigError(f"save_gpt2 needs an archlab GPT, got {type(model).__name__}")
    hf_config = config_to_gpt2(model.config)
    hf_config["dtype"] = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    state = gpt2_state_from_archlab(model.state_dict())
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    write_hf_folder(folder, hf_config, state)
