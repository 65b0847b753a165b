r"""FAISS indexes over unit vectors (inner product = cosine), and the index folder that holds one.

Index types (``choose_index_type`` picks by corpus size ``n``)::

    flat    exact search, IndexFlatIP                       4 d bytes/doc     n <= 100,000
    hnsw    graph search, IndexHNSWFlat (M, efSearch)       4 d + ~8 M bytes  n <= 1,000,000
    ivfpq   IndexIVFPQ: a coarse k-means into nlist lists, each vector stored as m one-byte codes of its
            residual's sub-vectors (product quantization; m = 64 -> the card's 64-byte codes; d must be
            divisible by m), nprobe lists visited per query                     larger corpora
            + re-scoring: PQ fetches ``rescore x k`` candidates, which are re-scored with exact inner
            products against the float16 vectors of ``rescore.npy``, memory-mapped from disk
            (:class:`RescoredIndex`): RAM holds 64 B of code + 8 B of id per vector, disk 2 d more;
            ``rescore`` defaults to :func:`rescore_factor` of n (4 up to 1M vectors, then ~4 sqrt(n / 1M))

PQ scores are approximate (a 384-d vector in 64 bytes): on vectors with MiniLM's statistics IVF-PQ alone
reached recall@100 0.86 against exact search (``benchmarks/search_scale.py``); re-scoring a larger PQ
candidate list with the stored vectors recovers the exact order among the candidates, so recall is then
limited only by whether the true neighbours are among them.

Training IVF-PQ needs at least 39 vectors per centroid (FAISS's own guideline) for the 256 centroids of
each sub-quantizer (and for the nlist lists): asking for ``ivfpq`` on fewer is a ConfigError that says
how many it has and needs.

An index folder::

    manifest.json   format, encoder (name, identity, dim, max length, pooling, precision), index type and
                    parameters, hybrid flag and BM25 parameters, corpus source, fingerprint and count;
                    written last (atomically): a folder without it is a build in progress
    build.json      what the chunks in vectors/ were encoded from (resume / append checks)
    docs.jsonl      the documents, in row order (row i is FAISS id i)
    vectors/        the float32 document vectors, in chunks (see archlab.search.encode)
    faiss.index     the FAISS index
    rescore.npy     ivfpq with re-scoring: the vectors ``[n, d]`` float16 in one file, read memory-mapped
    bm25/           the BM25 index (hybrid only)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop import io
from archlab.search.corpus import Corpus, Document, fingerprint

FORMAT = "archlab-search-index"
VERSION = 1
INDEX_TYPES = ("flat", "hnsw", "ivfpq")
FLAT_MAX = 100_000
HNSW_MAX = 1_000_000
PQ_BITS = 8
PQ_MAX_M = 64  # 64 one-byte codes: the card's "768d -> 64 bytes"
MIN_POINTS_PER_CENTROID = 39
RESCORE_FACTOR = 4  # ivfpq re-scoring: PQ candidates per result wanted, up to RESCORE_BASE_N vectors (0: PQ only)
RESCORE_BASE_N = 1_000_000  # beyond it the factor grows as sqrt(n) (rescore_factor)
MANIFEST, BUILD, DOCS, VECTORS, FAISS_FILE, BM25_DIR, RESCORE_FILE = (
    "manifest.json", "build.json", "docs.jsonl", "vectors", "faiss.index", "bm25", "rescore.npy"
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# FAISS
# ------------------------------------------------------------------------------------------------
def choose_index_type(n: int) -> str:
    """``flat`` up to 100k documents, ``hnsw`` up to 1M, ``ivfpq`` beyond."""
    return "flat" if n <= FLAT_MAX else "hnsw" if n <= HNSW_MAX else "ivfpq"


def pq_subquantizers(dim: int) -> int:
    """The number ``m`` of one-byte PQ codes: 64 when it divides ``dim``, else the largest divisor below it."""
    return max(m for m in range(1, min(PQ_MAX_M, dim) + 1) if dim % m == 0)


def min_ivfpq_vectors(nlist: int = 1) -> int:
    """Fewest training vectors for IVF-PQ: 39 per centroid, for the 256 PQ centroids and the ``nlist`` lists."""
    return MIN_POINTS_PER_CENTROID * max(2**PQ_BITS, nlist)


def ivfpq_nlist(n: int) -> int:
    """The number of IVF lists of a new IVF-PQ index over ``n`` vectors: ``4 sqrt(n)``, at most ``n / 39``."""
    return max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def check_ivfpq_size(n: int, nlist: int) -> None:
    """ConfigError unless ``n`` vectors are enough to train IVF-PQ with ``nlist`` lists (:func:`min_ivfpq_vectors`)."""
    need = min_ivfpq_vectors(nlist)
    if n < need:
        raise ConfigError(f"index 'ivfpq' needs at least {need} vectors to train (39 per centroid for "
                          f"{max(2**PQ_BITS, nlist)} centroids), the corpus has {n}: use 'flat' "
                          f"or 'hnsw' (the default picks by size)")  # fmt: skip


def rescore_factor(n: int) -> int:
    """The default IVF-PQ re-scoring factor for ``n`` vectors: PQ fetches ``factor x k`` candidates per query.

    ``factor = 4`` up to 1M vectors, then ``4 sqrt(n / 1M)`` rounded up to a power of two::

        n        <= 1M   <= 4M   <= 16M   <= 64M   <= 256M
        factor     4       8       16       32       64

    Measured basis (``benchmarks/search_scale.py``, synthetic vectors around the 2,696 real MiniLM vectors
    of the built-in corpus, recall@100 against exact search, 100 queries; docs/search.md):
    at 200k (nprobe 16-128) PQ alone 0.896, x2 0.996, x4 1.000; at 1M (nlist 2,048, nprobe 4 and 32) PQ
    alone 0.572, x2 0.846, x4 0.996, x8 0.999; at 10M (nlist 2,048, nprobe 4) x4 0.590, x8 0.776, x16 0.934,
    x32 0.997. The factor needed for recall@100 >= 0.9 grew from about 2 (200k) to between 2 and 4 (1M)
    and 16 (10M) while ``n`` grew 50x, about as ``sqrt(n)`` (50^0.5 = 7; 8 measured): the true top 100 lie
    among more and more near-equal neighbours whose PQ scores differ by less than the PQ error.
    ``4 sqrt(n / 1M)`` gives 1.8 -> 4 at 200k (twice the need), 4 at 1M (0.996) and 12.6 -> 16 at 10M.
    Between 1M and 10M and beyond 10M it is this rule, not a measurement; the synthetic vectors are more
    clustered than real corpora, so it errs on the side of more candidates (each costs one float16 row
    read, 768 B at 384-d). An index stores its factor in its manifest (``params["rescore"]``), so an index
    opens with the factor it was built with.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} must be an int >= 0 (the number of vectors in the index)")
    factor = RESCORE_FACTOR
    while factor * factor * RESCORE_BASE_N < RESCORE_FACTOR * RESCORE_FACTOR * n:  # factor < 4 sqrt(n / 1M)
        factor *= 2
    return factor


