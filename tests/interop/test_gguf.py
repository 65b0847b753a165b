"""GGUF reading: dequantization of each ggml type, llama.cpp's Q/K row order, Llama config and names, bad files.

Every file here is written in a tmp dir with the ``gguf`` package's own writer (llama.cpp's), so the
tests run without the SmolLM2 file; ``tests/parity/test_smollm2.py`` checks the real one against HF.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from gguf_files import TINY_TOKENIZER, TINY_TOKENS, llama_cpp_permute, llama_metadata, write_gguf, write_llama_gguf

from archlab.cli import main
from archlab.data.chat import ChatML
from archlab.data.tokenizers import load_tokenizer
from archlab.errors import CheckpointError
from archlab.interop.convert import convert
from archlab.interop.gguf import GGUFFile, hf_llama_config, load_gguf, read_gguf_llama, unpermute_rope
from archlab.interop.io import load_model
from archlab.interop.llama import llama_state_from_archlab
from archlab.models.llama import Llama, LlamaConfig

Q = gguf.GGMLQuantizationType


# --- dequantization ------------------------------------------------------------------------------

# (type, the largest error of one value of a 32-value block: one quantization step)
STEP = {
    Q.Q8_0: lambda b: np.abs(b).max() / 127,
    Q.Q4_0: lambda b: np.abs(b).max() / 8,
    Q.Q4_1: lambda b: np.ptp(b) / 15,
    Q.Q5_0: lambda b: np.abs(b).max() / 16,
    Q.Q5_1: lambda b: np.ptp(b) / 31,
}


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, *STEP], ids=lambda k: k.name)
def test_quantized_tensor_reads_back_within_its_format(tmp_path, kind):
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)  # [rows, cols]; 3 blocks per row
    stored = gguf.quants.quantize(x, kind)
    path = write_gguf(tmp_path / "t.gguf", {"w": (stored, None if kind in (Q.F32, Q.F16) else kind)})
    got = GGUFFile(path).tensors()["w"]
    assert got.dtype == torch.float32 and got.shape == (6, 96)
    np.testing.assert_array_equal(got.numpy(), gguf.quants.dequantize(stored, kind))  # the package's decoder
    err = np.abs(got.numpy() - x)
    if kind in STEP:
        blocks = x.reshape(-1, 32)
        bound = np.repeat([STEP[kind](b) for b in blocks], 32).reshape(x.shape)
    else:  # round to nearest: half an ulp, relative
        bound = np.abs(x) * {Q.F32: 0.0, Q.F16: 2.0**-11, Q.BF16: 2.0**-8}[kind]
    assert (err <= bound * (1 + 1e-3)).all(), float((err - bound).max())


def _f16(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint8)


def _q4_k_reference(block: np.ndarray) -> np.ndarray:
    """One Q4_K block (144 bytes) decoded value by value (ggml's block_q4_K): 256 values in float64.

    d, dmin (f16) | scales[12]: 8 six-bit (scale, min) pairs | qs[128]: 4-bit values, 64 per 32 bytes.
    Sub-block j: value = d * scale_j * q - dmin * min_j.
    """
    d, dmin = block[:4].view(np.float16).astype(np.float64)
    s, qs = block[4:16].astype(int), block[16:].astype(int)

    def scale_min(j):
        if j < 4:
            return s[j] & 63, s[j + 4] & 63
        return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)

    out = []
    for chunk in range(4):  # 64 values from 32 bytes: low nibbles (sub-block 2c), then high (2c + 1)
        q = qs[32 * chunk : 32 * chunk + 32]
        for j, nibble in ((2 * chunk, q & 0xF), (2 * chunk + 1, q >> 4)):
            sc, m = scale_min(j)
            out.extend(d * sc * nibble - dmin * m)
    return np.array(out)


def _q6_k_reference(block: np.ndarray) -> np.ndarray:
    """One Q6_K block (210 bytes) decoded value by value (ggml's block_q6_K): 256 values in float64.

    ql[128]: low 4 bits | qh[64]: high 2 bits | scales[16] (int8, one per 16 values) | d (f16).
    value = d * scale * (q - 32), q the 6-bit value.
    """
    ql, qh = block[:128].astype(int), block[128:192].astype(int)
    sc = block[192:208].view(np.int8).astype(np.float64)
    d = float(block[208:210].view(np.float16)[0])
    y = np.zeros(256)
    for half in range(2):  # 128 values each
        lo, hi, s, base = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for i in range(32):
            q = [
                (lo[i] & 0xF) | (((hi[i] >> 0) & 3) << 4),
                (lo[i + 32] & 0xF) | (((hi[i] >> 2) & 3) << 4),
                (lo[i] >> 4) | (((hi[i] >> 4) & 3) << 4),
                (lo[i + 32] >> 4) | (((hi[i] >> 6) & 3) << 4),
            ]
            for k in range(4):
                y[base + 32 * k + i] = d * s[i // 16 + 2 * k] * (q[k] - 32)
    return y


@pytest.mark.parametrize(
    "kind, reference, scale_bytes",
    [(Q.Q4_K, _q4_k_reference, slice(0, 4)), (Q.Q6_K, _q6_k_reference, slice(208, 210))],
    ids=["Q4_K", "Q6_K"],
)
def test_k_quant_blocks_decode_as_ggml_lays_them_out(tmp_path, kind, reference, scale_bytes):
    """gguf has no Q4_K/Q6_K quantizer: random blocks (finite f16 scales) against a value-by-value decoder."""
    rng = np.random.default_rng(1)
    n_rows, blocks_per_row, nbytes = 3, 2, gguf.GGML_QUANT_SIZES[kind][1]
    raw = rng.integers(0, 256, size=(n_rows * blocks_per_row, nbytes), dtype=np.uint8)
    n_scales = (scale_bytes.stop - scale_bytes.start) // 2
    raw[:, scale_bytes] = _f16(rng.uniform(0.01, 0.1, size=(len(raw), n_scales))).reshape(len(raw), -1)
    stored = raw.reshape(n_rows, blocks_per_row * nbytes)
    got = GGUFFile(write_gguf(tmp_path / "k.gguf", {"w": (stored, kind)})).tensors()["w"]
    assert got.shape == (n_rows, blocks_per_row * 256)
    want = np.concatenate([reference(b) for b in raw]).reshape(n_rows, -1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# --- a tiny Llama written as llama.cpp's converter writes it ---------------------------------------


@pytest.mark.parametrize("tie, n_kv_heads", [(True, 2), (False, 1), (True, 4)], ids=["gqa-tied", "mqa-untied", "mha"])
def test_llama_gguf_loads_the_same_model(tmp_path, tie, n_kv_heads):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, max_len=32, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2, d_ff=48,
        rope_theta=5000.0, eps=1e-5, tie_embeddings=tie,
    )  # fmt: skip
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    loaded = load_gguf(write_llama_gguf(tmp_path / "tiny.gguf", model))
    assert loaded.config == dataclasses.replace(config, eps=float(np.float32(config.eps)))  # GGUF stores float32
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads, d_k = 8
    back = unpermute_rope(torch.from_numpy(llama_cpp_permute(w, 6)), 6).numpy()
    np.testing.assert_array_equal(back, w)
    # the rows really move: GGUF row 2j + s of a head is HF row j + s * d_k / 2
    assert not np.array_equal(llama_cpp_permute(w, 6), w)
    np.testing.assert_array_equal(llama_cpp_permute(w, 6)[1], w[4])


def test_convert_gguf_to_archlab_and_on_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TINY_TOKENS), max_len=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=48
    )
    model = Llama(config).eval()
    path = write_llama_gguf(tmp_path / "tiny.gguf", model, TINY_TOKENIZER)
    assert convert(path, tmp_path / "archlab") == "gguf -> archlab, with tokenizer.json"
    loaded = load_model(tmp_path / "archlab")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    tok = load_tokenizer(tmp_path / "archlab")
    ids = {t: i for i, t in enumerate(TINY_TOKENS)}
    assert tok.encode("hello world 42") == [ids[t] for t in ("hello", "Ġw", "o", "r", "l", "d", "Ġ", "4", "2")]
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 2, ChatML("Be brief."))
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert chat[:2] == [1, ids["s"]] and chat.count(2) == 2

    assert convert(tmp_path / "archlab", tmp_path / "hf") == "archlab -> llama, with tokenizer.json"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    for name, tensor in llama_state_from_archlab(model.state_dict(), config).items():
        torch.testing.assert_close(hf.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    x = torch.tensor([chat])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x))
    # the HF folder's tokenizer (tokenizer.json + tokenizer_config.json) reads the same in transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    hf_chat = hf_tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert hf_chat["input_ids"] == chat


def test_gguf_without_tokenizer_converts_without_one(tmp_path, capsys):
    model = Llama(LlamaConfig(vocab_size=64, max_len=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=48))
    assert main(["convert", str(write_llama_gguf(tmp_path / "t.gguf", model)), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("gguf -> archlab: ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


# --- bad files -----------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"model\.gguf is not a GGUF file \(starts with b'\{\"mo'"):
        GGUFFile(path)
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.05], ids=["tensor-data", "metadata"])
def test_truncated_gguf(tmp_path, keep):
    model = Llama(LlamaConfig(vocab_size=64, max_len=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=48))
    path = write_llama_gguf(tmp_path / "tiny.gguf", model)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"tiny\.gguf is truncated or damaged"):
        GGUFFile(path)


def test_gguf_of_another_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"w": (np.zeros((2, 4), np.float32), None)}, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2\.gguf holds a 'gpt2' model; archlab reads GGUF .*: llama"):
        read_gguf_llama(path)


def test_unknown_quant_type(tmp_path):
    raw = np.zeros((2, gguf.GGML_QUANT_SIZES[Q.TQ1_0][1]), dtype=np.uint8)  # a ternary type archlab does not read
    path = write_gguf(tmp_path / "t.gguf", {"w": (raw, Q.TQ1_0)})
    with pytest.raises(CheckpointError, match=r"t\.gguf: tensor 'w' has ggml type TQ1_0, which archlab does not read"):
        GGUFFile(path).tensors()


def test_missing_metadata_and_unknown_tensor(tmp_path):
    config = LlamaConfig(vocab_size=64, max_len=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, d_ff=48)
    meta = llama_metadata(config)
    del meta["llama.attention.head_count_kv"]
    path = write_gguf(tmp_path / "a.gguf", {"w": (np.zeros((2, 4), np.float32), None)}, metadata=meta)
    with pytest.raises(CheckpointError, match=r"a\.gguf lacks the metadata key 'llama\.attention\.head_count_kv'"):
        hf_llama_config(GGUFFile(path))
    path = write_gguf(tmp_path / "b.gguf", {"blk.0.mystery.weight": (np.zeros((2, 4), np.float32), None)},
                      metadata=llama_metadata(config))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.mystery\.weight' has no place in a Llama model"):
        read_gguf_llama(path)
