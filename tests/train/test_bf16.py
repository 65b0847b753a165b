"""precision="auto" chosen from the machine (detection patched to each CPU kind), and the bf16 training path:
fp32 master weights and AdamW, weights cast to bf16 once per step, the fused LM-head loss in bf16 with fp32
softmax sums, loss curves that track fp32. On an AVX2 CPU bf16 is emulated: slow but exact enough for a tiny run."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from train_fakes import LMSource

from archlab import hardware
from archlab.errors import ConfigError
from archlab.models.registry import build_model
from archlab.nn.loss import linear_cross_entropy
from archlab.precision import choose_precision
from archlab.train import TrainConfig, Trainer
from archlab.train.mixed import compute_weights

QUIET = dict(progress=False, tensorboard=False, eval_every=0, ckpt_every=0)

AMX = {"amx": True, "avx512_bf16": True, "vnni": True}
AVX512_BF16 = {"amx": False, "avx512_bf16": True, "vnni": True}
AVX2 = {"amx": False, "avx512_bf16": False, "vnni": False}


def cpu_kind(monkeypatch, features: dict[str, bool], kernels: str) -> None:
    """Make archlab.hardware see another CPU: its matrix features and the kernels PyTorch runs."""
    monkeypatch.setattr(hardware, "cpu_features", lambda: dict(features))
    monkeypatch.setattr(hardware, "kernel_capability", lambda: kernels)


@pytest.mark.parametrize(
    ("features", "kernels", "name", "reason"),
    [
        (AMX, "AVX512", "bf16", "the CPU has AMX bf16 tiles"),
        (AVX512_BF16, "AVX512", "bf16", "the CPU has AVX512-BF16"),
        (AMX, "AVX2", "fp32", "the CPU kernels are capped at AVX2: bf16 is emulated"),
        (AVX2, "AVX2", "fp32", "the CPU kernels are capped at AVX2: bf16 is emulated"),
        (AVX2, "AVX512", "fp32", "the CPU has neither AMX nor AVX512-BF16: bf16 is emulated"),
    ],
)
def test_auto_picks_bf16_where_the_cpu_computes_it_natively(monkeypatch, features, kernels, name, reason):
    cpu_kind(monkeypatch, features, kernels)
    choice = choose_precision("auto", "cpu")
    assert (choice.name, choice.reason) == (name, reason)
    assert choice.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    assert choice.line("training") == f"precision=auto: training in {name} ({reason})"
    # an explicit precision wins; float64 weights stay float64 under auto
    assert choose_precision("fp32", "cpu").name == "fp32" and choose_precision("bf16", "cpu").name == "bf16"
    kept = choose_precision("auto", "cpu", torch.float64)
    assert kept.name == "float64" and kept.dtype is None and not kept.bf16


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision"):
        choose_precision("fp16", "cpu")


def test_the_trainer_says_which_precision_and_why(monkeypatch):
    config = TrainConfig(steps=1, batch_size=4, **QUIET)
    cpu_kind(monkeypatch, AVX2, "AVX2")
    trainer = Trainer(build_model("gpt-nano"), config, LMSource(batch_size=4))
    trainer.fit()
    assert not trainer.cast_once and trainer.autocast is None
    assert trainer.log.messages == ["precision=auto: training in fp32 (the CPU kernels are capped at AVX2: bf16 is emulated)"]
    cpu_kind(monkeypatch, AMX, "AVX512")
    trainer = Trainer(build_model("gpt-nano"), config, LMSource(batch_size=4))
    trainer.fit()
    assert trainer.cast_once
    assert trainer.log.messages == [
        "precision=auto: training in bf16 (the CPU has AMX bf16 tiles); fp32 master weights and AdamW, "
        "weights cast to bf16 once per step"
    ]


class ParameterCasts(TorchDispatchMode):
    """Counts ``aten._to_copy`` calls whose input is a parameter's storage (a weight cast)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-tiny"])
def test_each_weight_is_cast_once_per_step(preset):
    """2 micro-batches per step and gradient checkpointing (a recomputed forward): still one cast per weight,
    where autocast's per-forward cache casts each matmul weight in every forward and recomputation."""
    config = TrainConfig(steps=2, batch_size=8, grad_accum=2, precision="bf16", grad_checkpointing=True, **QUIET)
    torch.manual_seed(0)
    trainer = Trainer(build_model(preset), config, LMSource(batch_size=4))
    weights = [p for p in trainer.model.parameters() if p.is_floating_point()]
    stream = trainer._stream()
    for step in range(2):
        with ParameterCasts(trainer.model) as casts:
            trainer.train_step(stream)
        assert casts.count == len(weights), step
    # the same step under autocast alone: its cache lasts one forward
    model = trainer.model
    with ParameterCasts(model) as casts:
        for batch in (LMSource(batch_size=4).global_batch(i) for i in range(2)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch["input_ids"], labels=batch["labels"])
            loss.backward()
    assert casts.count > 2 * len(weights) - 2 * sum(p.ndim == 1 for p in weights) - 2  # per forward, recomputations too


