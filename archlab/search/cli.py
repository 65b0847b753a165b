"""``archlab search ...``: the search engine's commands (registered as "search" in :mod:`archlab.cli`).

    archlab search index CORPUS --out INDEX [--index auto|flat|hnsw|ivfpq] [--hybrid] [--precision P] [--rescore F]
    archlab search query INDEX "TEXT" [--k 10] [--rerank N [--reranker DIR]] [--explain M [--quantize MODE]] [--json]
    archlab search eval INDEX (QUERIES QRELS | --builtin) [--k 100] [--rerank N] [--run FILE] [--json]
    archlab search serve INDEX [--host 127.0.0.1] [--port 8000] [--k 10] [--rerank N] [--explain 3] [--quantize MODE]

CORPUS is a BEIR folder, a .jsonl or .txt file, a folder of .txt files, or ``builtin`` (the standard
library's docstrings). Each subcommand is declared in :data:`SUBCOMMANDS` (name -> declare, run, help).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from archlab.errors import ConfigError

DEFAULT_RERANKER_DIR = "reranker"  # inside an index folder: where `archlab search adapt` saves its model


# ------------------------------------------------------------------------------------------------
# index
# ------------------------------------------------------------------------------------------------
def declare_index(parser: argparse.ArgumentParser) -> None:
    from archlab.interop.sentence import ENCODER_PRECISIONS

    parser.add_argument("corpus", metavar="CORPUS", help="a BEIR folder, a .jsonl/.txt file, a folder of .txt files, "
                        "or 'builtin' (the standard library's docstrings)")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="INDEX", help="the index folder (resumes a killed build; "
                        "a corpus that extends the indexed one is appended)")  # fmt: skip
    parser.add_argument("--index", default="auto", choices=("auto", "flat", "hnsw", "ivfpq"),
                        help="FAISS index type (default: by corpus size: flat <= 100k, hnsw <= 1M, else ivfpq)")
    parser.add_argument("--hybrid", action="store_true", help="also build a BM25 index, fused with the dense ranking")
    parser.add_argument("--model", default="minilm-l6", metavar="NAME|PATH", help="the encoder (default minilm-l6)")
    parser.add_argument("--precision", default="auto", choices=ENCODER_PRECISIONS,
                        help="encoder precision (auto: bf16 where the CPU computes it natively, else fp32; int8: "
                             "int8 weights and activations); queries are encoded alike")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="documents per forward pass")
    parser.add_argument("--chunk-size", type=int, default=256, metavar="C",
                        help="documents per saved chunk of vectors (the unit of resuming and sharding)")
    parser.add_argument("--rescore", type=int, metavar="F", help="ivfpq: re-score F x k PQ candidates with the "
                        "stored vectors (0: PQ scores only; default: the index's own factor, a new index's by its "
                        "size: 4 up to 1M vectors, 16 at 10M)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_index(args: argparse.Namespace) -> int:
    from archlab.search.corpus import load_corpus
    from archlab.search.index import build_index

    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    corpus = load_corpus(args.corpus)
    manifest = build_index(corpus, args.out, index=args.index, hybrid=args.hybrid, model=args.model,
                           precision=args.precision, batch_size=args.batch_size, chunk_size=args.chunk_size,
                           rescore=args.rescore, progress=not args.no_progress,
                           log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    if manifest:  # rank 0
        index = manifest["index"]
        params = ", ".join(f"{k}={v}" for k, v in index["params"].items())
        print(f"indexed {manifest['corpus']['count']} documents of {corpus.source} into {args.out}: {index['type']}"
              f"{f' ({params})' if params else ''}, {index['bytes'] / 1e6:.2f} MB ({index['bytes_per_doc']:.0f} "
              f"bytes/doc), encoder {manifest['encoder']['name']} {manifest['encoder']['precision']}"
              f"{', hybrid with BM25' if manifest['hybrid'] else ''}")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------
# query
# ------------------------------------------------------------------------------------------------
def _add_rerank_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rerank", type=int, default=0, metavar="N", help="re-rank the first N hits with a "
                        "cross-encoder (default 0: no re-ranking)")  # fmt: skip
    parser.add_argument("--reranker", metavar="DIR", help="a cross-encoder folder (default: INDEX/reranker, "
                        "made by `archlab search adapt`)")  # fmt: skip
    parser.add_argument("--rerank-precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the cross-encoder's precision (default auto: bf16 where its device computes it natively)")
    parser.add_argument("--rerank-device", default="cpu", metavar="DEVICE",
                        help="where the cross-encoder scores: cpu (default) or cuda[:i] (on an H200 the top 100 "
                        "took 41-53 ms, on 2 CPU cores 1.7-3.5 s)")  # fmt: skip


def declare_query(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="an index folder made by `archlab search index`")
    parser.add_argument("query", metavar="TEXT", help="what to search for")
    parser.add_argument("--k", type=int, default=10, metavar="K", help="results to show (default 10)")
    _add_rerank_options(parser)
    parser.add_argument("--explain", type=int, default=0, metavar="M", help="explain the first M results with "
                        "SmolLM2-135M-Instruct (default 0)")  # fmt: skip
    _add_explainer_quantize(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_explainer_quantize(parser: argparse.ArgumentParser) -> None:
    """``--quantize MODE``: the explainer's layers, every mode ``archlab chat`` takes (its option, shared)."""
    from archlab.cli import add_quantize_option  # archlab.cli imports this module: here, once it is loaded

    add_quantize_option(parser, "with --explain: the explainer's ", precision=False)


