"""``archlab report`` on hostile lab folders: a one-line error naming the file, or a bounded report, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from lab_results import result

from archlab.cli import main
from archlab.errors import ConfigError, DataError
from archlab.labs import list_labs
from archlab.report import build_report


@pytest.fixture
def labs(labs_dir, tmp_path):
    copy = tmp_path / "labs"
    shutil.copytree(labs_dir, copy)
    return copy


def first(labs):
    return labs / list_labs()[0].name


@pytest.mark.parametrize("content", [b"not a png", b""], ids=["garbage", "empty"])
def test_a_plot_that_is_not_an_image_is_named_as_a_one_line_error(capsys, labs, tmp_path, content):
    (first(labs) / "plot.png").write_bytes(content)
    assert main(["report", "--labs", str(labs), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert f"{first(labs) / 'plot.png'}: not a readable plot image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("change, words", [
    ({"columns": 5}, "columns must be a list of column names, got 5"),
    ({"columns": None}, "columns must be a list of column names, got null"),
    ({"verdict": ["supported"]}, r'verdict must be a string, got \["supported"\]'),
])  # fmt: skip
def test_fields_of_the_wrong_type_are_refused_naming_file_and_field(labs, tmp_path, change, words):
    name = list_labs()[0].name
    (labs / name / "result.json").write_text(json.dumps({**result(name, "supported"), **change}))
    with pytest.raises(DataError, match=rf"{name}/result.json: {words}"):
        build_report(labs, tmp_path / "site")


def test_a_folder_named_like_an_image_is_not_taken_for_a_map(labs, tmp_path):
    (first(labs) / "extra.png").mkdir()
    assert build_report(labs, tmp_path / "site").is_file()


def test_an_out_under_a_file_is_refused_naming_the_file(labs, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"lies under '.*afile', a file"):
        build_report(labs, tmp_path / "afile" / "site")


def test_a_very_tall_plot_gives_a_bounded_thumbnail(labs, tmp_path):
    from PIL import Image

    Image.new("RGB", (1, 20000)).save(first(labs) / "plot.png")  # resized to 240 wide: 4.8M rows, 3.5 GB before
    index = build_report(labs, tmp_path / "site")
    with Image.open(index.parent / f"{list_labs()[0].name}-thumb.png") as thumb:
        assert thumb.height == 960 and thumb.width >= 1
