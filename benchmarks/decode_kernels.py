"""One-row (``M = 1``) weight products at SmolLM2-135M's shapes: archlab's weight-only kernels against integer-activation ones.

A decoding step multiplies one row ``x [1, K]`` by every weight ``W [N, K]``. archlab's int4 and int8 modes keep
``x`` in bfloat16 and dequantize the weights inside PyTorch's kernels (:mod:`archlab.quant`); llama.cpp instead
rounds ``x`` to 8 bits and multiplies integers (VNNI). This script times, in one process, interleaved, best of
``--rounds`` sweeps, every kernel that PyTorch 2.13 (and torchao, if installed) offers for that, on the fused
shapes archlab's Llama step calls (q/k/v 960 x 576, out 576 x 576, gate/up 3072 x 576, down 576 x 1536, the
tied head 49,152 x 576):

* ``fp32``: ``F.linear`` (for scale);
* ``int4 g32``, ``int8 nibbles``, ``int8 pack``: archlab's weight-only layers (bf16 ``x``) on PyTorch's kernels:
  the int4 kernel (``_weight_int4pack_mm_for_cpu``), int8 as nibbles through it, ``_weight_int8pack_mm``;
* ``archlab int4``, ``archlab int8``: the int4 layer and the int8 one's nibbles on archlab's own kernel
  (:mod:`archlab.kernels`, the same weights and bf16 ``x``; its AVX512-BF16 variant where the CPU has it, else the
  AVX2 one), left out where it cannot be built;
* ``archlab q8_0``, ``archlab q4_1``: llama.cpp's Q8_0 x Q8_0 and Q4_1 x Q8 products on archlab's integer kernels
  (:class:`archlab.quant.Q8Linear`, :class:`archlab.quant.Q4Linear`; ``x`` float32, rounded to int8 per 32 values
  inside the call), left out where the kernels cannot be built;
* ``fbgemm dyn``: archlab's ``int8-dynamic`` layer (``quantized::linear_dynamic``, fp32 ``x``, the row rounded
  inside the call);
* ``oneDNN qlinear``: ``onednn::qlinear_pointwise.tensor`` (what x86 inductor quantization lowers an int8 linear
  to): ``x`` already rounded to uint8 (u8 x s8 -> fp32); the rounding's own ops are timed apart (``row quant``);
* ``_int_mm``: ``torch._int_mm`` (s8 x s8 -> s32; torchao's int8 x int8 linear on CPU calls it), ``x`` already
  rounded;
* ``dyn4``: ``aten::_dyn_quant_matmul_4bit`` (int8 activations x int4 weights; KleidiAI on Arm, a float fallback
  elsewhere);
* ``torchao da8w8``: ``Int8DynamicActivationInt8WeightConfig`` applied to an ``nn.Linear`` (eager), if torchao imports.

Each kernel cycles through ``--copies`` distinct weights of a shape (a step reads 30 layers', so a block weight
comes from memory, not from the caches; the head gets 2 copies). Times are microseconds per call. A second
table gives the two int4 kernels' GB/s (packed nibbles + scales and zeros per call / time) beside the streaming
read bound (the best sum over a 256 MB tensor, ``decode_llama.streaming_bandwidth``).

    python benchmarks/decode_kernels.py --threads 2 --rounds 30
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, setup, table  # noqa: E402
from decode_llama import streaming_bandwidth  # noqa: E402

from archlab.quant import (  # noqa: E402
    DynamicInt8Linear,
    Int8Linear,
    Q4Linear,
    Q8Linear,
    int4_kernel_choice,
    quantize_int4,
    quantize_int8,
    quantize_q8_0,
    quantized_linear,
)

#: the fused [N, K] products of archlab's SmolLM2 step (q/k/v, out, gate/up, down, head)
SHAPES = {"in_proj": (960, 576), "out_proj": (576, 576), "w_in": (3072, 576), "w2": (576, 1536), "head": (49152, 576)}


def row_quant_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [1, K]`` float -> uint8 levels, scale, zero point (asymmetric, 8 bits, the row's own range)."""
    lo, hi = x.amin().clamp(max=0), x.amax().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zp = torch.round(-lo / scale)
    return torch.clamp(torch.round(x / scale) + zp, 0, 255).to(torch.uint8), scale.reshape(1), zp.to(torch.int32).reshape(1)


