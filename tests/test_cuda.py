"""archlab on a CUDA GPU: the same model on the GPU as on the CPU, generation, static and compiled decoding,
speculative decoding, training with precision=auto (bf16 where the GPU computes it) and its exact resume.

Every test here needs a GPU and is skipped, saying so, where torch sees none (CI's machines): ``make test-cuda``
runs them. ``ARCHLAB_TEST_DEVICE=cpu`` runs the same checks with the CPU standing in for the GPU, to try their
logic on a machine without one (the CPU-vs-GPU comparisons then compare the CPU with itself).

The references: each family's forward and gradients in float64 on the GPU against the same weights and inputs
on the CPU (1e-9: only the order of float64 sums differs); greedy tokens in float64 equal across devices;
cached == uncached, batched == one at a time, static == dynamic cache, speculative == greedy on the GPU;
bf16 training within 0.05 nats of fp32 over 30 steps; 3 + 3 steps resumed == 6 straight, bit for bit, with
PyTorch's deterministic algorithms (CUDA's default kernels may add in a different order from run to run).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from archlab.errors import ConfigError
from archlab.generation import beam_search, generate, generate_batch
from archlab.models import build_model
from archlab.precision import choose_precision
from archlab.quant import quantize
from archlab.speculative import speculative_generate
from archlab.static_decoding import StaticDecoder
from archlab.train import TrainConfig, Trainer, latest_checkpoint

sys.path.insert(0, str(Path(__file__).parent / "train"))
from train_fakes import LMSource  # noqa: E402

DEVICE = torch.device(os.environ.get("ARCHLAB_TEST_DEVICE", "cuda"))
# cuBLAS reads its workspace setting when its handle is made (at the first product): set before any, so that
# the deterministic-algorithms test may run after the others in one process
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA GPU: torch.cuda.is_available() is False (make test-cuda on a GPU machine)"),
]  # fmt: skip

QUIET = dict(progress=False, tensorboard=False, eval_every=0, ckpt_every=0)


@pytest.fixture(autouse=True)
def _full_fp32_products():
    """float32 products in float32 (no TF32 rounding of the inputs to 10 bits) while a test runs."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _ids(vocab: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _pixels() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


#: preset, build overrides, inputs. One model of each family that has a preset small enough for a test.
FAMILIES = {
    "gpt": ("gpt-nano", {}, lambda: (_ids(256),)),
    "llama": ("llama-tiny", {}, lambda: (_ids(256),)),
    "bert": ("bert-mini", dict(vocab_size=120, n_layers=2), lambda: (_ids(120),)),
    "transformer": ("transformer-tiny", {}, lambda: (_ids(128), _ids(128, (2, 6)))),
    "vit": ("vit-tiny", {}, lambda: (_pixels(),)),
    "gmlp": ("gmlp-lm-tiny", {}, lambda: (_ids(256),)),
    "rwkv": ("rwkv-tiny", {}, lambda: (_ids(256),)),
    "transformer-xl": ("transformer-xl-tiny", {}, lambda: (_ids(256),)),
    "lstm": ("lstm-lm-small", {}, lambda: (_ids(256),)),
    "gru": ("gru-lm-small", {}, lambda: (_ids(256),)),
    "textcnn": ("textcnn-deck", {}, lambda: (_ids(1000),)),
    "wavenet": ("wavenet-small", {}, lambda: (_ids(256),)),
    "resnet": ("resnet-digits", {}, lambda: (_pixels(),)),
    "elmo": ("elmo-small", {}, lambda: (_ids(256),)),
    "rnnsearch": ("rnnsearch-small", {}, lambda: (_ids(64), _ids(64, (2, 6)))),
    "mlp": ("mlp-digits", {}, lambda: (torch.randn(2, 64, generator=torch.Generator().manual_seed(0)),)),
}


