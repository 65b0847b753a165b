r"""RWKV-4 <-> archlab: Hugging Face ``RwkvForCausalLM`` state dicts, configs and folders.

The mapping, per block ``i`` (HF ``rwkv.blocks.{i}.`` <-> archlab ``blocks.{i}.``)::

    ln1                              att_norm               LayerNorm before the time-mix
    attention.time_decay / first     time_mix.time_decay / time_first     [d_att]
    attention.time_mix_{key,value,receptance}   time_mix.mix_{k,v,r}      [1, 1, d] <-> [d]
    attention.{key,value,receptance,output}     time_mix.{key,value,receptance,output}
    ln2                              ffn_norm               LayerNorm before the channel-mix
    feed_forward.time_mix_{key,receptance}      channel_mix.mix_{k,r}     [1, 1, d] <-> [d]
    feed_forward.{key,receptance,value}         channel_mix.{key,receptance,value}

and ``rwkv.embeddings`` <-> ``tok_emb``, ``rwkv.blocks.0.pre_ln`` <-> ``emb_norm`` (HF keeps
``LN_0`` inside the first block), ``rwkv.ln_out`` <-> ``final_norm``, ``head`` <-> ``lm_head``.

HF's ``rescale_every`` halves the hidden state every few layers at inference (a float16 overflow
guard; the function is unchanged up to LayerNorm's epsilon); archlab does not rescale and writes
``rescale_every=0``. HF's final LayerNorm always uses ``eps=1e-5`` whatever ``layer_norm_epsilon``
says; archlab uses one ``eps`` everywhere, so only ``1e-5`` converts.
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
from archlab.models.rwkv import RWKV, RWKVConfig

# (HF name, archlab name, HF shape is [1, 1, d] where archlab's is [d])
_BLOCK_KEYS = (
    ("ln1.weight", "att_norm.weight", False),
    ("ln1.bias", "att_norm.bias", False),
    ("attention.time_decay", "time_mix.time_decay", False),
    ("attention.time_first", "time_mix.time_first", False),
    ("attention.time_mix_key", "time_mix.mix_k", True),
    ("attention.time_mix_value", "time_mix.mix_v", True),
    ("attention.time_mix_receptance", "time_mix.mix_r", True),
    ("attention.key.weight", "time_mix.key.weight", False),
    ("attention.value.weight", "time_mix.value.weight", False),
    ("attention.receptance.weight", "time_mix.receptance.weight", False),
    ("attention.output.weight", "time_mix.output.weight", False),
    ("ln2.weight", "ffn_norm.weight", False),
    ("ln2.bias", "ffn_norm.bias", False),
    ("feed_forward.time_mix_key", "channel_mix.mix_k", True),
    ("feed_forward.time_mix_receptance", "channel_mix.mix_r", True),
    ("feed_forward.key.weight", "channel_mix.key.weight", False),
    ("feed_forward.receptance.weight", "channel_mix.receptance.weight", False),
    ("feed_forward.value.weight", "channel_mix.value.weight", False),
)
_TOP_KEYS = (
    ("rwkv.embeddings.weight", "tok_emb.weight"),
    ("rwkv.blocks.0.pre_ln.weight", "emb_norm.weight"),
    ("rwkv.blocks.0.pre_ln.bias", "emb_norm.bias"),
    ("rwkv.ln_out.weight", "final_norm.weight"),
    ("rwkv.ln_out.bias", "final_norm.bias"),
    ("head.weight", "lm_head.weight"),
)
_HF_BLOCK = re.compile(r"^rwkv\.blocks\.(\d+)\.(.+)$")
_ARCHLAB_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
HF_FINAL_EPS = 1e-5  # RwkvModel.ln_out is nn.LayerNorm(hidden_size): the default epsilon


# ================================================================================================
# State dicts
# ================================================================================================


def archlab_state_from_rwkv(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF ``RwkvForCausalLM`` state dict -> archlab :class:`RWKV` state dict.

    Keys without the ``rwkv.`` prefix (``RwkvModel`` checkpoints) are accepted; unknown keys pass
    through unchanged, so a key check names them as unexpected.
    """
    top, block = dict(_TOP_KEYS), {hf: (ours, flat) for hf, ours, flat in _BLOCK_KEYS}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(("rwkv.", "head.")):
            key = f"rwkv.{key}"
        m = _HF_BLOCK.match(key)
        if key in top:
            out[top[key]] = value
        elif m and m.group(2) in block:
            name, flat = block[m.group(2)]
            out[f"blocks.{m.group(1)}.{name}"] = value.reshape(-1) if flat else value
        else:
            out[key] = value
    return out