def _check_quantize_explains(args: argparse.Namespace) -> None:
    """``--quantize`` without explanations would be ignored: refused instead."""
    if args.quantize is not None and not args.explain:
        raise ConfigError(f"--quantize={args.quantize} quantizes the explainer, which --explain={args.explain} does "
                          "not run: give --explain M (M >= 1), or leave out --quantize")


def load_reranker(index_dir: str | Path, folder: str | None, depth: int, precision: str = "auto",
                  device: str = "cpu"):  # fmt: skip
    """The cross-encoder for ``--rerank depth``: ``folder``, else ``INDEX/reranker``, in ``precision`` on ``device``
    (:class:`~archlab.search.rerank.Reranker`); None when depth is 0."""
    if not depth:
        return None
    from archlab.search.rerank import check_device

    try:
        check_device(device)
    except ConfigError as e:
        raise ConfigError(f"--rerank-device: {e}") from None
    path = Path(folder) if folder else Path(index_dir) / DEFAULT_RERANKER_DIR
    if not path.is_dir():
        raise ConfigError(f"--rerank {depth} needs a cross-encoder: pass --reranker DIR, or train one into "
                          f"{path} with `archlab search adapt {index_dir}`")  # fmt: skip
    try:
        from archlab.search.rerank import Reranker
    except ImportError as e:
        raise ConfigError(f"--rerank needs archlab.search.rerank, which cannot be imported here ({e})") from None
    return Reranker.load(path, precision=precision, device=device)


def reranker_note(reranker) -> str | None:
    """A line for a re-ranker whose held-out check (``archlab search adapt``) did not beat the first stage."""
    from archlab.search.adapt import SIGNIFICANCE

    check = getattr(reranker, "heldout", None)
    if not check or (check.get("reranker_mrr", 0.0) > check.get("first_stage_mrr", 0.0)
                     and check.get("p_value", 1.0) < SIGNIFICANCE):  # fmt: skip
        return None
    weight = getattr(reranker, "first_stage_weight", 0.0)
    use = ("the first stage's order is kept" if weight == 1 else
           f"its order is fused with the first stage's (weight {weight:.1f} on the first stage)")  # fmt: skip
    return (f"note: this re-ranker did not beat the first stage on its {check.get('queries')} held-out pseudo-queries "
            f"(MRR@10 {check.get('reranker_mrr', 0):.4f} vs {check.get('first_stage_mrr', 0):.4f}, sign test p = "
            f"{check.get('p_value', 1.0):.3f}); {use}")


