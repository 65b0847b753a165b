"""``archlab train / generate / eval`` on tiny runs: the run folder, bit-exact resume, errors as one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from archlab.cli import main

GPT_SETS = [
    "--set", "model.n_layers=2", "--set", "data.max_bytes=100000", "--set", "data.vocab_size=300",
    "--set", "data.seq_len=16", "--set", "train.batch_size=4", "--set", "train.warmup=1",
    "--set", "train.eval_batches=2", "--set", "train.progress=false",
]  # fmt: skip
SEQ2SEQ_SETS = [
    "--set", "data.source=reverse", "--set", "data.n_train=64", "--set", "data.n_valid=8", "--set", "data.max_length=4",
    "--set", "model.n_layers=1", "--set", "train.batch_size=8", "--set", "train.warmup=1",
    "--set", "train.progress=false",
]  # fmt: skip


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def error_line(capsys, *argv: str) -> str:
    """The one ``archlab: error: ...`` line of a failing command (exit code 2, nothing on stdout)."""
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("archlab: error: "), (code, out, err)
    return lines[0]


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def assert_resume_equals_straight(capsys, tmp_path) -> None:
    """``tmp_path / "split"`` (3 steps) resumed to 6 equals ``tmp_path / "straight"`` (6 steps), bit for bit."""
    ok(capsys, "train", tmp_path / "split", "--resume", "--set", "train.steps=6")  # the folder's own run.json
    straight, resumed = weights(tmp_path / "straight", 6), weights(tmp_path / "split", 6)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    at_3 = weights(tmp_path / "split", 3)
    assert not any(torch.equal(at_3[k], resumed[k]) for k in resumed if k.endswith("weight"))  # it did train on


# -- lm: train, then generate and eval from the folder -----------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cli") / "gpt"
    code = main(["train", "gpt-nano", "--out", str(out_dir), "--set", "train.steps=6", "--set", "train.eval_every=3",
                 *GPT_SETS])  # fmt: skip
    assert code == 0
    return out_dir


def test_train_leaves_a_complete_run_folder(gpt_run):
    names = {p.name for p in gpt_run.iterdir()}
    assert {"run.json", "tokenizer.json", "checkpoints", "metrics.jsonl", "loss.png"} <= names
    assert [p.name for p in (gpt_run / "checkpoints").iterdir()] == ["step-00000006"]
    resolved = json.loads((gpt_run / "run.json").read_text())
    assert resolved["model"]["preset"] == "gpt-nano" and resolved["model"]["n_layers"] == 2
    vocab = json.loads((gpt_run / "tokenizer.json").read_text())["model"]["vocab"]
    assert resolved["model"]["vocab_size"] == len(vocab) <= 300  # the tokenizer's V, not the preset's 256
    assert resolved["data"]["tokenizer"] == "bpe" and resolved["train"]["task"] == "lm"
    records = [json.loads(line) for line in (gpt_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "eval"] == [3, 6]


def test_train_says_what_it_resolved_and_prints_the_baseline(capsys, tmp_path):
    out = ok(capsys, "train", "gpt-nano", "--out", tmp_path / "r", "--set", "train.steps=2", *GPT_SETS)
    assert re.search(r"^model: vocab_size 256 -> \d+ \(from the tokenizer\)$", out, re.M)
    assert re.search(r"^data: stdlib source \(0\.1 MB, .* bpe tokenizer V=\d+, rows of 16$", out, re.M)
    assert re.search(r"^step 2: validation loss [\d.]+, ppl [\d.]+, accuracy [\d.]+%; unigram baseline [\d.]+ nats/token$",
                     out, re.M)  # fmt: skip


def test_eval_reproduces_the_final_validation_of_training(capsys, gpt_run):
    last = [json.loads(line) for line in (gpt_run / "metrics.jsonl").read_text().splitlines()][-1]
    result = json.loads(ok(capsys, "eval", gpt_run, "--json", "--max-batches", "2"))
    assert result["checkpoint"].endswith("step-00000006") and result["task"] == "lm"
    assert result["eval"]["loss"] == pytest.approx(last["loss"], rel=1e-6)  # same checkpoint, same batches
    assert result["eval"]["ppl"] == pytest.approx(last["ppl"], rel=1e-6)
    assert 0 < result["unigram_loss"] < 10
    from_ckpt = json.loads(ok(capsys, "eval", gpt_run / "checkpoints" / "step-00000006", "--json", "--max-batches", "2"))
    assert from_ckpt["eval"] == result["eval"]
    text = ok(capsys, "eval", gpt_run, "--max-batches", "2")
    assert re.search(r"^validation loss [\d.]+, ppl [\d.]+, accuracy [\d.]+%; unigram baseline", text, re.M)


def test_eval_max_batches_below_one_names_the_option(capsys, gpt_run):
    for n in ("0", "-2"):
        line = error_line(capsys, "eval", gpt_run, "--max-batches", n)
        assert f"--max-batches={n} must be >= 1" in line and "eval_batches" not in line


def test_generate_continues_the_prompt_reproducibly(capsys, gpt_run):
    a = ok(capsys, "generate", gpt_run, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3")
    b = ok(capsys, "generate", gpt_run, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "3")
    assert a == b and a.startswith("def ")
    greedy = json.loads(ok(capsys, "generate", gpt_run, "--prompt", "import", "--greedy", "--max-new-tokens", "5", "--json"))
    assert greedy["prompt"] == "import" and 0 < greedy["tokens"] <= 5 and greedy["task"] == "lm"
    both = json.loads(ok(capsys, "generate", gpt_run, "--prompt", "def ", "--prompt", "import", "--greedy",
                         "--max-new-tokens", "5", "--json"))  # fmt: skip
    assert [r["prompt"] for r in both] == ["def ", "import"] and both[1] == greedy  # each prompt on its own
    text = ok(capsys, "generate", gpt_run, "--prompt", "def ", "--prompt", "import", "--greedy",
              "--max-new-tokens", "5")  # fmt: skip
    assert text == f"[1] def {both[0]['output']}\n\n[2] import{greedy['output']}\n"


def test_generate_default_max_new_tokens_fits_a_short_context(capsys, tmp_path, gpt_run):
    """Not given, --max-new-tokens was 100 and refused past a 16-token context; now it generates as many as fit,
    saying so in one note line on stderr. Given, a count that does not fit stays an error."""
    from archlab.cli import DEFAULT_NEW_TOKENS
    from archlab.train.run import DEFAULT_NEW_TOKENS as RUN_DEFAULT

    assert DEFAULT_NEW_TOKENS == RUN_DEFAULT == 100
    short = tmp_path / "short"
    ok(capsys, "train", "gpt-nano", "--out", short, "--set", "train.steps=2", "--set", "model.max_len=16", *GPT_SETS)
    code, out, err = run(capsys, "generate", short, "--prompt", "import", "--greedy", "--json")
    assert code == 0, err
    notes = re.findall(r"^archlab: generating at most (\d+) new tokens, not the default 100: the prompt's (\d+) "
                       r"tokens leave room for \1 in the context of GPT \(max_len=16\)$", err, re.M)  # fmt: skip
    assert len(notes) == 1, err
    room, n_prompt = map(int, notes[0])
    assert room == 16 - n_prompt + 1 and 0 < json.loads(out)["tokens"] <= room
    line = error_line(capsys, "generate", short, "--prompt", "import", "--max-new-tokens", "100")
    assert f"max_new_tokens <= {room} fits" in line
    code, out, err = run(capsys, "generate", gpt_run, "--prompt", "import", "--greedy", "--json")  # 128: 100 fit
    assert code == 0 and "generating at most" not in err


# -- resume: N steps, then N more, equals 2N straight ----------------------------------------------------------------


def test_resume_through_the_cli_is_bit_exact(capsys, tmp_path):
    sets = [*GPT_SETS, "--set", "train.schedule=constant", "--set", "train.lr=0.01", "--set", "train.eval_every=0",
            "--set", "model.dropout=0.1"]  # fmt: skip  (dropout: the RNG state must come back too)
    ok(capsys, "train", "gpt-nano", "--out", tmp_path / "straight", "--set", "train.steps=6", *sets)
    ok(capsys, "train", "gpt-nano", "--out", tmp_path / "split", "--set", "train.steps=3", *sets)
    line = error_line(capsys, "train", "gpt-nano", "--out", tmp_path / "split", "--set", "train.steps=6", *sets)
    assert "already holds a trained run; pass --resume" in line
    assert_resume_equals_straight(capsys, tmp_path)


def test_resume_refuses_other_data(capsys, tmp_path):
    ok(capsys, "train", "gpt-nano", "--out", tmp_path / "r", "--set", "train.steps=2", *GPT_SETS)
    line = error_line(capsys, "train", tmp_path / "r", "--resume", "--set", "train.steps=4", "--set", "data.seq_len=8")
    assert "cannot resume" in line and "data.seq_len: 16 -> 8" in line
    before = (tmp_path / "r" / "run.json").read_text()
    code, _, err = run(capsys, "train", tmp_path / "r", "--resume", "--set", "train.steps=4", "--set", "train.lr=0.5")
    assert code == 2 and "Traceback" not in err  # the Trainer's check of the trajectory (cosine: steps is part of it)
    assert err.strip().splitlines()[-1].startswith("archlab: error: cannot resume") and "lr: None -> 0.5" in err
    assert (tmp_path / "r" / "run.json").read_text() == before  # the refused settings were not written


# -- seq2seq and classification ------------------------------------------------------------------------------------


def test_seq2seq_run_translates_and_scores(capsys, tmp_path):
    out = ok(capsys, "train", "transformer-tiny", "--out", tmp_path / "s", "--set", "train.steps=3", *SEQ2SEQ_SETS)
    # reversed strings are one word each: BLEU would be 0 by construction, so chrF is reported, and named
    assert re.search(r"exact match [\d.]+%, chrF [\d.]+ \(outputs under 4 words, where BLEU is 0\)$", out, re.M)
    result = json.loads(ok(capsys, "eval", tmp_path / "s", "--json"))
    assert {"loss", "ppl", "accuracy", "exact_match", "chrf"} <= set(result["eval"]) and "bleu" not in result["eval"]
    greedy = json.loads(ok(capsys, "generate", tmp_path / "s", "--prompt", "abc", "--max-new-tokens", "6", "--json"))
    beam = json.loads(ok(capsys, "generate", tmp_path / "s", "--prompt", "abc", "--max-new-tokens", "6", "--beam", "3",
                         "--json"))  # fmt: skip
    assert greedy["task"] == beam["task"] == "seq2seq" and greedy["tokens"] <= 6 and beam["tokens"] <= 6
    assert set(greedy["output"]) <= set("abcdefghijklmnopqrstuvwxyz")
    line = error_line(capsys, "generate", tmp_path / "s", "--prompt", "ab1C", "--max-new-tokens", "6")
    assert "--prompt 'ab1C' holds characters not in the run's vocabulary: '1C'" in line  # not <unk>s and ""
    line = error_line(capsys, "generate", tmp_path / "s", "--prompt", "abc", "--temperature", "0.5")
    assert "seq2seq decoding is greedy or beam search" in line
    vocab = json.loads((tmp_path / "s" / "checkpoints" / "step-00000003" / "config.json").read_text())["vocab_size"]
    line = error_line(capsys, "generate", tmp_path / "s", "--prompt", "abc", "--beam", "1000000")
    assert line == f"archlab: error: --beam 1000000 must be in [1, {vocab}] (the vocabulary's tokens; 4-10 is usual)"


def test_a_refused_resume_gives_the_cli_command_that_starts_from_its_weights(capsys, tmp_path):
    """The error named only archlab.interop.io.load_model; the command it now gives runs as written."""
    ok(capsys, "train", "gpt-nano", "--out", tmp_path / "r", "--set", "train.steps=2", *GPT_SETS)
    code, _, err = run(capsys, "train", tmp_path / "r", "--resume", "--set", "train.steps=4")  # the Trainer's check
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("archlab: error: cannot resume") and "steps: 2 -> 4" in line
    assert "archlab.interop.io.load_model" in line
    command = re.search(r"`archlab (train .*?)` with the new --set values", line)
    assert command, line
    argv = command.group(1).replace("NEW_DIR", str(tmp_path / "new")).split()
    assert argv[:2] == ["train", str(tmp_path / "r")] and f"model.init={tmp_path / 'r'}" in argv[3]
    ok(capsys, *argv, "--set", "train.steps=4", "--set", "train.progress=false")
    assert (tmp_path / "new" / "checkpoints" / "step-00000004").is_dir()


def test_classification_on_digits_and_its_json_summary(capsys, tmp_path):
    code, out, _ = run(capsys, "train", "mlp-digits", "--out", tmp_path / "c", "--json", "--set", "train.steps=5",
                       "--set", "train.warmup=1", "--set", "train.lr=0.003", "--set", "train.progress=false")  # fmt: skip
    summary = json.loads(out)  # stdout is JSON alone with --json
    assert code == 0 and summary["step"] == 5 and summary["task"] == "classification"
    assert 0 <= summary["eval"]["accuracy"] <= 1
    line = error_line(capsys, "generate", tmp_path / "c", "--prompt", "x")
    assert "generate is for lm and seq2seq runs; this one trains task 'classification'" in line


# -- errors: one line each, before any training ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "vit-tiny", "--set", "data.source=stdlib"], "does not fit preset vit-tiny (family vit)"),
        (["train", "gpt-nano", "--set", "nosuchkey"], "--set expects KEY=VALUE"),
        (["train", "gpt-nano", "--set", "seed=1"], "data and train both have 'seed'; write data.seed or train.seed"),
        (["train", "gpt-nano", "--set", "model.n_layer=1"], "unknown key 'n_layer' (did you mean 'n_layers'?)"),
        (["train", "gpt-nano", "--set", "train.steps=20", "--set", "train.warmup=20"],
         "schedule='cosine' needs steps > warmup; got steps=20, warmup=20"),
        (["train", "gpt-nanoo"], "unknown preset 'gpt-nanoo' (did you mean 'gpt-nano'?)"),
        (["train", "missing.json"], "missing.json: no such file"),
        (["train", "gpt-nano", "--set", "data.source=missing.txt", "--set", "train.warmup=1"], "missing.txt: no such file"),
        (["eval", "no/such/run"], "no/such/run: no such run folder or checkpoint"),
        (["generate", "no/such/run", "--prompt", "x"], "no such run folder or checkpoint"),
    ],
)
def test_errors_are_one_clear_line(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    assert words in error_line(capsys, *argv)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_resume_of_a_path_that_is_no_run_names_the_folder(capsys, tmp_path, monkeypatch):
    """`archlab train runs/k0 --resume` (no such folder) said "unknown preset 'runs/k0'" and listed every preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").write_text("not a run")
    for target, words in [("runs/k0", "runs/k0: no such folder, so no run to resume there"),
                          ("empty", "empty is a folder without a run.json: not a run, so no run to resume there"),
                          ("notes", "notes is a file, not a run folder: no run to resume there")]:  # fmt: skip
        line = error_line(capsys, "train", target, "--resume")
        assert words in line and "--resume continues a run folder" in line and "unknown preset" not in line, line
    assert not (tmp_path / "runs").exists()


