"""The document reader's memory budget (lesson 8 card 5): the activations measured on the meta device equal those a
real forward saves, the figures follow from the model (parameters, KV cache, latent compression), the card's
arithmetic is checked with numbers, and `archlab inspect docreader-* --pages P` prints it."""

from __future__ import annotations

import json

import pytest
import torch

import archlab.nn.attention as attention
from archlab.analysis.docreader_budget import (
    CARD_GB,
    COMPONENTS,
    docreader_budget,
    format_budget,
    full_batch,
    measure_activations,
)
from archlab.analysis.params import count_parameters
from archlab.cli import main
from archlab.errors import ConfigError
from archlab.models import get_config
from archlab.models.docreader import DocReader

TINY = dict(text_n_layers=1, page_layers=1, reason_layers=1, dropout=0.0)


@pytest.fixture(scope="module")
def card():
    """The card preset's budget at 50 pages (built and run on the meta device)."""
    return docreader_budget(get_config("docreader-card"), pages=50)


@pytest.mark.parametrize("pages, figure_global", [(1, False), (3, False), (3, True)])
def test_activations_measured_on_meta_equal_those_a_real_forward_saves(pages, figure_global, monkeypatch):
    """The meta-device run (flash-attention kernels' saved tensors, tiles by shape only) counts, per component, the
    bytes a real CPU forward with the same shapes saves for backward (to 0.1%: a few index tensors differ). The
    real forward zeroes the outputs of queries without a key as CUDA and the meta device always do (eager CPU
    skips that fill when every query has a key, saving less: the budget is the device's figure)."""
    monkeypatch.setattr(attention, "_every_query_has_a_key", lambda has_key: False)
    c = get_config("docreader-tiny", **TINY, frozen=("image",), figure_global=figure_global)
    torch.manual_seed(0)
    real = measure_activations(DocReader(c), full_batch(c, pages, 2, device="cpu"))
    with torch.device("meta"):
        meta_model = DocReader(c)
    meta = measure_activations(meta_model, full_batch(c, pages, 2, device="meta"))
    assert set(real.by_component) == set(meta.by_component) == set(COMPONENTS) - {"image encoder"}  # frozen: none
    for name, n in real.by_component.items():
        assert n > 0 and abs(meta.by_component[name] - n) <= 1e-3 * n, (name, n, meta.by_component[name])


def test_the_budget_follows_from_the_model():
    c = get_config("docreader-tiny", **TINY)
    b = docreader_budget(c, pages=4)
    with torch.device("meta"):
        model = DocReader(c)
    assert sum(comp.params for comp in b.components) == count_parameters(model).total
    assert b.tokens_per_page == 48 + 48 + 1 + 16 and b.reasoning_tokens == c.n_global + 4 * c.n_latents
    # K and V of every reasoning layer over the compressed document, bf16
    assert b.kv_cache == 2 * c.reason_layers * b.reasoning_tokens * c.d_model * 2
    assert b.kv_cache_flat / b.kv_cache == pytest.approx(b.flat_tokens / b.reasoning_tokens)
    assert b.activations_checkpointed < b.activations
    assert b.reasoning_activations_flat > b.reasoning_activations
    more = docreader_budget(c, pages=8)
    text = lambda budget: next(x for x in budget.components if x.name == "text encoder")  # noqa: E731
    assert text(more).activations > 1.8 * text(b).activations  # pages are encoded independently: ~linear
    frozen = docreader_budget(c.replace(frozen=("text", "table")), pages=4)
    for comp in frozen.components:
        if comp.name in ("text encoder", "table encoder"):
            assert comp.frozen and comp.activations == 0 and comp.training_bytes == 2 * comp.params
    with pytest.raises(ConfigError, match=r"pages=9 is more than the reader's page table holds \(max_pages=8\)"):
        docreader_budget(c, pages=9)


def test_figure_global_tokens_are_counted_in_the_budget():
    """``figure_global`` adds ``max_pages`` global tokens to the reasoning module: its sequence, its KV cache and its
    saved activations grow by them (the KV cache exactly), nothing before the reasoning module changes."""
    c = get_config("docreader-tiny", **TINY)
    card, figures = docreader_budget(c, pages=4), docreader_budget(c.replace(figure_global=True), pages=4)
    assert figures.reasoning_tokens == card.reasoning_tokens + c.max_pages == c.n_global + c.max_pages + 4 * c.n_latents
    assert figures.kv_cache == card.kv_cache * figures.reasoning_tokens / card.reasoning_tokens
    assert figures.reasoning_activations > card.reasoning_activations
    before = {x.name: x for x in card.components}
    for comp in figures.components:
        if comp.name != "reasoning module":
            assert comp == before[comp.name], comp.name
        else:
            assert comp.params == before[comp.name].params + c.d_model  # the figure role's row of E_role
    data = figures.to_dict()
    assert data["global_tokens"] == {**c.global_tokens, "figure": c.max_pages}
    sequence = lambda b: next(x for x in format_budget(b).splitlines() if x.startswith("  sequence"))  # noqa: E731
    assert sequence(figures).endswith(f"{c.max_pages * c.n_headers} table header, {c.max_pages} figure")
    assert "figure" not in sequence(card)


