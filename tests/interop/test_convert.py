"""archlab convert: every Hugging Face family both ways, through the CLI, with heads kept.

Checked against Hugging Face models built from random-init configs (no download): outputs equal
after HF -> archlab -> HF; a saved BertForPreTraining reloads as itself (its class is recorded).
"""

import pytest
import torch
import transformers

from archlab.cli import main
from archlab.errors import CheckpointError
from archlab.interop.convert import convert
from archlab.interop.io import load_model, save_model
from archlab.models import get_config
from archlab.models.bert import BertConfig, BertForPreTraining, BertForSequenceClassification
from archlab.models.gpt import GPT
from archlab.models.transformer import EncoderDecoderTransformer


def _bert_hf():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=24)
    return transformers.BertForPreTraining(cfg).eval()


def test_bert_pretraining_both_ways_keeps_heads(tmp_path):
    hf = _bert_hf()
    hf.save_pretrained(tmp_path / "hf")
    assert convert(tmp_path / "hf", tmp_path / "ours") == "bert -> archlab"
    ours = load_model(tmp_path / "ours").eval()
    assert isinstance(ours, BertForPreTraining)
    assert convert(tmp_path / "ours", tmp_path / "hf2") == "archlab -> bert"
    back = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf2", local_files_only=True).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).prediction_logits, hf(ids).prediction_logits)


def test_bert_sequence_classification_both_ways(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=24, num_labels=5)
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert(tmp_path / "hf", tmp_path / "ours") == "bert -> archlab"
    ours = load_model(tmp_path / "ours").eval()
    assert type(ours) is BertForSequenceClassification and ours.n_classes == 5
    assert convert(tmp_path / "ours", tmp_path / "hf2") == "archlab -> bert"
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf2", local_files_only=True).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_vit_through_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "vit -> archlab" in capsys.readouterr().out
    ours = load_model(tmp_path / "ours").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)


def test_unconvertible_sources(tmp_path, capsys):
    model = EncoderDecoderTransformer(get_config("transformer-tiny"))
    save_model(model, tmp_path / "encdec")
    with pytest.raises(CheckpointError, match="no Hugging Face format"):
        convert(tmp_path / "encdec", tmp_path / "out")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    assert main(["convert", str(tmp_path / "t5"), str(tmp_path / "out")]) == 2
    assert "model_type='t5'" in capsys.readouterr().err


def test_load_model_rebuilds_the_saved_class(tmp_path):
    model = BertForPreTraining(BertConfig(vocab_size=30, max_len=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)).eval()
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    assert type(again) is BertForPreTraining
    ids = torch.randint(0, 30, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).mlm_logits, model(ids).mlm_logits)


@pytest.mark.parametrize("kind", ["file", "under a file", "folder of other files"])
def test_a_destination_that_is_not_a_model_folder_is_refused_and_left_alone(tmp_path, capsys, kind):
    """DST is replaced whole: a file, or a folder holding something else (a run, a project), is refused before any
    work, not deleted; a new, empty or model folder is written."""
    save_model(GPT(get_config("gpt-nano")), tmp_path / "src")  # a model that converts: without the check, DST goes
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    (tmp_path / "file").write_text("precious")
    dst = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "sub",
           "folder of other files": tmp_path / "mine"}[kind]  # fmt: skip
    assert main(["convert", str(tmp_path / "src"), str(dst)]) == 2
    assert f"DST {str(dst)!r} " in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "src"]  # no hidden leftovers either


@pytest.mark.parametrize("family, hf_config", [
    ("llama", {"model_type": "llama", "hidden_size": 48, "num_attention_heads": 3, "num_hidden_layers": 3,
               "intermediate_size": 96, "vocab_size": 256}),
    ("gpt2", {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 256}),
])  # fmt: skip
def test_weights_of_another_architecture_are_refused_before_the_model_is_built(tmp_path, monkeypatch, family,
                                                                                hf_config):
    """A GPT-2's weights under a config of another shape: a config without sizes takes Llama-7B's defaults, whose
    real build before the check was killed for memory; the check now reads shapes built on the meta device."""
    import json

    import archlab.interop.gpt2 as gpt2_module
    import archlab.interop.llama as llama_module
    from archlab.interop.gpt2 import save_gpt2

    save_gpt2(GPT(get_config("gpt-nano")), tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    module = {"llama": llama_module, "gpt2": gpt2_module}[family]
    cls_name = {"llama": "Llama", "gpt2": "GPT"}[family]
    built, real = [], getattr(module, cls_name)

    def spy(config):
        model = real(config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(module, cls_name, spy)
    with pytest.raises(CheckpointError, match=r"hf/model.safetensors does not fit the model: "):
        convert(tmp_path / "hf", tmp_path / "out")
    assert built == ["meta"] and not (tmp_path / "out").exists()
