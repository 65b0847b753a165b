"""The card's "768d -> 64 bytes, ~640 MB for 10M": an IVF-PQ index of N synthetic MiniLM-like vectors, measured.

Synthetic vectors with the statistics of real embeddings: each is a real all-MiniLM-L6-v2 document vector
(the built-in corpus, encoded by archlab, or the vectors of an existing index folder) plus Gaussian noise
with the real vectors' per-dimension spread times ``--noise``, renormalised. They are generated in chunks
from fixed seeds and streamed into the index (training on ``--train`` of them first), so the build fits
this machine; the same seeds regenerate them for exact search (recall@100 of the ANN against it).

One pass over the chunks adds them to the index, writes them as float16 to the re-scoring store (one
``.npy`` file, memory-mapped: archlab's ``rescore.npy``) and keeps the exact top 100 of the ``--queries``
queries (float32 inner products), so recall@100 is measured against exact search over all N.

Printed: bytes of the written index (total, per vector) beside the card's 64 B and 640 MB, the store's bytes
on disk, and for each search choice (``nprobe`` x re-scoring factor: PQ fetches factor x 100 candidates that
are re-scored exactly with the stored vectors; 0 = PQ scores only) the recall@100 against exact search and
the per-query latency p50/p99 (one query at a time, one thread), beside the card's 10 ms. The choices with
recall@100 >= 0.9 are marked, the fastest of them chosen. ``--opq`` also builds the same index behind a
learned OPQ rotation (FAISS ``OPQ64,IVF{nlist},PQ64``) and measures it the same way.

    python benchmarks/search_scale.py                    # 10M vectors (the lead's full run; long)
    python benchmarks/search_scale.py --n 200000         # a reduced run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from archlab.hardware import describe_cpu

CARD_BYTES, CARD_TOTAL_MB, CARD_ANN_MS = 64, 640, 10.0


def real_vectors(index_dir: str | None) -> np.ndarray:
    """Real MiniLM document vectors: from an index folder, or the built-in corpus encoded now."""
    from archlab.search import encode
    from archlab.search.corpus import builtin_corpus
    from archlab.search.index import read_manifest

    if index_dir:
        manifest = read_manifest(index_dir)
        return encode.load_vectors(Path(index_dir) / "vectors", manifest["corpus"]["count"], manifest["encoder"]["dim"])
    corpus = builtin_corpus()
    encoder = encode.load_encoder("minilm-l6", "fp32")
    return encoder.embed([d.full_text for d in corpus], batch_size=32).numpy()


def synthetic_chunk(base: np.ndarray, spread: np.ndarray, noise: float, seed: int, n: int) -> np.ndarray:
    """``n`` unit vectors, each a random real vector plus N(0, (noise * spread)^2) per dimension."""
    rng = np.random.default_rng(seed)
    x = base[rng.integers(0, len(base), n)] + noise * spread * rng.standard_normal((n, base.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32, copy=False)


def exact_update(best: tuple[np.ndarray, np.ndarray], queries: np.ndarray, block: np.ndarray, first: int, k: int = 100):
    """The running exact top ``k`` (scores, rows) of ``queries`` after seeing ``block`` (rows ``first ..``)."""
    best_s, best_i = best
    s = queries @ block.T
    i = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
    all_s = np.concatenate([best_s, np.take_along_axis(s, i, axis=1)], axis=1)
    all_i = np.concatenate([best_i, i + first], axis=1)
    keep = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_s, keep, axis=1), np.take_along_axis(all_i, keep, axis=1)


def measure(index, queries: np.ndarray, truth: np.ndarray, k: int = 100) -> tuple[float, float, float]:
    """(recall@k against ``truth``, p50 ms, p99 ms): one query at a time."""
    times, hits = [], 0
    for q, t in zip(queries, truth, strict=True):
        start = time.perf_counter()
        _, rows = index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1000)
        hits += len(set(rows[0].tolist()) & set(t.tolist()))
    return hits / truth.size, float(np.percentile(times, 50)), float(np.percentile(times, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="vectors in the index (default 10M)")
    parser.add_argument("--chunk", type=int, default=200_000, help="vectors generated and added at a time")
    parser.add_argument("--train", type=int, default=65_536, help="training vectors (at least 39 per centroid)")
    parser.add_argument("--nlist", type=int, help="inverted lists (default archlab's: 4 sqrt(n), at most n/39)")
    parser.add_argument("--noise", type=float, default=0.5, help="noise std as a multiple of the real per-dim std")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--nprobe", default="16,32,64,128", help="nprobe values to measure")
    parser.add_argument("--rescore", default="0,2,4,8", help="re-scoring factors to measure (0: PQ scores only)")
    parser.add_argument("--opq", action="store_true", help="also build and measure an OPQ-rotated IVF-PQ")
    parser.add_argument("--from-index", metavar="DIR", help="take the real vectors from this index folder")
    parser.add_argument("--workdir", help="where the float16 store is written (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for training and adding")
    args = parser.parse_args()

    import faiss

    from archlab.search.index import RescoredIndex, default_params

    faiss.omp_set_num_threads(args.threads)
    print(f"# {describe_cpu()}; faiss {faiss.__version__}, {args.threads} threads for the build", flush=True)
    base = real_vectors(args.from_index)
    spread = base.std(axis=0).astype(np.float32)
    dim = base.shape[1]
    params = default_params("ivfpq", args.n, dim)
    if args.nlist:
        params["nlist"] = args.nlist
    print(f"real vectors: {len(base)} x {dim}; synthetic: {args.n:,} (noise {args.noise} x per-dim std); "
          f"params {params}", flush=True)  # fmt: skip

    kinds = {"ivfpq": f"IVF{params['nlist']},PQ{params['m']}"}
    if args.opq:
        kinds["opq+ivfpq"] = f"OPQ{params['m']},IVF{params['nlist']},PQ{params['m']}"
    t = time.perf_counter()
    train = synthetic_chunk(base, spread, args.noise, seed=10**9, n=max(args.train, 39 * max(256, params["nlist"])))
    indexes = {}
    for name, spec in kinds.items():
        t = time.perf_counter()
        indexes[name] = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        indexes[name].train(train)
        print(f"{name}: {spec} trained on {len(train):,} vectors in {time.perf_counter() - t:.1f} s", flush=True)
    del train

    queries = synthetic_chunk(base, spread, args.noise, seed=2**32 - 1, n=args.queries)
    best = (np.full((args.queries, 100), -np.inf, dtype=np.float32), np.zeros((args.queries, 100), dtype=np.int64))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store_path = Path(tmp) / "rescore.npy"
        store = np.lib.format.open_memmap(store_path, mode="w+", dtype=np.float16, shape=(args.n, dim))
        t = time.perf_counter()
        for first in range(0, args.n, args.chunk):
            block = synthetic_chunk(base, spread, args.noise, seed=first, n=min(args.chunk, args.n - first))
            store[first : first + len(block)] = block
            best = exact_update(best, queries, block, first)
            for index in indexes.values():
                index.add(block)
            done = first + len(block)
            if done == args.n or (first // args.chunk) % 5 == 4:
                print(f"  added {done:,} ({time.perf_counter() - t:.0f} s)", flush=True)
        add_s = time.perf_counter() - t
        store.flush()
        del store
        store_bytes = store_path.stat().st_size
        print(f"added {args.n:,} in {add_s:.1f} s ({args.n / add_s:,.0f} vectors/s, with the store and exact search)")

        sizes = {}
        for name, index in indexes.items():
            path = Path(tmp) / f"{name}.index"
            faiss.write_index(index, str(path))
            sizes[name] = path.stat().st_size
            path.unlink()
        # fixed tables (coarse centroids, PQ codebooks[, OPQ matrix]) vs what grows with n (codes, 8-byte ids, lists)
        pq_tables = params["m"] * 2 ** params["nbits"] * (dim // params["m"]) * 4
        fixed = params["nlist"] * dim * 4 + pq_tables
        size = sizes["ivfpq"]
        per_vector = (size - fixed) / args.n
        nlist_10m = default_params("ivfpq", 10_000_000, dim)["nlist"] if not args.nlist else params["nlist"]
        print(f"\n## bytes (card: {CARD_BYTES} B/vector, ~{CARD_TOTAL_MB} MB for 10M)")
        print(f"index in RAM: {size / 1e6:,.1f} MB = {size / args.n:.1f} B/vector all in; {per_vector:.1f} B/vector "
              f"beyond the fixed tables ({fixed / 1e6:.1f} MB) = PQ code {params['code_bytes']} B + id 8 B; "
              f"projected at 10M: {(per_vector * 1e7 + nlist_10m * dim * 4 + pq_tables) / 1e6:,.0f} MB")  # fmt: skip
        for name in sizes:
            if name != "ivfpq":
                print(f"{name} in RAM: {sizes[name] / 1e6:,.1f} MB = {sizes[name] / args.n:.1f} B/vector all in")
        print(f"re-scoring store on disk (float16, memory-mapped; in RAM only as the OS caches it): "
              f"{store_bytes / 1e6:,.1f} MB = {store_bytes / args.n:.1f} B/vector")  # fmt: skip

        faiss.omp_set_num_threads(1)  # one query at a time, as the card's latency
        truth = best[1]
        mapped = np.load(store_path, mmap_mode="r")
        print(f"\n## recall@100 against exact search over {args.n:,}, {args.queries} queries, one at a time, "
              f"1 thread (card: ANN 10 ms at 10M; target recall@100 >= 0.9)")  # fmt: skip
        print(f"{'index':<10} {'nprobe':>6} {'rescore':>8} {'recall@100':>10} {'p50 ms':>8} {'p99 ms':>8}  RAM B/vec  disk B/vec")
        rows = []
        for name, index in indexes.items():
            ivf = faiss.extract_index_ivf(index)
            for nprobe in (int(x) for x in args.nprobe.split(",")):
                ivf.nprobe = min(nprobe, params["nlist"])
                for factor in (int(x) for x in args.rescore.split(",")):
                    searcher = RescoredIndex(index, mapped, factor) if factor else index
                    recall, p50, p99 = measure(searcher, queries, truth)
                    ram = sizes[name] / args.n
                    disk = ram + (store_bytes / args.n if factor else 0)
                    rows.append((name, ivf.nprobe, factor, recall, p50, p99))
                    mark = "  >= 0.9" if recall >= 0.9 else ""
                    print(f"{name:<10} {ivf.nprobe:>6} {factor:>8} {recall:10.3f} {p50:8.2f} {p99:8.2f}  "
                          f"{ram:9.1f}  {disk:10.1f}{mark}", flush=True)  # fmt: skip
        good = [r for r in rows if r[3] >= 0.9]
        if good:
            name, nprobe, factor, recall, p50, p99 = min(good, key=lambda r: r[4])
            print(f"chosen: {name} nprobe {nprobe} rescore {factor}: recall@100 {recall:.3f}, p50 {p50:.2f} ms, "
                  f"p99 {p99:.2f} ms (card: {CARD_ANN_MS:.0f} ms)")  # fmt: skip
        else:
            print("no choice measured reaches recall@100 >= 0.9: raise nprobe or the re-scoring factor")
        del mapped


if __name__ == "__main__":
    main()
