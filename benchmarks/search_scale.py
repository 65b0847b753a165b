"""The card's "768d -> 64 bytes, ~640 MB for 10M": an IVF-PQ index of N synthetic MiniLM-like vectors, measured.

Synthetic vectors with the statistics of real embeddings: each is a real all-MiniLM-L6-v2 document vector
(the built-in corpus, encoded by archlab, or the vectors of an existing index folder) plus Gaussian noise
with the real vectors' per-dimension spread times ``--noise``, renormalised. They are generated in chunks
from fixed seeds and streamed into the index (training on ``--train`` of them first), so the build fits
this machine; the same seeds regenerate them for exact search (recall@100 of the ANN against it).

Printed: bytes of the written index (total, per vector) beside the card's 64 B and 640 MB, and for each
``nprobe`` the recall@100 against exact search and the per-query latency p50/p99 (one query at a time),
beside the card's 10 ms; the smallest nprobe reaching recall@100 >= 0.9 is marked.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="vectors in the index (default 10M)")
    parser.add_argument("--chunk", type=int, default=200_000, help="vectors generated and added at a time")
    parser.add_argument("--train", type=int, default=65_536, help="training vectors for the coarse and PQ k-means")
    parser.add_argument("--nlist", type=int, help="inverted lists (default archlab's: 4 sqrt(n), at most n/39)")
    parser.add_argument("--noise", type=float, default=0.5, help="noise std as a multiple of the real per-dim std")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--nprobe", default="4,8,16,32,64,128", help="nprobe values to measure")
    parser.add_argument("--from-index", metavar="DIR", help="take the real vectors from this index folder")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import faiss

    from archlab.search.index import default_params

    faiss.omp_set_num_threads(args.threads)
    print(f"# {describe_cpu()}; faiss {faiss.__version__}, {args.threads} threads")
    base = real_vectors(args.from_index)
    spread = base.std(axis=0).astype(np.float32)
    dim = base.shape[1]
    params = default_params("ivfpq", args.n, dim)
    if args.nlist:
        params["nlist"] = args.nlist
    print(f"real vectors: {len(base)} x {dim}; synthetic: {args.n} (noise {args.noise} x per-dim std); params {params}")

    t = time.perf_counter()
    train = synthetic_chunk(base, spread, args.noise, seed=10**9, n=max(args.train, 39 * max(256, params["nlist"])))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    train_s = time.perf_counter() - t
    del train
    seeds = list(range(0, args.n, args.chunk))
    t = time.perf_counter()
    for start in seeds:
        index.add(synthetic_chunk(base, spread, args.noise, seed=start, n=min(args.chunk, args.n - start)))
    add_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ivfpq.index"
        faiss.write_index(index, str(path))
        size = path.stat().st_size
    print(f"trained in {train_s:.1f} s, added {args.n} in {add_s:.1f} s ({args.n / add_s:,.0f} vectors/s)")
    # fixed tables (coarse centroids, PQ codebooks) vs what grows with n (codes + 8-byte ids + list headers)
    fixed = params["nlist"] * dim * 4 + params["m"] * 2 ** params["nbits"] * (dim // params["m"]) * 4
    per_vector = (size - fixed) / args.n
    fixed_10m = default_params("ivfpq", 10_000_000, dim)["nlist"] * dim * 4 + (fixed - params["nlist"] * dim * 4)
    print(f"index file: {size / 1e6:,.1f} MB = {size / args.n:.1f} bytes/vector all in; {per_vector:.1f} bytes/vector "
          f"beyond the fixed tables ({fixed / 1e6:.1f} MB: codes {index.pq.code_size} B + id 8 B); card: {CARD_BYTES} "
          f"B/vector, ~{CARD_TOTAL_MB} MB for 10M -> at 10M: {(per_vector * 1e7 + fixed_10m) / 1e6:,.0f} MB projected")

    # exact top-100 of the queries, streamed over the same chunks
    queries = synthetic_chunk(base, spread, args.noise, seed=-1 % 2**32, n=args.queries)
    best_s = np.full((args.queries, 100), -np.inf, dtype=np.float32)
    best_i = np.zeros((args.queries, 100), dtype=np.int64)
    t = time.perf_counter()
    for start in seeds:
        block = synthetic_chunk(base, spread, args.noise, seed=start, n=min(args.chunk, args.n - start))
        s = queries @ block.T
        i = np.argpartition(-s, min(100, s.shape[1] - 1), axis=1)[:, :100]
        s_top = np.take_along_axis(s, i, axis=1)
        all_s = np.concatenate([best_s, s_top], axis=1)
        all_i = np.concatenate([best_i, i + start], axis=1)
        keep = np.argsort(-all_s, axis=1)[:, :100]
        best_s, best_i = np.take_along_axis(all_s, keep, axis=1), np.take_along_axis(all_i, keep, axis=1)
    print(f"exact search of {args.queries} queries: {time.perf_counter() - t:.1f} s")

    faiss.omp_set_num_threads(1)  # one query at a time, as the card's latency
    print("nprobe  recall@100  p50 ms  p99 ms   (card: 10 ms at 10M)")
    chosen = None
    for nprobe in (int(x) for x in args.nprobe.split(",")):
        index.nprobe = min(nprobe, params["nlist"])
        times, found = [], []
        for q in queries:
            t = time.perf_counter()
            _, rows = index.search(q[None], 100)
            times.append((time.perf_counter() - t) * 1000)
            found.append(rows[0])
        recall = float(np.mean([len(set(f) & set(e)) / 100 for f, e in zip(found, best_i, strict=True)]))
        mark = ""
        if chosen is None and recall >= 0.9:
            chosen, mark = nprobe, "  <- smallest nprobe with recall@100 >= 0.9"
        print(f"{index.nprobe:>6}  {recall:10.3f}  {np.percentile(times, 50):6.2f}  {np.percentile(times, 99):6.2f}{mark}")
    if chosen is None:
        print("no nprobe measured reaches recall@100 >= 0.9 (PQ's 64-byte codes limit it: a refinement stage "
              "re-scoring the candidates with full vectors would be needed)")


if __name__ == "__main__":
    main()
