"""The labs report in a real headless browser (Debian's chromium through Playwright, tests/browser.py): every page
loads from disk without a console error or a failed request and requests nothing but local files (no network at
view time), every image renders (``naturalWidth > 0``), every link leads to a page that loads, and hostile text
from a result file stays text. Screenshots of the index and of a lab
page are saved (to ``$ARCHLAB_SCREENSHOTS`` when set, else the test's folder) and their paths printed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from browser import open_page  # noqa: E402
from lab_results import HOSTILE  # noqa: E402

from archlab.labs import list_labs  # noqa: E402
from archlab.report import build_report  # noqa: E402

IMAGES = "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
LINKS = "Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("ARCHLAB_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_loaded(page, url: str) -> list[str]:
    """Open ``url``; assert no problem and every image rendered; return the page's link targets."""
    page.goto(url)
    page.wait_for_load_state("load")
    images = page.evaluate(IMAGES)
    broken = [src for src, ok in images if not ok]
    assert not broken, (url, broken)
    assert not page.archlab_problems, (url, page.archlab_problems)
    return images, page.evaluate(LINKS)


def test_every_page_loads_renders_its_images_and_links_resolve(labs_dir, tmp_path, shots):
    index = build_report(labs_dir, tmp_path / "site")
    with open_page(width=1280, height=900) as page:
        fetched = []  # every request the pages make: only the report's own files, nothing from a network
        page.on("request", lambda request: fetched.append(request.url))
        images, links = check_loaded(page, index.as_uri())
        assert len(images) == 2  # the two thumbnails
        pages = sorted({link.split("#")[0] for link in links if link.startswith("file:")})
        assert len(pages) == len(list_labs())  # one page per claim
        page.screenshot(path=str(shots / "report-index.png"), full_page=False)
        seen = 0
        for url in pages:
            _, more = check_loaded(page, url)
            assert all(Path(link.removeprefix("file://")).is_file() for link in more if link.startswith("file:"))
            seen += 1
        second = list_labs()[1].name
        images, _ = check_loaded(page, (tmp_path / "site" / f"lab-{second}.html").as_uri())
        assert len(images) == 2  # the plot and the attention map
        assert HOSTILE in page.inner_text("body")  # shown as text, not run or parsed
        assert page.evaluate("document.querySelectorAll('script').length") == 0
        page.screenshot(path=str(shots / "report-lab.png"), full_page=True)
    assert seen == len(list_labs())
    assert fetched and all(url.startswith(("file:", "data:")) for url in fetched), fetched
    print(f"\nscreenshots: {shots / 'report-index.png'}, {shots / 'report-lab.png'}")
