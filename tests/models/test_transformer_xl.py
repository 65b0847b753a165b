"""Tests of ``archlab.models.transformer_xl`` against the paper's equations and against itself.

What is checked against what:

* Segment recurrence: running segments one after another with memory gives the same logits
  (float64, 1e-10) as ONE pass of the same model over the concatenated segments under the mask the
  recurrence implies (query in segment s sees keys from ``start(s) - mem_len`` up to itself), for
  memory shorter than, equal to and longer than a segment, with relative positions and with RoPE.
* Dai's relative score: one layer's output against the four terms (a) + (b) + (c) + (d) of the
  paper evaluated query by query, key by key in plain loops.
* Stop-gradient: no gradient reaches the memory; the new memory is the last ``mem_len`` layer inputs.
* ``TransformerXLLM`` (the task-``lm`` class) equals the segment loop; the family, preset and task
  are registered; other backends (chunked) give the same logits.
* Bad configs and inputs raise ConfigError / ShapeError naming the values.
"""

from __future__ import annotations

import math

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model, get_preset
from archlab.models.registry import FAMILIES
from archlab.models.transformer_xl import TransformerXL, TransformerXLConfig, TransformerXLLM
from archlab.nn.positional import sinusoid_table

DT = torch.float64


def small(positional="relative", mem_len=8, **kw) -> TransformerXL:
    torch.manual_seed(0)
    cfg = TransformerXLConfig(
        vocab_size=50, d_model=16, n_heads=2, n_layers=3, segment_len=8, mem_len=mem_len, dropout=0.0,
        positional=positional, **kw,
    )  # fmt: skip
    model = TransformerXL(cfg).double()
    with torch.no_grad():  # u, v start at 0; make them matter
        for block in model.blocks:
            if positional == "relative":
                block.attn.u.normal_()
                block.attn.v.normal_()
    return model


def segmentwise(model, ids, seg):
    memory, logits = None, []
    for segment in ids.split(seg, dim=1):
        out = model(segment, memory)
        logits.append(out.logits)
        memory = out.memory
    return torch.cat(logits, dim=1), memory


def recurrence_mask(total: int, seg: int, mem_len: int) -> torch.Tensor:
    """``[T, T]``: position i (in segment s starting at ``start``) sees j with ``start - mem_len <= j <= i``."""
    i = torch.arange(total)[:, None]
    j = torch.arange(total)[None, :]
    start = (i // seg) * seg
    return (j <= i) & (j >= start - mem_len)


@pytest.mark.parametrize("positional", ["relative", "rope"])
@pytest.mark.parametrize("mem_len", [0, 3, 8, 13])
def test_segments_with_memory_equal_one_pass_over_the_concatenation_under_the_matching_mask(positional, mem_len):
    model = small(positional, mem_len)
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    seg_logits, _ = segmentwise(model, ids, 8)
    one_pass = model(ids, mask=recurrence_mask(24, 8, mem_len)).logits
    assert (seg_logits - one_pass).abs().max() < 1e-10
    if mem_len:  # the memory really carries information: without it the later segments differ
        no_memory = torch.cat([model(s).logits for s in ids.split(8, dim=1)], dim=1)
        assert (no_memory[:, 8:] - seg_logits[:, 8:]).abs().max() > 1e-4


def test_relative_attention_follows_the_four_terms_of_dai_2019():
    model = small("relative", mem_len=5)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(2)
    n, m, d, a, dk = 4, 5, 16, 2, 8
    x = torch.randn(1, n, d, generator=g, dtype=DT)
    context = torch.cat([torch.randn(1, m, d, generator=g, dtype=DT), x], dim=1)
    w = attn.in_proj.weight.detach()
    W_q, W_k, W_v = w[: a * dk], w[a * dk : 2 * a * dk], w[2 * a * dk :]
    W_R = attn.pos_proj.weight.detach()
    R = sinusoid_table(m + n, d, dtype=DT)  # R_t for distance t
    u, v = attn.u.detach(), attn.v.detach()
    out = torch.zeros(n, a * dk, dtype=DT)
    for h in range(a):
        rows = slice(h * dk, (h + 1) * dk)
        for i in range(n):
            q_i = W_q[rows] @ x[0, i]
            scores = []
            for j in range(m + i + 1):  # causal: keys up to the query's own position m + i
                k_j = W_k[rows] @ context[0, j]
                r = W_R[rows] @ R[m + i - j]
                a_term, b_term, c_term, d_term = q_i @ k_j, q_i @ r, u[h] @ k_j, v[h] @ r
                scores.append((a_term + b_term + c_term + d_term) / math.sqrt(dk))
            weights = torch.softmax(torch.stack(scores), dim=0)
            values = torch.stack([W_v[rows] @ context[0, j] for j in range(m + i + 1)])
            out[i, rows] = weights @ values
    expected = attn.out_proj(out)[None]
    assert (attn(x, context) - expected).abs().max() < 1e-10


def test_no_gradient_reaches_the_memory_and_memory_is_the_last_layer_inputs():
    model = small("relative", mem_len=6)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    first = model(ids)
    assert len(first.memory) == 3 and all(m.shape == (2, 6, 16) and not m.requires_grad for m in first.memory)
    emb = model.tok_emb(ids)
    assert torch.equal(first.memory[0], emb[:, -6:])  # layer 0's input is the embedding (no dropout)
    memory = [m.clone().requires_grad_() for m in first.memory]
    out = model(ids, memory)
    out.logits.sum().backward()
    assert all(m.grad is None for m in memory)
    assert model.blocks[0].attn.u.grad is not None


def test_lm_class_reads_a_window_in_segments():
    model = small("rope", mem_len=8)
    lm = TransformerXLLM(model.config).double()
    lm.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(4))  # 8 + 8 + 4
    expected, _ = segmentwise(model, ids, 8)
    assert (lm(ids) - expected).abs().max() < 1e-10