def _tensors(out) -> list[torch.Tensor]:
    """The float tensors of a model's output (a tensor, a tuple, or a dataclass of them)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    items = out if isinstance(out, (tuple, list)) else vars(out).values()
    return [t for item in items if item is not None for t in _tensors(item)]


def _scaled(model: nn.Module) -> nn.Module:
    """Every Linear's weight ``N(0, 0.5 / sqrt(in))`` (outputs that depend on every layer: RWKV's init zeroes
    its residual branches); in training mode (cuDNN's RNN backward runs in no other) with every dropout off."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.5 / m.in_features**0.5)
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            for name in ("dropout", "attn_dropout", "dropout_p"):  # rates modules keep as floats (RNN stacks, attention)
                if isinstance(getattr(m, name, None), float):
                    setattr(m, name, 0.0)
    return model.train()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_on_the_gpu_equals_the_cpu_in_float64(family):
    """Outputs and every parameter's gradient, float64, GPU against CPU: rtol 1e-9 (batch norms on batch statistics)."""
    preset, overrides, inputs = FAMILIES[family]
    torch.manual_seed(0)
    cpu = _scaled(build_model(preset, **overrides).double())
    gpu = _scaled(build_model(preset, **overrides).double()).to(DEVICE)
    gpu.load_state_dict(cpu.state_dict())
    results = []
    for model, device in ((cpu, torch.device("cpu")), (gpu, DEVICE)):
        args = [x.to(device, torch.float64) if x.is_floating_point() else x.to(device) for x in inputs()]
        outs = _tensors(model(*args))
        sum(o.square().mean() for o in outs).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert outs and grads and all(t.device.type == device.type for t in outs)
        results.append((outs, grads))
    (cpu_outs, cpu_grads), (gpu_outs, gpu_grads) = results
    assert len(cpu_outs) == len(gpu_outs) and cpu_grads.keys() == gpu_grads.keys()
    for a, b in zip(cpu_outs, gpu_outs):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name].cpu(), cpu_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def _peaky(model: nn.Module, seed: int = 0) -> nn.Module:
    """Matrices ``N(0, 0.3)``: peaked, varied next-token distributions (greedy does not repeat one token)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


DECODERS = {
    "gpt": lambda: _peaky(build_model("gpt-nano", vocab_size=64, max_len=64)),
    "llama": lambda: _peaky(build_model("llama-tiny", vocab_size=64, max_len=64)),
}
PROMPT = torch.tensor([[3, 7, 1, 12, 5]])


@pytest.mark.parametrize("family", list(DECODERS))
def test_greedy_on_the_gpu_equals_the_cpu_and_cached_equals_uncached(family):
    model = DECODERS[family]().double()
    want = generate(model, PROMPT, max_new_tokens=24)
    assert len(set(want[0, 5:].tolist())) > 4  # not a degenerate repetition
    gpu = model.to(DEVICE)
    got = generate(gpu, PROMPT.to(DEVICE), max_new_tokens=24)
    assert got.device.type == DEVICE.type and torch.equal(got.cpu(), want)
    gpu32 = gpu.float()
    cached = generate(gpu32, PROMPT.to(DEVICE), max_new_tokens=24)
    assert torch.equal(cached, generate(gpu32, PROMPT.to(DEVICE), max_new_tokens=24, use_cache=False))


def test_batched_rows_on_the_gpu_equal_one_at_a_time():
    model = DECODERS["llama"]().double().to(DEVICE)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in (5, 1, 8, 3)]
    alone = [generate(model, torch.tensor([p], device=DEVICE), max_new_tokens=15)[0, len(p) :].tolist() for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=15) == alone


def test_seeded_sampling_on_the_gpu_is_reproducible():
    model = DECODERS["gpt"]().to(DEVICE)
    draws = [generate(model, PROMPT.to(DEVICE), max_new_tokens=20, do_sample=True, top_k=20, seed=s) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("family", list(DECODERS))
def test_static_decoder_on_the_gpu_eager_and_compiled(family):
    """Eager static cache, float64: tokens equal the model's. Compiled (inductor: Triton kernels on a GPU), float32,
    without and with CUDA graphs: the same greedy tokens as the eager model, step logits
    within float tolerance, beam search as the model's."""
    model = DECODERS[family]().double().to(DEVICE)
    prompt = PROMPT.to(DEVICE)
    static = StaticDecoder(model, max_len=32, compile=False)
    assert torch.equal(generate(static, prompt, max_new_tokens=20), generate(model, prompt, max_new_tokens=20))
    model = model.float()
    want = generate(model, prompt, max_new_tokens=20)
    for graphs in (False, True) if DEVICE.type == "cuda" else (False,):
        compiled = StaticDecoder(model, max_len=32, compile=True, cuda_graphs=graphs)
        with torch.inference_mode():
            got = generate(compiled, prompt, max_new_tokens=20)
            assert torch.equal(got, want)
            assert torch.equal(generate(compiled, prompt[:, :3], max_new_tokens=20),
                               generate(model, prompt[:, :3], max_new_tokens=20))  # fmt: skip
            cache, ids = compiled.new_cache(), got[:, :16]
            logits = torch.cat([compiled(ids[:, :5], cache)] + [compiled(ids[:, i : i + 1], cache) for i in range(5, 16)], 1)
            torch.testing.assert_close(logits, model(ids), rtol=1e-4, atol=1e-4)
            beams = beam_search(compiled, prompt, max_new_tokens=8, beam_size=3)
            assert torch.equal(beams.sequences, beam_search(model, prompt, max_new_tokens=8, beam_size=3).sequences)