def check_rescore(rescore) -> None:
    """ConfigError unless ``rescore`` is an int >= 0 (candidates re-scored per result wanted; 0: PQ scores only)."""
    if isinstance(rescore, bool) or not isinstance(rescore, int) or rescore < 0:
        raise ConfigError(f"rescore={rescore!r} must be an int >= 0 (IVF-PQ candidates re-scored per result wanted; "
                          "0: PQ scores only)")  # fmt: skip


def default_params(kind: str, n: int, dim: int) -> dict:
    """The parameters stored with an index of ``kind`` over ``n`` vectors of dimension ``dim``."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 200, "efSearch": 128}
    if kind == "ivfpq":
        nlist = ivfpq_nlist(n)
        m = pq_subquantizers(dim)
        return {"nlist": nlist, "m": m, "nbits": PQ_BITS, "nprobe": min(nlist, 32), "code_bytes": m * PQ_BITS // 8,
                "rescore": rescore_factor(n), "rescore_dtype": "float16"}
    raise ConfigError(f"index type {kind!r} is not one of {INDEX_TYPES}")


def build_faiss(vectors: np.ndarray, kind: str, params: dict, *, train_size: int | None = None, seed: int = 0):
    """A FAISS index of ``kind`` (inner product) holding ``vectors`` ``[n, d]`` float32 as ids ``0 .. n``.

    IVF-PQ trains on at most ``train_size`` of the vectors (an evenly spaced sample; default all).
    """
    import faiss

    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
    elif kind == "ivfpq":
        check_ivfpq_size(n, params["nlist"])
        if dim % params["m"]:
            raise ConfigError(f"ivfpq m={params['m']} must divide the dimension {dim}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"],
                                 faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        index.cp.seed = seed
        index.pq.cp.seed = seed
        sample = vectors
        if train_size is not None and train_size < n:
            sample = vectors[np.linspace(0, n - 1, train_size).astype(np.int64)]
        index.train(np.ascontiguousarray(sample))
        index.nprobe = params["nprobe"]
    else:
        raise ConfigError(f"index type {kind!r} is not one of {INDEX_TYPES}")
    if n and kind == "ivfpq":
        add_ivfpq(index, vectors)
    elif n:
        index.add(np.ascontiguousarray(vectors))
    return index


def pq_encode(pq, x: np.ndarray, block: int = 256) -> np.ndarray:
    """The 8-bit PQ codes ``[n, m]`` uint8 of ``x`` ``[n, d]`` float32 under FAISS's ``ProductQuantizer`` ``pq``.

    Sub-vector ``x_j`` ``[d / m]`` gets the centroid ``c`` of sub-space ``j`` nearest in L2, i.e. the one
    maximising ``x_j . c - |c|^2 / 2``: per block of ``b`` rows and sub-space, one product
    ``[b, d/m + 1] @ [d/m + 1, 256]`` (``x_j`` with a -1 appended, the centroids with ``|c|^2 / 2``) and an
    argmax. FAISS encodes sub-vectors of fewer than 16 dimensions one distance at a time (the card's 64
    codes of a 384-d MiniLM vector are 6-d): about 10x slower on one thread here. The codes are FAISS's up
    to ties within rounding (``tests/search/test_ivfpq_build.py``).
    """
    import faiss

    if pq.nbits != 8:
        raise ConfigError(f"pq_encode handles 8-bit codes, the quantizer has nbits={pq.nbits}")
    m, dsub, ksub = pq.M, pq.dsub, pq.ksub
    centroids = faiss.vector_to_array(pq.centroids).reshape(m, ksub, dsub)
    tables = np.concatenate([centroids.transpose(0, 2, 1), 0.5 * (centroids**2).sum(2)[:, None, :]], axis=1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.empty((m, len(x)), dtype=np.intp)
    rows = np.empty((m, block, dsub + 1), dtype=np.float32)  # [m, b, dsub + 1]: sub-vectors, then -1
    rows[:, :, dsub] = -1
    scores = np.empty((block, ksub), dtype=np.float32)
    for start in range(0, len(x), block):
        nb = min(block, len(x) - start)
        rows[:, :nb, :dsub] = x[start : start + nb].reshape(nb, m, dsub).transpose(1, 0, 2)
        for j in range(m):
            np.matmul(rows[j, :nb], tables[j], out=scores[:nb])
            scores[:nb].argmax(1, out=codes[j, start : start + nb])
    return codes.T.astype(np.uint8)


def add_ivfpq(index, x: np.ndarray, timings: dict | None = None) -> None:
    """Add ``x`` ``[n, d]`` float32 to the trained IVF-PQ ``index`` as ids ``ntotal .. ntotal + n``.

    What ``index.add`` does (nearest coarse centroid, PQ code of the residual ``x - centroid``, appended to
    that list), with the PQ codes from :func:`pq_encode`; handed to FAISS as its standalone codes (list
    number, then the PQ code) through ``add_sa_codes``; codes of other than 8 bits (packed) go through
    ``index.add``. ``timings``, when given, accumulates the seconds of the two steps under ``"assign"`` and
    ``"encode"``.
    """
    import faiss

    if not index.by_residual:
        raise ConfigError("add_ivfpq expects an IVF-PQ index encoding residuals (by_residual=True)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if index.pq.nbits != 8:
        index.add(x)
        return
    timings = {} if timings is None else timings
    start = time.perf_counter()
    quantizer = faiss.downcast_index(index.quantizer)
    _, lists = quantizer.search(x, 1)
    lists = lists[:, 0]
    middle = time.perf_counter()
    residuals = x - quantizer.reconstruct_batch(lists)
    coarse = lists.astype("<i8").view(np.uint8).reshape(len(x), 8)[:, : index.coarse_code_size()]
    index.add_sa_codes(np.ascontiguousarray(np.concatenate([coarse, pq_encode(index.pq, residuals)], axis=1)))
    end = time.perf_counter()
    timings["assign"] = timings.get("assign", 0.0) + middle - start
    timings["encode"] = timings.get("encode", 0.0) + end - middle


def configure(index, kind: str, params: dict) -> None:
    """Set the search-time parameters (``efSearch``, ``nprobe``) of a loaded index."""
    if kind == "hnsw":
        index.hnsw.efSearch = params["efSearch"]
    elif kind == "ivfpq":
        index.nprobe = params["nprobe"]


class RescoredIndex:
    """A FAISS index whose candidates are re-scored exactly: ``search`` asks ``index`` for ``factor * k`` rows,
    scores them by inner product with their stored vectors and returns the best ``k``.

    ``store`` is ``[n, d]`` (float16 or float32; a ``np.memmap`` keeps it on disk, so only the rows read per
    query come into memory). Scores are computed in float32: ``x . v`` with ``v`` the stored (rounded) vector.
    The wrapped index keeps its search-time parameters (``nprobe``); ``d`` and ``ntotal`` are its own.
    """

    def __init__(self, index, store: np.ndarray, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"rescore={factor!r} must be an int >= 1 (candidates per result)")
        if store.shape != (index.ntotal, index.d):
            raise CheckpointError(f"the re-scoring store holds {list(store.shape)} vectors, the index "
                                  f"{[index.ntotal, index.d]}")  # fmt: skip
        self.index, self.store, self.factor = index, store, factor

    @property
    def d(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [q, k], rows [q, k])`` best first for queries ``x`` ``[q, d]``; missing slots: row -1."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        _, candidates = self.index.search(x, min(self.factor * k, self.ntotal))
        scores = np.full((len(x), k), -np.inf, dtype=np.float32)
        rows = np.full((len(x), k), -1, dtype=np.int64)
        for i, found in enumerate(candidates):
            found = np.sort(found[found >= 0])  # ascending rows: sequential reads of the memory map
            exact = np.asarray(self.store[found], dtype=np.float32) @ x[i]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[i, : len(best)], rows[i, : len(best)] = exact[best], found[best]
        return scores, rows


def write_rescore_store(vectors: np.ndarray, path: Path, dtype: str = "float16") -> int:
    """Write ``vectors`` ``[n, d]`` as ``dtype`` to the ``.npy`` file ``path`` atomically; its size in bytes."""
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"rescore_dtype={dtype!r} must be 'float16' or 'float32'")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, vectors.astype(dtype))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def searchable(index_dir: Path, faiss_index, kind: str, params: dict):
    """``faiss_index`` configured for search; wrapped in :class:`RescoredIndex` when ``params`` ask for re-scoring."""
    configure(faiss_index, kind, params)
    if kind != "ivfpq" or not params.get("rescore"):
        return faiss_index
    path = Path(index_dir) / RESCORE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the manifest asks for re-scoring (rescore={params['rescore']})")
    try:
        store = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable .npy array: {e}") from None
    return RescoredIndex(faiss_index, store, params["rescore"])


def write_faiss(index, path: Path) -> int:
    """Write ``index`` to ``path`` atomically; its size in bytes."""
    import faiss

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return path.stat().st_size


def read_faiss(path: Path):
    import faiss

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the index folder is incomplete")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not a readable FAISS index: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------
# the folder
# ------------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    io.write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (:func:`archlab.interop.io.read_json`); a missing file says ``what`` it is."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {what}")
    return io.read_json(path)


def index_path(index_dir: str | Path, name: str = "index_dir") -> Path:
    """``index_dir`` as a Path; ConfigError (naming the argument ``name``) unless it is a non-empty str or path."""
    if not isinstance(index_dir, str | os.PathLike) or not str(index_dir).strip():
        raise ConfigError(f"{name}={index_dir!r} must be the path of an index folder")
    return Path(index_dir)


#: What an index's manifest must hold to be opened: (section, key) -> (type, what it must be).
MANIFEST_FIELDS = {
    ("encoder", "name"): (str, "a string"), ("encoder", "identity"): (str, "a string"),
    ("encoder", "dim"): (int, "an integer"), ("encoder", "precision"): (str, "a string"),
    ("index", "type"): (str, f"one of {INDEX_TYPES}"), ("index", "params"): (dict, "an object"),
    ("corpus", "count"): (int, "an integer >= 1"), ("hybrid",): (bool, "true or false"),
}  # fmt: skip


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of an index folder, checked for its format and version and for the fields opening it reads."""
    index_dir = index_path(index_dir)
    if not index_dir.is_dir():
        raise CheckpointError(f"index {index_dir} is not a folder (build one with `archlab search index CORPUS --out "
                              f"{index_dir}`)")  # fmt: skip
    hint = "not a finished archlab search index (a build in progress resumes with `archlab search index`)"
    manifest = read_json(index_dir / MANIFEST, hint)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{index_dir / MANIFEST}: format {manifest.get('format')!r} version "
                              f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")  # fmt: skip
    missing = [key for key in ("encoder", "index", "hybrid", "corpus") if key not in manifest]
    if missing:
        raise CheckpointError(f"{index_dir / MANIFEST} has no {', '.join(missing)}: it is damaged; rebuild the index")
    for path, (kind, allowed) in MANIFEST_FIELDS.items():
        value = manifest
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok or (path == ("index", "type") and value not in INDEX_TYPES) or (path[-1] == "count" and value < 1):
            raise CheckpointError(f"{index_dir / MANIFEST}: {'.'.join(path)}={value!r} must be {allowed}: it is "
                                  "damaged; rebuild the index")  # fmt: skip
    return manifest


