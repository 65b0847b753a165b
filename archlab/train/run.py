r"""A run: model + data + training in one JSON-able description, and what is done with it (train, eval, generate).

A run description (a file ``RUN.json``, or a preset name plus ``--set`` assignments)::

    {"model": {"preset": "gpt-nano", "n_layers": 4},        a preset and overrides of its config
     "data":  {"source": "stdlib", "max_bytes": 1000000},    a DataConfig (archlab.train.sources)
     "train": {"steps": 200, "lr": 0.001}}                   a TrainConfig (archlab.train.config)

:class:`RunSpec` keeps what was written; :func:`prepare` resolves it into the full run, which is what
``run.json`` holds and what a resumed run must match:

* data: ``auto`` source, tokenizer and ``seq_len`` chosen for the family's task (``sources.resolve_data``;
  a ``custom`` family trains only when archlab can build its batches: ELMo's token windows);
* model: ``vocab_size`` and ``pad_id`` follow the tokenizer, ``n_classes`` the labels (each change is said);
* train: ``task`` is the family's; ``clip`` is the model config's ``grad_clip`` when the run does not
  set ``train.clip`` itself (the recurrent families carry their recommended max-norm there).

Starting from pretrained weights: ``model.init`` names them (``archlab.interop.pretrained``: ``smollm2-135m-instruct``,
a ``.gguf`` file, a Hugging Face or archlab model folder, or a run folder: its latest checkpoint), and the preset
names their family (``{"model": {"preset": "smollm2-135m", "init": "smollm2-135m-instruct"}}``). Then

* the model config is the weights' own: the run may set only the fields its class declares ``tunable``
  (dropout, attention backend), and a shape or any other field set to another value is a ConfigError;
* the text is read with the weights' tokenizer (``data.tokenizer`` stays ``auto``; another one is refused), and
  ``vocab_size`` is the weights' (the tokenizer's ids must fit it);
* ``data.seq_len`` defaults to the model's context, at most :data:`PRETRAINED_SEQ_LEN`, and ``train.lr`` to
  :data:`PRETRAINED_LR` (fine-tuning moves the weights less than training from scratch); each is said;
* ``run.json`` records ``model.init`` as given; resume, eval and generate read the run's own checkpoints (resume
  and eval read ``model.init``'s config again, so it must stay where it was, as a data file must).

``train.lora`` trains LoRA adapters on the layers it names instead of every weight (``["q", "v"]``: the row
blocks of the fused attention projection, :mod:`archlab.nn.lora`); checkpoints hold the adapted model, which
``archlab.interop.io.load_model`` rebuilds with its adapters.

The out dir of a run::

    run.json          the resolved description (``eval`` and ``generate`` read it back)
    tokenizer.json    the tokenizer; a resumed or evaluated run reuses it and never retrains it
    checkpoints/      the Trainer's checkpoints (archlab.train.checkpoint)
    metrics.jsonl     training and validation metrics; loss.png, the loss curve drawn from it
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import archlab
from archlab.config import Config
from archlab.data import Tokenizer, load_tokenizer
from archlab.data.tokenizers import TOKENIZER_FILE
from archlab.errors import CheckpointError, ConfigError, DataError, unknown
from archlab.generation import beam_search, check_room, context_limit, expand_for_beams, generate
from archlab.interop.convert import convert
from archlab.interop.io import CONFIG_FILE, WEIGHTS_FILE, load_model, read_config, write_text_atomic
from archlab.interop.pretrained import archlab_folder, locate_pretrained
from archlab.models.registry import (
    FAMILIES,
    PRESETS,
    Family,
    build_model,
    check_fits_in_memory,
    family_of,
    get_config,
    get_preset,
)
from archlab.nn.lora import apply_lora, lora_layers, lora_report, unload_lora
from archlab.train import distributed as D
from archlab.train.checkpoint import (
    CHECKPOINT_FILES,
    check_model_config,
    check_writable_folder,
    latest_checkpoint,
    load_checkpoint,
    remove_temporaries,
    step_dirs,
)
from archlab.train.config import TENSOR_PARALLEL, TrainConfig
from archlab.train.logs import METRICS_FILE, PLOT_FILE, plot_loss_curve, read_metrics
from archlab.train.loop import CHECKPOINTS, Trainer
from archlab.train.metrics import BLEU_MAX_ORDER
from archlab.train.sources import TRAINED_TOKENIZERS, DataConfig, RunData, build_data, resolve_data
from archlab.train.tasks import seq2seq_generation_metrics

RUN_FILE = "run.json"
SECTIONS = ("model", "data", "train")
PRESET_KEY = "preset"  # the keys of the model section that are not config fields: the preset,
INIT_KEY = "init"  # and the pretrained weights the run starts from
#: A run from pretrained weights: ``data.seq_len`` unless set (at most; their context may be 8192 tokens), and
#: ``train.lr`` unless set, training every weight / LoRA adapters (which start from zero and need a larger step).
PRETRAINED_SEQ_LEN = 512
PRETRAINED_LR = {"full": 1e-4, "lora": 1e-3}


# -- the description ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """A run as written: the preset, and the overrides of each section (``model``, ``data``, ``train``).

    Every section is validated on construction (unknown keys get the closest valid name). The configs
    themselves are :meth:`model_config`, :meth:`data_config` and :meth:`train_config`.
    """

    preset: str
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    init: str | None = None

    def __post_init__(self) -> None:
        for name in SECTIONS:
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"the {name!r} section of a run must be a JSON object, got {getattr(self, name)!r}")
        if self.init is not None and not (isinstance(self.init, str) and self.init):
            raise ConfigError(f"model.init={self.init!r} must name pretrained weights: a name, a .gguf file or a folder")
        self.model_config(), self.data_config(), self.train_config()  # validate every section now

    @property
    def family(self) -> Family:
        return FAMILIES[get_preset(self.preset).family]

    def model_config(self) -> Config:
        if self.init is None:
            return get_config(self.preset, **self.model)
        return pretrained_config(self.init, self.preset, self.model)

    def data_config(self) -> DataConfig:
        return DataConfig.from_dict(self.data)

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    # -- JSON --------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the run") -> RunSpec:
        """From ``{"model": {"preset": ..., ...}, "data": {...}, "train": {...}}`` (``data``, ``train`` optional)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object with sections {', '.join(SECTIONS)}")
        for key in data:
            if key not in (*SECTIONS, "archlab"):
                raise ConfigError(f"{where}: " + unknown("section", key, SECTIONS))
        model = data.get("model")
        if not isinstance(model, dict) or PRESET_KEY not in model:
            raise ConfigError(f"{where}: the model section needs a {PRESET_KEY!r} (see `archlab presets`)")
        model = dict(model)
        preset = model.pop(PRESET_KEY)
        init = model.pop(INIT_KEY, None)
        return cls(preset, model, data.get("data", {}), data.get("train", {}), init)

    def model_section(self) -> dict[str, Any]:
        """The model section as written: the preset, ``init`` when there is one, and the overrides."""
        return {PRESET_KEY: self.preset, **({} if self.init is None else {INIT_KEY: self.init}), **self.model}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_section(), "data": dict(self.data), "train": dict(self.train)}

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        """A run from ``RUN.json``, ``RUN.yaml`` (when PyYAML is installed) or a run folder's ``run.json``."""
        path = Path(path)
        if path.is_dir():
            if not (path / RUN_FILE).is_file():
                raise ConfigError(f"{path} is a folder without a {RUN_FILE}: not a run")
            path = path / RUN_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the run description ({e})") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: YAML needs PyYAML, which is not installed; write the run as JSON") from None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:  # one line, as for JSON: the problem and where (PyYAML's own text spans lines)
                mark = getattr(e, "problem_mark", None)
                at = "" if mark is None else f" at line {mark.line + 1} column {mark.column + 1}"
                raise ConfigError(f"{path} is not valid YAML: {getattr(e, 'problem', None) or e}{at}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(data, where=str(path))

    # -- --set ------------------------------------------------------------------------------------------------
    def section_fields(self) -> dict[str, list[str]]:
        """The keys each section accepts."""
        return {
            "model": [PRESET_KEY, INIT_KEY, *type(get_preset(self.preset).config).field_names()],
            "data": DataConfig.field_names(),
            "train": TrainConfig.field_names(),
        }

    def with_overrides(self, overrides: dict[str, Any]) -> RunSpec:
        """Apply ``--set`` overrides: ``{"section.key": value}``, or ``{"key": value}`` when one section has ``key``."""
        sections = {"model": self.model_section(), "data": dict(self.data), "train": dict(self.train)}
        for key, value in overrides.items():
            section, _, name = key.rpartition(".")
            if section:
                if section not in SECTIONS:
                    raise ConfigError(f"--set {key}: " + unknown("section", section, SECTIONS))
            else:
                section = self._section_of(name)
            sections[section][name] = value
        model = sections["model"]
        return RunSpec(model.pop(PRESET_KEY), model, sections["data"], sections["train"], model.pop(INIT_KEY, None))

    def _section_of(self, name: str) -> str:
        fields = self.section_fields()
        owners = [s for s in SECTIONS if name in fields[s]]
        if len(owners) == 1:
            return owners[0]
        if owners:
            raise ConfigError(f"--set {name}: {' and '.join(owners)} both have {name!r}; write "
                              + " or ".join(f"{s}.{name}" for s in owners))  # fmt: skip
        owner = {n: s for s in reversed(SECTIONS) for n in fields[s]}
        near = difflib.get_close_matches(name, list(owner), n=1, cutoff=0.5)
        hint = f" (did you mean {owner[near[0]]}.{near[0]}?)" if near else ""
        raise ConfigError(f"--set {name}: no section has a key {name!r}{hint}; the keys are the fields of model "
                          f"({type(get_preset(self.preset).config).__name__}), data (DataConfig) and train (TrainConfig)")  # fmt: skip


def pretrained_weights(init: str) -> tuple[Path, Path | None]:
    """``model.init`` -> ``(archlab model folder, tokenizer folder or None)``: a GGUF file or Hugging Face folder
    through the conversion cache (:mod:`archlab.interop.pretrained`), a run folder's latest checkpoint."""
    _, checkpoint, tok_dir = locate_checkpoint(archlab_folder(locate_pretrained(init, f"model.{INIT_KEY}")))
    return checkpoint, tok_dir


def pretrained_config(init: str, preset: str, overrides: dict[str, Any]) -> Config:
    """The config of the weights ``init`` names, with the ``overrides`` its class declares ``tunable``; ConfigError
    for weights of another family than ``preset``'s or an override of any other field to another value."""
    stored = read_config(pretrained_weights(init)[0])
    family, wanted = family_of(stored), get_preset(preset).family
    if family.name != wanted:
        presets = ", ".join(p.name for p in PRESETS.values() if p.family == family.name)
        raise ConfigError(f"model.{INIT_KEY}={init!r} holds a {family.name} model; preset {preset!r} is of family "
                          f"{wanted!r}: name a preset of its family ({presets})")  # fmt: skip
    tunable = [f for f in type(stored).tunable if f in type(stored).field_names()]
    for key, value in overrides.items():
        if key not in tunable and key in type(stored).field_names() and stored.replace(**{key: value}) != stored:
            raise ConfigError(f"model.{key}={value!r}: the weights of model.{INIT_KEY}={init!r} fix it at "
                              f"{getattr(stored, key)!r}; a run from pretrained weights may set only "
                              f"{', '.join(tunable) or 'none of the model fields'}")  # fmt: skip
    return stored.replace(**overrides)


def spec_from_argument(spec: str, *, resume: bool = False) -> RunSpec:
    """``archlab train``'s first argument: a run file, a run folder, or a preset name.

    With ``resume`` (``--resume``), an argument that is a path (a path separator in it, or an existing file or
    folder) but no run folder or run file is refused as a folder with no run to resume, not read as a preset.
    """
    path = Path(spec)
    if resume and spec not in PRESETS and path.suffix.lower() not in (".json", ".yaml", ".yml"):
        resumable = "--resume continues a run folder (one with a run.json), or the --out folder of a preset or RUN.json"
        if path.is_dir() and not (path / RUN_FILE).is_file():
            raise ConfigError(f"{spec} is a folder without a {RUN_FILE}: not a run, so no run to resume there; "
                              f"{resumable}")  # fmt: skip
        if path.is_file():
            raise ConfigError(f"{spec} is a file, not a run folder: no run to resume there; {resumable}")
        if not path.exists() and any(sep and sep in spec for sep in ("/", os.sep, os.altsep)):
            raise ConfigError(f"{spec}: no such folder, so no run to resume there; {resumable}")
    if path.is_dir() or path.suffix.lower() in (".json", ".yaml", ".yml"):
        return RunSpec.load(path)
    if path.is_file() and spec not in PRESETS:
        raise ConfigError(f"{spec}: a run description is a .json file (or .yaml / .yml with PyYAML), not "
                          f"{path.suffix or 'a file without a suffix'}; or name a preset "
                          "(archlab presets)")  # fmt: skip
    return RunSpec(get_preset(spec).name)


# -- resolution ------------------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """A resolved run with its data built (see the module docstring): ready to train or evaluate."""

    spec: RunSpec
    model_config: Config
    data: DataConfig
    train: TrainConfig
    run_data: RunData
    notes: list[str]

    @property
    def family(self) -> Family:
        return self.spec.family

    @property
    def task(self) -> str:
        return self.train.task

    def to_dict(self) -> dict[str, Any]:
        """``run.json``: every field of every section, as resolved (and ``model.init``, where the weights came from)."""
        init = {} if self.spec.init is None else {INIT_KEY: self.spec.init}
        return {
            "archlab": archlab.__version__,
            "model": {PRESET_KEY: self.spec.preset, **init, **self.model_config.to_dict()},
            "data": self.data.to_dict(),
            "train": self.train.to_dict(),
        }

    def build_model(self, *, pretrained: bool = True) -> nn.Module:
        """The model to train, initialised from ``train.seed`` (the family's trained class, e.g. BertForPreTraining),
        with ``model.init``'s weights (unless ``pretrained=False``: the shapes alone) and ``train.lora``'s adapters."""
        torch.manual_seed(self.train.seed)
        train_cls = None if self.family.train_cls is None else self.family.train_cls.__name__
        check_fits_in_memory(self.model_config, train_cls)
        model = build_model(self.model_config, model_class=train_cls)
        if self.spec.init is not None and pretrained:
            weights = load_model(pretrained_weights(self.spec.init)[0])
            if lora_layers(weights):  # a LoRA run's checkpoint: its adapters merged into the weights
                unload_lora(weights)
            model.to(next(weights.parameters()).dtype).load_state_dict(weights.state_dict())
        if self.train.lora:
            t = self.train
            apply_lora(model, t.lora, r=t.lora_r, alpha=t.lora_alpha, dropout=t.lora_dropout)
        return model

    def extra_metrics(self) -> Callable[[nn.Module], dict[str, float]] | None:
        """Exact match and BLEU or chrF (whichever fits the outputs) of greedy decoding on the validation
        pairs, for seq2seq runs."""
        if self.task != "seq2seq":
            return None
        tok, cap = self.run_data.tokenizer, self.train.eval_batches
        return lambda model: seq2seq_generation_metrics(
            model, self.run_data.valid(), eos_id=tok.eos_id, detokenize=tok.decode, max_batches=cap
        )


def prepare(spec: RunSpec, *, tokenizer: Tokenizer | None = None) -> PreparedRun:
    """Resolve ``spec`` and build its data (``tokenizer``: reuse a saved one instead of making it)."""
    family = spec.family
    who = f"preset {spec.preset} (family {family.name})"
    base = spec.model_config()
    task = spec.train_config().task
    task = family.task if task == "auto" else task
    if task not in (family.task, "custom"):  # ('custom' is checked against the model's batch_keys below)
        trained = (family.train_cls or family.model_cls).__name__
        raise ConfigError(f"train.task={task!r} does not fit {who}: its model ({trained}) trains on task "
                          f"{family.task!r}; leave train.task at 'auto' (or set it to {family.task!r})")  # fmt: skip
    data = resolve_data(spec.data_config(), task, base, who)
    notes: list[str] = []

    train = spec.train_config().replace(task=task)
    if spec.init is not None:
        tokenizer, data, train = _from_pretrained(spec, base, tokenizer, data, train, notes)
    if train.lora:  # the targets checked now, on a model of the run's shapes on the meta device
        with torch.device("meta"):
            apply_lora(build_model(base), train.lora, r=train.lora_r, alpha=train.lora_alpha, dropout=train.lora_dropout)
    if "clip" not in spec.train and hasattr(base, "grad_clip") and base.grad_clip != train.clip:
        train = train.replace(clip=base.grad_clip)
        notes.append(f"train.clip={base.grad_clip} from the model config's grad_clip (set train.clip to change it)")

    _check_tensor_parallel(train, task, family.train_cls or family.model_cls, base, who)  # before the data is read
    # the ranks that split the data: under tp none (every rank reads the whole batch), under fsdp+tp dp's
    env = D.data_parallel_env(D.detect(), train.parallel, train.tp_group_size)
    run_data = build_data(
        data, task, base, batch_size=train.micro_batch_size(env.world_size) * env.world_size, tokenizer=tokenizer,
        rank=env.rank, world_size=env.world_size,
    )  # fmt: skip
    overrides = run_data.model_overrides(base)
    if spec.init is not None:  # the weights fix the vocabulary; their tokenizer's ids fit it (checked above)
        overrides = {}
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    if changed:
        why = {"vocab_size": "the tokenizer", "pad_id": "the tokenizer", "n_classes": "the labels"}
        notes.append("model: " + ", ".join(f"{k} {getattr(base, k)} -> {v} (from {why[k]})" for k, v in changed.items()))
    model_config = base.replace(**overrides) if overrides else base
    trained = family.train_cls or family.model_cls
    if run_data.tokenizer is not None and task == "classification" and not _takes_mask(trained):
        notes.append(f"{trained.__name__} takes no attention_mask: it reads the padding of shorter texts as tokens")
    return PreparedRun(spec, model_config, data, train, run_data, notes)


def _check_tensor_parallel(train: TrainConfig, task: str, model_cls: type, base: Config, who: str) -> None:
    """Under torchrun with ``train.parallel`` ``tp`` or ``fsdp+tp``: ConfigError unless the ranks can split this
    model (a decoder-only LM trained on ``lm`` whose heads, KV heads and FFN width the tensor-parallel group's size
    divides: the world size under ``tp``, ``train.tp_size`` under ``fsdp+tp``, which must divide the world size),
    before any data is read."""
    env = D.detect()
    if train.parallel not in TENSOR_PARALLEL or not env.distributed:
        return
    from archlab.models.decoder import DecoderLM
    from archlab.parallel import check_tensor_parallel

    if task != "lm" or not issubclass(model_cls, DecoderLM):
        raise ConfigError(f"train.parallel={train.parallel!r} shards decoder-only LMs (GPT, Llama) trained on task "
                          f"'lm'; {who} is a {model_cls.__name__} trained on task {task!r}: use parallel='ddp' or "
                          "'fsdp'")  # fmt: skip
    if train.parallel == "tp":
        check_tensor_parallel(base, env.world_size)
        return
    tp = D.mesh_shape(env, train.parallel, train.tp_group_size)[1]
    check_tensor_parallel(base, tp, setting="train.tp_size")


def _from_pretrained(
    spec: RunSpec, base: Config, tokenizer: Tokenizer | None, data: DataConfig, train: TrainConfig, notes: list[str]
) -> tuple[Tokenizer, DataConfig, TrainConfig]:  # fmt: skip
    """A run from ``model.init``'s weights: their tokenizer (``tokenizer``, a saved copy, when given), and the
    defaults of ``data.seq_len`` and ``train.lr`` for it (see the module docstring)."""
    init = f"model.{INIT_KEY}={spec.init!r}"
    if spec.data.get("tokenizer", "auto") != "auto":
        raise ConfigError(f"data.tokenizer={spec.data['tokenizer']!r}: a run from pretrained weights ({init}) reads "
                          "text with their own tokenizer; leave data.tokenizer at 'auto'")  # fmt: skip
    if tokenizer is None:
        tok_dir = pretrained_weights(spec.init)[1]
        if tok_dir is None:
            raise ConfigError(f"{init}: no {TOKENIZER_FILE} comes with these weights; a run reads text with the "
                              "weights' own tokenizer")  # fmt: skip
        tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size > base.vocab_size:
        raise ConfigError(f"{init}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                          f"{base.vocab_size}: they do not belong together")  # fmt: skip
    data = data.replace(tokenizer="auto")  # auto = the weights' own tokenizer (resolve_data chose one to train)
    if spec.data.get("seq_len") is None and data.seq_len is not None and data.seq_len > PRETRAINED_SEQ_LEN:
        data = data.replace(seq_len=PRETRAINED_SEQ_LEN)
        notes.append(f"data.seq_len={PRETRAINED_SEQ_LEN} of the model's {base.context_length}-token context "
                     "(set data.seq_len to change it)")  # fmt: skip
    if "lr" not in spec.train:
        lr = PRETRAINED_LR["lora" if train.lora else "full"]
        train = train.replace(lr=lr)
        notes.append(f"train.lr={lr:g} for {'LoRA adapters on ' if train.lora else ''}pretrained weights "
                     "(set train.lr to change it)")  # fmt: skip
    return tokenizer, data, train


def _takes_mask(model_cls: type[nn.Module]) -> bool:
    return "attention_mask" in inspect.signature(model_cls.forward).parameters


# -- train -----------------------------------------------------------------------------------------------------


def default_out_dir(spec: RunSpec, name: str | None = None) -> Path:
    """``runs/<name or preset>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{name or spec.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_run(
    spec: RunSpec, out_dir: str | Path, *, resume: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train the run into ``out_dir`` (or continue it with ``resume``); returns a summary (JSON-able).

    A folder that already holds checkpoints is only continued with ``resume``; then its ``run.json``
    must agree with ``spec`` on the model and the data (training settings are checked by the Trainer).
    """
    out = Path(out_dir)
    saved = _read_run_json(out) if (out / RUN_FILE).is_file() else None
    has_checkpoints = latest_checkpoint(out / CHECKPOINTS) is not None
    if has_checkpoints and not resume:
        raise ConfigError(f"{out} already holds a trained run; pass --resume to continue it, or choose another --out")
    for folder in (out, out / CHECKPOINTS):  # before the data is read and a tokenizer trained
        check_writable_folder(folder, "--out")
    tokenizer = load_tokenizer(out) if resume and saved is not None and (out / TOKENIZER_FILE).is_file() else None
    run = prepare(spec, tokenizer=tokenizer)
    resolved = run.to_dict()
    if resume and saved is not None:
        _check_same_run(saved, resolved, out)

    is_main = D.detect().is_main
    if not is_main:  # under torchrun, rank 0 alone reports
        echo = lambda line: None  # noqa: E731
    continuing = resume and saved is not None
    last = latest_checkpoint(out / CHECKPOINTS) if continuing else None
    if last is not None and load_checkpoint(last).step == run.train.steps:
        return _already_complete(run, out, last, echo)
    if is_main and not continuing:  # a killed run can be resumed from its folder alone
        out.mkdir(parents=True, exist_ok=True)
        if run.run_data.tokenizer is not None:  # first: a run.json found means its tokenizer is whole
            run.run_data.tokenizer.save(out)
        write_text_atomic(out / RUN_FILE, json.dumps(resolved, indent=2) + "\n")
    model = run.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    t = run.train
    echo(f"run {spec.preset} (family {run.family.name}, task {run.task}) -> {out}")
    echo(f"data: {run.run_data.describe}")
    for note in run.notes:
        echo(note)
    echo(f"train: {t.steps} steps of {t.batch_size} {'samples' if run.task == 'classification' else 'sequences'}, "
         f"{t.schedule} lr {t.peak_lr:g}, warmup {t.warmup_steps}; model {type(model).__name__} with {n_params:,} parameters")  # fmt: skip
    lora = lora_report(model) if t.lora else None
    if lora is not None:
        echo(str(lora))

    trainer = Trainer(model, t, run.run_data.train, eval_batches=run.run_data.valid, out_dir=out,
                      extra_metrics=run.extra_metrics(), unigram_loss=run.run_data.unigram)  # fmt: skip
    started = time.perf_counter()
    result = trainer.fit(resume=resume)
    if is_main and continuing:  # only once the Trainer accepted the new training settings (e.g. more steps)
        write_text_atomic(out / RUN_FILE, json.dumps(resolved, indent=2) + "\n")
    summary = {
        "out_dir": str(out), "preset": spec.preset, "task": run.task, "step": result.step,
        "parameters": n_params, "seconds": round(time.perf_counter() - started, 1),
        "train": result.train, "eval": result.eval, "checkpoint": str(result.checkpoint),
        "loss_plot": None if result.loss_plot is None else str(result.loss_plot),
    }  # fmt: skip
    if lora is not None:
        summary["trainable_parameters"] = lora.trainable
    if run.run_data.unigram is not None:
        summary["unigram_loss"] = run.run_data.unigram
    echo(describe_eval(result.eval, summary.get("unigram_loss"), prefix=f"step {result.step}: validation"))
    echo(f"checkpoint {result.checkpoint}")
    if result.loss_plot is not None:
        echo(f"loss curve {result.loss_plot}")
    return summary


def _already_complete(run: PreparedRun, out: Path, checkpoint: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    """The summary of a run resumed at its last step: nothing to train; its final metrics from metrics.jsonl."""
    check_model_config(checkpoint, run.model_config)
    remove_temporaries(out / CHECKPOINTS)  # what the kill that ended it may have left
    step = run.train.steps
    records = read_metrics(out / METRICS_FILE) if (out / METRICS_FILE).is_file() else {}
    final = {}
    for split in ("train", "eval"):
        record = next((r for r in records.get(split, []) if r["step"] == step), {})
        final[split] = {k: v for k, v in record.items() if k not in ("split", "step")}
    with torch.device("meta"):
        n_params = sum(p.numel() for p in run.build_model(pretrained=False).parameters())
    plot = plot_loss_curve(out / METRICS_FILE, out / PLOT_FILE) if records else None  # (a kill may have cut it)
    summary = {
        "out_dir": str(out), "preset": run.spec.preset, "task": run.task, "step": step, "parameters": n_params,
        "seconds": 0.0, "train": final["train"], "eval": final["eval"], "checkpoint": str(checkpoint),
        "loss_plot": None if plot is None else str(plot), "already_complete": True,
    }  # fmt: skip
    if run.run_data.unigram is not None:
        summary["unigram_loss"] = run.run_data.unigram
    echo(f"{out} is already complete: its checkpoint is at train.steps={step}, nothing to train "
         "(raise train.steps to train further)")  # fmt: skip
    if final["eval"]:
        echo(describe_eval(final["eval"], summary.get("unigram_loss"), prefix=f"step {step}: validation"))
    else:
        echo(f"{out / METRICS_FILE} holds no validation metrics of step {step}: `archlab eval {out}` computes them")
    echo(f"checkpoint {checkpoint}")
    return summary


def describe_eval(metrics: dict[str, float], unigram: float | None = None, prefix: str = "validation") -> str:
    """One line: loss (nats per target), perplexity, accuracy, exact match, BLEU or chrF, a biLM's two directions
    (ELMo: ``loss = forward_nll + backward_nll``), and the unigram baseline."""
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    for side in ("forward", "backward"):
        if f"{side}_nll" in metrics:
            ppl = f" (ppl {metrics[f'{side}_ppl']:.2f})" if f"{side}_ppl" in metrics else ""
            parts.append(f"{side} nll {metrics[f'{side}_nll']:.4f}{ppl}")
    if "ppl" in metrics:
        parts.append(f"ppl {metrics['ppl']:.2f}")
    if "accuracy" in metrics:
        parts.append(f"accuracy {100 * metrics['accuracy']:.2f}%")
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.2f}%")
    if "bleu" in metrics:
        parts.append(f"BLEU {metrics['bleu']:.2f}")
    if "chrf" in metrics:
        parts.append(f"chrF {metrics['chrf']:.2f} (outputs under {BLEU_MAX_ORDER} words, where BLEU is 0)")
    line = f"{prefix} " + ", ".join(parts)
    if unigram is not None:
        line += f"; unigram baseline {unigram:.4f} nats/token"
    return line


def _read_run_json(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / RUN_FILE} is not a readable run description: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), dict) for s in SECTIONS):
        raise CheckpointError(f"{folder / RUN_FILE} is not a run description (needs sections {', '.join(SECTIONS)})")
    return data


