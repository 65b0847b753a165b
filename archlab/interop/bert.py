"""Hugging Face BERT <-> archlab BERT: configs, state dicts and folders, both ways.

Layouts (``i`` a layer index; ``w`` is ``weight`` or ``bias``)::

    Hugging Face (BertModel; "bert." in front in BertForPreTraining)    archlab (BertModel; "bert." likewise)
    embeddings.word_embeddings.weight                                  embeddings.word.weight
    embeddings.position_embeddings.weight                              embeddings.position.embedding.weight
    embeddings.token_type_embeddings.weight                            embeddings.segment.weight
    embeddings.LayerNorm.w                                             embeddings.norm.w
    encoder.layer.i.attention.self.{query,key,value}.w  (3 x [d, d])   encoder.blocks.i.attn.in_proj.w ([3d, d]: q, k, v)
    encoder.layer.i.attention.output.dense.w                           encoder.blocks.i.attn.out_proj.w
    encoder.layer.i.attention.output.LayerNorm.w                       encoder.blocks.i.attn_norm.w
    encoder.layer.i.intermediate.dense.w                               encoder.blocks.i.ffn.w1.w
    encoder.layer.i.output.dense.w                                     encoder.blocks.i.ffn.w2.w
    encoder.layer.i.output.LayerNorm.w                                 encoder.blocks.i.ffn_norm.w
    pooler.dense.w                                                     pooler.w
    BertForPreTraining heads:
    cls.predictions.transform.dense.w                                  mlm.dense.w
    cls.predictions.transform.LayerNorm.w                              mlm.norm.w
    cls.predictions.bias            (= cls.predictions.decoder.bias)   mlm.bias
    cls.predictions.decoder.weight  (= word embeddings, tied)          none: the head uses embeddings.word.weight
    cls.seq_relationship.w                                             nsp.w
    BertForSequenceClassification head ("bert." in front of the encoder on both sides):
    classifier.w                                                       classifier.w

Checkpoints read: a ``BertModel``, ``BertForPreTraining`` or ``BertForSequenceClassification`` folder, and the BERT weights of a
sentence-transformers folder, whatever prefix they carry (none, ``bert.``, ``0.``, ``0.auto_model.``).
The non-persistent buffers old checkpoints carry (``embeddings.position_ids``) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import check_state_dict, id2label_count, read_hf_folder, write_hf_folder
from archlab.models.bert import INIT_STD, BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel

ANCHOR = "embeddings.word_embeddings.weight"  # the key that locates the encoder inside any layout
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # index buffers, not weights
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # copies of other tensors
QKV = ("query", "key", "value")
# the head a checkpoint carries -> the archlab class holding it ("" = the bare encoder)
HEADS = {"": BertModel, "pretraining": BertForPreTraining, "classification": BertForSequenceClassification}
Bert = BertModel | BertForPreTraining | BertForSequenceClassification

# Hugging Face's BertConfig defaults, used for keys a config.json leaves out (as from_pretrained does).
HF_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
)  # fmt: skip
# archlab's BertConfig field -> the config.json key it comes from
HF_NAMES = dict(
    vocab_size="vocab_size", max_len="max_position_embeddings", type_vocab_size="type_vocab_size",
    d_model="hidden_size", n_heads="num_attention_heads", n_layers="num_hidden_layers", d_ff="intermediate_size",
    attn_dropout="attention_probs_dropout_prob", dropout="hidden_dropout_prob", eps="layer_norm_eps",
    pad_id="pad_token_id", n_classes="num_labels",
)  # fmt: skip


# ================================================================================================
# Configs
# ================================================================================================


def bert_config_from_hf(hf: Mapping, *, source: str = "config") -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face ``config.json`` dict; another model, or a BERT variant
    archlab does not implement, raises :class:`CheckpointError` naming the field."""
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise CheckpointError(f"{source} describes a {model_type!r} model, not a BERT (model_type='bert')")
    get = lambda key: HF_DEFAULTS[key] if hf.get(key) is None else hf[key]  # noqa: E731
    unsupported = [
        ("hidden_act", get("hidden_act"), ("gelu",)),
        ("position_embedding_type", hf.get("position_embedding_type", "absolute"), ("absolute",)),
        ("is_decoder", hf.get("is_decoder", False), (False,)),
        ("add_cross_attention", hf.get("add_cross_attention", False), (False,)),
    ]
    for key, value, allowed in unsupported:
        if value not in allowed:
            raise CheckpointError(f"{source}: {key}={value!r} is not supported by archlab's BERT (allowed: {allowed})")
    try:
        return BertConfig(
            vocab_size=get("vocab_size"), max_len=get("max_position_embeddings"),
            type_vocab_size=get("type_vocab_size"), d_model=get("hidden_size"),
            n_heads=get("num_attention_heads"), n_layers=get("num_hidden_layers"), d_ff=get("intermediate_size"),
            dropout=get("hidden_dropout_prob"), attn_dropout=get("attention_probs_dropout_prob"),
            eps=get("layer_norm_eps"), pad_id=get("pad_token_id"), n_classes=_num_labels(hf, source),
        )  # fmt: skip
    except ConfigError as e:
        names = [f"{ours}={theirs}" for ours, theirs in HF_NAMES.items() if re.search(rf"\b{ours}=", str(e))]
        raise CheckpointError(f"{source}: {e} (archlab name=Hugging Face name: {', '.join(names)})") from None


