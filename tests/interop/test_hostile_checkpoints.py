"""Hostile checkpoint files: each refused with a CheckpointError naming the file (or key), the value and what is
allowed, before any model is built; never a bare Python error, never weights silently dropped or picked.

Covered here (what earlier audits left): malformed sharded indexes and a tensor in two shards; tied tensors stored
twice with different values (archlab folders, HF RWKV); HF config values of the wrong JSON type (Llama, ViT,
BERT, GPT-2); GGUF metadata with a zero head count or sizes the tensors do not have.
"""

from __future__ import annotations

import json

import pytest
import torch
from gguf_files import write_llama_gguf
from safetensors.torch import load_file, save_file

import archlab.interop.gguf as gguf_module
from archlab.errors import CheckpointError
from archlab.interop.bert import bert_config_from_hf
from archlab.interop.gguf import load_gguf
from archlab.interop.gpt2 import config_from_gpt2
from archlab.interop.io import load_model, read_hf_folder, save_model
from archlab.interop.llama import load_llama, save_llama
from archlab.interop.rwkv import load_rwkv, save_rwkv
from archlab.interop.vit import config_from_hf as vit_config_from_hf
from archlab.models.gpt import GPT
from archlab.models.llama import Llama, LlamaConfig
from archlab.models.registry import get_config
from archlab.models.rwkv import RWKV, RWKVConfig

TINY_LLAMA = LlamaConfig(vocab_size=64, max_len=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=48)


# --- sharded Hugging Face folders ----------------------------------------------------------------


def _sharded(folder, weight_map, shards):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("weight_map, words", [
    (["s1.safetensors"], r"weight_map=\['s1.safetensors'\] must be a non-empty object"),
    (None, "weight_map=None must be a non-empty object"),
    ({"a": 3}, r"weight_map\['a'\]=3 must be the name of a shard file in "),
    ({"a": "../other/s1.safetensors"}, r"weight_map\['a'\]='../other/s1.safetensors' must be the name of a shard file"),
])  # fmt: skip
def test_a_malformed_shard_index_is_refused_naming_the_index(tmp_path, weight_map, words):
    """Before: a list raised AttributeError, a number TypeError, and '../' read a shard of another folder."""
    other = _sharded(tmp_path / "other", {"a": "s1.safetensors"}, {"s1.safetensors": {"a": torch.ones(1)}})
    assert set(read_hf_folder(other)[1]) == {"a"}
    folder = _sharded(tmp_path / "hf", weight_map, {"s1.safetensors": {"a": torch.ones(1)}})
    with pytest.raises(CheckpointError, match=r"hf/model\.safetensors\.index\.json: " + words):
        read_hf_folder(folder)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    """Before: the later shard's value silently replaced the one the index names."""
    shards = {"s1.safetensors": {"a": torch.ones(2)}, "s2.safetensors": {"a": torch.zeros(2), "b": torch.ones(1)}}
    folder = _sharded(tmp_path / "hf", {"a": "s1.safetensors", "b": "s2.safetensors"}, shards)
    with pytest.raises(CheckpointError, match=r"tensor 'a' is stored in two shards, s1\.safetensors and s2\.safet"):
        read_hf_folder(folder)


# --- tied tensors stored twice --------------------------------------------------------------------


def test_an_archlab_folder_with_differing_copies_of_tied_tensors_is_refused(tmp_path):
    """A tied GPT stores its head once; a file holding the embedding too, with other values, lost it silently."""
    model = GPT(get_config("gpt-nano"))
    assert model.config.tie_embeddings
    save_model(model, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    state["tok_emb.weight"] = torch.zeros_like(state["lm_head.weight"])
    save_file(state, str(weights), metadata={"format": "pt", "archlab": "1", "archlab_model": "GPT"})
    with pytest.raises(CheckpointError, match=r"lm_head\.weight and tok_emb\.weight differ, but the model ties them"):
        load_model(tmp_path / "m")
    state["tok_emb.weight"] = state["lm_head.weight"].clone()  # equal copies are fine
    save_file(state, str(weights), metadata={"format": "pt", "archlab": "1", "archlab_model": "GPT"})
    assert torch.equal(load_model(tmp_path / "m").tok_emb.weight, state["lm_head.weight"])


def test_a_tied_rwkv_folder_whose_head_differs_from_the_embedding_is_refused(tmp_path):
    """Before: load_rwkv dropped the differing head.weight silently (GPT-2 and Llama refused it already)."""
    save_rwkv(RWKV(RWKVConfig(vocab_size=30, d_model=16, n_layers=2, tie_embeddings=True)), tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state["head.weight"] = torch.zeros_like(state["rwkv.embeddings.weight"])
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"hf: head\.weight differs from rwkv\.embeddings\.weight, but the"):
        load_rwkv(tmp_path / "hf")


# --- Hugging Face config values of the wrong type --------------------------------------------------


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": None, "head_dim": 8}, "n_heads=None must be an integer"),  # was a TypeError
    ({"head_dim": "8"}, "head_dim='8' must be an integer"),
    ({"rope_theta": "abc", "rope_parameters": None}, "rope_theta='abc' must be a number"),
    ({"rope_scaling": "linear", "rope_parameters": None}, "rope_parameters / rope_scaling='linear' must be an object"),
    ({"attention_dropout": "x"}, "attn_dropout='x' must be a number"),
])  # fmt: skip
def test_llama_config_values_of_the_wrong_type_are_named(tmp_path, change, words):
    """Before: float('abc') raised a bare ValueError, a string rope_scaling an AttributeError."""
    save_llama(Llama(TINY_LLAMA), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=r"hf/config\.json: " + words):
        load_llama(tmp_path / "hf")