def test_an_infinite_lora_alpha_is_refused_before_a_run_folder_is_made(capsys, tmp_path):
    """JSON's 1e999 is inf: the run wrote its folder, then stopped at step 1 on a nan loss (inf * (B = 0))."""
    line = error_line(capsys, "train", "gpt-nano", "--out", tmp_path / "run", "--set", 'train.lora=["*.in_proj"]',
                      "--set", "train.lora_alpha=1e999", *GPT_SETS)  # fmt: skip
    assert "alpha=inf must be finite" in line
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run(capsys, tmp_path):
    line = error_line(capsys, "eval", tmp_path)
    assert "is neither a run folder (no run.json) nor a checkpoint (config.json + model.safetensors)" in line
    (tmp_path / "run.json").write_text(json.dumps({"model": {"preset": "gpt-nano"}, "data": {}, "train": {}}))
    assert "is a run without a checkpoint yet" in error_line(capsys, "generate", tmp_path, "--prompt", "x")


def test_a_run_whose_only_checkpoint_is_incomplete_names_what_it_lacks(capsys, tmp_path):
    """A checkpoint folder without its weights (deleted by hand) was reported as "nothing under checkpoints"."""
    (tmp_path / "run.json").write_text(json.dumps({"model": {"preset": "gpt-nano"}, "data": {}, "train": {}}))
    step = tmp_path / "checkpoints" / "step-00000003"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (step / "model.safetensors").mkdir()  # a folder where the file should be
    for command in (["generate", tmp_path, "--prompt", "x"], ["eval", tmp_path]):
        line = error_line(capsys, *command)
        assert line == (f"archlab: error: {tmp_path} holds no complete checkpoint: {step} lacks model.safetensors, "
                        "optimizer.safetensors, rng.safetensors, trainer_state.json (a checkpoint holds the files "
                        "config.json, model.safetensors, optimizer.safetensors, rng.safetensors, trainer_state.json)")


