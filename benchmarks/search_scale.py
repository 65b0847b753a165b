"""The card's "768d -> 64 bytes, ~640 MB for 10M": an IVF-PQ index of N synthetic MiniLM-like vectors, measured.

Synthetic vectors with the statistics of real embeddings: each is a real all-MiniLM-L6-v2 document vector
(the built-in corpus, encoded by archlab, or the vectors of an existing index folder) plus Gaussian noise
with the real vectors' per-dimension spread times ``--noise``, renormalised. They are generated in chunks
from fixed seeds and streamed into the index (trained first on ``--train`` of them), so the build fits
this machine.

One pass over the chunks adds them to the index (:func:`archlab.search.index.add_ivfpq`: FAISS's coarse
assignment, the PQ codes by one small matrix product per sub-space), writes them as float16 to the
re-scoring store (one ``.npy`` file, memory-mapped: archlab's ``rescore.npy``) and keeps the exact top 100
of the ``--queries`` queries (float32 inner products, a chunked flat scan), so recall@100 is measured
against exact search over all N. The build lives in ``--workdir``: after each chunk the index, the running
exact top 100 and ``state.json`` are written (the state last, atomically), so a killed build resumes from
its last finished chunk when run again with the same arguments; ``--build-only`` stops after the build.

Printed: the seconds of each build phase; bytes of the written index (total, per vector, and the resident
memory its loading adds) beside the card's 64 B and 640 MB, the store's bytes on disk, and for each search
choice (``nprobe`` x re-scoring factor: PQ fetches factor x 100 candidates that are re-scored exactly with
the stored vectors; 0 = PQ scores only) the recall@100 against exact search and the per-query latency
p50/p99 (one query at a time, one thread), beside the card's 10 ms. The choices with recall@100 >= 0.9 are
marked, the fastest of them chosen. The same goes to ``--json`` (default
``benchmarks/results/search_scale_<N>.json``). ``--opq`` also builds the same index behind a learned OPQ
rotation (FAISS ``OPQ64,IVF{nlist},PQ64``) and measures it the same way.

    python benchmarks/search_scale.py --threads 1 --nlist 4096 --workdir runs/scale-10m   # 10M vectors (long)
    python benchmarks/search_scale.py --n 200000                                          # a reduced run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
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
    """``n`` unit vectors ``[n, d]`` float32, each a random real vector plus N(0, (noise * spread)^2) per dimension.

    Deterministic in ``seed`` (NumPy picks the real vectors; torch's generator draws the Gaussian noise,
    2.3x faster than NumPy's on one thread here).
    """
    import torch

    rows = np.random.default_rng(seed).integers(0, len(base), n)
    x = torch.randn((n, base.shape[1]), generator=torch.Generator().manual_seed(seed)).numpy()
    x *= (noise * spread).astype(np.float32)
    x += base[rows]
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


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


STATE = "state.json"
STORE = "rescore.npy"


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _add(index, x: np.ndarray, seconds: dict) -> None:
    """Add ``x`` to an IVF-PQ ``index``, or to one behind a learned rotation (OPQ), through ``add_ivfpq``."""
    import faiss

    from archlab.search.index import add_ivfpq

    if isinstance(index, faiss.IndexPreTransform):
        x = index.apply_py(x)
        index = faiss.downcast_index(index.index)
    add_ivfpq(index, x, seconds)


def _ntotal(index) -> int:
    import faiss

    return faiss.extract_index_ivf(index).ntotal


def build(workdir: str | Path, base: np.ndarray, spread: np.ndarray, *, n: int, chunk: int, nlist: int,
          m: int, train: int, niter: int, noise: float, queries: int, opq: bool = False,
          stop_after: int | None = None, log=print) -> dict:  # fmt: skip
    """Build, or resume, the streamed IVF-PQ index(es) of ``n`` synthetic vectors in ``workdir``; its state.

    The state (``workdir/state.json``) names the finished rows ``done``, the index file of each kind, the
    exact top 100 file (``truth``: scores and rows ``[queries, 100]``), the seconds per phase and the
    settings (a resumed build must be given the same ones). ``stop_after`` chunks (tests) ends the call
    early, as a kill after a checkpoint would.
    """
    import faiss

    from archlab.errors import ConfigError
    from archlab.search.index import read_faiss, write_faiss

    workdir = Path(workdir)
    dim = base.shape[1]
    settings = {"n": n, "chunk": chunk, "nlist": nlist, "m": m, "train": train, "niter": niter, "noise": noise,
                "queries": queries, "opq": opq, "dim": dim,
                "base": hashlib.sha256(np.ascontiguousarray(base).tobytes()).hexdigest()[:16]}  # fmt: skip
    kinds = {"ivfpq": f"IVF{nlist},PQ{m}"}
    if opq:
        kinds["opq+ivfpq"] = f"OPQ{m},IVF{nlist},PQ{m}"
    state_path = workdir / STATE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["settings"] != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise ConfigError(f"{workdir} holds a build with other settings ({', '.join(changed)}): give another "
                              f"--workdir or delete {workdir}")  # fmt: skip
        log(f"resuming the build in {workdir}: {state['done']:,} of {n:,} vectors done")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        seconds = {"train": 0.0}
        start = time.perf_counter()
        sample = synthetic_chunk(base, spread, noise, seed=10**9, n=train)
        seconds["synthesis"] = time.perf_counter() - start
        files = {}
        for name, spec in kinds.items():
            t = time.perf_counter()
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
            ivf.cp.niter, ivf.cp.seed, ivf.pq.cp.seed = niter, 0, 0
            ivf.do_polysemous_training = False  # the factory's default: slow, and the search does not use it
            index.train(sample)
            seconds["train"] += time.perf_counter() - t
            log(f"{name}: {spec} trained on {train:,} vectors ({train / nlist:.0f} per list, {niter} k-means "
                f"iterations) in {time.perf_counter() - t:.1f} s")  # fmt: skip
            files[name] = f"{name}-0.index"
            write_faiss(index, workdir / files[name])
        del sample
        np.lib.format.open_memmap(workdir / STORE, mode="w+", dtype=np.float16, shape=(n, dim)).flush()
        truth = "truth-0.npz"
        np.savez(workdir / truth, scores=np.full((queries, 100), -np.inf, np.float32),
                 rows=np.zeros((queries, 100), np.int64))  # fmt: skip
        state = {"settings": settings, "done": 0, "files": files, "truth": truth, "seconds": seconds}
        _atomic_json(state_path, state)
    for path in workdir.iterdir():  # files of a checkpoint that a kill interrupted before its state was written
        if path.suffix in (".index", ".npz") and path.name not in (*state["files"].values(), state["truth"]):
            path.unlink()

    done, seconds = state["done"], state["seconds"]
    if done == n:
        return state
    indexes = {name: read_faiss(workdir / file) for name, file in state["files"].items()}
    for name, index in indexes.items():
        if _ntotal(index) != done:
            raise ConfigError(f"{workdir / state['files'][name]} holds {_ntotal(index)} vectors, the state says "
                              f"{done}: delete {workdir} and build again")  # fmt: skip
    with np.load(workdir / state["truth"]) as f:
        best = (f["scores"], f["rows"])
    query_vectors = synthetic_chunk(base, spread, noise, seed=2**32 - 1, n=queries)
    store = np.load(workdir / STORE, mmap_mode="r+")
    began, chunks, added = time.perf_counter(), 0, 0
    while done < n:
        rows = min(chunk, n - done)
        t = time.perf_counter()
        block = synthetic_chunk(base, spread, noise, seed=done, n=rows)
        seconds["synthesis"] = seconds.get("synthesis", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        store[done : done + rows] = block
        seconds["store"] = seconds.get("store", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        best = exact_update(best, query_vectors, block, done)
        seconds["exact"] = seconds.get("exact", 0.0) + time.perf_counter() - t
        for index in indexes.values():
            _add(index, block, seconds)
        del block
        done += rows
        t = time.perf_counter()
        store.flush()
        files = {name: f"{name}-{done}.index" for name in indexes}
        for name, index in indexes.items():
            write_faiss(index, workdir / files[name])
        truth = f"truth-{done}.npz"
        np.savez(workdir / truth, scores=best[0], rows=best[1])
        old = [state["truth"], *state["files"].values()]
        state = {**state, "done": done, "files": files, "truth": truth}
        seconds["checkpoint"] = seconds.get("checkpoint", 0.0) + time.perf_counter() - t
        _atomic_json(state_path, state)
        for file in old:
            (workdir / file).unlink()
        chunks, added = chunks + 1, added + rows
        rate = (time.perf_counter() - began) / added
        log(f"  {done:,} of {n:,} vectors ({(done / n):.0%}; {rate * 1e6:.0f} s per million, about "
            f"{rate * (n - done) / 60:.0f} min left) " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
        if stop_after is not None and chunks == stop_after and done < n:
            break
    del store
    return state


def rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc/self/statm``; 0 where it is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="vectors in the index (default 10M)")
    parser.add_argument("--chunk", type=int, default=500_000, help="vectors added per checkpoint")
    parser.add_argument("--nlist", type=int, help="inverted lists (default archlab's: 4 sqrt(n), at most n/39)")
    parser.add_argument("--train", type=int, help="training vectors (default 40 per list, at least 39 x 256)")
    parser.add_argument("--niter", type=int, default=10, help="k-means iterations of the coarse quantizer")
    parser.add_argument("--noise", type=float, default=0.5, help="noise std as a multiple of the real per-dim std")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--nprobe", default="4,8,16,32,64", help="nprobe values to measure")
    parser.add_argument("--rescore", default="0,2,4,8", help="re-scoring factors to measure (0: PQ scores only)")
    parser.add_argument("--opq", action="store_true", help="also build and measure an OPQ-rotated IVF-PQ")
    parser.add_argument("--from-index", metavar="DIR", help="take the real vectors from this index folder")
    parser.add_argument("--workdir", help="the build's folder (resumable); default: a temporary one, removed")
    parser.add_argument("--keep", action="store_true", help="keep --workdir after measuring (default: remove it)")
    parser.add_argument("--build-only", action="store_true", help="stop after the build (resume or measure later)")
    parser.add_argument("--json", help="results file (default benchmarks/results/search_scale_<N>.json)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for training and adding")
    args = parser.parse_args()

    import faiss

    from archlab.search.index import RescoredIndex, default_params, min_ivfpq_vectors, read_faiss

    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    machine = f"{describe_cpu()}; faiss {faiss.__version__}, {args.threads} threads for the build"
    print(f"# {machine}", flush=True)
    base = real_vectors(args.from_index)
    spread = base.std(axis=0).astype(np.float32)
    dim = base.shape[1]
    params = default_params("ivfpq", args.n, dim)
    if args.nlist:
        params["nlist"] = args.nlist
    train = args.train or max(min_ivfpq_vectors(), 40 * params["nlist"])
    print(f"real vectors: {len(base)} x {dim}; synthetic: {args.n:,} (noise {args.noise} x per-dim std); "
          f"params {params}", flush=True)  # fmt: skip

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="search-scale-"))
    started = time.perf_counter()
    state = build(workdir, base, spread, n=args.n, chunk=args.chunk, nlist=params["nlist"], m=params["m"],
                  train=train, niter=args.niter, noise=args.noise, queries=args.queries, opq=args.opq,
                  log=lambda line: print(line, flush=True))  # fmt: skip
    seconds = state["seconds"]
    print(f"build: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}; {sum(seconds.values()):.0f} s in "
          f"all over its runs ({time.perf_counter() - started:.0f} s in this one)", flush=True)  # fmt: skip
    if args.build_only:
        print(f"built in {workdir} (--build-only): run the same command without it to measure")
        return

    store_path = workdir / STORE
    store_bytes = store_path.stat().st_size
    sizes = {name: (workdir / file).stat().st_size for name, file in state["files"].items()}
    indexes, resident = {}, {}
    for name, file in state["files"].items():
        before = rss_bytes()
        indexes[name] = read_faiss(workdir / file)
        resident[name] = rss_bytes() - before
    # fixed tables (coarse centroids, PQ codebooks[, OPQ matrix]) vs what grows with n (codes, 8-byte ids, lists)
    pq_tables = params["m"] * 2 ** params["nbits"] * (dim // params["m"]) * 4
    fixed = params["nlist"] * dim * 4 + pq_tables
    size = sizes["ivfpq"]
    per_vector = (size - fixed) / args.n
    nlist_10m = default_params("ivfpq", 10_000_000, dim)["nlist"] if not args.nlist else params["nlist"]
    projected = (per_vector * 1e7 + nlist_10m * dim * 4 + pq_tables) / 1e6
    print(f"\n## bytes (card: {CARD_BYTES} B/vector of 768-d, ~{CARD_TOTAL_MB} MB for 10M)")
    print(f"index file: {size / 1e6:,.1f} MB = {size / args.n:.1f} B/vector all in; {per_vector:.1f} B/vector "
          f"beyond the fixed tables ({fixed / 1e6:.1f} MB) = PQ code {params['code_bytes']} B + id 8 B; "
          f"at 10M: {projected:,.0f} MB")  # fmt: skip
    print(f"resident memory added by loading it: {resident['ivfpq'] / 1e6:,.1f} MB = "
          f"{resident['ivfpq'] / args.n:.1f} B/vector")  # fmt: skip
    for name in sizes:
        if name != "ivfpq":
            print(f"{name} file: {sizes[name] / 1e6:,.1f} MB = {sizes[name] / args.n:.1f} B/vector all in")
    print(f"re-scoring store on disk (float16, memory-mapped; in RAM only as the OS caches it): "
          f"{store_bytes / 1e6:,.1f} MB = {store_bytes / args.n:.1f} B/vector")  # fmt: skip

    faiss.omp_set_num_threads(1)  # one query at a time, as the card's latency
    with np.load(workdir / state["truth"]) as f:
        truth = f["rows"]
    queries = synthetic_chunk(base, spread, args.noise, seed=2**32 - 1, n=args.queries)
    mapped = np.load(store_path, mmap_mode="r")
    print(f"\n## recall@100 against exact search over {args.n:,}, {args.queries} queries, one at a time, "
          f"1 thread (card: ANN 10 ms at 10M; target recall@100 >= 0.9)")  # fmt: skip
    print(f"{'index':<10} {'nprobe':>6} {'rescore':>8} {'recall@100':>10} {'p50 ms':>8} {'p99 ms':>8}  "
          f"RAM B/vec  disk B/vec")  # fmt: skip
    rows = []
    for name, index in indexes.items():
        ivf = faiss.extract_index_ivf(index)
        for nprobe in (int(x) for x in args.nprobe.split(",")):
            ivf.nprobe = min(nprobe, params["nlist"])
            for factor in (int(x) for x in args.rescore.split(",")):
                searcher = RescoredIndex(index, mapped, factor) if factor else index
                measure(searcher, queries[:5], truth[:5])  # warm the lists (and the store's pages) once
                recall, p50, p99 = measure(searcher, queries, truth)
                ram = sizes[name] / args.n
                disk = ram + (store_bytes / args.n if factor else 0)
                rows.append({"index": name, "nprobe": ivf.nprobe, "rescore": factor, "recall_at_100": recall,
                             "p50_ms": p50, "p99_ms": p99, "ram_bytes_per_vector": ram,
                             "disk_bytes_per_vector": disk})  # fmt: skip
                mark = "  >= 0.9" if recall >= 0.9 else ""
                print(f"{name:<10} {ivf.nprobe:>6} {factor:>8} {recall:10.3f} {p50:8.2f} {p99:8.2f}  "
                      f"{ram:9.1f}  {disk:10.1f}{mark}", flush=True)  # fmt: skip
    good = [r for r in rows if r["recall_at_100"] >= 0.9]
    chosen = min(good, key=lambda r: r["p50_ms"]) if good else None
    if chosen:
        print(f"chosen: {chosen['index']} nprobe {chosen['nprobe']} rescore {chosen['rescore']}: recall@100 "
              f"{chosen['recall_at_100']:.3f}, p50 {chosen['p50_ms']:.2f} ms, p99 {chosen['p99_ms']:.2f} ms "
              f"(card: {CARD_ANN_MS:.0f} ms)")  # fmt: skip
    else:
        print("no choice measured reaches recall@100 >= 0.9: raise nprobe or the re-scoring factor")
    default = [r for r in rows if r["rescore"] == params["rescore"]]
    print(f"archlab's default re-scoring factor for {args.n:,} vectors (index.rescore_factor): x{params['rescore']}"
          + (": recall@100 " + ", ".join(f"{r['recall_at_100']:.3f} at nprobe {r['nprobe']}" for r in default)
             if default else " (not among --rescore)"))  # fmt: skip
    del mapped, indexes

    out = Path(args.json or Path(__file__).parent / "results" / f"search_scale_{args.n}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine, "command": "python benchmarks/search_scale.py " + " ".join(sys.argv[1:]),
               "n": args.n, "dim": dim, "real_vectors": len(base), "noise": args.noise, "params": params,
               "train": train, "niter": args.niter, "build_seconds": seconds, "index_bytes": sizes,
               "index_resident_bytes": resident, "fixed_table_bytes": fixed, "bytes_per_vector_beyond_tables":
               per_vector, "store_bytes": store_bytes, "queries": args.queries, "search": rows, "chosen": chosen,
               "card": {"bytes_per_vector": CARD_BYTES, "total_mb": CARD_TOTAL_MB, "ann_ms": CARD_ANN_MS}}  # fmt: skip
    _atomic_json(out, results)
    print(f"results: {out}")
    if not args.workdir or not args.keep:
        shutil.rmtree(workdir)
        print(f"removed {workdir} ({(sum(sizes.values()) + store_bytes) / 1e9:.1f} GB)")


if __name__ == "__main__":
    main()
