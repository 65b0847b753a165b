"""The document reader (lesson 8 card 5): each stage against its equation in float64 (the Perceiver's cross-attention
is attend() with the latents as queries; the page windows and the reasoning window equal full attention under the
masks the card describes), shapes and gradients of the three readers, every positional switch doing what it says,
real MiniLM weights in the text encoder, the card preset on the meta device, and clear errors for bad documents."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from archlab.errors import CheckpointError, ConfigError, DataError, ShapeError
from archlab.models import build_model, get_config
from archlab.models.docreader import (
    DocBatch,
    DocReader,
    DocReaderTokenizer,
    Document,
    Page,
    check_document,
    collate,
)
from archlab.nn.attention import attend, padding_mask

SMALL = dict(  # docreader-tiny, narrower still: every stage present, fast on two cores
    text_d_model=16, text_n_heads=2, text_n_layers=1, text_d_ff=32, table_n_layers=1, image_d_model=16,
    image_n_heads=2, image_n_layers=1, image_d_ff=32, d_model=16, n_heads=2, d_ff=32, n_latents=4, page_layers=2,
    reason_layers=1, max_pages=6, n_answers=5,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return DocReaderTokenizer()


def config(**overrides):
    return get_config("docreader-tiny", **{**SMALL, **overrides})


def image(seed: int, c=None) -> torch.Tensor:
    c = c or config()
    return torch.rand(c.n_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))


def documents(c=None) -> list[Document]:
    """Two documents of 4 and 2 pages: text, tables (one per document) and images."""
    c = c or config()
    return [
        Document([
            Page("the quarterly report of the mill", [["item", "count"], ["bolts", "12"], ["nuts", "7"]]),
            Page("a figure of a digit", None, image(1, c)),
            Page("notes on the second figure", None, image(2, c)),
            Page("closing remarks about nuts and bolts"),
        ], "which page shows the largest count?", 3),
        Document([
            Page("", [["city", "rain"], ["oslo", "3"]], image(3, c)),
            Page("a short page"),
        ], "how many pages mention rain?", 1),
    ]  # fmt: skip


def model(c=None, seed=0) -> DocReader:
    torch.manual_seed(seed)
    return build_model(c or config()).eval()


# -- shapes, gradients, the three readers ------------------------------------------------------------------------


def test_collate_shapes_and_table_linearisation(tokenizer):
    c = config()
    batch = collate(documents(c), c, tokenizer)
    b, p = 2, 4
    assert batch.text_ids.shape[:2] == (b, p) and batch.images.shape == (b, p, 1, 8, 8)
    assert batch.page_mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.image_mask.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert batch.answers.tolist() == [3, 1] and batch.question_mask[:, 0].all()
    ids, rows, cols, values = tokenizer.table([["city", "rain"], ["oslo", "3"]], 100)
    # [ROW_0] city [SEP] rain [SEP] [ROW_1] oslo [SEP] 3 [SEP]: the marker is [CLS] at column 0
    assert ids[0] == ids[5] == tokenizer.cls_id and ids.count(tokenizer.sep_id) == 4
    assert rows == [0] * 5 + [1] * (len(ids) - 5)
    assert cols[0] == 0 and cols[5] == 0 and set(cols) == {0, 1, 2}
    three = ids.index(tokenizer.base.encode("3")[0], 5)  # the one number cell: its token reads 3, all others 0
    assert values == [0.0] * three + [3.0] + [0.0] * (len(ids) - three - 1)
    n = int(batch.table_mask[1, 0].sum())
    assert batch.table_ids[1, 0, :n].tolist() == ids and batch.table_rows[1, 0, :n].tolist() == rows
    assert batch.table_values.dtype == torch.float32 and batch.table_values[1, 0, :n].tolist() == values


@pytest.mark.parametrize("reader", ["hierarchical", "flat", "question"])
def test_each_reader_gives_logits_and_every_trained_weight_a_gradient(tokenizer, reader):
    c = config(reader=reader, dropout=0.1)
    m = model(c).train()
    batch = collate(documents(c), c, tokenizer)
    logits = m(batch)
    assert logits.shape == (2, c.n_answers) and torch.isfinite(logits).all()
    loss, metrics = m.compute_loss(batch._asdict())
    loss.backward()
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    reads_document = ("text.", "head", "head_norm", "reasoning.")
    for name, g in grads.items():
        if reader == "question" and not name.startswith(reads_document):
            continue  # the question-only baseline reads no page
        if reader == "flat" and name.startswith(("perceiver.", "pages.summary", "pages.absolute", "pages.encoder")):
            continue  # the flat baseline has no compression and no page-level transformer
        if name.startswith("reasoning.role") or name.endswith("position.embedding.weight"):
            continue
        assert g is not None and g.abs().sum() > 0, f"{reader}: {name} got no gradient"


def test_frozen_encoders_get_no_gradient_and_the_rest_trains(tokenizer):
    c = config(frozen=("text", "image"))
    m = model(c).train()
    m.compute_loss(collate(documents(c), c, tokenizer)._asdict())[0].backward()
    assert all(p.grad is None and not p.requires_grad for p in [*m.text.parameters(), *m.image.parameters()])
    assert all(p.grad is not None for p in m.perceiver.parameters())


def test_padding_pages_and_batch_order_do_not_change_a_document(tokenizer):
    """A document's logits do not depend on the other documents of its batch (their padding included)."""
    c = config()
    m = model(c)
    docs = documents(c)
    with torch.no_grad():
        together = m(collate(docs, c, tokenizer))
        alone = torch.cat([m(collate([d], c, tokenizer)) for d in docs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    c = config()
    batch = collate(documents(c), c, tokenizer)._asdict()
    results = []
    for checkpointing in (False, True):
        m = model(c.replace(checkpointing=checkpointing)).train()
        loss = m.compute_loss(batch)[0]
        loss.backward()
        results.append((loss.detach(), m.perceiver.latents.grad.clone()))
    torch.testing.assert_close(results[0], results[1])


def test_bf16_autocast_runs_every_stage(tokenizer):
    """Mixed precision (archlab train's bf16): every stage runs under autocast, the loss stays near fp32's."""
    c = config()
    m = model(c).train()
    batch = collate(documents(c), c, tokenizer)._asdict()
    full = m.compute_loss(batch)[0].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = m.compute_loss(batch)[0]
    mixed.backward()
    assert abs(mixed.item() - full.item()) < 0.05
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


# -- each stage against its equation, float64 -------------------------------------------------------------------


def test_perceiver_cross_attention_is_attend_with_the_latents_as_queries():
    c = config()
    m = model(c).double()
    layer = m.perceiver.layers[0].cross
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, c.n_latents, c.d_model, generator=g, dtype=torch.float64)  # latents [n, L, d]
    x = torch.randn(3, 11, c.d_model, generator=g, dtype=torch.float64)  # a page's tokens [n, N, d]
    real = torch.arange(11) < torch.tensor([[11], [7], [1]])  # [n, N]
    got = layer.cross_attn(layer.norm_q(z), layer.norm_kv(x), mask=padding_mask(real))

    a, d = c.n_heads, c.d_model
    w, bias = layer.cross_attn.in_proj.weight, layer.cross_attn.in_proj.bias
    heads = lambda t: t.view(3, -1, a, d // a).transpose(1, 2)  # noqa: E731  [n, N, d] -> [n, A, N, d_k]
    zn, xn = torch.nn.functional.layer_norm(z, (d,), eps=c.eps), torch.nn.functional.layer_norm(x, (d,), eps=c.eps)
    q = heads(zn @ w[:d].T + bias[:d])  # queries: the latents
    k = heads(xn @ w[d : 2 * d].T + bias[d : 2 * d])  # keys and values: the page's tokens
    v = heads(xn @ w[2 * d :].T + bias[2 * d :])
    out = attend(q, k, v, mask=real[:, None, None, :], backend="math").transpose(1, 2).reshape(3, -1, d)
    want = layer.cross_attn.out_proj(out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # and the layer is the residual around it: z + attention, then the FFN
    full = layer(z, x, padding_mask(real))
    h = z + want
    torch.testing.assert_close(full, h + layer.ffn(layer.ffn_norm(h)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("query", ["none", "latents", "fusion"])
def test_pages_know_the_question_only_when_asked_to(tokenizer, query):
    """``page_question="latents"`` starts the latents at ``Z_0 + W_q mean(question states)`` and ``"fusion"`` lets
    the page tokens attend the question in fusion, so another question gives other page latents; the card's
    question-blind pages (``"none"``) stay exactly the same."""
    c = config(page_question=query)
    m = model(c).double()
    docs = documents(c)
    seen = []
    m.perceiver.layers[0].register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    batches = [collate(docs, c, tokenizer)]
    docs[0].question = docs[1].question = "which digit is shown on the page about rain?"
    batches.append(collate(docs, c, tokenizer))
    with torch.no_grad():
        for batch in batches:
            m(batch._replace(images=batch.images.double()))
    (z_a, out_a), (z_b, out_b) = seen
    if query == "none":
        assert m.perceiver.question is None
        assert torch.equal(out_a, out_b)
        return
    assert (out_a - out_b).abs().amax() > 1e-6
    if query == "fusion":
        assert m.perceiver.question is None
        return
    batch = batches[0]
    with torch.no_grad():  # the starting queries from their equation, one question per page of its document
        states = m.text(batch.question_ids, batch.question_mask)
        real = batch.question_mask[..., None].double()
        pooled = (states * real).sum(1) / real.sum(1)
        want = m.perceiver.latents + m.perceiver.question(pooled)[:, None, None, :]  # [B, 1, L, d]
    p = batch.page_mask.shape[1]
    want = want.expand(-1, p, -1, -1).reshape(-1, c.n_latents, c.d_model)
    torch.testing.assert_close(z_a, want, rtol=0, atol=1e-12)


def test_fusion_with_the_question_is_cross_attention_over_the_other_modalities_and_the_question():
    """A text-only page has no other modality: without the question its tokens attend nothing (a zero attention
    output before the output projection); with it, each layer is the cross-attention block with the question's tokens as memory."""
    c = config(page_question="fusion")
    fusion = model(c).fusion.double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, c.d_model, generator=g, dtype=torch.float64)  # text tokens only [n, N, d]
    q = torch.randn(2, 3, c.d_model, generator=g, dtype=torch.float64)  # question states [n, N_q, d]
    modality, mask = torch.zeros(5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool)
    q_mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.no_grad():
        blind = fusion(x, modality, mask)
        asked = fusion(x, modality, mask, q, q_mask)
        want = alone = x + fusion.modality(modality)
        for block in fusion.blocks:
            want = block(want, q, padding_mask(q_mask))
            alone = alone + block.cross_attn.out_proj.bias  # no key: a zero attention, then the output projection
            alone = alone + block.ffn(block.ffn_norm(alone))
    torch.testing.assert_close(blind, alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(asked, want, rtol=0, atol=1e-12)


def page_window_mask(n_pages: int, n_latents: int, window: int, page_mask: torch.Tensor) -> torch.Tensor:
    """The card's page-level pattern from its definition: ``[B, 1, N, N]`` with ``N = (1 + P) L``; block 0 is the
    summary (global); page ``p`` sees pages ``|p - p'| <= window // 2``; padded pages are no keys."""
    page = torch.arange((1 + n_pages) * n_latents) // n_latents - 1  # -1: the summary block
    near = (page[:, None] - page[None, :]).abs() <= window // 2
    is_global = page < 0
    pattern = near | is_global[:, None] | is_global[None, :]
    keys = torch.cat([torch.ones(page_mask.shape[0], n_latents, dtype=torch.bool),
                      page_mask.repeat_interleave(n_latents, dim=1)], dim=1)  # fmt: skip
    return pattern[None, None] & keys[:, None, None, :]


@pytest.mark.parametrize("window", [2, 4, 8])
def test_page_windows_equal_full_attention_under_the_page_window_mask(window):
    c = config(page_window=window, max_pages=7)
    pt = model(c).pages.double()
    b, p = 2, 7
    latents = torch.randn(b, p, c.n_latents, c.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    page_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    summary, pages = pt(latents, page_mask)

    ref = copy.deepcopy(pt)
    for block in ref.encoder.blocks:
        block.attn.backend = "math"  # dense scores, masked by the equation's pattern
    absolute = ref.absolute.weight[: p * c.n_latents].view(1, p, c.n_latents, -1)  # E_abs of each latent slot
    x = latents + ref.page.weight[:p][None, :, None] + absolute
    seq = torch.cat([ref.summary.expand(b, -1, -1), x.reshape(b, -1, c.d_model)], dim=1)
    h = ref.encoder(seq, mask=page_window_mask(p, c.n_latents, window, page_mask))
    torch.testing.assert_close(summary, h[:, : c.n_latents], rtol=0, atol=1e-10)
    real = page_mask[:, :, None, None].expand_as(pages)  # padded pages' rows are not compared (no one reads them)
    torch.testing.assert_close(pages[real], h[:, c.n_latents :].reshape_as(pages)[real], rtol=0, atol=1e-10)
    if window // 2 < p - 1:  # the window really cuts: a page far away does not reach page 0 in one layer
        assert not page_window_mask(p, c.n_latents, window, page_mask)[0, 0, c.n_latents, -1]


@pytest.mark.parametrize("figure_global", [False, True])
def test_reasoning_window_equals_full_attention_with_the_card_global_tokens(figure_global):
    """The sliding window with the first ``n_global`` tokens global equals dense attention under that mask; with
    ``figure_global`` the figure tokens (one per page, some absent) are global too."""
    c = config(reason_window=8, figure_global=figure_global)
    r = model(c).reasoning.double()
    g = torch.Generator().manual_seed(2)
    b, n_doc = 2, 40
    parts = [
        ("question", torch.randn(b, c.max_question_len, c.d_model, generator=g, dtype=torch.float64),
         torch.arange(c.max_question_len) < torch.tensor([[5], [9]])),
        ("summary", torch.randn(b, c.n_latents, c.d_model, generator=g, dtype=torch.float64),
         torch.ones(b, c.n_latents, dtype=torch.bool)),
        ("page_start", torch.randn(b, c.max_pages, c.d_model, generator=g, dtype=torch.float64),
         torch.ones(b, c.max_pages, dtype=torch.bool)),
        ("table_header", torch.randn(b, c.max_pages * c.n_headers, c.d_model, generator=g, dtype=torch.float64),
         (torch.arange(c.max_pages * c.n_headers) < 3).expand(b, -1)),
    ]  # fmt: skip
    if figure_global:
        parts.append(("figure", torch.randn(b, c.max_pages, c.d_model, generator=g, dtype=torch.float64),
                      torch.tensor([[True, False] * (c.max_pages // 2), [False, True] * (c.max_pages // 2)])))
    parts.append(("page", torch.randn(b, n_doc, c.d_model, generator=g, dtype=torch.float64),
                  torch.ones(b, n_doc, dtype=torch.bool)))  # fmt: skip
    assert [role for role, _, _ in parts][:-1] == list(c.global_tokens)
    got = r(parts)
    n = c.n_global + n_doc
    assert n == sum(t.shape[1] for _, t, _ in parts)
    i = torch.arange(n)
    is_global = i < c.n_global  # question tokens, summary, page starts, table headers (and figures)
    pattern = is_global[:, None] | is_global[None, :] | ((i[:, None] - i[None, :]).abs() <= c.reason_window // 2)
    keys = torch.cat([m.expand(b, -1) for _, _, m in parts], dim=1)
    ref = copy.deepcopy(r)
    for block in ref.encoder.blocks:
        block.attn.backend = "math"
    x = torch.cat([ref._role(role, t) for role, t, _ in parts], dim=1)
    want = ref.encoder(x, mask=pattern[None, None] & keys[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# -- the positional switches each do what they say ----------------------------------------------------------------


def _logits(c, docs, tokenizer):
    """Float64 logits: a fresh model moves them by ~1e-5 for a change it sees, far above float64 rounding."""
    with torch.no_grad():
        return model(c).double()(collate(docs, c, tokenizer))


def test_each_table_header_cell_is_a_global_token_of_the_reasoning_module(tokenizer):
    """The card's "table headers as global tokens": one per header cell, the fused state of the cell's first token;
    the tiny preset's reasoning module has max_pages x (max_table_cols - 1) of them."""
    c = config()
    assert c.n_headers == c.max_table_cols - 1
    assert c.n_global == c.max_question_len + c.n_latents + c.max_pages + c.max_pages * c.n_headers
    docs = documents(c)
    docs[1].pages[1].table = [["long header word", "x", "rain"], ["a", "1", "2"]]  # three columns, multi-token cell
    batch = collate(docs, c, tokenizer)
    b, p, n_t = batch.text_ids.shape
    fused = torch.arange(batch.table_ids.shape[-1] + n_t, dtype=torch.float64)[None, None, :, None]
    headers, present = model(c).table_headers(fused.expand(b, p, -1, 3), batch)
    assert headers.shape == (b, p, c.n_headers, 3) and present.shape == (b, p, c.n_headers)
    expected = torch.zeros(b, p, c.n_headers, dtype=torch.bool)
    for i, doc in enumerate(docs):
        for j, page in enumerate(doc.pages):
            if page.table is None:
                continue
            at = 1  # after the [ROW_0] marker: each header cell's first token, then its tokens and [SEP]
            for k, cell in enumerate(page.table[0]):
                assert headers[i, j, k, 0] == n_t + at, (i, j, k)
                expected[i, j, k] = True
                at += len(tokenizer.base.encode(cell)) + 1
    assert torch.equal(present, expected)  # no header past a table's last column, on a page without one, or padding
    assert present.sum() == 2 + 2 + 3
    m = model(c)
    parts = m.read_hierarchically(batch, m.text(batch.question_ids, batch.question_mask))
    n_doc = sum(t.shape[1] for role, t, _ in parts if role != "page")
    assert c.max_question_len + n_doc == c.n_global  # the global block the reasoning window is built for


def test_figure_global_tokens_are_the_fused_image_class_states_plus_the_page_number(tokenizer):
    """``figure_global``: one more global token per page, the fused state of the page's image ``[class]`` token (the
    ViT's ``[class]`` output, projected, is the fusion's input there) plus ``E_page[p]``, exactly; a key only on pages
    with an image; ``max_pages`` more global tokens in ``n_global`` and in the reasoning window's global block."""
    c = config(figure_global=True)
    card = config()
    assert c.global_tokens == {**card.global_tokens, "figure": c.max_pages}
    assert c.n_global == card.n_global + c.max_pages and c.reason_backend().endswith(f"global={c.n_global}")
    m = model(c).double()
    batch = collate(documents(c), c, tokenizer)
    batch = batch._replace(images=batch.images.double())
    seen = {}
    m.image.register_forward_hook(lambda mod, args, out: seen.update(image=out))
    m.fusion.register_forward_pre_hook(lambda mod, args: seen.update(fusion=args))
    with torch.no_grad():
        question = m.text(batch.question_ids, batch.question_mask)
        parts = m.read_hierarchically(batch, question)
        fused, _ = m.encode_pages(batch, question)  # the same pages again: what read_hierarchically fused
    assert [role for role, _, _ in parts] == ["summary", "page_start", "table_header", "figure", "page"]
    _, figures, has_figure = parts[3]
    b, p = batch.page_mask.shape
    assert figures.shape == (b, c.max_pages, c.d_model) and has_figure.shape == (b, c.max_pages)
    at = batch.text_ids.shape[-1] + batch.table_ids.shape[-1]  # the first image token of a page
    assert torch.equal(figures[:, :p], fused[:, :, at] + m.pages.page.weight[:p])
    assert not figures[:, p:].any()  # padded to max_pages with zeros
    no = [False] * (c.max_pages - 4)
    assert has_figure.tolist() == [[False, True, True, False, *no], [True, False, False, False, *no]]
    tokens, modality = seen["fusion"][:2]  # before fusion: the ViT's [class] output, projected, sits at `at`
    assert modality[at] == 2 and modality[at - 1] != 2  # IMAGE, after the table's tokens
    images = batch.image_mask.view(-1)
    torch.testing.assert_close(tokens[images, at], seen["image"][:, 0], rtol=0, atol=0)
    assert c.max_question_len + sum(t.shape[1] for role, t, _ in parts if role != "page") == c.n_global


def test_figure_global_off_is_the_card_reader_and_on_adds_only_the_figure_tokens(tokenizer):
    """Off (the default), the reader is the card's: no figure role, the same parameters as before the switch existed.
    On, the same weights with every figure token hidden (no key) give the card reader's logits (float64): the switch
    adds those tokens and their role row, nothing else; shown, they change the logits."""
    off, on = model(config()).double(), model(config(figure_global=True)).double()
    assert off.reasoning.roles == off.reasoning.ROLES == ("question", "summary", "page_start", "table_header", "page")
    assert on.reasoning.roles == off.reasoning.roles + ("figure",)
    state, on_state = off.state_dict(), on.state_dict()
    assert state.keys() == on_state.keys()
    assert {k for k in state if state[k].shape != on_state[k].shape} == {"reasoning.role.weight"}
    state["reasoning.role.weight"] = torch.cat([state["reasoning.role.weight"], on_state["reasoning.role.weight"][5:]])
    on.load_state_dict(state)
    batch = collate(documents(config()), config(), tokenizer)
    batch = batch._replace(images=batch.images.double())
    with torch.no_grad():
        card, shown = off(batch), on(batch)
        on.figures = lambda fused, b: (DocReader.figures(fused, b)[0], torch.zeros_like(b.page_mask))  # no key
        hidden = on(batch)
    torch.testing.assert_close(hidden, card, rtol=0, atol=1e-12)
    assert (shown - card).abs().amax() > 1e-6


def test_kind_heads_route_each_row_to_its_kinds_head():
    """KindHeads (float64): row ``b`` gets ``h_b W_k^T + c_k`` of its own kind ``k = kinds[b]``, computed here row by
    row; a row's loss reaches its own kind's head only (kind 1 asked by no row: no gradient)."""
    from archlab.models.docreader import KindHeads

    torch.manual_seed(0)
    heads = KindHeads(8, 5, 3).double()
    h = torch.randn(4, 8, dtype=torch.float64)
    kinds = torch.tensor([2, 0, 2, 0])
    out = heads(h, kinds)
    want = torch.stack([h[b] @ heads.heads[k].weight.T + heads.heads[k].bias for b, k in enumerate(kinds.tolist())])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert (out - heads(h, torch.zeros_like(kinds))).abs().amax() > 1e-3  # the heads differ: mixed rows would show
    out.sum().backward()
    assert heads.heads[1].weight.grad.abs().max() == 0 and heads.heads[1].bias.grad.abs().max() == 0
    assert heads.heads[0].weight.grad.abs().max() > 0 and heads.heads[2].weight.grad.abs().max() > 0
    torch.testing.assert_close(heads.heads[0].bias.grad, torch.full((5,), 2.0, dtype=torch.float64))  # rows 1 and 3


def test_a_reader_with_answer_kinds_answers_each_document_with_its_kinds_head(tokenizer):
    """``answer_kinds``: each document's logits (float64) are those of the one-head reader with the same weights
    and its kind's head as the head; the batch's ``kinds`` follow the documents' ``kind``. Without answer_kinds the
    reader is the one-head reader it was (``head`` a single Linear)."""
    kinds = ("largest", "count")
    c = config(answer_kinds=kinds)
    routed, shared = model(c).double(), model(config()).double()
    assert isinstance(shared.head, torch.nn.Linear) and len(routed.head.heads) == 2
    docs = documents(c)
    docs[0].kind, docs[1].kind = "count", "largest"
    batch = collate(docs, c, tokenizer)
    assert batch.kinds.tolist() == [1, 0] and collate(docs, config(), tokenizer).kinds.tolist() == [0, 0]
    batch = batch._replace(images=batch.images.double())
    state = {k: v for k, v in routed.state_dict().items() if not k.startswith("head.")}
    with torch.no_grad():
        out = routed(batch)
        for row, k in enumerate(batch.kinds.tolist()):
            shared.load_state_dict({**state, "head.weight": routed.head.heads[k].weight,
                                    "head.bias": routed.head.heads[k].bias})  # fmt: skip
            one_head = shared(batch._replace(kinds=torch.zeros_like(batch.kinds)))
            torch.testing.assert_close(out[row], one_head[row], rtol=0, atol=1e-12)
        swapped = routed(batch._replace(kinds=1 - batch.kinds))
    assert ((swapped - out).abs().amax(-1) > 1e-6).all()
    with pytest.raises(DataError, match=r"document 0: kind='digit' has no answer head; the reader's answer_kinds are "
                                        r"\['largest', 'count'\]"):  # fmt: skip
        collate([Document([Page("text")], "q?", 0, kind="digit")], c, tokenizer)
    with pytest.raises(ShapeError, match=r"kinds holds 2, outside \[0, answer heads=2\)"):
        routed(batch._replace(kinds=batch.kinds + 1))
    with pytest.raises(ShapeError, match=r"kinds must have shape \[2\]"):
        routed(batch._replace(kinds=batch.kinds[:1]))
    with pytest.raises(ShapeError, match=r"kinds holds 1, outside \[0, answer heads=1\)"):
        shared(batch)  # one head: every row's kind is 0


def test_cell_number_reads_plain_numbers_only():
    from archlab.models.docreader import cell_number

    assert [cell_number(c) for c in ("42", "-3.5", " 7 ", "+0.25", ".5", "12.")] == [42.0, -3.5, 7.0, 0.25, 0.5, 12.0]
    assert [cell_number(c) for c in ("bolts", "", "3 4", "1e3", "4-2", "9" * 400)] == [None] * 6  # 9...9: inf


def test_number_embedding_is_its_equation_in_float64():
    """``E_num(v) = W_num (sign v, sign v log(1 + |v|))``, computed by hand in float64; ``E_num(0) = 0``; the
    second feature orders values (strictly increasing)."""
    from archlab.models.docreader import NumberEmbedding

    torch.manual_seed(0)
    e = NumberEmbedding(5).double()
    v = torch.tensor([[-20.0, -1.5, 0.0], [0.5, 3.0, 49.0]], dtype=torch.float64)
    phi = torch.stack([torch.sign(v), torch.sign(v) * torch.log(1 + v.abs())], dim=-1)
    torch.testing.assert_close(e(v), phi @ e.proj.weight.T, rtol=0, atol=1e-15)
    assert e(v).shape == (2, 3, 5) and not e(v)[0, 2].any()
    features = NumberEmbedding.features(v.flatten())[:, 1]
    assert (features.diff() > 0).all()
    assert NumberEmbedding.features(torch.tensor(0.5, dtype=torch.float64)).tolist() == [1.0, math.log(1.5)]


def test_table_numbers_add_the_number_embedding_to_the_value_tokens_only(tokenizer):
    """``table_numbers``: the table encoder's first-layer input is ``LN(E_tok + E_seg + E_row + E_col + E_num(v))``,
    checked in float64 against the same sum built by hand; tokens outside number cells (markers, words, [SEP]) are
    as without the switch; changing a number changes the answer logits, and the numeric weights get a gradient."""
    c = config(table_numbers=True)
    m = model(c).double()
    batch = collate(documents(c), c, tokenizer)
    batch = batch._replace(images=batch.images.double(), table_values=batch.table_values.double())
    seen = {}
    m.table.bert.encoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        m(batch)
    on_rows = batch.table_mask.view(-1, batch.table_ids.shape[-1]).any(-1)  # the pages with a table
    ids, rows, cols, values = (getattr(batch, k).flatten(0, 1)[on_rows] for k in
                               ("table_ids", "table_rows", "table_cols", "table_values"))  # fmt: skip
    emb, t = m.table.bert.embeddings, m.table
    plain = emb.word(ids) + emb.segment(torch.zeros_like(ids)) + t.row(rows) + t.col(cols)
    phi = torch.stack([torch.sign(values), torch.sign(values) * torch.log1p(values.abs())], dim=-1)
    torch.testing.assert_close(seen["x"], emb.norm(plain + phi @ t.number.proj.weight.T), rtol=0, atol=1e-12)
    numbers = values != 0
    assert numbers.sum() == 3  # 12, 7 and 3: one wordpiece each
    torch.testing.assert_close(seen["x"][~numbers], emb.norm(plain)[~numbers], rtol=0, atol=1e-12)
    m.float()
    batch = collate(documents(c), c, tokenizer)
    docs = documents(c)
    docs[0].pages[0].table[1][1] = "40"  # bolts 12 -> 40: a new wordpiece and a new number
    other = collate(docs, c, tokenizer)
    same_words = other._replace(table_values=batch.table_values.clone())  # the words of 40, the number 12
    with torch.no_grad():
        assert (m(other)[0] - m(same_words)[0]).abs().amax() > 1e-6  # the number itself is read
    m.train().compute_loss(batch._asdict())[0].backward()
    assert m.table.number.proj.weight.grad.abs().sum() > 0


def test_table_numbers_off_is_the_reader_without_them_and_on_adds_only_their_weights(tokenizer):
    """Off (the default): no numeric weights and the values are not read (other values, the same logits). On, with
    the off reader's weights and ``W_num = 0``, the logits are the off reader's exactly (float64): the switch adds
    ``E_num`` and nothing else."""
    off, on = model(config()).double(), model(config(table_numbers=True)).double()
    assert off.table.number is None
    state, on_state = off.state_dict(), on.state_dict()
    assert set(on_state) - set(state) == {"table.number.proj.weight"} and set(state) <= set(on_state)
    assert sum(p.numel() for p in on.parameters()) - sum(p.numel() for p in off.parameters()) == 2 * 16
    on.load_state_dict({**state, "table.number.proj.weight": torch.zeros_like(on_state["table.number.proj.weight"])})
    batch = collate(documents(config()), config(), tokenizer)
    batch = batch._replace(images=batch.images.double(), table_values=batch.table_values.double())
    with torch.no_grad():
        card = off(batch)
        torch.testing.assert_close(off(batch._replace(table_values=batch.table_values * 5 + 1)), card, rtol=0, atol=0)
        torch.testing.assert_close(on(batch), card, rtol=0, atol=0)


def test_table_positions_2d_tell_rows_apart(tokenizer):
    """Swapping two body rows of a table changes nothing without row/column embeddings (the table's tokens are then
    a set to every later stage) and changes the answer logits with them."""
    table = [["item", "count"], ["bolts", "12"], ["nuts", "7"], ["pins", "30"]]
    swapped = [table[0], table[2], table[1], table[3]]
    make = lambda t: [Document([Page("", t)], "largest count?", 0)]  # noqa: E731
    for positions, differs in (("2d", True), ("none", False)):
        c = config(table_positions=positions)
        a, b = _logits(c, make(table), tokenizer), _logits(c, make(swapped), tokenizer)
        assert (not torch.allclose(a, b, rtol=0, atol=1e-12)) == differs, positions


def test_text_positions_rope_tell_word_order(tokenizer):
    """The page-start ([CLS]) state of a page's text changes when its words are shuffled with RoPE or learned
    positions, and not without positions (attention alone is blind to order). Float64: a fresh BERT's attention
    is nearly uniform, so order moves the state by ~1e-6, far above float64 rounding (~1e-16)."""
    ids = torch.tensor([tokenizer.text("alpha beta gamma delta epsilon", 48)])
    shuffled = ids[:, [0, 4, 5, 3, 1, 2, 6]] if ids.shape[1] == 7 else ids.flip(1)
    assert ids.shape[1] == 7 and sorted(ids[0].tolist()) == sorted(shuffled[0].tolist())
    mask = torch.ones_like(ids, dtype=torch.bool)
    for positions, differs in (("rope", True), ("learned", True), ("none", False)):
        text = model(config(text_positions=positions)).text.double()
        with torch.no_grad():
            a, b = text(ids, mask)[:, 0], text(shuffled, mask)[:, 0]
        assert (not torch.allclose(a, b, rtol=0, atol=1e-12)) == differs, positions


def test_image_positions_tell_patches_apart(tokenizer):
    c0 = config()
    img = image(5, c0)
    moved = img.clone()
    moved[:, 0:2, 0:2], moved[:, 6:8, 6:8] = img[:, 6:8, 6:8], img[:, 0:2, 0:2]  # swap two 2x2 patches
    make = lambda im: [Document([Page("", None, im)], "which digit?", 0)]  # noqa: E731
    for positions, differs in (("patch", True), ("none", False)):
        c = config(image_positions=positions)
        a, b = _logits(c, make(img), tokenizer), _logits(c, make(moved), tokenizer)
        assert (not torch.allclose(a, b, rtol=0, atol=1e-12)) == differs, positions


def test_page_positions_tell_page_order():
    """With a window wide enough to see every page, swapping two pages' latents changes the document summary only
    through the page-number and absolute position embeddings."""
    g = torch.Generator().manual_seed(3)
    for positions, differs in (("learned+page", True), ("page", True), ("none", False)):
        c = config(page_positions=positions, page_window=16)
        pt = model(c).pages
        latents = torch.randn(1, 3, c.n_latents, c.d_model, generator=g)
        with torch.no_grad():
            a = pt(latents, torch.ones(1, 3, dtype=torch.bool))[0]
            b = pt(latents[:, [1, 0, 2]], torch.ones(1, 3, dtype=torch.bool))[0]
        assert (not torch.allclose(a, b, atol=1e-5)) == differs, positions


# -- real weights, the card preset -------------------------------------------------------------------------------


def test_the_text_encoder_takes_minilm_weights_and_computes_what_minilm_computes(tokenizer):
    from archlab.interop.sentence import sentence_encoder

    minilm = sentence_encoder("minilm-l6").bert
    c = get_config("docreader-tiny", text_d_model=384, text_n_heads=12, text_n_layers=6, text_d_ff=1536,
                   text_positions="learned", frozen=("text",))  # fmt: skip
    m = model(c)
    m.load_text_encoder(minilm)
    ids = torch.tensor([tokenizer.text("a page about the quarterly report", 48)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        theirs = minilm(ids, attention_mask=mask).hidden
        x = m.text.bert.embeddings(ids, torch.zeros_like(ids))
        ours = m.text.bert.encoder(x, mask=padding_mask(mask))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="text_positions='rope'"):
        model(c.replace(text_positions="rope")).load_text_encoder(minilm)
    with pytest.raises(CheckpointError, match="n_layers=6 but the reader's text encoder has n_layers=2"):
        model(config(text_d_model=384, text_n_heads=12, text_n_layers=2, text_d_ff=1536,
                     text_positions="learned")).load_text_encoder(minilm)  # fmt: skip


def small_vit(path, seed=0, **overrides):
    """A ViT of :data:`SMALL`'s image encoder sizes (with its 10-class head, as a digits run has it) saved to
    ``path``; returned."""
    from archlab.interop.io import save_model
    from archlab.models.docreader import image_vit_config
    from archlab.models.vit import ViT

    torch.manual_seed(seed)
    vit = ViT(image_vit_config(config(), n_classes=10).replace(**overrides))
    save_model(vit, path)
    return vit


def test_image_init_loads_a_vits_weights_and_frozen_they_stay_as_loaded(tokenizer, tmp_path):
    from archlab.train import build_optimizer

    vit = small_vit(tmp_path / "vit")
    c = config(image_init=str(tmp_path / "vit"), frozen=("image",))
    m = model(c, seed=1).train()
    loaded = {k: v.clone() for k, v in m.image.vit.state_dict().items()}
    assert loaded.keys() == {k for k in vit.state_dict() if not k.startswith("head.")}
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in loaded.items())
    assert not torch.equal(loaded["patch_embed.weight"], model(config(), seed=1).image.vit.patch_embed.weight)
    proj = m.image.proj.weight.clone()
    optimizer = build_optimizer(m, lr=1e-2)
    m.compute_loss(collate(documents(c), c, tokenizer)._asdict())[0].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.image.parameters())
    assert all(p.grad is not None for p in m.fusion.parameters())
    fusion = [p.detach().clone() for p in m.fusion.parameters()]
    optimizer.step()  # the frozen encoder stays as loaded, the rest of the reader moves
    assert all(torch.equal(v, loaded[k]) for k, v in m.image.vit.state_dict().items())
    assert torch.equal(m.image.proj.weight, proj)
    assert any(not torch.equal(p, q) for p, q in zip(m.fusion.parameters(), fusion))


def test_image_init_refuses_missing_weights_other_models_and_other_shapes(tmp_path):
    from archlab.interop.io import save_model

    with pytest.raises(CheckpointError, match=r"image_init='.*nowhere': .*no such run folder or checkpoint"):
        model(config(image_init=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="image_init='.*empty': .*neither a run folder"):
        model(config(image_init=str(tmp_path / "empty")))
    save_model(build_model("mlp-digits"), tmp_path / "mlp")
    with pytest.raises(CheckpointError, match="holds a MLP; the image encoder takes a ViT's weights"):
        model(config(image_init=str(tmp_path / "mlp")))
    small_vit(tmp_path / "deep", n_layers=2)
    with pytest.raises(CheckpointError, match="the ViT has n_layers=2 but the reader's image encoder has "
                                              "image_n_layers=1"):  # fmt: skip
        model(config(image_init=str(tmp_path / "deep")))
    small_vit(tmp_path / "wide", d_model=32, n_heads=2, d_ff=32)
    with pytest.raises(CheckpointError, match="the ViT has d_model=32 but the reader's image encoder has "
                                              "image_d_model=16"):  # fmt: skip
        model(config(image_init=str(tmp_path / "wide")))
    small_vit(tmp_path / "vit")
    with pytest.raises(ConfigError, match="image_positions='none': a pretrained ViT comes with learned patch"):
        model(config(image_init=str(tmp_path / "vit"), image_positions="none"))


@pytest.mark.parametrize(("data", "refused"), [
    ({"source": "digits", "valid_percent": 10, "seed": 0}, True),  # archlab train's default split: held-out figures
    ({"source": "digits", "valid_percent": 20, "seed": 1}, True),
    ({"source": "digits", "valid_percent": 20, "seed": 0}, False),  # the documents' split
    ({"source": "stdlib", "valid_percent": 10, "seed": 0}, False),  # not the digits: nothing to check
])  # fmt: skip
def test_image_pretraining_on_the_documents_held_out_figures_is_refused(tmp_path, data, refused):
    import json

    from archlab.models.docreader import check_image_pretraining

    (tmp_path / "run.json").write_text(json.dumps({"model": {"preset": "vit-tiny"}, "data": data}))
    if not refused:
        check_image_pretraining(tmp_path)
        return
    words = (f"data.valid_percent={data['valid_percent']} and data.seed={data['seed']}: its training images include "
             "figures of the documents' held-out pages")  # fmt: skip
    with pytest.raises(DataError, match=words):
        check_image_pretraining(tmp_path)


def test_the_card_preset_builds_on_meta_with_the_card_sizes():
    with torch.device("meta"):
        m = build_model("docreader-card")
    c = m.config
    assert (c.max_pages, c.n_latents, c.page_window, c.reason_window) == (50, 64, 8, 512)
    assert c.n_patches == 256  # ViT-L/14 at 224 px: (224 / 14)^2, not the card's 196
    assert m.image.vit.config.seq_len == 257
    assert sum(p.numel() for p in m.text.parameters()) > 500e6  # XLM-R-large-shaped: 250k x 1024 embeddings + 24 layers
    assert not any(p.requires_grad for p in [*m.text.parameters(), *m.image.parameters()])  # the card freezes them


# -- bad input: clear errors, before any computation ----------------------------------------------------------------


def test_bad_documents_are_refused_naming_document_and_page(tokenizer):
    c = config()
    ok = Page("text")
    with pytest.raises(DataError, match=r"document 0 has 7 pages, more than .* page table holds \(max_pages=6\)"):
        collate([Document([ok] * 7, "q?", 0)], c, tokenizer)
    with pytest.raises(DataError, match=r"document 1, page 0: image has shape \[1, 16, 16\], but the reader takes "
                                        r"\[n_channels, image_size, image_size\] = \[1, 8, 8\]"):  # fmt: skip
        collate([Document([ok], "q?", 0), Document([Page("x", None, torch.rand(1, 16, 16))], "q?", 0)], c, tokenizer)
    with pytest.raises(DataError, match="document 0, page 1 is empty: no text, no table and no image"):
        collate([Document([ok, Page("  ")], "q?", 0)], c, tokenizer)
    with pytest.raises(DataError, match=r"page 0: table row 2 has 1 cells but the header has 2 \(ragged rows\)"):
        collate([Document([Page("t", [["a", "b"], ["1", "2"], ["3"]])], "q?", 0)], c, tokenizer)
    with pytest.raises(DataError, match=r"answer=5 must be a class index in \[0, n_answers=5\)"):
        check_document(Document([ok], "q?", 5), 0, c)
    with pytest.raises(DataError, match="image values must be finite and in"):
        collate([Document([Page("x", None, image(0, c) * 3)], "q?", 0)], c, tokenizer)
    with pytest.raises(DataError, match="non-empty list of Document"):
        collate([], c, tokenizer)


def test_bad_batches_are_refused_by_the_model(tokenizer):
    c = config()
    m = model(c)
    batch = collate(documents(c), c, tokenizer)
    small = m.config.replace(max_pages=3)
    with pytest.raises(ShapeError, match=r"P=4 pages, more than the page table holds \(max_pages=3\)"):
        DocReader(small)(batch)
    with pytest.raises(ShapeError, match=r"images must be float \[B, P, C, H, W\]"):
        m(batch._replace(images=torch.zeros(2, 4, 1, 16, 16)))
    with pytest.raises(ShapeError, match="text_ids is an empty batch"):
        m(DocBatch(*(t[:0] for t in batch)))
    with pytest.raises(ShapeError, match="text_ids holds"):
        m(batch._replace(text_ids=batch.text_ids + c.vocab_size))
    wanted = r"table_values must be float \[B, P, N_c\] = \[2, 4, 15\], got "
    with pytest.raises(ShapeError, match=wanted + r"\[2, 4, 15\] of torch.int64"):
        m(batch._replace(table_values=batch.table_values.long()))
    with pytest.raises(ShapeError, match=wanted + r"\[2, 4, 14\]"):
        m(batch._replace(table_values=batch.table_values[..., :-1]))
    with pytest.raises(ShapeError, match="table_values must be finite"):
        m(batch._replace(table_values=batch.table_values.clone().fill_(float("nan"))))
    with pytest.raises(DataError, match="lacks"):
        m.compute_loss({"text_ids": batch.text_ids})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(reader="linear"), "reader: unknown value 'linear'"),
        (dict(text_positions="alibi"), "text_positions: unknown value 'alibi'"),
        (dict(text_d_model=18, text_n_heads=2), "d_k = d_model / n_heads must be even"),
        (dict(frozen=("text", "text")), "names an encoder twice"),
        (dict(page_question="page"), "page_question: unknown value 'page'"),
        (dict(frozen=("fusion",)), "frozen: unknown value 'fusion'"),
        (dict(backend="sliding"), "the reader's dense layers take auto, math or sdpa"),
        (dict(image_size=9), "image_size=9 is not divisible by patch_size=2"),
        (dict(figure_global="yes"), "figure_global='yes' must be true or false"),
        (dict(figure_global=1), "figure_global=1 must be true or false"),
        (dict(table_numbers="on"), "table_numbers='on' must be true or false"),
        (dict(answer_kinds=("count", "count")), "'count'] names a kind twice"),
        (dict(answer_kinds=("count", "")), "''] must name question kinds (non-empty strings)"),
        (dict(image_init=""), "image_init='' must be None or the path of a ViT's weights"),
        (dict(image_init=3), "image_init=3 must be a string or null"),
        (dict(max_pages=10**8), "max_pages=100000000 gives the reasoning module"),  # 25.6 GB of positions before
    ],
)
def test_bad_configs_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(**overrides)


# -- init --------------------------------------------------------------------------------------------------------


def test_fan_in_init_draws_each_reader_layer_at_its_stated_std():
    """``weight_init="fan_in"``: every linear layer of the reader's own modules has weights of std
    ``1 / sqrt(max(fan_in, 64))`` (sample std within 10%) and zero biases; the BERT and ViT encoders keep their
    own ``N(0, 0.02)``; ``weight_init="bert"`` leaves the reader's layers at 0.02."""
    from archlab.models.docreader import fan_in_std

    assert (fan_in_std(16), fan_in_std(64), fan_in_std(128)) == (0.125, 0.125, 128**-0.5)
    c = get_config("docreader-tiny", weight_init="fan_in")  # width 64, FFN 128: stds 0.125 and 0.088
    m = model(c)
    own = {"text.proj", "table.proj", "image.proj", "fusion", "perceiver", "pages", "reasoning", "head"}
    checked = set()
    for name, module in m.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(name == o or name.startswith(o + ".") for o in own):
            continue
        std = float(module.weight.detach().std())
        want = max(module.in_features, 64) ** -0.5
        assert abs(std - want) < 0.1 * want, (name, std, want)
        assert module.bias is None or not module.bias.any(), name
        checked.add(name.split(".")[0])
    assert checked == {"text", "table", "image", "fusion", "perceiver", "pages", "reasoning", "head"}
    assert abs(float(m.text.bert.encoder.blocks[0].ffn.w1.weight.detach().std()) - 0.02) < 0.002  # BERT's own init
    bert = model(c.replace(weight_init="bert"))
    for part in (bert.head, bert.pages.encoder.blocks[0].ffn.w1, bert.reasoning.encoder.blocks[0].attn.in_proj):
        assert abs(float(part.weight.detach().std()) - 0.02) < 0.002
    with pytest.raises(ConfigError, match="weight_init"):
        get_config("docreader-tiny", weight_init="xavier")


def test_answers_images_and_fields_that_are_no_tensors_are_refused_before_the_forward(tokenizer):
    c = config()
    m = model(c)
    batch = collate(documents(c), c, tokenizer)
    with pytest.raises(ShapeError, match=r"answers holds 103, outside \[0, n_answers=5\)"):
        m.compute_loss({**batch._asdict(), "answers": batch.answers + 100})  # was: IndexError inside cross_entropy
    with pytest.raises(ShapeError, match=r"answers holds -100, outside \[0, n_answers=5\)"):
        m.compute_loss({**batch._asdict(), "answers": torch.full_like(batch.answers, -100)})  # was: a NaN loss
    with pytest.raises(ShapeError, match="answers must be an integer tensor, got dtype torch.float32"):
        m(batch._replace(answers=batch.answers.float()))
    for bad in (float("nan"), 1e30, -1.0):  # was: NaN logits, silently
        with pytest.raises(ShapeError, match=r"images must be finite and in \[0, 1\]"):
            m(batch._replace(images=batch.images.clone().fill_(bad)))
    with pytest.raises(ShapeError, match=r"question_ids must be a tensor \(DocBatch fields are tensors\), got list"):
        m(batch._replace(question_ids=batch.question_ids.tolist()))  # was: AttributeError 'list' ... 'ndim'