def load_explainer(count: int, quantize: str | None = None):
    """The default explainer (SmolLM2-135M-Instruct, loaded on first use, its layers ``quantize``d if given) for
    ``--explain count``; None for 0."""
    if not count:
        return None
    try:
        from archlab.search.explain import Explainer
    except ImportError as e:
        raise ConfigError(f"--explain needs archlab.search.explain, which cannot be imported here ({e})") from None
    return Explainer(quantize=quantize)


def result_json(result) -> dict:
    return {
        "query": result.query,
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        "skipped": dict(result.skipped),
        "hits": [{"rank": h.rank, "id": h.doc.id, "title": h.doc.title, "score": h.score, "stages": h.stage_scores,
                  "text": h.doc.text, "evidence": h.evidence, "explanation": h.explanation,
                  "quotes_ok": h.quotes_ok} for h in result.hits],
    }  # fmt: skip


def timing_line(timings: dict[str, float], skipped: dict[str, str] | None = None) -> str:
    """``time: encode 12.3 ms, ..`` and, for each stage asked for but skipped, ``rerank skipped (why)``."""
    parts = [f"{stage} {ms:.1f} ms" for stage, ms in timings.items()]
    parts += [f"{stage} skipped ({why})" for stage, why in (skipped or {}).items()]
    return "time: " + ", ".join(parts)


def run_query(args: argparse.Namespace) -> int:
    from archlab.search.engine import SearchEngine

    for option, value, low in (("--k", args.k, 1), ("--rerank", args.rerank, 0), ("--explain", args.explain, 0)):
        if value < low:
            raise ConfigError(f"{option}={value} must be >= {low}")
    _check_quantize_explains(args)
    reranker = load_reranker(args.index, args.reranker, args.rerank, args.rerank_precision, args.rerank_device)
    if reranker_note(reranker):
        print(reranker_note(reranker), file=sys.stderr)
    engine = SearchEngine.open(args.index, reranker=reranker, explainer=load_explainer(args.explain, args.quantize))
    result = engine.search(args.query, k=args.k, rerank=args.rerank, explain=args.explain)
    if args.json:
        print(json.dumps(result_json(result), indent=2, ensure_ascii=False))
        return 0
    for hit in result.hits:
        stages = "  ".join(f"{name} {value:.4f}" for name, value in hit.stage_scores.items())
        print(f"{hit.rank:>3}. {hit.doc.title or hit.doc.id}  [{hit.doc.id}]  score {hit.score:.4f}  ({stages})")
        snippet = " ".join(hit.doc.text.split())
        print(textwrap.indent(textwrap.shorten(snippet, 200, placeholder=" ...") or "(no text)", "     "))
        for sentence in hit.evidence:
            print(f"     evidence: {sentence}")
        if hit.explanation is not None:
            guard = {True: "quotes verified", False: "UNVERIFIED quote", None: "no quote"}[hit.quotes_ok]
            print(f"     why ({guard}): {hit.explanation}")
    print(timing_line(result.timings_ms, result.skipped))
    return 0


