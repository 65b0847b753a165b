r"""The search page: ``archlab search serve INDEX`` (FastAPI + uvicorn on 127.0.0.1).

One static page (``static/index.html``, ``app.js``, ``style.css``) with a search box. It asks the JSON API and
draws the answer with ``textContent`` only (never ``innerHTML`` of data), so a document holding ``<script>``
shows as text::

    GET  /                               the page
    POST /api/search   {"query", "k"?}   -> {"search_id", "query", "hits": [...], "timings_ms", "explain",
                                            "skipped" ({stage: why it was asked for but not run})}
    GET  /api/explain/{search_id}/{rank} -> Server-Sent Events: "piece" {"text"} as tokens are decoded,
                                            then "done" {"explanation", "quotes" (how many), "quotes_ok", "bad_quotes",
                                            "first_token_ms" (after the search's answer), "speculative"},
                                            or "failed" {"error"}
    GET  /api/health                     -> {"documents", "explainer", "explain"}

Each hit carries its evidence sentences (:func:`archlab.search.explain.select_evidence`) and its text cut into
``segments`` that mark them (:func:`archlab.search.explain.highlight`); the first ``explain`` hits get an
explanation, streamed by :meth:`archlab.search.explain.Explainer.stream` while the page shows the results.

Safe to run on a laptop: it binds 127.0.0.1 unless told otherwise (:func:`host_warning` says what another
address exposes), accepts only the Host names of that address (a page elsewhere cannot reach it through DNS
rebinding), caps request bodies (:data:`MAX_BODY_BYTES`, else 413) and queries (:data:`MAX_QUERY_CHARS`, ``k`` up
to :data:`MAX_K`, else 422), answers every refusal as JSON ``{"error": "..."}``, and sends a Content-Security-Policy
that runs the page's own script only.

Searches that arrive while others run are served together (:class:`SearchBatcher`): one encoder pass and one
FAISS search for all their queries (:meth:`archlab.search.engine.SearchEngine.search_batch`), on one worker thread
whose torch ops use the machine's threads; at most :data:`MAX_BATCH` per batch and :data:`MAX_WAITING` waiting
(more are refused with 503, a clear JSON reason). Explanations run on another thread in priority order
(:class:`PriorityWorker`), and the streams of every page that reads one decode together
(:class:`archlab.search.explain.ExplanationStreams`: one decode round gives each running stream its next tokens,
its prompt-lookup drafts verified, in one batched forward pass; a stream joins the batch after its prefill and
leaves when it ends or its reader leaves; an explainer with only ``stream()`` gets :class:`OneAtATime`, the streams
taking turns). The first-ranked hit's explanation starts right after its search is answered (its prompt is prefilled and its first
token decoded before the page asks for it; the stream then waits, out of the batch, until the page reads it)
unless :data:`EAGER_STARTS_WAITING` first explanations already wait (under load most pages never ask, and their
starts would delay the streams that are read), and a new explanation's start goes before the next decode round
of the streams already running, so each page sees its first explanation soon after its results.
The page reads an explanation with a streamed ``fetch`` (the SSE format parsed in ``app.js``): an ``EventSource``
would reconnect, and explain again, when the stream ends.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ipaddress
import itertools
import json
import queue
import secrets
import threading
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
from archlab.search.explain import SCORERS, check_quotes, highlight, select_evidence_batch, select_evidence_many
from archlab.speculative import SpeculativeStats

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4096  # a search request's JSON body
MAX_QUERY_CHARS = 1000  # longer queries are refused (the encoder reads 256 tokens)
MAX_K = 50  # results per search
KEPT_SEARCHES = 256  # the most recent searches whose hits can still be explained
MAX_BATCH = 32  # searches encoded together
MAX_WAITING = 256  # searches queued or running; more are refused with 503
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


FIRST_EXPLANATION, OTHER_EXPLANATION, NEXT_TOKEN = 0, 1, 2  # PriorityWorker priorities (lower runs first)
EAGER_STARTS_WAITING = 2  # a search starts its first explanation unasked only while fewer first explanations wait


class PriorityWorker:
    """One thread running submitted calls lowest ``priority`` first (in submission order within one priority).

    The explanation model is shared, so its work is serialised on one thread; priorities decide whose turn it is.
    """

    def __init__(self, name: str):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = self._closed = False
        self._lock = threading.Lock()
        self._waiting: collections.Counter[int] = collections.Counter()  # priority -> calls queued, not yet taken

    def submit(self, priority: int, fn, *args) -> concurrent.futures.Future:
        """A future of ``fn(*args)``, run when no call of a lower priority waits; RuntimeError once shut down."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            if not self._started:
                self._thread.start()
                self._started = True
            self._queue.put((priority, next(self._order), future, fn, args))
            self._waiting[priority] += 1
        return future

    def waiting(self, priority: int) -> int:
        """How many calls of ``priority`` are queued and not yet taken by the thread."""
        with self._lock:
            return self._waiting[priority]

    def _run(self) -> None:
        while True:
            priority, _, future, fn, args = self._queue.get()
            if fn is None:
                return
            with self._lock:
                self._waiting[priority] -= 1
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 (handed to whoever awaits the future)
                    future.set_exception(e)

    def shutdown(self) -> None:
        """Stop after the call running now; calls still waiting are cancelled."""
        with self._lock:
            self._closed = True
            self._queue.put((-1, -1, None, None, ()))


