"""`archlab search adapt`'s mechanics on a 50-document index: pseudo-queries, hold-out, negatives, a falling loss,
a saved model that reloads to the same scores (here and in sentence-transformers), determinism, the measurement."""

import math
import random

import pytest
import torch

from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.search.adapt import (
    AdaptConfig,
    adapt,
    format_rows,
    make_queries,
    measure,
    mine_negatives,
    sentence_queries,
    split_sentences,
)
from archlab.search.corpus import Corpus, Document, EvalSet, builtin_corpus, builtin_evalset
from archlab.search.evaluate import evaluate_run

TINY = dict(steps=40, batch_queries=4, negatives=2, mine_depth=10, max_length=96, lr=5e-3, warmup=4, heldout_queries=4,
            generator="sentences")  # the mechanics' checks (e.g. the loss falls 20% in 40 steps on the tiny random
# encoder) are calibrated on later-sentence queries; summary queries have their own test and the CLI test runs them


def tiny_encoder(folder):
    """A sentence-transformers folder holding a random-init 2-layer BERT (d=32) with MiniLM's WordPiece tokenizer:
    the mechanics at a fraction of MiniLM's cost (the real weights are exercised by the real run, see docs/search.md)."""
    import shutil

    from archlab.interop.bert import save_bert
    from archlab.interop.sentence import minilm_path
    from archlab.models.bert import BertConfig, BertModel

    torch.manual_seed(0)
    save_bert(BertModel(BertConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, max_len=128)), folder)
    src = minilm_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json"):
        shutil.copy(src / name, folder / name)
    shutil.copytree(src / "1_Pooling", folder / "1_Pooling")
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An index of 50 real documents (stdlib docstrings, 10 of them judged in the built-in evaluation set)."""
    from archlab.search.engine import SearchEngine
    from archlab.search.index import build_index

    corpus, evalset = builtin_corpus(), builtin_evalset()
    judged = {d for q in evalset.qrels.values() for d in q}
    docs = [d for d in corpus if d.id in judged][:10] + [d for d in corpus if d.id not in judged][:40]
    sub = EvalSet({q: evalset.queries[q] for q, j in evalset.qrels.items() if set(j) <= {d.id for d in docs}})
    sub.qrels = {q: evalset.qrels[q] for q in sub.queries}
    root = tmp_path_factory.mktemp("adapt")
    encoder = tiny_encoder(root / "encoder")
    build_index(Corpus(docs, "small"), root / "index", hybrid=True, precision="fp32", model=encoder)
    return SearchEngine.open(root / "index"), sub, {d for j in sub.qrels.values() for d in j}, encoder


def test_sentences_and_pseudo_queries():
    text = "Return the value. It is cached for later calls!\n\nRaises KeyError when the key is missing? Never."
    assert split_sentences(text) == ["Return the value.", "It is cached for later calls!",
                                     "Raises KeyError when the key is missing?", "Never."]  # fmt: skip
    doc = Document("m.f", "m.f", text + " More words follow here in this sentence.")
    made = sentence_queries(doc, 5, random.Random(0))
    assert made and all(q.doc_id == "m.f" for q in made)
    for q in made:  # the sentence is cut out of its positive; the title stays
        assert len(q.query.split()) >= 4 and q.query not in q.positive and q.positive.startswith("m.f\n\n")


def test_holdout_documents_give_no_query_and_no_negative(small):
    engine, _, held, encoder = small
    config = AdaptConfig(**TINY)
    queries = make_queries(engine.docs, 40, config, held, random.Random(0), print)
    assert len(queries) >= 20 and not {q.doc_id for q in queries} & held
    groups = mine_negatives(engine, queries, config, held, random.Random(0))
    held_texts = {d.full_text for d in engine.docs if d.id in held}
    assert groups and all(not set(g.negatives) & held_texts and len(g.negatives) == 2 for g in groups)
    with pytest.raises(DataError, match="no pseudo-query"):
        make_queries(engine.docs, 10, config, {d.id for d in engine.docs}, random.Random(0), print)


def test_negatives_lose_a_sentence_like_their_positive(small):
    """A sentence pseudo-query's positive is its document minus that sentence; its mined negatives must lose one
    sentence too, else the positive is the shorter text and a barely trained model learns "shorter is more
    relevant" (which ranked the built-in set's longer relevant documents below a random order; docs/search.md)."""
    from archlab.search.adapt import cut_like_a_positive

    text = "Summary line here. Second sentence has five words. Third one is here too, longer. Short."
    doc = Document("m.f", "m.f", text)
    cuts = {cut_like_a_positive(doc, random.Random(seed)) for seed in range(20)}
    sentences = split_sentences(text)
    assert cuts == {Document("m.f", "m.f", " ".join(s for s in sentences if s != gone)).full_text
                    for gone in sentences[1:3]}  # fmt: skip (never the summary, never a sentence under 4 words)
    lone = Document("m.g", "m.g", "Only one sentence in this docstring.")
    assert cut_like_a_positive(lone, random.Random(0)) == lone.full_text

    engine, _, held, _ = small
    config = AdaptConfig(**TINY)  # later sentences: the summary stays
    queries = make_queries(engine.docs, 40, config, held, random.Random(0), print)
    groups = mine_negatives(engine, queries, config, held, random.Random(0))
    cut_forms = set()  # a document with one sentence (not the first) cut out
    for d in engine.docs:
        sentences = split_sentences(d.text)
        cut_forms |= {Document(d.id, d.title, " ".join(sentences[:i] + sentences[i + 1 :])).full_text
                      for i in range(1, len(sentences))}  # fmt: skip
    negatives = [t for g in groups for t in g.negatives]
    assert len(negatives) >= 20 and set(negatives) <= cut_forms  # never a whole document: it would be longer


