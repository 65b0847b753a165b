"""archlab BERT against Hugging Face ``transformers`` BERT, and the converters between them.

For several shapes (odd head count d=60 A=5, three segment types, 1-3 layers), a randomly
initialised HF ``BertForPreTraining`` (every parameter perturbed, so biases and norm gains are
exercised) is converted with ``archlab.interop.bert`` and both run in eval mode on a batch with
padding (``attention_mask``) and two segments (``token_type_ids``):

* last hidden state, pooled output, MLM logits and NSP logits agree within 1e-5 in float32 and
  1e-10 in float64 (HF ``.double()``);
* HF -> archlab -> HF gives back every tensor exactly (``torch.equal``), configs too;
* ``save_bert`` writes a folder ``from_pretrained`` loads offline with the same outputs, and
  ``load_bert`` reads HF's ``save_pretrained`` folders;
* a foreign folder (GPT-2), a missing / unexpected / misshapen tensor, untied decoder weights
  raise ``CheckpointError`` naming the problem.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from archlab.errors import CheckpointError  # noqa: E402
from archlab.interop.bert import (  # noqa: E402
    bert_config_from_hf,
    bert_config_to_hf,
    bert_from_hf,
    bert_to_hf,
    load_bert,
    save_bert,
)
from archlab.interop.io import read_hf_folder, write_hf_folder  # noqa: E402
from archlab.models.bert import (  # noqa: E402
    BertConfig,
    BertCrossEncoder,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

SHAPES = {
    "d60-A5-L1": dict(hidden_size=60, num_attention_heads=5, num_hidden_layers=1, intermediate_size=37),
    "d32-A4-L2-3types": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                             type_vocab_size=3),
    "d48-A3-L3": dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=96),
}  # fmt: skip
VOCAB, MAX_POS = 97, 24


def hf_config(shape: str) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POS, **SHAPES[shape])


def hf_model(shape: str, cls=None, seed: int = 0):
    """A random HF BERT with every parameter perturbed (biases, LayerNorm gains, pad row included)."""
    torch.manual_seed(seed)
    model = (cls or transformers.BertForPreTraining)(hf_config(shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(config: transformers.BertConfig, seed: int = 1):
    """input_ids [3, 13]: row 1 padded after 9 tokens, row 2 after 4; segments 0 | 1 (| 2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    types = torch.zeros(3, 13, dtype=torch.long)
    types[:, 6:] = 1
    types[0, 11:] = config.type_vocab_size - 1
    return ids, mask, types


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def compare(hf, ours, tol: float) -> dict[str, float]:
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        mine = ours(ids, attention_mask=mask, token_type_ids=types)
    errors = {
        "hidden": max_err(mine.hidden, theirs.hidden_states[-1]),
        "mlm_logits": max_err(mine.mlm_logits, theirs.prediction_logits),
        "nsp_logits": max_err(mine.nsp_logits, theirs.seq_relationship_logits),
    }
    with torch.no_grad():
        base = hf.bert(ids, attention_mask=mask, token_type_ids=types)
    errors["pooled"] = max_err(mine.pooled, base.pooler_output)
    assert all(e <= tol for e in errors.values()), errors
    return errors


# -- outputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
def test_outputs_match_float32(shape):
    hf = hf_model(shape)
    ours = bert_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    assert isinstance(ours, BertForPreTraining)
    compare(hf, ours, 1e-5)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_outputs_match_float64(shape):
    hf = hf_model(shape).double()
    ours = bert_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    assert ours.bert.embeddings.word.weight.dtype == torch.float64
    compare(hf, ours, 1e-10)


def test_encoder_alone_matches_hf_bert_model():
    hf = hf_model("d60-A5-L1", cls=transformers.BertModel)
    ours = bert_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    assert type(ours) is BertModel
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types)
        mine = ours(ids, attention_mask=mask, token_type_ids=types)
    assert max_err(mine.hidden, theirs.last_hidden_state) <= 1e-5
    assert max_err(mine.pooled, theirs.pooler_output) <= 1e-5


# -- conversions both ways -----------------------------------------------------------------------


