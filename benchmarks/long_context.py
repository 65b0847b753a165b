"""Long context: time and peak added memory of one attention layer forward, n = 1K .. 100K tokens.

B=1, A=8 heads, d_k=d_v=64, float32, causal. Backends (archlab spec in brackets):

    naive    [math]                  scores and softmax materialised: O(n^2) memory
    fused    [sdpa]                  PyTorch's fused scaled_dot_product_attention (CPU flash kernel)
    chunked  [chunked]               archlab's online-softmax tiles, plain PyTorch, exact
    sliding  [sliding:window=512]    archlab's banded tiles, w = 512
    linear   [linear]                archlab's elu+1 linear attention, causal by chunked prefix sums
    (also: bigbird, performer, linformer - non-causal linformer only)

Each point runs in a fresh process, one thread by default: the machine is shared, so the time
reported (and used for the ratios) is the process's CPU time, less disturbed by other load than the
wall time, which is recorded too. Memory is the peak resident set size during the forward minus the
resident size just before it (after q, k, v exist): Linux's VmHWM is reset through
``/proc/self/clear_refs`` before the call, so earlier peaks (importing torch, creating inputs) do not
hide it. With glibc's default allocator, freed blocks may stay resident for a while, so a peak can
include some retained memory (visible as an uneven ratio); ``MALLOC_MMAP_THRESHOLD_=131072`` in the
environment makes every block above 128 KiB go back to the system at once, so the peaks track live
tensors exactly (at some cost in time). Next to it, the prediction of
:func:`archlab.analysis.memory.attention_bytes`. Naive points
whose predicted memory exceeds ``--naive-budget-gb`` are skipped, and said so.

    python benchmarks/long_context.py                               # all five, up to 100,000 tokens
    python benchmarks/long_context.py --max-n 16384 --backends fused,chunked
    python benchmarks/long_context.py --backward --backends chunked,sliding --max-n 32768
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = {
    "naive": "math",
    "fused": "sdpa",
    "chunked": "chunked",
    "sliding": "sliding:window=512",
    "linear": "linear",
    "bigbird": "bigbird",
    "performer": "performer",
    "linformer": "linformer:rank=256,max_len=131072",
}
HEADS, D_K = 8, 64
TARGETS = {"memory": (("fused", "chunked", "sliding", "linear"), 2.2), "time": (("sliding", "linear"), 2.3)}


# ------------------------------------------------------------------------------------------------
# child: one point
# ------------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def run_point(name: str, n: int, threads: int, backward: bool) -> dict:
    import torch

    from archlab.nn import attend
    from archlab.nn.attention import MultiHeadAttention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = BACKENDS[name]
    causal = name != "linformer"
    q, k, v = (torch.randn(1, HEADS, n, D_K, requires_grad=backward) for _ in range(3))
    if name in ("performer", "linformer"):  # backends with their own parameters live in a module
        module = MultiHeadAttention(HEADS * D_K, HEADS, backend=spec).backend_module

        def call():
            return module(q, k, v, causal=causal)
    else:

        def call():
            return attend(q, k, v, causal=causal, backend=spec)

    def step():
        if backward:
            call().sum().backward()
        else:
            with torch.no_grad():
                call()

    def timed() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - wall, time.process_time() - cpu

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    runs = [timed()]
    peak = _status_kb("VmHWM")
    while sum(w for w, _ in runs) < 1.0 and len(runs) < 5:  # short points: repeat, keep the best
        runs.append(timed())
    wall, cpu = min(runs, key=lambda r: r[1])
    return {"backend": name, "n": n, "seconds": cpu, "wall_seconds": wall, "added_bytes": (peak - base) * 1024}


# ------------------------------------------------------------------------------------------------
# parent: sizes, subprocesses, table, plot
# ------------------------------------------------------------------------------------------------


def sizes(max_n: int, min_n: int = 1024) -> list[int]:
    out, n = [], min_n
    while n <= max_n:
        out.append(n)
        n *= 2
    if out and out[-1] != max_n:
        out.append(max_n)
    return out


def predicted(name: str, n: int, threads: int) -> int:
    from archlab.analysis.memory import attention_bytes

    return attention_bytes(BACKENDS[name], n, heads=HEADS, d_k=D_K, causal=name != "linformer", threads=threads)


def per_doubling(a: float, b: float, n_a: int, n_b: int) -> float:
    """The growth ``b / a`` expressed per doubling of n (``n_b / n_a`` need not be 2)."""
    return (b / a) ** (1.0 / math.log2(n_b / n_a)) if a > 0 and b > 0 else float("nan")


def measure(name: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(n), "--threads", str(args.threads)]
    if args.backward:
        cmd.append("--backward")
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"backend": name, "n": n, "skipped": f"over the {args.timeout}s time limit"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return {"backend": name, "n": n, "skipped": f"failed: {tail[0][:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def report(results: list[dict]) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import table

    rows, verdicts = [], []
    for name in dict.fromkeys(r["backend"] for r in results):
        points = [r for r in results if r["backend"] == name]
        prev = None
        worst = {"memory": 0.0, "time": 0.0}
        for r in points:
            if "skipped" in r:
                rows.append([name, f"{r['n']:,}", "-", "-", "-", "-", fmt_bytes(r["predicted_bytes"]), r["skipped"]])
                continue
            t_ratio = m_ratio = float("nan")
            if prev is not None:
                t_ratio = per_doubling(prev["seconds"], r["seconds"], prev["n"], r["n"])
                m_ratio = per_doubling(prev["added_bytes"], r["added_bytes"], prev["n"], r["n"])
                worst["time"] = max(worst["time"], t_ratio)
                worst["memory"] = max(worst["memory"], m_ratio)
            first = prev is None
            rows.append([
                name, f"{r['n']:,}", f"{r['seconds']:.4f}", "" if first else f"{t_ratio:.2f}",
                fmt_bytes(r["added_bytes"]), "" if first else f"{m_ratio:.2f}", fmt_bytes(r["predicted_bytes"]), "",
            ])  # fmt: skip
            prev = r
        ran = [r for r in points if "skipped" not in r]
        for what, (names, limit) in TARGETS.items():
            if name in names and len(ran) > 1:
                ok = worst[what] <= limit
                verdicts.append(f"{name}: worst {what} growth per doubling {worst[what]:.2f} (target <= {limit}): "
                                f"{'met' if ok else 'NOT met'}")  # fmt: skip
        if ran:
            verdicts.append(f"{name}: largest n run = {max(r['n'] for r in ran):,}")
    header = ["backend", "n", "cpu s", "x/doubling", "added MiB", "x/doubling", "predicted fwd MiB", "note"]
    return table(rows, header) + "\n\n" + "\n".join(verdicts)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in dict.fromkeys(r["backend"] for r in results):
        points = [r for r in results if r["backend"] == name]
        ran = [r for r in points if "skipped" not in r]
        if not ran:
            continue
        ns = [r["n"] for r in ran]
        (line,) = ax_t.plot(ns, [r["seconds"] for r in ran], "o-", label=name)
        ax_m.plot(ns, [r["added_bytes"] / 2**20 for r in ran], "o-", color=line.get_color(), label=name)
        # the prediction also where a point was skipped (naive beyond the budget)
        ax_m.plot([r["n"] for r in points], [r["predicted_bytes"] / 2**20 for r in points], ":", color=line.get_color())
    for ax, label in ((ax_t, "CPU seconds"), (ax_m, "peak added memory, MiB (dotted: predicted)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n tokens")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=100_000, help="largest sequence length (default 100,000)")
    parser.add_argument("--min-n", type=int, default=1024, help="smallest sequence length; doubled up to --max-n")
    parser.add_argument("--backends", default="naive,fused,chunked,sliding,linear",
                        help=f"comma-separated, from {', '.join(BACKENDS)}")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results", help="folder for long_context.json / .png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    parser.add_argument(
        "--naive-budget-gb", type=float, default=7.0, help="skip naive points predicted above this (GiB)"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per point")
    parser.add_argument("--backward", action="store_true", help="measure forward + backward instead of forward")
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_point(args.child[0], int(args.child[1]), args.threads, args.backward)))
        return
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in names:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    pass_name = "forward+backward" if args.backward else "forward"
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    title = f"one attention layer {pass_name}, B=1, A={HEADS}, d_k={D_K}, float32, causal, {threads}"
    print(title)
    results = []
    for name in names:
        blocked = False
        for n in sizes(args.max_n, args.min_n):
            pred = predicted(name, n, args.threads)  # of the forward pass
            need = pred * (2 if args.backward else 1)  # backward keeps the weights and builds their gradient
            if blocked:
                r = {"backend": name, "n": n, "skipped": "a smaller n already failed"}
            elif name == "naive" and need > args.naive_budget_gb * 2**30:
                skip = f"predicted {need / 2**30:.1f} GiB > budget {args.naive_budget_gb} GiB"
                r = {"backend": name, "n": n, "skipped": skip}
            else:
                r = measure(name, n, args)
            r["predicted_bytes"] = pred
            blocked = blocked or r.get("skipped", "").startswith(("failed", "over"))
            results.append(r)
            shown = r.get("skipped") or (f"{r['seconds']:.3f} s cpu ({r['wall_seconds']:.3f} s wall), "
                                         f"{fmt_bytes(r['added_bytes'])} MiB added")  # fmt: skip
            print(f"  {name:>9} n={n:>7,}: {shown}", flush=True)
    print()
    print(report(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "long_context_backward" if args.backward else "long_context"
    (out / f"{stem}.json").write_text(json.dumps({"title": title, "results": results}, indent=2) + "\n")
    plot(results, out / f"{stem}.png", title)
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