VIT = {"model_type": "vit", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
       "intermediate_size": 64, "image_size": 32, "patch_size": 8}  # fmt: skip


@pytest.mark.parametrize("change, words", [
    ({"hidden_size": 32.9}, "d_model=32.9 must be an integer"),  # int() cut it to 32 silently
    ({"num_hidden_layers": True}, "n_layers=True must be an integer"),  # int(True) made 1 layer
    ({"image_size": [32.5, 32.5]}, "image_size=32.5 must be an integer"),
    ({"hidden_size": "abc"}, "d_model='abc' must be an integer"),  # a bare ValueError
    ({"hidden_dropout_prob": "x"}, "dropout='x' must be a number"),
    ({"architectures": ["ViTForImageClassification"], "id2label": 5}, "id2label=5 must be an object"),
])  # fmt: skip
def test_vit_config_values_of_the_wrong_type_are_refused_not_truncated(change, words):
    with pytest.raises(CheckpointError, match=words):
        vit_config_from_hf({**VIT, **change})


def test_bert_id2label_and_gpt2_activation_of_the_wrong_type_are_named():
    """Before: len(5) raised TypeError; a list activation 'unhashable type'."""
    bert = {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 64, "vocab_size": 100, "id2label": 5}  # fmt: skip
    with pytest.raises(CheckpointError, match=r"bert/config\.json: id2label=5 must be an object"):
        bert_config_from_hf(bert, source="bert/config.json")
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 100}
    with pytest.raises(CheckpointError, match=r"activation_function=\['gelu'\] is not supported; known: gelu, "):
        config_from_gpt2({**gpt2, "activation_function": ["gelu"]})


# --- GGUF metadata ----------------------------------------------------------------------------------


def test_a_gguf_with_zero_heads_is_refused_naming_the_key(tmp_path):
    """Before: hidden_size // head_count raised ZeroDivisionError."""
    path = write_llama_gguf(tmp_path / "t.gguf", Llama(TINY_LLAMA), extra_metadata={"llama.attention.head_count": 0})
    with pytest.raises(CheckpointError, match=r"t\.gguf: metadata llama\.attention\.head_count=0 must be a positive"):
        load_gguf(path)


def test_gguf_sizes_the_tensors_do_not_have_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """feed_forward_length=10**9 with a tiny file: the float Llama (12 GB a matrix) was built before any check."""
    path = write_llama_gguf(tmp_path / "t.gguf", Llama(TINY_LLAMA), extra_metadata={"llama.feed_forward_length": 10**9})
    built = []
    monkeypatch.setattr(gguf_module, "Llama", lambda config: built.append(config) or Llama(config))
    with pytest.raises(CheckpointError, match=r"t\.gguf does not fit the model: shape mismatches: .*\(1000000000, 32"):
        load_gguf(path)
    assert built == []


@pytest.mark.parametrize("value", ["1", 1.0])
def test_a_gguf_special_token_id_that_is_not_a_token_is_refused_naming_the_key(tmp_path, value):
    """A string id raised a bare TypeError (``0 <= "1"``); a float indexed the token list."""
    from gguf_files import TINY_TOKENIZER, write_gguf

    from archlab.interop.gguf import gguf_tokenizer

    path = write_gguf(tmp_path / "t.gguf", {}, metadata={**TINY_TOKENIZER, "tokenizer.ggml.bos_token_id": value})
    with pytest.raises(CheckpointError, match=rf"t\.gguf: tokenizer\.ggml\.bos_token_id={value!r} is not a token id \(an integer\)"):
        gguf_tokenizer(path)