# ------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------
def declare_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="an index folder")
    parser.add_argument("queries", nargs="?", metavar="QUERIES", help="queries.jsonl (BEIR) or a .tsv (id<TAB>text)")
    parser.add_argument("qrels", nargs="?", metavar="QRELS", help="qrels .tsv (BEIR: query-id corpus-id score)")
    parser.add_argument("--builtin", action="store_true", help="the built-in evaluation set of the builtin corpus")
    parser.add_argument("--k", type=int, default=100, metavar="K", help="documents retrieved per query (default 100)")
    parser.add_argument("--mode", choices=("dense", "bm25", "hybrid"), help="first stage (default: hybrid when the "
                        "index has BM25, else dense)")  # fmt: skip
    _add_rerank_options(parser)
    parser.add_argument("--run", metavar="FILE", help="write the TREC run file here (default INDEX/run.trec)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _some(ids: list[str], shown: int = 5) -> str:
    return ", ".join(map(repr, ids[:shown])) + (f" and {len(ids) - shown:,} more" if len(ids) > shown else "")


def eval_notes(evalset, doc_ids: set[str], queries_file: str) -> list[str]:
    """Notes on judgments the evaluation cannot use as given: judged queries without a text in ``queries_file``
    (left out), relevant documents that are not in the index (they count as not retrieved)."""
    unasked = [q for q in evalset.qrels if q not in evalset.queries]
    missing = sorted({d for q, judged in evalset.qrels.items() if q in evalset.queries
                      for d, grade in judged.items() if grade > 0 and d not in doc_ids})  # fmt: skip
    notes = []
    if unasked:
        one = len(unasked) == 1
        notes.append(f"note: {len(unasked):,} of {len(evalset.qrels):,} judged queries {'has' if one else 'have'} no "
                     f"text in {queries_file} and {'is' if one else 'are'} left out: {_some(unasked)}")  # fmt: skip
    if missing:
        one = len(missing) == 1
        notes.append(f"note: {len(missing):,} document{'' if one else 's'} judged relevant {'is' if one else 'are'} "
                     f"not in the index (counted as not retrieved): {_some(missing)}")  # fmt: skip
    return notes


def run_eval(args: argparse.Namespace) -> int:
    from archlab.search.corpus import EvalSet, builtin_evalset, load_qrels, load_queries
    from archlab.search.engine import SearchEngine
    from archlab.search.evaluate import check_trec_ids, evaluate_engine, write_trec_run

    if args.builtin == bool(args.queries or args.qrels) or bool(args.queries) != bool(args.qrels):
        raise ConfigError("search eval needs QUERIES and QRELS, or --builtin (not both)")
    if args.k < 1 or args.rerank < 0:
        raise ConfigError(f"--k={args.k} must be >= 1 and --rerank={args.rerank} >= 0")
    run_file = Path(args.run) if args.run else Path(args.index) / "run.trec"
    if run_file.is_dir():
        raise ConfigError(f"--run {run_file} is a folder; --run names the TREC run file to write")
    evalset = builtin_evalset() if args.builtin else EvalSet(load_queries(args.queries), load_qrels(args.qrels))
    reranker = load_reranker(args.index, args.reranker, args.rerank, args.rerank_precision, args.rerank_device)
    if reranker_note(reranker):
        print(reranker_note(reranker), file=sys.stderr)
    engine = SearchEngine.open(args.index, reranker=reranker, mode=args.mode)
    doc_ids = {doc.id for doc in engine.docs}  # (read once: the checks and the notes)
    check_trec_ids(evalset.qrels, doc_ids)  # before the queries run: the run file holds them
    for note in eval_notes(evalset, doc_ids, args.queries or "the built-in set"):
        print(note, file=sys.stderr)
    report = evaluate_engine(engine, evalset, k=args.k, rerank=args.rerank)
    write_trec_run(run_file, report.run, tag="archlab")
    if args.json:
        print(json.dumps({"metrics": report.metrics, "queries": report.queries, "ms_per_query": report.ms_per_query,
                          "run": str(run_file)}, indent=2))  # fmt: skip
        return 0
    metrics = "  ".join(f"{name} {value:.4f}" for name, value in report.metrics.items())
    mode = {"hybrid": "hybrid (dense + BM25, RRF)"}.get(engine.mode, engine.mode)
    mode += f" + re-rank {args.rerank}" if args.rerank else ""
    print(f"{report.queries} queries, {mode}: {metrics}  ({report.ms_per_query:.1f} ms/query)")
    print(f"run file: {run_file}")
    return 0


# ------------------------------------------------------------------------------------------------
# serve
# ------------------------------------------------------------------------------------------------
def declare_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="an index folder made by `archlab search index`")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine "
                        "only; any other is served with a warning)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    parser.add_argument("--k", type=int, default=10, metavar="K", help="results per search (default 10)")
    _add_rerank_options(parser)
    parser.add_argument("--explain", type=int, default=3, metavar="M", help="stream explanations of the first M "
                        "results by SmolLM2-135M-Instruct (default 3; 0: none)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="T", help="longest explanation (default 48)")
    _add_explainer_quantize(parser)


def run_serve(args: argparse.Namespace) -> int:
    from archlab.search.serve import serve

    for option, value, low in (("--k", args.k, 1), ("--rerank", args.rerank, 0), ("--explain", args.explain, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1)):  # fmt: skip
        if value < low:
            raise ConfigError(f"{option}={value} must be >= {low}")
    _check_quantize_explains(args)
    explainer = None
    if args.explain:
        from archlab.search.explain import Explainer

        explainer = Explainer(quantize=args.quantize, max_new_tokens=args.max_new_tokens)
    reranker = load_reranker(args.index, args.reranker, args.rerank, args.rerank_precision, args.rerank_device)
    serve(args.index, host=args.host, port=args.port, reranker=reranker, explainer=explainer, k=args.k,
          rerank=args.rerank, explain=args.explain)  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------
# adapt
# ------------------------------------------------------------------------------------------------
def declare_adapt(parser: argparse.ArgumentParser) -> None:
    from archlab.search.adapt import GENERATORS, AdaptConfig

    d = AdaptConfig()
    parser.add_argument("index", metavar="INDEX", help="an index folder made by `archlab search index`")
    parser.add_argument("--queries-per-doc", type=int, default=d.queries_per_doc, metavar="N",
                        help=f"pseudo-queries (sentences) cut from each document (default {d.queries_per_doc})")
    parser.add_argument("--steps", type=int, default=d.steps, metavar="S", help=f"training steps (default {d.steps})")
    parser.add_argument("--batch", type=int, default=d.batch_queries, metavar="Q",
                        help=f"pseudo-queries per step (default {d.batch_queries})")
    parser.add_argument("--negatives", type=int, default=d.negatives, metavar="M",
                        help=f"hard negatives per query, from the first stage's top {d.mine_depth} (default {d.negatives})")
    parser.add_argument("--generator", choices=GENERATORS, default=d.generator, help="where pseudo-queries come "
                        "from: a later sentence cut from the document (sentences), its summary sentence first "
                        f"(summaries), or also questions written by SmolLM2-135M-Instruct (default {d.generator})")
    parser.add_argument("--distill", type=float, default=d.distill, metavar="L", help="weight in [0, 1) of the first "
                        "stage's soft targets in the loss, beside the positive's label (the bi-encoder as a teacher; "
                        f"default {d.distill})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate of the encoder (default {d.lr})")
    parser.add_argument("--head-lr", type=float, default=d.head_lr,
                        help=f"peak learning rate of the new head (default {d.head_lr})")
    parser.add_argument("--max-length", type=int, default=d.max_length, metavar="T",
                        help=f"longest (query, document) pair in tokens (default {d.max_length})")
    parser.add_argument("--trained-layers", type=int, default=d.trained_layers, metavar="L",
                        help=f"top encoder blocks trained with the head; the rest stay frozen (default {d.trained_layers})")
    parser.add_argument("--heldout-queries", type=int, default=d.heldout_queries, metavar="N",
                        help="pseudo-queries kept out of training to check the model against the first stage and "
                        f"set its fusion weight (default {d.heldout_queries}; 0: no check)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds the data, the head and dropout")
    parser.add_argument("--out", metavar="DIR", help=f"where to save the cross-encoder (default INDEX/{DEFAULT_RERANKER_DIR})")
    parser.add_argument("--eval-queries", type=int, default=100, metavar="N", help="measure nDCG@10 with and without "
                        "re-ranking on N judged queries afterwards (default 100; 0: do not measure)")  # fmt: skip
    parser.add_argument("--depths", default="20,50,100", metavar="R,..", help="re-rank depths to measure")
    parser.add_argument("--queries", metavar="QUERIES", help="judged queries (with --qrels) for a corpus other than "
                        "builtin: their documents are held out of training and they measure the result")  # fmt: skip
    parser.add_argument("--qrels", metavar="QRELS", help="the judgments of --queries")


def run_adapt(args: argparse.Namespace) -> int:
    from archlab.search.adapt import AdaptConfig, adapt, format_rows, measure, rows_json
    from archlab.search.corpus import BUILTIN, EvalSet, builtin_corpus, builtin_evalset, load_qrels, load_queries
    from archlab.search.engine import SearchEngine
    from archlab.search.index import write_json

    if bool(args.queries) != bool(args.qrels):
        raise ConfigError("--queries and --qrels go together")
    try:
        depths = sorted({int(x) for x in args.depths.split(",")})
    except ValueError:
        raise ConfigError(f"--depths={args.depths!r} must be comma-separated ints, e.g. 20,50,100") from None
    if not depths or depths[0] < 1 or args.eval_queries < 0:
        raise ConfigError(f"--depths={args.depths!r} must be ints >= 1 and --eval-queries={args.eval_queries} >= 0")
    config = AdaptConfig(steps=args.steps, batch_queries=args.batch, negatives=args.negatives,
                         queries_per_doc=args.queries_per_doc, generator=args.generator, lr=args.lr,
                         head_lr=args.head_lr, max_length=args.max_length, seed=args.seed,
                         trained_layers=args.trained_layers, heldout_queries=args.heldout_queries, distill=args.distill,
                         warmup=args.steps // 10)  # a tenth of the run (AdaptConfig's 10 at its 100 steps)
    engine = SearchEngine.open(args.index)
    corpus = engine.manifest["corpus"]
    evalset = None
    if args.queries:
        evalset = EvalSet(load_queries(args.queries), load_qrels(args.qrels))
    elif corpus["source"].startswith(BUILTIN) and corpus["fingerprint"] == builtin_corpus().fingerprint:
        evalset = builtin_evalset()
    holdout = {d for judged in evalset.qrels.values() for d in judged} if evalset else set()
    note = (f"{len(holdout)} judged documents held out of training" if evalset
            else "no evaluation set (give --queries/--qrels): nothing held out, nothing measured")
    encoder = engine.manifest["encoder"]["name"]  # the cross-encoder starts from the index's own encoder
    print(f"adapting a cross-encoder ({encoder} + a new head) to {corpus['count']} documents; {note}", file=sys.stderr)
    result = adapt(engine, config, holdout=holdout, encoder=encoder, log=lambda m: print(m, file=sys.stderr))
    out = Path(args.out) if args.out else Path(args.index) / DEFAULT_RERANKER_DIR
    result.reranker.save(out)
    s = result.summary()
    print(f"trained {s['steps']} steps on {s['groups']} pseudo-queries in {s['seconds']:.0f} s: loss "
          f"{s['loss_first_tenth']:.4f} (first tenth) -> {s['loss_last_tenth']:.4f} (last tenth); saved to {out}")
    if result.check is not None:
        print(result.check.describe())
    report = {"config": config.to_dict(), "training": s, "saved": str(out)}
    if evalset is not None and args.eval_queries:
        rows = measure(engine, result.reranker, evalset, depths=depths, max_queries=args.eval_queries, seed=args.seed)
        print(format_rows(rows, min(args.eval_queries, len(evalset.qrels))))
        report["measured"] = rows_json(rows)
    write_json(Path(args.index) / "adapt.json", report)
    return 0


SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "index": (declare_index, run_index, "encode a corpus and build its FAISS (and BM25) index"),
    "query": (declare_query, run_query, "search an index: ranked results, scores and a per-stage timing line"),
    "eval": (declare_eval, run_eval, "nDCG@10, recall@100 and MRR@10 of an index on judged queries; a TREC run file"),
    "adapt": (declare_adapt, run_adapt, "train a cross-encoder re-ranker on the index's documents without labels "
              "(pseudo-queries, hard negatives); measure nDCG@10 with and without it"),
    "serve": (declare_serve, run_serve, "the search page on http://127.0.0.1:8000/: results, evidence, explanations"),
}


def declare(parser: argparse.ArgumentParser) -> None:
    """The ``search`` subcommands, one sub-parser each."""
    sub = parser.add_subparsers(dest="search_command", metavar="SUBCOMMAND", required=True)
    for name, (declare_sub, _, help_text) in SUBCOMMANDS.items():
        declare_sub(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return SUBCOMMANDS[args.search_command][1](args)


__all__ = ["SUBCOMMANDS", "declare", "eval_notes", "load_explainer", "load_reranker", "reranker_note", "run"]