def _check_same_run(saved: dict[str, Any], resolved: dict[str, Any], out: Path) -> None:
    changed = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {resolved[section].get(key)!r}"
        for section in ("model", "data")
        for key in sorted(set(saved[section]) | set(resolved[section]))
        if saved[section].get(key) != resolved[section].get(key)
    ]
    if changed:
        raise ConfigError(f"cannot resume {out}: this run changes {'; '.join(changed)}; resume with the same model "
                          f"and data (archlab train {out} --resume), or train into another --out")  # fmt: skip


# -- a trained run, opened again: eval and generate --------------------------------------------------------------


@dataclass
class OpenedRun:
    """A trained model with what it needs: the run folder (None for a bare model folder), its ``run.json``
    spec, the tokenizer, and the checkpoint the model was read from (in eval mode)."""

    run_dir: Path | None
    checkpoint: Path
    spec: RunSpec | None
    tokenizer: Tokenizer | None
    model: nn.Module

    @property
    def task(self) -> str:
        if self.spec is not None:
            return self.spec.train_config().task
        from archlab.models.registry import family_of

        return family_of(self.model.config).task


def locate_checkpoint(path: str | Path) -> tuple[Path | None, Path, Path | None]:
    """What generate, eval and convert read from ``path``: ``(run folder or None, checkpoint, tokenizer folder
    or None)``. ``path`` is a run folder (its latest checkpoint) or a checkpoint / model folder (its run found in
    the parents); the tokenizer is the checkpoint's own ``tokenizer.json``, else the run's."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a run folder (with {RUN_FILE}) or a checkpoint folder")
    if (path / RUN_FILE).is_file():
        run_dir, checkpoint = path, latest_checkpoint(path / CHECKPOINTS)
        if checkpoint is None:
            partial = [p for _, p in step_dirs(path / CHECKPOINTS) if p.is_dir()]  # by step, incomplete all
            if not partial:
                raise CheckpointError(f"{path} is a run without a checkpoint yet (nothing under {path / CHECKPOINTS})")
            lacks = [f for f in CHECKPOINT_FILES if not (partial[-1] / f).is_file()]
            raise CheckpointError(f"{path} holds no complete checkpoint: {partial[-1]} lacks {', '.join(lacks)} (a "
                                  f"checkpoint holds the files {', '.join(CHECKPOINT_FILES)})")  # fmt: skip
    elif (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        checkpoint = path
        run_dir = next((p for p in path.resolve().parents if (p / RUN_FILE).is_file()), None)
    else:
        raise CheckpointError(
            f"{path} is neither a run folder (no {RUN_FILE}) nor a checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    tok_dir = next((d for d in (checkpoint, run_dir) if d is not None and (d / TOKENIZER_FILE).is_file()), None)
    return run_dir, checkpoint, tok_dir


def open_run(path: str | Path) -> OpenedRun:
    """A run folder (its latest checkpoint) or a checkpoint / model folder (see :func:`locate_checkpoint`)."""
    run_dir, checkpoint, tok_dir = locate_checkpoint(path)
    spec = None if run_dir is None else RunSpec.from_dict(_read_run_json(run_dir), where=str(run_dir / RUN_FILE))
    tokenizer = None if tok_dir is None else load_tokenizer(tok_dir)
    model = load_model(checkpoint)
    model.eval()
    return OpenedRun(run_dir, checkpoint, spec, tokenizer, model)


def convert_run(src: str | Path, dst: str | Path, *, quantize: str | None = None) -> str:
    """``archlab convert``: :func:`archlab.interop.convert.convert` of ``src``, which may also be a run folder (its
    latest checkpoint, as generate and eval read it) or a checkpoint in one; the tokenizer goes along; ``quantize``
    as ``convert`` takes it."""
    src = Path(src)
    if (src / RUN_FILE).is_file() or ((src / CONFIG_FILE).is_file() and (src / WEIGHTS_FILE).is_file()):
        _, checkpoint, tok_dir = locate_checkpoint(src)
        return convert(checkpoint, dst, tokenizer_dir=tok_dir, quantize=quantize)
    return convert(src, dst, quantize=quantize)  # e.g. a sharded Hugging Face folder


def evaluate_run(opened: OpenedRun, *, max_batches: int | None = None) -> dict[str, Any]:
    """The run's validation metrics for the opened checkpoint (all validation batches, or ``max_batches``)."""
    if opened.spec is None:
        raise CheckpointError(f"{opened.checkpoint} is not inside a run folder (no {RUN_FILE} above it); "
                              "eval rebuilds the run's validation data from it")  # fmt: skip
    trained = opened.spec.data.get("tokenizer")
    if opened.tokenizer is None and opened.spec.init is None and trained in TRAINED_TOKENIZERS:
        raise CheckpointError(f"no {TOKENIZER_FILE} in {opened.checkpoint} or its run folder: eval reads the "
                              f"validation text with the {trained} tokenizer the run trained, and one trained again "
                              "could give other ids")  # fmt: skip
    spec = dataclasses.replace(opened.spec, train={**opened.spec.train, "eval_batches": max_batches,
                                                   "progress": False, "tensorboard": False})  # fmt: skip
    run = prepare(spec, tokenizer=opened.tokenizer)
    trainer = Trainer(opened.model, run.train, run.run_data.train, eval_batches=run.run_data.valid,
                      extra_metrics=run.extra_metrics())  # fmt: skip
    metrics = trainer.evaluate()
    out = {"checkpoint": str(opened.checkpoint), "task": run.task, "eval": metrics}
    if run.run_data.unigram is not None:
        out["unigram_loss"] = run.run_data.unigram
    return out


