r"""Quantized linear layers for inference on PyTorch's CPU kernels: weight-only int8 and int4, and dynamic int8.

A decoding step reads every weight once per token, so its speed is the speed at which weights stream from
memory: storing ``W [N, K]`` (``N`` outputs, ``K`` inputs) in 8 or 4 bits reads 4x or ~7x fewer bytes
than float32. The activations stay in floating point ("weight-only"); each product dequantizes on the fly
inside PyTorch's kernels:

* **int8**, one scale per output channel (row ``n``)::

      s_n = max_k |W_nk| / 127        q_nk = round(W_nk / s_n) in [-127, 127]        W_nk ~ q_nk s_n

  ``y = x W^T`` runs through an int4 kernel below, ``q`` carried as two nibbles (:class:`Int8Linear`: archlab's
  kernel where it serves int4, else PyTorch's with AVX-512 kernels; both faster at one row than
  ``torch.ops.aten._weight_int8pack_mm(x [M, K], q [N, K] int8, s [N])``, which serves the rest).
* **int4**, a scale and a zero per group of ``g`` consecutive inputs of a row (``g`` in 32, 64, 128, 256)::

      s = (max - min) / 15      z = min + 8 s      q = round((W - min) / s) in [0, 15]      W ~ (q - 8) s + z

  over each group; PyTorch's kernel's packed form is ``_convert_weight_to_int4pack_for_cpu(q [N, K] int32)`` and
  ``_weight_int4pack_mm_for_cpu(x, packed, g, sz)`` with ``sz [K/g, N, 2]`` = (scale, zero). It needs ``N``
  divisible by 16 and ``K`` by ``g``. Where the CPU has AVX512-BF16 (kernels not capped) and ``K`` is a multiple
  of 64, an :class:`Int4Linear` uses archlab's own kernel instead (:mod:`archlab.kernels`, :func:`int4_kernel`;
  faster at one row on SmolLM2's block shapes) for products of 1-16 rows, on a second copy of the levels in its own
  layout, and multiplies more rows (a prompt's) by the weights dequantized to bfloat16. GGUF's Q4_1 blocks
  (``w = d q + m`` per 32 values) are this form with ``s = d``, ``z = m + 8 d``; Q4_0 (``w = d (q - 8)``) with
  ``z = 0``: :mod:`archlab.interop.gguf` loads them without a float round trip.

:func:`quantize` replaces a model's ``nn.Linear`` layers in place and returns a :class:`QuantReport`: every
layer, quantized or left float (and why), its shape and bytes. A quantized model saves and loads as any
(:func:`archlab.interop.io.save_model`: the layers' integers and scales, :func:`quantized_state`; ``archlab convert
--quantize``), packed again for the CPU that loads it (:func:`restore_quantized`). **Tied LM head.** A decoder whose ``lm_head``
shares its matrix with the token embedding gets a quantized *copy* for the output projection (``head=``, int8 by
default, as llama.cpp's Q4 files keep that matrix in 8 bits); the embedding lookup keeps the float matrix (a
lookup reads ``N`` rows, not the whole matrix), so memory grows by the copy while each step reads 4x less.

**Activations in bfloat16.** The kernels take activations, scales and zeros in one dtype and return it;
they are fast with bfloat16 only (on both CPU kinds: float32 activations make them several times slower
than the float32 product itself), so :func:`quantize` builds layers that compute in bfloat16 by default
(``compute="float32"``: the exact equation, for checking). A layer casts its input to bfloat16 and its output
back to the input's dtype, so the rest of the model keeps its dtype. (Computing a whole block in bfloat16, one
cast per sub-layer instead of two per product, cut SmolLM2's calls from 44 to 38 a layer but decoded 4-8%
slower, idle, 1 and 2 threads: bfloat16 RoPE, attention and residual adds cost more than the casts saved.)
Measured for a ``3072 x 576`` layer (CPU time, one thread): one row 1.1-2x
faster than the float32 product; 41 or 256 rows (a prompt) ~2x slower than it.

**Dynamic int8** (``mode="int8-dynamic"``, :class:`DynamicInt8Linear`): int8 weights per output channel *and*
the activations rounded to 8 bits per call, one affine scale per row (token) of ``x``, through fbgemm's int8 GEMM
(``torch.ops.quantized.linear_dynamic``; VNNI/AMX where the CPU has them): the fastest of these kernels on CPU for
one row (a decoding step) and for many (prefill, encoders). On x86 torch rounds activations to 7 bits (levels
0..127: the AVX2 kernel's 16-bit pair sums would saturate with 8). Where its quality goes (SmolLM2-135M, 6
docstring windows, per-channel int8 weights everywhere; the first, second and fourth rows simulate the rounding in
float, the third is these kernels; README "Speed"):

    one scale for the whole [B N, K] input (torch.ao's Linear on a teacher-forced window)   +341% perplexity
    one scale per row (token), as a decoding step sees it                                    +11.7%
    one scale per row after smoothing with calibration text (below)                          +2.6%
    (llama.cpp's rule, symmetric 8 bits per block of 32 inputs, for comparison)               +1.3%

Per tensor, a few tokens with large activations (the final norm's output reaches 58 where its median channel is
3.2) set the step for all. Per row, the outlier *channels* remain; **smoothing** (SmoothQuant, Xiao et al. 2022)
moves them into the weights: with ``calibration=`` token ids, each layer's input channel ``k`` gets
``s_k = max|x_k|^a / max_n |W_nk|^(1-a)`` (``a`` = :data:`SMOOTH_ALPHA`, ``max|x_k|`` over the calibration
text run through the float model) and computes ``(x / s) (W diag(s))^T``, the same product before rounding. The
division by ``s`` costs no op where it can be folded into the weights before the layer (:func:`fold_smoothing`:
an RMSNorm's gain, the up rows of SwiGLU, the value rows of attention without grouped-query heads), as in the
blocks of a pre-norm decoder.

**Q8_0** (``mode="q8_0"`` or ``head="q8_0"``, :class:`Q8Linear`): llama.cpp's Q8_0 x Q8_0, int8 weights with a scale
per row and block of 32 inputs and the input rounded to int8 per block of 32 on each call, on archlab's own kernel
(:func:`archlab.kernels.q8_rows`, AVX512-VNNI or AVX2, the same result to the bit). SmolLM2's head in the file is
Q8_0, and :func:`archlab.interop.gguf.load_gguf` reads such a head as stored by default when it quantizes (an
explicit ``head=`` wins); at one row it is about 3x faster than the int8 head.

**Q4_1** (``mode="q4_1"``, :class:`Q4Linear`): llama.cpp's Q4_0 / Q4_1 x Q8, int4 levels with a scale and zero per
row and block of 32 inputs (int4's rule with ``group_size=32``; GGUF's Q4_0 / Q4_1 blocks as stored) times the input
rounded to int8 per 32 as for Q8_0, on archlab's integer kernel (:func:`archlab.kernels.q4_rows`, AVX512-VNNI or
AVX2, the same result to the bit): the 4-bit weights without a float per nibble, which the AVX2 kind's weight-only
int4 lacks (README "Speed").

Quantized layers are for inference: no gradients (a backward through one raises ConfigError), CPU only; their state
dicts hold the kernels' packed layouts, which depend on the CPU, so a quantized model is saved with
:func:`archlab.interop.io.save_model` (the integers and scales, above). A decoder's ``loss(labels=)`` with a
quantized head takes the head's logits (``[B N, V]`` held at once) instead of the fused LM-head loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.errors import ConfigError, ShapeError
from archlab.hardware import kernel_capability
from archlab.kernels import MAX_ROWS, Q8_BLOCK, Q8_TILE, KernelUnavailable
from archlab.nn.blocks import _Block
from archlab.nn.buffers import KeptDtypeBuffers
from archlab.nn.feedforward import GatedFeedForward
from archlab.nn.linear import is_logits_head
from archlab.nn.lora import LoRALinear

MODES = ("int8", "int4", "int8-dynamic", "q8_0", "q4_1")
ROUNDED_INPUT_MODES = ("int8-dynamic", "q8_0", "q4_1")  # the modes whose layers round their input to 8 bits
#: how :func:`quantize` quantizes a decoder's LM head unless told (``head=``). ``q8_0`` (llama.cpp's rule, faster
#: at one row where its kernel runs, README "Speed") is chosen by name here: it rounds the head's input to int8, and
#: it needs the vocabulary a multiple of 16. :func:`archlab.interop.gguf.load_gguf` defaults to ``q8_0`` where the
#: file stores the head in Q8_0 (its values as they are: more accurate than int8 from their floats, and faster).
DEFAULT_HEAD = "int8"
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
INT4_ROWS_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: N divisible by 16
INT8_MAX = 127
INT4_LEVELS = 15
ACTIVATION_LEVELS = 127  # int8-dynamic's activations on x86: 7 bits (q in 0..127)  # q in 0..15; the kernel subtracts 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # weights quantize() reads
# the dtype the kernels compute in (activations, scales, output); bfloat16 is their fast path (below)
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: SmoothQuant's migration strength ``a`` (its paper's default; 0.4, 0.5, 0.6 measured on SmolLM2: +5.4%, +2.6%, +3.3%)
SMOOTH_ALPHA = 0.5
# A Linear whose parent reads its weight directly (not through its forward) cannot be replaced:
# cross-attention slices its in_proj rows (archlab.nn.attention.MultiHeadAttention._project_kv).
_READS_WEIGHT = ("*cross_attn.in_proj",)


# ================================================================================================
# Quantized weights: the integers and their scales, and the equation back to floats
# ================================================================================================


@dataclass
class Int8Weight:
    """``W [N, K] ~ q * scale[:, None]``: ``q`` int8 in ``[-127, 127]``, ``scale [N]`` float32."""

    q: Tensor
    scale: Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``q_nk s_n`` as ``[N, K]`` in ``dtype`` (float64: the exact value of the equation)."""
        return self.q.to(dtype) * self.scale.to(dtype)[:, None]


