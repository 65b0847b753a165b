"""The lab framework: registry, run_lab (seeding, files), reports, and the `archlab lab` command."""

import json
import random

import numpy as np
import pytest
import torch

from archlab.cli import main
from archlab.errors import ConfigError
from archlab.labs import (
    LABS,
    QUICK_UNDECIDED,
    VERDICTS,
    LabResult,
    get_lab,
    list_labs,
    register_lab,
    run_lab,
    verdict_label,
)  # fmt: skip
from archlab.labs.registry import progress_bar


@pytest.fixture
def fake_labs(monkeypatch):
    """Two registered fake labs; the real registry is restored afterwards."""
    monkeypatch.setattr("archlab.labs.registry.LABS", {}, raising=True)
    import archlab.labs.registry as registry

    calls = []

    @register_lab("fake-draw", claim="a draw is in [0, 1)", source="test")
    def draw(quick, seed):
        value = torch.rand(()).item()  # from the seed run_lab sets
        random.random(), np.random.rand()  # the other generators too
        calls.append((quick, seed, value))

        def plot(fig):
            fig.subplots().plot([0, 1], [0, value])

        return LabResult(["quick", "value"], [[quick, value]], "0 <= value < 1", 0 <= value < 1, f"drew {value:.3f}",
                         plot=plot)  # fmt: skip

    @register_lab("fake-false", claim="never", source="test")
    def never(quick, seed):
        return LabResult(["x"], [[float("inf")]], "x is finite", False, "x was inf")

    return registry, calls


def test_real_registry_lists_sorted_labs_with_claims_and_sources():
    names = [lab.name for lab in list_labs()]
    assert names == sorted(names) and "sqrt-dk" in names
    assert all(lab.claim and lab.source for lab in list_labs())
    assert get_lab("sqrt-dk") is LABS["sqrt-dk"]


def test_unknown_lab_names_the_closest(fake_labs):
    with pytest.raises(ConfigError, match=r"unknown lab 'fake-drew' \(did you mean 'fake-draw'\?\)"):
        run_lab("fake-drew")


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0", 2**32, 10**23])  # 10**23: torch's "Overflow" traceback
def test_bad_seed_is_refused_before_running(fake_labs, seed):
    _, calls = fake_labs
    with pytest.raises(ConfigError, match="seed=.* must be an int >= 0"):
        run_lab("fake-draw", seed=seed)
    assert calls == []


def test_the_cli_refuses_a_bad_seed_before_saying_a_lab_runs(fake_labs, capsys, tmp_path):
    _, calls = fake_labs
    assert main(["lab", "fake-draw", "--seed", "-1", "--out", str(tmp_path / "labs")]) == 2
    assert capsys.readouterr().err == ("archlab: error: seed=-1 must be an int >= 0 and < 2**32 (the seeds NumPy's "
                                       "global generator takes)\n")  # fmt: skip
    assert calls == [] and not (tmp_path / "labs").exists()


def test_registering_a_name_twice_is_refused(fake_labs):
    with pytest.raises(ConfigError, match="registered twice"):
        register_lab("fake-draw", claim="again", source="test")(lambda quick, seed: None)


def test_rows_must_match_the_columns():
    with pytest.raises(ConfigError, match="2 cells for 1 columns"):
        LabResult(["a"], [[1, 2]], "c", True, "f")


def test_run_is_seeded_and_leaves_the_callers_rng_alone(fake_labs):
    _, calls = fake_labs
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected_next = torch.rand(()).item(), random.random(), np.random.rand()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    a = run_lab("fake-draw", seed=7)
    # the caller's streams continue as if no lab ran
    assert (torch.rand(()).item(), random.random(), np.random.rand()) == expected_next
    b = run_lab("fake-draw", seed=7, quick=True)
    c = run_lab("fake-draw", seed=8)
    assert a.result.rows[0][1] == b.result.rows[0][1] != c.result.rows[0][1]
    assert [call[:2] for call in calls] == [(False, 7), (True, 7), (False, 8)]