def test_compute_weights_swaps_in_bf16_copies_and_puts_the_parameters_back():
    torch.manual_seed(0)
    model = build_model("gpt-nano")  # tied LM head
    names = [n for n, _ in model.named_parameters()]
    ids = torch.randint(0, 256, (2, 8))
    with compute_weights(model) as copies:
        assert model.lm_head.weight is model.tok_emb.weight and model.lm_head.weight.dtype == torch.bfloat16
        assert set(copies) >= set(names) and all(t.dtype == torch.bfloat16 for t in copies.values())
        loss = model(ids, labels=ids)
        loss.backward()
        loss = model(ids, labels=ids)
        loss.backward()  # a second backward through the same casts
    assert loss.dtype == torch.float32  # the fused loss returns its fp32 sum
    assert [n for n, _ in model.named_parameters()] == names and "weight" in model.lm_head._parameters
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("chunk_size", [128, 512])  # dW summed over 3 chunks in fp32; one chunk's bf16 product
def test_the_bf16_fused_loss_sums_in_fp32(chunk_size):
    """bf16 h and W: the error against float64 (on the same bf16 inputs) stays within a small multiple of
    plain PyTorch's bf16 matmul followed by an fp32 cross-entropy, far under an all-bf16 loss's."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 64, generator=g) * 2).bfloat16().requires_grad_()
    w = (torch.randn(1000, 64, generator=g) * 0.2).bfloat16().requires_grad_()
    y = torch.randint(0, 1000, (300,), generator=g)
    y[::7] = -100
    ours = linear_cross_entropy(h, w, y, chunk_size=chunk_size, label_smoothing=0.1)
    ours.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = F.cross_entropy(h64 @ w64.T, y, label_smoothing=0.1)
    exact.backward()
    plain = F.cross_entropy((h.detach() @ w.detach().T).float(), y, label_smoothing=0.1)
    all_bf16 = F.cross_entropy(h.detach() @ w.detach().T, y, label_smoothing=0.1)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - exact.item()) <= 2 * abs(plain.item() - exact.item()) + 1e-5
    assert abs(ours.item() - exact.item()) < abs(all_bf16.item() - exact.item()) or abs(all_bf16.item() - exact.item()) < 1e-4
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    for ours_grad, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        err = (ours_grad.double() - want).norm() / want.norm()
        assert err < 1e-2, float(err)


@pytest.fixture(scope="module")
def curves():
    """30 steps of llama-tiny and gpt-nano in fp32 and in bf16 from the same initial weights and batches."""
    out = {}
    for preset in ("llama-tiny", "gpt-nano"):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            config = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup=3, precision=precision, **QUIET)
            trainer = Trainer(build_model(preset), config, LMSource(batch_size=8, seq_len=32))
            stream = trainer._stream()
            losses = [trainer.train_step(stream)["loss"] for _ in range(config.steps)]
            out[preset, precision] = losses, trainer
    return out


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-nano"])
def test_bf16_loss_curve_tracks_fp32(curves, preset):
    """|bf16 - fp32| <= 0.05 nats at every step of a 30-step run and the final loss within 2%; it learned."""
    (fp32, _), (bf16, trainer) = curves[preset, "fp32"], curves[preset, "bf16"]
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    print(preset, "max |bf16 - fp32|", max(gaps), "final", fp32[-1], bf16[-1])
    assert max(gaps) <= 0.05, [round(x, 4) for x in gaps]
    assert abs(bf16[-1] - fp32[-1]) <= 0.02 * fp32[-1]
    assert bf16[-1] < bf16[0] - 0.5  # it trained (the arithmetic sequences are learnable)
    # master weights and AdamW's moments stay fp32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    states = trainer.optimizer.state.values()
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


def test_chat_loader_weights_follow_the_machine(tmp_path, monkeypatch, capsys):
    """auto: bf16 weights where the CPU computes bf16 natively, float32 where emulated; explicit wins; said once."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
    from gguf_files import write_tiny_chat_gguf

    from archlab import precision as precision_module
    from archlab.chat import load_chat_model
    from archlab.generation import generate

    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "_ANNOUNCED", set())
    path = write_tiny_chat_gguf(tmp_path / "tiny.gguf")
    dtypes = {}
    for features, kernels, asked in ((AVX2, "AVX2", "auto"), (AMX, "AVX512", "auto"), (AMX, "AVX512", "fp32"),
                                     (AVX2, "AVX2", "bf16")):  # fmt: skip
        cpu_kind(monkeypatch, features, kernels)
        model, _ = load_chat_model(path, precision=asked)
        dtypes[features is AMX, asked] = {p.dtype for p in model.parameters()}
    assert dtypes == {(False, "auto"): {torch.float32}, (True, "auto"): {torch.bfloat16},
                      (True, "fp32"): {torch.float32}, (False, "bf16"): {torch.bfloat16}}  # fmt: skip
    err = capsys.readouterr().err
    assert "archlab: precision=auto: inference in bf16 (the CPU has AMX bf16 tiles)" in err
    assert "archlab: precision=auto: inference in fp32 (the CPU kernels are capped at AVX2: bf16 is emulated)" in err
    load_chat_model(path, precision="fp32")
    assert capsys.readouterr().err == ""  # said once
    with pytest.raises(ConfigError, match="precision"):
        load_chat_model(path, precision="int3")
    # the bf16 model (last loaded) decodes; its logits point where fp32's do (this random tiny model's logits reach
    # 9.5, where bf16 rounding through 2 layers moves single entries by up to 0.8)
    fp32, _ = load_chat_model(path, precision="fp32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        low, high = model(ids).float().flatten(), fp32(ids).flatten()
    assert torch.isfinite(low).all() and F.cosine_similarity(low, high, dim=0) > 0.99
    assert generate(model, ids, max_new_tokens=4).shape == (1, 8)
