"""``archlab train`` from pretrained weights (``model.init``) and with LoRA adapters (``train.lora``).

A tiny random Llama written as llama.cpp writes GGUF files (with a byte-level tokenizer in its metadata)
stands for SmolLM2; the slow tests at the end train the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archlab.cli import main
from archlab.errors import CheckpointError, ConfigError
from archlab.interop.convert import convert
from archlab.interop.gguf import load_gguf
from archlab.interop.io import load_model
from archlab.interop.llama import save_llama
from archlab.models.llama import Llama, LlamaConfig
from archlab.nn.lora import unload_lora
from archlab.train.run import RunSpec, prepare, train_run

sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
from gguf_files import TINY_TOKENIZER, TINY_TOKENS, write_llama_gguf  # noqa: E402

SETS = [
    "--set", "train.batch_size=4", "--set", "train.eval_every=0", "--set", "train.eval_batches=2",
    "--set", "train.progress=false", "--set", "train.schedule=constant", "--set", "model.dropout=0.1",
]  # fmt: skip


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """``(gguf path, text file)``: a random tiny Llama with a byte-level tokenizer, and ASCII text it can read."""
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(7)  # (not train.seed: weights a run initialised itself would not pass for these)
    config = LlamaConfig(vocab_size=len(TINY_TOKENS), max_len=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         d_ff=48)  # fmt: skip
    gguf = write_llama_gguf(tmp_path / "tiny.gguf", Llama(config), TINY_TOKENIZER)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"hello world {i}: the quick brown fox jumps over {i % 7} lazy dogs" for i in range(300)))
    return gguf, text


def ok(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def checkpoint(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def test_lora_run_from_gguf_resumes_bit_exact_and_evaluates_and_generates(capsys, tmp_path, tiny):
    gguf, text = tiny
    sets = [*SETS, "--set", f"model.init={gguf}", "--set", f"data.source={text}", "--set", 'train.lora=["q","v"]']
    ok(capsys, "train", "llama-tiny", "--out", tmp_path / "straight", "--set", "train.steps=6", *sets)
    out = ok(capsys, "train", "llama-tiny", "--out", tmp_path / "split", "--set", "train.steps=3", *sets)
    assert "LoRA on 2 layers: 1,792 trainable of 20,640 parameters" in out  # 2 x (A [2 r, d], B [(A + G) d_k, r])
    assert "train.lr=0.001 for LoRA adapters on pretrained weights" in out
    saved = json.loads((tmp_path / "split" / "run.json").read_text())
    assert saved["model"]["init"] == str(gguf) and saved["model"]["dropout"] == 0.1 and saved["data"]["tokenizer"] == "auto"
    ok(capsys, "train", tmp_path / "split", "--resume", "--set", "train.steps=6")
    straight, resumed = checkpoint(tmp_path / "straight", 6), checkpoint(tmp_path / "split", 6)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)

    # the frozen weights are the GGUF file's, exactly; only the adapters moved
    original = load_gguf(gguf).state_dict()
    at_3 = checkpoint(tmp_path / "split", 3)
    for name, value in resumed.items():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(value, at_3[name]), name
        else:
            assert torch.equal(value, original[name.replace(".base.", ".")]), name

    metrics = json.loads(ok(capsys, "eval", tmp_path / "split", "--json"))
    assert metrics["eval"]["loss"] > 0 and metrics["checkpoint"].endswith("step-00000006")
    reply = json.loads(ok(capsys, "generate", tmp_path / "split", "--prompt", "hello", "--greedy",
                          "--max-new-tokens", "5", "--json"))  # fmt: skip
    assert reply["tokens"] <= 5


@pytest.mark.parametrize("kind", ["gguf", "hf-folder", "archlab-folder", "run-folder"])
def test_a_run_starts_from_the_weights_it_names(tmp_path, tiny, kind):
    gguf, text = tiny
    model = load_gguf(gguf)
    sources = {"gguf": lambda: gguf}
    if kind == "hf-folder":
        save_llama(model, tmp_path / "hf")
        (tmp_path / "hf" / "tokenizer.json").write_text((_converted(gguf, tmp_path) / "tokenizer.json").read_text())
        sources[kind] = lambda: tmp_path / "hf"
    elif kind == "archlab-folder":
        sources[kind] = lambda: _converted(gguf, tmp_path)
    elif kind == "run-folder":  # a LoRA run's checkpoint: its adapters come merged
        first = RunSpec("llama-tiny", {}, {"source": str(text)},
                        {"steps": 2, "batch_size": 2, "progress": False, "lora": ["q"]}, init=str(gguf))  # fmt: skip
        train_run(first, tmp_path / "first", echo=lambda line: None)
        model = unload_lora(load_model(tmp_path / "first" / "checkpoints" / "step-00000002"))
        sources[kind] = lambda: tmp_path / "first"
    spec = RunSpec("llama-tiny", {"dropout": 0.2}, {"source": str(text)}, {"steps": 2}, init=str(sources[kind]()))
    run = prepare(spec)
    assert run.model_config == model.config.replace(dropout=0.2)
    assert run.run_data.tokenizer.vocab_size == len(TINY_TOKENS)
    built = run.build_model().state_dict()
    assert all(torch.equal(built[k], v) for k, v in model.state_dict().items())
    assert "train.lr=0.0001 for pretrained weights (set train.lr to change it)" in run.notes


def _converted(gguf: Path, tmp_path: Path) -> Path:
    if not (tmp_path / "archlab").is_dir():
        convert(gguf, tmp_path / "archlab")
    return tmp_path / "archlab"


@pytest.mark.parametrize(
    ("preset", "model", "data", "train", "error", "words"),
    [
        ("llama-tiny", {"d_model": 64}, {}, {}, ConfigError, "model.d_model=64: the weights of model.init="),
        ("llama-tiny", {"rope_theta": 1.0}, {}, {}, ConfigError, "may set only dropout, attn_dropout, backend"),
        ("llama-tiny", {}, {"tokenizer": "byte"}, {}, ConfigError, "reads text with their own tokenizer"),
        ("gpt-nano", {}, {}, {}, ConfigError, "holds a llama model; preset 'gpt-nano' is of family 'gpt'"),
        ("llama-tiny", {}, {}, {"lora": ["q_proj"]}, ConfigError, "LoRA target 'q_proj' matches no nn.Linear"),
    ],
)  # fmt: skip
def test_what_a_run_from_pretrained_weights_refuses(tiny, preset, model, data, train, error, words):
    gguf, text = tiny
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        prepare(RunSpec(preset, model, {"source": str(text), **data}, train, init=str(gguf)))


def test_missing_weights_are_named(tmp_path, tiny):
    with pytest.raises(CheckpointError, match=r"model\.init '.*nothing\.gguf': no such file or folder"):
        RunSpec("llama-tiny", init=str(tmp_path / "nothing.gguf"))
