"""Tokenizers: lossless round trips, deterministic BPE training, WordPiece ids equal to two HF implementations."""

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from archlab.data.corpora import stdlib_files
from archlab.data.tokenizers import (
    REPLACEMENT_CHAR,
    SPECIAL_TOKENS,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    load_tokenizer,
    minilm_wordpiece,
    train_bpe,
)
from archlab.errors import ConfigError, DataError

UNICODE_SAMPLES = [
    "",
    "hello world",
    "def f(x):\n\treturn x  # café\r\n",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文 日本語 한국어 العربية עברית",
    "<s></s><pad><mask> literal specials",
    "\x00\x01 control \u200b zero-width \U0010ffff",
    "    deeply\n        indented\n\n\n",
]


def _small_corpus(n_bytes=300_000):
    texts, total = [], 0
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total > n_bytes:
            return texts
    return texts


@pytest.fixture(scope="module")
def corpus():
    return _small_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe(corpus, vocab_size=1000)


# -- byte -------------------------------------------------------------------------------------------------------
@given(st.text())
@settings(max_examples=200, deadline=None)
def test_byte_round_trip_and_definition(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_specials_and_decode_rules():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id] == [256, 257, 258, 259, 260]
    assert (tok.cls_id, tok.sep_id) == (tok.bos_id, tok.eos_id)
    assert (
        tok.decode([tok.bos_id, *tok.encode("hi"), tok.unk_id, *tok.encode("!"), tok.eos_id, tok.pad_id]) == "hi\ufffd!"
    )
    for text in UNICODE_SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_byte_errors():
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(DataError, match=r"token id 261 is out of range .*vocab_size=261"):
        tok.decode([1, 261])
    with pytest.raises(DataError, match="token id -1"):
        tok.decode([-1])


def test_hf_tokenizers_refuse_a_lone_surrogate_as_the_byte_one_does(bpe):
    """Undecodable bytes on a command line or stdin reach the tokenizer as lone surrogates: tokenizers' own
    TypeError ("TextInputSequence must be str") became a traceback in chat, generate --model and embed."""
    for encode in (bpe.encode, lambda text: bpe.encode_batch(["ok", text])):
        with pytest.raises(DataError, match=r"^text is not valid Unicode: lone surrogate '\\udcff' at position 1$"):
            encode("a\udcffb")