def row_quant_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [1, K]`` -> int8 levels in [-127, 127] and the scale (symmetric)."""
    scale = (x.abs().amax() / 127).clamp(min=1e-12)
    return torch.round(x / scale).to(torch.int8), scale


def candidates(n: int, k: int, copies: int) -> tuple[dict[str, Callable[[int], object]], torch.Tensor, torch.Tensor]:
    """Kernel name -> a call on copy ``i`` (its input prepared outside the timing); and the row ``x [1, K]`` and
    first weight ``W [N, K]`` they multiply."""
    weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k)
    xb = x.bfloat16()
    out: dict[str, Callable[[int], object]] = {}
    out["fp32"] = lambda i: F.linear(x, weights[i])
    int4 = int4_layers(weights, "aten")
    out["int4 g32"] = lambda i: int4[i]._product(xb, False)
    own = int4_layers(weights, "archlab")
    if own[0].kernel == "archlab":
        out["archlab int4"] = lambda i: own[i]._product(xb, False)
    for kernel, name in (("aten", "int8 nibbles"), ("archlab", "archlab int8")):
        with int4_kernel_choice(kernel):
            int8 = [Int8Linear(quantize_int8(w)).to(torch.bfloat16) for w in weights]
        if int8[0].kernel == kernel:
            out[name] = functools.partial(lambda layers, i: layers[i]._product(xb, False), int8)
    rounded = {"archlab q8_0": [Q8Linear(quantize_q8_0(w)) for w in weights],
               "archlab q4_1": [Q4Linear(quantize_int4(w, 32)) for w in weights]}
    for name, layers in rounded.items():  # x rounded per 32 inside the call (fp32 x: what the q4_1 model feeds)
        if layers[0]._isa:
            out[name] = functools.partial(lambda layers, i: layers[i]._product(x, False), layers)
    q8 = [quantize_int8(w) for w in weights]
    qs = [(q.q, q.scale.bfloat16()) for q in q8]
    out["int8 pack"] = lambda i: torch.ops.aten._weight_int8pack_mm(xb, *qs[i])
    dyn = [DynamicInt8Linear(q) for q in q8]
    out["fbgemm dyn"] = lambda i: dyn[i](x)
    xq, xs, xz = row_quant_u8(x)
    packed = [torch.ops.onednn.qlinear_prepack(q.q, [1, k]) for q in q8]
    wz = torch.zeros(n, dtype=torch.int32)
    out["oneDNN qlinear"] = lambda i: torch.ops.onednn.qlinear_pointwise.tensor(
        xq, xs, xz, packed[i], q8[i].scale, wz, None, 1.0, 0, torch.float32, "none", [], "")
    out["row quant"] = lambda i: row_quant_u8(x)
    xs8, _ = row_quant_s8(x)
    qt = [q.q.t().contiguous() for q in q8]  # [K, N]
    try:
        torch._int_mm(xs8, qt[0])
        out["_int_mm"] = lambda i: torch._int_mm(xs8, qt[i])
    except RuntimeError as e:
        print(f"_int_mm [1, {k}] x [{k}, {n}]: {str(e).splitlines()[0]}")
    try:
        dq = [_dyn4_pack(w) for w in weights]
        out["dyn4"] = lambda i: torch.ops.aten._dyn_quant_matmul_4bit(x, dq[i], 32, k, n)
    except RuntimeError as e:
        print(f"_dyn_quant_matmul_4bit: {str(e).splitlines()[0]}")
    ao = torchao_da8w8(weights)
    if ao is not None:
        out["torchao da8w8"] = lambda i: ao[i](x)
    return out, x, weights[0]


def int4_layers(weights: list[torch.Tensor], kernel: str) -> list:
    """int4 layers (groups of 32, bf16) on ``kernel`` (``archlab`` / ``aten``: :func:`archlab.quant.int4_kernel_choice`);
    a layer's ``.kernel`` says which it got (``aten`` where archlab's cannot be built)."""
    with int4_kernel_choice(kernel):
        return [quantized_linear(w, None, "int4", 32, torch.bfloat16) for w in weights]


def int4_bytes(n: int, k: int, group: int = 32) -> int:
    """Bytes an int4 product reads per call: ``N K / 2`` of nibbles and ``2 N K / g`` bf16 scales and zeros."""
    return n * k // 2 + 2 * 2 * n * (k // group)


def relative_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """``||y - x W^T|| / ||x W^T||``, the product in float64 (``y`` int32 from ``_int_mm``: its scales applied)."""
    ref = x.double() @ w.double().T
    if y.dtype == torch.int32:  # _int_mm: levels; undo both symmetric scales
        q = quantize_int8(w)
        _, xs = row_quant_s8(x)
        y = y.double() * xs.double() * q.scale.double()
    return ((y.double() - ref).norm() / ref.norm()).item()


def _dyn4_pack(w: torch.Tensor) -> torch.Tensor:
    """``W [N, K]`` as ``_dyn_quant_pack_4bit_weight``'s input: symmetric int4 per group of 32 (bf16 scales)."""
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    scale = (g.abs().amax(-1) / 7).clamp(min=1e-12)
    q = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
    nib = (q[:, 1::2] << 4 | q[:, ::2]).contiguous()
    return torch.ops.aten._dyn_quant_pack_4bit_weight(nib, scale.bfloat16(), None, 32, k, n)


