r"""Retrieval quality through ``ir-measures`` (the metrics are not written here), and TREC run files.

For a query with graded judgments ``rel(d)`` and a ranking ``d_1, d_2, ...``::

    nDCG@10   = DCG@10 / ideal DCG@10,  DCG@10 = sum_{i<=10} rel(d_i) / log2(i + 1)   (nDCG@10: trec_eval's linear gain)
    recall@100 = |relevant in top 100| / |relevant|                                             (R@100)
    MRR@10    = mean over queries of 1 / rank of the first relevant hit in the top 10, else 0  (RR@10)

Every metric is the mean over the judged queries; a query with no retrieved document counts 0.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from archlab.errors import DataError
from archlab.interop import io
from archlab.search.corpus import EvalSet

# printed name -> ir-measures name
METRICS = {"nDCG@10": "nDCG@10", "recall@100": "R@100", "MRR@10": "RR@10"}

Run = dict[str, list[tuple[str, float]]]  # query id -> [(doc id, score), ...] best first


def evaluate_run(run: Run, qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """``{"nDCG@10": .., "recall@100": .., "MRR@10": ..}`` of ``run`` against ``qrels`` (means over judged queries)."""
    import ir_measures

    if not qrels:
        raise DataError("no judged queries to evaluate")
    measures = {name: ir_measures.parse_measure(m) for name, m in METRICS.items()}
    judgments = [ir_measures.Qrel(q, d, g) for q, docs in qrels.items() for d, g in docs.items()]
    # Ranks, not raw scores, decide: the scores fed to ir-measures fall with the rank (ties in a fused or
    # re-ranked list would otherwise be re-ordered by doc id).
    scored = [ir_measures.ScoredDoc(q, d, -float(i)) for q, ranking in run.items() if q in qrels
              for i, (d, _) in enumerate(ranking)]  # fmt: skip
    per_query = {name: {} for name in measures}
    for metric in ir_measures.iter_calc(list(measures.values()), judgments, scored):
        for name, m in measures.items():
            if metric.measure == m:
                per_query[name][metric.query_id] = metric.value
    # Queries with no retrieved document are absent from iter_calc: they count 0.
    return {name: sum(per_query[name].get(q, 0.0) for q in qrels) / len(qrels) for name in measures}


def check_trec_ids(query_ids: Iterable[str], doc_ids: Iterable[str]) -> None:
    """DataError unless every id can stand in a TREC run file, whose columns are separated by whitespace."""
    for what, ids in (("query", query_ids), ("document", doc_ids)):
        bad = next((i for i in ids if not i or any(c.isspace() for c in i)), None)
        if bad is not None:
            raise DataError(f"TREC run files cannot hold ids with spaces or empty ids: {what} id {bad!r} (a folder "
                            "of .txt files takes its ids from the file names: rename the file)")  # fmt: skip


def write_trec_run(path: str | Path, run: Run, tag: str = "archlab") -> Path:
    """Write ``run`` in TREC format, atomically: ``qid Q0 docid rank score tag`` per line, ranks from 1."""
    path = Path(path)
    check_trec_ids(run, (doc_id for ranking in run.values() for doc_id, _ in ranking))
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text_atomic(path, "".join(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n" for qid, ranking in run.items()
                                       for rank, (doc_id, score) in enumerate(ranking, 1)))  # fmt: skip
    return path


@dataclass
class EvalReport:
    metrics: dict[str, float]
    run: Run
    queries: int
    ms_per_query: float


def evaluate_engine(engine, evalset: EvalSet, *, k: int = 100, rerank: int = 0) -> EvalReport:
    """Search every judged query of ``evalset`` with ``engine`` (top ``k``, re-ranking ``rerank``) and score it."""
    judged = [q for q in evalset.qrels if q in evalset.queries]
    if not judged:
        raise DataError(f"none of the {len(evalset.qrels)} judged queries has a text in the queries file")
    blank = next((q for q in judged if not evalset.queries[q].strip()), None)
    if blank is not None:
        raise DataError(f"judged query {blank!r} has an empty text: give it words or drop its judgments")
    known = {d.id for d in engine.docs}
    if not any(d in known for q in judged for d in evalset.qrels[q]):
        raise DataError(f"no judged document is in the index {engine.index_dir}: are the qrels for this corpus?")
    run: Run = {}
    start = time.perf_counter()
    for qid in judged:
        result = engine.search(evalset.queries[qid], k=k, rerank=rerank)
        run[qid] = [(h.doc.id, h.score) for h in result.hits]
    ms = (time.perf_counter() - start) * 1000 / len(judged)
    return EvalReport(evaluate_run(run, {q: evalset.qrels[q] for q in judged}), run, len(judged), ms)


__all__ = ["METRICS", "EvalReport", "check_trec_ids", "evaluate_engine", "evaluate_run", "write_trec_run"]
