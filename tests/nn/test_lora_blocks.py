"""LoRA on row blocks of fused projections (q/k/v of attention's in_proj, gate/up of a SwiGLU's w_in), by name."""

from __future__ import annotations

import pytest
import torch

from archlab.errors import CheckpointError, ConfigError
from archlab.interop.io import load_model, save_model
from archlab.interop.lora import load_lora, save_lora
from archlab.models.gpt import GPT
from archlab.models.llama import Llama, LlamaConfig
from archlab.models.registry import get_config
from archlab.nn.lora import LoRALinear, apply_lora, lora_layers, lora_report, merge_lora, unmerge_lora

CONFIG = LlamaConfig(vocab_size=50, max_len=32, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, d_ff=24)
D_K = 8
ROWS = {"q": (0, 32), "k": (32, 48), "v": (48, 64), "gate": (0, 24), "up": (24, 48)}


def llama(dtype=torch.float64) -> Llama:
    torch.manual_seed(0)
    return Llama(CONFIG).to(dtype)


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype))


def test_a_block_adapter_is_the_lora_equation_on_its_rows_only():
    base = torch.nn.Linear(6, 10, dtype=torch.float64)
    layer = LoRALinear(base, r=2, alpha=4.0, blocks={"v": (7, 10), "q": (0, 4)})
    assert list(layer.blocks) == ["q", "v"] and layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (7, 2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    a_q, a_v, b_q, b_v = layer.lora_A[:2], layer.lora_A[2:], layer.lora_B[:4], layer.lora_B[4:]
    want = base(x)
    want[..., 0:4] += 2.0 * x @ (b_q @ a_q).T
    want[..., 7:10] += 2.0 * x @ (b_v @ a_v).T
    torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.weight, base.weight + layer.delta_weight(), atol=0, rtol=0)
    assert torch.equal(layer.delta_weight()[4:7], torch.zeros(3, 6, dtype=torch.float64))
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=0)


def test_llama_names_adapt_their_row_blocks():
    model = apply_lora(llama(), ["q", "v", "up", "down", "o"], r=2)
    layers = lora_layers(model)
    assert set(layers) == {f"decoder.blocks.{i}.{m}" for i in range(2) for m in ("attn.in_proj", "attn.out_proj",
                                                                                 "ffn.w_in", "ffn.w2")}  # fmt: skip
    assert layers["decoder.blocks.0.attn.in_proj"].blocks == {"q": ROWS["q"], "v": ROWS["v"]}
    assert layers["decoder.blocks.1.ffn.w_in"].blocks == {"up": ROWS["up"]}
    assert layers["decoder.blocks.0.attn.out_proj"].blocks is None
    # same as the explicit GLOB:BLOCK form
    explicit = apply_lora(llama(), ["*.attn.in_proj:q", "*.attn.in_proj:v"], r=2)
    assert lora_layers(explicit)["decoder.blocks.1.attn.in_proj"].blocks == {"q": ROWS["q"], "v": ROWS["v"]}
    report = lora_report(apply_lora(llama(), ["q", "v"], r=2))
    assert report.trainable == 2 * (2 * 2 * 32 + 2 * (32 + 16))  # per layer: A [2 r, d] and B [(A + G) d_k, r]


def test_one_training_step_changes_only_the_named_blocks():
    model = apply_lora(llama(), ["q", "v", "gate"], r=2)
    randomize_b(model)  # (B = 0 would leave A without a gradient)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    effective = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    for name, value in model.state_dict().items():
        if not name.endswith(("lora_A", "lora_B")):
            assert torch.equal(value, before[name]), name  # every base weight as it was
        else:
            assert not torch.equal(value, before[name]), name
    for name, m in lora_layers(model).items():
        moved = (m.weight.detach() - effective[name]).abs().amax(dim=1)  # [d_out]: how far each row moved
        for block, (start, stop) in ROWS.items():
            if block in ("q", "v", "gate") and name.endswith(("in_proj", "w_in")) and block in m.blocks:
                assert (moved[start:stop] > 0).all(), (name, block)
            elif name.endswith("in_proj" if block in "qkv" else "w_in"):
                assert torch.equal(moved[start:stop], torch.zeros(stop - start, dtype=moved.dtype)), (name, block)


def test_adapted_models_save_and_load_with_their_blocks(tmp_path):
    model = apply_lora(llama(torch.float32), ["q", "v", "down"], r=2)
    randomize_b(model)
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(4))
    want = model(ids)
    save_model(model, tmp_path / "full")  # the whole adapted model: load_model adapts the model it builds
    again = load_model(tmp_path / "full")
    assert {n: m.blocks for n, m in lora_layers(again).items()} == {n: m.blocks for n, m in lora_layers(model).items()}
    assert torch.equal(again(ids), want)
    save_lora(model, tmp_path / "adapters")  # the adapters alone, onto a plain model
    other = load_lora(llama(torch.float32), tmp_path / "adapters")
    assert torch.equal(other(ids), want)
    with pytest.raises(CheckpointError, match="row blocks"):
        load_lora(apply_lora(llama(torch.float32), ["q", "k", "down"], r=2), tmp_path / "adapters")
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=0)
    unmerge_lora(model)


def test_bad_targets_are_named():
    with pytest.raises(ConfigError, match=r"unknown row block 'x'.*known: k, q, v"):
        apply_lora(llama(), ["*.in_proj:x"])
    with pytest.raises(ConfigError, match=r"'decoder.blocks.0.ffn.w2' is not a fused projection"):
        apply_lora(llama(), ["*.ffn.w2:q"])
    with pytest.raises(ConfigError, match="both whole and by row block"):
        apply_lora(llama(), ["*.attn.in_proj", "q"])
    with pytest.raises(ConfigError, match=r"matches no nn.Linear.*Llama's names \(q, k, v, o, gate, up, down\)"):
        apply_lora(llama(), ["q_proj"])
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        apply_lora(apply_lora(llama(), ["q"]), ["v"])
    with pytest.raises(ConfigError, match="overlap"):
        LoRALinear(torch.nn.Linear(4, 8), r=1, blocks={"a": (0, 5), "b": (4, 8)})
    gpt = GPT(get_config("gpt-nano"))  # a GPT has the attention names, and its FFN is not gated
    assert lora_layers(apply_lora(gpt, ["q", "v"]))["decoder.blocks.0.attn.in_proj"].blocks.keys() == {"q", "v"}
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        apply_lora(GPT(get_config("gpt-nano")), ["gate"])
