"""ELMo through ``archlab train / eval``: token windows for the ``custom`` task, training, bit-exact resume, errors."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from archlab.data import LMWindows, TokenWindows, load_tokenizer
from archlab.errors import ConfigError, DataError
from archlab.models.elmo import ELMo
from archlab.train.run import RunSpec
from archlab.train.sources import TOKEN_WINDOW_KEYS

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the CLI helpers of test_cli_train
from test_cli_train import assert_resume_equals_straight, error_line, ok, run

EXAMPLE = Path(__file__).parents[2] / "examples" / "elmo_stdlib.json"


def tiny_text(path: Path, n_sentences: int = 600) -> Path:
    """Sentences of a small grammar (about 20 KB): a character biLM learns them in a few dozen steps."""
    rng = random.Random(0)
    subjects, verbs, objects = ["the cat", "a dog", "my friend", "the old man"], ["sees", "likes", "finds"], [
        "the ball", "a red box", "the garden", "some bread"]  # fmt: skip
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def elmo_sets(text: Path, *more: str) -> list[str]:
    sets = {"data.source": text, "data.tokenizer": "char", "data.seq_len": 24, "train.batch_size": 8,
            "train.warmup": 2, "train.lr": 0.01, "train.eval_batches": 4, "train.log_every": 5,
            "train.progress": "false"}  # fmt: skip
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")] + list(more)


# -- token windows: LMWindows' windows, kept whole -------------------------------------------------------------


def test_token_windows_are_the_lm_windows_whole():
    ids, valid = torch.arange(100) % 37, torch.arange(23) % 11
    lm = LMWindows(ids, seq_len=7, batch_size=6, seed=3, valid=valid)
    tw = TokenWindows(ids, seq_len=8, batch_size=6, seed=3, valid=valid)
    for step in (0, 5):
        w, b = lm.batch(step), tw.batch(step)
        assert list(b) == ["input_ids"] and b["input_ids"].shape == (6, 8)
        assert torch.equal(b["input_ids"], torch.cat([w["input_ids"], w["labels"][:, -1:]], dim=1))
    assert (tw.window, tw.seq_len) == (8, 7)
    next(tw), next(tw)
    assert tw.state_dict() == {"kind": "TokenWindows", "step": 2, "seed": 3, "batch_size": 6}
    # validation: windows every N - 1 = 7 tokens, 1 = real, the last row right-padded with id 0
    (batch,) = list(tw.eval_batches())
    rows, mask = batch["input_ids"], batch["attention_mask"]
    assert rows.shape == mask.shape == (4, 8) and mask.sum(1).tolist() == [8, 8, 8, 2]
    for k, (row, m) in enumerate(zip(rows.tolist(), mask.tolist())):
        real = [t for t, keep in zip(row, m) if keep]
        assert real == valid[7 * k : 7 * k + 8].tolist()  # the first token of each window ends the one before
    assert rows[3, 2:].eq(0).all()


def test_token_windows_sharded_are_the_single_process_batch():
    ids = torch.arange(500) % 50
    whole = TokenWindows(ids, seq_len=6, batch_size=4, seed=1).batch(2)["input_ids"]
    shards = [TokenWindows(ids, seq_len=6, batch_size=4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    parts = [shard.batch(2)["input_ids"] for shard in shards]
    assert torch.equal(torch.cat(parts), whole)


def test_token_windows_bad_input():
    with pytest.raises(ConfigError, match=r"seq_len=1 must be an integer >= 2"):
        TokenWindows(torch.arange(10), seq_len=1, batch_size=2)
    with pytest.raises(DataError, match=r"ids has 5 tokens; windows of seq_len=6 tokens need at least that many"):
        TokenWindows(torch.arange(5), seq_len=6, batch_size=2)


def test_elmo_declares_the_token_window_keys_it_reads():
    assert set(ELMo.batch_keys) == set(TOKEN_WINDOW_KEYS)


# -- train, eval, resume through the CLI ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def elmo_run(tmp_path_factory):
    from archlab.cli import main

    tmp = tmp_path_factory.mktemp("elmo")
    out_dir = tmp / "run"
    sets = elmo_sets(tiny_text(tmp / "tiny.txt"), "--set", "train.steps=40", "--set", "train.eval_every=20")
    code = main(["train", "elmo-small", "--out", str(out_dir), *map(str, sets)])
    assert code == 0
    return out_dir


def records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def test_elmo_trains_from_a_text_file_and_its_loss_falls(elmo_run):
    resolved = json.loads((elmo_run / "run.json").read_text())
    assert resolved["train"]["task"] == "custom" and resolved["data"]["tokenizer"] == "char"
    assert resolved["model"]["vocab_size"] == load_tokenizer(elmo_run).vocab_size < 256  # the char V, not the preset's
    assert [p.name for p in (elmo_run / "checkpoints").iterdir()] == ["step-00000040"]
    train, evals = records(elmo_run, "train"), records(elmo_run, "eval")
    assert [r["step"] for r in train] == list(range(5, 41, 5)) and [r["step"] for r in evals] == [20, 40]
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    for r in train + evals:
        assert r["loss"] == pytest.approx(r["forward_nll"] + r["backward_nll"], rel=1e-5)  # the joint biLM loss
    assert train[-1]["tokens"] == 8 * 24 and train[-1]["tokens_per_s"] > 0  # B N input positions per step
    chance = 2 * math.log(resolved["model"]["vocab_size"])  # uniform prediction in both directions
    assert losses[0] < chance + 0.5 and losses[-1] < 0.6 * losses[0], losses
    assert evals[1]["loss"] < evals[0]["loss"]


def test_train_prints_the_vocab_change_and_the_bilm_metrics(capsys, tmp_path):
    out = ok(capsys, "train", "elmo-small", "--out", tmp_path / "r", "--set", "train.steps=3",
             *elmo_sets(tiny_text(tmp_path / "t.txt")))  # fmt: skip
    assert "run elmo-small (family elmo, task custom)" in out
    assert "model: vocab_size 256 -> " in out and "(from the tokenizer)" in out
    assert re.search(r"^data: .*t\.txt, 0\.02 MB: [\d,]+ training / [\d,]+ validation tokens, char tokenizer V=\d+, "
                     r"rows of 24$", out, re.MULTILINE)  # fmt: skip
    last = [line for line in out.splitlines() if line.startswith("step 3: validation")]
    assert len(last) == 1 and "forward nll" in last[0] and "backward nll" in last[0] and "unigram baseline" in last[0]


def test_eval_reports_the_bilm_metrics_of_the_last_validation(capsys, elmo_run):
    last = records(elmo_run, "eval")[-1]
    result = json.loads(ok(capsys, "eval", elmo_run, "--json", "--max-batches", "4"))
    assert result["task"] == "custom" and result["checkpoint"].endswith("step-00000040")
    assert set(result["eval"]) == {"loss", "forward_nll", "backward_nll", "forward_ppl", "backward_ppl"}
    for key, value in result["eval"].items():
        assert value == pytest.approx(last[key], rel=1e-6)  # same checkpoint, same validation windows
    assert result["eval"]["forward_nll"] < result["unigram_loss"]  # it learned more than the letter frequencies
    text = ok(capsys, "eval", elmo_run, "--max-batches", "4")
    assert "validation loss" in text and "forward nll" in text and "(ppl" in text and "unigram baseline" in text
    line = error_line(capsys, "generate", elmo_run, "--prompt", "the")
    assert "generate is for lm and seq2seq runs; this one trains task 'custom'" in line


def test_resume_through_the_cli_is_bit_exact(capsys, tmp_path):
    text = tiny_text(tmp_path / "t.txt")
    sets = elmo_sets(text, "--set", "train.schedule=constant", "--set", "train.eval_every=0",
                     "--set", "model.dropout=0.1")  # fmt: skip  (dropout: the RNG state must come back too)
    ok(capsys, "train", "elmo-small", "--out", tmp_path / "straight", "--set", "train.steps=6", *sets)
    ok(capsys, "train", "elmo-small", "--out", tmp_path / "split", "--set", "train.steps=3", *sets)
    assert_resume_equals_straight(capsys, tmp_path)
    line = error_line(capsys, "train", tmp_path / "split", "--resume", "--set", "train.steps=8",
                      "--set", "data.seq_len=16")  # fmt: skip
    assert "cannot resume" in line and "data.seq_len: 24 -> 16" in line


# -- errors: one clear line, before any work -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, words",
    [
        (["data.source=dates"], ("data.source='dates' (a synthetic sequence-to-sequence task) does not fit preset "
                                 "elmo-small (family elmo), which trains on task 'custom': its data is stdlib or a "
                                 ".txt/.jsonl/.csv text file, cut into token windows")),
        (["data.source=digits"], "data.source='digits' (the 8x8 digits images) does not fit preset elmo-small"),
        (["data.seq_len=1"], "data.seq_len=1: a token window needs >= 2 tokens (one predicts another)"),
        (["data.tokenizer=wordpiece"], "tokenizer: unknown value 'wordpiece'"),
    ],
)  # fmt: skip
def test_a_data_section_elmo_cannot_use_is_one_clear_line(capsys, tmp_path, sets, words):
    argv = ["train", "elmo-small", "--out", tmp_path / "r"] + [a for s in sets for a in ("--set", s)]
    assert words in error_line(capsys, *argv)
    assert not (tmp_path / "r").exists()


def test_a_file_too_short_for_one_window(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("ab\n" * 4 + "cd\n")
    short = tmp_path / "short.txt"
    sets = ["--set", f"data.source={short}", "--set", "data.tokenizer=char", "--set", "data.seq_len=64",
            "--set", "train.warmup=1"]  # fmt: skip
    line = error_line(capsys, "train", "elmo-small", "--out", tmp_path / "r", *sets)
    assert "windows of seq_len=64 tokens need at least that many" in line


def test_a_custom_model_whose_batches_archlab_cannot_build_names_its_family(capsys, tmp_path):
    line = error_line(capsys, "train", "gpt-nano", "--out", tmp_path / "r", "--set", "train.task=custom")
    assert "preset gpt-nano (family gpt) trains with task 'custom'" in line
    assert "GPT declares no batch_keys" in line and "train it with archlab.train.Trainer and your own batches" in line


# -- the example run ---------------------------------------------------------------------------------------------


def test_the_example_is_a_valid_elmo_run():
    spec = RunSpec.load(EXAMPLE)
    assert spec.family.name == "elmo" and spec.data_config().source == "stdlib"


@pytest.mark.slow
def test_the_example_trains_below_the_unigram_baseline(capsys, tmp_path):
    code, out, err = run(capsys, "train", EXAMPLE, "--out", tmp_path / "elmo", "--json",
                         "--set", "train.progress=false")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == json.loads(EXAMPLE.read_text())["train"]["steps"]
    assert summary["eval"]["forward_nll"] < summary["unigram_loss"] - 0.5, summary
    assert summary["eval"]["backward_nll"] < summary["unigram_loss"] - 0.5, summary
