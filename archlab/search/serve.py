r"""The search page: ``archlab search serve INDEX`` (FastAPI + uvicorn on 127.0.0.1).

One static page (``static/index.html``, ``app.js``, ``style.css``) with a search box. It asks the JSON API and
draws the answer with ``textContent`` only (never ``innerHTML`` of data), so a document holding ``<script>``
shows as text::

    GET  /                               the page
    POST /api/search   {"query", "k"?}   -> {"search_id", "query", "hits": [...], "timings_ms", "explain"}
    GET  /api/explain/{search_id}/{rank} -> Server-Sent Events: "piece" {"text"} as tokens are decoded,
                                            then "done" {"explanation", "quotes" (how many), "quotes_ok", "bad_quotes",
                                            "first_token_ms", "speculative"}, or "failed" {"error"}
    GET  /api/health                     -> {"documents", "explainer", "explain"}

Each hit carries its evidence sentences (:func:`archlab.search.explain.select_evidence`) and its text cut into
``segments`` that mark them (:func:`archlab.search.explain.highlight`); the first ``explain`` hits get an
explanation, streamed by :meth:`archlab.search.explain.Explainer.stream` while the page shows the results.

Safe to run on a laptop: it binds 127.0.0.1 unless told otherwise (:func:`host_warning` says what another
address exposes), accepts only the Host names of that address (a page elsewhere cannot reach it through DNS
rebinding), caps request bodies (:data:`MAX_BODY_BYTES`, else 413) and queries (:data:`MAX_QUERY_CHARS`, ``k`` up
to :data:`MAX_K`, else 422), answers every refusal as JSON ``{"error": "..."}``, and sends a Content-Security-Policy
that runs the page's own script only.

Searches run one at a time on one worker thread, explanations one token at a time on another (the model is
shared; streams of several pages take turns token by token), so 50 clients queue rather than fight over 2 cores.
The page reads an explanation with a streamed ``fetch`` (the SSE format parsed in ``app.js``): an ``EventSource``
would reconnect, and explain again, when the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from archlab.errors import ArchlabError, ConfigError
from archlab.search.explain import SCORERS, check_quotes, highlight, select_evidence_batch
from archlab.speculative import SpeculativeStats

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4096  # a search request's JSON body
MAX_QUERY_CHARS = 1000  # longer queries are refused (the encoder reads 256 tokens)
MAX_K = 50  # results per search
KEPT_SEARCHES = 256  # the most recent searches whose hits can still be explained
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class RequestError(Exception):
    """A refused request: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def is_loopback(host: str) -> bool:
    """``host`` names this machine only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """What binding ``host`` exposes, or None for a loopback address."""
    if is_loopback(host):
        return None
    return (f"--host {host} serves the index and its explanations to every machine that can reach this one "
            "(the page has no login); bind 127.0.0.1 to keep it on this machine")  # fmt: skip


def create_app(
    engine: Any,
    *,
    explainer: Any = None,
    k: int = 10,
    rerank: int = 0,
    explain: int = 3,
    evidence: int = 2,
    scorer: str = "bm25",
    allowed_hosts: list[str] | None = None,
):
    """The FastAPI app serving ``engine`` (a :class:`archlab.search.engine.SearchEngine`).

    Args:
        engine: answers ``search(query, k=, rerank=)``; its ``encoder`` (if any) embeds evidence sentences.
        explainer: an :class:`archlab.search.explain.Explainer` (or anything with ``stream(query, hit, stats)``); None:
            no explanations.
        k: results per search unless the request asks for another number (1 .. :data:`MAX_K`).
        rerank: re-rank depth passed to ``engine.search`` (needs the engine's reranker).
        explain: how many of the first hits get an explanation (0: none).
        evidence, scorer: evidence sentences per hit and how they are chosen (:func:`select_evidence_batch`): BM25
            by default, as every shown hit gets its evidence marked (measured on 10 hits of the stdlib corpus, ~25
            sentences: BM25 60-110 ms, MiniLM ("dense") 5.7-8.5 s on this 2-core machine under a load of 20; the
            two chose the same first sentence for 7-8 of 10 hits).
        allowed_hosts: Host header names accepted (None: any; :func:`serve` gives the bound address's names).
    """
    for name, value, low, high in (("k", k, 1, MAX_K), ("rerank", rerank, 0, None), ("explain", explain, 0, MAX_K),
                                   ("evidence", evidence, 1, None)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            raise ConfigError(f"{name}={value!r} must be an int in [{low}, {high or 'inf'}]")
    if scorer not in SCORERS:
        raise ConfigError(f"scorer={scorer!r} must be one of {SCORERS}")
    if explain and explainer is None:
        explain = 0
    search_pool = ThreadPoolExecutor(1, thread_name_prefix="archlab-search")
    explain_pool = ThreadPoolExecutor(1, thread_name_prefix="archlab-explain")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        search_pool.shutdown(wait=False, cancel_futures=True)
        explain_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="archlab search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    searches: OrderedDict[str, tuple[str, list]] = OrderedDict()
    encoder = getattr(engine, "encoder", None) or "minilm-l6"
    app.state.engine, app.state.explainer, app.state.searches = engine, explainer, searches

    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        return error(exc.status, exc.message)

    @app.exception_handler(ArchlabError)
    async def _bad_input(request: Request, exc: ArchlabError):
        return error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health():
        return {"documents": len(getattr(engine, "docs", ())), "explainer": explainer is not None, "explain": explain}

    def run_search(query: str, n: int) -> dict:
        result = engine.search(query, k=n, rerank=rerank)
        started = time.perf_counter()
        chosen = select_evidence_batch(query, [h.doc for h in result.hits], evidence, scorer=scorer, encoder=encoder)
        for hit, sentences in zip(result.hits, chosen):
            hit.evidence = sentences
        timings = {name: ms for name, ms in result.timings_ms.items() if name != "total"}
        timings["evidence"] = (time.perf_counter() - started) * 1000.0
        if "total" in result.timings_ms:
            timings["total"] = result.timings_ms["total"] + timings["evidence"]
        return {"hits": result.hits, "timings_ms": timings}

    @app.post("/api/search")
    async def search(request: Request):
        body = await read_body(request)
        query, n = parse_search(body, k)
        done = await asyncio.get_running_loop().run_in_executor(search_pool, run_search, query, n)
        search_id = secrets.token_urlsafe(12)
        searches[search_id] = (query, done["hits"])
        while len(searches) > KEPT_SEARCHES:
            searches.popitem(last=False)
        return {"search_id": search_id, "query": query, "hits": [hit_json(h) for h in done["hits"]],
                "timings_ms": done["timings_ms"], "explain": min(explain, len(done["hits"]))}  # fmt: skip

    def hit_json(hit) -> dict:
        return {
            "rank": hit.rank, "id": hit.doc.id, "title": hit.doc.title, "score": hit.score,
            "stage_scores": hit.stage_scores, "evidence": hit.evidence,
            "segments": [{"text": t, "evidence": e} for t, e in highlight(hit.doc.text, hit.evidence)],
        }  # fmt: skip

    @app.get("/api/explain/{search_id}/{rank}")
    async def explain_stream(search_id: str, rank: int):
        if search_id not in searches:
            raise RequestError(404, f"no recent search {search_id!r} (the server keeps the last {KEPT_SEARCHES}); "
                               "search again")  # fmt: skip
        query, hits = searches[search_id]
        if not 1 <= rank <= min(explain, len(hits)):
            raise RequestError(404, f"rank={rank}: this server explains ranks 1 to {min(explain, len(hits))}")
        # no-cache, not no-store: Chromium reports a streamed no-store body read to its end as aborted
        # (microsoft/playwright#42742; reproduced here, none with no-cache)
        return StreamingResponse(explanation_events(query, hits[rank - 1]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def explanation_events(query: str, hit) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        pieces, first_token_ms, count = None, None, 0
        try:
            started = time.perf_counter()
            stats = SpeculativeStats()
            pieces = await loop.run_in_executor(explain_pool, explainer.stream, query, hit, stats)
            while (piece := await loop.run_in_executor(explain_pool, next, pieces, None)) is not None:
                count += 1
                if count == 2:  # the first piece is the fixed opening; the second is the first decoded token
                    first_token_ms = (time.perf_counter() - started) * 1000.0
                yield sse("piece", {"text": piece})
            quotes = len(check_quotes(hit.explanation, hit.doc).quotes) if hit.explanation is not None else 0
            yield sse("done", {"explanation": hit.explanation, "quotes": quotes, "quotes_ok": hit.quotes_ok,
                               "bad_quotes": hit.bad_quotes,
                               "first_token_ms": first_token_ms,
                               "speculative": stats.as_dict()})  # fmt: skip
        except ArchlabError as e:
            yield sse("failed", {"error": str(e)})
        finally:
            if pieces is not None:
                with contextlib.suppress(RuntimeError):  # (a pool already shut down)
                    explain_pool.submit(pieces.close)  # the client left early: stop decoding at the next token

    return app


def sse(event: str, data: dict) -> str:
    """One Server-Sent Event: ``event: NAME``, ``data: JSON`` (one line: JSON escapes newlines), a blank line."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def read_body(request) -> bytes:
    """The request's body, at most :data:`MAX_BODY_BYTES` (413 beyond, read no further); JSON only (415)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(415, f"content-type {kind or 'none'!r}: send the search as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body of {declared} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body exceeds the limit of {MAX_BODY_BYTES} bytes")
    return body


def parse_search(body: bytes, default_k: int) -> tuple[str, int]:
    """``(query, k)`` of a search request's JSON body ``{"query": str, "k": int?}``; 400 / 422 otherwise."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"the body must be a JSON object {{\"query\": ..., \"k\": ...}}, got {type(data).__name__}")
    unknown = sorted(set(data) - {"query", "k"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}: a search takes query and k")
    query = data.get("query")
    if not isinstance(query, str):
        raise RequestError(422, f"query must be a string, got {type(query).__name__}")
    query = query.strip()
    if not query:
        raise RequestError(422, "query is empty: type some words to search for")
    if len(query) > MAX_QUERY_CHARS:
        raise RequestError(422, f"query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}")
    k = data.get("k", default_k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise RequestError(422, f"k={k!r} must be an int from 1 to {MAX_K}")
    return query, k


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    reranker: Any = None,
    explainer: Any = None,
    log_level: str = "warning",
    **options: Any,
) -> None:
    """Open ``index_dir`` and serve its page with uvicorn until interrupted (``options``: :func:`create_app`'s).

    A non-loopback ``host`` is served with a warning (:func:`host_warning`); the explainer's model loads first.
    """
    import sys

    import uvicorn

    from archlab.search.engine import SearchEngine

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port={port!r} must be an int from 0 to 65535")
    warning = host_warning(host)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    engine = SearchEngine.open(index_dir, reranker=reranker)
    hosts = None if warning else sorted({"127.0.0.1", "localhost", host})
    app = create_app(engine, explainer=explainer, allowed_hosts=hosts, **options)  # checks the options
    if explainer is not None and hasattr(explainer, "load"):
        print("loading the explanation model ...", file=sys.stderr)
        explainer.load()
    shown = f"[{host}]" if ":" in host else host
    print(f"archlab search: {len(engine.docs)} documents at http://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