def test_json_output_is_only_json_with_the_progress_bar_on(capsys, tmp_path):
    """The bar and the notes above it (precision=auto ...) go to stderr: stdout is the summary alone."""
    sets = ["train.progress=true" if a == "train.progress=false" else a for a in GPT_SETS]
    code, out, err = run(capsys, "train", "gpt-nano", "--out", tmp_path / "r", "--set", "train.steps=2", *sets, "--json")
    assert code == 0, err
    assert json.loads(out)["step"] == 2 and "archlab: precision=auto" in err


# -- the demo-dates run (make demo-dates): the encoder-decoder Transformer to >= 99% exact match ----------------------


@pytest.mark.slow
def test_demo_dates_reaches_99_percent_exact_match_on_held_out_dates(capsys, tmp_path):
    from pathlib import Path

    run_file = Path(__file__).parents[1] / "examples" / "demo_dates.json"
    code, out, err = run(capsys, "train", run_file, "--out", tmp_path / "dates", "--json", "--set", "train.progress=false")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == json.loads(run_file.read_text())["train"]["steps"]
    assert summary["eval"]["exact_match"] >= 0.99, summary["eval"]  # 1000 validation dates, sources unseen in training
    translated = ok(capsys, "generate", tmp_path / "dates", "--prompt", "Sunday, 20 July 1969")
    assert translated.strip() == "1969-07-20"


def test_an_out_folder_that_cannot_be_written_is_one_line_before_the_data_is_read(capsys, tmp_path, monkeypatch):
    """--out on a read-only mount (or a folder without write permission): the data was read and a tokenizer trained,
    then mkdir or the tokenizer's save ended in an OSError traceback (exit 1)."""
    import os

    import archlab.train.run

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    monkeypatch.setattr(archlab.train.run, "build_data", lambda *a, **k: pytest.fail("read the data"))
    (tmp_path / "ro").mkdir()
    for out in (tmp_path / "ro", tmp_path / "ro" / "run"):
        line = error_line(capsys, "train", "gpt-nano", "--out", out, "--set", "train.steps=2", *GPT_SETS)
        assert f"--out '{out}' is not writable" in line and "read-only file system or no permission" in line
    assert list((tmp_path / "ro").iterdir()) == []
