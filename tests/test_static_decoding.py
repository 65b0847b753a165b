"""Static decoding (archlab.static_decoding): attention over a static cache == attention over the growing KVCache
(float64), StaticDecoder's tokens and logits == the model's (eager: fast tier; compiled by torch.compile: slow,
the first compile of a process costs ~20-30 s), no recompile per token, and the ConfigErrors for what it does not
serve."""

from __future__ import annotations

import pytest
import torch

from archlab.errors import ConfigError, ShapeError
from archlab.generation import beam_search, generate
from archlab.models import build_model
from archlab.models.gpt import GPT, GPTConfig
from archlab.nn import KVCache
from archlab.nn.attention import MultiHeadAttention
from archlab.nn.positional import RotaryPositionalEncoding
from archlab.quant import quantize
from archlab.static_decoding import StaticDecoder, StaticKVCache, static_attention, static_mask

V = 23


def peaky(model, seed: int = 0):
    """``model`` in eval mode with N(0, 0.3) weights: peaked, varied next-token distributions."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def gpt(**overrides) -> GPT:
    config = dict(vocab_size=V, max_len=64, d_model=32, n_heads=4, n_layers=2, dropout=0.0, attn_dropout=0.0)
    return peaky(GPT(GPTConfig(**{**config, **overrides})))


def llama():
    """llama-tiny (RoPE, RMSNorm, SwiGLU, 4 query heads over 2 K/V heads) with a small vocabulary."""
    return peaky(build_model("llama-tiny", vocab_size=V, max_len=64))


PROMPT = torch.tensor([[3, 7, 1, 12, 5]])


def test_static_mask():
    assert torch.equal(static_mask(torch.tensor([1, 2]), 4), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]).bool())


@pytest.mark.parametrize("kv_heads, rope", [(4, False), (2, True), (1, True)])
def test_static_attention_equals_kv_cache_attention(kv_heads, rope):
    """A prompt of 5 then 3 single tokens: the static cache's outputs equal MultiHeadAttention's over KVCache
    (float64, 1e-12), GQA and RoPE included; the positions not written are zero weight, whatever they hold."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, n_kv_heads=kv_heads).double().eval()
    positional = RotaryPositionalEncoding(8) if rope else None
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    cache, length = KVCache(), 12
    static = StaticKVCache(length)
    static.k = torch.full((2, kv_heads, length, 8), 1e3, dtype=torch.float64)  # garbage where nothing is written
    static.v = torch.full((2, kv_heads, length, 8), -1e3, dtype=torch.float64)
    for start, end in ((0, 5), (5, 6), (6, 7), (7, 8)):
        want = attn(x[:, start:end], causal=True, positional=positional, cache=cache)
        positions = torch.arange(start, end)
        rows = None if positional is None else (positional, tuple(t[positions] for t in positional.tables(
            length, torch.float64, x.device)))  # fmt: skip
        got = static_attention(attn, x[:, start:end], positions, static.k, static.v, rows)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(static.k[:, :, :8], cache.keys, rtol=0, atol=0)


@pytest.mark.parametrize("make", [gpt, llama, lambda: gpt(positional="sinusoidal"), lambda: gpt(positional="none")],
                         ids=["gpt", "llama", "sinusoidal", "none"])  # fmt: skip
def test_eager_static_decoder_equals_model(make):
    """Greedy tokens equal the model's; the logits of prompt and steps equal within 1e-12 in float64."""
    model = make().double()
    static = StaticDecoder(model, max_len=20, compile=False)
    assert torch.equal(generate(static, PROMPT, max_new_tokens=12), generate(model, PROMPT, max_new_tokens=12))
    cache, ids = static.new_cache(), torch.tensor([[3, 7, 1, 12, 5, 9, 2, 4]])
    got = torch.cat([static(ids[:, :5], cache), static(ids[:, 5:6], cache), static(ids[:, 6:8], cache)], dim=1)
    torch.testing.assert_close(got, model(ids), rtol=0, atol=1e-12)
    assert cache.length == 8


def test_beam_search_through_static_cache():
    """Beam search reorders the static cache's rows: the same hypotheses and scores as the model's."""
    model = llama().double()
    want = beam_search(model, PROMPT, beam_size=3, max_new_tokens=6, eos_id=2)
    got = beam_search(StaticDecoder(model, max_len=11, compile=False), PROMPT, beam_size=3, max_new_tokens=6, eos_id=2)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-12)


def test_what_it_does_not_serve():
    model = gpt()
    static = StaticDecoder(model, max_len=10, compile=False)
    with pytest.raises(ConfigError, match=r"max_new_tokens=7.*max_len=10.*max_new_tokens <= 6"):
        generate(static, PROMPT, max_new_tokens=7)  # 5 + 7 - 1 = 11 positions read, refused before decoding
    with pytest.raises(ConfigError, match="attention_mask must be None"):
        generate(static, PROMPT, max_new_tokens=2, attention_mask=torch.ones_like(PROMPT))
    with pytest.raises(ConfigError, match=r"positions 8\.\.10 are past the static cache's max_len=10"):
        cache = static.new_cache()
        static(torch.zeros(1, 8, dtype=torch.long), cache)
        static(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ShapeError, match="cache holds batch 1 but tokens has batch 2"):
        static(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ShapeError, match=r"outside the vocabulary \[0, 23\)"):
        static(torch.tensor([[V]]), static.new_cache())
    with pytest.raises(ConfigError, match="max_len=65 is past the context of GPT"):
        StaticDecoder(model, max_len=65)
    with pytest.raises(ConfigError, match="max_len=0 must be an int >= 1"):
        StaticDecoder(model, max_len=0)
    with pytest.raises(ConfigError, match="not 'alibi'"):
        StaticDecoder(gpt(positional="alibi"), max_len=8)
    with pytest.raises(ConfigError, match="dense attention backend.*'chunked'"):
        StaticDecoder(gpt(backend="chunked"), max_len=8)
    with pytest.raises(ConfigError, match=r"call model.eval\(\) first"):
        StaticDecoder(gpt().train(), max_len=8)
    dynamic = gpt(d_model=64, n_heads=2)
    quantize(dynamic, "int8-dynamic")
    with pytest.raises(ConfigError, match="compile=True cannot trace int8-dynamic layers"):
        StaticDecoder(dynamic, max_len=8, compile=True)
    with pytest.raises(ConfigError, match="decoder-only DecoderLM.*got Linear"):
        StaticDecoder(torch.nn.Linear(2, 2), max_len=8)