def test_files_are_written_and_replaced_whole(fake_labs, tmp_path):
    report = run_lab("fake-draw", seed=1, out=tmp_path)
    folder = tmp_path / "fake-draw"
    assert sorted(p.name for p in folder.iterdir()) == ["plot.png", "result.json"]
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((folder / "result.json").read_text())
    assert data["verdict"] == "supported" and data["seed"] == 1 and data["rows"] == [[False, report.result.rows[0][1]]]
    assert data["files"] == [str(folder / "result.json"), str(folder / "plot.png")]
    run_lab("fake-false", out=tmp_path)  # no plot: result.json only; infinities saved as strings
    saved = json.loads((tmp_path / "fake-false" / "result.json").read_text())
    assert saved["verdict"] == "not supported" and saved["rows"] == [["inf"]]
    run_lab("fake-draw", seed=2, out=tmp_path)  # a second run replaces the folder
    assert json.loads((folder / "result.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-draw", "fake-false"]  # no temporary left


def test_describe_shows_claim_table_criterion_and_verdict(fake_labs):
    text = run_lab("fake-false").describe()
    for part in ("fake-false: never", "criterion: x is finite", "verdict:   NOT SUPPORTED: x was inf", "inf"):
        assert part in text


def test_cli_lists_runs_and_refuses_unknown_names_first(fake_labs, tmp_path, capsys):
    _, calls = fake_labs
    assert main(["lab"]) == 0 and "fake-draw" in capsys.readouterr().out
    assert main(["lab", "list", "--json"]) == 0
    assert [lab["name"] for lab in json.loads(capsys.readouterr().out)] == ["fake-draw", "fake-false"]
    assert main(["lab", "fake-draw", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown lab 'nope'" in capsys.readouterr().err and calls == []  # nothing ran
    assert main(["lab", "all", "--quick", "--seed", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verdict:   SUPPORTED" in out and "fake-false  not supported" in out
    assert main(["lab", "fake-false", "--json", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["verdict"] == "not supported"


def test_an_undecided_result_says_why_whatever_its_numbers(fake_labs):
    """A lab whose models learned too little gives no verdict the full run could contradict."""

    @register_lab("fake-undecided", claim="x reaches 2", source="test")
    def reach(quick, seed):
        x = 1 if quick else 3
        why = "x grows with the steps and a quick run takes 1: too few to judge" if quick else ""
        return LabResult(["x"], [[x]], "x >= 2", x >= 2, f"x was {x}", undecided=why)

    assert VERDICTS == ("supported", "not supported", "undecided")
    quick = run_lab("fake-undecided", quick=True)
    assert quick.result.verdict == "undecided" and not quick.result.supported  # the numbers alone would say "no"
    data = quick.to_dict()
    assert data["verdict"] == "undecided" and data["undecided"].startswith("x grows with the steps")
    why = "x grows with the steps and a quick run takes 1: too few to judge"
    assert f"verdict:   UNDECIDED (QUICK): {why}; x was 1" in quick.describe()
    assert quick.verdict_label == verdict_label("undecided", True) == QUICK_UNDECIDED == "undecided (quick)"
    full = run_lab("fake-undecided")
    assert full.result.verdict == "supported" and full.to_dict()["undecided"] == ""
    assert full.verdict_label == "supported" and verdict_label("undecided", False) == "undecided"  # a full run: plain


def test_a_quick_run_that_cannot_decide_says_undecided_quick_in_text_plot_and_summary(fake_labs, tmp_path, capsys):
    @register_lab("fake-short", claim="x reaches 2", source="test")
    def short(quick, seed):
        def plot(fig):
            fig.subplots().plot([0, 1], [0, 1])

        why = "too short" if quick else ""
        return LabResult(["x"], [[1]], "x >= 2", False, "x was 1", plot=plot, undecided=why)

    assert main(["lab", "fake-short", "fake-false", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verdict:   UNDECIDED (QUICK): too short" in out and "fake-short  undecided (quick)" in out
    assert json.loads((tmp_path / "fake-short" / "result.json").read_text())["verdict"] == "undecided"  # kept plain


def test_training_progress_shows_on_stderr_only_when_asked(fake_labs, capsys):
    @register_lab("fake-train", claim="it trains", source="test")
    def train(quick, seed):
        with progress_bar(3, "training fake") as bar:
            for _ in range(3):
                bar.update()
        return LabResult(["steps"], [[3]], "steps == 3", True, "3 steps")

    run_lab("fake-train")  # the library default (and the tests): quiet
    assert capsys.readouterr() == ("", "")
    run_lab("fake-train", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "training fake" in err
    assert main(["lab", "fake-train"]) == 0
    out, err = capsys.readouterr()
    assert "running fake-train (full) ..." in err and "training fake" in err and "verdict:   SUPPORTED" in out
    assert main(["lab", "fake-train", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)[0]["verdict"] == "supported"
