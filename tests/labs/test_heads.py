"""head-specialisation: the head classifier on patterns whose kind is known, the data's structure, the quick run."""

import json

import pytest
import torch

from archlab.errors import ShapeError
from archlab.labs import VERDICTS, run_lab
from archlab.labs.head_specialisation import (
    KINDS,
    PERIODS,
    PROBE_PERIODS,
    VOCAB,
    census,
    classify_head,
    combine,
    head_scores,
    probes,
    repeat_sequence,
)
from archlab.models.gpt import GPT, GPTConfig

N, P = 24, 10


def pattern(target) -> torch.Tensor:
    """A causal ``[N, N]`` pattern: each row ``i`` puts all its weight on key ``target(i)`` (clamped into 0..i)."""
    w = torch.zeros(N, N)
    for i in range(N):
        w[i, min(max(target(i), 0), i)] = 1.0
    return w


def uniform() -> torch.Tensor:
    w = torch.ones(N, N).tril()
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize(
    "weights, kind",
    [
        (pattern(lambda i: i - 1), "previous-token"),
        (pattern(lambda i: i - P + 1 if i >= P else i - 1), "copy/induction"),  # induction: after the earlier copy
        (pattern(lambda i: i - P if i >= P else 0), "copy/induction"),  # copy: the earlier occurrence itself
        (pattern(lambda i: i - 2), "positional/local"),  # two back: a fixed offset, not the previous token
        (pattern(lambda i: i - 11), "positional/local"),  # a far fixed offset
        (pattern(lambda i: i), "positional/local"),  # itself
        (pattern(lambda i: 0), "other"),  # parked on the first token
        (uniform(), "other"),
    ],
)
def test_known_patterns_are_classified_as_their_kind(weights, kind):
    assert classify_head(head_scores(weights, P)) == kind


def test_a_fixed_offset_that_matches_one_period_is_not_induction():
    """A head at offset -(P-1) looks like induction on probes of period P, not on another period: the census combines
    the periods with the smaller copying score, so it is positional."""
    fixed = pattern(lambda i: i - P + 1)
    assert classify_head(head_scores(fixed, P)) == "copy/induction"
    other = P + 4
    true_induction = {p: pattern(lambda i, p=p: i - p + 1 if i >= p else i - 1) for p in (P, other)}
    assert classify_head(combine([head_scores(fixed, P), head_scores(fixed, other)])) == "positional/local"
    assert classify_head(combine([head_scores(true_induction[p], p) for p in (P, other)])) == "copy/induction"


def test_scores_of_exact_patterns_and_bad_shapes():
    scores = head_scores(pattern(lambda i: i - 1), P)
    assert scores["previous"] == 1.0 and scores["induction"] == 0.0 and scores["local"] == 1.0
    batch = torch.stack([pattern(lambda i: i - 1), uniform()])  # averaged over leading dims
    assert head_scores(batch, P)["previous"] == pytest.approx((1 + head_scores(uniform(), P)["previous"]) / 2)
    with pytest.raises(ShapeError, match=r"\[\.\.\., N, N\]"):
        head_scores(torch.ones(3, 4), P)
    with pytest.raises(ShapeError, match="period=24 must be in"):
        head_scores(uniform(), N)


def test_the_data_has_the_structure_it_claims():
    g = torch.Generator().manual_seed(0)
    periods = []
    for _ in range(50):
        r = repeat_sequence(49, g)
        period = next(p for p in range(1, 49) if torch.equal(r[p:], r[:-p]))  # the smallest that repeats
        assert PERIODS[0] <= period <= PERIODS[1]
        periods.append(period)
    assert len(set(periods)) > 5  # the period varies: no fixed offset copies
    p = probes(3, 0, 9)
    assert p.shape == (3, 18) and torch.equal(p[:, :9], p[:, 9:])


def test_a_census_names_every_head_of_every_layer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, max_len=48, d_model=32, n_heads=2, n_layers=3, dropout=0.0,
                          attn_dropout=0.0))  # fmt: skip
    heads = census(model, {p: probes(4, p, p) for p in PROBE_PERIODS})
    assert [(h["layer"], h["head"]) for h in heads] == [(layer, h) for layer in range(3) for h in range(2)]
    assert all(h["kind"] in KINDS for h in heads)


def test_quick_run_gives_a_census_a_verdict_and_its_attention_maps(tmp_path):
    report = run_lab("head-specialisation", quick=True, out=tmp_path)
    result = report.result
    assert len(result.rows) == 8 and result.verdict in VERDICTS
    assert all(row[1] in KINDS and row[2] in KINDS for row in result.rows)
    if result.verdict != "supported":
        assert result.verdict == "undecided" and result.undecided  # the quick run never says "not supported"
    # the maps of the census, one PNG per layer with the probe's symbols on the axes, as `archlab attention` writes
    folder = tmp_path / "head-specialisation" / "attention"
    data = json.loads((folder / "attention.json").read_text())
    assert [m["layer"] for m in data["maps"]] == [0, 1] and all(m["heads"] == 4 for m in data["maps"])
    probe = [str(t) for t in probes(32, 7 + PROBE_PERIODS[0], PROBE_PERIODS[0])[0].tolist()]  # seed 0's first probe
    assert data["maps"][0]["queries"] == data["maps"][0]["keys"] == probe
    kinds = {f"{row[0][-1]} {row[2]}" for row in result.rows[:4]}  # layer 0's heads: "H kind"
    assert all(k in data["maps"][0]["title"] for k in kinds)
    assert all((folder / m["png"]).is_file() for m in data["maps"])
    assert sorted(str(f.relative_to(tmp_path)) for f in report.files) == sorted(
        [f"head-specialisation/{n}" for n in ("result.json", "plot.png")]
        + [f"head-specialisation/attention/{m['png']}" for m in data["maps"]]
        + ["head-specialisation/attention/attention.json"]
    )