def test_adapt_loss_falls_and_the_saved_folder_reloads(small, tmp_path):
    from sentence_transformers import CrossEncoder

    from archlab.search.rerank import Reranker

    engine, evalset, held, encoder = small
    result = adapt(engine, AdaptConfig(**TINY), holdout=held, encoder=encoder)
    summary = result.summary()
    print(summary)
    assert summary["loss_last_tenth"] < 0.8 * summary["loss_first_tenth"], result.losses
    folder = result.reranker.save(tmp_path / "reranker")
    docs = engine.docs[:7]
    query = "Return the value of an environment variable"
    again = Reranker.load(folder)
    assert again.max_length == 96
    assert again.score(query, docs) == result.reranker.score(query, docs)
    theirs = CrossEncoder(str(folder), device="cpu").predict([(query, d.full_text) for d in docs])
    torch.testing.assert_close(torch.as_tensor(theirs), torch.tensor(again.score(query, docs)), atol=1e-5, rtol=0)

    rows = measure(engine, again, evalset, depths=(5, 20), max_queries=None)
    print(format_rows(rows, len(evalset.queries)))
    assert [(r.first, r.depth) for r in rows] == [(f, d) for f in ("dense", "hybrid") for d in (0, 5, 20)]
    assert all(0.0 <= r.ndcg10 <= 1.0 for r in rows) and all(r.rerank_ms > 0 for r in rows if r.depth)

    # other fusion weights from the same scores: w = 1 keeps the first stage's order, w = 0 is the cross-encoder's
    weights = sorted({1.0, 0.0, again.first_stage_weight})
    weighed = measure(engine, again, evalset, depths=(5, 20), max_queries=None, weights=weights)
    ndcg = {(r.first, r.depth, r.weight): r.ndcg10 for r in weighed}
    assert len(weighed) == 2 * (1 + 2 * len(weights)) and set(ndcg) >= {("dense", 0, None), ("hybrid", 20, 0.0)}
    for first in ("dense", "hybrid"):
        assert ndcg[first, 5, 1.0] == ndcg[first, 20, 1.0] == ndcg[first, 0, None]
        for r in rows:  # the default: the saved weight, as the engine ranks
            assert r.first != first or not r.depth or r.ndcg10 == ndcg[first, r.depth, again.first_stage_weight]
    qids = [q for q in evalset.qrels if q in evalset.queries]  # dense, depth 20, w = 0: sorted by the logits alone
    _, found = engine.dense_search(engine.embed_queries([evalset.queries[q] for q in qids]), 100)
    run = {}
    for q, row in zip(qids, found, strict=True):
        docs = [engine.docs[r] for r in row if r >= 0]
        logits = again.logits(evalset.queries[q], docs[:20]).tolist()
        head = sorted(range(len(logits)), key=lambda i: -logits[i])
        run[q] = [(d.id, -float(i)) for i, d in enumerate([docs[i] for i in head] + docs[20:])]
    assert ndcg["dense", 20, 0.0] == pytest.approx(evaluate_run(run, evalset.qrels)["nDCG@10"], abs=1e-12)
    with pytest.raises(ConfigError, match=r"first_stage_weight=1.5 must be in \[0, 1\]"):
        measure(engine, again, evalset, depths=(5,), weights=(1.5,))


