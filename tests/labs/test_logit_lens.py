"""logit-lens: the residual stream read by the model's own head, the statistics, and the quick run."""

import math

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.logit_lens import LAYERS, layer_table, lens, residual_stream, token_stats
from archlab.models.gpt import GPT, GPTConfig


def small_gpt() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=13, max_len=16, d_model=16, n_heads=2, n_layers=3, dropout=0.0, attn_dropout=0.0,
                       tie_embeddings=False)  # fmt: skip
    return GPT(config).double().eval()


def test_the_stream_has_one_state_per_layer_and_the_last_gives_the_models_logits():
    model = small_gpt()
    ids = torch.randint(0, 13, (2, 9))
    states = residual_stream(model, ids)
    assert len(states) == 4 and all(s.shape == (2, 9, 16) for s in states)
    embeddings = model.tok_emb(ids) + model.pos.add_to_input(torch.zeros(2, 9, 16, dtype=torch.float64))
    torch.testing.assert_close(states[0], embeddings, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(lens(model, states[-1]), torch.log_softmax(model(ids), -1), rtol=0, atol=1e-12)
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.decoder.blocks)  # hooks removed


def test_token_stats_on_a_known_distribution():
    logp = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]], dtype=torch.float64))  # [1, 2, 3]
    stats = token_stats(logp, torch.tensor([[0, 0]]))
    assert stats["p"] == pytest.approx(0.3) and stats["top1"] == 0.5 and stats["rank"] in (0.0, 2.0)
    assert token_stats(logp, torch.tensor([[0, 2]]))["top1"] == 1.0


def test_layer_table_leaves_out_positions_whose_current_and_next_token_agree():
    model = small_gpt()
    inputs = torch.tensor([[1, 1, 2, 3]])
    labels = torch.tensor([[1, 2, 3, 4]])  # position 0: current == next, left out
    rows = layer_table(model, inputs, labels)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(0 <= r["cur_p"] <= 1 and 0 <= r["next_top1"] <= 1 for r in rows)
    assert not math.isnan(rows[0]["cur_rank"])


def test_quick_run_is_undecided_with_its_reason():
    result = run_lab("logit-lens", quick=True).result
    assert len(result.rows) == LAYERS + 1 and result.columns[:3] == ["layer", "P(current)", "P(next)"]
    assert result.verdict == "undecided" and "learned too little" in result.undecided