@dataclass
class Int4Weight:
    """``W[n, k] ~ (q[n, k] - 8) scale[n, k // g] + zero[n, k // g]``: ``q [N, K]`` uint8 in ``0..15``,
    ``scale``, ``zero [N, K/g]`` float32, ``g = group_size``. Rows stack with :meth:`cat` (fused projections)."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - 8) s + z`` as ``[N, K]`` in ``dtype`` (float64: the exact value of the equation)."""
        g = self.group_size
        s = self.scale.to(dtype).repeat_interleave(g, dim=1)
        z = self.zero.to(dtype).repeat_interleave(g, dim=1)
        return (self.q.to(dtype) - 8) * s + z

    def rows(self, index: Tensor) -> Int4Weight:
        """The rows ``index`` (a permutation, e.g. llama.cpp's RoPE order undone)."""
        return Int4Weight(self.q[index], self.scale[index], self.zero[index], self.group_size)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Rows of ``parts`` stacked (W_Q; W_K; W_V -> the fused in_proj)."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ConfigError(f"cannot stack int4 weights of group sizes {sorted(sizes)}")
        return Int4Weight(*(torch.cat([getattr(p, n) for p in parts]) for n in ("q", "scale", "zero")), sizes.pop())


@dataclass
class Q8Weight:
    """``W[n, k] ~ q[n, k] scale[n, k // 32]``: ``q [N, K]`` int8 in ``[-127, 127]``, ``scale [N, K/32]`` float32,
    one per row and block of :data:`Q8_BLOCK` inputs (GGUF's Q8_0 blocks, their float16 ``d`` as float32)."""

    q: Tensor
    scale: Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``q s`` as ``[N, K]`` in ``dtype`` (float64: the exact value of the equation)."""
        return self.q.to(dtype) * self.scale.to(dtype).repeat_interleave(Q8_BLOCK, dim=1)

    def rows(self, index: Tensor) -> Q8Weight:
        """The rows ``index`` (a permutation, e.g. llama.cpp's RoPE order undone)."""
        return Q8Weight(self.q[index], self.scale[index])

    @staticmethod
    def cat(parts: list[Q8Weight]) -> Q8Weight:
        """Rows of ``parts`` stacked (W_Q; W_K; W_V -> the fused in_proj)."""
        return Q8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def quantize_int8(weight: Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of ``weight [N, K]`` (module docstring); an all-zero row gets scale 1."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Weight(q, scale)


@torch.no_grad()
def quantize_q8_0(weight: Tensor) -> Q8Weight:
    """llama.cpp's Q8_0 of ``weight [N, K]``: per block of 32 inputs of a row, ``d = max |W| / 127``,
    ``q = round(W / d)`` (0 where ``d = 0``); ``K`` must be a multiple of 32. A matrix that is Q8_0 already (its
    values ``d q`` with some ``|q| = 127`` in each block) comes back as the same ``q`` and ``d``."""
    n, k = weight.shape
    if k % Q8_BLOCK:
        raise ShapeError(f"Q8_0 needs in_features divisible by {Q8_BLOCK}; got W [{n}, {k}]")
    w = weight.detach().float().reshape(n, k // Q8_BLOCK, Q8_BLOCK)
    d = w.abs().amax(dim=2) / INT8_MAX
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(w / safe[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(n, k)
    return Q8Weight(q, d)


@torch.no_grad()
def quantize_int4(weight: Tensor, group_size: int) -> Int4Weight:
    """Asymmetric int4 of ``weight [N, K]`` over groups of ``group_size`` inputs (min/max per group; GGUF Q4_1's
    rule); a constant group gets scale 0 and zero = its value. ``K`` must be divisible by ``group_size``."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # [N, K/g]
    scale = (hi - lo) / INT4_LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w - lo[..., None]) / safe[..., None]).clamp_(0, INT4_LEVELS).to(torch.uint8).reshape(n, k)
    return Int4Weight(q, scale, lo + 8 * scale, group_size)


def calibration_ids(tokenizer, windows: int = 4, length: int = 128) -> Tensor:
    """``[windows, length]`` token ids for ``quantize(..., calibration=)``: the standard library's Python source
    (training split, 200 kB read), text that ships with the interpreter and is unlike what a model is usually
    asked about. ``tokenizer`` has ``encode(str) -> list[int]``; a text too short for ``windows x length`` ids
    raises :class:`ConfigError`."""
    from archlab.data.corpora import python_source

    if windows < 1 or length < 1:
        raise ConfigError(f"calibration_ids(windows={windows}, length={length}): both must be >= 1")
    ids = tokenizer.encode("\n".join(python_source(max_bytes=200_000).train_texts))
    if len(ids) < windows * length:
        raise ConfigError(f"calibration text gives {len(ids)} tokens; windows x length = {windows * length} asked")
    return torch.tensor(ids[: windows * length]).reshape(windows, length)


# ================================================================================================
# Layers
# ================================================================================================


class _InferenceOnly(torch.autograd.Function):
    """A quantized layer's forward where autograd records (grad enabled, ``x`` requiring grad), whose backward is
    refused: the kernels have no derivative (PyTorch's int4/int8 ones fail deep inside the backward), or one cut
    from ``x`` (Q8_0's: every gradient before the layer would silently be zero)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:
        ctx.layer = f"{type(layer).__name__} ({layer.mode})"
        return layer._forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise ConfigError(
            f"backward through a quantized layer, {ctx.layer}: quantized layers are for inference and compute no "
            "gradients; train the float model (or LoRA adapters on it) and quantize after, and run a quantized "
            "model under torch.no_grad() or torch.inference_mode()"
        )


def _forward_or_refuse_backward(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer._forward(x)``, through :class:`_InferenceOnly` where autograd would record it (no cost otherwise)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _InferenceOnly.apply(x, layer)
    return layer._forward(x)


class _WeightOnlyLinear(nn.Module):
    """``y = x dequant(W)^T + b`` for ``x [..., K]`` -> ``[..., N]``; a subclass runs the kernel on ``x [M, K]``
    (:class:`Q8Linear` too, which rounds ``x`` itself: the shapes, bias and dtypes are handled here for all).
    No gradients: a backward through it raises ConfigError (:class:`_InferenceOnly`).

    ``logits``: the layer is an LM head (:func:`quantize` sets it where it replaces one, a float head made by
    ``Linear(head=True)``): where it computes in bfloat16 or float16 (its scales' dtype, or Q8_0's ``x``) it returns
    float32 logits, as a float head does (:func:`archlab.nn.linear.head_logits`; 8-bit logits tie where the model's
    top two differ by less than their spacing): where archlab's kernel computes the product (Q8_0; int4 at one row)
    the kernel's float32 sums themselves, which rounded give its 16-bit result to the bit; PyTorch's kernels return
    16 bits, widened."""

    mode = ""
    logits = False

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the scales, in which the kernel takes ``x`` and returns ``y`` (``.to(dtype)`` changes it)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., K]`` (any float dtype) -> ``[..., N]`` in ``x``'s dtype, computed in :attr:`compute_dtype`
        (an LM head's, :attr:`logits`, float32 where that is 16 bits)."""
        return _forward_or_refuse_backward(self, x)

    def _forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features or not x.is_floating_point():
            raise ShapeError(f"{type(self).__name__} expects float x [..., {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        # Each call below is an op a decoding step pays for per layer: none is made where x is already right.
        dtype = self._input_dtype(x)
        rows = x if x.ndim == 2 else x.reshape(-1, self.in_features)  # [M, K]
        rows = (rows if rows.dtype == dtype else rows.to(dtype)).contiguous()  # contiguous(): no op if it is
        float_out = self.logits and dtype in (torch.bfloat16, torch.float16)  # an LM head's logits: float32
        y = self._product(rows, float_out)  # [M, N] in dtype, or float32 where the kernel keeps its sums
        y = y.float() if float_out else y  # PyTorch's kernels return 16 bits: widened (float32 stays as it is)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        y = y if x.ndim == 2 else y.view(*x.shape[:-1], self.out_features)
        out = torch.float32 if float_out else x.dtype
        return y if y.dtype == out else y.to(out)

    def _input_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype ``x`` is cast to for the kernel (and ``y`` comes back in): :attr:`compute_dtype`."""
        return self.compute_dtype

    def _product(self, x: Tensor, float_out: bool) -> Tensor:
        """``x [M, K]`` in :meth:`_input_dtype` times the weights: ``[M, N]`` in that dtype; where ``float_out``
        (:attr:`logits`) a kernel that sums in float32 may return those sums instead (the caller widens the rest)."""
        raise NotImplementedError

    def quantized_weight(self):
        """The layer's integers and scales as :func:`quantize` made them (:class:`Int8Weight`, :class:`Int4Weight` or
        :class:`Q8Weight`, the scales in the compute dtype), read back from the kernel's layout: what
        :func:`archlab.interop.io.save_model` stores, since the layouts depend on the CPU."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_WeightOnlyLinear):
    r"""Weight-only int8 layer: ``q [N, K]`` int8 and ``scale [N]``, its product through an int4 kernel as two
    nibbles where the shape and the CPU allow, else through ``_weight_int8pack_mm``.

    **Nibbles.** ``u = q + 128`` in ``0..255`` is ``16 hi + lo`` with ``hi, lo`` in ``0..15``, so
    ``W_nk = s_n q_nk = 16 s_n (hi_nk - 8) + s_n (lo_nk - 8) + 8 s_n``: the int4 form ``(q' - 8) scale + zero``
    (module docstring) of a ``[N, 2K]`` matrix, ``hi`` with scale ``16 s_n`` and zero 0, ``lo`` with scale ``s_n``
    and zero ``8 s_n``, times ``x`` with each input taken twice: the same integers and scales, hence the same
    weights as ``q s`` (``16 s``, ``8 s`` are exact in any float dtype), stored in ``N K`` bytes as ``q``. The
    :attr:`kernel` that multiplies them, as :func:`int4_kernel` chooses for ``K`` (``$ARCHLAB_INT4_KERNEL``):

    * ``archlab``: archlab's int4 kernel (:func:`archlab.kernels.int8_rows`; ``packed [N, K]`` and
      ``scales_and_zeros [N, 2, 2K/64]``, :func:`archlab.kernels.pack_int8`: each 64 inputs' ``hi``, then their
      ``lo``) for 1-16 rows, each row by the same operations whatever the other rows (a speculative verify pass gives
      each position the one-token step's result to the bit, a batch's row its result alone); more rows (a prompt's),
      where its AVX512-BF16 variant runs, multiply the weights ``q s`` dequantized for the call in the compute dtype
      (:func:`archlab.kernels.int8_dequant`: ``q s`` rounded once where ``s`` is bfloat16) on oneDNN's or MKL's
      matmul. One row at 2 threads (AMD EPYC AVX512-BF16, 2026-12-06, ``benchmarks/decode_kernels.py``): SmolLM2's
      four block matrices 1.44x the speed of the ``aten`` nibbles, its 49,152 x 576 head 2.09x; over its 120 block
      matrices 0.93-1.32x at 2-16 rows (docs/speed.md); a 140-token prompt 2.9x.
    * ``aten``: PyTorch's ``_weight_int4pack_mm_for_cpu`` on its own packing of ``[hi | lo]`` (``packed`` and
      ``scales_and_zeros [2K/g, N, 2]``, ``g`` the largest group size dividing ``K``, :func:`int8_as_nibbles`),
      ``x`` as ``[x, x]``, where archlab's kernel does not serve (:func:`nibble_group_size`: ``N`` divisible by 16,
      ``K`` by 32, PyTorch's kernels at AVX-512): at one row it read SmolLM2's layers faster than
      ``_weight_int8pack_mm`` reads ``q`` (in situ, 1 thread, loaded: 1.1-1.4x; its head 2-4x; README "Speed").
    * ``int8``: ``_weight_int8pack_mm`` on ``q`` itself, elsewhere.

    The nibbles' bfloat16 arithmetic on two terms per weight rounds otherwise than the int8 kernel's: SmolLM2's int8
    perplexity on 2,032 docstring tokens +0.99% against +0.83% through PyTorch's kernels (top-1 93.7% against 93.9%;
    ``tests/parity/test_smollm2_quant.py``); on archlab's kernel, whose prompt path rounds ``q s`` to bfloat16,
    +0.53% (93.2%) where PyTorch's nibbles gave +0.87% (93.7%) in the same session (README "Speed").
    """

    mode = "int8"

    def __init__(self, weight: Int8Weight, bias: Tensor | None = None) -> None:
        n, k = weight.q.shape
        super().__init__(k, n, bias)
        self.register_buffer("scale", weight.scale)
        self.kernel, self._isa = int4_kernel(k)
        if self.kernel == "archlab":
            from archlab import kernels

            self.group_size = kernels.INT8_GROUP
            packed, scales_and_zeros = kernels.pack_int8(weight.q, weight.scale)
        else:
            self.group_size = nibble_group_size(n, k)
            if self.group_size is None:
                self.kernel = "int8"
                self.register_buffer("q", weight.q)
                return
            packed, scales_and_zeros = int8_as_nibbles(weight, self.group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(weight.scale.dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def _product(self, x: Tensor, float_out: bool) -> Tensor:
        if self.kernel == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        if self.kernel == "aten":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([x, x], dim=1), self.packed, self.group_size,
                                                              self.scales_and_zeros)  # fmt: skip
        op = torch.ops.archlab_kernels
        if x.shape[0] > MAX_ROWS and self._isa == 513:  # a prompt: the weights q s in x's dtype, for the call
            return F.linear(x, op.int8_dequant(self.packed, self.scale))
        return _in_kernel_rows(lambda r: op.int8_rows(r, self.packed, self.scales_and_zeros, self._isa, float_out), x)

    def quantized_weight(self) -> Int8Weight:
        n, k = self.out_features, self.in_features
        if self.kernel == "int8":
            return Int8Weight(self.q.clone(), self.scale.clone())
        if self.kernel == "archlab":
            from archlab.kernels import INT8_GROUP, unpack_int4

            halves = unpack_int4(self.packed).view(n, k // INT8_GROUP, 2, INT8_GROUP)  # each 64 inputs' hi, then lo
            hi, lo = halves[:, :, 0].reshape(n, k), halves[:, :, 1].reshape(n, k)
        else:
            levels = _aten_int4_levels(self.packed, n, 2 * k, self.group_size)  # [hi | lo]
            hi, lo = levels[:, :k], levels[:, k:]
        q = 16 * hi.to(torch.int16) + lo.to(torch.int16) - 128
        return Int8Weight(q.to(torch.int8), self.scale.clone())

    def extra_repr(self) -> str:
        kernel = {"archlab": "archlab's int4 kernel", "aten": "PyTorch's int4 kernel", "int8": "the int8 kernel"}
        nibbles = "" if self.kernel == "int8" else f" as nibbles, g={self.group_size}"
        return f"{super().extra_repr()}, {kernel[self.kernel]}{nibbles}"


def _in_kernel_rows(product, rows: Tensor) -> Tensor:
    """``product(rows)`` for ``rows [M, K]`` by archlab's few-row kernels, which take at most :data:`MAX_ROWS` rows a
    call: a prompt in calls of 16 rows, stacked (one call, no slice, for a step's few)."""
    if rows.shape[0] <= MAX_ROWS:
        return product(rows)
    return torch.cat([product(rows[i : i + MAX_ROWS]) for i in range(0, rows.shape[0], MAX_ROWS)])


def nibble_group_size(n: int, k: int) -> int | None:
    """The int4 kernel's group size that carries an int8 ``W [N, K]`` as nibbles (:class:`Int8Linear`): the
    largest of :data:`GROUP_SIZES` dividing ``K`` (a group never spans the ``hi`` and ``lo`` halves; the scale is
    one per row, so larger groups only read fewer copies of it). None where the int4 kernel cannot take the shape
    (``N`` not divisible by 16, ``K`` by 32) or where PyTorch's CPU kernels are not AVX-512
    (:func:`archlab.hardware.kernel_capability`): capped at AVX2 the int4 kernel's time grows with ``K`` and the
    nibbles' ``2K`` made SmolLM2's products 1.1-1.6x slower than the int8 kernel (README "Speed")."""
    if n % INT4_ROWS_MULTIPLE or kernel_capability() != "AVX512":
        return None
    return max((g for g in GROUP_SIZES if k % g == 0), default=None)


def int8_as_nibbles(weight: Int8Weight, group_size: int) -> tuple[Tensor, Tensor]:
    """``weight`` (``q [N, K]``, ``scale [N]``) as the int4 kernel's ``packed [N, K]`` bytes of the nibble matrix
    ``[hi | lo] [N, 2K]`` and ``scales_and_zeros [2K/g, N, 2]`` float32 (:class:`Int8Linear`'s equation)."""
    u = weight.q.to(torch.int32) + 128  # [N, K] in 0..255
    nibbles = torch.cat([u // 16, u % 16], dim=1)  # [N, 2K]: hi | lo
    s = weight.scale.float()[:, None].expand(-1, weight.q.shape[1] // group_size)  # [N, K/g]
    scale = torch.cat([16 * s, s], dim=1)  # [N, 2K/g]
    zero = torch.cat([torch.zeros_like(s), 8 * s], dim=1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    return packed, torch.stack([scale.T, zero.T], dim=-1).contiguous()


def _aten_int4_levels(packed: Tensor, n: int, k: int, group_size: int) -> Tensor:
    """The levels ``q [N, K]`` (uint8, 0..15) in PyTorch's int4 packing (``_convert_weight_to_int4pack_for_cpu``'s,
    opaque), read back exactly: its kernel with scale 1 and zero 8, ``(q - 8) 1 + 8 = q``, times ``I_K``."""
    ones = torch.ones(k // group_size, n, 1)
    unit = torch.cat([ones, 8 * ones], dim=-1)  # [K/g, N, 2]: scale 1, zero 8
    levels = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k), packed, group_size, unit)  # [K, N]: q^T
    return levels.T.round().to(torch.uint8)


#: environment variable choosing the product of :class:`Int4Linear` layers built from then on: ``auto`` (default:
#: archlab's kernel where it is the faster, else PyTorch's), ``archlab`` (archlab's wherever it runs), ``aten``
INT4_KERNEL_ENV = "ARCHLAB_INT4_KERNEL"
INT4_KERNELS = ("auto", "archlab", "aten")
_said: set[str] = set()


def int4_kernel(in_features: int) -> tuple[str, int]:
    """The product an :class:`Int4Linear` with ``K = in_features`` uses here: ``("archlab", isa)`` (archlab's C++
    kernel, :mod:`archlab.kernels`, and its variant) or ``("aten", 0)`` (``_weight_int4pack_mm_for_cpu``).

    ``auto`` (``$ARCHLAB_INT4_KERNEL``, default) takes archlab's where its AVX512-BF16 variant runs (PyTorch's
    kernels not capped below AVX-512, the CPU has AVX512-BF16) and ``K`` is a multiple of 64: at one row it was
    the faster on SmolLM2's block shapes (README "Speed"); its AVX2 variant was not, so elsewhere PyTorch's.
    ``archlab`` takes it wherever it runs (the AVX2 variant too). Where it cannot be built (no compiler) a
    warning says so once and PyTorch's kernel serves."""
    from archlab import kernels

    choice = os.environ.get(INT4_KERNEL_ENV, "auto")
    if choice not in INT4_KERNELS:
        raise ConfigError(f"${INT4_KERNEL_ENV}={choice!r} is not an int4 kernel choice; choose one of {INT4_KERNELS}")
    if choice == "aten" or in_features % kernels.BLOCK:
        return "aten", 0
    try:
        isa = kernels.isa(torch.bfloat16)
        if isa != 513 and choice == "auto":
            return "aten", 0
        kernels.load()
    except kernels.KernelUnavailable as e:
        if str(e) not in _said:
            _said.add(str(e))
            warnings.warn(f"{e}; int4 layers use PyTorch's _weight_int4pack_mm_for_cpu instead", stacklevel=2)
        return "aten", 0
    return "archlab", isa


@contextlib.contextmanager
def int4_kernel_choice(kernel: str) -> Iterator[None]:
    """``$ARCHLAB_INT4_KERNEL = kernel`` (one of :data:`INT4_KERNELS`) for the :class:`Int4Linear` layers built
    inside the block (an A/B of the two products); the previous value afterwards."""
    if kernel not in INT4_KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not an int4 kernel choice; choose one of {INT4_KERNELS}")
    before = os.environ.get(INT4_KERNEL_ENV)
    os.environ[INT4_KERNEL_ENV] = kernel
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(INT4_KERNEL_ENV, None)
        else:
            os.environ[INT4_KERNEL_ENV] = before


class Int4Linear(_WeightOnlyLinear):
    """Weight-only int4 layer: PyTorch's ``_weight_int4pack_mm_for_cpu`` on its packed ``[N, K/2]`` bytes and
    ``scales_and_zeros [K/g, N, 2]``, and, where :func:`int4_kernel` chooses archlab's kernel
    (:mod:`archlab.kernels`), a second copy of the same levels in that kernel's layout (``row_packed [N, K/2]``,
    ``row_scales_and_zeros [N, 2, K/g]``, :func:`archlab.kernels.pack_int4`) for products of 1-16 rows: a decoding
    step, a speculative verify pass, a batch's step. That kernel computes each row by the same operations whatever
    the other rows, so a verify pass gives each position the one-token step's result to the bit (speculative greedy
    decoding gives plain greedy's tokens) and a batch's row its result alone; PyTorch's kernel, which served 2-16
    rows until 2026-12-05, rounds one row and several otherwise (2 of the speculative benchmark's 4 int4 replies
    parted from plain greedy's, 5 of its 10 batched rows from their decoding alone). Measured
    (``benchmarks/decode_kernels.py --threads 1``, AMD EPYC AVX512-BF16, near idle): archlab's kernel at one row
    38.6 / 19.8 / 75.5 / 37.8 us on SmolLM2's in_proj / out_proj / gate-up / down against aten's 42.7 / 23.9 / 106.5
    / 55.0; over the 120 block matrices at 2 threads 1.27x aten's speed at 1 row, 1.05x at 2, 0.94x at 3, 1.05x at 9,
    0.97x at 10, 0.81x at 16 (interleaved, in-process): end to end the same speed (README Speed). More rows (a
    prompt's) in bfloat16, where that kernel runs, multiply the weights dequantized to bfloat16 for the call
    (:func:`archlab.kernels.int4_dequant`, 0.2-0.4 ms for SmolLM2's largest block) on oneDNN's matmul: over the 120
    block matrices 1.46x aten's kernel at 64 rows, 1.98x at 140, 2.4x at 1,440 (0.87-1.26x at 17-48); the weights
    rounded to 8 bits there (relative 2^-9) cost SmolLM2's int4 model about 0.1% of perplexity (README Speed).
    Elsewhere PyTorch's kernel takes them. The copy doubles the layer's bytes (a 4-bit model's blocks in about 8
    bits, still half of int8). All compute ``x ((q - 8) s + z)^T`` with float32 sums (the prompt's path on those
    weights rounded to bfloat16)."""

    mode = "int4"

    def __init__(self, weight: Int4Weight, bias: Tensor | None = None) -> None:
        n, k = weight.q.shape
        super().__init__(k, n, bias)
        self.group_size = weight.group_size
        self.kernel, self._isa = int4_kernel(k)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack([weight.scale.T, weight.zero.T], dim=-1).contiguous())
        if self.kernel == "archlab":
            from archlab.kernels import pack_int4

            row_packed, row_scales_and_zeros = pack_int4(weight.q, weight.scale, weight.zero, weight.group_size)
            self.register_buffer("row_packed", row_packed)
            self.register_buffer("row_scales_and_zeros", row_scales_and_zeros)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _product(self, x: Tensor, float_out: bool) -> Tensor:
        if self.kernel == "archlab" and x.shape[0] <= MAX_ROWS:
            op = torch.ops.archlab_kernels.int4_rows
            return op(x, self.row_packed, self.row_scales_and_zeros, self.group_size, self._isa, float_out)
        if self.kernel == "archlab" and self._isa == 513 and x.dtype == torch.bfloat16:  # a prompt: the weights in bf16
            w = torch.ops.archlab_kernels.int4_dequant(self.row_packed, self.row_scales_and_zeros, self.group_size)
            return F.linear(x, w)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def quantized_weight(self) -> Int4Weight:
        if self.kernel == "archlab":
            from archlab.kernels import unpack_int4

            q = unpack_int4(self.row_packed)
        else:
            q = _aten_int4_levels(self.packed, self.out_features, self.in_features, self.group_size)
        sz = self.scales_and_zeros  # [K/g, N, 2]
        return Int4Weight(q, sz[..., 0].T.contiguous(), sz[..., 1].T.contiguous(), self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, kernel={self.kernel}"


class _RoundedInputLinear(KeptDtypeBuffers, _WeightOnlyLinear):
    """A layer on archlab's kernels that round each row of ``x`` to int8 per block of 32 inputs on every call
    (llama.cpp's Q8_0 rule, :func:`archlab.kernels.round_rows_q8`) and multiply integers: :class:`Q8Linear`,
    :class:`Q4Linear`. ``x`` in float32 or bfloat16 goes in as it is (no cast) and ``y`` comes back in its dtype;
    16 rows a call, each rounded as it would be alone, so batching does not change a row. The scales stay float32
    under ``.to(dtype)``. Without the kernel (no compiler, a CPU below AVX2) the layer computes the same equation in
    float32 with PyTorch's ops (slower; a warning says so once)."""

    _float_buffers: tuple[str, ...] = ()  # the kernel's float32 scales

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__(in_features, out_features, None if bias is None else bias.float())
        self._isa = q8_kernel()

    def _kept_dtype_buffers(self) -> tuple[str, ...]:
        """``.to(dtype)`` / ``.bfloat16()`` on the model leave the scales float32, the kernel's (the layer computes
        in ``x``'s dtype, so a bfloat16 model's activations change it, not its scales); device moves apply."""
        return self._float_buffers

    def _input_dtype(self, x: Tensor) -> torch.dtype:
        """``x`` goes in as it is where float32 or bfloat16 (the kernel rounds it to int8 anyway), else as float32."""
        return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32

    def _product(self, rows: Tensor, float_out: bool) -> Tensor:
        if not self._isa:
            return self._float_product(rows, float_out)
        return _in_kernel_rows(lambda r: self._kernel(r, float_out), rows)

    def _kernel(self, rows: Tensor, float_out: bool) -> Tensor:
        """The kernel's product of 1..16 rows."""
        raise NotImplementedError

    def _float_product(self, rows: Tensor, float_out: bool = False) -> Tensor:
        """The equation with PyTorch's ops: ``(p d) dequant(W)^T`` in float32 (the same sum, other rounding),
        returned in ``rows``' dtype (float32 where ``float_out``)."""
        from archlab.kernels import round_rows_q8

        p, d = round_rows_q8(rows)
        x_rounded = p * d.repeat_interleave(Q8_BLOCK, dim=1)
        y = F.linear(x_rounded, self.quantized_weight().dequantize(torch.float32))
        return y if float_out else y.to(rows.dtype)

    def extra_repr(self) -> str:
        kernel = {512: "AVX512-VNNI", 256: "AVX2", 0: "float32 ops"}[self._isa]
        return f"{super().extra_repr()}, kernel={kernel}"


class Q8Linear(_RoundedInputLinear):
    r"""llama.cpp's Q8_0 x Q8_0 product: int8 weights with a scale per row and block of 32 inputs
    (:class:`Q8Weight`), and each row of ``x`` rounded to int8 per block of 32 inputs on every call::

        d_mb = max_{k in b} |x_mk| / 127      p_mk = round(x_mk / d_mb)      y_mn = sum_b s_nb d_mb sum_{k in b} q_nk p_mk

    through archlab's kernel (:func:`archlab.kernels.q8_rows`: exact int32 block sums by AVX512-VNNI
    ``vpdpbusd``, or AVX2 with the same integers, the blocks added in float32 in the same order: one result to
    the bit on both). The weights are read as stored, one byte each (plus a float32 scale per 32: 1.125 bytes a
    weight), and the products are integer: at one row it reads the 49,152 x 576 LM head of SmolLM2 faster than the
    weight-only int8 and int4 kernels (README "Speed"). The rounding of ``x`` costs accuracy that weight-only modes do
    not pay: llama.cpp's rule over every layer of SmolLM2 +1.3% perplexity (module docstring); kept to the head, the
    ``int4`` mode's figures in README "Speed". :class:`_RoundedInputLinear` has the dtypes and the fallback.
    """

    mode = "q8_0"
    _float_buffers = ("scales",)

    def __init__(self, weight: Q8Weight, bias: Tensor | None = None) -> None:
        from archlab import kernels

        n, k = weight.q.shape
        super().__init__(k, n, bias)
        packed, scales = kernels.pack_q8(weight.q, weight.scale)  # checks the shapes (ShapeError)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    def weight(self) -> Q8Weight:
        """The stored ``q`` and ``scale`` (read back from the kernel's layout)."""
        n, k = self.out_features, self.in_features
        q = (self.packed.reshape(n // Q8_TILE, k // 4, Q8_TILE, 4).transpose(1, 2).reshape(n, k).to(torch.int16) - 128)
        return Q8Weight(q.to(torch.int8), self.scales.transpose(1, 2).reshape(n, k // Q8_BLOCK))

    def quantized_weight(self) -> Q8Weight:
        return self.weight()

    def _kernel(self, rows: Tensor, float_out: bool) -> Tensor:
        return torch.ops.archlab_kernels.q8_rows(rows, self.packed, self.scales, self._isa, float_out)


class Q4Linear(_RoundedInputLinear):
    r"""llama.cpp's Q4_0 / Q4_1 x Q8 product (``mode="q4_1"``): 4-bit weights ``q`` in 0..15 with a scale and a zero
    per row and block of 32 inputs (:class:`Int4Weight` in groups of 32, ``w = (q - 8) s + z``; GGUF's Q4_1 blocks
    ``w = d q + m`` are ``s = d, z = m + 8 d``, Q4_0's ``z = 0``), and each row of ``x`` rounded to int8 per block of
    32 as :class:`Q8Linear` rounds it::

        y_mn = sum_b d_mb ( s_nb sum_{k in b} (q_nk - 8) p_mk  +  z_nb sum_{k in b} p_mk )

    through archlab's kernel (:func:`archlab.kernels.q4_rows`: the block sums exact in int32 by AVX512-VNNI
    ``vpdpbusd`` or AVX2 ``vpmaddubsw``, the two terms added in float32 in block order: one result to the bit on
    both). The weights stream at half a byte (plus 8 bytes of scale and zero per 32: 0.75 bytes a weight), and
    unlike the weight-only :class:`Int4Linear` no nibble becomes a float: on the AVX2 kind, whose int4 has no
    bfloat16 kernel, this is the fast 4-bit product (README "Speed"). The rounding of ``x`` costs what Q8_0's costs
    (module docstring). :class:`_RoundedInputLinear` has the dtypes and the fallback."""

    mode = "q4_1"
    group_size = Q8_BLOCK
    _float_buffers = ("scales_and_zeros",)

    def __init__(self, weight: Int4Weight, bias: Tensor | None = None) -> None:
        from archlab import kernels

        if weight.group_size != Q8_BLOCK:
            raise ConfigError(f"q4_1 takes int4 weights in groups of {Q8_BLOCK}, got group_size={weight.group_size}")
        n, k = weight.q.shape
        super().__init__(k, n, bias)
        packed, scales_and_zeros = kernels.pack_q4(weight.q, weight.scale, weight.zero)  # checks shapes (ShapeError)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def quantized_weight(self) -> Int4Weight:
        from archlab.kernels import unpack_q4

        return Int4Weight(*unpack_q4(self.packed, self.scales_and_zeros), Q8_BLOCK)

    def _kernel(self, rows: Tensor, float_out: bool) -> Tensor:
        return torch.ops.archlab_kernels.q4_rows(rows, self.packed, self.scales_and_zeros, self._isa, float_out)


def q8_kernel() -> int:
    """The variant :class:`Q8Linear` layers use here (:func:`archlab.kernels.q8_isa`: 512, 256), or 0 where the
    kernel cannot be built or run (a warning, once: the layers compute the equation with PyTorch's ops)."""
    from archlab import kernels

    try:
        isa = kernels.q8_isa()
        kernels.load()
    except KernelUnavailable as e:
        if str(e) not in _said:
            _said.add(str(e))
            warnings.warn(f"{e}; Q8_0 layers compute with PyTorch's float32 ops instead", stacklevel=2)
        return 0
    return isa


class DynamicInt8Linear(nn.Module):
    r"""``y = Q_row(x / s) (W diag(s))_q^T + b``: int8 weights per output channel and int8 activations, one scale per
    row of ``x``, through fbgemm (``torch.ops.quantized.linear_dynamic``); ``x [..., K]`` float32 -> ``[..., N]``.

    ``W diag(s)`` is stored as :class:`Int8Weight` (``q [N, K]``, ``scale [N]``) inside fbgemm's packed form;
    ``s [K]`` is the smoothing (module docstring; all ones without calibration), the division by it an op of each
    call (``smooth=s``) or none (``smooth=None``, the weight given as ``W diag(s)`` and ``1 / s`` folded into what
    computes ``x``: :func:`fold_smoothing`, as :func:`quantize` does in archlab's blocks). ``Q_row`` rounds each
    row ``x_m`` affinely to 7 bits (torch's x86 rule)::

        t_m = (max(x_m, 0) - min(x_m, 0)) / 127      z_m = round(-min(x_m, 0) / t_m)
        Q_row(x_m) = t_m (clamp(round(x_m / t_m) + z_m, 0, 127) - z_m)

    The kernel takes one range per *call*, so a call with ``M > 1`` rows maps each row onto ``[0, 1]`` first:
    ``x_m = o_m + 127 t_m u_m`` with the offset ``o_m = -z_m t_m`` (a level, so zero stays exact), ``u_m``
    clamped to ``[0, 1]``, and ``x_m W^T = 127 t_m (u_m W^T) + o_m (W 1)``: one kernel call that rounds every
    row as the row alone would be rounded (float rounding of ``u_m`` aside).
    """

    mode = "int8-dynamic"

    def __init__(self, weight: Int8Weight, bias: Tensor | None = None, smooth: Tensor | None = None) -> None:
        super().__init__()
        n, k = weight.q.shape
        self.in_features, self.out_features = k, n
        zeros = torch.zeros(n, dtype=torch.long)
        with _quiet():
            w = torch._make_per_channel_quantized_tensor(weight.q, weight.scale.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(w, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("inv_smooth", None if smooth is None else (1 / smooth.detach().double()).float())
        self.register_buffer("row_sums", weight.dequantize(torch.float64).sum(1).float())  # W_q 1, [N]

    def weight(self) -> Int8Weight:
        """The stored ``W diag(s)`` as ``q`` and ``scale`` (read back from fbgemm's packed form)."""
        with _quiet():
            w, _ = torch.ops.quantized.linear_unpack(self._packed)
        return Int8Weight(w.int_repr(), w.q_per_channel_scales().float())

    def quantized_weight(self) -> Int8Weight:
        return self.weight()

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., K]`` float32 -> ``[..., N]`` float32 (no gradients: a backward raises ConfigError)."""
        return _forward_or_refuse_backward(self, x)

    def _forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features or x.dtype != torch.float32:
            raise ShapeError(f"DynamicInt8Linear expects float32 x [..., {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        if math.prod(x.shape[:-1]) == 1:  # one row (a decoding step): the kernel's range is the row's own
            y = torch.ops.quantized.linear_dynamic(x, self._packed, True)  # takes and gives [..., K] / [..., N]
        else:
            rows = x.reshape(-1, self.in_features)  # [M, K]
            m = rows.shape[0]
            lo = rows.amin(1, keepdim=True).clamp_(max=0)
            span = rows.amax(1, keepdim=True).clamp_(min=0) - lo  # 127 t_m
            span = torch.where(span > 0, span, torch.ones_like(span))
            offset = -torch.round(-lo / (span / ACTIVATION_LEVELS)) * (span / ACTIVATION_LEVELS)  # o_m = -z_m t_m
            # u_m written into M + 1 rows, the last all ones: the call's range is [0, 1] (no copy by a cat)
            unit = rows.new_empty(m + 1, self.in_features)
            torch.sub(rows, offset, out=unit[:m]).div_(span).clamp_(0, 1)
            unit[m] = 1
            y = torch.ops.quantized.linear_dynamic(unit, self._packed, True)[:m].mul_(span)  # 127 t_m (u_m W^T)
            # + o_m (W 1) (+ b): a rank-1 (rank-2 with the bias) product added in place, not three passes over y
            terms = offset if self.bias is None else torch.cat([offset, offset.new_ones(m, 1)], dim=1)
            sums = self.row_sums[None] if self.bias is None else torch.stack([self.row_sums, self.bias])
            y.addmm_(terms, sums)
            return y if x.ndim == 2 else y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        smooth = ", smoothed" if self.inv_smooth is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{smooth}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's deprecation notice of quantized tensors (fbgemm's packed int8 weight is built from one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def quantized_linear(
    weight: Tensor, bias: Tensor | None, mode: str, group_size: int = 32, compute: torch.dtype = torch.float32
) -> _WeightOnlyLinear:
    """A float ``weight [N, K]`` (and ``bias [N]``) as an :class:`Int8Linear` or :class:`Int4Linear` computing in
    ``compute`` (float32 by default: the exact equation; :func:`quantize` defaults to bfloat16, the fast path)."""
    if mode == "int8":
        return Int8Linear(quantize_int8(weight), bias).to(compute)
    return Int4Linear(quantize_int4(weight, group_size), bias).to(compute)


def check_q8_shape(name: str, shape: tuple[int, int], mode: str = "q8_0") -> None:
    """ConfigError naming the layer unless the Q8_0 / Q4 kernels take ``W [N, K]`` (``N`` a multiple of 16, ``K``
    of 32)."""
    n, k = shape
    if n % Q8_TILE or k % Q8_BLOCK:
        raise ConfigError(
            f"layer {name!r} [{n}, {k}]: {mode} needs out_features divisible by {Q8_TILE} and in_features by "
            f"{Q8_BLOCK}; quantize it as int8 or skip=({name!r},)"
        )


def check_int4_shape(name: str, shape: tuple[int, int], group_size: int) -> None:
    """ConfigError naming the layer unless the int4 kernel takes ``W [N, K]`` with groups of ``group_size``."""
    n, k = shape
    if k % group_size:
        raise ConfigError(
            f"layer {name!r} [{n}, {k}]: in_features={k} is not divisible by group_size={group_size}; "
            f"choose a group_size in {GROUP_SIZES} dividing it, or skip=({name!r},)"
        )
    if n % INT4_ROWS_MULTIPLE:
        raise ConfigError(
            f"layer {name!r} [{n}, {k}]: out_features={n} is not divisible by {INT4_ROWS_MULTIPLE} (the int4 "
            f"kernel's packing); quantize it as int8 or skip=({name!r},)"
        )


# ================================================================================================
# Whole models
# ================================================================================================


@dataclass(frozen=True)
class LayerReport:
    """One linear layer: ``name``, ``shape [N, K]``, ``mode`` (int8, int4/g, or float), bytes, and a note."""

    name: str
    shape: tuple[int, int]
    mode: str
    bytes_before: int
    bytes_after: int
    note: str = ""


@dataclass
class QuantReport:
    """What :func:`quantize` did: every linear layer, quantized or left float; ``str()`` prints the table."""

    mode: str
    group_size: int | None
    compute: str  # the activations' dtype: bfloat16 / float32 (weight-only), int8 (int8-dynamic)
    layers: list[LayerReport] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.mode != "float"]

    @property
    def left_float(self) -> list[LayerReport]:
        return [r for r in self.layers if r.mode == "float"]

    def __str__(self) -> str:
        rows = [("layer", "shape", "mode", "MB before", "MB after", "note")]
        rows += [(r.name, "x".join(map(str, r.shape)), r.mode, f"{r.bytes_before / 1e6:.3f}",
                  f"{r.bytes_after / 1e6:.3f}", r.note) for r in self.layers]  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5] for row in rows]
        q = self.quantized
        g = f", group_size={self.group_size}" if self.group_size else ""
        lines.append(
            f"{len(q)} of {len(self.layers)} linear layers quantized ({self.mode}{g}, {self.compute} activations)"
            f"{self._head_summary()}; their weights "
            f"{sum(r.bytes_before for r in q) / 1e6:.1f} MB -> {sum(r.bytes_after for r in q) / 1e6:.1f} MB; "
            f"model {self.model_bytes_before / 1e6:.1f} MB -> {self.model_bytes_after / 1e6:.1f} MB"
        )
        return "\n".join(line.rstrip() for line in lines)

    @property
    def head(self) -> LayerReport | None:
        """The ``lm_head`` row (None for a model without one)."""
        return next((r for r in self.layers if r.name == "lm_head"), None)

    def _head_summary(self) -> str:
        """``"; lm_head q8_0 (stored quantized)"`` where the head's kind is not the mode's, else ``""``."""
        head = self.head
        if head is None:
            return ""
        kind = {"int8-dyn": "int8-dynamic"}.get(head.mode, head.mode.split("/")[0])
        if kind == self.mode:
            return ""
        parts = ["int8 activations"] if kind in ROUNDED_INPUT_MODES and self.compute != "int8" else []
        parts += ["stored quantized"] if head.note.startswith("given") else []
        return f"; lm_head {head.mode}" + (f" ({', '.join(parts)})" if parts else "")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (a tied matrix once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def _tied(model: nn.Module, layer: nn.Linear) -> str | None:
    """The name of another module's parameter that is ``layer.weight`` itself (a tied head), or None."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is layer.weight and model.get_submodule(name.rpartition(".")[0]) is not layer:
            return name
    return None


def quantize(
    model: nn.Module,
    mode: str = "int8",
    *,
    group_size: int = 32,
    skip: tuple[str, ...] = (),
    head: str | None = DEFAULT_HEAD,
    compute: str = "bfloat16",
    weights: Mapping[str, Int8Weight | Int4Weight | Q8Weight] | None = None,
    calibration: Tensor | None = None,
) -> QuantReport:
    """Replace ``model``'s ``nn.Linear`` layers by weight-only quantized ones, in place; returns the report.

    Args:
        model: on the CPU, float32 / bfloat16 / float16 weights (e.g. :class:`archlab.models.llama.Llama`).
        mode: ``int8`` (per output channel) or ``int4`` (per group of ``group_size`` inputs), weight-only; or
            ``int8-dynamic``: int8 weights and activations (:class:`DynamicInt8Linear`: each row of the input is
            rounded to 7 bits per call, so it is not the float model with dequantized weights). Its int8 GEMM is
            the fastest of the three on CPU for one row and for many (prefill, encoders: measured here 3.5x the
            float32 product for 1, 41 and 256 rows, both CPU kinds). Or ``q8_0``: llama.cpp's Q8_0 weights (a
            scale per 32 inputs) and activations rounded to int8 per 32 inputs (:class:`Q8Linear`, archlab's kernel);
            or ``q4_1``: int4 levels in groups of 32 (Q4_1's rule) times activations rounded as for ``q8_0``
            (:class:`Q4Linear`).
        group_size: int4's group, one of 32, 64, 128, 256; every quantized layer's ``K`` must be divisible by it
            (``q4_1``'s blocks are 32 inputs: with it another value is refused).
        skip: layer names or ``fnmatch`` patterns left float (``"decoder.blocks.0.*"``); each must match a layer.
        head: how a decoder's ``lm_head`` is quantized: ``int8`` (default, also in the other modes), ``int4``,
            ``int8-dynamic``, ``q8_0``, ``q4_1``, or ``None`` (left float). A tied head gets a quantized copy; the embedding
            stays float (module docstring). The report's summary line names the head's kind where it is not ``mode``.
        compute: the dtype the quantized layers compute in: ``bfloat16`` (default) or ``float32``. PyTorch's CPU
            kernels are fast with bfloat16 activations only, on both CPU kinds (measured for one row: int4
            2.4-3.8x and int8 ~2x faster than the float32 product, where float32 activations make them 4-7x
            slower than it); ``float32`` computes the exact equation, for checking. Each layer casts its input
            to ``compute`` and its output back, so the rest of the model keeps its dtype.
        weights: layer name -> its quantized weight already made (GGUF blocks read as they are, see
            :func:`archlab.interop.gguf.load_gguf`), used instead of quantizing the layer's float weight; its kind
            must be the layer's mode.
        calibration: ``int8-dynamic`` only: token ids ``[B, N]`` (text unlike the evaluation's) that ``model``
            reads once before its layers are replaced; each dynamic layer is then smoothed by the largest
            activations it saw (module docstring), its ``1 / s`` folded into the weights before it where the
            block allows (:func:`fold_smoothing`: the norm gains of a pre-norm block change). Without it, no
            smoothing (SmolLM2: +11.7% perplexity instead of +2.6%).

    The report is returned and also kept as ``model.quant_report``.

    Layers whose parent reads the weight itself (cross-attention's fused K/V projection) stay float, as do
    subclasses of ``nn.Linear`` (torch's ``NonDynamicallyQuantizableLinear`` is read by its parent too).
    Bad arguments, or a layer the int4 kernel cannot take (``K`` not divisible by ``group_size``, ``N`` not by
    16), raise :class:`ConfigError` naming it, before any layer is replaced.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a quantization mode; choose one of {MODES}")
    if head is not None and head not in MODES:
        raise ConfigError(f"head={head!r} must be one of {MODES} or None (the LM head left float)")
    if compute not in COMPUTE_DTYPES:
        raise ConfigError(f"compute={compute!r} must be one of {tuple(COMPUTE_DTYPES)}")
    if "int4" in (mode, head) and (type(group_size) is not int or group_size not in GROUP_SIZES):
        raise ConfigError(f"group_size={group_size!r} is not supported by the int4 kernel; choose one of {GROUP_SIZES}")
    if "q4_1" in (mode, head) and "int4" not in (mode, head) and group_size != Q8_BLOCK:
        raise ConfigError(f"group_size={group_size!r}: q4_1's blocks are {Q8_BLOCK} inputs (group_size is int4's)")
    if calibration is not None and "int8-dynamic" not in (mode, head):
        raise ConfigError(f"calibration= smooths int8-dynamic layers; mode={mode!r}, head={head!r} has none")
    if isinstance(skip, str):
        skip = (skip,)
    bad = next((p for p in skip if not isinstance(p, str)), None)
    if bad is not None:
        raise ConfigError(f"skip={tuple(skip)!r}: {bad!r} is not a layer name or fnmatch pattern (a string)")
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if adapted:  # its base would be quantized under it, and the adapter could then never be merged
        raise ConfigError(f"{type(model).__name__} has LoRA adapters ({', '.join(adapted[:4])}"
                          f"{', ...' if len(adapted) > 4 else ''}): fold them in with "
                          "archlab.nn.lora.unload_lora(model) before quantizing")  # fmt: skip
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        done = [name for name, m in model.named_modules() if isinstance(m, _WeightOnlyLinear | DynamicInt8Linear)]
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to quantize" + (
            f": its {len(done)} linear layers are already quantized ({', '.join(done[:3])}{', ...' * (len(done) > 3)})"
            if done else ""))  # fmt: skip
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in linears):
            raise ConfigError(f"skip={pattern!r} matches no linear layer of this {type(model).__name__}")
    weights = dict(weights or {})

    plan = []  # (name, layer, mode or "float", note, a given quantized weight or None)
    for name, layer in linears:
        layer_mode = head if name == "lm_head" else mode
        note = "lm_head: head=None" if layer_mode is None else ""
        if any(fnmatch.fnmatchcase(name, p) for p in skip):
            layer_mode, note = None, "skip="
        elif type(layer) is not nn.Linear:
            layer_mode, note = None, f"a {type(layer).__name__}: its parent may read the weight itself"
        elif any(fnmatch.fnmatchcase(name, p) for p in _READS_WEIGHT):
            layer_mode, note = None, "its parent slices the weight (cross-attention K/V)"
        if layer_mode is not None:
            w = layer.weight
            if w.device.type != "cpu":
                raise ConfigError(f"layer {name!r} is on {w.device}; the weight-only kernels used here run on the CPU")
            if w.dtype not in KERNEL_DTYPES or layer_mode == "int8-dynamic" and w.dtype != torch.float32:
                raise ConfigError(
                    f"layer {name!r} holds {w.dtype} weights; quantize float32, bfloat16 or float16 (int8-dynamic: float32)"
                )
            if layer_mode == "int4":
                check_int4_shape(name, tuple(w.shape), group_size)
            if layer_mode in ("q8_0", "q4_1"):
                check_q8_shape(name, tuple(w.shape), layer_mode)
            tied = _tied(model, layer)
            if tied:
                note = f"tied to {tied}: a quantized copy for the output projection; {tied} stays float for lookups"
        given = weights.pop(name, None)
        if given is not None:
            kind = {Int8Weight: "int8", Int4Weight: "int4", Q8Weight: "q8_0"}.get(type(given), type(given).__name__)
            if kind == "int4" and layer_mode == "q4_1" and given.group_size == Q8_BLOCK:
                kind = "q4_1"  # int4 levels in groups of 32 are Q4_1's blocks
            if kind != layer_mode or tuple(given.q.shape) != tuple(layer.weight.shape):
                raise ConfigError(
                    f"weights[{name!r}] is {kind} {tuple(given.q.shape)}; the layer is {tuple(layer.weight.shape)} "
                    f"and quantized as {layer_mode or 'float'}"
                )
            note = "given: stored quantized (no float round trip)" + (f"; {note}" if note else "")
        plan.append((name, layer, layer_mode or "float", note, given))
    if weights:
        raise ConfigError(f"weights= names layers this {type(model).__name__} does not have: {sorted(weights)}")

    dynamic = [layer for _, layer, layer_mode, _, _ in plan if layer_mode == "int8-dynamic"]
    activations = "int8" if mode in ROUNDED_INPUT_MODES else compute  # what the summary line names
    report = QuantReport(mode, group_size if "int4" in (mode, head) else None, activations,
                         model_bytes_before=model_bytes(model))  # fmt: skip
    amax = _input_amax(model, dynamic, calibration) if calibration is not None and dynamic else {}
    smoothed = fold_smoothing(model, amax)  # the float weights now hold W diag(s); 1/s folded before where it can be
    outside = 0  # bytes of torch's dynamic layers, held outside parameters and buffers
    for name, layer, layer_mode, note, given in plan:
        before = layer.weight.numel() * layer.weight.element_size()
        if layer_mode == "float":
            report.layers.append(LayerReport(name, tuple(layer.weight.shape), "float", before, before, note))
            continue
        if layer_mode == "int8-dynamic":
            s, into = smoothed.get(layer, (None, ""))
            new = DynamicInt8Linear(quantize_int8(layer.weight), layer.bias, None if into else s)
            _replace(model, name, new)
            packed = new.out_features * (new.in_features + 16)  # fbgemm's int8 q, float64 scale and int64 zero per row
            outside += packed  # held by fbgemm, outside parameters and buffers
            after = packed + _nbytes(*new.buffers()) - (0 if new.bias is None else _nbytes(new.bias))
            if layer in smoothed:
                note = f"{note}; smoothed, " + (f"1/s folded into {into}" if into else "x / s at run time")
            report.layers.append(LayerReport(name, tuple(layer.weight.shape), "int8-dyn", before, after, note.lstrip("; ")))
            continue
        if layer_mode == "q8_0":  # takes x in its own dtype: no compute dtype
            new = Q8Linear(quantize_q8_0(layer.weight) if given is None else given, layer.bias)
        elif layer_mode == "q4_1":  # Q4_1's rule is int4's in groups of 32
            new = Q4Linear(quantize_int4(layer.weight, Q8_BLOCK) if given is None else given, layer.bias)
        elif given is None:
            new = quantized_linear(layer.weight, layer.bias, layer_mode, group_size, COMPUTE_DTYPES[compute])
        else:
            new = (Int8Linear if layer_mode == "int8" else Int4Linear)(given, layer.bias).to(COMPUTE_DTYPES[compute])
        new.logits = is_logits_head(layer)  # an LM head: float32 logits from 16-bit activations, as it gave
        _replace(model, name, new)
        after = _nbytes(*new.buffers()) - (0 if new.bias is None else _nbytes(new.bias))
        shown = f"int4/g{new.group_size}" if layer_mode == "int4" else layer_mode
        report.layers.append(LayerReport(name, tuple(layer.weight.shape), shown, before, after, note))
    report.model_bytes_after = model_bytes(model) + outside
    model.quant_report = report
    return report


def smoothing(input_amax: Tensor, weight: Tensor, alpha: float = SMOOTH_ALPHA) -> Tensor:
    """SmoothQuant's ``s [K] = max|x_k|^a / max_n |W_nk|^(1-a)`` from a layer's largest inputs ``input_amax [K]``
    and its ``weight [N, K]``; a channel that is zero in either (no signal to move) gets 1."""
    x, w = input_amax.double(), weight.detach().double().abs().amax(0)
    s = x.pow(alpha) / w.pow(1 - alpha)
    return torch.where((x > 0) & (w > 0), s, torch.ones_like(s)).float()


@torch.no_grad()
def fold_smoothing(model: nn.Module, input_amax: Mapping[nn.Module, Tensor]) -> dict[nn.Module, tuple[Tensor, str]]:
    r"""SmoothQuant in the float ``model``, in place: each layer in ``input_amax`` (``nn.Linear`` -> its largest
    ``|x_k|`` on calibration text, ``[K]``) gets ``W <- W diag(s)`` (:func:`smoothing`), so its input must arrive
    divided by ``s``. Where a block's wiring (:mod:`archlab.nn.blocks`) allows, that division is folded into what
    computes the input, so it costs no op at run time:

    * a pre-norm block's ``attn.in_proj`` (q, k, v) and gated ``ffn.w_in`` (gate, up) read their norm's output
      ``g * x / rms(x)`` and nothing else does: the gain ``g <- g / s`` (a LayerNorm's offset too);
    * ``attn.out_proj`` reads the heads' outputs side by side, head ``i``'s channel ``c`` a convex mix
      ``sum_j p_ij v_jc`` of its value head's channel: ``W_V``'s output rows in ``in_proj`` are divided by ``s``,
      where every query head has its own value head (``G = A``). With grouped-query attention the ``A / G`` query
      heads of a group mix one value head but want different ``s``: one ``s`` tied per value channel would fold,
      but it smooths the layer differently (measured on SmolLM2's parity docstrings: +3.28% perplexity with the
      group's largest input and weight, +2.14% and top-1 89.4% with the geometric mean of the heads' ``s``,
      against +2.39% and 90.0% untied), so there the division stays an op of the layer;
    * a gated FFN's ``w2`` (down) reads ``act(h W) * (h V)``, linear in the up projection: ``V``'s output rows
      (``w_in``'s second half) are divided by ``s``.

    Real arithmetic gives the same function (a float64 test checks it). The weights are new tensors (a tied head's
    no longer shares the embedding's); norm gains change in place. Returns each layer's ``s`` and the name of the
    weight holding ``1 / s``, or ``""`` where it is not folded (a post-norm block's sub-layers read the residual
    stream; grouped-query attention's output projection, above; the LM head reads the final norm, whose output
    ``hidden_states`` returns as it is): such a layer divides its input at run time."""
    names = {m: n for n, m in model.named_modules()}
    smooth = {layer: smoothing(amax, layer.weight) for layer, amax in input_amax.items()}
    folded: dict[nn.Module, str] = {}
    rows: dict[nn.Module, Tensor] = {}  # a layer -> [N] factors of its output rows (a later layer's 1/s)

    def fold_rows(layer: nn.Module, into: nn.Module, start: int, s: Tensor) -> bool:
        """Divide output rows ``start ..`` of ``into`` (smoothed itself, so its weight is rebuilt below) by ``s``."""
        if into not in smooth:
            return False
        factor = rows.setdefault(into, torch.ones(into.out_features, dtype=torch.float64))
        factor[start : start + s.numel()] /= s
        folded[layer] = f"{names[into]}.weight"
        return True

    for block in model.modules():
        if not isinstance(block, _Block):
            continue
        attn, ffn = block.attn, block.ffn
        if block.norm_first:
            for norm, layer in ((block.attn_norm, attn.in_proj), (block.ffn_norm, getattr(ffn, "w_in", None))):
                if layer in smooth:
                    norm.weight.div_(smooth[layer])
                    if getattr(norm, "bias", None) is not None:
                        norm.bias.div_(smooth[layer])
                    folded[layer] = f"{names[norm]}.weight"
        if attn.out_proj in smooth and attn.n_kv_heads == attn.n_heads:  # the value rows after q's and k's
            fold_rows(attn.out_proj, attn.in_proj, 2 * attn.n_heads * attn.d_k, smooth[attn.out_proj])
        if isinstance(ffn, GatedFeedForward) and ffn.w2 in smooth:
            fold_rows(ffn.w2, ffn.w_in, ffn.d_ff, smooth[ffn.w2])
    for layer, s in smooth.items():
        dtype = layer.weight.dtype
        w = layer.weight.detach() * s.to(dtype)
        if layer in rows:
            w = w * rows[layer].to(dtype)[:, None]
        layer.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None and layer in rows:
            layer.bias = nn.Parameter(layer.bias.detach() * rows[layer].to(dtype), requires_grad=False)
    return {layer: (s, folded.get(layer, "")) for layer, s in smooth.items()}


def dynamic_int8_linear(weight: Tensor, bias: Tensor | None = None, input_amax: Tensor | None = None) -> DynamicInt8Linear:
    """A float ``weight [N, K]`` as a :class:`DynamicInt8Linear`; smoothed (:func:`smoothing`) by ``input_amax [K]``
    (the largest ``|x_k|`` seen on calibration text) if given."""
    s = None if input_amax is None else smoothing(input_amax, weight)
    w = weight.detach().float()
    return DynamicInt8Linear(quantize_int8(w if s is None else w * s), bias, s)


@torch.inference_mode()
def _input_amax(model: nn.Module, layers: list[nn.Module], calibration: Tensor) -> dict[nn.Module, Tensor]:
    """Run the float ``model`` on ``calibration [B, N]`` token ids (in windows of at most its ``config.max_len``);
    each of ``layers``' largest ``|x_k|`` per input."""
    if not isinstance(calibration, Tensor) or calibration.ndim != 2 or calibration.dtype.is_floating_point:
        raise ShapeError(f"calibration must be token ids [B, N], got {getattr(calibration, 'shape', calibration)}")
    seen: dict[nn.Module, Tensor] = {}

    def record(layer, inputs):
        x = inputs[0].detach().float().abs().flatten(0, -2).amax(0)
        seen[layer] = x if layer not in seen else torch.maximum(seen[layer], x)

    context = getattr(getattr(model, "config", None), "max_len", None) or calibration.shape[1]
    hooks = [layer.register_forward_pre_hook(record) for layer in set(layers)]
    try:
        for window in calibration.split(context, dim=1):  # windows no longer than the model's context
            model(window)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ================================================================================================
# Saving and restoring a quantized model's layers (archlab.interop.io.save_model / load_model)
# ================================================================================================


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's quantized layers by name (weight-only, Q8_0 and int8-dynamic), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _WeightOnlyLinear | DynamicInt8Linear)}


def quantized_state(model: nn.Module) -> tuple[dict, dict[str, Tensor]] | None:
    """What a saved quantized model keeps of its quantized layers, or None for a model without any: a description
    (each layer's name, mode, group size and whether it is an LM head, and ``model.quant_report``), and the tensors
    ``<layer>.q``, ``.scale`` (``.zero`` for int4, ``.bias``, ``.inv_smooth`` for smoothed int8-dynamic) as
    :meth:`quantized_weight` reads them: the integers and the scales, not the kernels' packed layouts, which depend
    on the CPU (:func:`restore_quantized` packs them again for the CPU that loads them); int4's levels two a byte,
    ``q[n, 2j] | q[n, 2j + 1] << 4`` (``[N, K/2]``)."""
    layers = quantized_layers(model)
    if not layers:
        return None
    entries, tensors = [], {}
    for name, layer in layers.items():
        w = layer.quantized_weight()
        entry = {"name": name, "mode": layer.mode, "logits": bool(getattr(layer, "logits", False))}
        parts = {"q": w.q, "scale": w.scale}
        if isinstance(w, Int4Weight):  # two levels a byte: q[2j] | q[2j + 1] << 4
            parts["q"] = w.q[:, 0::2] | w.q[:, 1::2] << 4
            parts["zero"], entry["group_size"] = w.zero, w.group_size
        for extra in ("bias", "inv_smooth"):
            if getattr(layer, extra, None) is not None:
                parts[extra] = getattr(layer, extra)
        tensors.update({f"{name}.{key}": t.detach().contiguous().clone() for key, t in parts.items()})
        entries.append(entry)
    report = getattr(model, "quant_report", None)
    return {"layers": entries, "report": None if report is None else dataclasses.asdict(report)}, tensors


def restore_quantized(model: nn.Module, description: dict, tensors: Mapping[str, Tensor], source: str) -> None:
    """Put back on ``model`` (built from its config, float) the quantized layers :func:`quantized_state` described,
    from their stored ``tensors``, each where the float ``nn.Linear`` of the same shape is, and ``model.quant_report``.
    :class:`CheckpointError` naming ``source`` for a layer the model lacks, a missing tensor, or a shape that does not
    fit."""
    from archlab.errors import ArchlabError, CheckpointError

    def tensor(name: str, key: str) -> Tensor:
        if f"{name}.{key}" not in tensors:
            raise CheckpointError(f"{source}: the quantized layer {name!r} has no stored {key!r}")
        return tensors[f"{name}.{key}"]

    try:
        entries = [(e["name"], e["mode"], e.get("group_size"), bool(e.get("logits"))) for e in description["layers"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: its description of the quantized layers is malformed ({e!r})") from None
    for name, mode, group_size, logits in entries:
        try:
            float_layer = model.get_submodule(name)
        except AttributeError:
            float_layer = None
        q = tensor(name, "q")
        if mode in ("int4", "q4_1"):  # two levels a byte (quantized_state)
            q = torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], 2 * q.shape[1])
        if not isinstance(float_layer, nn.Linear) or tuple(float_layer.weight.shape) != tuple(q.shape):
            found = "nothing" if float_layer is None else type(float_layer).__name__
            raise CheckpointError(f"{source}: quantized layer {name!r} ({mode}, q {tuple(q.shape)}) does not fit the "
                                  f"model, which has {found} there")  # fmt: skip
        if mode not in MODES:
            raise CheckpointError(f"{source}: quantized layer {name!r} has the unknown mode {mode!r}; one of {MODES}")
        bias, scale = tensors.get(f"{name}.bias"), tensor(name, "scale")
        n, k = q.shape
        blocks = (n, k // Q8_BLOCK)
        want = {"int4": (n, k // int(group_size or 1)), "q8_0": blocks, "q4_1": blocks}.get(mode, (n,))
        if tuple(scale.shape) != want:
            raise CheckpointError(f"{source}: quantized layer {name!r} ({mode}) has scales {tuple(scale.shape)} for q "
                                  f"{(n, k)}; it needs {want}")  # fmt: skip
        try:
            if mode == "int8":
                layer = Int8Linear(Int8Weight(q, scale), bias)
            elif mode == "int4":
                layer = Int4Linear(Int4Weight(q, scale, tensor(name, "zero"), int(group_size)), bias)
            elif mode == "q8_0":
                layer = Q8Linear(Q8Weight(q, scale), bias)
            elif mode == "q4_1":
                layer = Q4Linear(Int4Weight(q, scale, tensor(name, "zero"), Q8_BLOCK), bias)
            else:
                layer = DynamicInt8Linear(Int8Weight(q, scale), bias)
                if f"{name}.inv_smooth" in tensors:
                    layer.inv_smooth = tensors[f"{name}.inv_smooth"].clone()
        except (ArchlabError, RuntimeError, TypeError, ValueError) as e:  # scales that do not fit q, no group size
            raise CheckpointError(f"{source}: quantized layer {name!r} ({mode}) cannot be rebuilt: {e}") from None
        if logits:
            layer.logits = True
        _replace(model, name, layer)
    report = description.get("report")
    if report is not None:
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in report["layers"]]
        model.quant_report = QuantReport(**{**report, "layers": layers})


# ================================================================================================
# Quality: perplexity and top-1 agreement against the float model
# ================================================================================================


@dataclass(frozen=True)
class Quality:
    """Next-token perplexity of a reference and a quantized model on the same tokens, and how often their
    most likely next tokens agree. ``str()`` prints one line."""

    name: str
    perplexity: float
    reference_perplexity: float
    top1_agreement: float
    tokens: int

    @property
    def perplexity_change(self) -> float:
        """``ppl / ppl_ref - 1``."""
        return self.perplexity / self.reference_perplexity - 1

    def __str__(self) -> str:
        return (f"{self.name}: perplexity {self.perplexity:.3f} vs {self.reference_perplexity:.3f} "
                f"({self.perplexity_change:+.2%}), top-1 agreement {self.top1_agreement:.1%} over {self.tokens} tokens")  # fmt: skip


@torch.inference_mode()
def quality(reference: nn.Module, model: nn.Module, windows: Tensor, name: str = "quantized") -> Quality:
    """Compare ``model`` with ``reference`` (its float original) on ``windows [B, N]`` token ids.

    Each row is one window of held-out text; every position but the last predicts the next token:
    ``ppl = exp(mean_t -log p(x_{t+1} | x_{<=t}))`` over the ``B (N - 1)`` predictions, and the agreement is
    the share of them where both models' argmax is the same token.
    """
    if not isinstance(windows, Tensor) or windows.ndim != 2 or windows.shape[1] < 2:
        raise ShapeError(f"windows must be token ids [B, N] with N >= 2, got {getattr(windows, 'shape', windows)}")
    targets = windows[:, 1:].reshape(-1)
    losses, argmaxes = [], []
    for m in (reference, model):
        logits = m(windows)[:, :-1].float().flatten(0, 1)  # [B (N-1), V]
        losses.append(F.cross_entropy(logits, targets).item())
        argmaxes.append(logits.argmax(-1))
    agree = (argmaxes[0] == argmaxes[1]).double().mean().item()
    return Quality(name, math.exp(losses[1]), math.exp(losses[0]), agree, targets.numel())