def test_cuda_graphs_decode_one_run_at_a_time_per_batch_size():
    """The graph reads the cache storage it was recorded with: a second cache takes it over, the first is refused;
    outside a GPU, or without compile, cuda_graphs=True is refused."""
    model = DECODERS["llama"]().to(DEVICE)
    prompt = PROMPT.to(DEVICE)
    with pytest.raises(ConfigError, match="cuda_graphs=True replays the compiled step as a CUDA graph"):
        StaticDecoder(model, max_len=32, compile=False, cuda_graphs=True)
    if DEVICE.type == "cpu":
        with pytest.raises(ConfigError, match="needs compile=True and the model on a CUDA GPU"):
            StaticDecoder(model, max_len=32, cuda_graphs=True)
        return
    static = StaticDecoder(model, max_len=32, cuda_graphs=True)
    with torch.inference_mode():
        first = static.new_cache()
        static(prompt, first)
        static(prompt[:, :1], first)
        second = static.new_cache()
        static(prompt, second)
        assert second.layers[0].k.data_ptr() == first.layers[0].k.data_ptr()  # the same storage, handed over
        with pytest.raises(ConfigError, match="handed to a newer cache"):
            static(prompt[:, :1], first)


def test_speculative_decoding_on_the_gpu_is_greedy():
    model = DECODERS["llama"]().to(DEVICE)
    ramp = torch.tensor([[3, 4, 5, 6, 7, 8, 3, 4, 5]], device=DEVICE)
    plain = generate(model, ramp, max_new_tokens=24)
    for draft in ("lookup", "layers:1"):
        out = speculative_generate(model, ramp, max_new_tokens=24, draft=draft, draft_tokens=3)
        assert torch.equal(out.sequences, plain), draft


def test_quantize_refuses_a_model_on_the_gpu():
    model = DECODERS["llama"]().to(DEVICE)
    if DEVICE.type == "cpu":
        pytest.skip("the CPU stands in for the GPU: quantize serves it")
    with pytest.raises(ConfigError, match="weight-only kernels used here run on the CPU"):
        quantize(model, "int8")