@functools.cache
def _torchao():
    """torchao's int8 x int8 config and ``quantize_``, or None, said once per run, without torchao."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        print(f"torchao left out: {e}")
        return None
    return Int8DynamicActivationInt8WeightConfig, quantize_


def torchao_da8w8(weights: list[torch.Tensor]) -> list[torch.nn.Module] | None:
    """torchao's int8 x int8 dynamic linear on each weight, or None (said why) without torchao."""
    api = _torchao()
    if api is None:
        return None
    Int8DynamicActivationInt8WeightConfig, quantize_ = api
    layers = []
    for w in weights:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data.copy_(w)
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        layers.append(layer)
    return layers


@torch.inference_mode()
def best_times(calls: dict[str, Callable[[int], object]], copies: int, rounds: int) -> dict[str, float]:
    """Each kernel's best single call (seconds) over ``rounds`` sweeps through the copies, kernels interleaved
    sweep by sweep. The best call, not a sweep's mean: on a shared machine a sweep of 2-thread calls nearly
    always meets a descheduled thread (a wait of a whole time slice), a single call often does not."""
    best = dict.fromkeys(calls, float("inf"))
    for name, call in calls.items():  # warm every kernel once
        for i in range(copies):
            call(i)
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(copies):
                start = time.perf_counter()
                call(i)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=30, help="distinct weights per block shape (the head: 2)")
    args = parser.parse_args()
    print(setup(args.threads))
    rows, names, rates = [], None, []
    for shape_name, (n, k) in SHAPES.items():
        copies = 2 if shape_name == "head" else args.copies
        calls, x_ref, w_ref = candidates(n, k, copies)
        errors = {name: relative_error(call(0), x_ref, w_ref) for name, call in calls.items() if name != "row quant"}
        print(f"{shape_name}: relative error against x W^T in float64: "
              + ", ".join(f"{name} {e:.1e}" for name, e in errors.items()))  # fmt: skip
        times = best_times(calls, copies, args.rounds)
        names = names or list(times)
        rows.append([f"{shape_name} {n} x {k}"] + [f"{times.get(c, float('nan')) * 1e6:,.1f}" for c in names])
        print(rows[-1], flush=True)
        mb = int4_bytes(n, k)
        rates.append([f"{shape_name} {n} x {k}", f"{mb / 1e6:.3f}"]
                     + [f"{mb / times[c] / 1e9:.1f}" if c in times else "-" for c in ("int4 g32", "archlab int4")])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nM = 1, microseconds, the best call of {args.rounds} interleaved sweeps, {args.threads} threads "
          f"(load average now {load}: other jobs on the machine slow every kernel)")
    print(table(rows, ["W [N x K]", *names]))
    bound = streaming_bandwidth() / 1e9
    print(f"\nthe int4 kernels' read rate, GB/s (streaming read bound now: {bound:.1f} GB/s, {args.threads} threads; "
          f"load average {load})")
    print(table(rates, ["W [N x K]", "MB read", "int4 g32 (aten)", "archlab int4"]))


if __name__ == "__main__":
    main()
