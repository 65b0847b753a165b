r"""Llama <-> archlab: Hugging Face ``LlamaForCausalLM`` state dicts, configs and folders.

The mapping, per block ``i`` (HF ``model.layers.{i}.`` <-> archlab ``decoder.blocks.{i}.``)::

    input_layernorm              attn_norm         RMSNorm before attention
    self_attn.{q,k,v}_proj       attn.in_proj      rows [W_Q (A d_k); W_K (G d_k); W_V (G d_k)], fused
    self_attn.o_proj             attn.out_proj     W_O
    post_attention_layernorm     ffn_norm          RMSNorm before the FFN
    mlp.{gate,up}_proj           ffn.w_in          rows [W (gate, d_ff); V (up, d_ff)], fused
    mlp.down_proj                ffn.w2            W_2

and ``model.embed_tokens`` <-> ``tok_emb``, ``model.norm`` <-> ``decoder.final_norm``, ``lm_head`` <->
``lm_head`` (the token embedding when tied). Both sides store ``nn.Linear`` weights ``[out, in]`` and
the same "rotate half" RoPE layout, so fusing and splitting rows is the whole conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    as_float,
    check_state_dict,
    drop_tied_head,
    read_hf_folder,
    write_hf_folder,
)
from archlab.models.llama import Llama, LlamaConfig

# archlab name (under decoder.blocks.{i}.) <- the HF names (under model.layers.{i}.) its rows stack
_FUSED = {
    "attn.in_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "ffn.w_in": ("mlp.gate_proj", "mlp.up_proj"),
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn.out_proj": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn.w2": "mlp.down_proj",
}


def _modules(config: LlamaConfig) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """``(archlab module, HF modules whose rows it stacks, parameter names)`` for the whole model."""
    attn = ("weight", "bias") if config.attention_bias else ("weight",)
    mlp = ("weight", "bias") if config.mlp_bias else ("weight",)
    out = [("tok_emb", ("model.embed_tokens",), ("weight",)), ("decoder.final_norm", ("model.norm",), ("weight",))]
    out.append(("lm_head", ("lm_head",), ("weight",)))
    for i in range(config.n_layers):
        a, h = f"decoder.blocks.{i}.", f"model.layers.{i}."
        for ours, theirs in _FUSED.items():
            out.append((a + ours, tuple(h + t for t in theirs), attn if ours.startswith("attn") else mlp))
        for ours, theirs in _BLOCK.items():
            names = ("weight",) if "norm" in ours else attn if ours.startswith("attn") else mlp
            out.append((a + ours, (h + theirs,), names))
    return out


def _row_sizes(config: LlamaConfig, hf_modules: tuple[str, ...]) -> list[int]:
    """Rows of each HF module stacked in one fused archlab matrix."""
    d_k = config.d_head
    if hf_modules[0].endswith("q_proj"):
        return [config.n_heads * d_k, config.n_kv_heads * d_k, config.n_kv_heads * d_k]
    return [config.d_ff] * len(hf_modules)


def archlab_state_from_llama(state: Mapping[str, Tensor], config: LlamaConfig, *,
                             source: str = "Llama state dict") -> dict[str, Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> archlab :class:`Llama` state dict (q/k/v and gate/up rows fused).

    A missing ``lm_head.weight`` (tied models store only the embedding) is filled with the embedding.
    Raises CheckpointError naming ``source`` and the HF keys that are missing or misshapen.
    """
    state = dict(state)
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):  # shapes only
        expected = llama_state_from_archlab(Llama(config).state_dict(), config)
    check_state_dict(expected, state, source)
    out = {}
    for ours, theirs, names in _modules(config):
        for w in names:
            parts = [state[f"{t}.{w}"] for t in theirs]
            out[f"{ours}.{w}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def llama_state_from_archlab(state: Mapping[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """archlab :class:`Llama` state dict -> HF ``LlamaForCausalLM`` state dict (``lm_head.weight`` included)."""
    out = {}
    for ours, theirs, names in _modules(config):
        for w in names:
            tensor = state[f"{ours}.{w}"]
            if len(theirs) == 1:
                out[f"{theirs[0]}.{w}"] = tensor
            else:
                for t, part in zip(theirs, tensor.split(_row_sizes(config, theirs), dim=0), strict=True):
                    out[f"{t}.{w}"] = part
    return out


# ================================================================================================
# Configs
# ================================================================================================


def config_from_llama(hf: Mapping, *, source: str = "Llama config") -> LlamaConfig:
    """An HF ``LlamaConfig`` dict (``config.json``) -> :class:`LlamaConfig`; missing keys take HF's defaults.

    Variants archlab does not implement raise :class:`CheckpointError` naming the key: RoPE scaling
    (``rope_type`` other than ``default``), a ``head_dim`` other than ``hidden_size / num_attention_heads``,
    an activation other than SiLU, tensor-parallel slicing (``pretraining_tp > 1``).
    """
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise CheckpointError(f"{source} describes a {model_type!r} model (config model_type), not 'llama'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise CheckpointError(f"{source}: rope_parameters / rope_scaling={rope!r} must be an object (or null)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d_model, n_heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    head_dim = hf.get("head_dim")
    if head_dim is not None and type(head_dim) is not int:
        raise CheckpointError(f"{source}: head_dim={head_dim!r} must be an integer (or absent)")
    unsupported = [
        (rope_type != "default", f"rope_type={rope_type!r} (RoPE scaling)"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu: SwiGLU)"),
        (hf.get("pretraining_tp", 1) != 1, f"pretraining_tp={hf.get('pretraining_tp')}"),
        (head_dim is not None and all(type(v) is int for v in (head_dim, n_heads, d_model))
         and head_dim * n_heads != d_model,
         f"head_dim={head_dim} != hidden_size / num_attention_heads = {d_model} / {n_heads}"),
    ]  # fmt: skip
    for flag, what in unsupported:
        if flag:
            raise CheckpointError(f"{source}: archlab's Llama does not implement {what}")
    try:
        return LlamaConfig(
            vocab_size=hf.get("vocab_size", 32000),
            max_len=hf.get("max_position_embeddings", 2048),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            n_layers=hf.get("num_hidden_layers", 32),
            d_ff=hf.get("intermediate_size", 11008),
            rope_theta=as_float(theta),
            eps=hf.get("rms_norm_eps", 1e-6),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attn_dropout=as_float(hf.get("attention_dropout", 0.0)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_llama(config: LlamaConfig) -> dict:
    """:class:`LlamaConfig` -> an HF ``config.json`` dict for ``LlamaForCausalLM``."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_len,
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.d_head,
        "num_hidden_layers": config.n_layers,
        "intermediate_size": config.d_ff,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.eps,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "attention_dropout": config.attn_dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
    }


