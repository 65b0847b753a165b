"""generate_batch with prompt-lookup drafts (speculative decoding in the batch): every row verifies its own drafts in
the batched pass and keeps what its logits accept, so greedy rows are the tokens they get without drafts (and alone),
in fewer passes; sampled rows follow the model's distribution (chi-square against the exact joint of two tokens)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import archlab.speculative as speculative
from archlab import kernels
from archlab.errors import ConfigError
from archlab.generation import drafts_per_row, generate, generate_batch, pass_rows
from archlab.models.gpt import GPT, GPTConfig
from archlab.speculative import PromptLookup

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_batch_rows import V, family_model  # noqa: E402
from test_speculative import chi_square_p_value  # noqa: E402


def counted_accepts(monkeypatch) -> list[tuple[int, int]]:
    """``(drafts, accepted)`` of every row's verification from here on."""
    seen: list[tuple[int, int]] = []
    accept = speculative.accept

    def spy(drafts, q, logits, sampling):
        new = accept(drafts, q, logits, sampling)
        seen.append((len(drafts), len(new) - 1))
        return new

    monkeypatch.setattr(speculative, "accept", spy)
    return seen


def test_drafts_per_row_share_the_pass_the_kernel_takes_between_the_rows(monkeypatch):
    assert [drafts_per_row(rows, 8, 16) for rows in (1, 2, 3, 4, 5, 8, 9, 16, 40)] == [8, 7, 4, 3, 2, 1, 0, 0, 0]
    assert drafts_per_row(2, 3, 16) == 3 and drafts_per_row(4, 8, 8) == 1 and drafts_per_row(1, 8, 12) == 8
    m = family_model("gpt")  # float64: no kernel
    assert pass_rows(m) == 16 == pass_rows(m.bfloat16())
    monkeypatch.setattr(kernels, "f32_kernel", lambda: 512)
    assert pass_rows(m.float()) == 12
    monkeypatch.setattr(kernels, "f32_kernel", lambda: 256)
    assert pass_rows(m) == 10
    monkeypatch.setattr(kernels, "f32_kernel", lambda: 0)
    assert pass_rows(m) == 16


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("batch_size", [None, 2])
@torch.no_grad()
def test_greedy_rows_with_drafts_are_their_tokens_without_in_fewer_passes(family, batch_size, monkeypatch):
    """Five prompts decoded together and two rows at a time (freed rows refilled), one stopping early at a stop
    token; the tiny models fall into repeating themselves, so lookup drafts. Each row's tokens are those of
    generate_batch without drafts and of generate alone; the batch took fewer passes of the model, drafts were
    accepted and rejected, and no pass fed more than pass_rows(model) tokens (16: float64, no kernel)."""
    m = family_model(family)
    g = torch.Generator().manual_seed(2)
    units = [torch.randint(1, V, (n,), generator=g).tolist() for n in (3, 4, 2, 5, 3)]
    prompts = [(u * 4)[:n] for u, n in zip(units, (9, 12, 7, 10, 6), strict=True)]
    alone = [generate(m, torch.tensor([p]), max_new_tokens=12)[0, len(p) :].tolist() for p in prompts]
    # a stop token that one row meets after its second token and no other row meets
    stop = next(t for row in alone for t in row[2:] if sum(t in other for other in alone) == 1)
    alone = [generate(m, torch.tensor([p]), max_new_tokens=12, stop_tokens=[stop], pad_id=stop)[0, len(p) :].tolist()
             for p in prompts]  # fmt: skip
    alone = [row[: row.index(stop) + 1] if stop in row else row for row in alone]
    widths: list[int] = []  # rows x tokens of every pass after the prefills
    hook = m.lm_head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[0] * out.shape[1]))
    try:
        plain = generate_batch(m, prompts, max_new_tokens=12, stop_tokens=[stop], batch_size=batch_size)
        plain_passes, widths[:] = len(widths), []
        seen = counted_accepts(monkeypatch)
        stats = speculative.SpeculativeStats()
        drafted = generate_batch(m, prompts, max_new_tokens=12, stop_tokens=[stop], batch_size=batch_size,
                                 draft="lookup", stats=stats)  # fmt: skip
    finally:
        hook.remove()
    assert drafted == plain == alone
    assert len(widths) < plain_passes
    assert sum(a for _, a in seen) > 0 and sum(d - a for d, a in seen) > 0  # drafts kept and drafts rejected
    assert (stats.drafted, stats.accepted) == (sum(d for d, _ in seen), sum(a for _, a in seen))
    assert stats.target_passes == len(widths) and stats.generated == sum(map(len, alone))
    assert max(w for w in widths if w < 32) <= pass_rows(m) == 16  # the prefills (6 tokens and more a row) left aside


def test_draft_arguments_are_checked():
    m = family_model("gpt")
    with pytest.raises(ConfigError, match="draft='layers:1': generate_batch drafts by prompt lookup"):
        generate_batch(m, [[1, 2]], max_new_tokens=2, draft="layers:1")
    with pytest.raises(ConfigError, match="stats must be None or an archlab.speculative.SpeculativeStats, got dict"):
        generate_batch(m, [[1, 2]], max_new_tokens=2, draft="lookup", stats={})
    with pytest.raises(ConfigError, match="draft_tokens=0 must be an int >= 1"):
        generate_batch(m, [[1, 2]], max_new_tokens=2, draft="lookup", draft_tokens=0)
    with pytest.raises(ConfigError, match="draft= verifies drafts in each row, which needs a cache with .*"
                                          "rewind_rows\\(\\).*pass draft=None"):  # fmt: skip
        generate_batch(family_model("lstm"), [[1, 2]], max_new_tokens=2, draft="lookup")


def test_sampled_rows_with_drafts_follow_the_model_s_distribution(monkeypatch):
    """1,000 seeded runs of two rows sampling three tokens from one prompt (2,000 samples); the first two tokens'
    joint distribution passes a chi-square test against the exact one, with one-token drafts accepted and rejected
    many times. Measured p = 0.76; drawing the token after a rejection from p instead of the residual
    norm(max(0, p - q)) gives p = 3e-12."""
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=8, max_len=16, d_model=16, n_heads=2, n_layers=1)).double().eval()
    prompt = [1, 2, 3, 1, 2]

    @torch.no_grad()
    def next_probs(context):
        return m(torch.tensor([context]))[0, -1].softmax(-1)

    p1 = next_probs(prompt)
    exact = p1[:, None] * torch.stack([next_probs(prompt + [a]) for a in range(8)])
    seen = counted_accepts(monkeypatch)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    for seed in range(1000):
        for row in generate_batch(m, [prompt, prompt], max_new_tokens=3, do_sample=True, seed=seed,
                                  draft=PromptLookup(min_ngram=1)):  # fmt: skip
            counts[row[0], row[1]] += 1
    drafted, accepted = sum(d for d, _ in seen), sum(a for _, a in seen)
    assert min(accepted, drafted - accepted) > 80  # 105 of 760 accepted
    assert chi_square_p_value(counts, exact) > 1e-3
