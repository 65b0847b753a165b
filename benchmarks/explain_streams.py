"""Explanation streams decoded together: one batch (``ExplanationStreams``) against taking turns, and, for one
stream, prompt-lookup speculative rounds against plain one-token steps. SmolLM2-135M-Instruct in the machine's
precision, the first hits of the built-in index's questions; greedy, so every way decodes the same text (checked).

For ``N`` streams started together, the CPU time of the process (both torch threads; less sensitive than wall time
to other jobs on a shared machine) until all have ended, and their tokens per CPU second:

* ``turns``: each stream on its own (``Explainer.stream``: prompt-lookup speculative), one piece each in turn:
  how ``archlab search serve`` decoded before streams were batched;
* ``batched``: :class:`archlab.search.explain.ExplanationStreams` with ``speculative = False`` (every
  round one batched greedy step, one stream included);
* ``default``: ``ExplanationStreams`` as shipped (every pass verifies each stream's prompt-lookup drafts, at most
  ``pass_rows // N - 1`` a stream); ``--pass-rows R`` adds a ``rows R`` column for each other budget::

    python benchmarks/explain_streams.py --index runs/search-builtin --streams 1,3 --max-new-tokens 32 --threads 1
    python benchmarks/explain_streams.py --max-new-tokens 96 --json benchmarks/results/explain_streams_bf16_drafts.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from archlab.hardware import describe_cpu
from archlab.search.engine import SearchEngine
from archlab.search.explain import REPLY_OPENING, Explainer, ExplanationStreams

QUESTIONS = ["how do I parse a JSON string", "sort a list by a key", "read a file line by line", "join two paths",
             "current date and time", "run a shell command and capture its output", "compress data with gzip",
             "parse command line arguments"]  # fmt: skip


def fresh(hit):
    """A copy of ``hit`` without its explanation (evidence kept)."""
    copy = type(hit)(hit.doc, hit.rank, hit.score)
    copy.evidence = list(hit.evidence)
    return copy


def turns(explainer, jobs) -> tuple[float, dict]:
    started = time.process_time()
    streams = [(q, h, explainer.stream(q, h)) for q, h in jobs]
    while streams:
        streams = [(q, h, s) for q, h, s in streams if next(s, None) is not None]
    return time.process_time() - started, {q: h.explanation for q, h in jobs}


def held_streams(explainer, speculative: bool, pass_rows: int | None = None) -> ExplanationStreams:
    """Streams made once and kept, as ``archlab search serve`` keeps its own: a float32 model's packed weight copies
    are made at their first start, not in every timed run."""
    streams = ExplanationStreams(explainer)
    streams.speculative = speculative
    streams.pass_rows = pass_rows or streams.pass_rows
    return streams


def together(streams, jobs) -> tuple[float, dict]:
    started = time.process_time()
    for query, hit in jobs:
        streams.resume(streams.start(query, hit))
    while streams.running:
        streams.step()
    return time.process_time() - started, {q: h.explanation for q, h in jobs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default="runs/search-builtin")
    parser.add_argument("--streams", default="1,2,4,8", help="numbers of streams started together")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--pass-rows", default="", help="other budgets of a pass's rows to time too, e.g. 9,24")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 keeps the "
                        "CPU time free of idle threads spinning, on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = SearchEngine.open(args.index)
    explainer = Explainer(max_new_tokens=args.max_new_tokens, scorer="bm25")
    if args.precision != "auto":  # the model in another precision than the machine's choice
        from archlab.chat import load_chat_model

        explainer._loaded = load_chat_model(explainer.spec, precision=args.precision)
    model, _ = explainer.load()
    hits = {}
    for q in QUESTIONS:
        hit = engine.search(q, k=1).hits[0]
        explainer.fill_evidence(q, [hit])
        hits[q] = hit
    print(f"CPU: {describe_cpu()}; torch threads {torch.get_num_threads()}; {next(model.parameters()).dtype}; "
          f"load {os.getloadavg()[0]:.1f} at the start")
    kept = {"batched": held_streams(explainer, False), "default": held_streams(explainer, True)}
    kept |= {f"rows {r}": held_streams(explainer, True, int(r)) for r in args.pass_rows.split(",") if r}
    for streams in kept.values():  # warm-up (and the packed copies made)
        together(streams, [(QUESTIONS[0], fresh(hits[QUESTIONS[0]]))])
    ways = [("turns", lambda j: turns(explainer, j))]
    ways += [(name, lambda j, s=streams: together(s, j)) for name, streams in kept.items()]
    results = []
    for n in (int(x) for x in args.streams.split(",")):
        row, texts = [], []
        for name, run in ways:
            jobs = [(q, fresh(hits[q])) for q in QUESTIONS[:n]]
            seconds, text = run(jobs)
            tokens = sum(len(explainer.load()[1].encode(t)) for t in text.values())
            row.append(f"{name} {seconds:.1f} s ({tokens / seconds:.1f} tokens per CPU second)")
            results.append({"streams": n, "way": name, "cpu_seconds": seconds, "tokens": tokens})
            texts.append(text)
        same = all(t == texts[0] for t in texts)
        results[-len(ways) :] = [{**r, "texts_equal": same} for r in results[-len(ways) :]]
        print(f"{n} streams: " + ", ".join(row) + ("" if same else "; the texts differ (bf16 near-ties):"))
        for (name, _), text in zip(ways, texts):
            if not same:
                print(f"  {name}: {[t[len(REPLY_OPENING):][:60] for t in text.values()]}")
    print(f"load {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": describe_cpu(), "threads": torch.get_num_threads(), "dtype": str(next(model.parameters())
                       .dtype), "max_new_tokens": args.max_new_tokens, "results": results}, f, indent=2)  # fmt: skip
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
