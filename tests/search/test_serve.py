"""archlab.search.serve: the JSON API, its caps and refusals, escaping, and the streamed explanations.

A fake engine (word overlap over a few documents) and a fake explainer (quotes the first evidence sentence,
or invents a quote) stand in for the models; the page in a real browser is tests/search/test_browser_search.py.
"""

from __future__ import annotations

import json

import pytest

from archlab.errors import ConfigError, DataError
from archlab.search import Document, Hit, SearchResult
from archlab.search.explain import REPLY_OPENING, check_quotes
from archlab.search.serve import MAX_BODY_BYTES, MAX_K, MAX_QUERY_CHARS, SECURITY_HEADERS, create_app, host_warning

SCRIPT = "<script>alert(1)</script>"
DOCS = [
    Document("pm1", "Metformin in older adults", "Metformin lowers glucose. In elderly patients, nausea and "
             "diarrhoea are common side effects. Lactic acidosis is rare."),  # fmt: skip
    Document("json.loads", "json.loads", "Deserialize a JSON document to a Python object. Invalid JSON raises "
             "JSONDecodeError."),  # fmt: skip
    Document("evil", f"A title with {SCRIPT}", f"This document holds {SCRIPT} as text. It must show as text."),
    Document("pm2", "Insulin", "Insulin is a hormone. It lowers blood glucose."),
]


class FakeEngine:
    """Ranks DOCS by the number of query words they contain (ties: corpus order)."""

    docs = DOCS
    encoder = None

    def search(self, query, *, k=10, rerank=0, explain=0):
        words = set(query.lower().split())
        scored = [(sum(w in (d.title + " " + d.text).lower() for w in words), i) for i, d in enumerate(DOCS)]
        order = sorted(scored, key=lambda p: (-p[0], p[1]))[:k]
        hits = [Hit(DOCS[i], r, float(s), {"bm25": float(s)}) for r, (s, i) in enumerate(order, 1)]
        return SearchResult(query, hits, {"encode": 1.0, "ann": 0.5, "total": 1.5})


class FakeExplainer:
    """Streams ``It says "<first evidence sentence>"`` in pieces; ``invent=True`` quotes words not in the document."""

    def __init__(self, invent=False, fail=False, fail_later=False):
        self.invent, self.fail, self.fail_later = invent, fail, fail_later

    def stream(self, query, hit, stats=None):
        if self.fail:
            raise DataError("the explanation model is not available")
        if self.fail_later:
            return self._failing()
        quote = "metformin cures everything" if self.invent else hit.evidence[0]
        return self._pieces(hit, [REPLY_OPENING, *quote.split(" ")[:1], *(" " + w for w in quote.split(" ")[1:]), '".'])

    def _failing(self):
        yield from [REPLY_OPENING, "Metformin"]
        raise DataError("the explanation model failed mid-way")

    def _pieces(self, hit, pieces):
        yield from pieces
        hit.explanation = "".join(pieces)
        check = check_quotes(hit.explanation, hit.doc)
        hit.quotes_ok, hit.bad_quotes = check.ok, list(check.bad)


@pytest.fixture
def client_for():
    from fastapi.testclient import TestClient

    clients = []

    def make(**options):
        client = TestClient(create_app(FakeEngine(), **options))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def events(text: str) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a Server-Sent Events body."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_the_page_is_static_and_sent_with_a_strict_content_security_policy(client_for):
    client = client_for()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js" defer></script>' in page.text and "alert" not in page.text
    script = client.get("/static/app.js").text
    assert ".innerHTML" not in script and "insertAdjacentHTML" not in script and "textContent" in script  # data is set as text, never parsed as HTML
    assert client.get("/api/health").json() == {"documents": 4, "explainer": False, "explain": 0}


def test_search_returns_ranked_hits_with_evidence_segments_and_text_as_data(client_for):
    client = client_for(explainer=FakeExplainer(), explain=2)
    answer = client.post("/api/search", json={"query": "metformin side effects in elderly patients", "k": 3})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"
    body = answer.json()
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3] and body["hits"][0]["id"] == "pm1"
    assert body["explain"] == 2 and set(body["timings_ms"]) >= {"encode", "ann", "evidence"}
    first = body["hits"][0]
    assert first["evidence"][0] == "In elderly patients, nausea and diarrhoea are common side effects."
    marked = [s["text"] for s in first["segments"] if s["evidence"]]
    assert marked == sorted(first["evidence"], key=DOCS[0].text.find)  # in the text's order
    assert "".join(s["text"] for s in first["segments"]) == DOCS[0].text
    evil = client.post("/api/search", json={"query": "document holds script <b>as</b> text"}).json()
    hit = next(h for h in evil["hits"] if h["id"] == "evil")
    assert hit["title"] == f"A title with {SCRIPT}" and SCRIPT in "".join(s["text"] for s in hit["segments"])
    assert evil["query"] == "document holds script <b>as</b> text"  # JSON data; the page sets it as text