def _num_labels(hf: Mapping, source: str = "config") -> int:
    """Hugging Face keeps the class count as ``id2label`` (``num_labels`` is derived from it; default 2)."""
    count = id2label_count(hf, source)
    return (hf.get("num_labels") or 2) if count is None else count


def bert_config_to_hf(config: BertConfig, *, architecture: str = "BertModel") -> dict:
    """A Hugging Face ``config.json`` dict for ``config``; ``architecture``: ``BertModel``,
    ``BertForPreTraining`` or ``BertForSequenceClassification``."""
    labels = [f"LABEL_{i}" for i in range(config.n_classes)]
    return {
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.d_ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attn_dropout,
        "max_position_embeddings": config.max_len,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": INIT_STD,
        "layer_norm_eps": config.eps,
        "pad_token_id": config.pad_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


# ================================================================================================
# State dicts
# ================================================================================================


def _renames(n_layers: int, head: str) -> list[tuple[str, str]]:
    """``(archlab key, HF key)`` of every tensor copied one to one (all but Q/K/V and the tied decoder)."""
    p = "bert." if head else ""
    pairs = [
        ("embeddings.word.weight", ANCHOR),
        ("embeddings.position.embedding.weight", "embeddings.position_embeddings.weight"),
        ("embeddings.segment.weight", "embeddings.token_type_embeddings.weight"),
    ]
    for w in ("weight", "bias"):
        pairs += [(f"embeddings.norm.{w}", f"embeddings.LayerNorm.{w}"), (f"pooler.{w}", f"pooler.dense.{w}")]
        for i in range(n_layers):
            a, h = f"encoder.blocks.{i}.", f"encoder.layer.{i}."
            pairs += [
                (a + f"attn.out_proj.{w}", h + f"attention.output.dense.{w}"),
                (a + f"attn_norm.{w}", h + f"attention.output.LayerNorm.{w}"),
                (a + f"ffn.w1.{w}", h + f"intermediate.dense.{w}"),
                (a + f"ffn.w2.{w}", h + f"output.dense.{w}"),
                (a + f"ffn_norm.{w}", h + f"output.LayerNorm.{w}"),
            ]
    pairs = [(p + a, p + h) for a, h in pairs]
    if head == "classification":
        pairs += [(f"classifier.{w}", f"classifier.{w}") for w in ("weight", "bias")]
    if head == "pretraining":
        pairs.append(("mlm.bias", "cls.predictions.bias"))
        for w in ("weight", "bias"):
            pairs += [
                (f"mlm.dense.{w}", f"cls.predictions.transform.dense.{w}"),
                (f"mlm.norm.{w}", f"cls.predictions.transform.LayerNorm.{w}"),
                (f"nsp.{w}", f"cls.seq_relationship.{w}"),
            ]
    return pairs


def _state_to_hf(state: Mapping[str, Tensor], n_layers: int, head: str) -> dict[str, Tensor]:
    p = "bert." if head else ""
    out = {h: state[a] for a, h in _renames(n_layers, head)}
    for i in range(n_layers):
        for w in ("weight", "bias"):
            q, k, v = state[f"{p}encoder.blocks.{i}.attn.in_proj.{w}"].chunk(3, dim=0)
            for name, t in zip(QKV, (q, k, v), strict=True):
                out[f"{p}encoder.layer.{i}.attention.self.{name}.{w}"] = t
    if head == "pretraining":
        out["cls.predictions.decoder.weight"] = state["bert.embeddings.word.weight"]
        out["cls.predictions.decoder.bias"] = state["mlm.bias"]
    return out


def _state_from_hf(hf: Mapping[str, Tensor], n_layers: int, head: str) -> dict[str, Tensor]:
    p = "bert." if head else ""
    out = {a: hf[h] for a, h in _renames(n_layers, head)}
    for i in range(n_layers):
        for w in ("weight", "bias"):
            parts = [hf[f"{p}encoder.layer.{i}.attention.self.{name}.{w}"] for name in QKV]
            out[f"{p}encoder.blocks.{i}.attn.in_proj.{w}"] = torch.cat(parts, dim=0)
    return out


def _canonical(hf: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], str]:
    """Hugging Face's own layout (``BertModel``'s keys, or those of a model with a head), and the head
    (a key of :data:`HEADS`).

    Strips whatever prefix the encoder carries, drops index buffers, and folds the tied decoder
    copies into the tensors they copy (refusing them if they differ).
    """
    prefixes = {k[: -len(ANCHOR)] for k in hf if k.endswith(ANCHOR)}
    if not prefixes:
        shown = ", ".join(sorted(hf)[:5]) or "none"
        raise CheckpointError(f"{source} holds no BERT encoder: no '{ANCHOR}' key (keys: {shown}, ...)")
    if len(prefixes) > 1:
        raise CheckpointError(f"{source} holds several BERT encoders (prefixes {sorted(prefixes)}); expected one")
    prefix = prefixes.pop()
    pretraining = any(k.startswith("cls.") for k in hf)
    classification = any(k.startswith("classifier.") for k in hf)
    if pretraining and classification:
        raise CheckpointError(f"{source} holds both pre-training (cls.*) and classification (classifier.*) heads")
    head = "pretraining" if pretraining else "classification" if classification else ""
    target = "bert." if head else ""
    out: dict[str, Tensor] = {}
    for key, value in hf.items():
        if not key.startswith(("cls.", "classifier.")) and key.startswith(prefix):
            key = target + key[len(prefix) :]
        out[key] = value
    for buffer in BUFFERS:
        out.pop(target + buffer, None)
    decoder_w, decoder_b = (out.pop(k, None) for k in TIED)
    embeddings = out.get(target + ANCHOR)
    if decoder_w is not None and not (decoder_w.shape == embeddings.shape and torch.equal(decoder_w, embeddings)):
        raise CheckpointError(
            f"{source}: cls.predictions.decoder.weight differs from the word embeddings; archlab's BERT ties them "
            "(untied output embeddings are not supported)"
        )
    if decoder_b is not None:
        bias = out.setdefault("cls.predictions.bias", decoder_b)
        if not (bias.shape == decoder_b.shape and torch.equal(bias, decoder_b)):
            raise CheckpointError(f"{source}: cls.predictions.decoder.bias differs from cls.predictions.bias")
    return out, head


