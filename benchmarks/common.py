"""Shared by the benchmarks: thread setup, the measured fp32 matmul peak, interleaved timing, tables.

Peers are timed in interleaved rounds (A B C A B C ...) and each reports its median round, so a
background load that comes and goes hits every peer alike and the printed ratios stay meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per peer (median is reported)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return parser


def setup(threads: int) -> str:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}"


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """The best fp32 FLOP/s of an ``n x n @ n x n`` matmul on this machine (the ceiling a model can reach)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
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


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
