"""ELMo: each direction sees only its side (exact-zero gradients), the joint loss written out, the scalar
mix, "bank" in two contexts, right padding, errors, a few training steps of the preset, and (slow) "bank"
vectors that separate by sense once trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model
from archlab.models.elmo import ELMo, ElmoConfig, ScalarMix, reverse_padded
from archlab.models.registry import FAMILIES

F64 = torch.float64
V = 29


def model(seed: int = 0, **overrides) -> ELMo:
    torch.manual_seed(seed)
    cfg = {"vocab_size": V, "d_model": 8, "d_cell": 12, "n_layers": 2, "dropout": 0.0, **overrides}
    m = ELMo(ElmoConfig(**cfg)).to(F64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.6, 0.6)
    return m


def embedding_grad(m: ELMo, ids: torch.Tensor, pick) -> torch.Tensor:
    """d pick(states) / d x, with x the token embeddings ``[B, N, d]``, captured by a hook."""
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["x"] = out

    handle = m.embedding.register_forward_hook(keep)
    states = m(ids)
    handle.remove()
    pick(states).sum().backward()
    return captured["x"].grad


@pytest.mark.parametrize("layer", [0, 1])
def test_forward_lm_never_sees_later_tokens_backward_lm_never_earlier(layer):
    m = model()
    ids = torch.randint(0, V, (2, 7))
    for t in range(7):
        g = embedding_grad(m, ids, lambda s, t=t: s.forward[layer][:, t]).abs().sum(-1)  # [B, N]
        assert torch.all(g[:, t + 1 :] == 0), t  # exactly zero: no path from later tokens
        assert torch.all(g[:, : t + 1] > 0), t
        g = embedding_grad(m, ids, lambda s, t=t: s.backward[layer][:, t]).abs().sum(-1)
        assert torch.all(g[:, :t] == 0), t
        assert torch.all(g[:, t:] > 0), t


def test_forward_prediction_of_next_token_does_not_see_it():
    """The forward LM's logits at t (predicting w_{t+1}) have zero gradient w.r.t. w_{t+1}, w_{t+2}, ..."""
    m = model()
    ids = torch.randint(0, V, (1, 6))
    g = embedding_grad(m, ids, lambda s: m.logits(s.forward[-1])[:, 2]).abs().sum(-1)
    assert torch.all(g[:, 3:] == 0) and torch.all(g[:, :3] > 0)
    g = embedding_grad(m, ids, lambda s: m.logits(s.backward[-1])[:, 2]).abs().sum(-1)
    assert torch.all(g[:, :2] == 0) and torch.all(g[:, 2:] > 0)


def test_joint_loss_is_forward_plus_backward_log_likelihood():
    """-mean_t log p(w_{t+1} | w_<=t) - mean_t log p(w_{t-1} | w_>=t), softmax = E (tied) + b."""
    m = model()
    ids = torch.randint(0, V, (3, 6))
    loss, metrics = m.compute_loss({"input_ids": ids})
    s = m(ids)
    E, b = m.embedding.weight, m.softmax_bias
    logp_f = torch.log_softmax(s.forward[-1] @ E.T + b, -1)  # [B, N, V]
    logp_b = torch.log_softmax(s.backward[-1] @ E.T + b, -1)
    nll_f = -torch.stack([logp_f[i, t, ids[i, t + 1]] for i in range(3) for t in range(5)]).mean()
    nll_b = -torch.stack([logp_b[i, t, ids[i, t - 1]] for i in range(3) for t in range(1, 6)]).mean()
    torch.testing.assert_close(loss, nll_f + nll_b, atol=1e-12, rtol=0)
    assert metrics["forward_nll"] == pytest.approx(nll_f.item())
    assert metrics["backward_nll"] == pytest.approx(nll_b.item())
    # tied: the softmax weight is the embedding matrix; both directions' losses train it
    loss.backward()
    assert m.embedding.weight.grad is not None and m.embedding.weight.grad.abs().sum() > 0
    assert not any(name.endswith("head.weight") for name, _ in m.named_parameters())


