r"""Document vectors for the index: archlab's BERT with sentence-transformers weights, in resumable chunks.

Each document's ``full_text`` (title, blank line, text) is embedded by :mod:`archlab.interop.sentence`
(mean pooling over real tokens, then L2 norm; inputs cut to the model's ``max_seq_length``)::

    v_i = normalize(mean_t BERT(doc_i)_t)        [n, d]    (d = 384 for all-MiniLM-L6-v2)

Offline encoding of a large corpus is split into **chunks** of consecutive rows (``chunk_size``
documents each), written as ``vectors/chunk-<start>-<stop>.npy`` (float32 ``[stop - start, d]``), each
atomically (a temporary file renamed into place): a killed run leaves whole chunks only, and the next run
encodes just the chunks that are missing. Inside a chunk, documents of similar length share a batch.

Sharding: chunk ``c`` belongs to rank ``c mod world_size``; under ``torchrun --nproc_per_node=N`` every
rank encodes its own chunks and the index is built from all of them. A chunk's vectors depend on its
documents only (never on which rank computed it), so N processes give the same vectors as one.

Appending documents later encodes the new rows only: their chunks start at the old document count.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop.sentence import (
    DEFAULT_MODEL,
    ENCODER_PRECISIONS,
    SentenceEncoder,
    resolve_encoder_precision,
    sentence_encoder,
)

CHUNK_RE = re.compile(r"chunk-(\d{9})-(\d{9})\.npy")


def resolve_precision(precision: str) -> str:
    """``fp32``, ``bf16`` or ``int8``: ``auto`` is bf16 where the CPU computes it natively (archlab.precision
    decides; :func:`archlab.interop.sentence.resolve_encoder_precision`)."""
    return resolve_encoder_precision(precision)


def load_encoder(
    model: str | Path = DEFAULT_MODEL, precision: str = "fp32", given: str = "as asked"
) -> SentenceEncoder:
    """The sentence encoder for ``model`` in ``precision`` (one of :data:`ENCODER_PRECISIONS`; ``given``: why an
    fp32 / bf16 request holds, for the line that says it): one cached copy per folder and precision
    (:func:`archlab.interop.sentence.sentence_encoder`)."""
    return sentence_encoder(model, precision=precision, given=given)


def encoder_identity(encoder: SentenceEncoder) -> str:
    """16 hex digits naming the encoder's weights and tokenizer (its files' sizes, heads and tails).

    Stored in an index's manifest and compared when the index is opened, so a query is never
    embedded by another model than the documents were.
    """
    h = hashlib.sha256(f"d={encoder.dim};pool={encoder.pooling};max={encoder.max_seq_length}".encode())
    for path in sorted(encoder.folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".txt"):
            size = path.stat().st_size
            h.update(f"{path.relative_to(encoder.folder).as_posix()}:{size}".encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(size - (1 << 20))
                    h.update(f.read())
    return h.hexdigest()[:16]


def chunk_ranges(start: int, stop: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(a, b), ...]`` covering rows ``start .. stop`` in pieces of ``chunk_size`` (the last may be shorter)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive int")
    return [(a, min(a + chunk_size, stop)) for a in range(start, stop, chunk_size)]


def chunk_path(vectors_dir: Path, a: int, b: int) -> Path:
    return Path(vectors_dir) / f"chunk-{a:09d}-{b:09d}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_chunks(
    texts: Sequence[str],
    vectors_dir: str | Path,
    *,
    first_row: int = 0,
    encoder: SentenceEncoder,
    chunk_size: int = 256,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    on_rows: Callable[[int], None] | None = None,
) -> int:
    """Embed ``texts`` (rows ``first_row ..``) into the missing chunk files of this rank; the number of rows encoded.

    ``on_rows(n)`` is called after each chunk with its row count (a progress bar). Chunks already on
    disk are kept as they are (resume).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
    vectors_dir = Path(vectors_dir)
    vectors_dir.mkdir(parents=True, exist_ok=True)
    done = 0
    for c, (a, b) in enumerate(chunk_ranges(first_row, first_row + len(texts), chunk_size)):
        path = chunk_path(vectors_dir, a, b)
        if c % world_size != rank or path.is_file():
            continue
        vectors = encoder.embed(list(texts[a - first_row : b - first_row]), batch_size=batch_size)
        _save_atomic(path, vectors.numpy().astype(np.float32, copy=False))
        done += b - a
        if on_rows is not None:
            on_rows(b - a)
    return done


def pending_rows(vectors_dir: str | Path, stop: int, chunk_size: int, *, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> int:  # fmt: skip
    """How many rows of ``start .. stop`` this rank still has to encode (for a progress bar's total)."""
    ranges = chunk_ranges(start, stop, chunk_size)
    return sum(b - a for c, (a, b) in enumerate(ranges)
               if c % world_size == rank and not chunk_path(Path(vectors_dir), a, b).is_file())  # fmt: skip


def load_vectors(vectors_dir: str | Path, n: int, dim: int) -> np.ndarray:
    """The ``[n, dim]`` float32 vectors of rows ``0 .. n`` from the chunk files, checked for gaps and shapes."""
    vectors_dir = Path(vectors_dir)
    chunks = []
    for path in vectors_dir.glob("chunk-*.npy"):
        match = CHUNK_RE.fullmatch(path.name)
        if match:
            chunks.append((int(match[1]), int(match[2]), path))
    chunks.sort()
    out = np.empty((n, dim), dtype=np.float32)
    row = 0
    for a, b, path in chunks:
        if a >= n:
            break
        if a != row:
            raise DataError(f"{vectors_dir}: rows {row}..{a} have no vectors (a chunk is missing: run `archlab "
                            f"search index` again with the same --out to finish encoding)")  # fmt: skip
        try:
            block = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable .npy file ({e}); delete it and index again") from None
        if block.shape != (b - a, dim) or block.dtype != np.float32:
            raise CheckpointError(f"{path} holds {block.dtype}{list(block.shape)}, expected float32[{b - a}, {dim}]; "
                                  "delete it and index again")  # fmt: skip
        out[a:b] = block
        row = b
    if row < n:
        raise DataError(f"{vectors_dir}: rows {row}..{n} have no vectors yet (run `archlab search index` again "
                        "with the same --out to finish encoding)")  # fmt: skip
    return out


__all__ = [
    "ENCODER_PRECISIONS", "chunk_ranges", "encode_chunks", "encoder_identity", "load_encoder", "load_vectors",
    "pending_rows", "resolve_precision",
]  # fmt: skip
