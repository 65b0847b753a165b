"""count_parameters: each distinct Parameter once, grouped by component, checked against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archlab.analysis.params import COMPONENTS, count_parameters, human
from archlab.errors import ConfigError, DataError
from archlab.models import build_model
from archlab.nn import LayerNorm, MultiHeadAttention


def unique_total(model: nn.Module) -> int:
    seen = {id(p): p.numel() for p in model.parameters()}  # parameters() drops tied duplicates
    return sum(seen.values())


def tiny_by_hand(V=128, d=64, d_ff=256, N=2) -> dict[str, int]:
    """transformer-tiny written out: V=128, d=64, A=4, d_ff=256, N=2 blocks per stack, shared E."""
    attention = 4 * d * d + 4 * d  # W_Q, W_K, W_V, W_O + biases
    ffn = d * d_ff + d_ff + d_ff * d + d
    norm = 2 * d
    return {
        "embeddings": V * d,  # one matrix: source, target and pre-softmax
        "attention": 2 * N * attention,  # encoder self-attention + decoder masked self-attention
        "cross_attention": N * attention,
        "feed_forward": 2 * N * ffn,
        "recurrent": 0,
        "convolution": 0,
        "norms": N * 2 * norm + N * 3 * norm,  # post-norm: no final norms
        "output_head": 0,  # tied to the embedding
        "other": 0,
    }


def test_transformer_tiny_components_by_hand():
    model = build_model("transformer-tiny")
    report = count_parameters(model)
    expected = tiny_by_hand()
    assert report.by_component == expected
    assert list(report.by_component) == list(COMPONENTS)
    assert report.total == sum(expected.values()) == 241_664 == unique_total(model)
    assert report.trainable == report.total and report.frozen == 0


def test_tied_matrix_counts_once_and_lists_its_aliases():
    model = build_model("transformer-tiny")
    naive = sum(t.numel() for t in model.state_dict().values())
    report = count_parameters(model)
    assert naive - report.total == 2 * 128 * 64  # the state dict holds E three times
    [tied] = report.tied
    assert tied.name == "src_embed.weight" and set(tied.aliases) == {"tgt_embed.weight", "lm_head.weight"}
    assert tied.component == "embeddings"


def test_untied_head_and_learned_positions():
    model = build_model("transformer-tiny", share_embeddings=False, positional="learned", norm_first=True)
    report = count_parameters(model)
    hand = tiny_by_hand()
    assert report.by_component["embeddings"] == 2 * 128 * 64 + 2 * 256 * 64  # src, tgt tokens; src, tgt positions
    assert report.by_component["output_head"] == 128 * 64
    assert report.by_component["norms"] == hand["norms"] + 2 * 2 * 64  # pre-norm adds a final norm per stack
    assert report.total == unique_total(model)
    assert report.tied == []


def test_trainable_versus_total():
    model = build_model("transformer-tiny")
    model.encoder.requires_grad_(False)
    report = count_parameters(model)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert report.trainable == report.total - encoder
    assert report.frozen == encoder


@pytest.mark.filterwarnings("ignore:.*nested.tensor")  # torch's encoder fast-path notice
def test_torch_transformer_is_classified_the_same_way():
    """The classification is by module type and attribute name, so torch's own layers group alike."""
    ours = count_parameters(build_model("transformer-tiny", norm_first=True)).by_component
    ref = nn.Transformer(64, 4, 2, 2, 256, batch_first=True, norm_first=True)
    theirs = count_parameters(ref).by_component
    for component in ("attention", "cross_attention", "feed_forward", "norms"):
        assert theirs[component] == ours[component], component
    assert theirs["other"] == 0


def test_generic_names_heads_patch_embeddings_and_other():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)  # 3*8*16 + 8
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.attn = MultiHeadAttention(8, 2)
            self.norm = LayerNorm(8)
            self.classifier = nn.Linear(8, 10)
            self.mixer = nn.Linear(8, 8)

    report = count_parameters(Toy())
    assert report.by_component["embeddings"] == 3 * 8 * 16 + 8 + 8
    assert report.by_component["attention"] == 4 * 8 * 8 + 4 * 8
    assert report.by_component["norms"] == 16
    assert report.by_component["output_head"] == 8 * 10 + 10
    assert report.by_component["other"] == 8 * 8 + 8
    assert report.total == unique_total(Toy())


def test_recurrent_and_convolution_components():
    lstm = count_parameters(build_model("lstm-lm-small"))
    rnn = lstm.by_component["recurrent"]
    assert rnn > 0 and rnn == sum(p.numel() for p in build_model("lstm-lm-small").rnn.parameters())
    textcnn = count_parameters(build_model("textcnn-deck"))
    convs = [m for m in build_model("textcnn-deck").modules() if isinstance(m, nn.Conv1d)]
    assert textcnn.by_component["convolution"] == sum(p.numel() for m in convs for p in m.parameters()) > 0


def test_rwkv_time_and_channel_mixing_are_attention_and_feed_forward():
    """RWKV-4 by hand (d = 64, d_att = 64, d_ff = 256, L = 2, V = 256): time mixing (its attention-free token mixer:
    W_k, W_v, W_r, W_o and five vectors) under attention, channel mixing under feed-forward; nothing is "other"."""
    d, d_att, d_ff, L, V = 64, 64, 256, 2, 256  # noqa: N806
    report = count_parameters(build_model("rwkv-tiny"))
    assert report.by_component["attention"] == L * (4 * d * d_att + 2 * d_att + 3 * d)
    assert report.by_component["feed_forward"] == L * (2 * d * d_ff + d * d + 2 * d)
    assert report.by_component["other"] == 0
    assert report.by_component["embeddings"] == report.by_component["output_head"] == V * d


def test_meta_device_models_are_counted_without_memory():
    with torch.device("meta"):
        model = build_model("transformer-big")
    report = count_parameters(model)
    assert report.total == 214_245_376
    assert abs(sum(report.share(c) for c in COMPONENTS) - 1.0) < 1e-12


def test_errors_and_human_format():
    with pytest.raises(DataError, match="nn.Module"):
        count_parameters("transformer-base")
    report = count_parameters(build_model("transformer-tiny"))
    with pytest.raises(ConfigError, match="did you mean 'attention'"):
        report.share("atention")
    figures = [human(n) for n in (63_082_496, 214_245_376, 241_664, 999, 1.5e9)]
    assert figures == ["63.1M", "214M", "242K", "999", "1.5B"]


def test_human_of_non_finite_and_non_numbers():
    assert human(float("nan")) == "nan" and human(float("inf")) == "inf" and human(-float("inf")) == "-inf"
    with pytest.raises(ConfigError, match=r"human\('12'\): a count must be a number"):
        human("12")
