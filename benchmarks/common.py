"""Shared by the benchmarks: thread setup, the measured fp32 matmul peak, interleaved timing, tables.

Peers are timed in interleaved rounds (A B C A B C ...) and each reports its median round, so a
background load that comes and goes hits every peer alike and the printed ratios stay meaningful.
:func:`time_interleaved` runs the peers in this process; :func:`time_in_processes` gives each its own
process, so that one peer's memory does not change what the next one's allocations cost (measured
here: Hugging Face's GPT-2 step ran 30% slower after archlab's and x-transformers' steps in the same
process than alone).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from archlab.hardware import describe_cpu


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per peer (median is reported)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--keep-memory", action="store_true",
                        help="glibc keeps freed memory for reuse instead of returning it to the OS (no page "
                             "faults on large tensors; applies to every peer alike)")  # fmt: skip
    return parser


def keep_freed_memory() -> str:
    """Tell glibc's malloc to serve every size from its heap and never trim it.

    By default an allocation over 32 MB is a fresh ``mmap`` whose pages fault in (and are zeroed by the
    kernel) on first touch, every step; a model that allocates large temporaries (full ``[B, N, V]``
    logits) pays that each step. jemalloc or tcmalloc, as PyTorch's CPU tuning guides suggest, have
    the same effect. Returns what was done, for the report.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "--keep-memory: not glibc, left as is"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    return "glibc malloc keeps freed memory (mmap and trim thresholds raised)" if ok else "mallopt refused"


def setup(threads: int, keep_memory: bool = False) -> str:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    memory = keep_freed_memory() if keep_memory else "default malloc"
    return f"torch {torch.__version__}, {threads} threads, {describe_cpu()}, {memory}"


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` on this machine (the ceiling a model can reach)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@dataclass
class Peer:
    """One contender: ``run()`` does one unit of work (a train step, a decode) that processes ``tokens`` tokens."""

    name: str
    run: Callable[[], object]
    tokens: int
    times: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def time_interleaved(peers: list[Peer], *, rounds: int, warmup: int = 1, per_round: int = 1) -> None:
    """Fill each peer's ``times`` with ``rounds`` seconds-per-run figures, peers alternating every round."""
    for peer in peers:
        for _ in range(warmup):
            peer.run()
    for _ in range(rounds):
        for peer in peers:
            start = time.perf_counter()
            for _ in range(per_round):
                peer.run()
            peer.times.append((time.perf_counter() - start) / per_round)


def compiled_decoding_peer(name: str, model, prompt: torch.Tensor, n: int, *, cpp_wrapper: bool = False):
    """A peer decoding ``n`` greedy tokens after ``prompt [1, n0]`` through
    :class:`archlab.static_decoding.StaticDecoder` (static KV cache, ``torch.compile``d one-token step, inductor's C++
    wrapper with ``cpp_wrapper``); also the
    seconds its compilation took (the first run, which compiles, less the second), the tokens it generated and
    the decoder (``max_len = n0 + n``), whose compiled step :func:`teacher_forced` reuses.

    Returns ``(peer, seconds, tokens, decoder)``.
    """
    from archlab.generation import generate
    from archlab.static_decoding import StaticDecoder

    # each decoder adds traces of the same step function; past torch's per-process cap (recompile_limit, 8) later
    # decoders would run eagerly (StaticDecoder's docstring), and a benchmark compiling 5 modes reaches it
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    decoder = StaticDecoder(model, max_len=prompt.shape[1] + n, compile=True, cpp_wrapper=cpp_wrapper)

    @torch.inference_mode()
    def run():
        return generate(decoder, prompt, max_new_tokens=n)

    start = time.perf_counter()
    tokens = run()
    first = time.perf_counter() - start
    start = time.perf_counter()
    run()
    return Peer(name, run, tokens=n), first - (time.perf_counter() - start), tokens, decoder


def teacher_forced(decoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """``windows [B, N] -> logits [B, N, V]`` fed one token at a time through ``decoder``'s compiled one-token step
    (a :class:`~archlab.static_decoding.StaticDecoder` with ``max_len >= N``): what the compiled mode computes
    while it decodes, for :func:`archlab.quant.quality`."""

    def logits(windows: torch.Tensor) -> torch.Tensor:
        cache = decoder.new_cache()
        return torch.cat([decoder(windows[:, i : i + 1], cache) for i in range(windows.shape[1])], dim=1)

    return logits


#: ``make(name, *args) -> (Peer, info)``: builds one peer inside its process; ``info`` is sent back.
PeerFactory = Callable[..., tuple[Peer, Any]]


def _peer_process(conn, make: PeerFactory, name: str, args: tuple, threads: int, keep_memory: bool) -> None:
    setup(threads, keep_memory)
    peer, info = make(name, *args)
    conn.send((peer.tokens, info))
    while (runs := conn.recv()) is not None:
        start = time.perf_counter()
        for _ in range(runs):
            peer.run()
        conn.send((time.perf_counter() - start) / runs)


class _Worker:
    """One peer in a spawned process of its own, driven over a pipe."""

    def __init__(self, make: PeerFactory, name: str, args: tuple, threads: int, keep_memory: bool):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_peer_process, args=(child, make, name, args, threads, keep_memory))
        self.process.start()
        tokens, self.info = self.conn.recv()
        self.peer = Peer(name, run=lambda: None, tokens=tokens)

    def time(self, runs: int) -> float:
        self.conn.send(runs)
        return self.conn.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:  # the worker is dying; its error is already on stderr
                pass
        self.process.join(timeout=60)


def time_in_processes(
    names: list[str],
    make: PeerFactory,
    args: tuple = (),
    *,
    rounds: int,
    threads: int,
    keep_memory: bool = False,
    together: bool = False,
    warmup: int = 1,
    per_round: int = 1,
) -> tuple[list[Peer], dict[str, Any]]:
    """Time each peer, built by ``make(name, *args)`` in a fresh process of its own.

    ``together=False``: one process at a time, each alone on the machine for all its rounds.
    ``together=True``: all processes alive, taking turns round by round (as :func:`time_interleaved`).
    Alone is the default because, on a virtual machine, the memory other processes hold changes what a
    page fault costs: a Hugging Face GPT-2 step measured 2.7 s alone and 3.7 s while an idle process
    held 6 GB. ``make`` must be importable (a module-level function) and ``args`` picklable. Returns
    the peers (``times`` filled; ``run`` does nothing here) and each one's ``info``.
    """
    workers: list[_Worker] = []
    try:
        for name in names:
            workers.append(_Worker(make, name, args, threads, keep_memory))
            if not together:
                worker = workers[-1]
                if warmup:
                    worker.time(warmup)
                worker.peer.times.extend(worker.time(per_round) for _ in range(rounds))
                worker.stop()
        if together:
            for worker in workers:
                if warmup:
                    worker.time(warmup)
            for _ in range(rounds):
                for worker in workers:
                    worker.peer.times.append(worker.time(per_round))
    finally:
        for worker in workers:
            worker.stop()
    return [w.peer for w in workers], {w.peer.name: w.info for w in workers}


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
