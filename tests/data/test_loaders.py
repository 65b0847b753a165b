"""Batch sources: the batch contract, resume from state, sharding, fixed validation, MLM masking rates, errors."""

import json

import numpy as np
import pytest
import torch

from archlab.data.loaders import IGNORE_INDEX, ClassificationBatches, LMWindows, MLMBatches, Seq2SeqBatches
from archlab.data.synthetic import SyntheticTask
from archlab.data.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer
from archlab.errors import ConfigError, DataError, ShapeError

# A tokenizer with 5000 distinct "word" characters: every position of a stream np.arange(5, 5005) is unique.
WIDE = CharTokenizer(chr(0x4E00 + i) for i in range(5000))
STREAM = np.arange(5, WIDE.vocab_size, dtype=np.int64)


def _make(kind, **kw):
    if kind == "lm":
        return LMWindows(np.arange(10_000) % 50_000, seq_len=16, batch_size=8, valid=np.arange(100), **kw)
    if kind == "mlm":
        return MLMBatches(STREAM, WIDE, seq_len=24, batch_size=8, valid=STREAM[:500], **kw)
    if kind == "seq2seq":
        task = SyntheticTask("dates")
        return Seq2SeqBatches.from_text(task.pairs(100), task.tokenizer(), batch_size=8,
                                        valid=task.pairs(20, split="valid"), **kw)  # fmt: skip
    if kind == "classification_ids":
        seqs = [list(range(1, 2 + i % 9)) for i in range(90)]
        return ClassificationBatches(seqs, [i % 3 for i in range(90)], batch_size=8, pad_id=0,
                                     valid=(seqs[:10], [0] * 10), **kw)  # fmt: skip
    x = torch.arange(60 * 4, dtype=torch.float32).reshape(60, 4)
    return ClassificationBatches(
        x, torch.arange(60) % 5, batch_size=8, valid=(x[:13], torch.zeros(13, dtype=torch.long)), **kw
    )