def write_docs(path: Path, docs: list[Document], *, append: bool = False) -> None:
    lines = "".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n"
                    for d in docs)  # fmt: skip
    if append:
        with path.open("a", encoding="utf-8") as f:
            f.write(lines)
    else:
        io.write_text_atomic(path, lines)


def read_docs(path: Path, count: int) -> list[Document]:
    """The first ``count`` documents of ``docs.jsonl`` (more lines may follow from an unfinished append)."""
    docs = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if len(docs) == count:
                    break
                r = json.loads(line)
                docs.append(Document(r["_id"], r["title"], r["text"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the index folder is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8; TypeError: not an object
        raise CheckpointError(f"{path}:{len(docs) + 1}: unreadable document ({e})") from None
    if len(docs) != count:
        raise CheckpointError(f"{path} holds {len(docs)} documents, the manifest says {count}")
    return docs


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``: from torch.distributed under torchrun (gloo started here if needed), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _start_build(corpus: Corpus, out: Path, settings: dict) -> None:
    """Check ``out`` (new, a build to resume, or an index to extend) and write its ``build.json``."""
    n, build_file = len(corpus), out / BUILD
    start = 0  # rows before `start` are already in a finished index (an append)
    if build_file.is_file():
        old = read_json(build_file, "")
        old_n = int(old.get("count", 0))
        same = {k: old.get(k) for k in settings} == settings
        prefix = old_n <= n and old.get("fingerprint") == fingerprint(corpus.docs[:old_n])
        if not (same and prefix):
            what = "encoder, precision or chunk size" if not same else "corpus (not an extension of the indexed one)"
            raise DataError(f"{out} holds an index or partial build of another {what}; give a new --out or delete "
                            f"{out}")  # fmt: skip
        if (out / MANIFEST).is_file() and old.get("complete"):
            start = old_n
        elif not old.get("complete"):
            start = int(old.get("previous_count", 0))  # a killed append resumes as an append
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} exists and is not an archlab search index: give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if start < n or not build_file.is_file():
        write_json(build_file, {**settings, "fingerprint": fingerprint(corpus.docs), "count": n, "complete": False,
                                "previous_count": start})  # fmt: skip
    else:
        write_json(build_file, {**read_json(build_file, ""), "previous_count": start})


def _index_kind(index: str, out: Path, n: int) -> str:
    """The index type a build of ``n`` documents into ``out`` makes: ``index``, else the type of the index already
    in ``out``, else :func:`choose_index_type`."""
    if index != "auto":
        return index
    if (out / MANIFEST).is_file():
        return read_manifest(out)["index"]["type"]
    return choose_index_type(n)


def say_truncated(texts: Sequence[str], encoder, hybrid: bool, say: Callable[[str], None]) -> int:
    """How many of ``texts`` are longer than ``encoder.max_seq_length`` tokens (their vectors read only their
    beginning), said through ``say`` when any is; 0 for an encoder that cannot count its tokens."""
    counts = getattr(encoder, "token_counts", None)
    limit = getattr(encoder, "max_seq_length", None)
    if counts is None or not limit:
        return 0
    long = sum(n > limit for n in counts(list(texts)))
    if long:
        say(f"note: {long:,} of {len(texts):,} documents are longer than the encoder's {limit} tokens: their vectors "
            "read each one's beginning only (" + ("BM25 indexes their whole text" if hybrid else
                                                  "--hybrid adds BM25, which indexes the whole text") + ")")
    return long


def build_index(
    corpus: Corpus,
    out: str | Path,
    *,
    index: str = "auto",
    hybrid: bool = False,
    model: str | Path = "minilm-l6",
    precision: str = "auto",
    batch_size: int = 32,
    chunk_size: int = 256,
    rescore: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Encode ``corpus`` into ``out`` and build its index; the manifest (rank 0) or ``{}`` (other ranks).

    Resumes a killed build (the chunks already written are kept). When ``out`` already holds an index of
    the first ``m`` documents of ``corpus`` with the same encoder, only documents ``m ..`` are encoded and
    added (an append). Under ``torchrun`` the ranks share the encoding; rank 0 builds the index.

    ``rescore`` (``ivfpq`` only): the re-scoring factor, 0 for PQ scores only. ``None`` keeps the one an
    existing index records, and gives a new index :func:`rescore_factor` of its size; a number is stored in
    the manifest (also of an index that is already up to date: that changes its factor without a rebuild).
    """
    from archlab.search import encode
    from archlab.search.engine import check_positive

    if not isinstance(corpus, Corpus):
        corpus = Corpus(corpus)  # a list of Document: checked there (empty, duplicate ids, not documents)
    if index != "auto" and index not in INDEX_TYPES:
        raise ConfigError(f"index={index!r} is not one of {('auto',) + INDEX_TYPES}")
    if not isinstance(hybrid, bool):
        raise ConfigError(f"hybrid={hybrid!r} must be True or False")
    check_positive("batch_size", batch_size)
    check_positive("chunk_size", chunk_size)
    say = log or (lambda message: None)
    out = index_path(out, "out")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; --out names a folder (new, empty, or an index to resume or extend)")
    n = len(corpus)
    kind = _index_kind(index, out, n)
    if rescore is not None:
        check_rescore(rescore)
        if kind != "ivfpq":
            how = f"chosen by size for {n:,} documents" if index == "auto" else "asked for"
            raise ConfigError(f"rescore={rescore} applies to 'ivfpq' indexes only; this one is {kind!r} ({how}): "
                              "pass index='ivfpq' (--index ivfpq) or leave rescore out")  # fmt: skip
    if kind == "ivfpq":
        check_ivfpq_size(n, ivfpq_nlist(n))  # before encoding (an index it extends had as many: n only grows)
    rank, world = _distributed()
    encoder = encode.load_encoder(model, precision)  # auto as asked: its line says auto chose
    precision = encode.resolve_precision(precision)
    identity = encode.encoder_identity(encoder)

    settings = {"encoder_identity": identity, "precision": precision, "chunk_size": chunk_size}
    build_file = out / BUILD
    vectors_dir = out / VECTORS
    if rank == 0:  # checks the folder and records what is being built; the other ranks wait, then read it
        _start_build(corpus, out, settings)
        start = int(read_json(build_file, "the build record").get("previous_count", 0))
        missing = encode.pending_rows(vectors_dir, n, chunk_size, start=start)  # every rank's, before any encodes
        if missing < n - start:
            say(f"resuming: {n - start - missing} of {n - start} documents already encoded")
    _barrier(world)
    start = int(read_json(build_file, "the build record").get("previous_count", 0))  # rows already indexed

    texts = [corpus[i].full_text for i in range(start, n)]
    todo = encode.pending_rows(vectors_dir, n, chunk_size, start=start, rank=rank, world_size=world)  # this rank's
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc=f"encode (rank {rank})" if world > 1 else "encode", unit="doc", file=sys.stderr)
    encode.encode_chunks(texts, vectors_dir, first_row=start, encoder=encoder, chunk_size=chunk_size,
                         batch_size=batch_size, rank=rank, world_size=world,
                         on_rows=bar.update if bar else None)  # fmt: skip
    if bar is not None:
        bar.close()
    if rank == 0 and texts:
        say_truncated(texts, encoder, hybrid, say)
    _barrier(world)
    if rank != 0:
        return {}

    vectors = encode.load_vectors(vectors_dir, n, encoder.dim)
    manifest = read_manifest(out) if start else None
    faiss_path = out / FAISS_FILE
    if manifest and kind == manifest["index"]["type"] and start < n:
        params = manifest["index"]["params"]
        faiss_index = read_faiss(faiss_path)
        if faiss_index.ntotal == start and kind == "ivfpq":
            add_ivfpq(faiss_index, vectors[start:])
        elif faiss_index.ntotal == start:
            faiss_index.add(np.ascontiguousarray(vectors[start:]))
        elif faiss_index.ntotal != n:  # (== n: a killed append had written it already)
            raise CheckpointError(f"{faiss_path} holds {faiss_index.ntotal} vectors, expected {start} or {n}; "
                                  f"delete it and run the same command to rebuild it from the saved vectors")  # fmt: skip
        say(f"appended {n - start} documents to the {kind} index ({start} before)")
    elif manifest and kind == manifest["index"]["type"]:
        params, faiss_index = manifest["index"]["params"], None
        say(f"{out} is up to date ({n} documents)")
    else:
        params = default_params(kind, n, encoder.dim)
        faiss_index = build_faiss(vectors, kind, params)
    if rescore is not None and rescore != params.get("rescore"):
        say(f"re-scoring factor {params.get('rescore')} -> {rescore}")
        params = {**params, "rescore": rescore}
    size = write_faiss(faiss_index, faiss_path) if faiss_index is not None else manifest["index"]["bytes"]
    store_bytes = None
    if kind == "ivfpq" and params.get("rescore"):
        store_path = out / RESCORE_FILE
        if faiss_index is not None or not store_path.is_file():
            store_bytes = write_rescore_store(vectors, store_path, params.get("rescore_dtype", "float16"))
        else:
            store_bytes = store_path.stat().st_size

    if start == 0:
        write_docs(out / DOCS, corpus.docs)
    elif start < n:
        lines = sum(1 for _ in (out / DOCS).open(encoding="utf-8"))
        if lines > start:  # an append killed after writing documents: rewrite them all
            write_docs(out / DOCS, corpus.docs)
        else:
            write_docs(out / DOCS, corpus.docs[start:], append=True)
    bm25 = None
    if hybrid or (manifest and manifest["hybrid"]):
        from archlab.search.lexical import BM25Index

        if start < n or not (out / BM25_DIR).is_dir():
            bm25 = BM25Index.build([d.full_text for d in corpus])
            bm25.save(out / BM25_DIR)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "encoder": {"name": str(model), "identity": identity, "dim": encoder.dim, "max_seq_length":
                    encoder.max_seq_length, "pooling": encoder.pooling, "precision": precision},
        "index": {"type": kind, "params": params, "bytes": size, "bytes_per_doc": round(size / n, 1),
                  **({"rescore_bytes": store_bytes, "rescore_bytes_per_doc": round(store_bytes / n, 1)}
                     if store_bytes is not None else {})},
        "hybrid": bool(hybrid or (manifest and manifest["hybrid"])),
        "bm25": bm25.params if bm25 else (manifest or {}).get("bm25"),
        "corpus": {"source": corpus.source, "fingerprint": corpus.fingerprint, "count": n},
    }  # fmt: skip
    write_json(out / MANIFEST, manifest)
    write_json(build_file, {**settings, "fingerprint": corpus.fingerprint, "count": n, "complete": True})
    return manifest


def append_documents(index_dir: str | Path, docs: list[Document], **kwargs) -> dict:
    """Add ``docs`` to an existing index (encodes the new documents only); the new manifest."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    old = read_docs(index_dir / DOCS, manifest["corpus"]["count"])
    corpus = Corpus(old + list(docs), manifest["corpus"]["source"])
    kwargs.setdefault("model", manifest["encoder"]["name"])
    kwargs.setdefault("precision", manifest["encoder"]["precision"])
    return build_index(corpus, index_dir, index=manifest["index"]["type"], hybrid=manifest["hybrid"], **kwargs)


__all__ = [
    "INDEX_TYPES", "RescoredIndex", "add_ivfpq", "append_documents", "build_faiss", "build_index", "check_ivfpq_size",
    "check_rescore", "choose_index_type", "configure", "default_params", "ivfpq_nlist", "min_ivfpq_vectors",
    "pq_encode", "pq_subquantizers", "read_docs", "read_faiss", "read_manifest", "rescore_factor", "say_truncated",
    "searchable", "write_rescore_store",
]  # fmt: skip