def test_a_skipped_stage_and_its_reason_are_in_the_answer():
    """The engine's ``SearchResult.skipped`` (e.g. a re-ranker that keeps the first stage's order is not run) reaches
    the page as JSON data, reason verbatim (the page sets it with textContent: tests/search/test_browser_search.py)."""
    from fastapi.testclient import TestClient

    reason = f"first-stage weight 1 {SCRIPT}"

    class SkippingEngine(FakeEngine):
        def search(self, query, *, k=10, rerank=0, explain=0):
            result = super().search(query, k=k)
            result.skipped = {"rerank": reason} if rerank else {}
            return result

    with TestClient(create_app(SkippingEngine(), rerank=5)) as client:
        assert client.post("/api/search", json={"query": "insulin"}).json()["skipped"] == {"rerank": reason}
    with TestClient(create_app(SkippingEngine())) as client:  # nothing asked for, nothing skipped
        assert client.post("/api/search", json={"query": "insulin"}).json()["skipped"] == {}


@pytest.mark.parametrize(
    "request_kwargs, status, message",
    [
        ({"json": {"query": "x" * (MAX_QUERY_CHARS + 1)}}, 422, f"limit is {MAX_QUERY_CHARS}"),
        ({"json": {"query": "   "}}, 422, "query is empty"),
        ({"json": {"query": 3}}, 422, "query must be a string, got int"),
        ({"json": {"text": "metformin"}}, 422, "unknown field(s) 'text'"),
        ({"json": {"query": "metformin", "k": 0}}, 422, f"k=0 must be an int from 1 to {MAX_K}"),
        ({"json": {"query": "metformin", "k": MAX_K + 1}}, 422, f"k={MAX_K + 1} must be"),
        ({"json": {"query": "metformin", "k": "3"}}, 422, "k='3' must be"),
        ({"json": ["metformin"]}, 422, "must be a JSON object"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not JSON"),
        ({"content": b"query=metformin", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415,
         "application/json"),
        ({"json": {"query": "y" * (MAX_BODY_BYTES + 10)}}, 413, f"limit of {MAX_BODY_BYTES} bytes"),
        ({"content": iter([b'{"query": "', b"z" * MAX_BODY_BYTES, b'"}']),  # chunked: no content-length
          "headers": {"content-type": "application/json"}}, 413, f"limit of {MAX_BODY_BYTES} bytes"),
    ],
)
def test_bad_requests_get_a_clear_4xx_json_error(client_for, request_kwargs, status, message):
    answer = client_for().post("/api/search", **request_kwargs)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"]


def test_other_refusals_are_json_too(client_for):
    client = client_for(explainer=FakeExplainer(), explain=1)
    assert client.get("/api/search").status_code == 405 and "error" in client.get("/api/search").json()
    missing = client.get("/api/explain/nosuchsearch/1")
    assert missing.status_code == 404 and "no recent search 'nosuchsearch'" in missing.json()["error"]
    search_id = client.post("/api/search", json={"query": "insulin"}).json()["search_id"]
    beyond = client.get(f"/api/explain/{search_id}/2")
    assert beyond.status_code == 404 and "explains ranks 1 to 1" in beyond.json()["error"]
    assert client.get(f"/api/explain/{search_id}/x").status_code == 422


def test_explanations_stream_as_server_sent_events_and_report_the_quote_guard(client_for):
    client = client_for(explainer=FakeExplainer(), explain=2)
    search = client.post("/api/search", json={"query": "metformin elderly side effects"}).json()
    answer = client.get(f"/api/explain/{search['search_id']}/1")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    stream = events(answer.text)
    pieces = [data["text"] for event, data in stream if event == "piece"]
    assert len(pieces) > 3 and pieces[0] == REPLY_OPENING
    event, done = stream[-1]
    assert event == "done" and done["explanation"] == "".join(pieces)
    assert done["quotes_ok"] is True and done["bad_quotes"] == [] and done["quotes"] == 1
    assert done["first_token_ms"] >= 0
    invented = client_for(explainer=FakeExplainer(invent=True), explain=1)
    search = invented.post("/api/search", json={"query": "metformin"}).json()
    done = events(invented.get(f"/api/explain/{search['search_id']}/1").text)[-1][1]
    assert done["quotes_ok"] is False and done["bad_quotes"] == ["metformin cures everything"]
    failing = client_for(explainer=FakeExplainer(fail=True), explain=1)
    search = failing.post("/api/search", json={"query": "metformin"}).json()
    assert events(failing.get(f"/api/explain/{search['search_id']}/1").text) == [
        ("failed", {"error": "the explanation model is not available"})]
    later = client_for(explainer=FakeExplainer(fail_later=True), explain=1)  # a decode round fails: the page is told
    search = later.post("/api/search", json={"query": "metformin"}).json()
    assert events(later.get(f"/api/explain/{search['search_id']}/1").text) == [
        ("piece", {"text": REPLY_OPENING}), ("piece", {"text": "Metformin"}),
        ("failed", {"error": "the explanation model failed mid-way"})]


def test_without_an_explainer_nothing_is_explained(client_for):
    client = client_for(explain=3)
    search = client.post("/api/search", json={"query": "metformin"}).json()
    assert search["explain"] == 0 and client.get(f"/api/explain/{search['search_id']}/1").status_code == 404


def test_host_names_are_checked_and_a_public_address_is_warned_about(client_for):
    client = client_for(allowed_hosts=["127.0.0.1", "localhost"])
    assert client.get("/").status_code == 400  # TestClient's Host is "testserver": a rebinding page's would be too
    assert client.get("/", headers={"host": "127.0.0.1:8000"}).status_code == 200
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert host_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        assert "--host" in host_warning(host) and "127.0.0.1" in host_warning(host)


def test_a_host_name_refused_is_answered_as_json_like_every_refusal(client_for):
    """Starlette's TrustedHostMiddleware answered "Invalid host header" as plain text; every other refusal is JSON."""
    client = client_for(allowed_hosts=["127.0.0.1", "localhost", "::1"])
    refused = client.post("/api/search", json={"query": "metformin"}, headers={"host": "evil.example:8000"})
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/json"
    assert refused.json() == {"error": "Host 'evil.example' is not served here: this server answers requests for "
                                       "127.0.0.1, ::1, localhost"}  # fmt: skip
    assert "Content-Security-Policy" in refused.headers
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host


def test_create_app_refusals():
    for bad in ({"k": 0}, {"k": MAX_K + 1}, {"explain": -1}, {"rerank": True}, {"evidence": 0}, {"scorer": "x"}):
        with pytest.raises(ConfigError):
            create_app(FakeEngine(), **bad)


def test_serve_binds_loopback_by_default_and_warns_about_other_addresses(monkeypatch, capsys):
    import uvicorn

    from archlab.cli import main
    from archlab.search.engine import SearchEngine

    runs = []
    monkeypatch.setattr(SearchEngine, "open", classmethod(lambda cls, index_dir, **kw: FakeEngine()))
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: runs.append((app, host, port)))
    assert main(["search", "serve", "INDEX", "--explain", "0"]) == 0
    app, host, port = runs[-1]
    assert (host, port) == ("127.0.0.1", 8000) and "warning" not in capsys.readouterr().err
    from fastapi.testclient import TestClient

    with TestClient(app) as client:  # Host names other than this machine's are refused
        assert client.get("/").status_code == 400
        assert client.get("/", headers={"host": "localhost:8000"}).status_code == 200
    assert main(["search", "serve", "INDEX", "--explain", "0", "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert runs[-1][1:] == ("0.0.0.0", 8123) and "warning: --host 0.0.0.0 serves the index" in capsys.readouterr().err
    assert main(["search", "serve", "INDEX", "--k", "0"]) != 0
    assert "--k=0 must be >= 1" in capsys.readouterr().err
    assert main(["search", "serve", "INDEX", "--k", "51", "--explain", "0"]) != 0
    assert "k=51 must be an int in [1, 50]" in capsys.readouterr().err
    assert len(runs) == 2  # refused before serving