KINDS = ["lm", "mlm", "seq2seq", "classification_ids", "classification_features"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the generic contract ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_and_seed_dependent(kind):
    a, b, c = _make(kind, seed=1), _make(kind, seed=1), _make(kind, seed=2)
    first = [next(a) for _ in range(3)]
    assert all(_equal(x, next(b)) for x in first)
    assert not all(_equal(x, next(c)) for x in first)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_state_gives_the_same_next_batches(kind):
    source = _make(kind, seed=3)
    for _ in range(5):
        next(source)
    state = json.loads(json.dumps(source.state_dict()))  # JSON-serialisable
    assert state == {"kind": type(source).__name__, "step": 5, "seed": 3, "batch_size": 8}
    expected = [next(source) for _ in range(4)]
    resumed = _make(kind, seed=3)
    resumed.load_state_dict(state)
    assert all(_equal(e, next(resumed)) for e in expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_ranks_are_disjoint_slices_of_the_single_process_batch(kind, world_size):
    single = _make(kind, seed=5)
    ranks = [_make(kind, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(3):
        whole = next(single)
        parts = [next(r) for r in ranks]
        assert all(len(p[next(iter(p))]) == 8 // world_size for p in parts)
        assert _equal(whole, {k: torch.cat([p[k] for p in parts]) for k in whole})


@pytest.mark.parametrize("kind", KINDS)
def test_eval_batches_fixed_finite_and_unsharded(kind):
    source = _make(kind, seed=0)
    first = list(source.eval_batches())
    assert first and all(_equal(a, b) for a, b in zip(first, source.eval_batches()))
    next(source)  # training progress does not move validation
    sharded = _make(kind, seed=0, rank=1, world_size=2)
    assert all(_equal(a, b) for a, b in zip(first, sharded.eval_batches()))


# -- language modelling ----------------------------------------------------------------------------------------
def test_lm_windows_are_shifted_slices():
    ids = np.arange(5000) * 7 % 4999  # distinct tokens: a window's place in the stream is recoverable
    source = LMWindows(ids, seq_len=32, batch_size=16)
    batch = next(source)
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next tokens
    position = {int(t): i for i, t in enumerate(ids)}
    for row_x, row_y in zip(x, y):
        start = position[int(row_x[0])]
        assert row_x.tolist() == ids[start : start + 32].tolist()
        assert row_y.tolist() == ids[start + 1 : start + 33].tolist()
    starts = torch.tensor([position[int(r[0])] for _ in range(20) for r in next(source)["input_ids"]])
    assert starts.min() >= 0 and starts.max() <= 5000 - 33 and len(set(starts.tolist())) > 250  # spread out


def test_lm_eval_predicts_every_validation_token_once():
    valid = np.arange(1, 1001) % 256
    source = LMWindows(np.arange(100), seq_len=30, batch_size=4, valid=valid)
    batches = list(source.eval_batches())
    labels = torch.cat([b["labels"].flatten() for b in batches])
    assert labels[labels != IGNORE_INDEX].tolist() == valid[1:].tolist()
    inputs = torch.cat([b["input_ids"].flatten() for b in batches])
    assert inputs[labels != IGNORE_INDEX].tolist() == valid[:-1].tolist()
    assert (
        len(list(LMWindows(np.arange(100), seq_len=30, batch_size=4, valid=valid, max_eval_batches=2).eval_batches()))
        == 2
    )


# -- masked language modelling ---------------------------------------------------------------------------------
def test_mlm_row_structure_and_next_sentence():
    source = MLMBatches(STREAM, WIDE, seq_len=32, batch_size=256, seed=0)
    batch = next(source)
    ids, types, labels, nsp = batch["input_ids"], batch["token_type_ids"], batch["labels"], batch["next_sentence_label"]
    assert ids.shape == types.shape == labels.shape == batch["attention_mask"].shape == (256, 32) and nsp.shape == (
        256,
    )
    assert bool((batch["attention_mask"] == 1).all())
    original = torch.where(labels != IGNORE_INDEX, labels, ids)  # undo the masking
    assert bool((ids[:, 0] == WIDE.cls_id).all()) and bool((ids[:, -1] == WIDE.sep_id).all())
    continued = 0
    for row, row_types, row_labels, label in zip(original, types, labels, nsp):
        seps = (row == WIDE.sep_id).nonzero().flatten().tolist()
        assert len(seps) == 2 and 2 <= seps[0] <= 29 and seps[1] == 31
        assert row_types.tolist() == [0] * (seps[0] + 1) + [1] * (31 - seps[0])
        assert bool((row_labels[[0, seps[0], 31]] == IGNORE_INDEX).all())  # specials are never masked
        a, b = row[1 : seps[0]], row[seps[0] + 1 : 31]
        assert torch.equal(a, torch.arange(a[0], a[0] + len(a)))  # A is contiguous text
        assert torch.equal(b, torch.arange(b[0], b[0] + len(b)))
        if label == 0:
            assert b[0] == a[-1] + 1  # IsNext: B continues A
        continued += int(b[0] == a[-1] + 1)
    assert continued < (nsp == 0).sum() + 5  # NotNext rows (label 1) are almost never a continuation
    assert abs(nsp.float().mean().item() - 0.5) < 0.1


def test_mlm_without_nsp():
    batch = next(MLMBatches(STREAM, WIDE, seq_len=16, batch_size=4, nsp=False))
    assert "next_sentence_label" not in batch
    original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
    assert bool((original[:, 0] == WIDE.cls_id).all()) and bool((original[:, -1] == WIDE.sep_id).all())
    assert bool((batch["token_type_ids"] == 0).all())
    assert torch.equal(original[:, 2:-1] - original[:, 1:-2], torch.ones(4, 13, dtype=torch.long))


def test_mlm_masking_rates_80_10_10():
    source = MLMBatches(STREAM, WIDE, seq_len=128, batch_size=512, seed=11)
    batch = next(source)
    ids, labels = batch["input_ids"], batch["labels"]
    content = ~((ids == WIDE.cls_id) | (ids == WIDE.sep_id)) | (labels != IGNORE_INDEX)
    selected = labels != IGNORE_INDEX
    n_content, n_selected = int(content.sum()), int(selected.sum())
    assert n_content == 512 * 125
    assert abs(n_selected / n_content - 0.15) < 0.006  # 4 standard deviations
    as_mask = (ids[selected] == WIDE.mask_id).float().mean().item()
    kept = (ids[selected] == labels[selected]).float().mean().item()
    replaced = 1 - as_mask - kept
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(replaced - 0.1) < 0.015
    randoms = ids[selected & (ids != WIDE.mask_id) & (ids != labels)].double()
    assert abs(randoms.mean().item() / (WIDE.vocab_size - 1) - 0.5) < 0.05  # uniform over the vocabulary


# -- seq2seq ---------------------------------------------------------------------------------------------------
def test_seq2seq_padding_conventions_and_round_trip():
    task = SyntheticTask("reverse", min_length=1, max_length=9)
    tok, pairs = task.tokenizer(), task.pairs(64, seed=0)
    source = Seq2SeqBatches.from_text(pairs, tok, batch_size=64, seed=0)
    batch = next(source)
    src, mask, tgt_in, tgt_out = batch["src_ids"], batch["src_mask"], batch["tgt_in"], batch["tgt_out"]
    assert mask.dtype == torch.bool and src.shape == mask.shape and tgt_in.shape == tgt_out.shape
    assert src.shape[1] == 9 and tgt_in.shape[1] == 10  # longest source; longest target + 1
    decoded = set()
    for s, m, ti, to in zip(src, mask, tgt_in, tgt_out):
        n, k = int(m.sum()), int((to != IGNORE_INDEX).sum()) - 1  # k = target length
        assert m.tolist() == [True] * n + [False] * (len(m) - n) and bool((s[n:] == tok.pad_id).all())
        assert ti[0] == tok.bos_id and torch.equal(ti[1 : k + 1], to[:k]) and to[k] == tok.eos_id
        assert bool((ti[k + 1 :] == tok.pad_id).all()) and bool((to[k + 1 :] == IGNORE_INDEX).all())
        decoded.add((tok.decode(s[:n]), tok.decode(to[:k])))
    assert decoded == set(pairs)  # one epoch of 64 pairs in one batch: each pair exactly once


def test_seq2seq_epochs_cover_every_pair_and_straddle():
    pairs = [([i + 1], [i + 1, i + 1]) for i in range(10)]  # source i+1 identifies the pair
    source = Seq2SeqBatches(pairs, batch_size=4, pad_id=0, bos_id=98, eos_id=99, seed=0)
    stream = torch.cat([next(source)["src_ids"][:, 0] for _ in range(5)]).tolist()  # 20 = two epochs
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(1, 11))
    assert stream[:10] != stream[10:]  # each epoch is its own permutation


def test_seq2seq_eval_in_order():
    pairs = [([i + 1], [1]) for i in range(10)]
    source = Seq2SeqBatches(pairs, batch_size=4, pad_id=0, bos_id=98, eos_id=99, valid=pairs[:7])
    firsts = [b["src_ids"][:, 0].tolist() for b in source.eval_batches()]
    assert firsts == [[1, 2, 3, 4], [5, 6, 7]]


# -- classification --------------------------------------------------------------------------------------------
def test_classification_ids_padding_and_features():
    source = _make("classification_ids", seed=0)
    batch = next(source)
    lengths = batch["attention_mask"].sum(1)
    for row, n in zip(batch["inputs"], lengths):
        assert row[:n].tolist() == list(range(1, n + 1)) and bool((row[n:] == 0).all())
    assert batch["labels"].tolist() == [(n.item() - 1) % 3 for n in lengths]  # labels travel with their inputs
    feats = next(_make("classification_features"))
    assert feats.keys() == {"inputs", "labels"} and feats["inputs"].shape == (8, 4)
    assert torch.equal(feats["labels"], (feats["inputs"][:, 0] / 4).long() % 5)


def test_classification_from_text_and_eval_coverage():
    tok = ByteTokenizer()
    source = ClassificationBatches.from_text(["abc", "de" * 20], [1, 0], tok, max_length=8, batch_size=2,
                                             valid=(["x"], [1]))  # fmt: skip
    batch = next(source)
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(batch["inputs"], batch["attention_mask"])}
    assert rows == {(tok.cls_id, 97, 98, 99, tok.sep_id), (tok.cls_id, *[100, 101] * 3, tok.sep_id)}
    (valid,) = source.eval_batches()
    assert valid["inputs"].tolist() == [[tok.cls_id, 120, tok.sep_id]] and valid["labels"].tolist() == [1]
    digits_like = _make("classification_features")
    labels = torch.cat([b["labels"] for b in digits_like.eval_batches()])
    assert len(labels) == 13


def test_classification_from_text_pads_short_texts_to_min_length_as_text():
    """A TextCNN needs its widest kernel's window of real tokens in every row: a one-letter text ([CLS] x [SEP],
    3 tokens) was handed to a width-4 kernel unpadded and training stopped at its first batch."""
    tok = ByteTokenizer()
    source = ClassificationBatches.from_text(["a", "bcdefg"], [0, 1], tok, max_length=16, batch_size=2,
                                             valid=(["x"], [1]), min_length=5)  # fmt: skip
    batch = next(source)
    rows = {tuple(r[m.bool()].tolist()) for r, m in zip(batch["inputs"], batch["attention_mask"])}
    assert rows == {(tok.cls_id, 97, tok.sep_id, tok.pad_id, tok.pad_id), (tok.cls_id, *range(98, 104), tok.sep_id)}
    (valid,) = source.eval_batches()
    assert valid["inputs"].tolist() == [[tok.cls_id, 120, tok.sep_id, tok.pad_id, tok.pad_id]]
    assert valid["attention_mask"].tolist() == [[1] * 5]
    with pytest.raises(ConfigError, match="max_length=4 is below min_length=5"):
        ClassificationBatches.from_text(["a"], [0], tok, max_length=4, batch_size=1, min_length=5)


# -- errors ----------------------------------------------------------------------------------------------------
def test_config_errors():
    ids = np.arange(100)
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by world_size=4"):
        LMWindows(ids, seq_len=8, batch_size=6, world_size=4)
    with pytest.raises(ConfigError, match="rank=2 must be < world_size=2"):
        LMWindows(ids, seq_len=8, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="seq_len=0 must be an integer >= 1"):
        LMWindows(ids, seq_len=0, batch_size=4)
    with pytest.raises(ConfigError, match="seed=-1"):
        LMWindows(ids, seq_len=8, batch_size=4, seed=-1)
    with pytest.raises(ConfigError, match=r"mask_prob=1.5 must be a number in \(0, 1\)"):
        MLMBatches(STREAM, WIDE, seq_len=16, batch_size=2, mask_prob=1.5)
    with pytest.raises(ConfigError, match="need pad_id"):
        ClassificationBatches([[1, 2]], [0], batch_size=1)


def test_a_batch_larger_than_the_training_set_is_refused():
    """Every global batch holds distinct examples: a batch of 5 from 4 pairs (or examples) is refused up front."""
    pairs = [([i + 3], [i + 3]) for i in range(4)]
    with pytest.raises(ConfigError, match=r"^batch_size=5 is larger than the training set \(4 pairs\).*must be <= 4$"):
        Seq2SeqBatches(pairs, batch_size=5, pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(ConfigError, match=r"^batch_size=6 is larger than the training set \(4 examples\)"):
        ClassificationBatches(torch.zeros(4, 2), [0, 1, 0, 1], batch_size=6)
    with pytest.raises(ConfigError, match=r"batch_size=5 is larger than the training set \(4 examples\)"):
        ClassificationBatches([[1], [2, 3], [4], [5]], [0, 1, 0, 1], batch_size=5, pad_id=0)
    batch = Seq2SeqBatches(pairs, batch_size=4, pad_id=0, bos_id=1, eos_id=2).batch(0)  # the whole set: allowed
    assert sorted(batch["src_ids"][:, 0].tolist()) == [3, 4, 5, 6]


def test_data_errors():
    with pytest.raises(DataError, match=r"ids has 8 tokens; windows of seq_len \+ 1 = 9"):
        LMWindows(np.arange(8), seq_len=8, batch_size=2)
    with pytest.raises(ShapeError, match=r"ids must be a 1-D sequence of token ids, got shape \[2, 5\]"):
        LMWindows(np.zeros((2, 5), dtype=int), seq_len=2, batch_size=2)
    with pytest.raises(DataError, match="integer token ids, got dtype float"):
        LMWindows(np.zeros(50), seq_len=2, batch_size=2)
    with pytest.raises(DataError, match=r"negative token id \(-3\)"):
        LMWindows(np.array([1, 2, -3, 4]), seq_len=2, batch_size=2)
    with pytest.raises(DataError, match="no validation ids"):
        next(LMWindows(np.arange(50), seq_len=2, batch_size=2).eval_batches())
    with pytest.raises(DataError, match=r"pairs\[1\] has an empty source"):
        Seq2SeqBatches([([1], [2]), ([], [3])], batch_size=1, pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(DataError, match="pairs is empty"):
        Seq2SeqBatches([], batch_size=1, pad_id=0, bos_id=1, eos_id=2)
    with pytest.raises(ShapeError, match="inputs have 3 rows but there are 2 labels"):
        ClassificationBatches(torch.zeros(3, 2), [0, 1], batch_size=1)
    with pytest.raises(DataError, match="non-negative integer class ids"):
        ClassificationBatches(torch.zeros(2, 2), [0.5, 1.0], batch_size=1)
    word_level = HFTokenizer.__new__(HFTokenizer)  # a tokenizer without [MASK]
    word_level.kind, word_level.specials = "wordlevel", {"pad": 0}
    with pytest.raises(DataError, match="MLM needs a tokenizer with .* lacks cls, sep, mask"):
        MLMBatches(STREAM, word_level, seq_len=16, batch_size=2)


def test_state_mismatch_errors():
    source = LMWindows(np.arange(100), seq_len=8, batch_size=4, seed=1)
    state = source.state_dict()
    with pytest.raises(DataError, match="data state has seed=1 but this LMWindows has seed=2"):
        LMWindows(np.arange(100), seq_len=8, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="data state has batch_size=4 but this LMWindows has batch_size=8"):
        LMWindows(np.arange(100), seq_len=8, batch_size=8, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="kind='LMWindows' but this Seq2SeqBatches"):
        Seq2SeqBatches([([1], [2])] * 4, batch_size=4, pad_id=0, bos_id=1, eos_id=2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="step=-1"):
        source.load_state_dict({**state, "step": -1})
