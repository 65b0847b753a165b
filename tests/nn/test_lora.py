"""LoRA: the adapted layer against its equation; on every model family, B = 0 leaves the model
unchanged, merged == unmerged, unmerge restores the base, the trainable count is r (d_in + d_out)
per layer; training moves only A and B; adapters save and load alone; bad targets and arguments
raise ConfigError."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import archlab.models  # noqa: F401  (registers every family)
from archlab.errors import CheckpointError, ConfigError, ShapeError
from archlab.interop.lora import ADAPTER_WEIGHTS, load_lora, save_lora
from archlab.models import build_model
from archlab.models.registry import FAMILIES, PRESETS
from archlab.nn.lora import (
    LoRALinear,
    apply_lora,
    linear_names,
    lora_layers,
    lora_parameters,
    lora_report,
    merge_lora,
    unload_lora,
    unmerge_lora,
)


def tied_names(model: nn.Module) -> set[str]:
    """Linear layers whose weight another module shares (a tied head): LoRA refuses them."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {n for n in linear_names(model) if seen[id(model.get_submodule(n).weight)] > 1}


def adaptable(model: nn.Module) -> list[str]:
    tied = tied_names(model)
    return [n for n in linear_names(model) if n not in tied]


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)


def outputs(result) -> list[torch.Tensor]:
    """A model's output as a flat list of tensors (logits, or the fields of a named tuple)."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


# ------------------------------------------------------------------------------------------------
# One example per family with an input; dropout off so outputs are deterministic
# ------------------------------------------------------------------------------------------------


def _ids(vocab: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _pixels() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


EXAMPLES = {
    "gpt": (lambda: build_model("gpt-nano"), lambda m: m(_ids(256))),
    "bert": (
        lambda: build_model("bert-mini", vocab_size=120, n_layers=2, dropout=0.0, attn_dropout=0.0,
                            model_class="BertForSequenceClassification"),
        lambda m: m(_ids(120)),
    ),
    "transformer": (  # cross-attention reads in_proj.weight directly: the adapted weight must reach it
        lambda: build_model("transformer-tiny", dropout=0.0),
        lambda m: m(_ids(128), _ids(128, (2, 6))),
    ),
    "vit": (lambda: build_model("vit-tiny"), lambda m: m(_pixels())),
    "gmlp": (lambda: build_model("gmlp-lm-tiny"), lambda m: m(_ids(256))),
    "gmlp-classifier": (lambda: build_model("gmlp-cls-tiny"), lambda m: m(_ids(256))),
    "rwkv": (lambda: build_model("rwkv-tiny"), lambda m: m(_ids(256))),
}  # fmt: skip


def example(family: str, dtype=torch.float64):
    build, run = EXAMPLES[family]
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    with torch.no_grad():  # RWKV's init zeroes its residual branches; make every Linear matter
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.5 / m.in_features**0.5)
    return model, run


# ------------------------------------------------------------------------------------------------
# The adapted layer
# ------------------------------------------------------------------------------------------------


def test_lora_linear_equals_its_equation():
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    layer = LoRALinear(base, r=3, alpha=6.0)
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (5, 3)
    assert torch.all(layer.lora_B == 0)  # B = 0 at the start
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(7) and layer.lora_A.std() > 0.1  # Kaiming-uniform
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (6.0 / 3) * (x @ A.T) @ B.T  # h = W x + b + (alpha / r) B A x
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.weight, W + 2.0 * B @ A, atol=1e-12, rtol=0)
    assert layer.bias is b and (layer.in_features, layer.out_features) == (7, 5)


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).double()
    layer = LoRALinear(base, r=4, alpha=4.0, dropout=0.5).train()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot show
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_weight().T, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# Every family with an example input: B = 0, merge, unmerge, counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_zero_B_leaves_the_model_unchanged(family):
    model, run = example(family, torch.float32)
    with torch.no_grad():
        before = outputs(run(model))
        apply_lora(model, adaptable(model), r=4, alpha=8.0)
        after = outputs(run(model))
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_merged_equals_unmerged_and_unmerge_restores_the_base(family):
    model, run = example(family)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in adaptable(model)}
    with torch.no_grad():
        base_out = outputs(run(model))
        apply_lora(model, adaptable(model), r=4, alpha=8.0)
        randomize_adapters(model)
        adapted = outputs(run(model))
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(adapted, base_out))  # the adapters act
        merge_lora(model)
        for name, m in lora_layers(model).items():
            assert not torch.equal(m.base.weight, originals[name])  # folded into W
        for a, b in zip(outputs(run(model)), adapted, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        unmerge_lora(model)
        for name, m in lora_layers(model).items():
            torch.testing.assert_close(m.base.weight, originals[name], atol=1e-12, rtol=0)
        for a, b in zip(outputs(run(model)), adapted, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", list(EXAMPLES))
def test_trainable_count_is_r_times_d_in_plus_d_out(family):
    model, _ = example(family, torch.float32)
    total_before = sum(p.numel() for p in model.parameters())
    names = adaptable(model)
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}
    apply_lora(model, names, r=3)
    report = lora_report(model)
    assert report.trainable == sum(3 * (d_in + d_out) for d_in, d_out in shapes.values())
    assert report.total == total_before + report.trainable
    assert report.adapters == {n: (d_in, d_out, 3) for n, (d_in, d_out) in shapes.items()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert f"{report.trainable:,} trainable of {report.total:,}" in str(report)


# ------------------------------------------------------------------------------------------------
# Every registered family, whatever its inputs: the smallest preset, all its untied Linear layers
# ------------------------------------------------------------------------------------------------


SMALL_WORDS = ("tiny", "nano", "mini", "small", "digits", "deck")


def smallest_preset(family: str) -> str:
    """A small preset of the family: of those named small (or of all, if none is), the one with the fewest
    parameters, counted on the meta device (nothing allocated; building 1000-layer presets still takes seconds)."""
    names = [name for name, preset in PRESETS.items() if preset.family == family]
    assert names, f"family {family!r} has no preset"
    names = [n for n in names if any(w in n for w in SMALL_WORDS)] or names
    sizes = {}
    for name in names:
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in build_model(name).parameters())
    return min(sizes, key=sizes.get)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_adapts_layer_by_layer(family):
    torch.manual_seed(0)
    model = build_model(smallest_preset(family)).double().eval()
    names = adaptable(model)
    if not names:  # no Linear layer LoRA may adapt (fused RNN layers, convolutions): the error says why
        why = "its weight is shared with" if linear_names(model) else r"matches no nn.Linear .*\(none\)"
        with pytest.raises(ConfigError, match=why):
            apply_lora(model, "*")
        return
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}
    apply_lora(model, names, r=2, alpha=4.0)
    assert lora_report(model).trainable == sum(2 * (i + o) for i, o in shapes.values())
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    randomize_adapters(model)
    g = torch.Generator().manual_seed(2)
    for name, layer in lora_layers(model).items():
        x = torch.randn(3, layer.in_features, generator=g, dtype=torch.float64)
        with torch.no_grad():
            unmerged = layer(x)
            torch.testing.assert_close(unmerged, layer.base(x) + x @ layer.delta_weight().T, atol=1e-10, rtol=0)
            layer.merge()
            torch.testing.assert_close(layer(x), unmerged, atol=1e-10, rtol=0, msg=name)
            layer.unmerge()


# ------------------------------------------------------------------------------------------------
# Training moves only the adapters
# ------------------------------------------------------------------------------------------------


def test_training_changes_only_A_and_B():
    torch.manual_seed(0)
    model = build_model("gpt-nano").train()
    apply_lora(model, ("*.in_proj", "*.out_proj", "*.ffn.w1"), r=4, alpha=8.0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    # every parameter goes to the optimizer: freezing alone must keep the base fixed (weight decay included)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.tensor([list(range(30, 46)) * 2] * 4)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(data[:, :-1]).reshape(-1, 256), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k  # bit-identical
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())


def test_training_while_merged_is_refused():
    model = build_model("gpt-nano").train()
    apply_lora(model, "*.in_proj", r=2)
    merge_lora(model)
    with pytest.raises(ConfigError, match="unmerge_lora"):
        model(_ids(256))
    with torch.no_grad():
        model(_ids(256))  # inference on a merged model is fine


# ------------------------------------------------------------------------------------------------
# Targets: globs, errors
# ------------------------------------------------------------------------------------------------


def test_glob_targets():
    model = build_model("gpt-nano")
    apply_lora(model, "*.in_proj")
    assert list(lora_layers(model)) == [f"decoder.blocks.{i}.attn.in_proj" for i in range(3)]
    model = build_model("gpt-nano")
    apply_lora(model, ["decoder.blocks.0.*", "*.2.ffn.w2"])
    assert list(lora_layers(model)) == [
        "decoder.blocks.0.attn.in_proj", "decoder.blocks.0.attn.out_proj", "decoder.blocks.0.ffn.w1",
        "decoder.blocks.0.ffn.w2", "decoder.blocks.2.ffn.w2",
    ]  # fmt: skip


def test_pattern_that_matches_nothing_names_it_and_the_linear_layers():
    model = build_model("gpt-nano")
    with pytest.raises(ConfigError) as info:
        apply_lora(model, ("*.in_proj", "*.qkv"))
    message = str(info.value)
    assert "'*.qkv' matches no nn.Linear" in message and "decoder.blocks.0.attn.in_proj" in message
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r=0 must be > 0"),
        (dict(r=-2), "r=-2 must be > 0"),
        (dict(r=2.0), "r=2.0 must be an integer"),
        (dict(r=True), "r=True must be an integer"),
        (dict(alpha=0.0), "alpha=0.0 must be > 0"),
        (dict(alpha=math.inf), "alpha=inf must be finite"),  # was: scaling inf, inf * (B = 0) = nan outputs
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(targets=()), "one or more non-empty glob patterns"),
        (dict(targets=""), "one or more non-empty glob patterns"),
        (dict(targets=3), "targets=3 must be one or more"),
        (dict(targets=["*.in_proj", None]), "one or more non-empty glob patterns"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = build_model("gpt-nano")
    with pytest.raises(ConfigError, match=match):
        apply_lora(model, **{"targets": "*.in_proj", **kwargs})


def test_a_rank_above_both_widths_of_a_layer_is_refused_before_any_change():
    """r=10**6 on gpt-nano's [144, 48] in_proj allocated 576M adapter parameters (10**7: an out-of-memory kill)."""
    model = build_model("gpt-nano")
    with pytest.raises(ConfigError, match=r"LoRA target 'decoder.blocks.0.attn.in_proj' \[144, 48\]: r=1000000 "
                                          r"exceeds both widths of the layer \(d_in=48, d_out=144\).*r <= 48"):
        apply_lora(model, "*.in_proj", r=10**6)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(ConfigError, match=r"block 'q': 48 rows\).*r <= 48"):
        apply_lora(model, "*.in_proj:q", r=49)
    with pytest.raises(ConfigError, match=r"LoRALinear \[4, 4\]: r=5 exceeds both widths"):
        LoRALinear(nn.Linear(4, 4), r=5)
    assert lora_report(apply_lora(model, "*.in_proj", r=100)).adapters["decoder.blocks.0.attn.in_proj"][2] == 100