def rwkv_state_from_archlab(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """archlab :class:`RWKV` state dict -> HF ``RwkvForCausalLM`` state dict."""
    top, block = {ours: hf for hf, ours in _TOP_KEYS}, {ours: (hf, flat) for hf, ours, flat in _BLOCK_KEYS}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _ARCHLAB_BLOCK.match(key)
        if key in top:
            out[top[key]] = value
        elif m and m.group(2) in block:
            name, flat = block[m.group(2)]
            out[f"rwkv.blocks.{m.group(1)}.{name}"] = value.reshape(1, 1, -1) if flat else value
        else:
            out[key] = value
    return out


# ================================================================================================
# Configs
# ================================================================================================


def config_from_rwkv(hf: Mapping, *, source: str = "RWKV config") -> RWKVConfig:
    """An HF ``RwkvConfig`` dict (``config.json``) -> :class:`RWKVConfig`; missing keys take HF's defaults."""
    if hf.get("model_type") != "rwkv":
        raise CheckpointError(f"{source} describes a {hf.get('model_type')!r} model (config model_type), not 'rwkv'")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if eps != HF_FINAL_EPS:
        raise CheckpointError(
            f"{source}: layer_norm_epsilon={eps} is not supported: HF's final LayerNorm uses eps={HF_FINAL_EPS} "
            "regardless, and archlab's RWKV uses one epsilon everywhere"
        )
    d = hf.get("hidden_size", 4096)
    try:
        return RWKVConfig(
            vocab_size=hf.get("vocab_size", 50277),
            d_model=d,
            n_layers=hf.get("num_hidden_layers", 32),
            d_att=hf.get("attention_hidden_size") if hf.get("attention_hidden_size") not in (None, d) else None,
            d_ff=hf.get("intermediate_size") if hf.get("intermediate_size") not in (None, 4 * d) else None,
            context_length=hf.get("context_length", 1024),
            eps=eps,
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_rwkv(config: RWKVConfig) -> dict:
    """:class:`RWKVConfig` -> an HF ``config.json`` dict for ``RwkvForCausalLM`` (``rescale_every=0``)."""
    if config.eps != HF_FINAL_EPS:
        raise ConfigError(f"HF RWKV format needs eps={HF_FINAL_EPS} (its final LayerNorm's), not eps={config.eps}")
    return {
        "model_type": "rwkv",
        "architectures": ["RwkvForCausalLM"],
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "attention_hidden_size": config.att_width,
        "intermediate_size": config.ffn_width,
        "layer_norm_epsilon": config.eps,
        "rescale_every": 0,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }


# ================================================================================================
# Folders
# ================================================================================================


def load_rwkv(folder: str | Path) -> RWKV:
    """An :class:`RWKV` from a Hugging Face RWKV folder (``config.json`` + safetensors); no network, no pickle.

    Returned in eval mode. Weights that do not fit the config (named by their HF keys) raise CheckpointError.
    """
    folder = Path(folder)
    hf_config, state = read_hf_folder(folder)
    if "class" in hf_config:
        raise CheckpointError(f"{folder} is an archlab folder, not a Hugging Face one: use interop.io.load_model")
    config = config_from_rwkv(hf_config, source=str(folder / CONFIG_FILE))
    state = {k if k.startswith(("rwkv.", "head.")) else f"rwkv.{k}": v for k, v in state.items()}
    with torch.device("meta"):  # names and shapes only: weights that do not fit are refused before any allocation
        expected = rwkv_state_from_archlab(RWKV(config).state_dict())
    if config.tie_embeddings:  # a head stored beside the embedding must equal it (it is dropped: the model ties them)
        drop_tied_head(state, head="head.weight", embedding="rwkv.embeddings.weight", tied=True, source=str(folder))
        del expected["head.weight"]
    check_state_dict(expected, state, str(folder / WEIGHTS_FILE))
    model = RWKV(config)
    model.load_state_dict(archlab_state_from_rwkv(state), strict=not config.tie_embeddings)
    return model.eval()


def save_rwkv(model: RWKV, folder: str | Path) -> None:
    """Write ``model`` as a Hugging Face RWKV folder that ``RwkvForCausalLM.from_pretrained`` loads offline."""
    if not isinstance(model, RWKV):
        raise ConfigError(f"save_rwkv needs an archlab RWKV, got {type(model).__name__}")
    hf_config = config_to_rwkv(model.config)
    hf_config["dtype"] = str(model.tok_emb.weight.dtype).removeprefix("torch.")
    state = rwkv_state_from_archlab(model.state_dict())
    if model.config.tie_embeddings:
        del state["head.weight"]
    write_hf_folder(folder, hf_config, state)
