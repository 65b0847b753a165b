"""``archlab attention``: maps of a preset, of seq2seq runs (cross-attention, RNNsearch alignments), errors."""

from __future__ import annotations

import json

import pytest

from archlab.cli import main

SEQ2SEQ_SETS = [
    "--set", "data.source=reverse", "--set", "data.n_train=64", "--set", "data.n_valid=8", "--set", "data.max_length=4",
    "--set", "train.batch_size=8", "--set", "train.warmup=1", "--set", "train.steps=2", "--set", "train.progress=false",
]  # fmt: skip


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def written(capsys, *argv) -> dict:
    code, out, err = run(capsys, "attention", *argv, "--json")
    assert code == 0, err
    result = json.loads(out)
    data = json.loads(open(result["files"][-1]).read())
    return {**result, "maps": data["maps"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention-runs")
    assert main(["train", "transformer-tiny", "--out", str(root / "transformer-tiny"), "--set", "model.n_layers=1",
                 *SEQ2SEQ_SETS]) == 0  # fmt: skip
    assert main(["train", "rnnsearch-small", "--out", str(root / "rnnsearch-small"), *SEQ2SEQ_SETS]) == 0
    return root


def test_a_preset_gives_one_png_per_layer_with_its_tokens(capsys, tmp_path):
    result = written(capsys, "gpt-nano", "--text", "to be", "--out", tmp_path)
    assert [f.rsplit(".", 1)[-1] for f in result["files"]] == ["png"] * 3 + ["json"]
    assert result["maps"][0]["queries"] == ["t", "o", "\u2423", "b", "e"] and result["maps"][0]["heads"] == 3
    assert "random weights" in result["notes"][0]
    code, out, _ = run(capsys, "attention", "gpt-nano", "--text", "to be", "--layer", "2", "--head", "0",
                       "--out", tmp_path / "one")  # fmt: skip
    assert code == 0 and "1 PNG(s)" in out


def test_encoder_decoder_run_shows_cross_attention_between_output_and_source(capsys, runs, tmp_path):
    result = written(capsys, runs / "transformer-tiny", "--text", "abc", "--out", tmp_path)
    kinds = [m["kind"] for m in result["maps"]]
    assert kinds == ["self", "self", "cross"]  # encoder, decoder self, decoder cross (one layer each)
    cross = result["maps"][2]
    assert cross["keys"] == ["a", "b", "c"] and cross["queries"][-1] == "</s>"  # rows: the produced tokens
    assert result["notes"][0].startswith("output: ")


def test_rnnsearch_run_shows_its_alignment(capsys, runs, tmp_path):
    result = written(capsys, runs / "rnnsearch-small", "--text", "abcd", "--out", tmp_path)
    (alignment,) = result["maps"]
    assert alignment["kind"] == "alignment" and alignment["keys"] == ["a", "b", "c", "d"] and alignment["heads"] == 1
    for row in alignment["weights"][0]:
        assert abs(sum(row) - 1) < 1e-4


@pytest.mark.parametrize(
    "argv, words",
    [
        (["gpt-nano", "--text", "ab", "--layer", "7"], "--layer 7 is out of range: the attention layers are 0..2"),
        (["gpt-nano", "--text", "ab", "--head", "3"], "--head 3 is out of range"),
        (["gpt-nano"], "--text is required"),
        (["nosuch", "--text", "ab"], "'nosuch' is neither a run folder"),
        (["rnnenc-small", "--text", "ab"], "RNNenc: it has no attention"),
    ],
)
def test_errors_are_one_line_and_write_nothing(capsys, tmp_path, argv, words):
    code, out, err = run(capsys, "attention", *argv, "--out", tmp_path / "maps")
    assert code == 2 and out == "" and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "maps").exists()