def test_scalar_mix_is_a_softmax_weighted_sum_scaled_by_gamma():
    mix = ScalarMix(3).to(F64)
    torch.testing.assert_close(mix.weights, torch.full((3,), 1 / 3, dtype=F64), atol=1e-15, rtol=0)  # starts equal
    with torch.no_grad():
        mix.w.copy_(torch.tensor([0.3, -1.2, 2.0]))
        mix.gamma.fill_(1.7)
    s = mix.weights
    assert s.sum().item() == pytest.approx(1.0, abs=1e-15) and torch.all(s > 0)
    torch.testing.assert_close(s, torch.exp(mix.w) / torch.exp(mix.w).sum(), atol=1e-15, rtol=0)
    layers = torch.randn(3, 2, 4, 5, dtype=F64)
    torch.testing.assert_close(mix(layers), 1.7 * (s[0] * layers[0] + s[1] * layers[1] + s[2] * layers[2]),
                               atol=1e-14, rtol=0)  # fmt: skip
    with pytest.raises(ShapeError, match="ScalarMix of 3 layers got 2"):
        mix(layers[:2])


def test_bank_gets_different_vectors_in_different_contexts():
    """Same id ("bank") in "bank account" and "river bank": same layer 0, different contextual layers."""
    m = model()
    bank, account, river, the = 5, 6, 7, 8
    finance = torch.tensor([[the, bank, account]])
    geography = torch.tensor([[the, river, bank]])
    a = m.embed(finance)
    b = m.embed(geography)
    va, vb = a.layers[:, 0, 1], b.layers[:, 0, 2]  # [L + 1, 2d]
    assert a.layers.shape == (3, 1, 3, 16) and a.mixed.shape == (1, 3, 16)
    torch.testing.assert_close(va[0], vb[0], atol=0, rtol=0)  # the static embedding [x; x]
    assert (va[1:] - vb[1:]).abs().amax(-1).min() > 1e-3  # every contextual layer differs
    assert (a.mixed[0, 1] - b.mixed[0, 2]).abs().max() > 1e-3
    torch.testing.assert_close(a.mixed, m.mix(a.layers), atol=0, rtol=0)


