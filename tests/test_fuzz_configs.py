"""Fuzzed configs of every family: each one either builds and trains one step to a finite loss, or raises an
ArchlabError (never another exception). Hypothesis draws from each family's smallest preset, shrunk further,
and changes a few fields to random legal or illegal values; derandomized, so CI draws the same cases."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from archlab.errors import ArchlabError, TrainingError
from archlab.models.registry import FAMILIES, build_model, get_config, list_presets
from archlab.train import TrainConfig, train

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

# each family's smallest preset, made smaller still (every change here is legal)
BASES = {
    "bert": ("bert-mini", dict(vocab_size=64, max_len=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)),
    "docreader": ("docreader-tiny", dict(text_d_model=16, text_n_heads=2, text_n_layers=1, image_d_model=16, image_n_heads=2, d_model=16, n_heads=2, d_ff=32, page_layers=1, reason_layers=1)),
    "elmo": ("elmo-small", dict(vocab_size=32, d_model=16)),
    "gmlp": ("gmlp-lm-tiny", dict(vocab_size=32, max_len=8, d_model=16, d_ffn=32, n_layers=1)),
    "gmlp-classifier": ("gmlp-cls-tiny", dict(vocab_size=32, max_len=8, d_model=16, d_ffn=32, n_layers=1)),
    "gpt": ("gpt-nano", dict(vocab_size=32, max_len=16, d_model=12, n_layers=1)),
    "llama": ("llama-tiny", dict(vocab_size=32, max_len=16, d_model=16, n_layers=1, d_ff=32)),
    "mlp": ("mlp-digits", dict(d_in=8, d_hidden=16)),
    "resnet": ("resnet-digits", dict(widths=(4, 8, 8), blocks_per_stage=1)),
    "rnn": ("rnn-lm-small", dict(vocab_size=32, d_embed=16, d_hidden=16, n_layers=1)),
    "rwkv": ("rwkv-tiny", dict(vocab_size=32, d_model=16, n_layers=1, context_length=16)),
    "rnnenc": ("rnnenc-small", dict(vocab_size=32, d_embed=8, d_encoder=16, d_decoder=16, d_maxout=8)),
    "rnnsearch": ("rnnsearch-small", dict(vocab_size=32, d_embed=8, d_encoder=16, d_decoder=16, d_maxout=8, d_attn=8)),
    "textcnn": ("textcnn-deck", dict(vocab_size=32)),
    "transformer": ("transformer-tiny", dict(vocab_size=32, d_model=16, n_layers=1, d_ff=32, max_len=16)),
    "transformer-xl": ("transformer-xl-tiny", dict(vocab_size=32, d_model=16, n_layers=1, segment_len=8, mem_len=8)),
    "vit": ("vit-tiny", dict(d_model=16, n_layers=1, d_ff=32)),
    "wavenet": ("wavenet-small", dict(vocab_size=32, residual_channels=8, gate_channels=8, skip_channels=8, layers_per_stack=2, n_stacks=1)),
}  # fmt: skip

INTS = st.sampled_from([-3, -1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 64])
HUGE = 2**40  # a width no machine holds: must be refused from the estimate, never reach the allocator
FLOATS = st.sampled_from([-1.0, -1e-6, 0.0, 1e-12, 1e-5, 0.1, 0.5, 0.999, 1.0, 2.0, 1e30, math.inf, -math.inf, math.nan])


def _strings() -> dict[str, list[str]]:
    """For each string field: the values the presets use (legal), plus the wrong ones below."""
    seen: dict[str, set[str]] = {}
    for preset in list_presets():
        for name, value in preset.config.to_dict().items():
            if isinstance(value, str):
                seen.setdefault(name, set()).add(value)
    return {name: sorted(values) for name, values in seen.items()}


STRINGS = _strings()


def value_for(name: str, annotation, current):
    """A strategy of values for one field, legal and illegal, of its type (and sometimes of another)."""
    args = typing.get_args(annotation)
    options = [st.just(current), st.none(), st.sampled_from(["", "bogus", "1"])]
    if annotation is bool or bool in args:
        options.append(st.booleans())
    if annotation is int or int in args:
        options.append(INTS)
        if isinstance(current, int) and current >= 16:  # a width, a vocabulary or a context: try an absurd one
            options.append(st.just(HUGE))
    if annotation is float or float in args:
        options += [FLOATS, INTS]
    if isinstance(current, str):
        options.append(st.sampled_from(STRINGS.get(name, [current])))
    if isinstance(current, tuple):
        options += [st.just(()), st.just(current[:1]), st.just(current + current[-1:])]
    return st.one_of(options)


@st.composite
def configs(draw):
    family = draw(st.sampled_from(sorted(BASES)))
    preset, shrink = BASES[family]
    base = get_config(preset, **shrink)
    hints = typing.get_type_hints(type(base))
    fields = [f.name for f in dataclasses.fields(base)]
    names = draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True))
    changes = {n: draw(value_for(n, hints[n], getattr(base, n))) for n in names}
    return family, preset, {**shrink, **changes}


def batch_for(family: str, config) -> dict[str, torch.Tensor]:
    """One small batch of the family's training task, shaped from its config."""
    g = torch.Generator().manual_seed(0)
    task = FAMILIES[family].task
    vocab = getattr(config, "vocab_size", 2)
    n = min([6] + [getattr(config, k) for k in ("max_len", "context_length") if isinstance(getattr(config, k, None), int)])
    ids = lambda *shape: torch.randint(0, vocab, shape, generator=g)  # noqa: E731
    if task == "lm":
        return {"input_ids": ids(2, n), "labels": ids(2, n)}
    if family == "docreader":  # two one-page documents, collated
        from archlab.models.docreader import DocReaderTokenizer, Document, Page, collate

        image = torch.rand(config.n_channels, config.image_size, config.image_size, generator=g)
        docs = [Document([Page("a page", [["k", "v"], ["a", "1"]], image)], "which?", 0)] * 2
        return collate(docs, config, DocReaderTokenizer())._asdict()
    if task == "custom":  # ELMo
        return {"input_ids": ids(2, n)}
    if task == "mlm":
        labels = ids(2, n)
        labels[:, ::2] = -100
        return {"input_ids": ids(2, n), "labels": labels, "next_sentence_label": torch.randint(0, 2, (2,), generator=g)}
    if task == "seq2seq":
        return {"src_ids": ids(2, 5), "tgt_in": ids(2, 4), "tgt_out": ids(2, 4), "src_mask": torch.ones(2, 5, dtype=torch.bool)}
    labels = torch.randint(0, config.n_classes, (2,), generator=g)
    if family == "mlp":
        inputs = torch.randn(2, config.d_in, generator=g)
    elif family == "resnet":
        inputs = torch.randn(2, config.in_channels, 8, 8, generator=g)
    elif family == "vit":
        inputs = torch.randn(2, config.n_channels, config.image_size, config.image_size, generator=g)
    else:  # token classifiers: TextCNN, gMLP
        inputs = ids(2, n)
    return {"inputs": inputs, "labels": labels}


