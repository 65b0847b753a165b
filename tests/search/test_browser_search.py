"""The search page in a real headless browser (Debian's chromium through Playwright, tests/browser.py).

A small index is built in the test (archlab's MiniLM, exact FAISS search, hybrid with BM25) over documents one of
which holds ``<script>alert(1)</script>`` and an ``<img onerror>``; uvicorn serves it on a free loopback port in a
thread. The explainer is the real :class:`~archlab.search.explain.Explainer` over a random tiny Llama (a GGUF file
with a byte-level ChatML tokenizer; its words are noise, its path is the real one: prompt, prompt-lookup
speculative decoding, the quote guard). The engine has a re-ranker whose saved first-stage weight is 1, so it
skips re-ranking and says why; the reason is given a hostile tail here. The test types a query, sees results with
highlighted evidence, sees the skipped stage's reason, sees an explanation arrive, checks that the hostile document
and reason show as text (no dialog, no console error, no element made from them), saves a screenshot (its path is
printed), and sees a refused search's reason.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
from browser import open_page  # noqa: E402
from gguf_files import TINY_TOKENIZER, write_llama_gguf  # noqa: E402

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'
DOCS = [
    ("metformin", "Metformin in older adults", "Metformin is the first-line drug for type 2 diabetes. In elderly "
     "patients, gastrointestinal side effects such as nausea and diarrhoea are common. Lactic acidosis is rare."),
    ("insulin", "Insulin therapy", "Insulin lowers blood glucose. Hypoglycaemia is its main side effect in elderly "
     "patients."),
    ("hostile", f"Side effects {HOSTILE}", f"This abstract on side effects holds {HOSTILE} in its text. It must "
     "show as text."),
    ("json", "json.loads", "Deserialize a JSON document to a Python object. Invalid JSON raises JSONDecodeError."),
    ("aspirin", "Aspirin", "Aspirin reduces the risk of heart attack. Bleeding is a side effect."),
]  # fmt: skip


class KeepsFirstStage:
    """A re-ranker whose saved fusion weight is 1 (``adapt``'s "does not beat the first stage"): never run."""

    first_stage_weight = 1.0

    def score(self, query, docs):
        raise AssertionError("a re-ranker with first-stage weight 1 must not be run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``http://127.0.0.1:PORT/`` of the page over a small hybrid index and a tiny-Llama explainer."""
    import json

    import uvicorn

    from archlab.models.llama import Llama, LlamaConfig
    from archlab.search import engine as engine_module
    from archlab.search.corpus import load_corpus
    from archlab.search.engine import SearchEngine
    from archlab.search.explain import Explainer
    from archlab.search.index import build_index
    from archlab.search.serve import create_app

    folder = tmp_path_factory.mktemp("browser")
    corpus_file = folder / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in DOCS))
    build_index(load_corpus(corpus_file), folder / "index", index="flat", hybrid=True, precision="fp32")
    engine = SearchEngine.open(folder / "index", reranker=KeepsFirstStage())

    torch.manual_seed(0)
    tokens = TINY_TOKENIZER["tokenizer.ggml.tokens"]
    config = LlamaConfig(vocab_size=len(tokens), max_len=1024, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=48)
    model = Llama(config).eval()
    explainer = Explainer(write_llama_gguf(folder / "tiny.gguf", model, TINY_TOKENIZER), max_new_tokens=24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ARCHLAB_CACHE", str(folder / "cache"))  # the GGUF file's conversion goes here
        explainer.load()

    port = _free_port()
    app = create_app(engine, explainer=explainer, explain=2, rerank=3, allowed_hosts=["127.0.0.1"])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    with pytest.MonkeyPatch.context() as patch:  # the engine's reason, with a hostile tail, reaches the page
        patch.setattr(engine_module, "KEPT_FIRST_STAGE", f"{engine_module.KEPT_FIRST_STAGE} {HOSTILE}")
        yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


def test_search_page_shows_results_evidence_and_a_streamed_explanation_and_escapes_text(served, tmp_path):
    with open_page() as page:
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(served)
        page.fill("#query", "side effects of metformin in elderly patients")
        page.press("#query", "Enter")
        page.wait_for_selector("li.hit", timeout=30_000)
        titles = page.locator("li.hit .title").all_text_contents()
        assert titles[0] == "Metformin in older adults" and len(titles) == len(DOCS)
        marks = page.locator("li.hit").first.locator("mark").all_text_contents()  # the evidence, highlighted
        assert any("gastrointestinal side effects" in m for m in marks)

        # the skipped re-ranking is shown with the engine's reason, as text
        from archlab.search.engine import KEPT_FIRST_STAGE

        skipped = page.locator("#skipped")
        assert skipped.is_visible()
        assert skipped.text_content() == f"rerank skipped: {KEPT_FIRST_STAGE}"
        assert skipped.text_content().endswith(HOSTILE) and page.locator("#skipped *").count() == 0

        # the explanations arrive (streamed), each with the quote guard's verdict
        page.wait_for_selector('#results[data-state="explained"]', timeout=60_000)
        assert page.locator(".explanation .guard").count() == 2
        first = page.locator('li.hit[data-rank="1"] .explanation')
        assert first.text_content().startswith('It says "')
        assert page.locator(".explanation").count() == 2

        # the hostile document shows as text: no dialog, no element made from it, no console error
        hostile = page.locator("li.hit", has_text="holds <script>")
        assert hostile.count() == 1
        assert f"Side effects {HOSTILE}" in hostile.locator(".title").text_content()
        assert HOSTILE in hostile.locator(".text").text_content()
        assert page.locator("#results script, #results img, header script, header img").count() == 0
        assert dialogs == [], dialogs
        assert page.archlab_problems == [], page.archlab_problems

        shot = tmp_path / "search_page.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        # a refused search says why (the server's JSON error), and the page stays usable
        page.evaluate("document.getElementById('query').removeAttribute('maxlength')")
        page.fill("#query", "x" * 1001)
        page.press("#query", "Enter")
        page.wait_for_selector("#status.error", timeout=10_000)
        assert "limit is 1000" in page.locator("#status").text_content()
        assert [p for p in page.archlab_problems if "422" not in p] == []  # the refused request itself is logged

