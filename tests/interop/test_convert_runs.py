"""``archlab convert`` on what the other commands accept: a run folder (its latest checkpoint, as ``generate`` and
``eval`` read it) or a checkpoint in one; the tokenizer goes along both ways, and the files get plain modes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import transformers
from safetensors.torch import save_file

from archlab.cli import main
from archlab.data import ByteTokenizer
from archlab.interop.convert import convert
from archlab.interop.io import atomic_dir, load_model, save_model
from archlab.models import build_model
from archlab.train.checkpoint import latest_checkpoint

TINY_RUN = [
    "--set", "model.n_layers=1", "--set", "data.max_bytes=60000", "--set", "data.vocab_size=300",
    "--set", "data.seq_len=16", "--set", "train.batch_size=4", "--set", "train.steps=2", "--set", "train.warmup=1",
    "--set", "train.eval_batches=1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
]  # fmt: skip
GREEDY = ["--prompt", "def f(x):", "--greedy", "--max-new-tokens", "6", "--json"]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def modes(folder) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def test_run_folder_converts_its_latest_checkpoint_with_the_tokenizer(capsys, tmp_path, umask_022):
    run = tmp_path / "run"
    cli(capsys, "train", "gpt-nano", "--out", run, *TINY_RUN)
    out = cli(capsys, "convert", run, tmp_path / "hf")
    assert "archlab -> gpt2, with tokenizer.json" in out
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    # the weights are the latest checkpoint's: Hugging Face computes the same logits
    ours = load_model(latest_checkpoint(run / "checkpoints")).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=0)
    # ... and back: the archlab folder has the tokenizer, so generate works on it and agrees with the run
    out = cli(capsys, "convert", tmp_path / "hf", tmp_path / "back")
    assert "gpt2 -> archlab, with tokenizer.json" in out
    again = json.loads(cli(capsys, "generate", tmp_path / "back", *GREEDY))
    assert again == json.loads(cli(capsys, "generate", run, *GREEDY))
    # a checkpoint inside the run finds the run's tokenizer the same way
    step = latest_checkpoint(run / "checkpoints")
    assert "with tokenizer.json" in cli(capsys, "convert", step, tmp_path / "from-step")
    # plain modes under umask 022 (mkdtemp and safetensors alone give 0700 / 0600)
    for folder in ("hf", "back", "from-step"):
        got = modes(tmp_path / folder)
        assert got.pop(folder) == 0o755 and set(got.values()) == {0o644}, (folder, got)


def test_an_archlab_only_tokenizer_is_left_out_of_a_hugging_face_folder(tmp_path):
    save_model(build_model("gpt-nano"), tmp_path / "m")
    ByteTokenizer().save(tmp_path / "m")
    note = convert(tmp_path / "m", tmp_path / "hf")
    assert note.startswith("archlab -> gpt2; ") and "left out: an archlab byte/char tokenizer" in note
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    # into archlab's format it is carried: archlab reads its own kinds
    assert convert(tmp_path / "hf", tmp_path / "back", tokenizer_dir=tmp_path / "m") == "gpt2 -> archlab, with tokenizer.json"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_dir_gives_the_modes_of_a_plain_mkdir_and_open(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors alone writes 0600
    finally:
        os.umask(old)
    got = modes(tmp_path / "out")
    assert got == {"out": 0o777 & ~mask, "a.txt": 0o666 & ~mask, "w.safetensors": 0o666 & ~mask}
