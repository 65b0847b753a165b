"""Page chunking of the document reader (``pages_per_chunk``): reading the pages a few at a time, each chunk
checkpointed in training, gives the unchunked reader's outputs and gradients (float64), page by page."""

from __future__ import annotations

import pytest
import torch

from archlab.errors import ConfigError
from archlab.models import build_model, get_config
from archlab.models.docreader import DocBatch, DocReaderTokenizer, Document, Page, collate

SMALL = dict(  # docreader-tiny, narrower still (as tests/models/test_docreader.py): every stage, fast on two cores
    text_d_model=16, text_n_heads=2, text_n_layers=1, text_d_ff=32, table_n_layers=1, image_d_model=16,
    image_n_heads=2, image_n_layers=1, image_d_ff=32, d_model=16, n_heads=2, d_ff=32, n_latents=4, page_layers=2,
    reason_layers=1, max_pages=6, n_answers=5, frozen=(),
)  # fmt: skip


def documents(c) -> list[Document]:
    """Two documents of 5 and 3 pages (the second padded to 5), every page different: text on each, tables and
    images on some, so a chunk can hold pages with and without each modality and padded pages."""

    def image(seed: int) -> torch.Tensor:
        return torch.rand(c.n_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))

    words = ["mill", "river", "bolts", "glacier", "harbour", "orchard", "quarry", "signal"]
    pages = [Page(f"page {i} about the {words[i]} and the {words[-1 - i]}",
                  [["item", "count"], [words[i], str(3 * i + 1)]] if i % 2 == 0 else None,
                  image(i) if i % 3 != 1 else None) for i in range(8)]  # fmt: skip
    return [Document(pages[:5], "which page lists the largest count?", 2),
            Document(pages[5:], "how many pages mention the river?", 1)]  # fmt: skip


def double(batch: DocBatch) -> DocBatch:
    return DocBatch(*(t.double() if t.is_floating_point() else t for t in batch))


def run(c, batch: DocBatch, seed: int = 0):
    """``(the reader's document parts, logits, {parameter: gradient})`` of one training forward + backward in
    float64 (``parts``: the reasoning module's inputs after the question, by role, for the hierarchical and flat
    readers)."""
    torch.manual_seed(seed)
    m = build_model(c).double().train()
    question = m.text(batch.question_ids, batch.question_mask)
    parts = m.read_hierarchically(batch, question) if c.reader == "hierarchical" else m.read_flat(batch)
    logits = m(batch)
    torch.nn.functional.cross_entropy(logits, batch.answers).backward()
    return parts, logits.detach(), {n: p.grad for n, p in m.named_parameters()}


CASES = {
    "hierarchical": dict(reader="hierarchical"),
    "hierarchical, question in fusion, figures, numbers": dict(page_question="fusion", figure_global=True,
                                                              table_numbers=True),  # fmt: skip
    "hierarchical, question in latents, frozen encoders": dict(page_question="latents", frozen=("text", "image")),
    "flat": dict(reader="flat"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pages_per_chunk", [1, 2])
def test_chunked_pages_give_the_unchunked_outputs_and_gradients(case, pages_per_chunk):
    """5 pages in chunks of 1 (5 chunks) and 2 (2, 2, 1: the last one short): every page's document tokens (latents,
    start, headers, figure; fused tokens for the flat reader), the logits and every gradient equal the unchunked
    reader's in float64. Every page's reference tokens differ from every other page's, so a chunk boundary that
    mixed two pages, dropped one or repeated one could not pass."""
    c = get_config("docreader-tiny", **{**SMALL, **CASES[case]})
    batch = double(collate(documents(c), c, DocReaderTokenizer()))
    ref_parts, ref_logits, ref_grads = run(c, batch)
    parts, logits, grads = run(c.replace(pages_per_chunk=pages_per_chunk), batch)

    assert [role for role, _, _ in parts] == [role for role, _, _ in ref_parts]
    for (role, ref, ref_mask), (_, got, mask) in zip(ref_parts, parts, strict=True):
        assert torch.equal(mask, ref_mask), role
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=role)
    page_tokens = ref_parts[-1][1].detach().view(2, 5, -1)  # [B, P, tokens of a page x d]
    real = page_tokens[batch.page_mask]  # the 8 real pages
    assert torch.cdist(real, real).add(torch.eye(len(real), dtype=real.dtype)).min() > 1e-3  # pairwise distinct
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-12, msg=name)
    trained = [n for n, g in ref_grads.items() if g is not None and g.abs().sum() > 0]
    assert any(n.startswith("fusion.") for n in trained)  # the chunked, recomputed stage trains and was compared
    if "frozen" not in case:
        assert any(n.startswith("text.") for n in trained) and any(n.startswith("image.") for n in trained)


def test_chunks_are_checkpointed_only_when_a_gradient_is_asked_and_no_grad_gives_the_same_logits():
    c = get_config("docreader-tiny", **SMALL)
    batch = double(collate(documents(c), c, DocReaderTokenizer()))
    torch.manual_seed(0)
    m = build_model(c.replace(pages_per_chunk=2)).double().eval()
    torch.manual_seed(0)
    ref = build_model(c).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(m(batch), ref(batch), rtol=1e-10, atol=1e-12)
    calls = []
    handle = m.fusion.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        m(batch)
    assert len(calls) == 3  # 5 pages in chunks of 2: 3 fusion runs, none again
    calls.clear()
    m.train()
    torch.nn.functional.cross_entropy(m(batch), batch.answers).backward()
    handle.remove()
    assert len(calls) == 6  # 3 in the forward, each chunk's again in backward (the recompute)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_pages_per_chunk_must_be_a_positive_int_or_none(bad):
    with pytest.raises(ConfigError, match="pages_per_chunk"):
        get_config("docreader-tiny", pages_per_chunk=bad)
