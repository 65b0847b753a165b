"""archlab's ViT against Hugging Face's ViTModel / ViTForImageClassification (random init, from configs).

Weights are converted from a HF model and both run on the same images: logits and hidden states agree
within 1e-5 in float32 and 1e-10 in float64. HF's *eager* attention computes the softmax in float32
even for a float64 model (errors ~1e-8), so float64 compares against HF's sdpa attention.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import ViTConfig as HFViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

from archlab.errors import CheckpointError, ConfigError  # noqa: E402
from archlab.interop.vit import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    from_hf,
    from_hf_state_dict,
    load_vit,
    normalize_hf_keys,
    save_vit,
    to_hf_state_dict,
)
from archlab.models import build_model, get_config  # noqa: E402
from archlab.models.vit import ViT, ViTConfig  # noqa: E402

HF_CONFIGS = {
    # odd head count (d=60, A=5, d_k=12), RGB, 32x32 image in 8x8 patches, 1 layer
    "rgb-32-p8-A5": dict(image_size=32, patch_size=8, num_channels=3, hidden_size=60, num_attention_heads=5,
                         num_hidden_layers=1, intermediate_size=37),
    # grey 8x8 digits-sized, 2x2 patches, 3 layers
    "grey-8-p2": dict(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_attention_heads=4,
                      num_hidden_layers=3, intermediate_size=64),
    # 3 heads, eps of the JAX original, 2 layers
    "rgb-16-p4-A3": dict(image_size=16, patch_size=4, num_channels=3, hidden_size=48, num_attention_heads=3,
                         num_hidden_layers=2, intermediate_size=96, layer_norm_eps=1e-6),
}  # fmt: skip
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every tensor off its init (LayerNorm gains 1, biases 0) so that a swapped key would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def make_hf(name: str, *, head: bool, dtype=torch.float32, attn: str = "sdpa", pooler: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(HF_CONFIGS[name], attn_implementation=attn)
    if head:
        config = HFViTConfig(**kwargs, num_labels=7, architectures=["ViTForImageClassification"])
        model = ViTForImageClassification(config)
    else:
        config = HFViTConfig(**kwargs)
        model = ViTModel(config, add_pooling_layer=pooler)
    perturb(model, seed)
    return model.to(dtype).eval()


def images(hf_model, batch: int = 3, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    c = hf_model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=g, dtype=dtype)


def hf_outputs(hf_model, x):
    with torch.no_grad():
        if isinstance(hf_model, ViTForImageClassification):
            return hf_model(x).logits, hf_model.vit(x).last_hidden_state
        return None, hf_model(x).last_hidden_state


def assert_matches(hf_model, model: ViT, x: torch.Tensor, atol: float) -> None:
    logits_hf, hidden_hf = hf_outputs(hf_model, x)
    model.eval()
    with torch.no_grad():
        hidden = model.hidden_states(x)
        torch.testing.assert_close(hidden, hidden_hf, atol=atol, rtol=0)
        if logits_hf is not None:
            torch.testing.assert_close(model(x), logits_hf, atol=atol, rtol=0)
        else:
            torch.testing.assert_close(model(x), hidden_hf[:, 0], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("head", [True, False], ids=["classifier", "backbone"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_outputs_match_hf(name, head, dtype):
    hf = make_hf(name, head=head, dtype=dtype)
    model = from_hf(hf.state_dict(), hf.config)
    assert model.config.n_classes == (7 if head else 0)
    assert model.patch_embed.weight.dtype == dtype
    assert_matches(hf, model, images(hf, dtype=dtype), TOL[dtype])


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("hf_attn", ["eager", "sdpa"])
def test_every_attention_backend_matches_hf_fp32(backend, hf_attn):
    hf = make_hf("rgb-32-p8-A5", head=True, attn=hf_attn)
    config = config_from_hf(hf.config, n_classes=7).replace(backend=backend)
    model = ViT(config)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    assert_matches(hf, model, images(hf), 1e-5)


def test_pooler_is_ignored():
    """ViTModel's default pooler (dense + tanh on [class]) is no part of archlab's ViT: its tensors are skipped."""
    hf = make_hf("grey-8-p2", head=False, pooler=True)
    assert any(k.startswith("pooler.") for k in hf.state_dict())
    model = from_hf(hf.state_dict(), hf.config)
    assert_matches(hf, model, images(hf), 1e-5)


# ------------------------------------------------------------------------------------------------
# conversions are exact both ways
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [0, 10])
def test_archlab_to_hf_to_archlab_is_exact(n_classes):
    torch.manual_seed(0)
    model = build_model("vit-tiny", n_classes=n_classes, n_layers=2)
    perturb(model, 3)
    back = from_hf_state_dict(to_hf_state_dict(model), model.config)
    state = model.state_dict()
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key]), key


@pytest.mark.parametrize("head", [True, False], ids=["classifier", "backbone"])
def test_hf_to_archlab_to_hf_is_exact_and_uses_hf_disk_names(head, tmp_path):
    hf = make_hf("rgb-16-p4-A3", head=head)
    model = from_hf(hf.state_dict(), hf.config)
    ours = to_hf_state_dict(model)
    hf.save_pretrained(tmp_path)  # what HF itself writes: the key names of every hub checkpoint
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert set(ours) == set(on_disk)
    for key, value in normalize_hf_keys(hf.state_dict()).items():
        assert torch.equal(ours[key], value), key
        assert torch.equal(ours[key], on_disk[key]), key


@pytest.mark.parametrize(
    "config",
    [ViTConfig(), ViTConfig(image_size=8, patch_size=2, n_channels=1, d_model=60, n_heads=5, n_layers=1, d_ff=37,
                            dropout=0.1, attn_dropout=0.2, eps=1e-6, n_classes=0)],
    ids=["vit-base-16", "small-headless"],
)  # fmt: skip
def test_config_round_trip(config):
    hf_dict = config_to_hf(config)
    assert config_from_hf(hf_dict) == config
    hf = HFViTConfig.from_dict(hf_dict)  # HF accepts it and reads the same numbers
    assert config_from_hf(hf) == config
    if config.n_classes:
        assert hf.num_labels == config.n_classes


@pytest.mark.parametrize("preset", ["vit-tiny", "vit-base-16", "vit-large-16"])
def test_preset_param_counts_equal_hf(preset):
    config = get_config(preset)
    with torch.device("meta"):
        ours = sum(p.numel() for p in ViT(config).parameters())
        theirs = sum(p.numel() for p in ViTForImageClassification(HFViTConfig.from_dict(config_to_hf(config))).parameters())
    assert ours == theirs


# ------------------------------------------------------------------------------------------------
# folders
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [0, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_save_vit_loads_in_hf_offline_with_same_outputs(n_classes, dtype, tmp_path):
    torch.manual_seed(0)
    model = build_model("vit-tiny", n_classes=n_classes, n_layers=2).to(dtype).eval()
    perturb(model, 5)
    save_vit(model, tmp_path / "vit")
    if n_classes:
        hf, info = ViTForImageClassification.from_pretrained(tmp_path / "vit", output_loading_info=True, local_files_only=True)
    else:
        hf, info = ViTModel.from_pretrained(
            tmp_path / "vit", add_pooling_layer=False, output_loading_info=True, local_files_only=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.dtype == dtype
    assert_matches(hf.eval(), model, images(hf, dtype=dtype), TOL[dtype])
    # and back: load_vit gives the same model
    again = load_vit(tmp_path / "vit")
    assert again.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_load_vit_reads_hf_save_pretrained(tmp_path):
    hf = make_hf("rgb-32-p8-A5", head=True)
    hf.save_pretrained(tmp_path)
    model = load_vit(tmp_path)
    assert not model.training
    assert_matches(hf, model, images(hf), 1e-5)


def test_foreign_folder_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))  # fmt: skip
    bert.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        load_vit(tmp_path)


def test_masked_image_modeling_weights_are_refused(tmp_path):
    """ViTForMaskedImageModeling carries a mask token and a decoder archlab's ViT does not have: named, not dropped."""
    from transformers import ViTForMaskedImageModeling

    ViTForMaskedImageModeling(HFViTConfig(**HF_CONFIGS["grey-8-p2"])).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*embeddings\.mask_token"):
        load_vit(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    hf = make_hf("grey-8-p2", head=True)
    state = normalize_hf_keys(hf.state_dict())
    del state["vit.encoder.layer.1.attention.attention.key.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: vit\.encoder\.layer\.1\.attention\.attention\.key\.bias"):
        from_hf(state, hf.config)
    state = normalize_hf_keys(hf.state_dict())
    config = hf.config.to_dict() | {"image_size": 16}  # position table of 1 + 64 rows expected, 1 + 16 stored
    with pytest.raises(CheckpointError, match=r"position_embeddings: checkpoint \(1, 17, 32\) vs model \(1, 65, 32\)"):
        from_hf(state, config)


def test_head_size_disagreement_is_refused():
    hf = make_hf("grey-8-p2", head=True)
    config = hf.config.to_dict()
    config["id2label"] = {str(i): str(i) for i in range(3)}
    with pytest.raises(CheckpointError, match="num_labels=3 .* classifier.weight has 7 rows"):
        from_hf(hf.state_dict(), config)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"qkv_bias": False}, "qkv_bias=False"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
        ({"image_size": [32, 16]}, r"image_size=\[32, 16\]"),
        ({"num_attention_heads": 7}, "hidden_size=60|d_model=60 is not divisible by n_heads=7"),
    ],
)
def test_unsupported_hf_variants_are_refused(override, message):
    config = HFViTConfig(**HF_CONFIGS["rgb-32-p8-A5"]).to_dict() | override
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(config)


def test_mean_pooling_does_not_convert():
    model = build_model("vit-tiny", pooling="mean")
    with pytest.raises(ConfigError, match="pooling='mean'"):
        to_hf_state_dict(model)


def test_training_steps_match_hf(tmp_path):
    """Same weights, same data, same Adam steps: archlab's and HF's losses agree step by step (gradients too)."""
    torch.manual_seed(0)
    model = build_model("vit-tiny", n_layers=2).train()
    save_vit(model, tmp_path / "vit")
    hf = ViTForImageClassification.from_pretrained(tmp_path / "vit", local_files_only=True).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    curves = []
    for run in (lambda: model(x), lambda: hf(x).logits):
        params = model.parameters() if len(curves) == 0 else hf.parameters()
        opt = torch.optim.Adam(params, lr=1e-3)
        losses = []
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(run(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0] == pytest.approx(curves[1], abs=1e-5)
    assert curves[0][-1] < curves[0][0]
