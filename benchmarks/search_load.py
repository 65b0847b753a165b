"""The search page under load: N concurrent clients on 127.0.0.1 for a bounded time; errors and p50/p99 latency.

Starts ``archlab search serve INDEX`` in its own process on a free loopback port (or uses ``--url`` of a running
server), waits for it, then runs ``--clients`` (default 50) asyncio clients for ``--seconds`` (default 60). Each
client loops: POST /api/search with the next question of a fixed list; with ``--explain-every N`` every N-th search
of a client also streams the first result's explanation to its end. Everything that is not a 200 answer read in
full (a 4xx/5xx, a refused or dropped connection, a timeout) counts as an error. Prints the CPU, the counts, and
p50/p99/max of the search latency (request sent -> JSON read) and, with explanations, the time to the first
decoded token of the stream and to its end. Requests still in flight ``--grace`` seconds after the end are
cancelled and reported as unfinished::

    python benchmarks/search_load.py INDEX --seconds 15
    python benchmarks/search_load.py --url http://127.0.0.1:8000/ --clients 50 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from archlab.hardware import describe_cpu

QUESTIONS = [
    "how do I parse a JSON string", "sort a list by a key", "read a file line by line", "join two paths",
    "current date and time", "run a shell command and capture its output", "compress data with gzip",
    "parse command line arguments", "format a number with thousands separators", "copy a directory tree",
    "hash a password", "make a temporary directory", "encode bytes as base64", "find files matching a pattern",
    "split a string on whitespace", "a queue shared between threads", "default value for a missing dict key",
    "measure the time a function takes", "compare two sequences and show the differences", "a fixed-point decimal",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, explain: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-c", "from archlab.cli import main; raise SystemExit(main())", "search", "serve",
               index, "--port", str(port), "--explain", str(explain)]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}/"


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before answering")
        try:
            return httpx.get(url + "api/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"no answer from {url} within {timeout:.0f} s")


async def client(number: int, url: str, until: float, explain_every: int, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0)) as http:
        i = number
        while time.monotonic() < until:
            question = QUESTIONS[i % len(QUESTIONS)]
            i += 1
            start = time.perf_counter()
            try:
                answer = await http.post("api/search", json={"query": question})
                body = answer.json()
                if answer.status_code != 200 or not body.get("hits"):
                    stats["errors"].append(f"search {answer.status_code}: {str(body)[:120]}")
                    continue
                stats["search_ms"].append((time.perf_counter() - start) * 1000)
                if explain_every and i % explain_every == 0 and body.get("explain"):
                    await explanation(http, body["search_id"], stats)
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                if time.monotonic() < until:  # a request cut off by the end of the run is not the server's error
                    stats["errors"].append(f"{type(e).__name__}: {e}")


async def explanation(http: httpx.AsyncClient, search_id: str, stats: dict) -> None:
    start, pieces, done = time.perf_counter(), 0, False
    async with http.stream("GET", f"api/explain/{search_id}/1") as response:
        if response.status_code != 200:
            stats["errors"].append(f"explain {response.status_code}")
            return
        async for line in response.aiter_lines():
            if line == "event: piece":
                pieces += 1
                if pieces == 2:  # the first piece is the fixed opening; the second holds the first decoded token
                    stats["first_token_ms"].append((time.perf_counter() - start) * 1000)
            elif line == "event: done":
                done = True
            elif line == "event: failed":
                stats["errors"].append("explain failed")
    if done:
        stats["explain_ms"].append((time.perf_counter() - start) * 1000)


def percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {max(values):.0f} ms ({len(values)})"


async def run(url: str, clients: int, seconds: float, explain_every: int, grace: float) -> dict:
    """The clients issue requests for ``seconds``; those still waiting ``grace`` seconds later are cancelled and
    counted as ``unfinished`` (an overloaded server shows here, not as a longer run)."""
    stats = {"errors": [], "search_ms": [], "first_token_ms": [], "explain_ms": []}
    until = time.monotonic() + seconds
    tasks = [asyncio.create_task(client(n, url, until, explain_every, stats)) for n in range(clients)]
    _, waiting = await asyncio.wait(tasks, timeout=seconds + grace)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    stats["unfinished"] = len(waiting)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", nargs="?", help="an index folder to serve (or --url)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000/")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--explain-every", type=int, default=0, metavar="N",
                        help="every N-th search of a client also streams an explanation (default 0: none)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="S", help="after --seconds, how long the "
                        "requests in flight may still take (default 30); those left are counted as unfinished")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    if bool(args.index) == bool(args.url):
        parser.error("give INDEX (a server is started) or --url (a running one), not both")
    if args.clients < 1 or args.seconds <= 0 or args.explain_every < 0:
        parser.error("--clients >= 1, --seconds > 0 and --explain-every >= 0")
    process = None
    if args.index:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / "archlab_search_load_server.log"
        process, url = start_server(args.index, 1 if args.explain_every else 0, log)
        print(f"server: archlab search serve {args.index} ({url}; log {log})")
    else:
        url = args.url.rstrip("/") + "/"
    try:
        health = wait_ready(url, process, timeout=300)
        print(f"CPU: {describe_cpu()}; {health['documents']} documents; {args.clients} clients for {args.seconds:.0f} s"
              + (f"; an explanation every {args.explain_every} searches" if args.explain_every else ""))
        started = time.monotonic()
        stats = asyncio.run(run(url, args.clients, args.seconds, args.explain_every, args.grace))
        elapsed = time.monotonic() - started
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    n = len(stats["search_ms"])
    print(f"searches: {n} answered in {elapsed:.1f} s ({n / elapsed:.1f}/s), errors: {len(stats['errors'])}, "
          f"clients still waiting after the {args.grace:.0f} s grace: {stats['unfinished']}")
    print(f"search latency: {percentiles(stats['search_ms'])}")
    if args.explain_every:
        print(f"explanation, first decoded token: {percentiles(stats['first_token_ms'])}")
        print(f"explanation, whole: {percentiles(stats['explain_ms'])}")
    for error in sorted(set(stats["errors"]))[:10]:
        print(f"  error: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": describe_cpu(), "clients": args.clients, "seconds": elapsed,
                                               **stats}, indent=1))  # fmt: skip
    return 1 if stats["errors"] or stats["unfinished"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
