import pytest
import torch

from archlab.analysis import count_parameters
from archlab.labs import run_lab
from archlab.labs.compute import (
    deck_example_config,
    gpt_config,
    layer_costs,
    layer_flops,
    lora_counts,
    mha_costs,
    on_meta,
    paper_trainable,
    param_counts,
    torch_count,
)
from archlab.models import build_model


def block_params(d: int, d_ff: int) -> int:
    """One pre-norm GPT block with biases: W_Q, W_K, W_V, W_O (4 d^2 + 4 d), W_1, W_2, two LayerNorms."""
    return 4 * d * d + 4 * d + 2 * d * d_ff + d_ff + d + 4 * d


def test_torch_count_sees_one_matmul_of_2_n_a_b_flops():
    x, w = torch.randn(3, 5), torch.randn(5, 7)
    flops, calls = torch_count(lambda: x @ w)
    assert flops == {"aten.mm": 2 * 3 * 5 * 7} and calls == 1


@pytest.mark.parametrize("heads", [1, 4])
def test_mha_costs_match_the_hand_formulas(heads):
    d, n = 64, 10
    c = mha_costs(d, heads, n)
    assert c["params"] == 4 * d * d + 4 * d
    assert c["projections"] == 2 * 4 * d * d * n  # 8 N d^2
    assert c["scores"] == 2 * heads * n * n * (d // heads) * 2  # QK^T and alpha V: 4 N^2 d
    assert c["torch"] == c["projections"] + c["scores"]
    assert c["score_bytes"] == heads * n * n * 4


def test_layer_flops_and_params_match_a_hand_count_on_gpt_nano():
    config = gpt_config("gpt-nano")
    d, n, layers, vocab = config.d_model, config.max_len, config.n_layers, config.vocab_size
    params, f = layer_flops(config)
    assert f == {"scores": 4 * n * n * d, "projections": 8 * n * d * d, "feed_forward": 16 * n * d * d}
    by_hand = vocab * d + n * d + layers * block_params(d, 4 * d) + 2 * d  # tied head, final LayerNorm
    assert params == by_hand == count_parameters(build_model("gpt-nano")).total  # meta count = a real model's


def test_param_counts_of_gpt2_small_and_the_gpt3_shape():
    total, blocks = param_counts(gpt_config("gpt2-small"))
    assert total == 124_439_808  # GPT-2 small as released
    assert blocks == 12 * block_params(768, 3072) + 2 * 768
    config = gpt_config("gpt3-175b")
    assert (config.n_layers, config.d_model, config.n_heads, config.max_len) == (96, 12288, 96, 2048)


def test_the_deck_example_is_80_layers_at_the_formulas_width():
    config = deck_example_config()
    assert config.n_layers == 80 and config.d_model == 106 * 128 == 13_568  # sqrt(178e9 / 960) = 13,617
    assert 12 * 80 * config.d_model**2 == pytest.approx(178e9, rel=0.01)


@pytest.mark.parametrize("r", [1, 3])
def test_lora_on_the_fused_projection_trains_what_w_q_and_w_v_adapters_would(r):
    config = gpt_config("gpt-nano")
    model = on_meta(config)
    report = lora_counts(model, r)
    d, layers = config.d_model, config.n_layers
    assert report.trainable == layers * r * (d + 3 * d) == paper_trainable(layers, d, r) == layers * 2 * r * 2 * d
    assert report.total == count_parameters(model).total + report.trainable
    assert all(p.requires_grad for p in model.parameters())  # the model itself is left alone


def test_layer_costs_match_the_per_layer_formulas():
    d = 16
    for n in (3, 16):
        c = layer_costs(d, n, torch.Generator().manual_seed(0))
        assert c["scores"] == 4 * n * n * d and c["projections"] == 8 * n * d * d
        assert c["archlab"] == c["scores"] + c["projections"]
        assert c["rnn"] == 4 * n * d * d and c["lstm"] == 16 * n * d * d  # 1 and 4 gate blocks of W_ih, W_hh
        assert c["attn_calls"] == 4 and c["rnn_calls"] == 2 * n


def test_quick_multihead_compute_has_one_cost_for_every_head_count():
    result = run_lab("multihead-compute", quick=True).result
    at_1024 = [row for row in result.rows if row[0] == 1024]
    assert {row[1] for row in at_1024} == {1, 2, 4, 8, 16, 32}
    flops = 8 * 1024 * 512**2 + 4 * 1024**2 * 512  # projections 8 N d^2 + scores 4 N^2 d
    assert {(row[3], row[6], row[7]) for row in at_1024} == {(4 * 512**2 + 4 * 512, flops, flops)}
    assert result.verdict == "supported"


def test_quick_mlp_share_ffn_dominates_above_1b_and_already_below():
    result = run_lab("mlp-flops-share", quick=True).result
    rows = {row[0]: row for row in result.rows}
    # per layer FFN 16 N d^2 over attention 8 N d^2 + 4 N^2 d = 4 d / (2 d + N)
    assert rows["gpt2-xl"][8] == pytest.approx(4 * 1600 / (2 * 1600 + 1024))
    assert rows["gpt2-small"][8] == pytest.approx(1.2)
    assert rows["gpt2-xl"][9] == 2 * 1600  # FFN = attention at N = 2d
    assert result.verdict == "supported"


def test_quick_param_formula_error_shrinks_to_under_1_percent():
    result = run_lab("param-formula", quick=True).result
    errors = {row[0]: row[6] for row in result.rows}
    assert errors["gpt2-small"] == pytest.approx(1 - 12 * 12 * 768**2 / 124_439_808)
    assert errors["gpt2-small"] > errors["gpt2-xl"] > errors["gpt3-175b"] and errors["gpt3-175b"] < 0.01
    assert result.verdict == "supported"


def test_quick_attention_memory_finds_40_gb_not_40_tb():
    result = run_lab("attention-memory", quick=True).result
    last = result.rows[-1]
    assert last[0] == 100_000 and last[1] == 100_000**2 * 4 / 1e9 == 40.0  # GB, one head
    assert last[3] > 80  # the standard path still does not fit an 80 GB device
    assert result.verdict == "not supported" and "wrong" in result.finding


def test_quick_flash_memory_is_linear_and_near_400_mb():
    result = run_lab("flash-memory", quick=True).result
    rows = {row[0]: row for row in result.rows}
    flash = rows[100_000][1]
    assert 100_000 * 1024 * 4 / 1e9 < flash < 0.8  # at least the output [N, d] in fp32, within 2x of 400 MB
    assert rows[100_000][1] / rows[50_000][1] < 2.2 and rows[100_000][3] / rows[50_000][3] == pytest.approx(4, rel=0.01)
    assert result.verdict == "supported"


def test_quick_lora_params_on_the_175b_shape():
    result = run_lab("lora-params", quick=True).result
    rows = {row[0]: row for row in result.rows}
    assert rows[4][1] == rows[4][2] == 96 * 4 * 4 * 12288  # 18.9M: 2 L r (d + d)
    assert 5_000 < rows[4][4] < 20_000 and rows[8][5] < 1e-3
    assert result.verdict == "supported"


def test_quick_attention_vs_recurrence_crosses_at_n_equals_d():
    result = run_lab("attention-vs-recurrence", quick=True).result
    ratio = {row[1]: row[6] for row in result.rows if row[0] == 64}
    assert ratio == {16: 0.25, 64: 1.0, 256: 4.0}
    assert {row[8] for row in result.rows} == {4} and [row[9] for row in result.rows] == [32, 128, 512]
    assert result.verdict == "supported"
