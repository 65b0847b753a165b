"""TextCNN (Kim 2014) against the deck's example and the equations written out: feature-map lengths
N - h + 1, max-over-time pooling to 4 + 5 = 9 features, static vs non-static channels, errors, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from training import fit

from archlab.errors import ConfigError, ShapeError
from archlab.models import build_model, get_config
from archlab.models.textcnn import TextCNN, TextCNNConfig


def small(seed: int = 0, **overrides) -> TextCNN:
    torch.manual_seed(seed)
    base = dict(vocab_size=30, n_classes=3, d_embed=4, channels=("static", "non-static"), kernels=((2, 3), (3, 2)),
                dropout=0.0)  # fmt: skip
    return TextCNN(TextCNNConfig(**{**base, **overrides}))


# ------------------------------------------------------------------------------------------------
# the deck's example and the equations
# ------------------------------------------------------------------------------------------------


def test_deck_example_shapes():
    """11 tokens of 6-d embeddings; width 2 x 4 channels -> [4, 10]; width 4 x 5 channels -> [5, 8]; z = 9."""
    model = build_model("textcnn-deck").eval()
    assert model.convs[0].weight.shape == (4, 6, 2) and model.convs[1].weight.shape == (5, 6, 4)
    ids = torch.randint(0, 1000, (3, 11))
    assert model.embed(ids).shape == (3, 6, 11)  # the deck's 6 input channels
    maps = model.feature_maps(ids)
    assert [tuple(m.shape) for m in maps] == [(3, 4, 11 - 2 + 1), (3, 5, 11 - 4 + 1)]
    assert model.pooled(ids).shape == (3, 4 + 5) == (3, model.config.n_features)
    assert model(ids).shape == (3, 2)


def test_forward_is_the_equation_written_out():
    """``c_i = relu(w . x_{i:i+h-1} + b)`` on windows of concatenated word vectors (all channels),
    ``max_i c_i`` per filter, concatenated, then ``W z + b`` (float64)."""
    model = small().double().eval()
    ids = torch.randint(0, 30, (2, 9))
    word = torch.cat([e.weight[ids] for e in model.embeddings], dim=-1)  # [B, N, D d], D d = 8
    features = []
    for (h, c), conv in zip(model.config.kernels, model.convs):
        w = conv.weight.permute(0, 2, 1).reshape(c, h * 8)  # a filter over h consecutive word vectors
        windows = torch.stack([word[:, i : i + h].reshape(2, h * 8) for i in range(9 - h + 1)], dim=1)
        maps = torch.relu(windows @ w.T + conv.bias)  # [B, N - h + 1, c]
        features.append(maps.max(dim=1).values)
    z = torch.cat(features, dim=-1)
    torch.testing.assert_close(model.pooled(ids), z, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(ids), z @ model.classifier.weight.T + model.classifier.bias, atol=1e-12, rtol=0)


def test_multichannel_filter_is_applied_to_each_channel_and_added():
    """Kim: each filter is applied to both channels and the results are added."""
    model = small().double()
    ids = torch.randint(0, 30, (2, 7))
    conv, d = model.convs[0], 4
    per_channel = sum(
        F.conv1d(emb(ids).transpose(1, 2), conv.weight[:, i * d : (i + 1) * d]) for i, emb in enumerate(model.embeddings)
    )
    torch.testing.assert_close(conv(model.embed(ids)), per_channel + conv.bias[:, None], atol=1e-12, rtol=0)


def test_pooling_is_position_invariant():
    """Max-over-time: an n-gram's feature is the same wherever it occurs in the sentence."""
    model = small(kernels=((2, 3),), channels=("non-static",)).double().eval()
    a = torch.tensor([[9, 5, 7, 9, 9, 9]])  # windows (9 5) (5 7) (7 9) (9 9) (9 9)
    b = torch.tensor([[9, 9, 9, 5, 7, 9]])  # the same windows, in another order
    torch.testing.assert_close(model.pooled(a), model.pooled(b), atol=0, rtol=0)
    c = torch.tensor([[9, 7, 5, 9, 9, 9]])  # the words swapped: another bigram, other features
    assert not torch.equal(model.pooled(a), model.pooled(c))