# ------------------------------------------------------------------------------------------------
# compiled (torch.compile, inductor): slow, the first compile of a process is ~20-30 s
# ------------------------------------------------------------------------------------------------


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("make", [llama, gpt], ids=["llama", "gpt"])
def test_compiled_greedy_equals_eager_and_traces_once(make):
    """fp32: compiled greedy tokens == eager model's; step logits within float tolerance of the model's; one graph
    for the whole run (no graph break, no recompile per token), none more for a second run on a new cache."""
    model = make()
    static = StaticDecoder(model, max_len=30, compile=True)
    before = compiled_graphs()
    with torch.inference_mode():
        got = generate(static, PROMPT, max_new_tokens=24)
    assert compiled_graphs() - before == 1  # one trace of the one-token step: no graph break, no recompile
    assert torch.equal(got, generate(model, PROMPT, max_new_tokens=24))
    ids, cache, step = got[:, :20], static.new_cache(), static.decoder_step(logits_to_keep=1)  # as generate's
    with torch.inference_mode():
        logits = torch.cat([step(ids[:, :5], cache)] + [step(ids[:, i : i + 1], cache) for i in range(5, 20)], 1)
        torch.testing.assert_close(logits, model(ids)[:, 4:], rtol=1e-4, atol=1e-4)
        generate(static, PROMPT[:, :3], max_new_tokens=20)  # another run, other prompt length: no recompile
    assert compiled_graphs() - before == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_compiled_low_precision_step(mode):
    """Weight-only int8/int4 (bf16 activations) and bf16 weights: the compiled steps' logits stay within bf16
    rounding of the eager model's, in one graph (the weight-only kernels traced, no graph break)."""
    model = peaky(build_model("llama-tiny", vocab_size=256, d_ff=192))
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    else:
        quantize(model, mode)
    static = StaticDecoder(model, max_len=24, compile=True)
    before = compiled_graphs()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = static.new_cache()
    with torch.inference_mode():
        logits = torch.cat([static(ids[:, :5], cache)] + [static(ids[:, i : i + 1], cache) for i in range(5, 20)], 1)
        want = model(ids)
    assert compiled_graphs() - before == 1
    scale = want.abs().max()
    assert float((logits.float() - want.float()).abs().max() / scale) < 0.03  # bf16 rounded in other places


def test_cpp_wrapper_needs_compile():
    with pytest.raises(ConfigError, match="cpp_wrapper=True wraps the compiled step: it needs compile=True"):
        StaticDecoder(llama(), max_len=8, compile=False, cpp_wrapper=True)


@pytest.mark.slow
def test_compiled_with_the_cpp_wrapper_equals_eager():
    """Inductor's C++ wrapper: the same greedy tokens as the eager model, one graph."""
    model = gpt()
    static = StaticDecoder(model, max_len=30, compile=True, cpp_wrapper=True)
    before = compiled_graphs()
    with torch.inference_mode():
        got = generate(static, PROMPT, max_new_tokens=24)
    assert compiled_graphs() - before == 1
    assert torch.equal(got, generate(model, PROMPT, max_new_tokens=24))


def test_cuda_graph_storage_is_handed_from_cache_to_cache():
    """With cuda_graphs the decoder keeps one storage per batch size (a CUDA graph reads the cache where it was
    recorded). The hand-over, run here on the CPU by switching it on after construction (the graph itself needs a
    GPU: tests/test_cuda.py): runs after one another give the model's tokens, inside and outside inference mode;
    beam search reorders in place; a cache whose storage a newer one took is refused."""
    model = llama()
    with pytest.raises(ConfigError, match="needs compile=True and the model on a CUDA GPU"):
        StaticDecoder(model, max_len=30, cuda_graphs=True)
    static = StaticDecoder(model, max_len=30, compile=False)
    static.cuda_graphs = True
    want = generate(model, PROMPT, max_new_tokens=12)
    with torch.inference_mode():
        assert torch.equal(generate(static, PROMPT, max_new_tokens=12), want)
    assert torch.equal(generate(static, PROMPT[:, :2], max_new_tokens=12), generate(model, PROMPT[:, :2], max_new_tokens=12))
    assert torch.equal(generate(static, PROMPT, max_new_tokens=12), want)
    beams = beam_search(static, PROMPT, max_new_tokens=6, beam_size=3)
    assert torch.equal(beams.sequences, beam_search(model, PROMPT, max_new_tokens=6, beam_size=3).sequences)
    first = static.new_cache()
    static(PROMPT, first)
    second = static.new_cache()
    static(PROMPT, second)
    assert second.layers[0].k.data_ptr() == first.layers[0].k.data_ptr() and len(static._storage) == 2  # batch 1, 3
    with pytest.raises(ConfigError, match="handed to a newer cache"):
        static(PROMPT[:, :1], first)