class OneAtATime:
    """The streams of :class:`archlab.search.explain.ExplanationStreams` (``start``, ``resume``, ``step``,
    ``close``, ``running``) for an explainer that only has ``stream(query, hit, stats)``, an iterator of text
    pieces: each stream decodes on its own, and a step gives every resumed stream its next piece in turn."""

    class Stream:
        """One explanation's piece iterator: the pieces not yet taken, ``done`` once it ended."""

        def __init__(self, pieces, stats):
            self.pieces, self.stats, self.done = pieces, stats, False
            self._new = []
            for _ in range(2):  # the opening, then the first decoded text
                self.advance()

        def advance(self) -> None:
            try:
                self._new.append(next(self.pieces))
            except StopIteration:
                self.done = True

        def take(self) -> list[str]:
            new, self._new = self._new, []
            return new

    def __init__(self, explainer):
        self.explainer, self._running = explainer, []

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self, query: str, hit, stats) -> OneAtATime.Stream:
        return self.Stream(self.explainer.stream(query, hit, stats), stats)

    def resume(self, stream: OneAtATime.Stream) -> None:
        if not stream.done and stream not in self._running:
            self._running.append(stream)

    def step(self) -> list[OneAtATime.Stream]:
        for stream in self._running:
            stream.advance()
        changed = [s for s in self._running if s._new or s.done]
        self._running = [s for s in self._running if not s.done]
        return changed

    def close(self, stream: OneAtATime.Stream) -> None:
        stream.pieces.close()
        stream.done = True
        if stream in self._running:
            self._running.remove(stream)


class SearchBatcher:
    """Micro-batching: searches submitted while a batch runs wait and go together into the next one.

    ``run_batch(items)`` (called on ``pool``'s thread) gets ``[(query, k), ...]`` and returns one result or
    exception per item. A batch holds at most ``max_batch`` items; with ``max_waiting`` searches already
    waiting or running, :meth:`submit` refuses the next with :class:`RequestError` 503. ``batches`` keeps
    the sizes of the last 1,000 batches run (what the load test and the tests read).
    """

    def __init__(self, run_batch, pool: ThreadPoolExecutor, *, max_batch: int = MAX_BATCH,
                 max_waiting: int = MAX_WAITING):  # fmt: skip
        self.run_batch, self.pool, self.max_batch, self.max_waiting = run_batch, pool, max_batch, max_waiting
        self.waiting: list[tuple[str, int, asyncio.Future]] = []
        self.in_flight = 0  # submitted and not yet answered
        self.batches: list[int] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, query: str, k: int):
        if self.in_flight >= self.max_waiting:
            raise RequestError(503, f"the server is busy ({self.in_flight} searches waiting, at most "
                               f"{self.max_waiting}): try again shortly")  # fmt: skip
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((query, k, future))
        self.in_flight += 1
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        try:
            return await future
        finally:
            self.in_flight -= 1

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
            self.batches = [*self.batches[-999:], len(batch)]
            try:
                answers = await loop.run_in_executor(self.pool, self.run_batch, [(q, k) for q, k, _ in batch])
            except Exception as e:  # noqa: BLE001 (given to every waiting request, which answers it)
                answers = [e] * len(batch)
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)


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


def host_name(header: str) -> str:
    """The name of a Host header, its port left out: ``127.0.0.1:8000`` -> ``127.0.0.1``, ``[::1]:8000`` -> ``::1``."""
    if header.startswith("[") and "]" in header:
        return header[1 : header.index("]")]
    return header.split(":")[0]