ONE_STEP = TrainConfig(steps=1, batch_size=2, lr=1e-3, schedule="constant", warmup=0, eval_every=0, ckpt_every=0,
                       precision="fp32", progress=False, tensorboard=False, device="cpu")  # fmt: skip


def train_one_step(family: str, preset: str, overrides: dict) -> float | None:
    """The loss of one training step, or None when archlab refused the config or its input (an ArchlabError)."""
    try:
        config = get_config(preset, **overrides)
        train_cls = FAMILIES[family].train_cls
        torch.manual_seed(0)
        model = build_model(config, model_class=None if train_cls is None else train_cls.__name__)
        result = train(model, [batch_for(family, config)], ONE_STEP)
    except TrainingError as e:  # a config archlab accepted whose very first loss is not finite: a bug
        raise AssertionError(f"{preset} {overrides}: {e}") from None
    except ArchlabError:
        return None
    return result.train["loss"]


def test_every_family_base_trains_one_step():
    """The starting points are legal: each family's shrunk preset trains one step to a finite loss."""
    assert set(BASES) == set(FAMILIES)
    for family, (preset, shrink) in BASES.items():
        loss = train_one_step(family, preset, shrink)
        assert loss is not None and math.isfinite(loss), family


@hypothesis.settings(max_examples=220, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip
@hypothesis.given(configs())
def test_a_fuzzed_config_trains_to_a_finite_loss_or_raises_an_archlab_error(case):
    family, preset, overrides = case
    loss = train_one_step(family, preset, overrides)  # any exception but an ArchlabError fails the test
    if loss is not None:
        assert math.isfinite(loss), (family, overrides, loss)