def _trainer(precision: str, out_dir=None, seed: int = 0, steps: int = 30, dropout: float = 0.0) -> Trainer:
    torch.manual_seed(seed)
    model = build_model("llama-tiny", dropout=dropout)
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=3, precision=precision, device=DEVICE.type,
                         **{**QUIET, "ckpt_every": 0 if out_dir is None else 3})  # fmt: skip
    return Trainer(model, config, LMSource(batch_size=8, seq_len=32), out_dir=out_dir)


def test_auto_trains_in_bf16_on_a_gpu_with_bf16_and_tracks_fp32():
    """precision=auto on the GPU says bf16 and why; 30 steps of llama-tiny in bf16 stay within 0.05 nats of fp32
    at every step and end within 2%; master weights and AdamW's moments stay fp32 on the GPU."""
    choice = choose_precision("auto", DEVICE)
    if DEVICE.type == "cuda":
        assert choice.name == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
        assert choice.reason in ("this GPU computes bf16", "this GPU has no bf16")
    curves = {}
    for precision in ("fp32", "bf16"):
        trainer = _trainer(precision)
        stream = trainer._stream()
        curves[precision] = [trainer.train_step(stream)["loss"] for _ in range(30)]
        assert all(p.device.type == DEVICE.type and p.dtype == torch.float32 for p in trainer.model.parameters())
    fp32, bf16 = curves["fp32"], curves["bf16"]
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(gaps) <= 0.05, [round(x, 4) for x in gaps]
    assert abs(bf16[-1] - fp32[-1]) <= 0.02 * fp32[-1] and bf16[-1] < bf16[0] - 0.5
    states = trainer.optimizer.state.values()
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg"].device.type == DEVICE.type for s in states)
    auto = _trainer("auto", steps=4)
    auto.fit()
    assert auto.log.messages[0].startswith(f"precision=auto: training in {choice.name} ({choice.reason})")


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_on_the_gpu_is_bit_identical(tmp_path, deterministic, precision):
    """Dropout on: 3 steps, a checkpoint, a fresh process-like trainer resuming to 6 == 6 straight steps, every
    weight and Adam moment to the bit (the GPU's RNG state is in the checkpoint)."""
    straight = _trainer(precision, tmp_path / "straight", steps=6, dropout=0.1)
    straight.fit()
    first = _trainer(precision, tmp_path / "split", steps=6, dropout=0.1)
    assert first.fit(until=3).step == 3 and latest_checkpoint(tmp_path / "split" / "checkpoints") is not None
    second = _trainer(precision, tmp_path / "split", seed=123, steps=6, dropout=0.1)
    assert second.fit(resume=True).step == 6
    for (name, a), b in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        assert a.device.type == DEVICE.type and torch.equal(a, b), name
    for a, b in zip(straight.optimizer.state.values(), second.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_reranking_on_the_gpu_equals_the_cpu():
    """The search engine's cross-encoder on the GPU (``Reranker(device=...)``): fp32 scores as the CPU's (1e-5);
    ``precision=auto`` takes bf16 where the GPU computes it, its scores within bf16 rounding of fp32."""
    sys.path.insert(0, str(Path(__file__).parent / "search"))
    from test_rerank import DOCS, make_folder

    from archlab.search.rerank import Reranker

    folder = make_folder(Path(tempfile.mkdtemp(prefix="archlab-ce-")) / "tiny")
    query = "read a file"  # the pairs tests/search/test_rerank.py bounds bf16's rounding on
    want = Reranker.load(folder).logits(query, DOCS)
    on_gpu = Reranker.load(folder, device=DEVICE)
    assert next(on_gpu.model.parameters()).device.type == DEVICE.type
    torch.testing.assert_close(on_gpu.logits(query, DOCS).cpu(), want, rtol=0, atol=1e-5)
    auto = Reranker.load(folder, device=DEVICE, precision="auto")
    assert auto.precision == choose_precision("auto", DEVICE).name
    torch.testing.assert_close(auto.logits(query, DOCS).cpu(), want, atol=0.05 * float(want.abs().max()) + 0.02, rtol=0)