# -- char -------------------------------------------------------------------------------------------------------
def test_char_vocabulary_and_unknowns():
    tok = CharTokenizer.from_text(["hello", "world 🙂"])
    assert tok.chars == "".join(sorted(set("helloworld 🙂")))
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(tok.chars)
    assert [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert tok.encode("hello") == [5 + tok.chars.index(c) for c in "hello"]
    assert tok.decode(tok.encode("world 🙂 hello")) == "world 🙂 hello"
    ids = tok.encode("help!")  # p and ! were never seen
    assert ids[3] == ids[4] == tok.unk_id
    assert tok.decode(ids) == f"hel{REPLACEMENT_CHAR}{REPLACEMENT_CHAR}"
    assert tok.decode([tok.bos_id, *tok.encode("ho"), tok.eos_id, tok.pad_id]) == "ho"


@given(st.text(min_size=64, max_size=300))
@settings(max_examples=100, deadline=None)
def test_char_vectorised_path_equals_lookup(text):
    tok = CharTokenizer.from_text("abc 🙂\n" + text[: len(text) // 2])  # the second half has unknowns
    unk = tok.unk_id
    assert tok.encode(text) == [tok._id_of.get(c, unk) for c in text]


def test_char_errors():
    with pytest.raises(ConfigError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(DataError, match="at least one character"):
        CharTokenizer.from_text("")


# -- BPE --------------------------------------------------------------------------------------------------------
@given(st.text())
@settings(max_examples=200, deadline=None)
def test_bpe_round_trip_arbitrary_unicode(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_samples_specials_and_compression(bpe, corpus):
    assert bpe.kind == "bpe" and bpe.vocab_size == 1000
    assert [bpe._tok.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert [bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.unk_id, bpe.mask_id] == [0, 1, 2, 3, 4]
    for text in UNICODE_SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text
    assert not set(bpe.encode("<s></s><pad><mask>")) & set(range(5))  # literal text never becomes a special
    assert bpe.decode([bpe.bos_id, *bpe.encode("x = 1"), bpe.eos_id]) == "x = 1"
    text = corpus[0]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())  # merges learned from Python source compress it


def test_bpe_training_is_deterministic(corpus, tmp_path):
    first, second = train_bpe(corpus, vocab_size=800), train_bpe(corpus, vocab_size=800)
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    other = train_bpe(corpus[::-1][:3], vocab_size=800)  # other texts, other merges: the comparison can fail
    assert other._tok.to_str() != first._tok.to_str()


def test_bpe_training_is_deterministic_across_processes(corpus, tmp_path):
    """Another interpreter (other hash seeds, other thread timing) trains the same file from the same texts."""
    (tmp_path / "texts.json").write_text(json.dumps(corpus))
    script = (
        "import json, sys; from archlab.data.tokenizers import train_bpe; "
        "train_bpe(json.load(open(sys.argv[1])), vocab_size=800).save(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", script, tmp_path / "texts.json", tmp_path / "other"], check=True)
    train_bpe(corpus, vocab_size=800).save(tmp_path / "here")
    assert (tmp_path / "other/tokenizer.json").read_bytes() == (tmp_path / "here/tokenizer.json").read_bytes()


def test_bpe_errors(corpus):
    with pytest.raises(ConfigError, match=r"vocab_size=100 must be an integer >= 261"):
        train_bpe(corpus, vocab_size=100)
    with pytest.raises(ConfigError, match="min_frequency=0"):
        train_bpe(corpus, vocab_size=300, min_frequency=0)


def test_bpe_refuses_a_vocabulary_above_max_bpe_vocab_before_the_trainer_is_made(monkeypatch):
    """vocab_size=10**9 on a tiny corpus: the tokenizers trainer reserved ~70 GB for it and aborted the process."""
    import tokenizers.trainers

    def never(**kwargs):
        raise AssertionError("the BPE trainer was made")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", never)
    with pytest.raises(ConfigError, match=r"vocab_size=1000000000 must be <= 1,048,576 .*MAX_BPE_VOCAB"):
        train_bpe(["ab ab"], vocab_size=10**9)


@pytest.mark.parametrize(
    "texts, words",
    [
        ("hello world", "texts must be an iterable of strings, got one string"),  # was: one text per character
        (["ok", 3], r"texts\[1\] is int, expected a string"),  # was: TypeError from the tokenizers library
        (["a\udcff"], "lone surrogate"),  # was: UnicodeEncodeError
    ],
)
def test_bpe_texts_must_be_strings(texts, words):
    with pytest.raises(DataError, match=words):
        train_bpe(texts, vocab_size=300)


def test_a_char_tokenizer_of_a_lone_surrogate_is_refused_before_it_is_saved(tmp_path):
    """It was built, then save() raised UnicodeEncodeError half-way through writing tokenizer.json."""
    with pytest.raises(DataError, match="lone surrogate"):
        CharTokenizer.from_text("a\udcff").save(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()


def test_a_tokenizer_that_cannot_encode_a_text_names_its_file(tmp_path):
    """A Unigram tokenizer.json without an unk token raised the library's bare Exception from inside encode."""
    from tokenizers import Tokenizer as HF, models

    HF(models.Unigram([("a", -1.0), ("b", -2.0)])).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "unigram" and tok.encode("ab") == [0, 1]
    words = rf"unigram tokenizer \({re.escape(str(tmp_path / 'tokenizer.json'))}\) cannot encode the text: .*unk"
    with pytest.raises(DataError, match=words):
        tok.encode("abc")
    with pytest.raises(DataError, match=words):
        tok.encode_batch(["ab", "abc"])


# -- WordPiece --------------------------------------------------------------------------------------------------
WORDPIECE_TEXTS = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog. " * 30,  # > 128 tokens: the file's truncation must be off
    "Unaffable naïve café résumé coöperate",
    "中文字符 and 日本語",
    "emoji 🙂 are unknown to this vocabulary",
    "numbers 3.14159 and e-mail a.b@example.com",
]


def test_wordpiece_equals_hf_tokenizers_and_slow_bert_tokenizer():
    from tokenizers import Tokenizer as HF
    from transformers import BertTokenizer

    from archlab.interop.sentence import minilm_path

    tok = minilm_wordpiece()
    hf = HF.from_file(str(minilm_path() / "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()  # the file pads to 128; compare content ids only
    slow = BertTokenizer(str(minilm_path() / "vocab.txt"), do_lower_case=True)  # an independent Python implementation
    assert tok.kind == "wordpiece" and tok.vocab_size == hf.get_vocab_size() == 30522
    for text in WORDPIECE_TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert ids == slow.encode(text, add_special_tokens=False)
    assert len(tok.encode(WORDPIECE_TEXTS[1])) > 128
    assert tok.encode_batch(WORDPIECE_TEXTS) == [tok.encode(t) for t in WORDPIECE_TEXTS]
    roles = {
        "pad": "[PAD]",
        "unk": "[UNK]",
        "cls": "[CLS]",
        "sep": "[SEP]",
        "mask": "[MASK]",
        "bos": "[CLS]",
        "eos": "[SEP]",
    }
    assert tok.specials == {role: hf.token_to_id(name) for role, name in roles.items()}
    assert tok.decode([tok.cls_id, *tok.encode("Hello there"), tok.sep_id, tok.pad_id]) == "hello there"
    assert tok.decode(tok.encode("emoji 🙂")) == "emoji [UNK]"  # HF's own rendering of the unknown token


# -- files ------------------------------------------------------------------------------------------------------
def test_save_and_load_every_kind(tmp_path, bpe):
    from tokenizers import Tokenizer as HF

    text = "x = 'héllo 🙂'\n"
    for tok in (ByteTokenizer(), CharTokenizer.from_text(text), bpe, minilm_wordpiece()):
        path = tok.save(tmp_path / tok.kind)
        assert path == tmp_path / tok.kind / "tokenizer.json"
        for where in (path.parent, path):
            loaded = load_tokenizer(where)
            assert type(loaded) is type(tok) and loaded.kind == tok.kind
            assert loaded.vocab_size == tok.vocab_size and loaded.specials == tok.specials
            assert loaded.encode(text) == tok.encode(text)
    assert HF.from_file(str(tmp_path / "bpe/tokenizer.json")).encode(text).ids == bpe.encode(text)  # HF's own format


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is not a JSON tokenizer file"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"archlab_tokenizer": "word", "special_tokens": list(SPECIAL_TOKENS)}))
    with pytest.raises(DataError, match="unknown archlab_tokenizer 'word'; known: byte, char"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"archlab_tokenizer": "char", "special_tokens": ["<pad>"], "chars": "ab"}))
    with pytest.raises(DataError, match="special_tokens"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"vocab": {}}))
    with pytest.raises(DataError, match="neither an archlab tokenizer nor a Hugging Face"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(DataError, match="not a tokenizer file the tokenizers library can read"):
        HFTokenizer.from_file(bad)
