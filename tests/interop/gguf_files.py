"""GGUF files for the tests, written with the ``gguf`` package's own writer (llama.cpp's): any tensors and metadata,
and archlab Llama models as llama.cpp's converter writes them (GGUF names, Q/K rows permuted, tied head omitted)."""

from __future__ import annotations

import gguf
import numpy as np

from archlab.data.chat import ChatML
from archlab.interop.llama import llama_state_from_archlab
from archlab.models.llama import Llama, LlamaConfig


def write_gguf(path, tensors, *, arch="llama", metadata=None):
    """A GGUF file of ``tensors`` (name -> (array, ggml type or None for plain numpy)) and ``metadata``."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, kind) in tensors.items():
        if kind is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of W_Q/W_K rows (rotate-half -> adjacent pairs), per head."""
    per_head = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])  # [A, 2, d_k/2, ...]
    return per_head.swapaxes(1, 2).reshape(weight.shape)


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_metadata(config: LlamaConfig) -> dict:
    return {
        "llama.context_length": config.max_len,
        "llama.embedding_length": config.d_model,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.d_ff,
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.n_kv_heads,
        "llama.rope.freq_base": float(config.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": float(config.eps),
        "llama.vocab_size": config.vocab_size,
    }


def write_llama_gguf(path, model: Llama, extra_metadata=None, linear_kind=None, head_kind=None):
    """``model`` as llama.cpp's converter writes it: GGUF names, Q/K rows permuted, F32, tied head omitted;
    ``linear_kind`` (a ggml type): the blocks' linear weights quantized to it; ``head_kind``: the head
    (``output.weight``, or ``token_embd.weight`` where tied) quantized to it."""
    config = model.config
    tensors = {}
    for name, weight in llama_state_from_archlab(model.state_dict(), config).items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        w = weight.numpy()
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                w = llama_cpp_permute(w, config.n_heads if "q_proj" in rest else config.n_kv_heads)
            name = f"blk.{i}.{HF_TO_GGUF[rest]}"
            if linear_kind is not None and w.ndim == 2:
                tensors[name] = (gguf.quants.quantize(np.ascontiguousarray(w), linear_kind), linear_kind)
                continue
        else:
            name = HF_TO_GGUF[name]
            head = "token_embd.weight" if config.tie_embeddings else "output.weight"
            if head_kind is not None and name == head:
                tensors[name] = (gguf.quants.quantize(np.ascontiguousarray(w), head_kind), head_kind)
                continue
        tensors[name] = (np.ascontiguousarray(w), None)
    return write_gguf(path, tensors, metadata={**llama_metadata(config), **(extra_metadata or {})})


# A byte-level BPE vocabulary in GGUF metadata: 3 control tokens, printable ASCII (space spelled "Ġ"), "Ċ", 5 merges.
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_TOKENS += ["Ġ" if b == 32 else chr(b) for b in range(32, 127)] + ["Ċ", "he", "ll", "hell", "hello", "Ġw"]
TINY_TOKENIZER = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "smollm",
    "tokenizer.ggml.tokens": TINY_TOKENS,
    "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(TINY_TOKENS) - 3),
    "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ w"],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
    "tokenizer.ggml.padding_token_id": 2,
    "tokenizer.chat_template": ChatML("Be brief.").jinja,
}


def write_tiny_chat_gguf(path, d_ff: int = 48, head_kind=None):
    """A random tiny chat Llama (ChatML byte-level tokenizer above) as llama.cpp writes it; weights wider than the
    init's, so the replies vary (not one repeated token). ``d_ff=64``: widths the int4 kernel takes. ``head_kind``
    (a ggml type): the tied head stored in it, the vocabulary padded with unused control tokens to 112 (a multiple
    of 16, as the Q8_0 head's kernel takes)."""
    import torch

    tokenizer, tokens = TINY_TOKENIZER, TINY_TOKENS
    if head_kind is not None:
        tokens = TINY_TOKENS + [f"<|unused_{i}|>" for i in range(-len(TINY_TOKENS) % 16)]
        tokenizer = {**TINY_TOKENIZER, "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(TINY_TOKENS) - 3) + [3] * (len(tokens) - len(TINY_TOKENS))}  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), max_len=96, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         d_ff=d_ff)  # fmt: skip
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    return write_llama_gguf(path, model, tokenizer, head_kind=head_kind)
