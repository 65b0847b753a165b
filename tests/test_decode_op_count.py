"""A decoding step's op count: at one row, a layer's cost is the number of ops it dispatches, not their arithmetic
(issue 14's profile of SmolLM2-135M: 1,254-1,738 aten calls a token before, most of a quantized step's time).

Counted with torch.profiler (top-level aten calls, deterministic) on one cached step of a Llama, per layer: the
difference between 4 and 2 layers, halved, so the embedding, the LM head and the sampling loop drop out. The
pinned counts are those measured when the step was cut: fp32 42 -> 28 a layer; weight-only quantized 58 -> 44 (its
4 kernels take 2-D bf16 input: a reshape and a cast each way around each; computing whole blocks in bfloat16 made
it 38 but decoded slower, see archlab.quant), int8 then 48 (its product as nibbles through the int4 kernel takes
[x, x]: one cat each, cheaper than the int8 kernel's time it saves, see archlab.quant.Int8Linear; AVX2 kernels keep
the int8 kernel: 44; on archlab's int4 kernel, AVX512-BF16, since 2026-12-06: 44, the op doubles x itself);
int8-dynamic 54 -> 32 (fbgemm takes [..., K] float32 as it is) -> 29 smoothed (SmoothQuant's 1/s folded into the
weights before q/k/v, gate/up and down; grouped-query attention's output projection still divides its input: 28
unsmoothed). A change of a layer's op
count fails here and must say why in the pinned count.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from archlab.hardware import kernel_capability
from archlab.models.llama import Llama, LlamaConfig
from archlab.nn.attention import _last_position
from archlab.quant import int4_kernel, quantize

#: aten calls per layer of one decoding step: fp32 and each quantized layer kind (see the module docstring)
#: int8's product as nibbles through PyTorch's int4 kernel takes [x, x] (one cat); archlab's kernel doubles x itself
ATEN_NIBBLES = kernel_capability() == "AVX512" and int4_kernel(64)[0] != "archlab"
PER_LAYER = {"fp32": 28, "int8": 48 if ATEN_NIBBLES else 44, "int4": 44, "int8-dynamic": 28,
             "int8-dynamic smoothed": 29}


def step_ops(n_layers: int, mode: str) -> collections.Counter:
    _last_position.cache_clear()  # each count from the same state of the per-length memo, whatever ran before
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=256, max_len=128, d_model=64, n_heads=4, n_kv_heads=2, n_layers=n_layers,
                              d_ff=192, rope_theta=10000.0)).eval()  # fmt: skip
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    if mode != "fp32":
        kind = mode.removesuffix(" smoothed")
        quantize(model, kind, head=kind, calibration=prompt if mode.endswith("smoothed") else None)
    with torch.inference_mode():
        cache = model.new_cache()
        model(prompt, cache=cache, logits_to_keep=1)
        model(prompt[:, -1:], cache=cache, logits_to_keep=1)  # warm: RoPE's rows, the cache's storage
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(prompt[:, -1:], cache=cache, logits_to_keep=1)
    return collections.Counter(e.name for e in prof.events() if e.cpu_parent is None)


@pytest.mark.parametrize("mode", list(PER_LAYER))
def test_decoding_step_ops_per_layer(mode):
    two, four = step_ops(2, mode), step_ops(4, mode)
    per_layer = {name: (four[name] - two[name]) / 2 for name in four if four[name] != two[name]}
    assert sum(per_layer.values()) == PER_LAYER[mode], per_layer
    assert "aten::dropout" not in four  # eval mode: no dropout op
    if mode.startswith("int8-dynamic"):
        assert "aten::to" not in per_layer  # float32 in and out: no cast
        # RoPE's 2 and SwiGLU's; smoothed, out_proj's x / s (grouped-query heads): the other 1/s are folded
        assert per_layer["aten::mul"] == (4 if mode.endswith("smoothed") else 3)
    elif mode != "fp32":
        assert per_layer["aten::to"] == 8  # into bfloat16 and back around each of the 4 weight-only kernels
        nibbles = mode == "int8" and ATEN_NIBBLES  # [x, x] per kernel (archlab.quant.Int8Linear)
        assert per_layer.get("aten::cat", 0) == (4 if nibbles else 0)
