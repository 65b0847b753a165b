"""Config values no model can mean (eps=inf, vocab_size=1, NaN) and sizes no machine can hold: refused by
name and value, before anything is built (issue 12, section 2 item 2, section 2 item 11)."""

from __future__ import annotations

import math

import pytest

from archlab.analysis.memory import format_bytes, module_bytes
from archlab.config import MAX_LAYERS
from archlab.errors import ConfigError
from archlab.models import registry
from archlab.models.registry import FAMILIES, build_model, check_fits_in_memory, get_config, list_presets
from archlab.train import TrainConfig


def first_preset(family: str) -> str:
    return next(p.name for p in list_presets() if p.family == family)


WITH_EPS = sorted(f.name for f in FAMILIES.values() if "eps" in f.config_cls.field_names())
WITH_VOCAB = sorted(f.name for f in FAMILIES.values() if "vocab_size" in f.config_cls.field_names())
DEPTH_FIELDS = sorted((f.name, name) for f in FAMILIES.values() for name in f.config_cls.field_names()
                      if name.endswith("layers") or name in ("blocks_per_stage", "n_stacks"))  # fmt: skip


@pytest.mark.parametrize("family", WITH_EPS)
@pytest.mark.parametrize("eps", [math.inf, -math.inf, 0.0, -1e-5])
def test_eps_must_be_finite_and_positive_in_every_config(family, eps):
    with pytest.raises(ConfigError, match=rf"^eps={eps!r} must be finite and > 0$"):
        get_config(first_preset(family), eps=eps)


def test_adam_eps_follows_the_same_rule():
    with pytest.raises(ConfigError, match="eps=inf must be finite and > 0"):
        TrainConfig(eps=math.inf)


def test_a_seed_past_torchs_range_is_refused_by_name():
    """torch seeds take [0, 2^64 - 1]; a larger train.seed was a ValueError traceback from torch.manual_seed."""
    TrainConfig(seed=2**64 - 1)
    with pytest.raises(ConfigError, match=r"^seed=18446744073709551616 must be <= 2\*\*64 - 1"):
        TrainConfig(seed=2**64)


@pytest.mark.parametrize("seed", [2**64, 10**23])
def test_a_decoding_seed_past_torchs_range_is_refused_before_decoding(seed):
    """generate / chat ``--seed 10**23`` was a ValueError traceback from torch.Generator.manual_seed."""
    import torch

    from archlab.generation import generate

    model = build_model("gpt-nano").eval()
    prompt = torch.tensor([[1, 2, 3]])
    assert generate(model, prompt, max_new_tokens=2, do_sample=True, seed=2**64 - 1).shape == (1, 5)
    with pytest.raises(ConfigError, match=rf"^seed={seed} must be <= 2\*\*64 - 1"):
        generate(model, prompt, max_new_tokens=2, do_sample=True, seed=seed)


@pytest.mark.parametrize("family", WITH_VOCAB)
@pytest.mark.parametrize("vocab", [1, 0, -3])
def test_a_vocabulary_needs_two_tokens(family, vocab):
    with pytest.raises(ConfigError, match=rf"vocab_size={vocab} must be >= 2"):
        get_config(first_preset(family), vocab_size=vocab)


def test_every_family_counts_its_layers_in_a_field_the_bound_sees():
    assert {family for family, _ in DEPTH_FIELDS} >= {"gpt", "llama", "bert", "docreader", "resnet", "wavenet"}


@pytest.mark.parametrize("family, field", DEPTH_FIELDS)
def test_a_depth_past_the_bound_is_refused_by_name_before_anything_is_built(family, field, monkeypatch):
    monkeypatch.setattr(registry, "build_on_meta", lambda *a, **k: pytest.fail("built a refused config"))
    with pytest.raises(ConfigError, match=rf"^{field}=1000000 must be <= {MAX_LAYERS} "):
        get_config(first_preset(family), **{field: 1_000_000})
    get_config(first_preset(family), **{field: 2})  # a small depth stays allowed


