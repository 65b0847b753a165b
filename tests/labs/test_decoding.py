import pytest
import torch
from torch import nn

from archlab.generation import generate
from archlab.labs import run_lab
from archlab.labs.decoding import (
    decode_both_ways,
    kv_cache_tensor_bytes,
    last_token_entropy,
    last_token_states,
    local_slope,
    power_law_exponent,
    relative_distance,
    rwkv_state_bytes,
    scale_queries,
    token_by_token,
)
from archlab.models import build_model


def nano(**overrides):
    torch.manual_seed(0)
    return build_model("gpt-nano", **overrides).eval()


# -- kv-cache --------------------------------------------------------------------------------------


def test_metered_steps_count_the_explicit_formula_and_decode_the_same_tokens_as_generate():
    model = nano()
    L, d, V = model.config.n_layers, model.config.d_model, model.config.vocab_size
    prompt = torch.tensor([[5, 17, 3]])
    cached, uncached = decode_both_ways(model, prompt, 5)

    def flops(new, keys):  # per layer: 2 x (4 d^2 projections + 8 d^2 FFN) per token, 4 d per query-key pair
        return L * (24 * d * d * new + 4 * d * new * keys) + 2 * V * d  # the LM head reads the last position only

    assert cached.positions == uncached.positions == [3, 4, 5, 6, 7]
    assert [sum(f.values()) for f in cached.flops] == [flops(3, 3)] + [flops(1, n) for n in (4, 5, 6, 7)]
    assert [sum(f.values()) for f in uncached.flops] == [flops(n, n) for n in (3, 4, 5, 6, 7)]
    assert all(f["output_head"] == 2 * V * d for f in cached.flops + uncached.flops)
    tokens = torch.cat([prompt, torch.stack([lg.argmax(-1) for lg in cached.logits], dim=1)], dim=1)
    assert torch.equal(tokens, generate(model, prompt, max_new_tokens=5))  # the packed-head cache agrees


def test_local_slope_reads_the_power():
    assert local_slope([10, 20], [7 * 10**3, 7 * 20**3]) == pytest.approx(3)


def test_quick_kv_cache_run():
    report = run_lab("kv-cache", quick=True)
    rows = {r[0]: r for r in report.result.rows}
    L, d, V = 3, 48, 256
    assert all(r[1] == 24 * L * d * d + 2 * V * d for r in rows.values())  # cached: the same weights every token
    assert all(r[2] == 4 * L * d * n for n, r in rows.items())  # cached: attention over n keys
    assert rows[64][4] == 64 * 24 * L * d * d + 2 * V * d + 4 * L * d * 64 * 64  # uncached: the whole prefix
    assert rows[64][5] > 50 and rows[64][6] > 25
    assert report.result.verdict == "supported"


# -- recurrent-state -------------------------------------------------------------------------------


def test_cache_bytes_held_and_allocated_against_the_formula():
    model = nano()
    L, d = model.config.n_layers, model.config.d_model
    cache = model.decoder.new_cache()
    with torch.no_grad():
        for t in range(17):  # one at a time: capacity 16, then doubled to 32
            model(torch.tensor([[t]]), cache=cache)
    assert kv_cache_tensor_bytes(cache) == (2 * L * 17 * d * 4, 2 * L * 32 * d * 4)


def test_rwkv_state_bytes_against_the_formula_at_two_lengths():
    torch.manual_seed(0)
    model = build_model("rwkv-tiny").eval()
    c = model.config
    state = model.new_cache()
    expected = c.n_layers * (2 * c.d_model + 3 * c.att_width) * 4  # two shifts [d], a, b, p [d_att]; float32
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), state=state)
        assert rwkv_state_bytes(state) == expected
        model(torch.arange(40)[None], state=state)
    assert rwkv_state_bytes(state) == expected and state.length == 43