def test_same_seed_same_weights(small):
    engine, _, held, encoder = small
    config = AdaptConfig(**{**TINY, "steps": 2, "warmup": 0})
    a, b = (adapt(engine, config, holdout=held, encoder=encoder).reranker.model.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = adapt(engine, config.replace(seed=1), holdout=held, encoder=encoder).reranker.model.state_dict()
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_config_refusals():
    with pytest.raises(ConfigError, match="mine_depth=3 must exceed negatives=3"):
        AdaptConfig(mine_depth=3, negatives=3)
    with pytest.raises(ConfigError, match="generator='gpt'"):
        AdaptConfig(generator="gpt")
    with pytest.raises(ConfigError, match="steps"):
        AdaptConfig(steps=0)


def test_cli_adapt_saves_measures_and_query_reranks(small, tmp_path, capsys):
    import json
    import shutil

    from archlab.cli import main

    engine, evalset, _, _ = small
    index = tmp_path / "index"
    shutil.copytree(engine.index_dir, index)
    queries, qrels = tmp_path / "queries.jsonl", tmp_path / "qrels.tsv"
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in evalset.queries.items()))
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, j in evalset.qrels.items()
                                                              for d, g in j.items()))  # fmt: skip
    code = main(["search", "adapt", str(index), "--steps", "3", "--batch", "2", "--negatives", "2",
                 "--max-length", "64", "--eval-queries", "5", "--depths", "5,10", "--heldout-queries", "4",
                 "--queries", str(queries), "--qrels", str(qrels), "--generator", "summaries",
                 "--distill", "0.3"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "trained 3 steps" in out and "nDCG@10 on 5 evaluation queries" in out, out
    assert "held-out check, 4 pseudo-queries" in out and "first stage (dense)" in out, out
    assert (index / "reranker" / "model.safetensors").is_file()
    report = json.loads((index / "adapt.json").read_text())
    assert report["training"]["steps"] == 3 and [r["depth"] for r in report["measured"]] == [0, 5, 10] * 2
    assert (report["config"]["generator"], report["config"]["distill"]) == ("summaries", 0.3)
    assert main(["search", "query", str(index), "open a file", "--rerank", "5", "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    hits, kept = answer["hits"], report["training"]["heldout_check"]["first_stage_weight"] == 1.0
    assert len(hits) == 3 and all(("rerank" in h["stages"]) != kept for h in hits)  # weight 1: not run
    assert ("rerank" in answer["skipped"]) == kept


@pytest.mark.slow
def test_adapt_from_the_real_minilm_weights(small, tmp_path):
    """The default start: all-MiniLM-L6-v2's encoder + a fresh head; saved, it loads in sentence-transformers."""
    from sentence_transformers import CrossEncoder

    engine, _, held, _ = small
    config = AdaptConfig(**{**TINY, "steps": 30, "lr": 5e-5})
    result = adapt(engine, config, holdout=held)
    assert result.reranker.model.config.d_model == 384 and result.reranker.model.cls_id == 101
    summary = result.summary()
    print(summary)
    assert summary["loss_last_tenth"] < summary["loss_first_tenth"], result.losses
    folder = result.reranker.save(tmp_path / "reranker")
    docs = [d.full_text for d in engine.docs[:8]]
    ours = torch.tensor(result.reranker.score("open a file", docs))
    theirs = torch.as_tensor(CrossEncoder(str(folder), device="cpu").predict([("open a file", d) for d in docs]))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_group_loss_chunks_by_length_and_puts_logits_back_in_group_order(tmp_path):
    """Pairs go through the model in length-sorted chunks; the loss equals the one of a single unsorted batch."""
    import torch.nn.functional as F

    from archlab.search.adapt import Group, group_loss
    from archlab.search.rerank import Reranker

    reranker = Reranker.from_encoder(tiny_encoder(tmp_path / "enc"), max_length=64)
    groups = [Group("open a file", "io.open\n\nOpen file and return a stream, with many more words in it.",
                    ("x", "json.dumps\n\nSerialize obj.")),
              Group("a longer query about sockets and timeouts", "s", ("socket.timeout\n\nA deprecated alias.", "y z"))]
    flat_q = [g.query for g in groups for _ in range(3)]
    flat_d = [t for g in groups for t in (g.positive, *g.negatives)]
    with torch.no_grad():
        reranker.model.eval()
        logits = reranker.forward(reranker.pack(flat_q, flat_d)).view(2, 3)
        expected = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
        for chunk in (1, 2, 4, 100):
            torch.testing.assert_close(group_loss(reranker, groups, chunk=chunk), expected, atol=1e-6, rtol=1e-6)


def test_a_tiny_cross_encoder_overfits_a_handful_of_pairs_to_the_right_order(tmp_path):
    """The mechanics that once failed (loss stuck at ln(1 + n)): gradient reaches the head through the pooler,
    the positive sits at logit 0, the head has its own rate. Eight groups must be learnt to a loss near 0 and
    every positive must score above its negatives afterwards."""
    from archlab.search.adapt import Group, group_loss
    from archlab.search.rerank import Reranker
    from archlab.train.optim import build_optimizer

    docs = [d for d in builtin_corpus() if 20 <= len(d.text.split()) <= 60][:32]
    groups = [Group(split_sentences(docs[i].text)[0], docs[i].full_text, tuple(d.full_text for d in docs[i + 1 : i + 4]))
              for i in range(0, 32, 4)]  # fmt: skip
    reranker = Reranker.from_encoder(tiny_encoder(tmp_path / "enc"), max_length=96, seed=0)
    model = reranker.model
    optimizer = build_optimizer(model.bert, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    optimizer.add_param_group({"params": list(model.classifier.parameters()), "lr": 1e-2, "weight_decay": 0.0})
    torch.manual_seed(0)
    model.train()
    losses = []
    for _ in range(60):  # a plateau near ln 4 for about 25 steps, then the fall
        loss = group_loss(reranker, groups)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print([round(x, 3) for x in losses[::6]])
    assert abs(losses[0] - math.log(4)) < 0.2 and losses[-1] < 0.05, losses
    for g in groups:
        scores = reranker.score(g.query, [g.positive, *g.negatives])
        assert scores[0] > max(scores[1:]), (g.query, scores)


def test_generated_replies_that_are_not_questions_are_dropped():
    from archlab.search.adapt import usable_question

    doc = Document("logging.X", "logging.X", "A handler class which sends an email. It needs a mail host.")
    assert usable_question("How do I send log records by email?", doc)
    for reply in ("I'm ready to assist. What's your request?", "```python def f(): pass", "two words",
                  "The following text returns an iterable of entries.", "A handler class which sends an email.",
                  "Here's a Python implementation of the function:", "The logger is enabled for level 'level'."):
        assert not usable_question(reply, doc), reply


def test_fuse_ranks_moves_from_the_rerankers_order_to_the_first_stages():
    from archlab.search.rerank import fuse_ranks

    scores = [0.1, 0.9, 0.5, 0.7]  # hits in first-stage order
    order = lambda f: sorted(range(len(f)), key=lambda i: -f[i])  # noqa: E731
    assert order(fuse_ranks(scores, 0.0)) == [1, 3, 2, 0]  # the re-ranker's order
    assert order(fuse_ranks(scores, 1.0)) == [0, 1, 2, 3]  # the first stage's
    mid = fuse_ranks(scores, 0.5)  # r_first + r_rerank: hit 1 (2 + 1) first, then 0 (1 + 4), 2 (3 + 3) and 3 (4 + 2)
    assert order(mid)[0] == 1 and mid[0] == pytest.approx(0.5 / 61 + 0.5 / 64)
    with pytest.raises(ConfigError, match="first_stage_weight=1.5"):
        fuse_ranks(scores, 1.5)


class _Oracle:
    """A stand-in re-ranker that scores each query's held-out positive (``good[query]``) highest, or lowest."""

    def __init__(self, good, sign=1.0):
        self.good, self.sign = good, sign

    def logits(self, query, docs):
        return torch.tensor([self.sign * (1.0 if d == self.good[query] else 0.0) for d in docs])


def test_heldout_check_keeps_a_good_reranker_and_fuses_away_a_bad_one(small):
    from archlab.search.adapt import heldout_check

    engine, _, held, _ = small
    config = AdaptConfig(**TINY)
    queries = make_queries(engine.docs, 40, config, held, random.Random(0), print)
    groups = mine_negatives(engine, queries, config.replace(negatives=3), held, random.Random(0), best=3)
    good = {g.query: g.positive for g in groups}  # per query: a negative (a document less a sentence) may be
    # another query's positive
    right = heldout_check(engine, _Oracle(good), groups)
    assert right.queries == len(groups) >= 6 and right.candidates == 4
    assert right.reranker_mrr == 1.0 and right.beats_first_stage and right.fused_mrr == 1.0
    assert right.first_stage_weight < 0.5 and "beats the first stage" in right.describe()
    wrong = heldout_check(engine, _Oracle(good, sign=-1.0), groups)  # every positive last
    assert wrong.reranker_mrr == pytest.approx(1 / 4) and not wrong.beats_first_stage
    assert wrong.first_stage_weight == 1.0 and wrong.fused_mrr == wrong.first_stage_mrr > wrong.reranker_mrr
    assert "does NOT beat" in wrong.describe()


def test_a_saved_fusion_weight_reloads_orders_the_engine_and_is_noted(small, tmp_path, capsys):
    """A folder whose held-out check failed keeps the first stage's order at weight 1, and query says so."""
    from archlab.cli import main
    from archlab.search.cli import reranker_note
    from archlab.search.engine import KEPT_FIRST_STAGE, SearchEngine
    from archlab.search.rerank import HELDOUT_FILE, Reranker

    engine, _, _, encoder = small
    reranker = Reranker.from_encoder(encoder, max_length=64)
    check = {"queries": 4, "candidates": 6.0, "first_stage_mrr": 0.5, "reranker_mrr": 0.25, "fused_mrr": 0.5}
    reranker.first_stage_weight, reranker.heldout = 1.0, check
    folder = reranker.save(tmp_path / "reranker")
    assert (folder / HELDOUT_FILE).is_file()
    again = Reranker.load(folder)
    assert again.first_stage_weight == 1.0 and again.heldout["reranker_mrr"] == 0.25
    assert "did not beat the first stage" in reranker_note(again) and "order is kept" in reranker_note(again)
    plain = SearchEngine.open(engine.index_dir).search("open a file", k=8)
    fused = SearchEngine.open(engine.index_dir, reranker=again).search("open a file", k=8, rerank=8)
    assert [h.doc.id for h in fused.hits] == [h.doc.id for h in plain.hits]
    assert fused.skipped == {"rerank": KEPT_FIRST_STAGE} and all("rerank" not in h.stage_scores for h in fused.hits)
    assert main(["search", "query", str(engine.index_dir), "open a file", "--rerank", "5", "--k", "3",
                 "--reranker", str(folder)]) == 0  # fmt: skip
    assert "note: this re-ranker did not beat the first stage on its 4 held-out" in capsys.readouterr().err
    (folder / HELDOUT_FILE).write_text('{"first_stage_weight": 2}')
    with pytest.raises(CheckpointError, match="first_stage_weight=2"):
        Reranker.load(folder)


def test_question_chat_shows_examples_before_the_document():
    from archlab.search.adapt import QUESTION_EXAMPLES, question_messages

    messages = question_messages("json.dumps\n\nSerialize obj.")
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(QUESTION_EXAMPLES) + ["user"]
    assert messages[1]["content"].endswith("?") and messages[-1]["content"].endswith("json.dumps\n\nSerialize obj.")


def test_sign_test():
    from archlab.search.adapt import sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(3, 0) == 1 / 8 and sign_test(5, 0) == 1 / 32
    assert sign_test(2, 1) == 0.5 and sign_test(9, 1) == pytest.approx(11 / 1024)


def test_summary_queries_cut_the_first_sentence_and_so_do_their_negatives(small):
    """``generator="summaries"``: a document's first (summary) sentence is its pseudo-query, as the built-in
    evaluation asks; its positive lacks it, and each mined negative lacks its own summary (the same shape: "the
    text without a summary line" must not tell the positive apart). Judged documents give nothing."""
    from archlab.search.adapt import cut_like_a_positive

    text = "Summary line is here. Second sentence has five words. Third one is here too, longer."
    doc = Document("m.f", "m.f", text)
    sentences = split_sentences(text)
    (first, *later) = sentence_queries(doc, 2, random.Random(0), summary=True)
    assert (first.query, first.cut) == (sentences[0], 0) and first.positive == Document(
        "m.f", "m.f", " ".join(sentences[1:])).full_text  # fmt: skip
    assert len(later) == 1 and later[0].cut in (1, 2)  # then later sentences, up to n
    assert all(q.cut != 0 for q in sentence_queries(doc, 3, random.Random(0)))  # the default never uses it
    assert {cut_like_a_positive(doc, random.Random(s), summary=True) for s in range(5)} == {first.positive}
    short = Document("m.g", "m.g", "Too short. Then a longer second sentence follows here. And a third one, longer.")
    assert cut_like_a_positive(short, random.Random(0), summary=True) == short.full_text  # a 2-word summary stays
    assert [q.cut for q in sentence_queries(short, 1, random.Random(0), summary=True)] in ([1], [2])

    engine, _, held, _ = small
    config = AdaptConfig(**{**TINY, "generator": "summaries"})
    queries = make_queries(engine.docs, 40, config, held, random.Random(0), print)
    assert queries and not {q.doc_id for q in queries} & held and sum(q.cut == 0 for q in queries) >= len(queries) // 2
    judged_summaries = {" ".join(t.split()) for t in builtin_evalset().queries.values()}
    assert not {q.query for q in queries} & judged_summaries
    groups = mine_negatives(engine, [q for q in queries if q.cut == 0], config, held, random.Random(0))
    summaryless = {Document(d.id, d.title, " ".join(split_sentences(d.text)[1:])).full_text for d in engine.docs}
    negatives = [t for g in groups for t in g.negatives]
    assert negatives and set(negatives) <= summaryless


def test_distillation_mixes_the_first_stages_soft_targets_into_the_loss(small, tmp_path):
    """group_loss(distill=lambda) = (1 - lambda) CE(label) + lambda KL(softmax(20 cos) || softmax(z)), checked against
    the equation in float64 on the same logits; the teacher cosines are the index encoder's; refusals."""
    import torch.nn.functional as F

    from archlab.search.adapt import TEACHER_SCALE, Group, first_stage_cosines, group_loss
    from archlab.search.rerank import Reranker

    engine, _, _, encoder = small
    groups = [Group("open a file", "io.open\n\nOpen file and return a stream.", ("json.dumps\n\nSerialize obj.",
                                                                                 "os.remove\n\nRemove a file.")),
              Group("serialize to JSON", "json.dumps\n\nSerialize obj to a JSON formatted str.",
                    ("pickle.dumps\n\nReturn the pickled object.", "io.open\n\nOpen a file."))]  # fmt: skip
    taught = first_stage_cosines(engine, groups)
    vectors = engine.encoder.embed(["open a file", taught[0].positive, *taught[0].negatives]).double()
    expected_cos = (vectors[1:] @ vectors[0]).tolist()
    assert taught[0].teacher == pytest.approx(expected_cos, abs=1e-5)

    reranker = Reranker.from_encoder(encoder, max_length=64)
    reranker.model.eval()  # no dropout: the same logits twice
    with torch.no_grad():
        z = torch.stack([reranker.logits(g.query, [g.positive, *g.negatives]) for g in taught]).double()
        t = F.softmax(TEACHER_SCALE * torch.tensor([g.teacher for g in taught], dtype=torch.float64), dim=-1)
        log_p = F.log_softmax(z, dim=-1)
        ce, kl = -log_p[:, 0].mean(), (t * (t.log() - log_p)).sum(-1).mean()
        for lam in (0.0, 0.5, 0.9):
            got = group_loss(reranker, taught, distill=lam)
            assert got.item() == pytest.approx(((1 - lam) * ce + lam * kl).item(), abs=1e-5)
        assert group_loss(reranker, groups).item() == pytest.approx(ce.item(), abs=1e-5)
        with pytest.raises(DataError, match="teacher cosines"):
            group_loss(reranker, groups, distill=0.5)
    with pytest.raises(ConfigError, match=r"distill=1.0 must be in \[0, 1\)"):
        AdaptConfig(distill=1.0)
    result = adapt(engine, AdaptConfig(**{**TINY, "steps": 3, "warmup": 0, "distill": 0.5}), encoder=encoder)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