def test_family_preset_and_task_are_registered():
    fam = FAMILIES["transformer-xl"]
    assert fam.task == "lm" and fam.train_cls is TransformerXLLM and fam.config_cls is TransformerXLConfig
    assert get_preset("transformer-xl-tiny").family == "transformer-xl"
    model = build_model("transformer-xl-tiny")
    out = model(torch.randint(0, 256, (1, 32)))
    assert out.logits.shape == (1, 32, 256) and len(out.memory) == model.config.n_layers
    assert model.lm_head.weight is model.tok_emb.weight
    assert TransformerXLConfig.from_json(model.config.to_json()) == model.config


@pytest.mark.parametrize(
    "positional, backend", [("relative", "chunked:block=5"), ("rope", "sliding:window=64,block=4"), ("rope", "math")]
)
def test_other_backends_give_the_same_logits(positional, backend):
    ref = small(positional, mem_len=8)
    other = small(positional, mem_len=8, backend=backend)
    other.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(5))
    assert (segmentwise(ref, ids, 8)[0] - segmentwise(other, ids, 8)[0]).abs().max() < 1e-10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mem_len": -1}, r"mem_len=-1 must be >= 0"),
        ({"positional": "learned"}, r"unknown value 'learned'"),
        ({"positional": "relative", "backend": "linear"}, r"positional='relative' adds a score bias.*backend='linear'"),
        ({"d_model": 30, "n_heads": 4}, r"d_model=30 is not divisible by n_heads=4"),
        ({"backend": "chunked:block=0"}, r"block='0'"),
        ({"d_model": 12, "n_heads": 4, "positional": "rope"}, r"d_k = d_model / n_heads must be even; got d_model=12, n_heads=4, d_k=3"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TransformerXLConfig(**kwargs)


def test_bad_inputs_raise_before_computing():
    model = small("relative", mem_len=4)
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(ShapeError, match=r"id 50, outside the vocabulary: ids must be in \[0, vocab_size=50\)"):
        model(torch.full((2, 8), 50))
    with pytest.raises(ShapeError, match=r"one \[B, M, d\] tensor per layer \(3\)"):
        model(ids, [torch.zeros(2, 4, 16, dtype=DT)])
    with pytest.raises(ShapeError, match=r"memory\[1\] must be \[B, M, d\] = \[2, M, 16\]"):
        model(ids, [torch.zeros(2, 4, 16, dtype=DT), torch.zeros(2, 5, 16, dtype=DT), torch.zeros(2, 4, 16, dtype=DT)])
    with pytest.raises(ShapeError, match=r"mask must be boolean and broadcast to \[B, A, N, M\+N\] = \[2, 2, 8, 8\]"):
        model(ids, mask=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"integer token ids"):
        model(ids.double())
