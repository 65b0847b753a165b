"""A run description (archlab.train.run + sources): sections, --set overrides, resolution, run.json round trip."""

import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from archlab.data import load_tokenizer
from archlab.errors import ConfigError, DataError
from archlab.train.run import RunSpec, prepare, spec_from_argument
from archlab.train.sources import DataConfig, resolve_data
from archlab.train.tasks import get_task

SMALL_STDLIB = {"max_bytes": 100_000, "vocab_size": 300, "seq_len": 16}


def gpt_spec(**train):
    return RunSpec("gpt-nano", {}, dict(SMALL_STDLIB), {"steps": 4, "batch_size": 4, "warmup": 1, **train})


# -- the description ----------------------------------------------------------------------------------------


def test_a_spec_round_trips_through_json_and_yaml(tmp_path):
    spec = RunSpec("gpt-nano", {"n_layers": 2}, {"source": "stdlib"}, {"steps": 10, "warmup": 2, "lr": 1e-3})
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    (tmp_path / "run.json").write_text(json.dumps(spec.to_dict()))
    assert RunSpec.load(tmp_path / "run.json") == spec
    assert spec_from_argument(str(tmp_path / "run.json")) == spec
    assert spec_from_argument(str(tmp_path)) == spec  # a run folder: its run.json
    assert spec_from_argument("gpt-nano") == RunSpec("gpt-nano")
    yaml = pytest.importorskip("yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(spec.to_dict()))
    assert RunSpec.load(tmp_path / "run.yaml") == spec


def test_yaml_without_pyyaml_says_to_use_json(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text("model: {preset: gpt-nano}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    with pytest.raises(ConfigError, match="YAML needs PyYAML, which is not installed; write the run as JSON"):
        RunSpec.load(tmp_path / "run.yaml")


@pytest.mark.parametrize(
    "data, words",
    [
        ({"model": {"n_layers": 2}}, "the model section needs a 'preset'"),
        ({"model": {"preset": "gpt-nano"}, "trian": {}}, "unknown section 'trian' (did you mean 'train'?)"),
        ({"model": {"preset": "gpt-nano", "n_layer": 2}}, "unknown key 'n_layer' (did you mean 'n_layers'?)"),
        ({"model": {"preset": "gpt-nano"}, "data": {"sorce": "x"}}, "unknown key 'sorce' (did you mean 'source'?)"),
        ({"model": {"preset": "gpt-nano"}, "train": {"steps": 0}}, "steps=0 must be > 0"),
        ({"model": {"preset": "gpt-nanoo"}}, "unknown preset 'gpt-nanoo' (did you mean 'gpt-nano'?)"),
        ({"model": {"preset": None}}, "preset=None must be a preset name (a string); known: bert-base, "),
        ({"model": {"preset": 5}}, "preset=5 must be a preset name (a string); known: bert-base, "),
        ({"model": {"preset": "gpt-nano"}, "data": []}, "the 'data' section of a run must be a JSON object"),
    ],
)
def test_bad_descriptions_name_what_is_wrong(data, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        RunSpec.from_dict(data)


def test_bad_files_are_config_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        RunSpec.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        RunSpec.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="folder without a run.json: not a run"):
        RunSpec.load(tmp_path)


@pytest.mark.parametrize("preset", ["gpt-nano", "elmo-small"])
def test_a_text_too_short_for_one_row_names_the_file_its_tokens_and_seq_len(tmp_path, preset):
    """Two one-letter lines under rows of 128 tokens: the error said only "ids has 3 tokens; ..."."""
    (tmp_path / "tiny.txt").write_text("a\nb\n")
    spec = RunSpec(preset, {}, {"source": str(tmp_path / "tiny.txt"), "tokenizer": "byte", "seq_len": 128})
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'tiny.txt'))}, .*: 3 training / 3 validation "
                                        r"tokens \(byte tokenizer\), rows of data.seq_len=128: ids has 3 tokens"):
        prepare(spec)