@pytest.mark.parametrize("n_labels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_classification_matches_hf(n_labels, dtype):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=MAX_POS, num_labels=n_labels,
                                     **SHAPES["d60-A5-L1"])  # fmt: skip
    hf = transformers.BertForSequenceClassification(config).eval().to(dtype)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = bert_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    assert type(ours) is BertForSequenceClassification and ours.n_classes == n_labels == ours.config.n_classes
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types).logits
        mine = ours(ids, attention_mask=mask, token_type_ids=types)
    assert max_err(mine, theirs) <= (1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForPreTraining", "BertForSequenceClassification"])
def test_round_trip_is_exact(cls_name):
    hf = hf_model("d32-A4-L2-3types", cls=getattr(transformers, cls_name))
    original = hf.state_dict()
    config, state = bert_to_hf(bert_from_hf(hf.config.to_dict(), original))
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
    hf.load_state_dict(state, strict=True)
    assert config["architectures"] == [cls_name]


def test_config_round_trip():
    for shape in SHAPES:
        ours = bert_config_from_hf(hf_config(shape).to_dict())
        assert bert_config_from_hf(bert_config_to_hf(ours)) == ours
        back = transformers.BertConfig(**bert_config_to_hf(ours))
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id"):  # fmt: skip
            assert getattr(back, key) == getattr(hf_config(shape), key), key


def test_sentence_transformers_prefixes():
    """BERT weights under '0.', '0.auto_model.' or 'bert.' (no heads) load as a plain BertModel."""
    hf = hf_model("d60-A5-L1", cls=transformers.BertModel)
    state = hf.state_dict()
    reference = bert_from_hf(hf.config.to_dict(), state).state_dict()
    for prefix in ("0.", "0.auto_model.", "bert."):
        prefixed = {prefix + k: v for k, v in state.items()}
        prefixed[prefix + "embeddings.position_ids"] = torch.arange(MAX_POS)[None]  # old checkpoints' buffer
        model = bert_from_hf(hf.config.to_dict(), prefixed)
        assert type(model) is BertModel
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


# -- folders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForPreTraining", "BertForSequenceClassification"])
def test_save_bert_loads_in_hf(tmp_path, cls_name):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, max_len=MAX_POS, d_model=60, n_heads=5, n_layers=2, d_ff=37, n_classes=4)
    classes = {"BertModel": BertModel, "BertForPreTraining": BertForPreTraining,
               "BertForSequenceClassification": BertForSequenceClassification}  # fmt: skip
    ours = classes[cls_name](config).eval()
    save_bert(ours, tmp_path / "bert")
    hf = getattr(transformers, cls_name).from_pretrained(tmp_path / "bert", local_files_only=True).eval()
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, token_type_ids=types)
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    if cls_name == "BertModel":
        assert max_err(mine.hidden, theirs.last_hidden_state) <= 1e-5
        assert max_err(mine.pooled, theirs.pooler_output) <= 1e-5
    elif cls_name == "BertForSequenceClassification":
        assert hf.config.num_labels == 4
        assert max_err(mine, theirs.logits) <= 1e-5
    else:
        assert max_err(mine.mlm_logits, theirs.prediction_logits) <= 1e-5
        assert max_err(mine.nsp_logits, theirs.seq_relationship_logits) <= 1e-5
    # and back: archlab reads the folder it wrote
    again = load_bert(tmp_path / "bert")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_load_bert_reads_save_pretrained(tmp_path):
    hf = hf_model("d48-A3-L3")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_bert(tmp_path / "hf").eval()
    assert isinstance(ours, BertForPreTraining)
    compare(hf, ours, 1e-5)


def test_foreign_folder_is_refused(tmp_path):
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="'gpt2' model, not a BERT"):
        load_bert(tmp_path / "gpt2")


def test_weights_of_another_model_under_a_bert_config(tmp_path):
    config, _ = read_hf_folder(_saved(tmp_path))
    write_hf_folder(tmp_path / "odd", config, {"h.0.attn.c_attn.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="no BERT encoder"):
        load_bert(tmp_path / "odd")


def _saved(tmp_path):
    hf = hf_model("d60-A5-L1", cls=transformers.BertModel)
    hf.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    config, state = read_hf_folder(_saved(tmp_path))
    missing = dict(state)
    del missing["encoder.layer.0.attention.self.key.weight"]
    write_hf_folder(tmp_path / "missing", config, missing)
    with pytest.raises(CheckpointError, match="missing keys: encoder.layer.0.attention.self.key.weight"):
        load_bert(tmp_path / "missing")

    extra = {**state, "encoder.layer.1.output.dense.weight": torch.zeros(60, 37)}
    write_hf_folder(tmp_path / "extra", config, extra)
    with pytest.raises(CheckpointError, match="unexpected keys: encoder.layer.1.output.dense.weight"):
        load_bert(tmp_path / "extra")

    write_hf_folder(tmp_path / "shape", {**config, "intermediate_size": 40}, state)
    mismatch = r"encoder.layer.0.intermediate.dense.weight: checkpoint \(37, 60\) vs model \(40, 60\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_bert(tmp_path / "shape")


def test_unsupported_config_values_are_refused(tmp_path):
    config, state = read_hf_folder(_saved(tmp_path))
    for key, value in (("hidden_act", "relu"), ("position_embedding_type", "relative_key"), ("is_decoder", True)):
        write_hf_folder(tmp_path / key, {**config, key: value}, state)
        with pytest.raises(CheckpointError, match=f"{key}={value!r} is not supported"):
            load_bert(tmp_path / key)
    write_hf_folder(tmp_path / "heads", {**config, "num_attention_heads": 7}, state)
    message = "d_model=60 is not divisible by n_heads=7.*d_model=hidden_size, n_heads=num_attention_heads"
    with pytest.raises(CheckpointError, match=message):
        load_bert(tmp_path / "heads")


def test_untied_decoder_is_refused():
    hf = hf_model("d60-A5-L1")
    state = dict(hf.state_dict())
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="decoder.weight differs from the word embeddings"):
        bert_from_hf(hf.config.to_dict(), state)


def test_cross_encoder_has_no_hf_class():
    model = BertCrossEncoder(BertConfig(vocab_size=VOCAB, max_len=MAX_POS, d_model=32, n_heads=4, n_layers=1, d_ff=8),
                             cls_id=1, sep_id=2)  # fmt: skip
    with pytest.raises(CheckpointError, match="BertCrossEncoder"):
        bert_to_hf(model)


def test_both_heads_are_refused():
    hf = hf_model("d60-A5-L1")
    state = {**hf.state_dict(), "classifier.weight": torch.zeros(2, 60), "classifier.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="both pre-training"):
        bert_from_hf(hf.config.to_dict(), state)
