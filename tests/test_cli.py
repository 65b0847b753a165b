"""The archlab command line: presets, inspect, --set parsing, one-line errors with exit code 2."""

from __future__ import annotations

import json
import re

import pytest
import torch

import archlab
from archlab.cli import main, parse_overrides
from archlab.errors import ConfigError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("archlab: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_presets_table_lists_transformer_presets(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}  # the table, a blank, a note
    assert {"transformer-base", "transformer-big", "transformer-tiny"} <= set(rows)
    assert re.search(r"transformer-base\s+transformer\s+63\.1M\s+Vaswani", rows["transformer-base"])
    assert "214M" in rows["transformer-big"]


def test_presets_json(capsys):
    code, out, _ = run(capsys, "presets", "--json")
    assert code == 0
    by_name = {entry["name"]: entry for entry in json.loads(out)}
    assert by_name["transformer-base"]["parameters"] == 63_082_496
    assert by_name["transformer-base"]["family"] == "transformer"
    assert by_name["transformer-base"]["config"]["d_model"] == 512


def test_inspect_transformer_base(capsys):
    code, out, _ = run(capsys, "inspect", "transformer-base")
    assert code == 0
    total = re.search(r"^\s+total\s+([\d,]+)\s+100\.0%", out, re.M)
    n = int(total.group(1).replace(",", ""))
    assert abs(n - 65e6) / 65e6 < 0.04  # 63,082,496 vs the paper's 65M
    for label in ("embeddings", "self-attention", "cross-attention", "feed-forward", "norms"):
        assert re.search(rf"^\s+{label}\s+[\d,]+\s+[\d.]+%$", out, re.M), label
    assert "tied: src_embed.weight = tgt_embed.weight = lm_head.weight" in out
    assert re.search(r"^\s+d_model\s+512$", out, re.M)
    assert re.search(r"^\s+d_k \(derived\)\s+64$", out, re.M)


def test_inspect_json_and_overrides(capsys):
    code, out, _ = run(capsys, "inspect", "transformer-base", "--set", "n_layers=2", "--set", "positional=rope",
                       "--set", "norm_first=true", "--set", "dropout=0.2", "--json")  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["overrides"] == {"n_layers": 2, "positional": "rope", "norm_first": True, "dropout": 0.2}
    config, params = data["config"], data["parameters"]
    assert (config["n_layers"], config["positional"], config["norm_first"], config["dropout"]) == (2, "rope", True, 0.2)
    assert sum(params["by_component"].values()) == params["total"] == params["trainable"]
    assert params["tied"] == {"src_embed.weight": ["tgt_embed.weight", "lm_head.weight"]}


def test_inspect_memory_figures(capsys):
    code, out, _ = run(capsys, "inspect", "gpt2-small", "--batch", "4", "--length", "1024", "--json")
    assert code == 0
    memory = json.loads(out)["memory"]
    # K and V of 12 layers, 4 sequences, 1024 positions, d = 768, 4 bytes
    assert memory["kv_cache"] == 2 * 12 * 4 * 1024 * 768 * 4
    assert memory["attention_scores_per_layer"] == 4 * 12 * 1024 * 1024 * 4
    assert memory["training_activations"] > memory["kv_cache"]
    code, out, _ = run(capsys, "inspect", "gpt2-small", "--dtype", "float16")
    assert code == 0 and "memory at batch 1, length 1024, float16" in out
    assert re.search(r"KV cache \(decoding\)\s+37\.7 MB", out)  # the memory module's docstring figure
    code, out, _ = run(capsys, "inspect", "textcnn-kim", "--json")
    assert code == 0 and json.loads(out)["memory"] is None  # no attention layers
    code, _, err = run(capsys, "inspect", "gpt-nano", "--batch", "0")
    assert code == 2 and "--batch=0 must be >= 1" in err


def test_inspect_forward_flops_per_token(capsys):
    code, out, _ = run(capsys, "inspect", "gpt2-small", "--length", "512", "--json")
    assert code == 0
    flops = json.loads(out)["forward_flops_per_token"]
    L, d, V, N = 12, 768, 50257, 512  # noqa: N806
    assert flops["projections"] + flops["feed_forward"] == 2 * 12 * d * d * L  # 2 FLOPs per weight: 12 d^2 a layer
    assert flops["output_head"] == 2 * d * V
    assert flops["attention"] == 4 * N * d * L  # Q K^T and A V, every key counted
    code, out, _ = run(capsys, "inspect", "bert-mini", "--length", "64")
    assert code == 0 and "forward FLOPs per token at length 64" in out
    code, out, _ = run(capsys, "inspect", "vit-base-16", "--json")  # one image = [class] + 196 patches
    assert code == 0
    data = json.loads(out)
    assert data["memory"]["length"] == 197
    d, patch_dim = 768, 3 * 16 * 16
    assert data["forward_flops_per_token"]["embeddings"] == 2 * patch_dim * d * 196 / 197  # the patch projection


def test_inspect_transformer_xl_forward_flops(capsys):
    """One segment of N = 32 with no memory: Q K^T, A V and Dai's position term (q + v)^T W_R R_t are
    each 2 A N d_k = 2 N d per token; W_R runs on the 32 rows of R, one pass per segment."""
    code, out, _ = run(capsys, "inspect", "transformer-xl-tiny", "--json")
    assert code == 0
    data = json.loads(out)
    flops, note = data["forward_flops_per_token"], data["forward_flops_note"]
    L, d, V, N = 2, 64, 256, 32  # noqa: N806
    assert note is None and data["memory"]["length"] == N
    assert flops["attention"] == L * 6 * N * d
    assert flops["projections"] == L * 2 * (4 * d * d + d * d)  # W_Q, W_K, W_V, W_O, and W_R (N rows / N tokens)
    assert flops["feed_forward"] == L * 2 * 2 * d * 4 * d
    assert flops["output_head"] == 2 * d * V
    code, out, _ = run(capsys, "inspect", "transformer-xl-tiny")
    assert code == 0 and "forward FLOPs per token at length 32" in out


def test_inspect_says_when_flops_cannot_be_counted(capsys, monkeypatch):
    """A forward that reads tensor values cannot run on meta: inspect says so instead of dropping the line."""
    import archlab.analysis.flops

    def reads_values(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(archlab.analysis.flops, "count_flops", reads_values)
    code, out, _ = run(capsys, "inspect", "gpt-nano")
    assert code == 0
    assert "forward FLOPs per token: not counted: the forward reads tensor values" in out and "item()" in out
    code, out, _ = run(capsys, "inspect", "gpt-nano", "--json")
    data = json.loads(out)
    assert data["forward_flops_per_token"] is None and "meta device" in data["forward_flops_note"]


def test_inspect_says_a_length_past_what_a_tensor_can_hold_is_why_flops_are_not_counted(capsys):
    """At 10^9 tokens the forward's [3, N, N] mask holds 3 * 10^18 elements, past 2^63: the note said "the forward
    reads tensor values" with torch's storage-size text."""
    code, out, _ = run(capsys, "inspect", "gpt-nano", "--set", "max_len=1000000000")
    assert code == 0
    assert out.rstrip().endswith("forward FLOPs per token: not counted: at length 1000000000 a tensor of the forward "
                                 "would hold more than 2^63 elements (pass a smaller --length)")  # fmt: skip


def test_inspect_refuses_a_weight_whose_shape_overflows_in_one_line(capsys):
    """d_model=2^31 makes the QKV weight 3 * 2^62 elements: the meta build's RuntimeError was a traceback."""
    assert main(["inspect", "gpt-nano", "--set", "d_model=2147483648", "--set", "n_heads=1"]) == 2
    assert capsys.readouterr().err == ("archlab: error: GPT of d_model=2147483648, vocab_size=256, max_len=128: a "
                                       "parameter of this model would hold more than 2^63 elements; no machine can "
                                       "build it\n")  # fmt: skip


def test_inspect_refuses_a_depth_it_would_take_hours_to_build(capsys):
    """n_layers=1000000 built a million blocks on the meta device (about 20 ms each with the FLOP count)."""
    assert main(["inspect", "gpt-nano", "--set", "n_layers=1000000"]) == 2
    assert capsys.readouterr().err == ("archlab: error: n_layers=1000000 must be <= 1024 (archlab.config.MAX_LAYERS: "
                                       "the deepest networks published have about 1,000 layers a stack)\n")  # fmt: skip


def test_inspect_kv_cache_row_only_for_models_that_decode_with_a_cache(capsys):
    """Decoders (GPT, Llama, the encoder-decoder Transformer) show a KV cache; encoders (BERT, ViT) have none."""
    for preset, decodes in (("gpt-nano", True), ("llama-tiny", True), ("transformer-tiny", True), ("bert-mini", False),
                            ("vit-tiny", False)):  # fmt: skip
        code, out, _ = run(capsys, "inspect", preset, "--json")
        assert code == 0 and (json.loads(out)["memory"]["kv_cache"] is not None) == decodes, preset
        code, out, _ = run(capsys, "inspect", preset)
        assert code == 0 and ("KV cache (decoding)" in out) == decodes, preset


def test_inspect_rwkv_files_its_mixing_blocks_and_counts_their_flops(capsys):
    """rwkv-tiny (d = d_att = 64, d_ff = 256, L = 2, V = 256): no parameter is "other"; FLOPs per token by hand."""
    code, out, _ = run(capsys, "inspect", "rwkv-tiny")
    assert code == 0 and not re.search(r"^\s+other\s", out, re.M)
    assert "forward FLOPs per token at length 128" in out
    code, out, _ = run(capsys, "inspect", "rwkv-tiny", "--length", "16", "--json")
    data = json.loads(out)
    d, d_ff, L, V = 64, 256, 2, 256  # noqa: N806
    assert data["parameters"]["by_component"]["other"] == 0 and data["forward_flops_note"] is None
    assert data["forward_flops_per_token"] == {"attention": 0, "projections": L * 8 * d * d,
                                               "feed_forward": L * 2 * (2 * d * d_ff + d * d), "output_head": 2 * d * V,
                                               "embeddings": 0, "other": 0}  # fmt: skip


def test_inspect_every_preset(capsys):
    """Every preset inspects; every preset with attention layers (or RWKV's time mixing) gets its FLOPs counted."""
    from archlab.models import list_presets

    for preset in list_presets():
        code, out, err = run(capsys, "inspect", preset.name, "--json")
        assert code == 0, (preset.name, err)
        data = json.loads(out)
        assert data["forward_flops_note"] is None, (preset.name, data["forward_flops_note"])
        # the document reader reads a batch of documents, not a token sequence: its memory budget (--pages) instead
        counted = ("n_heads" in data["config"] and preset.family != "docreader") or preset.family == "rwkv"
        assert (data["forward_flops_per_token"] is not None) == counted, preset.name


def test_inspect_marks_overridden_fields(capsys):
    code, out, _ = run(capsys, "inspect", "transformer-tiny", "--set", "n_layers=1")
    assert code == 0
    assert re.search(r"^\s+\* n_layers\s+1$", out, re.M)
    assert re.search(r"^\s+d_model\s+64$", out, re.M)


def test_inspect_takes_the_model_prefix_of_train_and_refuses_other_sections(capsys):
    code, out, _ = run(capsys, "inspect", "gpt-nano", "--set", "model.d_model=96", "--set", "n_layers=2")
    assert code == 0
    assert re.search(r"^\s+\* d_model\s+96$", out, re.M) and re.search(r"^\s+\* n_layers\s+2$", out, re.M)
    code, plain, _ = run(capsys, "inspect", "gpt-nano", "--set", "d_model=96", "--set", "n_layers=2")
    assert plain == out
    for setting in ("data.source=reverse", "train.steps=30"):
        code, out, err = run(capsys, "inspect", "gpt-nano", "--set", setting)
        assert_one_line_error(code, out, err, f"--set {setting.partition('=')[0]}", "model.KEY")


@pytest.mark.parametrize("argv", [["inspect", "gpt-nano", "--batch", "0"], ["inspect", "gpt-nano", "--length", "-1"]])
def test_count_options_below_one_name_the_option(capsys, argv):  # eval --max-batches: test_cli_train
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err, f"{argv[-2]}={argv[-1]} must be >= 1")


@pytest.mark.parametrize("command", [["train", "gpt-nano"], ["lab", "sqrt-dk", "--quick"]])
def test_out_naming_a_file_is_one_clear_line(capsys, tmp_path, command):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out_arg, words in ((a_file, ["is a file"]), (a_file / "run", ["lies under", str(a_file)])):
        code, out, err = run(capsys, *command, "--out", str(out_arg))
        assert_one_line_error(code, out, err, f"--out '{out_arg}'", *words)
    assert a_file.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [a_file]


def test_unknown_preset_suggests_the_closest(capsys):
    code, out, err = run(capsys, "inspect", "transformer-bse")
    assert_one_line_error(code, out, err, "unknown preset 'transformer-bse'", "did you mean 'transformer-base'")


@pytest.mark.parametrize(
    "setting, words",
    [
        ("d_modle=256", ["unknown key 'd_modle'", "did you mean 'd_model'"]),
        ("d_model=500", ["d_model=500 is not divisible by n_heads=8"]),
        ("d_model=big", ["d_model='big' must be an integer"]),
        ("positional=sinus", ["positional", "'sinus'", "did you mean 'sinusoidal'"]),
        ("d_model", ["--set expects KEY=VALUE", "'d_model'"]),
        ("=3", ["--set expects KEY=VALUE"]),
    ],
)
def test_bad_set_gives_one_clear_line(capsys, setting, words):
    code, out, err = run(capsys, "inspect", "transformer-base", "--set", setting)
    assert_one_line_error(code, out, err, *words)


def test_parse_overrides_reads_json_literals_else_strings():
    parsed = parse_overrides(["a=2", "b=0.1", "c=true", "d=null", "e=rope", 'f="512"', "g=1e-5", "h=x=y"])
    assert parsed == {"a": 2, "b": 0.1, "c": True, "d": None, "e": "rope", "f": "512", "g": 1e-5, "h": "x=y"}
    assert type(parsed["a"]) is int
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_version_and_usage_errors(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"archlab {archlab.__version__}"
    code, _, err = run(capsys)
    assert code == 2 and "required: COMMAND" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_embed_prints_vectors_equal_to_the_library(capsys):
    from archlab.interop.sentence import embed

    assert main(["embed", "--json", "a cat sat", "a dog ran"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dim"] == 384 and len(data["embeddings"]) == 2
    expected = embed(["a cat sat", "a dog ran"])
    assert torch.allclose(torch.tensor(data["embeddings"]), expected, atol=1e-6)
    assert main(["embed", "a cat sat", "a dog ran"]) == 0
    out = capsys.readouterr().out
    assert "dimension 384" in out and "cosine similarity" in out


def test_embed_says_which_texts_it_cut_to_max_seq_length(capsys):
    """MiniLM reads 256 tokens; a longer text is embedded from its beginning: the CLI says so on stderr."""
    assert main(["embed", "a cat sat", "word " * 300, "word " * 254]) == 0
    err = capsys.readouterr().err
    assert err == ("archlab: note: text [1] is 302 tokens; its first 256 (the model's max_seq_length, [CLS] and "
                   "[SEP] included) were embedded\n")  # fmt: skip


def test_embed_refuses_undecodable_text_in_one_line(capsys):
    assert main(["embed", "fine", "a\udcffb"]) == 2  # b"a\xffb" on the command line
    err = capsys.readouterr().err
    assert err == "archlab: error: text is not valid Unicode: lone surrogate '\\udcff' at position 1\n"


def test_embed_bad_model_is_one_line(capsys, tmp_path):
    assert main(["embed", "x", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("archlab: error:") and "nope" in err and err.count("\n") == 1


def test_archlabs_warnings_print_in_one_line_and_other_libraries_as_python_prints_them(tmp_path):
    """The CLI prints its own warnings like its errors (a subprocess: pytest records warnings, it shows none)."""
    import subprocess
    import sys

    script = (
        "import dataclasses, sys, warnings\n"
        "from archlab import cli\n"
        "def run(args):\n"
        "    warnings.warn_explicit('a query is long', UserWarning, cli.__file__, 1)\n"
        f"    warnings.warn_explicit('deprecated', UserWarning, {str(tmp_path / 'other.py')!r}, 7)\n"
        "    return 0\n"
        "cli.COMMANDS['presets'] = dataclasses.replace(cli.COMMANDS['presets'], run=run)\n"
        "sys.exit(cli.main(['presets']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"archlab: warning: a query is long\n{tmp_path / 'other.py'}:7: UserWarning: deprecated\n"


def test_a_start_imports_neither_dynamo_nor_distributed_checkpoints():
    """Starting archlab (the CLI module) leaves torch._dynamo (1.0 s on 2 cores; --compile imports it) and
    torch.distributed.checkpoint (0.6 s; saving a training checkpoint does) unimported. The functions torch.compile
    reads as constants carry torch.compiler.assume_constant_result's own mark, set without it."""
    import subprocess
    import sys

    from archlab import kernels
    from archlab.nn import linear

    code = ("import sys, archlab.cli; "
            "print([m for m in ('torch._dynamo', 'torch.distributed.checkpoint') if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

    def theirs():
        return 1

    def ours():
        return 1

    torch.compiler.assume_constant_result(theirs)
    kernels.compile_constant(ours)
    assert vars(theirs) and vars(ours) == vars(theirs)
    for marked in (kernels.f32_kernel, kernels.bf16_kernel, linear._threads):
        assert all(getattr(marked, name, None) == value for name, value in vars(theirs).items()), marked
