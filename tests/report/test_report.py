"""archlab.report: every claim on the index, a page per lab, local links and images only, escaped text."""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from archlab.cli import main
from archlab.errors import ConfigError, DataError
from archlab.labs import list_labs
from archlab.report import build_report

sys.path.insert(0, str(Path(__file__).parent))
from lab_results import HOSTILE, result  # noqa: E402

LINK = re.compile(r'(?:href|src)="([^"]*)"')


@pytest.fixture(scope="module")
def report(labs_dir, tmp_path_factory):
    return build_report(labs_dir, tmp_path_factory.mktemp("report") / "site")


def test_the_index_lists_every_claim_with_source_verdict_and_thumbnail(report, labs_dir):
    index = report.read_text()
    labs = list_labs()
    for lab in labs:
        assert f'href="lab-{lab.name}.html"' in index and html.escape(lab.source) in index
    assert index.count('class="verdict') == len(labs) + 3  # one per row, plus the summary's three kinds
    assert index.count('<img class="thumb"') == 2 and f'src="{labs[0].name}-thumb.png"' in index
    assert ">supported</span>" in index and ">undecided</span>" in index and ">not run</span>" in index
    thumb = report.parent / f"{labs[0].name}-thumb.png"
    from PIL import Image

    with Image.open(thumb) as image:
        assert image.width == 240


def test_a_lab_page_has_claim_plot_table_criterion_finding_notes_and_maps(report):
    second = list_labs()[1]
    text = (report.parent / f"lab-{second.name}.html").read_text()
    for part in (html.escape(second.claim), f'src="{second.name}-plot.png"', "<th>model</th>", "x &gt;= 1", "x = 2",
                 "<h2>Attention maps</h2>", f'src="{second.name}-map-0.png"', "Undecided:"):  # fmt: skip
        assert part in text, part
    first = (report.parent / f"lab-{list_labs()[0].name}.html").read_text()
    assert '<td class="num">1.235e+05</td>' not in first and '<td class="num">123,456</td>' in first
    not_run = (report.parent / f"lab-{list_labs()[2].name}.html").read_text()
    assert "Not run yet" in not_run


def test_text_from_results_is_escaped_and_nothing_is_fetched(report):
    for page in report.parent.glob("*.html"):
        text = page.read_text()
        assert HOSTILE not in text and "<script" not in text, page.name
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text), page.name  # no network at view time
    second = (report.parent / f"lab-{list_labs()[1].name}.html").read_text()
    assert html.escape(HOSTILE) in second


def test_every_link_and_image_resolves_to_a_file_of_the_report(report):
    for page in report.parent.glob("*.html"):
        for target in LINK.findall(page.read_text()):
            if target.startswith("data:"):
                continue
            assert (report.parent / html.unescape(target)).is_file(), (page.name, target)


def test_a_result_of_a_lab_no_longer_registered_is_still_shown(labs_dir, tmp_path):
    labs = tmp_path / "labs"
    shutil.copytree(labs_dir, labs)
    (labs / "old-lab").mkdir()
    (labs / "old-lab" / "result.json").write_text(json.dumps({**result(list_labs()[0].name, "not supported"),
                                                              "lab": "old-lab", "claim": "an old claim"}))  # fmt: skip
    index = build_report(labs, tmp_path / "site").read_text()
    assert "an old claim" in index and "(no longer registered)" in index
    assert (tmp_path / "site" / "lab-old-lab.html").is_file()


def test_a_quick_run_that_cannot_decide_reads_undecided_quick(labs_dir, tmp_path):
    labs = tmp_path / "labs"
    shutil.copytree(labs_dir, labs)
    second = list_labs()[1].name  # undecided in the fixture (a full run); a quick one reads "undecided (quick)"
    data = json.loads((labs / second / "result.json").read_text())
    (labs / second / "result.json").write_text(json.dumps({**data, "quick": True}))
    index = build_report(labs, tmp_path / "site").read_text()
    assert ">undecided (quick)</span>" in index and index.count(">undecided</span>") == 1  # the summary's kind
    assert ">undecided (quick)</span>" in (tmp_path / "site" / f"lab-{second}.html").read_text()


def test_bad_results_and_folders_are_refused_naming_the_file(labs_dir, tmp_path):
    labs = tmp_path / "labs"
    shutil.copytree(labs_dir, labs)
    name = list_labs()[0].name
    (labs / name / "result.json").write_text("{not json")
    with pytest.raises(DataError, match=rf"{name}/result.json: not a readable lab result"):
        build_report(labs, tmp_path / "a")
    (labs / name / "result.json").write_text(json.dumps({"lab": name}))
    with pytest.raises(DataError, match=r"missing field\(s\) claim, source, verdict"):
        build_report(labs, tmp_path / "a")
    (labs / name / "result.json").write_text(json.dumps(result(name, "maybe")))
    with pytest.raises(DataError, match="verdict 'maybe' is not one of"):
        build_report(labs, tmp_path / "a")
    with pytest.raises(ConfigError, match="is not a folder"):
        build_report(tmp_path / "missing", tmp_path / "a")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        build_report(labs_dir, other)
    assert (other / "keep.txt").read_text() == "mine"


def test_the_command_writes_the_report_and_rewrites_it(capsys, labs_dir, tmp_path):
    for _ in range(2):  # the second run replaces the first report
        assert main(["report", "--labs", str(labs_dir), "--out", str(tmp_path / "site")]) == 0
        out = capsys.readouterr().out
        assert f"report of 2 lab result(s) ({len(list_labs())} claims) written: {tmp_path / 'site' / 'index.html'}" in out
    assert main(["report", "--labs", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "archlab: error: --labs" in capsys.readouterr().err