def bert_from_hf(hf_config: Mapping, hf_state: Mapping[str, Tensor], *, source: str = "Hugging Face state dict") -> Bert:
    """An archlab model holding a Hugging Face BERT checkpoint (tensors copied, in the checkpoint's dtype).

    Returns :class:`BertForPreTraining` if the checkpoint has the pre-training heads (``cls.*``),
    :class:`BertForSequenceClassification` if it has a ``classifier.*`` head (its class count from
    ``id2label``), else :class:`BertModel`. Missing, unexpected or misshapen tensors raise
    :class:`CheckpointError` naming them in Hugging Face's terms.
    """
    config = bert_config_from_hf(hf_config, source=source)
    state, head = _canonical(hf_state, source)
    with torch.device("meta"):  # names and shapes only: weights that do not fit are refused before any allocation
        expected = _state_to_hf(HEADS[head](config).state_dict(), config.n_layers, head)
    for key in TIED:
        expected.pop(key, None)
    check_state_dict(expected, state, source)
    model = HEADS[head](config)
    dtype = state[("bert." if head else "") + ANCHOR].dtype
    if not dtype.is_floating_point:
        raise CheckpointError(f"{source}: {ANCHOR} has dtype {dtype}; expected floating-point weights")
    model.to(dtype).load_state_dict(_state_from_hf(state, config.n_layers, head))
    return model


def bert_to_hf(model: Bert) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json dict, state dict)`` of the Hugging Face model of the same class.

    The state dict has exactly the keys of that model's ``state_dict()`` (for ``BertForPreTraining``
    that includes the tied ``cls.predictions.decoder.*`` entries), so ``load_state_dict`` takes it strictly.
    """
    head = next((h for h, cls in HEADS.items() if type(model) is cls), None)
    if head is None:
        raise CheckpointError(
            f"Hugging Face conversion covers {', '.join(c.__name__ for c in HEADS.values())}, got {type(model).__name__}"
        )
    state = _state_to_hf(model.state_dict(), model.config.n_layers, head)
    return bert_config_to_hf(model.config, architecture=type(model).__name__), state


# ================================================================================================
# Folders
# ================================================================================================


def load_bert(folder: str | Path) -> Bert:
    """The BERT in a Hugging Face (or sentence-transformers) folder: ``config.json`` + ``model.safetensors``.

    :class:`BertForPreTraining` or :class:`BertForSequenceClassification` if the folder has that head, else
    :class:`BertModel`
    (take ``.bert`` of the former for the encoder alone). Never unpickles, never uses the network.
    """
    folder = Path(folder)
    hf_config, hf_state = read_hf_folder(folder)
    return bert_from_hf(hf_config, hf_state, source=str(folder))


def save_bert(model: Bert, folder: str | Path) -> None:
    """Write a folder the ``from_pretrained`` of the Hugging Face class of the same name loads offline.

    Written atomically; the tied decoder copies are left out, as ``save_pretrained`` does.
    """
    config, state = bert_to_hf(model)
    for key in TIED:
        state.pop(key, None)
    write_hf_folder(folder, config, state)


__all__ = ["bert_config_from_hf", "bert_config_to_hf", "bert_from_hf", "bert_to_hf", "load_bert", "save_bert"]