def test_a_quantized_model_takes_no_adapter_and_says_so():
    from archlab.quant import quantize

    model = build_model("llama-tiny")
    quantize(model, "int8")
    with pytest.raises(ConfigError, match=r"Linear layers: \(none\); this model's layers were quantized \(9 by "
                                          r"archlab.quant.quantize\), and a quantized layer takes no adapter"):
        apply_lora(model, ["q", "v"])


def test_tied_head_already_adapted_and_misuse():
    model = build_model("gpt-nano")
    with pytest.raises(ConfigError, match="'lm_head': its weight is shared with 'tok_emb.weight'"):
        apply_lora(model, "lm_head")
    apply_lora(model, "*.in_proj")
    with pytest.raises(ConfigError, match="; each already has a LoRA adapter"):  # several layers: each
        apply_lora(model, "*.attn.*")
    with pytest.raises(ConfigError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(ConfigError, match="already merged"):
        merge_lora(model)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        merge_lora(build_model("gpt-nano"))
    with pytest.raises(ShapeError, match="d_in=48"):
        lora_layers(model)["decoder.blocks.0.attn.in_proj"](torch.zeros(2, 47))
    with pytest.raises(ConfigError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=2)


# ------------------------------------------------------------------------------------------------
# Unload, save and load
# ------------------------------------------------------------------------------------------------


def test_unload_gives_back_plain_linear_layers():
    model, run = example("transformer")
    keys = set(model.state_dict())
    layers = {n: model.get_submodule(n) for n in linear_names(model)}
    apply_lora(model, adaptable(model), r=4)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = run(model)
        unload_lora(model)
        torch.testing.assert_close(run(model), adapted, atol=1e-10, rtol=0)
    assert not lora_layers(model) and set(model.state_dict()) == keys
    assert {n: model.get_submodule(n) for n in linear_names(model)} == layers  # the same layer objects back


def test_save_and_load_only_the_adapters(tmp_path):
    model, run = example("gpt", torch.float32)
    apply_lora(model, ("*.in_proj", "*.ffn.w2"), r=4, alpha=8.0)
    randomize_adapters(model)
    with torch.no_grad():
        expected = run(model)
    save_lora(model, tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert set(stored) == {f"decoder.blocks.{i}.{n}.lora_{ab}" for i in range(3) for n in ("attn.in_proj", "ffn.w2")
                           for ab in "AB"}  # fmt: skip
    assert sum(t.numel() for t in stored.values()) == lora_report(model).trainable

    fresh, _ = example("gpt", torch.float32)  # the same base weights, no adapters
    load_lora(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(run(fresh), expected)
    again, _ = example("gpt", torch.float32)  # already adapted on the same layers
    apply_lora(again, ("*.in_proj", "*.ffn.w2"), r=4, alpha=8.0)
    load_lora(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(run(again), expected)


def test_loading_adapters_that_do_not_fit(tmp_path):
    model = build_model("gpt-nano")
    apply_lora(model, "*.in_proj", r=4)
    save_lora(model, tmp_path / "a")
    other_layers = apply_lora(build_model("gpt-nano"), "*.out_proj", r=4)
    with pytest.raises(CheckpointError, match="the model is adapted on"):
        load_lora(other_layers, tmp_path / "a")
    other_rank = apply_lora(build_model("gpt-nano"), "*.in_proj", r=2)
    with pytest.raises(CheckpointError, match="the model's adapter has r=2, alpha=16; the saved one r=4"):
        load_lora(other_rank, tmp_path / "a")
    description = (tmp_path / "a" / "adapter_config.json").read_text()
    (tmp_path / "a" / "adapter_config.json").write_text(description.replace('"r": 4', '"r": 3'))
    with pytest.raises(CheckpointError, match=r"shape mismatches: decoder.blocks.0.attn.in_proj.lora_A: checkpoint"):
        load_lora(build_model("gpt-nano"), tmp_path / "a")
    smaller = build_model("gpt-nano", n_layers=2)
    with pytest.raises(CheckpointError, match="no layers named"):
        load_lora(smaller, tmp_path / "a")
    assert not lora_layers(smaller)  # refused before anything changed
    with pytest.raises(CheckpointError, match="not a folder"):
        load_lora(build_model("gpt-nano"), tmp_path / "missing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text('{"class": "GPTConfig"}')
    with pytest.raises(CheckpointError, match="not an archlab LoRA adapter"):
        load_lora(build_model("gpt-nano"), tmp_path / "b")
    with pytest.raises(ConfigError, match="no LoRA adapters to save"):
        save_lora(build_model("gpt-nano"), tmp_path / "c")