class HostCheck:
    """Refuses a request whose Host header names none of ``allowed_hosts`` (a page elsewhere that reached this server
    through DNS rebinding), with 400 and a JSON reason like every other refusal (Starlette's TrustedHostMiddleware
    answers plain text)."""

    def __init__(self, app: Any, allowed_hosts: list[str]):
        self.app, self.allowed = app, frozenset(allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":  # (the app has no websocket route)
            from starlette.datastructures import Headers

            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                message = (f"Host {host!r} is not served here: this server answers requests for "
                           f"{', '.join(sorted(self.allowed))}")  # fmt: skip
                await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    explain_worker = PriorityWorker("archlab-explain")
    # the explanation thread's state: the streams, each read stream's sink, whether a decode round is queued
    streams = None if explainer is None else (explainer.streams() if callable(getattr(explainer, "streams", None))
                                              else OneAtATime(explainer))  # fmt: skip
    sinks: dict[Any, Any] = {}
    round_queued = [False]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        search_pool.shutdown(wait=False, cancel_futures=True)
        explain_worker.shutdown()

    app = FastAPI(title="archlab search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    searches: OrderedDict[str, tuple[str, list]] = OrderedDict()
    encoder = getattr(engine, "encoder", None) or "minilm-l6"
    app.state.engine, app.state.explainer, app.state.searches = engine, explainer, searches
    batcher = app.state.batcher = SearchBatcher(lambda items: run_batch(items), search_pool)

    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)

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

    def run_batch(items: list[tuple[str, int]]) -> list:
        """Each item's answer (:func:`answer`) or its error; one engine pass for all when the engine batches."""
        if len(items) > 1 and hasattr(engine, "search_batch"):
            try:
                results = engine.search_batch([q for q, _ in items], k=max(n for _, n in items), rerank=rerank)
            except ArchlabError:
                results = None  # one bad query: search them one by one, so only it fails
            if results is not None:
                for result, (_, n) in zip(results, items, strict=True):
                    result.hits = result.hits[:n]
                started = time.perf_counter()  # the evidence of every search in the batch: one encoder call
                chosen = select_evidence_many([q for q, _ in items], [[h.doc for h in r.hits] for r in results],
                                              evidence, scorer=scorer, encoder=encoder)  # fmt: skip
                ms = (time.perf_counter() - started) * 1000.0
                return [answer(q, n, r, found, ms) for (q, n), r, found in zip(items, results, chosen, strict=True)]
        out = []
        for query, n in items:
            try:
                out.append(answer(query, n, engine.search(query, k=n, rerank=rerank)))
            except Exception as e:  # noqa: BLE001 (answered to that request alone)
                out.append(e)
        return out

    def answer(query: str, n: int, result, chosen=None, evidence_ms: float = 0.0) -> dict:
        """The page's answer to one search; ``chosen``: its hits' evidence when the batch selected it already
        (in ``evidence_ms``, shared like the batch's encode and ann), else selected here."""
        result.hits = result.hits[:n]
        started = time.perf_counter()
        if chosen is None:
            chosen = select_evidence_batch(query, [h.doc for h in result.hits], evidence, scorer=scorer,
                                           encoder=encoder)  # fmt: skip
        for hit, sentences in zip(result.hits, chosen):
            hit.evidence = sentences
        timings = {name: ms for name, ms in result.timings_ms.items() if name != "total"}
        timings["evidence"] = evidence_ms + (time.perf_counter() - started) * 1000.0
        if "total" in result.timings_ms:
            timings["total"] = result.timings_ms["total"] + timings["evidence"]
        return {"hits": result.hits, "timings_ms": timings, "skipped": dict(getattr(result, "skipped", {}))}

    @app.post("/api/search")
    async def search(request: Request):
        body = await read_body(request)
        query, n = parse_search(body, k)
        done = await batcher.submit(query, n)
        search_id = secrets.token_urlsafe(12)
        started = {}
        # the first explanation starts now, before the page asks for it, unless first explanations already queue
        # (under load most searches' pages never ask: their eager starts would delay the streams that are read)
        if explain and done["hits"] and explain_worker.waiting(FIRST_EXPLANATION) < EAGER_STARTS_WAITING:
            started[1] = explain_worker.submit(FIRST_EXPLANATION, start_explanation, query, done["hits"][0])
        searches[search_id] = (query, done["hits"], started, time.perf_counter())
        while len(searches) > KEPT_SEARCHES:
            for future in searches.popitem(last=False)[1][2].values():  # never asked for: stop it
                if not future.cancel():
                    future.add_done_callback(lambda f: f.exception() or explain_worker.submit(0, close_explanation,
                                                                                            f.result()[0]))  # fmt: skip
        return {"search_id": search_id, "query": query, "hits": [hit_json(h) for h in done["hits"]],
                "timings_ms": done["timings_ms"], "explain": min(explain, len(done["hits"])),
                "skipped": done["skipped"]}  # fmt: skip

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
        query, hits, started, answered = searches[search_id]
        if not 1 <= rank <= min(explain, len(hits)):
            raise RequestError(404, f"rank={rank}: this server explains ranks 1 to {min(explain, len(hits))}")
        future = started.pop(rank, None)  # (a second request for the same rank starts afresh)
        if future is None:
            future = explain_worker.submit(FIRST_EXPLANATION if rank == 1 else OTHER_EXPLANATION, start_explanation,
                                           query, hits[rank - 1])  # fmt: skip
        # no-cache, not no-store: Chromium reports a streamed no-store body read to its end as aborted
        # (microsoft/playwright#42742; reproduced here, none with no-cache)
        return StreamingResponse(explanation_events(hits[rank - 1], future, answered), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    def start_explanation(query: str, hit) -> tuple:
        """On the explanation thread: ``hit``'s explanation prompt prefilled and its first token decoded
        (``streams.start``); ``(stream, t_first)``, the ``perf_counter`` time of the first token. The stream waits
        until its page reads it (:func:`read_explanation`)."""
        return streams.start(query, hit, SpeculativeStats()), time.perf_counter()

    def read_explanation(stream, sink) -> None:
        """On the explanation thread: ``stream`` decodes with the running ones from the next round on, its pieces
        handed to ``sink`` (None after the last; the exception if a decode round fails)."""
        sinks[stream] = sink
        streams.resume(stream)
        schedule_round()

    def schedule_round() -> None:
        """One :func:`decode_round` queued at a time, behind every start waiting (lower priorities run first)."""
        if not round_queued[0] and streams.running:
            round_queued[0] = True
            explain_worker.submit(NEXT_TOKEN, decode_round)

    def decode_round() -> None:
        """On the explanation thread: the next tokens of every running stream, as one batch (``streams.step``)."""
        round_queued[0] = False
        try:
            for stream in streams.step():
                for piece in stream.take():
                    sinks[stream](piece)
                if stream.done:
                    sinks.pop(stream)(None)
        except Exception as e:  # noqa: BLE001 (every page reading a stream is told; their rows leave)
            for stream, sink in list(sinks.items()):
                del sinks[stream]
                sink(e)
                with contextlib.suppress(Exception):
                    streams.close(stream)
        finally:
            schedule_round()

    def close_explanation(stream) -> None:
        """On the explanation thread: stop decoding ``stream`` (its reader left, or it was never asked for)."""
        sinks.pop(stream, None)
        streams.close(stream)

    async def explanation_events(hit, future: concurrent.futures.Future, answered: float) -> AsyncIterator[str]:
        stream = None
        try:
            stream, t_first = await asyncio.wrap_future(future)
            first_token_ms = max(0.0, t_first - answered) * 1000.0  # after the search was answered
            for piece in stream.take():  # the opening and the first token's text (the stream waits meanwhile)
                yield sse("piece", {"text": piece})
            if not stream.done:
                loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

                def sink(piece):  # called on the explanation thread
                    with contextlib.suppress(RuntimeError):  # (the loop already closed)
                        loop.call_soon_threadsafe(pieces.put_nowait, piece)

                explain_worker.submit(NEXT_TOKEN, read_explanation, stream, sink)
                while (piece := await pieces.get()) is not None:
                    if isinstance(piece, Exception):  # the decode round failed
                        raise piece
                    yield sse("piece", {"text": piece})
            quotes = len(check_quotes(hit.explanation, hit.doc).quotes) if hit.explanation is not None else 0
            yield sse("done", {"explanation": hit.explanation, "quotes": quotes, "quotes_ok": hit.quotes_ok,
                               "bad_quotes": hit.bad_quotes,
                               "first_token_ms": first_token_ms,
                               "speculative": stream.stats.as_dict()})  # fmt: skip
        except ArchlabError as e:
            yield sse("failed", {"error": str(e)})
        finally:
            if stream is not None and not stream.done:
                with contextlib.suppress(RuntimeError):  # (a worker already shut down)
                    explain_worker.submit(0, close_explanation, stream)  # the client left early: its row leaves

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