def test_the_depth_bound_keeps_the_deepest_presets():
    assert get_config("mlp-1000-residual").n_layers == 1000 <= MAX_LAYERS
    assert get_config("resnet-1202").depth == 1202


@pytest.mark.parametrize("field", ["dropout", "eps", "lr"])
def test_nan_is_never_a_setting(field):
    make = TrainConfig if field == "lr" else (lambda **kw: get_config("gpt-nano", **kw))
    with pytest.raises(ConfigError, match=rf"^{field}=nan must be a number, not NaN$"):
        make(**{field: math.nan})


# -- sizes: counted on the meta device, compared with the memory available --------------------------------------


@pytest.mark.parametrize("preset", ["gpt-nano", "bert-mini", "resnet-digits", "transformer-tiny", "rwkv-tiny"])
def test_the_estimate_is_the_bytes_the_built_model_holds(preset):
    config = get_config(preset)
    model = build_model(config)
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    assert registry.model_bytes(config, type(model)) == module_bytes(model) == sum(tensors.values())


@pytest.mark.parametrize(
    "preset, overrides, named",
    [
        ("gpt-nano", dict(d_model=2**20, n_heads=4), "d_model=1048576"),
        ("transformer-tiny", dict(d_model=2477280), "d_model=2477280"),
    ],
)
def test_absurd_sizes_are_refused_with_the_size_and_the_memory(preset, overrides, named):
    config = get_config(preset, **overrides)
    for refuse in (check_fits_in_memory, build_model):  # before allocating; or when the allocator says no
        with pytest.raises(ConfigError) as e:
            refuse(config)
        message = str(e.value)
        assert named in message and " TB for its parameters and buffers; this machine has " in message
        assert message.endswith("of memory available")


@pytest.mark.parametrize("preset, overrides", [("vit-tiny", dict(d_model=2**40, n_layers=1, d_ff=32)),
                                               ("bert-mini", dict(d_model=2**40))])  # fmt: skip
def test_sizes_whose_tensors_cannot_even_be_counted_are_refused(preset, overrides):
    """A weight of more than 2^63 elements overflows the meta device's count too (torch: "Storage size calculation
    overflowed"): still one clear ConfigError naming the size, before and after the allocator."""
    config = get_config(preset, **overrides)
    for refuse in (check_fits_in_memory, build_model):
        with pytest.raises(ConfigError, match="d_model=1099511627776.*more than 2\\^63 elements; no machine can build"):
            refuse(config)


def test_the_bound_is_the_memory_available(monkeypatch):
    """Refused exactly when the model's bytes exceed what the machine has."""
    config = get_config("gpt-nano")
    needed = registry.model_bytes(config, FAMILIES["gpt"].model_cls)
    assert needed == module_bytes(build_model(config))
    monkeypatch.setattr("archlab.analysis.memory.available_memory", lambda: needed - 1)
    with pytest.raises(ConfigError, match=rf"needs {format_bytes(needed)} for its parameters and buffers"):
        check_fits_in_memory(config)
    monkeypatch.setattr("archlab.analysis.memory.available_memory", lambda: needed)
    check_fits_in_memory(config)


def test_a_huge_max_len_is_bounded_by_the_memory_its_table_takes(monkeypatch):
    """``max_len=6087062`` costs a learned position table of 6087062 x d_model floats (1.2 GB for gpt-nano):
    no fixed bound on max_len is principled, its memory is; refused (naming max_len first) where it does not
    fit."""
    config = get_config("gpt-nano", max_len=6087062)
    needed = registry.model_bytes(config, FAMILIES["gpt"].model_cls)
    assert needed > 6087062 * config.d_model * 4  # the table dominates
    monkeypatch.setattr("archlab.analysis.memory.available_memory", lambda: needed - 1)
    with pytest.raises(ConfigError, match=r"^GPT of max_len=6087062, vocab_size=256, d_model=48 needs 1\.2 GB"):
        check_fits_in_memory(config)