def test_a_run_file_of_another_format_is_named_not_taken_for_a_preset(tmp_path, monkeypatch):
    """`archlab train run.toml` said "unknown preset 'run.toml'" with the list of presets; a preset name still wins."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('[model]\npreset = "gpt-nano"\n')
    with pytest.raises(ConfigError, match=r"^run.toml: a run description is a .json file .*, not .toml"):
        spec_from_argument("run.toml")
    (tmp_path / "gpt-nano").write_text("a file named like a preset")
    assert spec_from_argument("gpt-nano").preset == "gpt-nano"


def test_a_yaml_error_is_one_line_with_its_place(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [1\n")
    with pytest.raises(ConfigError, match=r"^\S*bad.yaml is not valid YAML: expected ',' or ']', "
                       r"but got '<stream end>' at line 2 column 1$"):
        RunSpec.load(tmp_path / "bad.yaml")


def test_overrides_go_to_their_section():
    spec = RunSpec("gpt-nano").with_overrides(
        {"model.n_layers": 4, "train.lr": 1e-3, "data.source": "/x/y.txt", "steps": 7, "warmup": 1, "positional": "rope"}
    )
    assert spec.model == {"n_layers": 4, "positional": "rope"}
    assert spec.train == {"lr": 1e-3, "steps": 7, "warmup": 1} and spec.data == {"source": "/x/y.txt"}
    assert spec.with_overrides({"model.preset": "gpt-mini"}).preset == "gpt-mini"  # the preset is a model key too
    assert spec.model_config().n_layers == 4 and spec.train_config().steps == 7


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"seed": 1}, "data and train both have 'seed'; write data.seed or train.seed"),
        ({"vocab_size": 9}, "model and data both have 'vocab_size'"),
        ({"stepz": 1}, "no section has a key 'stepz' (did you mean train.steps?)"),
        ({"trian.steps": 1}, "unknown section 'trian' (did you mean 'train'?)"),
        ({"train.lr": -1.0}, "lr=-1.0 must be > 0"),
        ({"model.d_model": 50}, "d_model=50 is not divisible by n_heads=3"),
        ({"train.clip": "big"}, "clip='big' must be a number or null"),
    ],
)
def test_bad_overrides_name_the_key(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        RunSpec("gpt-nano").with_overrides(overrides)


# -- the data of each task -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, source, tokenizer, seq_len",
    [("gpt-nano", "stdlib", "bpe", 128), ("transformer-tiny", "dates", "char", None), ("vit-tiny", "digits", "auto", None),
     ("lstm-lm-small", "stdlib", "bpe", 128), ("bert-mini", "stdlib", "bpe", 512)],
)  # fmt: skip
def test_auto_data_follows_the_family_task(preset, source, tokenizer, seq_len):
    spec = RunSpec(preset)
    data = resolve_data(DataConfig(), spec.family.task, spec.model_config(), preset)
    assert (data.source, data.tokenizer, data.seq_len) == (source, tokenizer, seq_len)


@pytest.mark.parametrize(
    "preset, source, words",
    [
        ("vit-tiny", "stdlib", ("data.source='stdlib' (the standard-library source corpus) does not fit preset vit-tiny "
                                "(family vit), which trains on task 'classification': its data is digits or")),
        ("gpt-nano", "dates", "(a synthetic sequence-to-sequence task) does not fit preset gpt-nano"),
        ("transformer-tiny", "digits", "which trains on task 'seq2seq'"),
        ("textcnn-deck", "digits", "preset textcnn-deck (family textcnn) reads token ids, not images"),
        ("vit-tiny", "a.csv", "preset vit-tiny (family vit) reads images or feature vectors, not text"),
        ("gpt-nano", "a.jsonl", None),  # fits: documents from a JSONL file
        ("elmo-small", "dates", "which trains on task 'custom': its data is stdlib or a .txt/.jsonl/.csv text file"),
    ],
)  # fmt: skip
def test_a_source_the_task_cannot_use_is_refused_before_any_work(preset, source, words):
    spec = RunSpec(preset, {}, {"source": source})
    if words is None:
        assert resolve_data(spec.data_config(), spec.family.task, spec.model_config(), "x").source == source
        return
    with pytest.raises(ConfigError, match=re.escape(words)):
        prepare(spec)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"source": "stdlb"}, "unknown value 'stdlb' (did you mean 'stdlib'?)"),
        ({"source": "data.parquet"}, "or a path to a .txt/.jsonl/.csv file"),
        ({"tokenizer": "bpee"}, "unknown value 'bpee' (did you mean 'bpe'?)"),
        ({"valid_percent": 0}, "valid_percent=0 must be in 1..99"),
        ({"min_length": 5, "max_length": 2}, "max_length=2 must be >= min_length=5"),
        ({"max_bytes": 0}, "max_bytes=0 must be > 0"),
        ({"vocab_size": 10**9}, "vocab_size=1000000000 must be <= 1,048,576"),  # the BPE trainer aborted the process
    ],
)
def test_bad_data_configs_name_the_field(fields, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        DataConfig(**fields)


def test_a_labelled_file_of_one_class_is_refused_before_the_tokenizer(tmp_path, monkeypatch):
    """Every label the same: textcnn trained on n_classes=1 (loss 0, accuracy 100% from step 1), gmlp refused it
    with "n_classes=1 must be >= 2", naming neither the file nor the field."""
    import archlab.train.sources as sources

    monkeypatch.setattr(sources, "make_tokenizer", lambda *a: pytest.fail("a tokenizer was made"))
    (tmp_path / "one.jsonl").write_text("\n".join(json.dumps({"text": f"text {i}", "y": "pos"}) for i in range(50)))
    for preset in ("textcnn-deck", "gmlp-cls-tiny"):
        with pytest.raises(DataError, match=r"one.jsonl: every record has the label 'pos' \(field 'y'\); "
                                            "classification needs at least 2 classes"):
            prepare(RunSpec(preset, {}, {"source": str(tmp_path / "one.jsonl"), "label_field": "y"}))


def test_a_textcnn_trains_on_texts_shorter_than_its_widest_kernel(tmp_path):
    """One-word texts ([CLS] w [SEP]: 3 tokens) against textcnn-deck's width-4 kernel: `archlab train` stopped at its
    first batch with "row 3 has no 4 consecutive real tokens"; they are padded to the width, as Kim pads."""
    lines = [json.dumps({"text": chr(0x4E00 + i), "label": i % 3}) for i in range(60)]  # one character each
    (tmp_path / "short.jsonl").write_text("\n".join(lines))
    run = prepare(RunSpec("textcnn-deck", {}, {"source": str(tmp_path / "short.jsonl"), "tokenizer": "char"}))
    model = run.build_model().eval()
    for batch in (next(iter(run.run_data.train)), *run.run_data.valid()):
        assert int(batch["attention_mask"].sum(1).min()) >= 4
        terms, _ = get_task("classification").run(model, batch, 0.0)
        assert torch.isfinite(terms["sample"])
    with pytest.raises(ConfigError, match=r"data.seq_len=3 is shorter than the widest kernel of the model \(4 tokens"):
        prepare(RunSpec("textcnn-deck", {}, {"source": str(tmp_path / "short.jsonl"), "seq_len": 3}))


def test_a_task_the_family_does_not_train_is_refused_before_the_data(monkeypatch):
    """`--set train.task=classification` on bert-mini built BertForPreTraining, trained it on labelled texts and
    died at the first step with a traceback (AttributeError: 'BertPreTrainingOutput' object has no attribute 'ndim')."""
    import archlab.train.run as run_module

    monkeypatch.setattr(run_module, "build_data", lambda *a, **k: pytest.fail("the data was built"))
    cases = (("bert-mini", "classification", "BertForPreTraining", "mlm"), ("transformer-tiny", "lm",
             "EncoderDecoderTransformer", "seq2seq"), ("gpt-nano", "mlm", "GPT", "lm"))  # fmt: skip
    for preset, task, cls, own in cases:
        with pytest.raises(ConfigError, match=re.escape(f"train.task={task!r} does not fit preset {preset} (family ")
                           + f".*its model \\({cls}\\) trains on task '{own}'; leave train.task at 'auto'"):
            prepare(RunSpec(preset, {}, {}, {"task": task}))
    monkeypatch.undo()
    assert prepare(gpt_spec(task="lm")).task == "lm"  # the family's own task, named, is fine


def test_digits_take_no_tokenizer():
    with pytest.raises(ConfigError, match="data.tokenizer='byte': the digits are images"):
        prepare(RunSpec("vit-tiny", {}, {"tokenizer": "byte"}))


# -- resolution -----------------------------------------------------------------------------------------------


def test_the_tokenizer_sets_the_vocabulary_and_run_json_resolves_to_itself(tmp_path):
    run = prepare(gpt_spec())
    tok = run.run_data.tokenizer
    assert tok.kind == "bpe" and run.model_config.vocab_size == tok.vocab_size <= 300
    assert run.notes == [f"model: vocab_size 256 -> {tok.vocab_size} (from the tokenizer)"]
    resolved = run.to_dict()
    assert resolved["data"]["source"] == "stdlib" and resolved["train"]["task"] == "lm"
    assert resolved["model"]["preset"] == "gpt-nano" and resolved["model"]["vocab_size"] == tok.vocab_size
    assert 0 < run.run_data.unigram < 10
    tok.save(tmp_path)
    again = prepare(RunSpec.from_dict(json.loads(json.dumps(resolved))), tokenizer=load_tokenizer(tmp_path))
    assert again.to_dict() == resolved and again.notes == []


def test_recurrent_models_bring_their_gradient_clip_unless_the_run_sets_one():
    base = RunSpec("lstm-lm-small", {"grad_clip": 2.5}, {**SMALL_STDLIB, "tokenizer": "byte"}, {"steps": 2, "warmup": 1})
    run = prepare(base)
    assert run.train.clip == 2.5
    assert "train.clip=2.5 from the model config's grad_clip" in run.notes[0]
    assert prepare(base.with_overrides({"train.clip": 0.5})).train.clip == 0.5
    assert prepare(base.with_overrides({"train.clip": None})).train.clip is None
    assert prepare(gpt_spec()).train.clip == 1.0  # no grad_clip in GPT's config: TrainConfig's default


def test_files_give_labels_and_pairs(tmp_path):
    lines = [json.dumps({"text": f"text number {i}", "label": ["b", "a", "c"][i % 3]}) for i in range(60)]
    (tmp_path / "cls.jsonl").write_text("\n".join(lines))
    run = prepare(RunSpec("textcnn-deck", {}, {"source": str(tmp_path / "cls.jsonl"), "tokenizer": "char"}))
    assert run.run_data.classes == ("a", "b", "c") and run.model_config.n_classes == 3
    assert run.notes == [f"model: vocab_size 1000 -> {run.run_data.tokenizer.vocab_size} (from the tokenizer), "
                         "n_classes 2 -> 3 (from the labels)"]  # fmt: skip
    gmlp = prepare(RunSpec("gmlp-cls-tiny", {}, {"source": str(tmp_path / "cls.jsonl"), "tokenizer": "char"}))
    assert gmlp.notes[-1] == "GMLPClassifier takes no attention_mask: it reads the padding of shorter texts as tokens"
    model, batch = gmlp.build_model().eval(), next(iter(gmlp.run_data.train))
    assert "attention_mask" in batch  # the task hands the model only what its forward takes
    terms, _ = get_task("classification").run(model, batch, 0.0)
    # the same logits' loss summed in float64: the task's float32 sum differs by rounding only (B terms)
    want = F.cross_entropy(model(batch["inputs"]).double(), batch["labels"], reduction="sum")
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(terms["sample"].double(), want, rtol=len(batch["labels"]) * eps, atol=0)
    batch = next(iter(run.run_data.train))
    assert set(batch) == {"inputs", "labels", "attention_mask"} and int(batch["labels"].max()) <= 2

    (tmp_path / "pairs.csv").write_text("source,target\n" + "\n".join(f"s{i},t{i}" for i in range(40)))
    run = prepare(RunSpec("transformer-tiny", {}, {"source": str(tmp_path / "pairs.csv")}))
    assert run.model_config.vocab_size == run.run_data.tokenizer.vocab_size == 5 + 12  # <pad>.. + s t 0-9
    assert set(next(iter(run.run_data.train))) == {"src_ids", "src_mask", "tgt_in", "tgt_out"}

    (tmp_path / "one.csv").write_text("source,target\na,b\n")
    with pytest.raises(DataError, match="one.csv: no record fell into the (training|validation) split"):
        prepare(RunSpec("transformer-tiny", {}, {"source": str(tmp_path / "one.csv")}))