def test_token_by_token_feeds_each_token_once_and_the_measured_ones_alone():
    fed = []
    tokens = torch.arange(10)[None]
    walk = token_by_token(nn.Linear(1, 1), lambda t: fed.append(t[0].tolist()), tokens, [1, 2, 6, 10])
    assert [n for n, _ in walk] == [1, 2, 6, 10]
    assert fed == [[0], [1], [2, 3, 4], [5], [6, 7, 8], [9]]


def test_quick_recurrent_state_run():
    report = run_lab("recurrent-state", quick=True)
    rows = {r[0]: r for r in report.result.rows}
    assert rows[256][1] == rows[256][2] == 2 * 3 * 256 * 48 * 4
    assert {r[4] for r in rows.values()} == {3 * 5 * 48 * 4}
    assert len({r[6] for r in rows.values()}) == 1
    assert rows[256][5] - rows[1][5] == 255 * 4 * 3 * 48
    assert report.result.verdict == "supported"


# -- representational-collapse ---------------------------------------------------------------------


@pytest.mark.parametrize("positional", ["none", "rope", "learned"])
def test_last_token_states_match_full_forwards(positional):
    model = nano(positional=positional).double()
    states = last_token_states(model, 7, (7, 2), [0, 1, 4, 3])
    assert sorted(states) == [(n, e) for n in (0, 1, 3, 4) for e in (2, 7)]
    with torch.no_grad():
        for (n, end), h in states.items():
            full = model.hidden_states(torch.tensor([[7] * n + [end]]))[0, -1]
            torch.testing.assert_close(h, full, rtol=0, atol=1e-12)


def test_scale_queries_scales_w_q_only():
    model = nano()
    before = [b.attn.in_proj.weight.clone() for b in model.decoder.blocks]
    scale_queries(model, 3.0)
    for block, w in zip(model.decoder.blocks, before, strict=True):
        q = block.attn.n_heads * block.attn.d_k
        torch.testing.assert_close(block.attn.in_proj.weight[:q], 3 * w[:q])
        assert torch.equal(block.attn.in_proj.weight[q:], w[q:])


def test_last_token_entropy_is_one_for_flat_scores_and_falls_with_sharper_ones():
    model = nano(positional="none").double()
    scale_queries(model, 0.0)  # q = 0: every score 0, uniform weights
    assert last_token_entropy(model, 9) == pytest.approx(1.0, abs=1e-12)
    sharp = nano(positional="none").double()
    scale_queries(sharp, 1000.0)
    assert last_token_entropy(sharp, 9) < 0.9


def test_power_law_exponent_and_relative_distance():
    n = [1, 2, 4, 8, 16]
    assert power_law_exponent(n, [3 * m**-1.7 for m in n]) == pytest.approx(-1.7, abs=1e-12)
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_distance(x, torch.zeros(2, dtype=torch.float64)) == 1.0
    assert relative_distance(x, x + torch.tensor([0.0, 0.5], dtype=torch.float64)) == pytest.approx(0.1)


def test_quick_collapse_run():
    report = run_lab("representational-collapse", quick=True)
    rows = {(r[0], r[1], r[2]): r for r in report.result.rows}
    flat, sharp = rows["count", "none", 1], rows["count", "none", 1000]
    assert flat[3] == pytest.approx(1.0, abs=1e-3)  # GPT-2 init: flat attention
    assert -2.2 < flat[8] < -1.5 and flat[7] > 1e3  # ~ n^-2
    assert sharp[6] > 3 * flat[6] and sharp[8] > flat[8] + 0.5  # a low temperature slows it without positions
    assert rows["count", "rope", 1000][6] < rows["count", "rope", 1][6] / 1e3  # ... and speeds it up with RoPE
    assert rows["count", "learned", 1][6] > 0.3 and rows["last", "none", 1][6] > 0.5  # controls: no collapse
    assert report.result.verdict == "not supported"
    # the notes name the control by its row ('last'), not by a brief the reader never saw
    assert "brief" not in report.result.notes and "the 'last' pair, [a]*(n+1) vs [a]*n+[b]" in report.result.notes
