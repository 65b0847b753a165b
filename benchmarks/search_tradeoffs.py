"""Lesson 4 card 5's quality-vs-latency table, measured: each knob of the search engine against what it costs.

Five parts (``--parts``, all by default), each printed as its own table on an index of the built-in corpus
(``--index DIR``, built if missing, hybrid) with the built-in evaluation set (294 summary-sentence queries):

  k          top-K retrieved (dense, exact) vs recall@K and the ANN milliseconds per query
  rerank     re-rank depth 0 / 20 / 50 / 100 vs nDCG@10 and re-ranking milliseconds per query, the dense and
             (hybrid index) the hybrid first stage (the cross-encoder in ``--reranker DIR`` or ``INDEX/reranker``
             from ``archlab search adapt``; without one the part says so): each depth ordered as the engine
             orders it (fused with the first stage at the weight adapt saved) and by the cross-encoder alone
             (w 0), so a re-ranker whose held-out check kept the first stage's order is still measured
  explain    explanation length 16 / 32 / 64 new tokens vs milliseconds: the top 3 explained as one batch, and
             the first decoded token of one streamed explanation (SmolLM2-135M-Instruct, KV cache)
  index      flat / hnsw / ivfpq (64-byte codes; PQ scores only, and re-scored from a memory-mapped float16
             store by archlab's default factor for that size, x4 up to 1M) on ``--index-n`` synthetic vectors
             around the real ones (benchmarks/search_scale.py's generator) vs recall@100 against exact search,
             bytes per vector in RAM and on disk, ms per query
  precision  the query/document encoder in fp32 / bf16 / int8 (``search index --precision int8``: archlab.quant's
             int8-dynamic, int8 weights and per-row int8 activations, fbgemm's GEMM) vs dense nDCG@10 on the
             built-in set (the whole corpus re-encoded in each) and encoding ms per document and per query

Latencies are one query at a time with ``--threads`` torch/FAISS threads; p50 unless said. bf16 is emulated
(slower than fp32) on CPUs without AVX512-BF16/AMX: the header line says which kind this is.

    python benchmarks/search_tradeoffs.py                                   # everything (~25-40 min on 2 idle cores)
    python benchmarks/search_tradeoffs.py --parts k,index --index-n 100000  # a part or two
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from search_scale import synthetic_chunk  # noqa: E402

from archlab.hardware import describe_cpu  # noqa: E402

PARTS = ("k", "rerank", "explain", "index", "precision")


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def judged_queries(evalset, limit: int | None = None) -> list[str]:
    ids = [q for q in evalset.qrels if q in evalset.queries]
    return ids[:limit] if limit else ids


def recall_at(run: dict[str, list[str]], qrels: dict[str, dict[str, int]], k: int) -> float:
    """Mean over judged queries of (relevant documents in the top ``k``) / (relevant documents), via ir-measures."""
    import ir_measures

    measure = ir_measures.parse_measure(f"R@{k}")
    judgments = [ir_measures.Qrel(q, d, g) for q, docs in qrels.items() for d, g in docs.items()]
    scored = [ir_measures.ScoredDoc(q, d, -float(i)) for q, docs in run.items() for i, d in enumerate(docs)]
    return ir_measures.calc_aggregate([measure], judgments, scored)[measure]


def part_k(engine, evalset, ks: list[int]) -> None:
    qids = judged_queries(evalset)
    vectors = engine.embed_queries([evalset.queries[q] for q in qids])
    print(f"\n## top-K retrieved vs recall@K (dense, {engine.manifest['index']['type']} index, {len(qids)} queries)")
    print(f"{'K':>5} {'recall@K':>9} {'ANN ms p50':>11}")
    for k in ks:
        run, times = {}, []
        for qid, v in zip(qids, vectors, strict=True):
            t = time.perf_counter()
            _, rows = engine.dense_search(v[None], k)
            times.append(ms_since(t))
            run[qid] = [engine.docs[r].id for r in rows[0] if r >= 0]
        print(f"{k:>5} {recall_at(run, evalset.qrels, k):9.4f} {statistics.median(times):11.3f}")


def part_rerank(index_dir: Path, evalset, reranker_dir: str | None, depths: list[int], limit: int,
                precision: str = "auto") -> None:
    """:func:`archlab.search.adapt.measure` (each pair scored once, the depths sharing the scores; the time of
    depth R: scoring a query's first R dense hits) at the saved fusion weight and at w = 0."""
    from archlab.search.adapt import format_rows, measure
    from archlab.search.cli import load_reranker
    from archlab.search.engine import SearchEngine

    depths = sorted({d for d in depths if d > 0})
    print(f"\n## re-rank depth vs nDCG@10 and time ({min(limit, len(judged_queries(evalset)))} queries, a seeded "
          "sample; first stages: dense and, on a hybrid index, hybrid)")  # fmt: skip
    try:
        reranker = load_reranker(index_dir, reranker_dir, max(depths, default=1), precision)
    except Exception as e:  # noqa: BLE001 (the part says why it has no numbers)
        print(f"no cross-encoder, so no re-ranking rows: {e}")
        reranker = None
    weights = None
    if reranker is not None:
        print(f"cross-encoder: {reranker_dir or index_dir / 'reranker'} in {reranker.precision} (no pretrained one "
              "ships here: this is the "
              "one `archlab search adapt` trained; say so beside the numbers)")  # fmt: skip
        check = getattr(reranker, "heldout", None)
        if check:
            print(f"its held-out check ({check.get('queries')} pseudo-queries): MRR@10 first stage "
                  f"{check['first_stage_mrr']:.4f}, re-ranker {check['reranker_mrr']:.4f} (sign test p = "
                  f"{check.get('p_value', float('nan')):.3f}), fused {check['fused_mrr']:.4f}; the engine fuses at "
                  f"first-stage weight w = {reranker.first_stage_weight:.1f} (1: the first stage's order kept)")  # fmt: skip
        weights = sorted({reranker.first_stage_weight, 0.0}, reverse=True)
    engine = SearchEngine.open(index_dir)
    rows = measure(engine, reranker, evalset, depths=depths, max_queries=limit, weights=weights)
    print(format_rows(rows, min(limit, len(judged_queries(evalset)))))


def part_explain(engine, evalset, lengths: list[int], limit: int) -> None:
    from archlab.search.explain import Explainer

    queries = [evalset.queries[q] for q in judged_queries(evalset, limit)]
    print(f"\n## explanation length vs time (SmolLM2-135M-Instruct, {len(queries)} queries, top 3 each; the first "
          "token: one streamed explanation of the top hit, prompt-lookup drafts)")  # fmt: skip
    print(f"{'new tokens':>10} {'batch of 3 ms p50':>18} {'p99':>8} {'first token ms p50':>19} {'quotes ok':>10}")
    for length in lengths:
        explainer = Explainer(max_new_tokens=length)
        explainer.load()
        batch_ms, first_ms, ok, total = [], [], 0, 0
        for query in queries:
            hits = engine.search(query, k=3).hits
            t = time.perf_counter()
            explainer.explain(query, hits)
            batch_ms.append(ms_since(t))
            ok += sum(bool(h.quotes_ok) for h in hits)
            total += len(hits)
            hit = engine.search(query, k=1).hits[0]
            t = time.perf_counter()
            pieces = explainer.stream(query, hit)
            next(pieces), next(pieces, None)  # the fixed opening, then the first decoded piece
            first_ms.append(ms_since(t))
            pieces.close()
        print(f"{length:>10} {statistics.median(batch_ms):18.0f} {np.percentile(batch_ms, 99):8.0f} "
              f"{statistics.median(first_ms):19.0f} {ok:>5}/{total:<4}")  # fmt: skip


def part_index(real: np.ndarray, n: int, queries: int, threads: int) -> None:
    import faiss

    from archlab.search.index import RescoredIndex, build_faiss, default_params, write_faiss, write_rescore_store

    spread = real.std(axis=0).astype(np.float32)
    db = np.concatenate([synthetic_chunk(real, spread, 0.5, seed=s, n=min(100_000, n - s)) for s in range(0, n, 100_000)])
    q = synthetic_chunk(real, spread, 0.5, seed=2**32 - 1, n=queries)
    exact = np.argsort(-(q @ db.T), axis=1)[:, :100]
    print(f"\n## index type vs recall@100, bytes and time ({n:,} synthetic vectors around {len(real):,} real ones, "
          f"{queries} queries; build with {threads} threads, search one query at a time with 1)")  # fmt: skip
    print(f"{'index':<18} {'params':<44} {'recall@100':>10} {'ms p50':>7} {'ms p99':>7} {'RAM B/vec':>10} "
          f"{'disk B/vec':>10} {'build s':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("flat", "hnsw", "ivfpq"):
            params = default_params(kind, n, db.shape[1])
            faiss.omp_set_num_threads(threads)
            t = time.perf_counter()
            index = build_faiss(db, kind, params)
            build_s = ms_since(t) / 1000
            ram = write_faiss(index, Path(tmp) / f"{kind}.index") / n
            searchers = [(kind, index, ram)]
            if kind == "ivfpq":
                store = write_rescore_store(db, Path(tmp) / "rescore.npy") / n
                mapped = np.load(Path(tmp) / "rescore.npy", mmap_mode="r")
                searchers = [("ivfpq (PQ only)", index, ram),
                             (f"ivfpq + rescore x{params['rescore']}", RescoredIndex(index, mapped, params["rescore"]),
                              ram + store)]  # fmt: skip
            faiss.omp_set_num_threads(1)
            shown = {k: v for k, v in params.items() if k not in ("rescore", "rescore_dtype", "code_bytes")}
            for name, searcher, disk in searchers:
                times, found = [], []
                for row in q:
                    t = time.perf_counter()
                    _, rows = searcher.search(row[None], 100)
                    times.append(ms_since(t))
                    found.append(rows[0])
                recall = float(np.mean([len(set(f) & set(e)) / 100 for f, e in zip(found, exact, strict=True)]))
                print(f"{name:<18} {str(shown):<44} {recall:10.3f} {statistics.median(times):7.2f} "
                      f"{np.percentile(times, 99):7.2f} {ram:10.1f} {disk:10.1f} {build_s:8.1f}")  # fmt: skip


def part_precision(docs, evalset, batch_size: int, limit: int = 0) -> None:
    from archlab.hardware import native_bf16
    from archlab.search.encode import load_encoder
    from archlab.search.evaluate import evaluate_run

    native, why = native_bf16("cpu")
    qids = judged_queries(evalset)
    if limit:  # a quick run: the judged documents and the first others up to ``limit`` (an easier, smaller corpus)
        judged = {d for q in qids for d in evalset.qrels[q]}
        docs = [d for d in docs if d.id in judged] + [d for d in docs if d.id not in judged][: max(0, limit - len(judged))]
        print(f"\n(--precision-docs {limit}: {len(docs)} documents, the judged ones among them: nDCG is higher than on "
              "the whole corpus)")  # fmt: skip
    texts = [d.full_text for d in docs]
    print(f"\n## encoder precision vs dense nDCG@10 and encoding time ({len(docs):,} documents re-encoded per row, "
          f"{len(qids)} queries, batch {batch_size}; bf16 {'native' if native else 'EMULATED here: ' + why})")  # fmt: skip
    print(f"{'precision':<14} {'nDCG@10':>8} {'R@100':>8} {'doc ms':>8} {'docs/s':>8} {'query ms p50':>13}")
    fp32 = load_encoder("minilm-l6", "fp32")
    for name, make in (("fp32", lambda: fp32), ("bf16", lambda: load_encoder("minilm-l6", "bf16")),
                       ("int8 dynamic", lambda: load_encoder("minilm-l6", "int8"))):  # fmt: skip
        encoder = make()
        t = time.perf_counter()
        d = encoder.embed(texts, batch_size=batch_size).numpy()
        doc_s = ms_since(t) / 1000
        query_ms, qv = [], []
        for qid in qids:
            t = time.perf_counter()
            qv.append(encoder.embed([evalset.queries[qid]]).numpy()[0])
            query_ms.append(ms_since(t))
        scores = np.stack(qv) @ d.T
        top = np.argsort(-scores, axis=1)[:, :100]
        run = {qid: [(docs[r].id, float(scores[i, r])) for r in top[i]] for i, qid in enumerate(qids)}
        m = evaluate_run(run, {q: evalset.qrels[q] for q in qids})
        print(f"{name:<14} {m['nDCG@10']:8.4f} {m['recall@100']:8.4f} {doc_s * 1000 / len(texts):8.2f} "
              f"{len(texts) / doc_s:8.1f} {statistics.median(query_ms):13.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="/tmp/archlab-builtin-index", help="index of the built-in corpus (built if missing)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    parser.add_argument("--ks", default="10,20,50,100,200", help="top-K values (part k)")
    parser.add_argument("--depths", default="0,20,50,100", help="re-rank depths (part rerank)")
    parser.add_argument("--reranker", metavar="DIR", help="cross-encoder folder (default INDEX/reranker)")
    parser.add_argument("--rerank-queries", type=int, default=100, help="queries for part rerank")
    parser.add_argument("--rerank-precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the cross-encoder's precision (part rerank; auto: bf16 where native)")
    parser.add_argument("--lengths", default="16,32,64", help="explanation lengths in new tokens (part explain)")
    parser.add_argument("--explain-queries", type=int, default=10, help="queries for part explain")
    parser.add_argument("--index-n", type=int, default=100_000, help="synthetic vectors for part index")
    parser.add_argument("--index-queries", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision-docs", type=int, default=0, metavar="N",
                        help="part precision on the judged documents + others up to N (default 0: the whole corpus)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in PARTS:
            parser.error(f"--parts: {p!r} is not one of {PARTS}")
    torch.set_num_threads(args.threads)
    print(f"# {describe_cpu()}; {args.threads} threads; parts {','.join(parts)}", flush=True)

    from archlab.search import encode
    from archlab.search.corpus import builtin_corpus, builtin_evalset
    from archlab.search.engine import SearchEngine
    from archlab.search.index import build_index, read_manifest

    index_dir = Path(args.index)
    if not (index_dir / "manifest.json").is_file():
        print(f"building {index_dir} (the built-in corpus, hybrid) ...", flush=True)
        build_index(builtin_corpus(), index_dir, hybrid=True, progress=True)
    evalset = builtin_evalset()
    engine = SearchEngine.open(index_dir, mode="dense")
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    started = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        if part == "k":
            part_k(engine, evalset, ints(args.ks))
        elif part == "rerank":
            part_rerank(index_dir, evalset, args.reranker, ints(args.depths), args.rerank_queries,
                        args.rerank_precision)
        elif part == "explain":
            part_explain(engine, evalset, ints(args.lengths), args.explain_queries)
        elif part == "index":
            manifest = read_manifest(index_dir)
            real = encode.load_vectors(index_dir / "vectors", manifest["corpus"]["count"], manifest["encoder"]["dim"])
            part_index(real, args.index_n, args.index_queries, args.threads)
        elif part == "precision":
            part_precision(engine.docs, evalset, args.batch_size, args.precision_docs)
        print(f"({part}: {ms_since(t) / 1000:.0f} s)", flush=True)
    print(f"\n(all parts: {ms_since(started) / 1000:.0f} s)")


if __name__ == "__main__":
    main()
