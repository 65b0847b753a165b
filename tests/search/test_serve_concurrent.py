"""archlab.search.serve under concurrent requests: searches that arrive together share one batch; a full queue is a 503."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from archlab.search import Document, Hit, SearchResult
from archlab.search.serve import create_app

DOCS = [Document("pm1", "Metformin", "Metformin in elderly patients: nausea is common."),
        Document("json.loads", "json.loads", "Deserialize a JSON document to a Python object."),
        Document("pm2", "Insulin", "Insulin lowers blood glucose.")]  # fmt: skip


class FakeEngine:
    """Ranks DOCS by how many query words each contains (ties: DOCS order); no models."""

    docs, encoder = DOCS, None

    def search(self, query, *, k=10, rerank=0, explain=0):
        words = query.lower().split()
        score = [sum(w in (d.title + " " + d.text).lower() for w in words) for d in DOCS]
        order = sorted(range(len(DOCS)), key=lambda i: -score[i])[:k]
        hits = [Hit(DOCS[i], r, float(score[i])) for r, i in enumerate(order, 1)]
        return SearchResult(query, hits, {"encode": 1.0, "total": 1.0})


class SlowBatchEngine(FakeEngine):
    """FakeEngine with ``search_batch``; every engine call waits for ``release`` (a slow stage held open)."""

    def __init__(self):
        self.calls: list[list[str]] = []  # the queries of each engine call, in order
        self.entered = threading.Event()
        self.release = threading.Event()

    def _hold(self, queries):
        self.calls.append(list(queries))
        self.entered.set()
        assert self.release.wait(10), "the test never released the engine"

    def search(self, query, *, k=10, rerank=0, explain=0):
        self._hold([query])
        return super().search(query, k=k, rerank=rerank)

    def search_batch(self, queries, *, k=10, rerank=0, explain=0):
        self._hold(queries)
        return [FakeEngine.search(self, q, k=k, rerank=rerank) for q in queries]


async def wait_for(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_searches_arriving_together_are_answered_by_one_batch():
    engine = SlowBatchEngine()
    app = create_app(engine)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            first = asyncio.create_task(http.post("/api/search", json={"query": "metformin elderly"}))
            await wait_for(engine.entered.is_set, "the first search to start")
            # while the first runs, two more arrive: both are in flight at once, waiting for the next batch
            others = [asyncio.create_task(http.post("/api/search", json={"query": q, "k": 2}))
                      for q in ("json document", "insulin glucose")]  # fmt: skip
            await wait_for(lambda: app.state.batcher.in_flight == 3, "three searches in flight")
            engine.release.set()
            return await asyncio.gather(first, *others)

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert engine.calls == [["metformin elderly"], ["json document", "insulin glucose"]]
    assert app.state.batcher.batches == [1, 2]
    bodies = [a.json() for a in answers]  # each answer is its own query's ranking, cut at its own k
    assert [b["hits"][0]["id"] for b in bodies] == ["pm1", "json.loads", "pm2"]
    assert [len(b["hits"]) for b in bodies] == [len(DOCS), 2, 2]


def test_a_full_queue_is_refused_with_503_and_a_reason():
    engine = SlowBatchEngine()
    app = create_app(engine)
    app.state.batcher.max_waiting = 1

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            first = asyncio.create_task(http.post("/api/search", json={"query": "metformin"}))
            await wait_for(engine.entered.is_set, "the first search to start")
            refused = await http.post("/api/search", json={"query": "insulin"})
            engine.release.set()
            return await first, refused

    first, refused = asyncio.run(scenario())
    assert first.status_code == 200
    assert refused.status_code == 503
    assert "busy (1 searches waiting, at most 1)" in refused.json()["error"]


class OneBadQueryEngine(FakeEngine):
    """``search_batch`` fails when any query contains "boom"; ``search`` fails for that query only."""

    def search(self, query, *, k=10, rerank=0, explain=0):
        if "boom" in query:
            from archlab.errors import DataError

            raise DataError("a query the engine refuses")
        return super().search(query, k=k, rerank=rerank)

    def search_batch(self, queries, *, k=10, rerank=0, explain=0):
        return [self.search(q, k=k, rerank=rerank) for q in queries]


def test_one_bad_query_in_a_batch_fails_alone():
    app = create_app(OneBadQueryEngine())
    answers = app.state.batcher.run_batch([("insulin", 3), ("boom", 3), ("json", 1)])
    assert isinstance(answers[1], Exception) and "refuses" in str(answers[1])
    assert answers[0]["hits"][0].doc.id == "pm2" and len(answers[2]["hits"]) == 1


@pytest.mark.parametrize("n", [1, 3])
def test_the_batcher_keeps_the_order_of_its_items(n):
    app = create_app(FakeEngine())
    items = [("insulin", 2), ("json", 2), ("metformin", 2)][:n]
    answers = app.state.batcher.run_batch(items)
    assert [a["hits"][0].doc.id for a in answers] == ["pm2", "json.loads", "pm1"][:n]


def test_the_priority_worker_runs_first_explanations_before_next_tokens():
    from archlab.search.serve import FIRST_EXPLANATION, NEXT_TOKEN, OTHER_EXPLANATION, PriorityWorker

    worker, gate, order = PriorityWorker("test"), threading.Event(), []
    blocker = worker.submit(NEXT_TOKEN, gate.wait, 10)  # holds the thread while the others queue up
    futures = [worker.submit(p, order.append, name) for p, name in
               ((NEXT_TOKEN, "token a"), (OTHER_EXPLANATION, "rank 2"), (NEXT_TOKEN, "token b"),
                (FIRST_EXPLANATION, "rank 1"))]  # fmt: skip
    gate.set()
    for f in [blocker, *futures]:
        f.result(timeout=10)
    assert order == ["rank 1", "rank 2", "token a", "token b"]
    failing = worker.submit(0, int, "not a number")
    with pytest.raises(ValueError):
        failing.result(timeout=10)
    worker.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(0, order.append, "late")


class RecordingExplainer:
    """Streams a fixed explanation quoting the document's first word; records when each stream starts."""

    def __init__(self):
        self.started: list[str] = []

    def stream(self, query, hit, stats=None):
        self.started.append(hit.doc.id)
        return self._pieces(hit)

    def _pieces(self, hit):
        word = hit.doc.text.split()[0]
        yield from ['It says "', word, '".']
        hit.explanation, hit.quotes_ok, hit.bad_quotes = f'It says "{word}".', True, []


