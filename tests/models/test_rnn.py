"""RNN / LSTM / GRU language models: fused == written-out cells (float64), tied head, incremental decoding
and generation, parameter counts, config and input errors, and a few training steps per preset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.generation import beam_search, generate
from archlab.models import build_model, get_config
from archlab.models.registry import FAMILIES
from archlab.models.rnn import RNNConfig, RNNLanguageModel

F64 = torch.float64
KINDS = ["rnn", "lstm", "gru"]


def tiny(**overrides) -> RNNConfig:
    base = dict(vocab_size=37, d_embed=12, d_hidden=12, n_layers=2, dropout=0.0, tie_embeddings=False)
    return RNNConfig(**{**base, **overrides})


def model(seed: int = 0, **overrides) -> RNNLanguageModel:
    torch.manual_seed(seed)
    m = RNNLanguageModel(tiny(**overrides)).eval()
    with torch.no_grad():  # larger than the init, so the comparisons below are discriminating
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m


def test_forward_shape_and_tied_head():
    m = model(tie_embeddings=True)
    assert m(torch.randint(0, 37, (3, 5))).shape == (3, 5, 37)
    assert m.head.weight is m.embedding.weight
    untied = model()
    n_tied = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for p in untied.parameters()) - n_tied == 37 * 12


@pytest.mark.parametrize("kind", KINDS)
def test_fused_layers_equal_the_explicit_cells_in_float64(kind):
    fused = model(kind=kind, n_layers=3).to(F64)
    explicit = RNNLanguageModel(fused.config.replace(backend="explicit")).to(F64).eval()
    explicit.load_state_dict(fused.state_dict())  # strict: the same parameter names
    ids = torch.randint(0, 37, (4, 11))
    err = (fused(ids) - explicit(ids)).abs().max().item()
    assert err <= 1e-10
    # and the comparison can fail: a different weight changes the logits
    with torch.no_grad():
        explicit.rnn.weight_hh_l2.add_(1e-3)
    assert (fused(ids) - explicit(ids)).abs().max().item() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_cache_continues_the_recurrence(kind):
    m = model(kind=kind).to(F64)
    ids = torch.randint(0, 37, (2, 9))
    full = m(ids)
    cache = m.new_cache()
    parts = [m(ids[:, :4], cache=cache), m(ids[:, 4:5], cache=cache), m(ids[:, 5:], cache=cache)]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-12, rtol=0)


def test_generate_greedy_equals_argmax_fed_back_and_beam_reorders_state():
    m = model(kind="lstm")
    prompt = torch.randint(0, 37, (2, 3))
    out = generate(m, prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):  # no cache: the whole sequence each time
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert torch.equal(generate(m, prompt, max_new_tokens=6, use_cache=False), out)
    cached = beam_search(m, prompt, beam_size=3, max_new_tokens=5)
    uncached = beam_search(m, prompt, beam_size=3, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_dropout_acts_only_in_training():
    m = model(dropout=0.5)
    ids = torch.randint(0, 37, (2, 6))
    assert torch.equal(m(ids), m(ids))
    m.train()
    assert not torch.equal(m(ids), m(ids))


def test_parameter_count_of_zaremba_medium():
    """E [V, d] + head [V, H] + b [V] + per layer 4H(d_in + H) + 8H (two bias vectors, as PyTorch)."""
    with torch.device("meta"):
        m = build_model("lstm-lm-zaremba-medium")
    v, h = 10000, 650
    expected = v * h + (h * v + v) + 2 * (4 * h * (h + h) + 8 * h)
    assert sum(p.numel() for p in m.parameters()) == expected == 19_780_400


def test_registry_and_config_round_trip():
    assert FAMILIES["rnn"].task == "lm"
    config = get_config("gru-lm-small", grad_clip=None)
    assert RNNConfig.from_json(config.to_json()) == config
    assert get_config("lstm-lm-small").grad_clip == 1.0  # clipping is on by default
    assert RNNConfig().grad_clip == 5.0


def test_config_errors():
    with pytest.raises(ConfigError, match="kind: unknown value 'lstn' \\(did you mean 'lstm'\\?\\)"):
        tiny(kind="lstn")
    with pytest.raises(ConfigError, match="tie_embeddings=True .* d_embed=12 must equal d_hidden=16"):
        tiny(tie_embeddings=True, d_hidden=16)
    with pytest.raises(ConfigError, match="grad_clip=0.0 must be > 0"):
        tiny(grad_clip=0.0)
    with pytest.raises(ConfigError, match="backend: unknown value 'cudnn'"):
        tiny(backend="cudnn")
    with pytest.raises(ConfigError, match="dropout=1.0 must be in \\[0, 1\\)"):
        tiny(dropout=1.0)
    with pytest.raises(ConfigError, match="n_layers=1.5 must be an integer"):
        tiny(n_layers=1.5)


def test_input_errors_before_any_computation():
    m = model()
    with pytest.raises(ShapeError, match=r"token id 37, outside the vocabulary: ids must be in \[0, vocab_size=37"):
        m(torch.tensor([[1, 37]]))
    with pytest.raises(ShapeError, match="holds token id -1"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ShapeError, match=r"input_ids must be a \[B, N\] tensor"):
        m(torch.tensor([1, 2]))
    with pytest.raises(ShapeError, match="integer token ids"):
        m(torch.zeros(1, 3))
    cache = m.new_cache()
    m(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match="cache holds batch 2 but input_ids has batch 3"):
        m(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match="an RNN reads every token it is fed"):
        generate(m, torch.zeros(2, 3, dtype=torch.long), max_new_tokens=2,
                 attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))  # fmt: skip


@pytest.mark.parametrize("preset", ["rnn-lm-small", "lstm-lm-small", "gru-lm-small"])
def test_preset_trains_a_few_steps(preset):
    """A plain AdamW loop on a periodic byte sequence, clipping to the config's grad_clip."""
    torch.manual_seed(0)
    m = build_model(preset).train()
    period = torch.tensor([10, 20, 30, 40, 50, 60, 70])
    starts = torch.randint(0, 7, (8,))
    data = period[(starts[:, None] + torch.arange(25)[None]) % 7]  # [8, 25]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), m.config.grad_clip)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], json.dumps(losses)
