"""A real headless browser for the tests of archlab's web pages (the search page, the labs report).

Debian's ``chromium`` driven by Playwright (``executable_path``; Playwright downloads no browser of its own).
``open_page()`` yields a page whose console errors, page errors and failed requests are collected on
``page.archlab_problems`` so a test can assert that a page loaded cleanly.

Where chromium or playwright is missing, the tests that need them are skipped with the reason, except under CI
(``CI`` set), where a missing browser is a failure: ``make test`` installs chromium, so CI never skips them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The chromium executable; skip (outside CI) or fail (in CI) when chromium or playwright is missing."""
    path = chromium_path()
    problem = None
    if path is None:
        problem = "Debian's chromium is not installed (make test installs it: apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is not installed (it is in archlab's test extra)"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)
    return path


@contextlib.contextmanager
def open_page(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A fresh Playwright page in headless chromium; ``page.archlab_problems`` lists what went wrong."""
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
            page.archlab_problems = problems
            yield page
        finally:
            browser.close()