def test_padded_batch_with_mask_pools_each_row_as_alone():
    """Rows of lengths 9, 5, 3 right- or left-padded in one batch: with attention_mask, the logits equal
    each row's own (float64); without it, padding windows would enter the max."""
    model = small(kernels=((2, 3), (3, 2))).double().eval()
    rows = [torch.randint(1, 30, (n,)) for n in (9, 5, 3)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    ids[0], mask[0] = rows[0], 1
    ids[1, :5], mask[1, :5] = rows[1], 1  # right padding
    ids[2, 6:], mask[2, 6:] = rows[2], 1  # left padding
    alone = torch.cat([model(r[None]) for r in rows])
    torch.testing.assert_close(model(ids, attention_mask=mask), alone, atol=1e-12, rtol=0)
    torch.testing.assert_close(model(ids, attention_mask=mask.bool()), alone, atol=1e-12, rtol=0)
    assert not torch.allclose(model(ids)[1:], alone[1:])


def test_bad_attention_mask():
    model = small(kernels=((2, 3), (3, 2)))
    ids = torch.randint(0, 30, (2, 6))
    with pytest.raises(ShapeError, match="row 1 has no 3 consecutive real tokens"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0]]))
    with pytest.raises(ShapeError, match=r"attention_mask must be \[B, N\] = \[2, 6\] like input_ids, got \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ShapeError, match="only 0 \\(padding\\) and 1"):
        model(ids, attention_mask=torch.full((2, 6), 2))


# ------------------------------------------------------------------------------------------------
# static and non-static channels
# ------------------------------------------------------------------------------------------------


def test_static_channel_gets_no_gradient_non_static_does():
    model = small()
    static, dynamic = model.embeddings
    assert torch.equal(static.weight, dynamic.weight)  # both start from the same vectors
    assert not static.weight.requires_grad and dynamic.weight.requires_grad
    ids = torch.randint(0, 30, (4, 8))
    F.cross_entropy(model(ids), torch.tensor([0, 1, 2, 0])).backward()
    assert static.weight.grad is None
    assert dynamic.weight.grad is not None and dynamic.weight.grad.abs().sum() > 0

    frozen = static.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(ids), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    assert torch.equal(static.weight, frozen)
    assert not torch.equal(dynamic.weight, frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters()) - 30 * 4


def test_load_vectors_fills_every_channel_and_keeps_static_frozen():
    model = small()
    vectors = torch.randn(30, 4)
    model.load_vectors(vectors)
    for emb in model.embeddings:
        assert torch.equal(emb.weight, vectors)
    assert [e.weight.requires_grad for e in model.embeddings] == [False, True]
    with pytest.raises(ShapeError, match=r"vectors must be \[vocab_size, d_embed\] = \[30, 4\], got \(30, 5\)"):
        model.load_vectors(torch.randn(30, 5))


@pytest.mark.parametrize("channels", [("non-static",), ("static",), ("static", "non-static"), ("non-static",) * 3])
def test_kim_variants(channels):
    model = small(channels=channels)
    assert model.convs[0].in_channels == 4 * len(channels)
    assert model(torch.randint(0, 30, (2, 5))).shape == (2, 3)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_kernel_wider_than_sequence_raises_before_any_computation():
    model = small(kernels=((2, 4), (5, 5)))
    calls = []
    model.embeddings[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ShapeError, match="kernel width 5 is wider than the sequence N=4"):
        model(torch.randint(0, 30, (2, 4)))
    assert calls == []
    assert model(torch.randint(0, 30, (2, 5))).shape == (2, 3)  # N = widest kernel: one window


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(5, dtype=torch.long), r"\[B, N\] tensor of token ids, got \(5,\)"),
        (torch.zeros(2, 6), "integer token ids, got dtype torch.float32"),
        (torch.tensor([[1, 2, 3, 30]]), r"id 30, outside \[0, vocab_size=30\)"),
        (torch.tensor([[1, -2, 3, 4]]), r"id -2"),
        (torch.zeros(0, 6, dtype=torch.long), "empty batch"),
    ],
)
def test_bad_inputs(ids, message):
    with pytest.raises(ShapeError, match=message):
        small()(ids)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kernels=((0, 4),)), r"kernels\[0\]=\(0, 4\): width and channels must be > 0"),
        (dict(kernels=((2, 4), (3, -1))), r"kernels\[1\]=\(3, -1\)"),
        (dict(kernels=()), "at least one"),
        (dict(kernels=((2, 4, 1),)), "kernels="),
        (dict(channels=("nonstatic",)), r"channels\[0\]: unknown value 'nonstatic' \(did you mean 'non-static'\?\)"),
        (dict(channels=()), "at least one embedding channel"),
        (dict(d_embed=0), "d_embed=0 must be > 0"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TextCNNConfig(**overrides)


def test_config_json_round_trip_keeps_kernel_pairs():
    config = get_config("textcnn-kim")
    again = TextCNNConfig.from_json(config.to_json())
    assert again == config and again.kernels == ((3, 100), (4, 100), (5, 100))
    assert config.replace(dropout=0.1).kernels == config.kernels


# ------------------------------------------------------------------------------------------------
# presets and learning
# ------------------------------------------------------------------------------------------------


def test_preset_parameter_counts():
    """Kim: V x 300 per embedding channel; 100 filters of (h x 600) + bias per width; 300 -> 2 classifier."""
    with torch.device("meta"):
        kim = build_model("textcnn-kim")
    V = 20000
    convs = sum(100 * (h * 2 * 300) + 100 for h in (3, 4, 5))
    assert sum(p.numel() for p in kim.parameters()) == 2 * V * 300 + convs + 300 * 2 + 2
    deck = build_model("textcnn-deck")
    assert sum(p.numel() for p in deck.parameters()) == 1000 * 6 + (4 * 6 * 2 + 4) + (5 * 6 * 4 + 5) + 9 * 2 + 2


def ngram_task(n: int, length: int = 16, vocab: int = 40, seed: int = 0):
    """Binary task only word order decides: class 1 holds the bigram (7, 13); class 0 holds (13, 7) instead.
    Both classes contain both words, so a bag of words is at chance; an n-gram filter is not."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(15, vocab, (n, length), generator=g)  # filler words never 7 or 13
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, length - 1, (n,), generator=g)
    for i in range(n):
        first, second = (7, 13) if labels[i] == 1 else (13, 7)
        ids[i, where[i]], ids[i, where[i] + 1] = first, second
    return ids, labels


@pytest.mark.parametrize("preset", ["textcnn-deck", "textcnn-kim"])
def test_presets_train_a_few_steps(preset):
    torch.manual_seed(0)
    model = build_model(preset).train()
    ids, labels = ngram_task(32, vocab=min(40, model.config.vocab_size))
    lr = 1e-2 if preset == "textcnn-deck" else 1e-3
    losses = fit(model, lambda: F.cross_entropy(model(ids), labels), 8, lr=lr)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses


def train_on_ngram_task(kernels) -> float:
    """Train on 2000 generated sentences; accuracy on 1000 held-out ones."""
    torch.manual_seed(0)
    ids, labels = ngram_task(3000, seed=1)
    model = TextCNN(TextCNNConfig(vocab_size=40, n_classes=2, d_embed=16, kernels=kernels, dropout=0.2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        model.train()
        for batch in torch.randperm(2000).split(50):
            loss = F.cross_entropy(model(ids[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(ids[2000:]).argmax(-1) == labels[2000:]).float().mean().item()


@pytest.mark.slow
def test_textcnn_learns_word_order_task():
    """Bigram and trigram filters classify held-out sentences far above chance (0.5); width-1 filters,
    a bag of words after max pooling, cannot see the order and stay near chance: the task needs n-grams."""
    ngrams = train_on_ngram_task(((2, 8), (3, 8)))
    words = train_on_ngram_task(((1, 16),))
    print(f"TextCNN held-out accuracy on the word-order task: widths 2, 3: {ngrams:.3f}; width 1: {words:.3f} (chance 0.5)")
    assert ngrams > 0.95, ngrams
    assert words < 0.6, words