def test_pages_per_chunk_keeps_one_chunk_of_the_page_stage(capsys):
    """With ``pages_per_chunk = k`` training keeps the page stage's saved tensors (page encoders, fusion, Perceiver)
    for one chunk of ``k`` pages only (it is recomputed in backward): the budget measures that chunk instead of every
    page, and what the levels above save is unchanged. A chunk of every page is the unchunked budget."""
    c = get_config("docreader-tiny", **TINY)
    whole = docreader_budget(c, pages=4)
    one, every = (docreader_budget(c.replace(pages_per_chunk=k), pages=4) for k in (1, 4))
    assert whole.pages_per_chunk is None and whole.chunk_activations == 0
    assert every.activations == whole.activations and every.activations_checkpointed == whole.activations_checkpointed
    assert one.activations < 0.5 * whole.activations and one.activations_checkpointed < whole.activations_checkpointed
    # pages are read independently: one page's chunk is a quarter of four pages' (to 1%, a few index tensors)
    assert one.chunk_activations == pytest.approx(every.chunk_activations / 4, rel=1e-2)
    # outside the page stage nothing depends on the chunk; the page encoders and fusion run only inside it
    assert [x.activations for x in one.components] == [x.activations for x in every.components]
    assert {x.name for x in one.components if x.activations == 0} >= {"table encoder", "image encoder", "fusion layers"}
    assert one.activations == sum(x.activations for x in one.components) + one.chunk_activations
    assert main(["inspect", "docreader-tiny", "--pages", "4", "--set", "pages_per_chunk=1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["docreader_budget"]
    assert data["pages_per_chunk"] == 1 and data["activations"] < data["chunk_activations"] * 4
    assert main(["inspect", "docreader-tiny", "--pages", "4", "--set", "pages_per_chunk=2"]) == 0
    out = capsys.readouterr().out
    assert "pages read 2 at a time" in out and "chunk of 2 pages" in out


def test_the_card_budget_and_where_its_arithmetic_is_off(card):
    names = {comp.name: comp for comp in card.components}
    assert names["text encoder"].frozen and names["image encoder"].frozen  # the card freezes them
    assert 550e6 < names["text encoder"].params < 570e6  # XLM-R-large: 560M
    assert 300e6 < names["image encoder"].params < 310e6  # ViT-L: 304M
    assert card.tokens_per_page == 512 + 512 + 257
    text = "\n".join(card.notes)
    assert "(224 / 14)^2 = 16 x 16 = 256 patch tokens" in text and "card's 196" in text
    assert "20 GB is 24.4 layers over every token" in text
    # latent compression: the reasoning module's sequence shrinks by the page's tokens over its latents; the
    # global tokens are 64 question slots, 64 summary tokens, per page a start and 31 header cells (1,728)
    assert card.reasoning_tokens == 64 + 64 + 50 * (1 + 31) + 50 * 64
    assert card.flat_tokens / card.reasoning_tokens > 13
    assert card.kv_cache_flat_card / card.kv_cache > 40
    assert card.total() < 80e9 - CARD_GB["buffer"] * 1e9  # the design fits the card's GPU, checkpointed
    out = format_budget(card)
    assert "KV cache (reasoning)" in out and "card GB" in out and "where the card's arithmetic is off" in out


def test_inspect_prints_the_budget_with_pages(capsys):
    assert main(["inspect", "docreader-tiny", "--pages", "2", "--set", "page_layers=1"]) == 0
    out = capsys.readouterr().out
    assert "memory budget of the document reader: 2 pages of 113 tokens" in out
    assert "text encoder" in out and "latent compression (113 -> 8 tokens per page)" in out
    assert main(["inspect", "docreader-tiny", "--pages", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["docreader_budget"]["pages"] == 2 and data["memory"] is None
    assert data["docreader_budget"]["components"]["fusion layers"]["card_gb"] == 4


def test_inspect_refuses_pages_where_they_mean_nothing(capsys):
    assert main(["inspect", "gpt-nano", "--pages", "3"]) != 0
    assert "--pages is for the document reader's presets" in capsys.readouterr().err
    assert main(["inspect", "docreader-tiny", "--pages", "0"]) != 0
    assert "--pages=0 must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("name, value", [("pages", 1.5), ("pages", True), ("pages", "2"), ("batch", float("inf"))])
def test_pages_and_batch_must_be_integers(name, value):
    c = get_config("docreader-tiny", **TINY)
    with pytest.raises(ConfigError, match=rf"{name}={value!r} must be an integer"):
        docreader_budget(c, **{name: value})


def test_one_page_is_singular(capsys):
    """`archlab inspect docreader-card --pages 1` printed "1 pages" in three places."""
    assert main(["inspect", "docreader-tiny", "--pages", "1", "--set", "page_layers=1"]) == 0
    out = capsys.readouterr().out
    assert "1 pages" not in out
    assert "memory budget of the document reader: 1 page of 113 tokens" in out
    assert "  KV cache, 1 page " in out and "the reasoning module over 1 page, against" in out
    assert main(["inspect", "docreader-tiny", "--pages", "2", "--set", "page_layers=1"]) == 0
    out = capsys.readouterr().out
    assert "  KV cache, 2 pages " in out and "the reasoning module over 2 pages, against" in out