# ================================================================================================
# Folders
# ================================================================================================


def load_llama(folder: str | Path) -> Llama:
    """A :class:`Llama` from a Hugging Face Llama folder (``config.json`` + safetensors); no network, no pickle.

    Weights are copied into the model's float32 parameters; the model is returned in eval mode. A folder
    of another architecture, or weights that do not fit the config (missing, unexpected or misshapen
    tensors, named by their HF keys), raise CheckpointError.
    """
    folder = Path(folder)
    hf_config, state = read_hf_folder(folder)
    if "class" in hf_config:
        raise CheckpointError(f"{folder} is an archlab folder, not a Hugging Face one: use archlab.interop.io.load_model")
    config = config_from_llama(hf_config, source=str(folder / CONFIG_FILE))
    drop_tied_head(state, head="lm_head.weight", embedding="model.embed_tokens.weight", tied=config.tie_embeddings,
                   source=str(folder))  # fmt: skip
    with torch.device("meta"):  # names and shapes only: weights that do not fit are refused before any allocation
        expected = llama_state_from_archlab(Llama(config).state_dict(), config)
    if config.tie_embeddings:
        del expected["lm_head.weight"]
    check_state_dict(expected, state, str(folder / WEIGHTS_FILE))
    model = Llama(config)
    model.load_state_dict(archlab_state_from_llama(state, config))
    return model.eval()


def save_llama(model: Llama, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face Llama folder that ``LlamaForCausalLM.from_pretrained`` loads offline.

    Written atomically. A tied head is stored once (as ``model.embed_tokens.weight``), as HF does.
    """
    if not isinstance(model, Llama):
        raise ConfigError(f"save_llama needs an archlab Llama, got {type(model).__name__}")
    hf_config = config_to_llama(model.config)
    hf_config["dtype"] = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    state = llama_state_from_archlab(model.state_dict(), model.config)
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    write_hf_folder(folder, hf_config, state)
