"""Per-stage latency (p50/p99 over 100+ queries) beside the card's budget, quality per first stage, encoding speed.

1. Latency: the built-in evaluation queries (repeated to ``--queries``), one at a time, through
   ``SearchEngine.search`` on an index of the built-in corpus (``--index DIR``, built if missing, hybrid):
   encode (card 10 ms), ann (card 10 ms), bm25, fuse, rerank at ``--rerank`` depth when a cross-encoder
   is given or saved in the index by ``archlab search adapt`` (card 100 ms), total (card 620 ms).
2. Quality on the built-in evaluation set: dense, BM25, hybrid (RRF), and hybrid + re-rank when a
   cross-encoder is there: nDCG@10, recall@100, MRR@10 (ir-measures).
3. Time to the first explanation token after the results (card target here: within 1 s): for ``--explain-queries``
   queries, the top hit's explanation is started as the page's server starts it (prompt with its evidence,
   prefill once, first decoded token; SmolLM2-135M-Instruct, KV cache) right after ``search`` returns.
4. Encoding throughput on ~250-token "abstracts" (built-in docstrings joined to that length): archlab's
   encoder (fp32, and bf16 where the CPU has it natively) against sentence-transformers in the same run,
   interleaved rounds, documents/s.

    python benchmarks/search_latency.py --index /tmp/builtin-index [--rerank 100] [--reranker DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from archlab.hardware import describe_cpu, native_bf16

CARD_MS = {"encode": 10.0, "ann": 10.0, "rerank": 100.0, "explain": 500.0, "total": 620.0}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency(index_dir: Path, queries: list[str], rerank: int, reranker_dir: str | None,
            precision: str = "auto") -> None:
    from archlab.search.cli import load_reranker
    from archlab.search.engine import SearchEngine

    reranker = None
    if rerank:
        try:
            reranker = load_reranker(index_dir, reranker_dir, rerank, precision)
        except Exception as e:  # noqa: BLE001 (reported, the rest still runs)
            print(f"(no re-ranking: {e})")
            rerank = 0
    engine = SearchEngine.open(index_dir, reranker=reranker)
    for q in queries[:3]:  # warm-up: first calls allocate and pick kernels
        engine.search(q, k=10, rerank=rerank)
    stages: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for q in queries:
        result = engine.search(q, k=10, rerank=rerank)
        for stage, ms in result.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
        skipped.update(result.skipped)
    print(f"\n## latency over {len(queries)} queries ({engine.mode}, {len(engine.docs)} documents"
          f"{f', re-rank depth {rerank}' if rerank else ''}; ms)")  # fmt: skip
    for stage, why in skipped.items():
        print(f"{stage} skipped: {why}")
    print(f"{'stage':<8} {'p50':>8} {'p99':>8} {'card':>8}")
    for stage, values in stages.items():
        card = f"{CARD_MS[stage]:.0f}" if stage in CARD_MS else "-"
        print(f"{stage:<8} {percentile(values, 50):8.2f} {percentile(values, 99):8.2f} {card:>8}")


def quality(index_dir: Path, rerank: int, reranker_dir: str | None, precision: str = "auto") -> None:
    from archlab.search.cli import load_reranker
    from archlab.search.corpus import builtin_evalset
    from archlab.search.engine import SearchEngine
    from archlab.search.evaluate import evaluate_engine

    evalset = builtin_evalset()
    rows = [(mode, 0, None) for mode in ("dense", "bm25", "hybrid")]
    if rerank:
        try:
            rows.append(("hybrid", rerank, load_reranker(index_dir, reranker_dir, rerank, precision)))
        except Exception as e:  # noqa: BLE001
            print(f"(no re-rank row: {e})")
    print(f"\n## quality on the built-in evaluation set ({len(evalset.queries)} queries)")
    print(f"{'first stage':<22} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8} {'ms/query':>9}")
    for mode, depth, reranker in rows:
        engine = SearchEngine.open(index_dir, mode=mode, reranker=reranker)
        report = evaluate_engine(engine, evalset, k=100, rerank=depth)
        m = report.metrics
        name = mode + (f" + re-rank {depth}" if depth else "")
        print(f"{name:<22} {m['nDCG@10']:8.4f} {m['recall@100']:8.4f} {m['MRR@10']:8.4f} {report.ms_per_query:9.1f}")


def first_token(index_dir: Path, queries: list[str]) -> None:
    from archlab.search.engine import SearchEngine
    from archlab.search.explain import Explainer

    engine, explainer = SearchEngine.open(index_dir), Explainer()
    explainer.load()
    times = []
    for i, query in enumerate([queries[0], *queries]):  # the first is a warm-up
        hit = engine.search(query, k=1).hits[0]
        t = time.perf_counter()
        pieces = explainer.stream(query, hit)
        next(pieces), next(pieces, None)  # the fixed opening ('It says "'), then the first decoded text
        if i:
            times.append((time.perf_counter() - t) * 1000)
        pieces.close()
    print(f"\n## first explanation token after the results ({len(times)} queries, one at a time; ms)")
    print(f"p50 {percentile(times, 50):.0f}  p99 {percentile(times, 99):.0f}  (target: within 1000 after the results)")


def abstracts(n: int, tokens: int = 250) -> list[str]:
    """``n`` texts of about ``tokens`` word pieces: built-in docstrings joined in order."""
    from archlab.search.corpus import builtin_corpus

    words = " ".join(d.text for d in builtin_corpus()).split()
    size = int(tokens * 0.6)  # about 1.6 word pieces per word in these docstrings
    return [" ".join(words[i * size : (i + 1) * size]) for i in range(n)]


def throughput(n: int, rounds: int, batch_size: int) -> None:
    import sentence_transformers

    from archlab.interop.sentence import minilm_path
    from archlab.search.encode import load_encoder

    texts = abstracts(n)
    st = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu")
    peers = {"sentence-transformers fp32": lambda: st.encode(texts, batch_size=batch_size, normalize_embeddings=True),
             "archlab fp32": lambda: load_encoder("minilm-l6", "fp32").embed(texts, batch_size=batch_size)}
    if native_bf16("cpu")[0]:
        peers["archlab bf16"] = lambda: load_encoder("minilm-l6", "bf16").embed(texts, batch_size=batch_size)
    else:
        print(f"(no bf16 row: {native_bf16('cpu')[1]})")
    # int8 weights and activations (fbgemm's integer products; fbgemm dispatches on the CPU itself, and whether
    # ATEN_CPU_CAPABILITY's cap reaches it was not checked: a capped run's int8 row may not be the AVX2 kind's)
    peers["archlab int8"] = lambda: load_encoder("minilm-l6", "int8").embed(texts, batch_size=batch_size)
    for fn in peers.values():
        fn()  # warm-up
    times = {name: [] for name in peers}
    for _ in range(rounds):
        for name, fn in peers.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = len(texts) / statistics.median(times["sentence-transformers fp32"])
    print(f"\n## encoding {len(texts)} abstracts of ~250 tokens, batch {batch_size}, median of {rounds} rounds")
    for name, values in times.items():
        rate = len(texts) / statistics.median(values)
        print(f"{name:<28} {rate:8.1f} docs/s  {rate / base:5.2f}x")
    print(f"10M abstracts at the best rate: {1e7 / max(len(texts) / statistics.median(v) for v in times.values()) / 86400:.1f} days "
          "on this machine")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="/tmp/archlab-builtin-index", help="index folder (built if missing)")
    parser.add_argument("--queries", type=int, default=120, help="queries for the latency table (>= 100)")
    parser.add_argument("--rerank", type=int, default=0, metavar="N", help="re-rank depth (needs a cross-encoder)")
    parser.add_argument("--reranker", metavar="DIR", help="cross-encoder folder (default INDEX/reranker)")
    parser.add_argument("--rerank-precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the cross-encoder's precision (auto: bf16 where the CPU computes it natively)")
    parser.add_argument("--explain-queries", type=int, default=20, help="queries for the first-token part")
    parser.add_argument("--docs", type=int, default=128, help="abstracts for the throughput rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: latency,quality,firsttoken,throughput")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {describe_cpu()}; {args.threads} threads")
    skip = set(args.skip.split(","))
    index_dir = Path(args.index)
    if {"latency", "quality"} - skip and not (index_dir / "manifest.json").is_file():
        from archlab.search.corpus import builtin_corpus
        from archlab.search.index import build_index

        print(f"building {index_dir} (hybrid) ...")
        build_index(builtin_corpus(), index_dir, hybrid=True, progress=True)
    if "latency" not in skip:
        from archlab.search.corpus import builtin_evalset

        queries = list(builtin_evalset().queries.values())
        queries = (queries * (args.queries // len(queries) + 1))[: args.queries]
        latency(index_dir, queries, args.rerank, args.reranker, args.rerank_precision)
    if "quality" not in skip:
        quality(index_dir, args.rerank, args.reranker, args.rerank_precision)
    if "firsttoken" not in skip:
        from archlab.search.corpus import builtin_evalset

        first_token(index_dir, list(builtin_evalset().queries.values())[: args.explain_queries])
    if "throughput" not in skip:
        throughput(args.docs, args.rounds, args.batch_size)


if __name__ == "__main__":
    main()