def test_right_padding_changes_nothing():
    m = model()
    ids = torch.randint(0, V, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    padded = m.embed(ids, mask)
    alone = m.embed(ids[1:, :4])
    torch.testing.assert_close(padded.layers[:, 1:, :4], alone.layers, atol=1e-12, rtol=0)
    assert torch.all(padded.layers[:, 1, 4:] == 0)
    loss_padded, _ = m.compute_loss({"input_ids": ids[1:], "attention_mask": mask[1:]})
    loss_alone, _ = m.compute_loss({"input_ids": ids[1:, :4]})
    torch.testing.assert_close(loss_padded, loss_alone, atol=1e-12, rtol=0)


def test_reverse_padded():
    x = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    lengths = torch.tensor([4, 2])
    assert reverse_padded(x, lengths).tolist() == [[4, 3, 2, 1], [6, 5, 0, 0]]
    y = torch.randn(2, 4, 3)
    torch.testing.assert_close(reverse_padded(reverse_padded(y, lengths), lengths), y, atol=0, rtol=0)


def test_projection_and_residual_layout():
    with torch.device("meta"):
        original = build_model("elmo-original")
    lstm = original.forward_lstms[0]
    assert lstm.hidden_size == 4096 and lstm.proj_size == 512
    assert original.forward_lstms[1].input_size == 512 and len(original.backward_lstms) == 2
    per_layer = 4 * 4096 * (512 + 512) + 8 * 4096 + 4096 * 512  # W_ih, W_hh (from the projection), biases, W_proj
    lstm_params = sum(p.numel() for mod in (original.forward_lstms, original.backward_lstms) for p in mod.parameters())
    assert lstm_params == 4 * per_layer
    assert FAMILIES["elmo"].task == "custom"


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="d_cell=4 must be >= d_model=8"):
        ElmoConfig(vocab_size=V, d_model=8, d_cell=4)
    with pytest.raises(ConfigError, match="grad_clip=0 must be > 0"):
        ElmoConfig(grad_clip=0)
    with pytest.raises(ConfigError, match="n_layers=0 must be > 0"):
        ElmoConfig(n_layers=0)
    m = model()
    with pytest.raises(ShapeError, match=r"input_ids holds token id 29, outside the vocabulary"):
        m.embed(torch.tensor([[1, 29]]))
    with pytest.raises(ShapeError, match=r"attention_mask must be \[B, N\] = \[1, 3\] like input_ids, got \(1, 2\)"):
        m.compute_loss({"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 2)})
    with pytest.raises(ShapeError, match="need right padding"):
        m.embed(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ShapeError, match="N >= 2 tokens"):
        m.compute_loss({"input_ids": torch.tensor([[1], [2]])})
    with pytest.raises(ShapeError, match="batch must be a dict with 'input_ids'"):
        m.compute_loss({"ids": torch.tensor([[1, 2]])})
    with pytest.raises(ShapeError, match=r"batch has keys \['labels'\]"):
        m.compute_loss({"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]])})


def test_preset_trains_a_few_steps():
    torch.manual_seed(0)
    m = build_model("elmo-small").train()
    period = torch.tensor([11, 22, 33, 44, 55])
    ids = period[(torch.randint(0, 5, (8,))[:, None] + torch.arange(16)[None]) % 5]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, metrics = m.compute_loss({"input_ids": ids})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert metrics["loss"] == pytest.approx(metrics["forward_nll"] + metrics["backward_nll"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# slow: "bank account" vs "bank of a river", learned
# ---------------------------------------------------------------------------------------------

BANK, THE = 3, 4
FINANCE_A, FINANCE_B = [10, 11, 12, 13], [14, 15, 16, 17]
RIVER_A, RIVER_B = [20, 21, 22, 23], [24, 25, 26, 27]


def two_sense_sentences(gen, b, words_by_sense):
    """``[the, w, w, bank, w, w]`` with the four ``w`` drawn from one sense's words; returns ids and senses."""
    senses = torch.randint(0, 2, (b,), generator=gen)
    rows = []
    for s in senses.tolist():
        choices = torch.tensor(words_by_sense[s])
        words = choices[torch.randint(0, len(choices), (4,), generator=gen)]
        rows.append(torch.cat([torch.tensor([THE]), words[:2], torch.tensor([BANK]), words[2:]]))
    return torch.stack(rows), senses


def sense_accuracy(m: ELMo) -> list[float]:
    """Nearest-centroid sense of "bank": centroids from contexts of words A, tested on contexts of words B
    (disjoint words, same senses). One accuracy for the mix, then one per layer (layer 0 is static)."""
    gen = torch.Generator().manual_seed(5)
    ids_a, senses_a = two_sense_sentences(gen, 200, [FINANCE_A, RIVER_A])
    ids_b, senses_b = two_sense_sentences(gen, 200, [FINANCE_B, RIVER_B])
    with torch.no_grad():
        a, b = m.embed(ids_a), m.embed(ids_b)
    pairs = [(a.mixed[:, 3], b.mixed[:, 3])] + [(a.layers[j, :, 3], b.layers[j, :, 3]) for j in range(len(a.layers))]
    accuracies = []
    for va, vb in pairs:
        va, vb = F.normalize(va, dim=-1), F.normalize(vb, dim=-1)
        centroids = torch.stack([va[senses_a == k].mean(0) for k in (0, 1)])
        accuracies.append(((vb @ centroids.T).argmax(-1) == senses_b).float().mean().item())
    return accuracies


@pytest.mark.slow
def test_bank_vectors_separate_by_sense_after_training():
    """The biLM learns that the finance words (and the river words) are interchangeable, so "bank" among
    unseen-in-the-centroid finance words lands by the finance centroid: the deck's "bank" example."""
    torch.manual_seed(0)
    m = build_model("elmo-small", vocab_size=32)
    before = sense_accuracy(m.eval())
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(150):
        ids, _ = two_sense_sentences(gen, 32, [FINANCE_A + FINANCE_B, RIVER_A + RIVER_B])
        loss, _ = m.compute_loss({"input_ids": ids})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sense_accuracy(m.eval())
    print(f"\n'bank' sense accuracy [mix, layer 0, 1, 2]: before {before}, after {after}")
    assert before[0] < 0.8  # untrained: the contexts' words, not their sense, decide
    assert after[0] >= 0.95 and min(after[2:]) >= 0.95  # trained: the sense decides
    assert after[1] <= 0.6  # the static layer gives every "bank" one vector: chance