def test_the_first_explanation_starts_when_the_search_is_answered():
    explainer = RecordingExplainer()
    app = create_app(FakeEngine(), explainer=explainer, explain=2)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            body = (await http.post("/api/search", json={"query": "insulin"})).json()
            await wait_for(lambda: explainer.started == ["pm2"], "the first explanation to start unasked")
            stream = await http.get(f"/api/explain/{body['search_id']}/1")
            second = await http.get(f"/api/explain/{body['search_id']}/2")
            return stream.text, second.text

    first, second = asyncio.run(scenario())
    assert explainer.started == ["pm2", DOCS[0].id]  # rank 2 starts only when asked for
    assert 'event: done' in first and '"explanation": "It says \\"Insulin\\"."' in first
    assert '"first_token_ms": ' in first and 'event: done' in second


class GatedExplainer(RecordingExplainer):
    """RecordingExplainer whose streams wait for ``gate`` before their first piece (a busy explanation model);
    records the query of each stream started."""

    def __init__(self):
        super().__init__()
        self.gate, self.queries = threading.Event(), []

    def stream(self, query, hit, stats=None):
        self.queries.append(query)
        return self._gated(hit)

    def _gated(self, hit):
        assert self.gate.wait(10), "the test never opened the gate"
        yield from self._pieces(hit)