#: What :func:`generate_text` decodes at most when not told: as many of these as the model's context holds.
DEFAULT_NEW_TOKENS = 100


def generate_text(
    opened: OpenedRun, prompt: str, *, max_new_tokens: int | None = None, greedy: bool = False,
    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None, beam: int | None = None,
    seed: int | None = None, note: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Continue ``prompt`` (lm) or translate it (seq2seq): ``{"task", "prompt", "output", "tokens"}``.

    lm: sampling (``temperature`` 1 unless given, ``top_k``, ``top_p``, ``seed``) unless ``greedy``; an
    empty prompt starts after a document boundary (``</s>``). seq2seq: greedy decoding, or beam search
    with ``beam`` beams. Both stop at ``</s>``.

    ``max_new_tokens`` given: at most that many new tokens, a ConfigError when the model's context does not
    hold them. ``None`` (the default): up to :data:`DEFAULT_NEW_TOKENS`, fewer where the context holds fewer
    after the prompt, which ``note`` (when given) is told in one line.
    """
    tok, model, task = opened.tokenizer, opened.model, opened.task
    if task not in ("lm", "seq2seq"):
        raise ConfigError(f"generate is for lm and seq2seq runs; this one trains task {task!r} (use archlab eval)")
    if tok is None:
        raise CheckpointError(f"no {TOKENIZER_FILE} in {opened.checkpoint} or its run folder: generate needs one")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    given = [f"--{k.replace('_', '-')}" for k, v in sampling.items() if v is not None]
    eos = tok.eos_id
    device = next(model.parameters()).device
    if task == "lm":
        if beam is not None:
            raise ConfigError("--beam is for seq2seq runs; an lm run samples (or decodes greedily with --greedy)")
        if greedy and given:
            raise ConfigError(f"--greedy takes the most likely token; {', '.join(given)} only act when sampling")
        ids = encode_prompt(tok, prompt) or ([eos] if eos is not None else [])
        if not ids:
            raise DataError("the prompt is empty and the tokenizer has no </s> to start from")
        if max_new_tokens is None:
            max_new_tokens = _default_new_tokens(model, len(ids), note)
        check_room(model, len(ids), max_new_tokens)
        start = torch.tensor([ids], device=device)
        step = model if hasattr(model, "decoder_step") else (lambda tokens, cache=None: model(tokens))
        out = generate(
            step, start, max_new_tokens=max_new_tokens, do_sample=not greedy, seed=seed,
            temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p,
            stop_tokens=[] if eos is None else [eos], pad_id=eos, use_cache=hasattr(model, "decoder_step"),
        )[0, len(ids):].tolist()  # fmt: skip
    else:  # seq2seq
        if given:
            raise ConfigError(f"seq2seq decoding is greedy or beam search (--beam K); {', '.join(given)}: lm runs only")
        vocab = model.config.vocab_size
        if beam is not None and not 1 <= beam <= vocab:  # (more beams than tokens: copies of the source, no more text)
            raise ConfigError(f"--beam {beam} must be in [1, {vocab}] (the vocabulary's tokens; 4-10 is usual)")
        if max_new_tokens is None:  # the decoder reads from <s>, not the source: nothing to cut for a prompt
            max_new_tokens = DEFAULT_NEW_TOKENS
        src = encode_prompt(tok, prompt)
        if not src:
            raise DataError("the prompt (the source sequence) is empty")
        src_ids = torch.tensor([src], device=device)
        mask = torch.ones_like(src_ids, dtype=torch.bool)
        with torch.no_grad():
            memory = model.encode(src_ids, mask)
        bos = torch.tensor([[tok.bos_id]], device=device)
        if beam is None:
            out = generate(model.decoder_step(memory, mask), bos, max_new_tokens=max_new_tokens, cache=model.new_cache(),
                           stop_tokens=[eos], pad_id=eos)[0, 1:].tolist()  # fmt: skip
        else:
            step = model.decoder_step(expand_for_beams(memory, beam), expand_for_beams(mask, beam))
            out = beam_search(step, bos, beam_size=beam, max_new_tokens=max_new_tokens, eos_id=eos,
                              cache=model.new_cache()).sequences[0, 1:].tolist()  # fmt: skip
    if eos is not None and eos in out:
        out = out[: out.index(eos)]
    return {"task": task, "prompt": prompt, "output": tok.decode(out), "tokens": len(out)}


def _default_new_tokens(model: nn.Module, n_prompt: int, note: Callable[[str], None] | None) -> int:
    """:data:`DEFAULT_NEW_TOKENS`, or as many as the context holds after ``n_prompt`` tokens (said to ``note``)."""
    limit = context_limit(model)
    room = DEFAULT_NEW_TOKENS if limit is None else limit - n_prompt + 1  # the last new token is not fed back
    if room >= DEFAULT_NEW_TOKENS or room < 1:  # no room at all: check_room says the prompt is too long
        return DEFAULT_NEW_TOKENS
    if note is not None:
        note(f"generating at most {room} new tokens, not the default {DEFAULT_NEW_TOKENS}: the prompt's {n_prompt} "
             f"tokens leave room for {room} in the context of {type(model).__name__} (max_len={limit})")  # fmt: skip
    return room


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; DataError naming the characters the run's vocabulary lacks (each would be ``<unk>``,
    and a model trained without ``<unk>`` answers it with nothing useful: a seq2seq run with an empty output)."""
    ids = tok.encode(prompt)
    unk = tok.unk_id
    if unk is None or unk not in ids:
        return ids
    missing = "".join(sorted({c for c in prompt if unk in tok.encode(c)}))
    known = getattr(tok, "chars", None)  # a character tokenizer's whole vocabulary, worth showing when short
    allowed = f"; it knows {known!r}" if known is not None and len(known) <= 100 else ""
    raise DataError(f"--prompt {prompt!r} holds characters not in the run's vocabulary: {missing!r}{allowed}")


