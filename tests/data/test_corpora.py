"""The standard-library corpus: deterministic, disjoint, stable split; id arrays; the unigram baseline."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from archlab.data.corpora import (
    EXCLUDED_DIRS,
    encode_texts,
    id_dtype,
    is_validation,
    python_source,
    split_documents,
    split_text,
    stdlib_files,
    stdlib_root,
    unigram_loss,
)
from archlab.data.tokenizers import ByteTokenizer, CharTokenizer
from archlab.errors import ConfigError, DataError


def test_stdlib_files_sorted_and_filtered():
    root = stdlib_root()
    files = stdlib_files()
    names = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 300 and names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    assert not any(EXCLUDED_DIRS & set(n.split("/")[:-1]) for n in names)
    assert "os.py" in names and "json/decoder.py" in names


@pytest.fixture(scope="module")
def small():
    return python_source(max_bytes=300_000)


def test_python_source_deterministic_disjoint_capped(small):
    a, b = small, python_source(max_bytes=300_000)
    assert a == b
    assert a.train_texts and a.valid_texts
    assert not set(a.train_names) & set(a.valid_names)
    assert a.n_bytes <= 300_000
    assert all(is_validation(n, 5) for n in a.valid_names)
    assert not any(is_validation(n, 5) for n in a.train_names)
    root = stdlib_root()
    assert a.train_texts[0] == (root / a.train_names[0]).read_text(encoding="utf-8")
    # the cap picks files across the library, not its alphabetical start
    assert len({n.split("/")[0][:1] for n in a.train_names}) > 8


def test_split_is_stable_when_the_cap_changes(small):
    large = python_source(max_bytes=900_000)
    assert set(small.train_names) <= set(large.train_names)
    assert set(small.valid_names) <= set(large.valid_names)
    assert 0.01 < len(large.valid_names) / (len(large.train_names) + len(large.valid_names)) < 0.12  # about 5 %


def test_python_source_skips_unreadable_excluded_and_empty(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    for i in range(60):
        (tmp_path / "pkg" / f"m{i:02d}.py").write_text(f"x = {i}\n")
    (tmp_path / "test" / "test_x.py").write_text("excluded = True\n")
    (tmp_path / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8
    (tmp_path / "empty.py").write_text("")
    corpus = python_source(root=tmp_path, valid_percent=20)
    names = set(corpus.train_names) | set(corpus.valid_names)
    assert names == {f"pkg/m{i:02d}.py" for i in range(60)}
    assert corpus.valid_names and corpus.train_names


def test_python_source_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"max_bytes=0 must be a positive integer or None"):
        python_source(max_bytes=0)
    with pytest.raises(ConfigError, match=r"valid_percent=0 must be an integer in 1..99"):
        python_source(valid_percent=0)
    with pytest.raises(DataError, match="raise max_bytes"):
        python_source(max_bytes=10)
    with pytest.raises(DataError, match="does not exist"):
        python_source(root=tmp_path / "nowhere")


def test_split_documents_and_split_text():
    docs = {f"doc{i}": f"text {i}" for i in range(200)}
    corpus = split_documents(docs, valid_percent=10)
    assert sorted(corpus.train_names + corpus.valid_names) == sorted(docs)
    assert all(docs[n] == t for n, t in zip(corpus.valid_names, corpus.valid_texts))
    text = "".join(f"line {i}\n" for i in range(100))
    halves = split_text(text, valid_percent=10)
    assert halves.train_texts[0] + halves.valid_texts[0] == text
    assert halves.valid_texts[0].splitlines() == [f"line {i}" for i in range(90, 100)]
    with pytest.raises(DataError, match="needs at least 2"):
        split_text("one line only")


def test_split_text_blank_lines_are_not_validation_lines():
    text = "".join(f"line {i}\n" for i in range(100))
    halves = split_text(text + "\n" * 20 + "  \n", valid_percent=10)  # trailing blank lines: none validate
    assert halves.train_texts[0] + halves.valid_texts[0] == text
    assert halves.valid_texts[0].splitlines() == [f"line {i}" for i in range(90, 100)]
    inner = split_text("a\n\n\nb\n\n", valid_percent=10)  # blank lines inside the text stay in it
    assert (inner.train_texts[0], inner.valid_texts[0]) == ("a\n\n\n", "b\n")
    with pytest.raises(DataError, match="1 non-blank line.*needs at least 2"):
        split_text("one line\n\n\n\n", name="trail.txt")


def test_encode_texts_joins_documents_with_eos():
    tok = ByteTokenizer()
    ids = encode_texts(["ab", "", "é"], tok)
    assert ids.dtype == np.uint16
    assert ids.tolist() == [97, 98, tok.eos_id, tok.eos_id, 0xC3, 0xA9, tok.eos_id]
    assert id_dtype(65536) == np.uint16 and id_dtype(65537) == np.int32
    with pytest.raises(DataError, match="no texts"):
        encode_texts([], tok)


def test_unigram_loss_equals_its_definition_and_cross_entropy():
    train = np.array([0, 0, 1, 0, 4])
    valid = np.array([0, 2, 1, 1])
    V = 5
    p = {0: 4 / 10, 1: 2 / 10, 2: 1 / 10}  # (count + 1) / (5 + 5)
    expected = -(math.log(p[0]) + math.log(p[2]) + 2 * math.log(p[1])) / 4
    assert unigram_loss(train, valid, V) == pytest.approx(expected, abs=1e-12)
    log_p = torch.log((torch.bincount(torch.tensor(train), minlength=V).double() + 1) / (len(train) + V))
    ce = F.cross_entropy(log_p.expand(len(valid), V), torch.tensor(valid))
    assert unigram_loss(train, valid, V) == pytest.approx(ce.item(), abs=1e-12)
    with pytest.raises(DataError, match="beyond vocab_size=3"):
        unigram_loss(train, valid, 3)
    with pytest.raises(DataError, match="outside"):
        unigram_loss(train, np.array([7]), V)


def test_real_corpus_with_char_tokenizer_beats_nothing(small):
    corpus = small
    tok = CharTokenizer.from_text(corpus.train_texts)
    train, valid = encode_texts(corpus.train_texts, tok), encode_texts(corpus.valid_texts, tok)
    loss = unigram_loss(train, valid, tok.vocab_size)
    assert 2.0 < loss < math.log(tok.vocab_size)  # below uniform: characters are far from equally likely