def test_searches_start_no_unasked_explanation_while_first_explanations_queue():
    """Under load most pages never ask for their explanation: while ``EAGER_STARTS_WAITING`` first explanations
    already wait for the explanation thread, a search does not start one unasked; asked for, it starts then."""
    from archlab.search.serve import EAGER_STARTS_WAITING

    explainer = GatedExplainer()
    app = create_app(FakeEngine(), explainer=explainer, explain=1)
    queries = ["insulin", "metformin", "json", "glucose", "elderly"]
    running = 1  # the first search's start is taken by the thread and held at the gate; the next ones queue

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            ids = []
            for i, q in enumerate(queries):
                ids.append((await http.post("/api/search", json={"query": q})).json()["search_id"])
                if i == 0:
                    await wait_for(lambda: explainer.queries == ["insulin"], "the first start to reach the gate")
            explainer.gate.set()
            eager = queries[: running + EAGER_STARTS_WAITING]
            await wait_for(lambda: explainer.queries == eager, "the queued starts to run")
            await asyncio.sleep(0.1)
            assert explainer.queries == eager  # the later searches started nothing unasked
            late = await http.get(f"/api/explain/{ids[-1]}/1")
            return late.text

    late = asyncio.run(scenario())
    assert explainer.queries == queries[: running + EAGER_STARTS_WAITING] + ["elderly"]
    assert "event: done" in late


def test_explanations_of_several_pages_decode_as_one_batch_each_as_alone(tmp_path, monkeypatch):
    """Three pages read their explanations at once from the real Explainer (a random tiny Llama, float64): the
    server decodes the three streams in one batch (ExplanationStreams held until all three are resumed), and each
    page's text is the one Explainer.stream decodes for its hit alone."""
    import sys
    import time
    from pathlib import Path

    import torch

    from archlab.models.llama import Llama, LlamaConfig
    from archlab.search.explain import Explainer, ExplanationStreams

    sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
    from gguf_files import TINY_TOKENIZER, write_llama_gguf

    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TINY_TOKENIZER["tokenizer.ggml.tokens"]), max_len=1024, d_model=32,
                         n_heads=4, n_kv_heads=2, n_layers=2, d_ff=48)  # fmt: skip
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    widths: list[int] = []

    class HeldStreams(ExplanationStreams):
        """Decodes nothing until three streams run (or 30 s pass), then records how many each round decodes."""

        deadline = time.monotonic() + 30

        def step(self):
            if not widths and self.running < 3 and time.monotonic() < self.deadline:
                time.sleep(0.005)
                return []
            widths.append(self.running)
            return super().step()

    class BatchedExplainer(Explainer):
        def streams(self):
            return HeldStreams(self)

    explainer = BatchedExplainer(write_llama_gguf(tmp_path / "tiny.gguf", model, TINY_TOKENIZER), max_new_tokens=12,
                                 scorer="bm25")  # fmt: skip
    explainer.load()[0].double()  # float64: no near-ties for the batch to flip
    app = create_app(FakeEngine(), explainer=explainer, explain=1, scorer="bm25")
    queries = ["insulin glucose", "json document", "metformin nausea elderly"]

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
            searches = [(await http.post("/api/search", json={"query": q})).json() for q in queries]
            answers = await asyncio.gather(*(http.get(f"/api/explain/{s['search_id']}/1") for s in searches))
            return searches, [a.text for a in answers]

    searches, texts = asyncio.run(scenario())
    assert widths and widths[0] == 3 and max(widths) == 3  # the three streams decoded together
    for query, search, text in zip(queries, searches, texts):
        hit = search["hits"][0]
        doc = next(d for d in DOCS if d.id == hit["id"])
        alone = Hit(doc, 1, 1.0)
        alone.evidence = hit["evidence"]
        expected = "".join(explainer.stream(query, alone))
        done = json.loads(text.strip().split("\n\n")[-1].split("data: ", 1)[1])
        assert done["explanation"] == expected == alone.explanation
        assert done["first_token_ms"] >= 0 and done["speculative"]["generated"] >= 1
