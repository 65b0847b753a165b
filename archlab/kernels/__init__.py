r"""archlab's own CPU kernels, C++ compiled at first use (:func:`torch.utils.cpp_extension.load`, gcc).

**int4 rows** (``torch.ops.archlab_kernels.int4_rows``): ``y [M, N] = x [M, K] dequant(W)^T`` for a few rows
(``M`` in 1..:data:`MAX_ROWS`, a decoding step's), ``W`` int4 in groups of ``g`` inputs as in
:mod:`archlab.quant`: ``W_nk = (q_nk - 8) s_nG + z_nG`` (``G = k // g``). It computes, in float32 with FMA::

    y_mn = sum_G [ s_nG (sum_{k in G} q_nk x_mk) + (z_nG - 8 s_nG) (sum_{k in G} x_mk) ]

the nibbles converted exactly, every product exact, the sums in float32 (``x`` bfloat16 or float32; ``y`` in
``x``'s dtype; the sums of ``x`` over each group computed once per call), the output rows ``n`` split over
torch's threads (``at::parallel_for``), four at a time. Its weight
layout (:func:`pack_int4`): ``packed [N, K/2]`` uint8, a row's inputs in blocks of 128 in 64 bytes read as 32
little-endian 16-bit words, word ``j`` holding inputs ``j``, ``32 + j``, ``64 + j``, ``96 + j`` of the block in its
four nibbles (one 64-byte load gives four vectors of 32 inputs with shifts and masks only); where ``K % 128 = 64`` a
last block of 64 inputs in 32 bytes, byte ``j`` holding inputs ``j`` and ``32 + j``; ``scales_and_zeros
[N, 2, K/g]``: each row's ``s``, then its ``z`` (float32 or bfloat16). ``K`` must be a multiple of 64.

Two variants in one library, chosen per call by the ``isa`` argument (:func:`isa`):

* ``513``, AVX512-BF16, for bfloat16 ``x``: each nibble becomes the bfloat16 ``128 + q`` (its bits ``0x4300 | q``,
  exact) and ``vdpbf16ps`` multiplies 32 of them by 32 ``x`` exactly, adding into 16 float32 lanes; the ``128 x``
  it adds is taken out with the zero term (``z - 136 s``). Four output rows at a time, the next rows prefetched.
* ``256``, AVX2 + FMA, float32: the nibbles converted to float32, ``x`` converted to float32 (any CPU with AVX2;
  float32 ``x`` always takes it).

Both compute the same sums in float32; the order of the additions differs (tests: within float32's bound).
``int4_dequant`` writes such ``W`` in bfloat16 for a prompt's many rows (:func:`int4_dequant`).

**int8 rows** (``torch.ops.archlab_kernels.int8_rows``, :func:`int8_rows`): int8 weights ``W = q s`` (one scale per
output row) as the int4 matrix of their nibbles, ``q + 128 = 16 hi + lo`` (:func:`pack_int8`: each 64 inputs' ``hi``,
scale ``16 s``, then their ``lo``, scale ``s`` and zero ``8 s``), multiplied by the int4 rows' code with each 64
inputs of ``x`` taken twice; ``int8_dequant`` writes ``q s`` in the scales' dtype for a prompt's rows
(:func:`int8_dequant`). :class:`archlab.quant.Int8Linear` uses them where the int4 layers use archlab's kernel.

**Q8_0 rows** (``torch.ops.archlab_kernels.q8_rows``, :func:`q8_rows`): llama.cpp's Q8_0 x Q8_0 product
(``q8_rows.cpp``); the same result to the bit on AVX512-VNNI and AVX2. **Q4 rows** (``q4_rows``, :func:`q4_rows`):
llama.cpp's Q4_0 / Q4_1 x Q8 product, 4-bit weights with a scale and zero per 32 inputs (:func:`pack_q4`) times ``x``
rounded as for Q8_0, in the same file and on the same two variants, also equal to the bit.

**float32 rows** (``torch.ops.archlab_kernels.f32_rows``, :func:`f32_rows`): ``y [..., N] = x [..., K] W^T + b``
for 1..:data:`F32_MAX_ROWS` rows of ``x``, ``W [N, K]`` float32 as ``nn.Linear`` keeps it (no copy, no packing), ``K`` a
multiple of 16. A decoding step's product reads every weight once for one row, so its speed is the rate the weights
stream at: PyTorch hands it to a BLAS matrix-vector kernel on one thread (10 GB/s here). This kernel splits the
output rows over torch's threads and walks each row's weights front to back, one sequential stream a thread; on the
AMD EPYC kind at 2 threads it read a 236 MB matrix at 98% of the rate ``W.sum()`` reads it, and gpt-mini's
``[50304, 384]`` LM head in 1.7 ms against 4.2 ms for :func:`archlab.nn.linear.linear`'s split ``torch.bmm``. From 2
rows (a speculative verify pass, a batch's step) the AVX-512 variant computes tiles of 2 output rows by up to 6 rows
of ``x`` in registers (3 by 4 where ``K`` > 682) and prefetches the weights ahead: SmolLM2-135M's 121 matrices at 9
rows 23.6 ms against 26.6 for oneDNN's packed copies, which it needs none of, at 12 rows 26.8 against 27.7, and at
2-4 rows 6-17% faster than the one-row loop carrying them (``f32_rows.cpp`` and
:data:`archlab.nn.linear.KERNEL_FIRST_ROWS` have the figures). The sum (``f32_rows.cpp``;
the folds in ``lanes.h``): 16 lanes in two chains of blocks, folded in a fixed order; the AVX-512 (``512``) and AVX2
(``256``, 8-lane halves) variants do the same operations in the same order, so they give the same result to the bit,
and a row's result does not depend on ``M`` (tested). :mod:`archlab.nn.linear` uses it for the few-row float32
products it serves on a CPU (:func:`f32_kernel`).

**bfloat16 rows** (``torch.ops.archlab_kernels.bf16_rows``, :func:`bf16_rows`): ``y [..., N] = x [..., K] W^T + b``
for 1..:data:`BF16_MAX_ROWS` rows, ``x``, ``W [N, K]`` (read in place) and ``b`` bfloat16, ``K`` a multiple of 32;
on a CPU with AVX512-BF16 only (:func:`bf16_kernel`). ``vdpbf16ps`` multiplies 32 pairs exactly and adds each lane's
two products in float32; the sums are float32 (16 lanes, two chains of 32-input blocks, folded as the float32 rows
fold), rounded to bfloat16 once, as PyTorch's bf16 product rounds (one ulp apart at most, tested), or with
``float_out`` kept in float32 (an LM head's logits, :func:`archlab.nn.linear.head_logits`). A row's result does
not depend on ``M`` (one row streams its weights as the float32 kernel's one-row loop does; 2-4 rows run in 2 x R
tiles, 5-16 in phased 3 x 5 tiles). Over SmolLM2-135M's 121 matrices at 2 threads (AMD EPYC AVX512-BF16, median of 7
in-process rounds, 2026-12-05): 1 row 6.3 ms (the float32 kernel on float32 weights 12.9, ``F.linear`` in bf16
21.3), 3 rows 6.4 (13.6, 21.8), 10 rows 12.0 (21.8, 27.3), 16 rows 18.5 (31.2, 30.7); in a slower phase of the
machine an hour before, 1 row 9.5 (18.2, 18.8).

**Attention over a KV cache** (``torch.ops.archlab_kernels.cached_attention``, :func:`cached_attention`): the
attention of a decoding step's queries, the last ``N`` positions' (1 for a one-token step, ``k + 1`` for a
speculative verify pass), each reading the keys up to its own position (causal) and no further: over a static KV
cache (:mod:`archlab.static_decoding`), only the keys written so far. The dot products in the same 16-lane order as
the float32 rows, so again the same result on AVX-512 and AVX2, and each query computed on its own, so a position's
result does not depend on ``N``: a verify pass and one-token steps give it to the bit. Its sibling
``cached_attention_padded`` (:func:`cached_attention_padded`) reads, for each row ``b``, only the keys from
``starts[b]``: a left-padded batch's step (:func:`archlab.generation.generate_batch`), whose rows' real tokens end at
the last position and start at their own. :func:`archlab.nn.attention.attend` takes them for eager float32 CPU
inference with at most :data:`CACHED_MAX_QUERIES` causal queries (or one query), unmasked or under such a padding mask,
in place of sdpa. Both read a KV cache's view of its storage in place (any strides but the last dimension's).
bfloat16 ``q``, ``k``, ``v`` (a bf16 model's cache) are widened exactly as they are read and the float32 result
rounded once, so it is the float32 op's on the widened values, to the bit, on either variant.

**RMSNorm** (``torch.ops.archlab_kernels.rms_norm``, :func:`rms_norm`): ``y = (x s) g``, ``s`` one over the root
mean square of the row (plus ``eps``), for each row of float32 ``x [..., d]`` (``d`` a multiple of 16), the sum of
squares in the float32 rows' 16-lane order, so the same result on AVX-512 and AVX2 and for any number of rows. One
op where PyTorch's CPU ``rms_norm`` dispatches about ten: :class:`archlab.nn.RMSNorm` takes it for float32 inference
on the CPU (a decoding step's 61 norms in SmolLM2); bfloat16 too, widened as read and rounded once (as PyTorch's
``rms_norm`` rounds: the same bits on the cases tested, one ulp at most).

**Rows of a KV cache moved on** (``torch.ops.archlab_kernels.shift_rows``, :func:`shift_rows`): row ``b`` of every
layer's keys and values moves ``shifts[b]`` positions on, zeros before it, in one call: a batch whose rows accepted
different numbers of speculative drafts lines them up again (:func:`archlab.nn.attention.rewind_rows`). The values are
moved, not computed: the same bits anywhere.

The computing ops are registered with a fake (meta) implementation, so ``torch.compile`` keeps each as one opaque call.
:func:`load` builds the library once per machine and source (cache: ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); where it cannot (no compiler, no ninja), it raises :class:`KernelUnavailable`.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor

from archlab.errors import ArchlabError, ConfigError, ShapeError
from archlab.hardware import cpu_features, kernel_capability

MAX_ROWS = 16  # rows of x per call (the kernel's check; a prompt goes to other kernels)
BLOCK = 64  # inputs per 32-byte run of the packed layout: K must be a multiple of it
SOURCES = tuple(Path(__file__).with_name(f) for f in ("int4_rows.cpp", "q8_rows.cpp", "f32_rows.cpp", "bf16_rows.cpp",
                                                        "cached_attention.cpp", "rms_norm.cpp", "shift_rows.cpp"))


class KernelUnavailable(ArchlabError, RuntimeError):
    """archlab's C++ kernels cannot be built or run here (no compiler, or a CPU below AVX2)."""


@functools.cache
def load() -> None:
    """Build (first call on this machine: about a minute) and load the library, once per process;
    :class:`KernelUnavailable` if it cannot be built, with the reason."""
    build("archlab_kernels")


def build(name: str, directory: str | None = None) -> None:
    """Compile :data:`SOURCES` as library ``name`` (in ``directory``, default torch's extension cache) and load it
    (registers the op and its fake implementation; one library per process: :func:`load`);
    :class:`KernelUnavailable` if the build fails."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    try:
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in SOURCES],
            extra_cflags=["-O3", "-fopenmp"],  # -fopenmp: at::parallel_for's OpenMP pragma (torch's own libgomp)
            extra_ldflags=["-fopenmp"],
            build_directory=directory,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, FileNotFoundError) as e:  # no compiler / ninja, or a failed build
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else type(e).__name__
        names = ", ".join(p.name for p in SOURCES)
        raise KernelUnavailable(f"archlab's kernels ({names}) could not be built: {reason}") from e
    if not _fake_registered:
        _register_flop_formulas()
        torch.library.register_fake("archlab_kernels::int4_rows")(_fake_int4_rows)
        torch.library.register_fake("archlab_kernels::int4_dequant")(_fake_int4_dequant)
        torch.library.register_fake("archlab_kernels::int8_rows")(_fake_rows)
        torch.library.register_fake("archlab_kernels::int8_dequant")(_fake_int8_dequant)
        torch.library.register_fake("archlab_kernels::q8_rows")(_fake_rows)
        torch.library.register_fake("archlab_kernels::q4_rows")(_fake_rows)
        torch.library.register_fake("archlab_kernels::f32_rows")(_fake_f32_rows)
        torch.library.register_fake("archlab_kernels::bf16_rows")(_fake_bf16_rows)
        torch.library.register_fake("archlab_kernels::cached_attention")(_fake_cached_attention)
        torch.library.register_fake("archlab_kernels::cached_attention_padded")(_fake_cached_attention_padded)
        torch.library.register_fake("archlab_kernels::rms_norm")(_fake_rms_norm)
        _fake_registered.append(True)


_fake_registered: list[bool] = []


def _register_flop_formulas() -> None:
    """Teach ``torch.utils.flop_counter`` (and :mod:`archlab.analysis`, which counts with it) the ops' FLOPs: a product
    ``2 M N K``; cached attention ``2 B A (D + Dv) sum_i n_i`` over the ``n_i = p - N + 2 + i`` keys query ``i`` reads
    (``p`` the position; ``L`` keys each where the position is not a real tensor, under fake tensors); the padded one
    the same less ``starts[b]`` keys for each of row ``b``'s queries (none less where the starts are not real)."""
    from torch.utils.flop_counter import register_flop_formula

    def product(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * x_shape[-1]

    def real(t) -> bool:
        return type(t) is Tensor and t.device.type == "cpu" and t.numel() > 0

    def keys(q, k, positions) -> int:
        """Keys read by one row's ``N`` queries in all (no starts)."""
        n = q.shape[2]
        if not real(positions):
            return n * k.shape[2]
        last = min(k.shape[2], int(positions.reshape(-1)[0]) + 1)  # the last query's keys
        return n * last - n * (n - 1) // 2

    def attention(q, k, v, positions, *args, out_shape=None, **kwargs) -> int:
        return 2 * q.shape[0] * q.shape[1] * keys(q, k, positions) * (q.shape[3] + v.shape[3])

    def padded(q, k, v, starts, positions, *args, out_shape=None, **kwargs) -> int:
        per_row = keys(q, k, positions)
        read = per_row * q.shape[0] - (q.shape[2] * int(starts.sum()) if real(starts) else 0)
        return 2 * q.shape[1] * read * (q.shape[3] + v.shape[3])

    ops = torch.ops.archlab_kernels
    # each weight's first dimension is N
    products = [ops.f32_rows, ops.bf16_rows, ops.int4_rows, ops.int8_rows, ops.q8_rows, ops.q4_rows]
    register_flop_formula(products)(product)
    register_flop_formula(ops.cached_attention, get_raw=True)(attention)
    register_flop_formula(ops.cached_attention_padded, get_raw=True)(padded)


def _ninja_on_path() -> None:
    """Put the ``ninja`` package's binary (a dependency of archlab) on ``PATH`` where no ``ninja`` is there:
    ``torch.utils.cpp_extension`` looks for the command, and a virtual environment's ``bin`` is on ``PATH`` only
    when it is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # the build then fails with torch's own message, raised as KernelUnavailable
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def isa(x_dtype: torch.dtype = torch.bfloat16) -> int:
    """The variant for ``x`` of ``x_dtype`` on this CPU, after the cap on PyTorch's kernels
    (``ATEN_CPU_CAPABILITY``): 513 (AVX512-BF16, bfloat16 ``x``), 256 (AVX2 + FMA); :class:`KernelUnavailable`
    below AVX2."""
    cap = kernel_capability()
    if cap == "AVX512" and x_dtype == torch.bfloat16 and cpu_features()["avx512_bf16"]:
        return 513
    if cap in ("AVX512", "AVX2"):
        return 256
    raise KernelUnavailable(f"archlab's int4 kernel needs AVX2 or AVX-512; PyTorch's CPU kernels run at {cap}")


def _fake_int4_rows(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, isa: int,
                    float_out: bool = False) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[M, N]`` in ``x``'s dtype (float32 with ``float_out``)."""
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32 if float_out else x.dtype)


def pack_int4(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``q [N, K]`` (0..15), ``scale``, ``zero [N, K/g]`` -> the kernel's ``packed [N, K/2]`` uint8 and
    ``scales_and_zeros [N, 2, K/g]`` (in ``scale``'s dtype): module docstring. :class:`ShapeError` unless
    :func:`check_shape` passes."""
    n, k = q.shape
    check_shape(k, group_size)
    if tuple(scale.shape) != (n, k // group_size) or tuple(zero.shape) != tuple(scale.shape):
        raise ShapeError(f"scale and zero must be [N, K/g] = [{n}, {k // group_size}], got "
                         f"{tuple(scale.shape)} and {tuple(zero.shape)}")  # fmt: skip
    q = q.to(torch.int32)
    full = k // 128 * 128
    blocks = q[:, :full].reshape(n, full // 128, 4, 32)  # [N, K/128, nibble, word]
    words = blocks[:, :, 0] | blocks[:, :, 1] << 4 | blocks[:, :, 2] << 8 | blocks[:, :, 3] << 12  # [N, K/128, 32]
    parts = [torch.stack([words & 255, words >> 8], dim=-1).reshape(n, -1)]  # little-endian 16-bit words
    if full < k:  # the last 64 inputs: bytes j = q[j] | q[32 + j] << 4
        tail = q[:, full:].reshape(n, 2, 32)
        parts.append(tail[:, 0] | tail[:, 1] << 4)
    packed = torch.cat(parts, dim=1).to(torch.uint8).contiguous()
    return packed, torch.stack([scale, zero], dim=1).contiguous()


def check_shape(k: int, group_size: int) -> None:
    """:class:`ShapeError` unless the kernel takes ``K = k`` inputs in groups of ``group_size``: ``K`` a multiple of
    64, ``group_size`` one of :data:`archlab.quant.GROUP_SIZES` dividing ``K``."""
    from archlab.quant import GROUP_SIZES

    if k % BLOCK or group_size not in GROUP_SIZES or k % group_size:
        raise ShapeError(f"archlab's int4 kernel takes K a multiple of {BLOCK} and group_size in {GROUP_SIZES} "
                         f"dividing K; got K={k}, group_size={group_size}")  # fmt: skip


def check_rows(x: Tensor) -> None:
    """:class:`ShapeError` unless ``x`` is what the kernels take: float32 or bfloat16 ``[M, K]``, ``M`` in 1..16."""
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.dtype not in (torch.float32, torch.bfloat16):
        raise ShapeError(
            f"x must be float32 or bfloat16 [M, K] with M in 1..{MAX_ROWS}, got {x.dtype} {tuple(x.shape)}"
        )


def int4_rows(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, *, float_out: bool = False
              ) -> Tensor:
    """``x [M, K]`` (float32 / bfloat16, ``M`` in 1..16) times the packed int4 ``W [N, K]`` transposed: ``[M, N]``
    in ``x``'s dtype, or with ``float_out`` the float32 sums themselves (an LM head's logits: they round to the
    bfloat16 result). Checks its arguments (:class:`ShapeError`), then :func:`load` and the op."""
    check_rows(x)
    n, half = packed.shape
    check_shape(x.shape[1], group_size)
    if packed.dtype != torch.uint8 or 2 * half != x.shape[1]:
        raise ShapeError(
            f"packed must be uint8 [N, K/2] = [N, {x.shape[1] // 2}], got {packed.dtype} {tuple(packed.shape)}"
        )
    if tuple(scales_and_zeros.shape) != (n, 2, x.shape[1] // group_size):
        raise ShapeError(f"scales_and_zeros must be [N, 2, K/g] = [{n}, 2, {x.shape[1] // group_size}], "
                         f"got {tuple(scales_and_zeros.shape)}")  # fmt: skip
    load()
    return torch.ops.archlab_kernels.int4_rows(x, packed, scales_and_zeros, group_size, isa(x.dtype), float_out)


def _require_bf16_variant(op: str) -> None:
    """:class:`KernelUnavailable` naming ``op`` unless the AVX512-BF16 variant runs here (:func:`isa` is 513)."""
    if isa(torch.bfloat16) != 513:
        raise KernelUnavailable(f"{op} needs AVX512-BF16 with PyTorch's kernels at AVX-512")


def _fake_int4_dequant(packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    return packed.new_empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.bfloat16)


def int4_dequant(packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """The weights ``W [N, K]`` of :func:`pack_int4`'s ``packed`` and ``scales_and_zeros`` in bfloat16:
    ``(q - 8) s + z`` in one float32 FMA, rounded to nearest even (so ``((q - 8) s + z)`` computed exactly, rounded to
    float32, then to bfloat16). For products of many rows (a prompt's), which oneDNN's bfloat16 matmul computes faster
    than any int4 kernel here; :class:`archlab.quant.Int4Linear` asks for it. AVX512-BF16 only (:func:`isa` is 513),
    else :class:`KernelUnavailable`; :class:`ShapeError` for arguments the kernel does not take."""
    n, half = packed.shape
    check_shape(2 * half, group_size)
    if packed.dtype != torch.uint8 or tuple(scales_and_zeros.shape) != (n, 2, 2 * half // group_size):
        raise ShapeError(f"packed must be uint8 [N, K/2] and scales_and_zeros [N, 2, K/g]; got {packed.dtype} "
                         f"{tuple(packed.shape)} and {tuple(scales_and_zeros.shape)}")  # fmt: skip
    _require_bf16_variant("int4_dequant")
    load()
    return torch.ops.archlab_kernels.int4_dequant(packed, scales_and_zeros, group_size)


def unpack_int4(packed: Tensor) -> Tensor:
    """The levels ``q [N, K]`` (uint8, 0..15) of ``packed [N, K/2]`` (:func:`pack_int4`'s inverse)."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    b = packed.to(torch.int32)
    full = k // 128 * 128
    words = b[:, : full // 2].reshape(n, full // 128, 32, 2)
    words = words[..., 0] | words[..., 1] << 8  # [N, K/128, 32]
    parts = [torch.stack([words >> s & 15 for s in (0, 4, 8, 12)], dim=2).reshape(n, full)]
    if full < k:
        tail = b[:, full // 2 :]  # [N, 32]
        parts.append(torch.cat([tail & 15, tail >> 4], dim=1))
    return torch.cat(parts, dim=1).to(torch.uint8)


# ---- int8 weights as two nibbles ----------------------------------------------------------------------------------

INT8_GROUP = 64  # the nibble matrix's groups: each 64 inputs' hi nibbles, then their lo (one scale each)


def pack_int8(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``W = q s`` (``q [N, K]`` int8 in -127..127, ``scale [N]``) as the int4 matrix ``[N, 2K]`` of its nibbles
    ``u = q + 128 = 16 hi + lo``: the kernel's ``packed [N, K]`` uint8 (:func:`pack_int4`'s layout; block ``c`` of 128
    nibbles holds the ``hi`` of inputs ``64c .. 64c + 63``, then their ``lo``) and ``scales_and_zeros [N, 2, 2K/64]``
    in ``scale``'s dtype (``hi``: ``16 s`` and zero 0; ``lo``: ``s`` and ``8 s``): ``16 s (hi - 8) + s (lo - 8) + 8 s
    = s (u - 128) = q s``, exact in any float dtype. :class:`ShapeError` unless ``K`` is a multiple of 64."""
    n, k = q.shape
    if k % BLOCK or tuple(scale.shape) != (n,):
        raise ShapeError(f"pack_int8 takes q [N, K] with K a multiple of {BLOCK} and scale [N]; got q {tuple(q.shape)} "
                         f"and scale {tuple(scale.shape)}")  # fmt: skip
    u = q.to(torch.int32) + 128
    c = k // INT8_GROUP
    nibbles = torch.stack([(u >> 4).view(n, c, INT8_GROUP), (u & 15).view(n, c, INT8_GROUP)], dim=2).reshape(n, 2 * k)
    s = scale[:, None].expand(n, c)
    scales = torch.stack([16 * s, s], dim=2).reshape(n, 2 * c)
    zeros = torch.stack([torch.zeros_like(s), 8 * s], dim=2).reshape(n, 2 * c)
    return pack_int4(nibbles, scales, zeros, INT8_GROUP)


def _fake_rows(x: Tensor, packed: Tensor, scales: Tensor, isa: int, float_out: bool = False) -> Tensor:
    """Shapes only (torch.compile's tracing) of ``int8_rows``, ``q8_rows`` and ``q4_rows``: ``[M, N]`` in ``x``'s
    dtype (float32 with ``float_out``)."""
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32 if float_out else x.dtype)


def int8_rows(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, *, float_out: bool = False) -> Tensor:
    """``x [M, K]`` (float32 / bfloat16, ``M`` in 1..16) times :func:`pack_int8`'s ``W [N, K]`` transposed: ``[M, N]``
    in ``x``'s dtype (float32 sums with ``float_out``). The int4 kernel's product of ``x`` (each 64 inputs taken
    twice, against the ``hi`` and the ``lo`` nibbles) by the nibble matrix: its arithmetic, row by row the same
    operations whatever ``M``. Checks its arguments (:class:`ShapeError`), then :func:`load` and the op."""
    check_rows(x)
    k = x.shape[1]
    n = packed.shape[0]
    if k % BLOCK or packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k):
        raise ShapeError(f"int8_rows takes x [M, K] with K a multiple of {BLOCK} and packed uint8 [N, K]; got x "
                         f"{tuple(x.shape)} and packed {packed.dtype} {tuple(packed.shape)}")  # fmt: skip
    if tuple(scales_and_zeros.shape) != (n, 2, 2 * k // INT8_GROUP):
        raise ShapeError(f"scales_and_zeros must be [N, 2, 2K/{INT8_GROUP}] = [{n}, 2, {2 * k // INT8_GROUP}], got "
                         f"{tuple(scales_and_zeros.shape)}")  # fmt: skip
    load()
    return torch.ops.archlab_kernels.int8_rows(x, packed, scales_and_zeros, isa(x.dtype), float_out)


def _fake_int8_dequant(packed: Tensor, scale: Tensor) -> Tensor:
    return packed.new_empty(packed.shape, dtype=scale.dtype)


def int8_dequant(packed: Tensor, scale: Tensor) -> Tensor:
    """The weights ``W [N, K] = q s`` of :func:`pack_int8`'s ``packed`` in ``scale``'s dtype (float32 or bfloat16):
    ``q s`` rounded to float32 (exact where ``s`` is bfloat16: 8 by 8 significant bits), then to bfloat16 where that
    is the dtype. For products of many rows (a prompt's), which oneDNN's and MKL's matmuls compute faster than the
    nibbles' kernel; :class:`archlab.quant.Int8Linear` asks for it. AVX512-BF16 only (:func:`isa` is 513), else
    :class:`KernelUnavailable`; :class:`ShapeError` for arguments it does not take."""
    n, k = packed.shape
    if k % BLOCK or packed.dtype != torch.uint8 or tuple(scale.shape) != (n,):
        raise ShapeError(f"int8_dequant takes packed uint8 [N, K] with K a multiple of {BLOCK} and scale [N]; got "
                         f"{packed.dtype} {tuple(packed.shape)} and {tuple(scale.shape)}")  # fmt: skip
    if scale.dtype not in (torch.float32, torch.bfloat16):
        raise ShapeError(f"int8_dequant's scale must be float32 or bfloat16, got {scale.dtype}")
    _require_bf16_variant("int8_dequant")
    load()
    return torch.ops.archlab_kernels.int8_dequant(packed, scale)


# ---- Q8_0 rows ---------------------------------------------------------------------------------------------------

Q8_BLOCK = 32  # inputs per block: one weight scale per row and block, one activation scale per block
Q8_TILE = 16  # output rows per tile of the packed layout: N must be a multiple of it


def q8_isa() -> int:
    """The variant of :func:`q8_rows` on this CPU, after the cap on PyTorch's kernels (``ATEN_CPU_CAPABILITY``):
    512 (AVX512-VNNI) or 256 (AVX2); :class:`KernelUnavailable` below AVX2. Both give the same integer sums and add
    them in the same order: the same result to the bit."""
    cap = kernel_capability()
    if cap == "AVX512" and cpu_features()["vnni"]:
        return 512
    if cap in ("AVX512", "AVX2"):
        return 256
    raise KernelUnavailable(f"archlab's Q8_0 kernel needs AVX2 or AVX-512; PyTorch's CPU kernels run at {cap}")




def check_q8_shape(n: int, k: int) -> None:
    """:class:`ShapeError` unless the Q8_0 kernel takes ``W [N, K] = [n, k]``: ``N`` a multiple of 16, ``K`` of 32."""
    if n % Q8_TILE or k % Q8_BLOCK or n < 1 or k < 1:
        raise ShapeError(f"archlab's Q8_0 kernel takes W [N, K] with N a multiple of {Q8_TILE} and K a multiple of "
                         f"{Q8_BLOCK}; got [{n}, {k}]")  # fmt: skip


def pack_q8(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``q [N, K]`` int8 (-127..127) and ``scale [N, K/32]`` -> the kernel's ``packed [N, K]`` uint8 (``q + 128``,
    tiles of 16 rows, each 4 inputs of the tile's rows in one 64-byte line) and ``scales [N/16, K/32, 16]`` float32
    (``q8_rows.cpp`` describes the layout)."""
    n, k = q.shape
    check_q8_shape(n, k)
    if tuple(scale.shape) != (n, k // Q8_BLOCK):
        raise ShapeError(f"scale must be [N, K/32] = [{n}, {k // Q8_BLOCK}], got {tuple(scale.shape)}")
    u = (q.to(torch.int16) + 128).to(torch.uint8)  # [N, K]
    tiles = u.reshape(n // Q8_TILE, Q8_TILE, k // 4, 4).transpose(1, 2)  # [N/16, K/4, 16, 4]
    packed = tiles.contiguous().reshape(n, k)
    scales = scale.float().reshape(n // Q8_TILE, Q8_TILE, k // Q8_BLOCK).transpose(1, 2).contiguous()
    return packed, scales


def round_rows_q8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` rounded per block of 32 inputs as the kernel rounds it (llama.cpp's Q8_0 rule):
    ``d = max |x| / 127`` per block, ``p = round(x (1 / d))`` (half to even, in float32; 0 where ``d = 0``).
    Returns ``p [M, K]`` (float32 holding integers in -127..127) and ``d [M, K/32]`` float32."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // Q8_BLOCK, Q8_BLOCK)
    d = blocks.abs().amax(dim=2) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    p = torch.round(blocks * inv[..., None]).clamp_(-127, 127)
    return p.reshape(m, k), d


def q8_rows(x: Tensor, packed: Tensor, scales: Tensor, *, float_out: bool = False) -> Tensor:
    """``x [M, K]`` (float32 / bfloat16, ``M`` in 1..16) times the packed Q8_0 ``W [N, K]`` transposed:
    ``[M, N]`` in ``x``'s dtype, or with ``float_out`` float32 (``q8_rows.cpp``'s equation: ``x`` rounded by
    :func:`round_rows_q8`, the block terms summed in float32: ``float_out`` keeps that sum, an LM head's logits).
    Checks its arguments (:class:`ShapeError`), then :func:`load` and the op."""
    check_rows(x)
    n, k = packed.shape
    check_q8_shape(n, k)
    if packed.dtype != torch.uint8 or k != x.shape[1]:
        raise ShapeError(f"packed must be uint8 [N, K] = [N, {x.shape[1]}], got {packed.dtype} {tuple(packed.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (n // Q8_TILE, k // Q8_BLOCK, Q8_TILE):
        raise ShapeError(f"scales must be float32 [N/16, K/32, 16] = [{n // Q8_TILE}, {k // Q8_BLOCK}, {Q8_TILE}], "
                         f"got {scales.dtype} {tuple(scales.shape)}")  # fmt: skip
    load()
    return torch.ops.archlab_kernels.q8_rows(x, packed, scales, q8_isa(), float_out)


# ---- Q4 x Q8 rows --------------------------------------------------------------------------------------------------


def pack_q4(q: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """``q [N, K]`` (0..15), ``scale``, ``zero [N, K/32]`` (:class:`archlab.quant.Int4Weight` in groups of 32) -> the
    Q4 kernel's ``packed [N, K/2]`` uint8 (tiles of 16 rows; each 8 inputs of the tile's rows in one 64-byte line,
    byte ``j`` of a row holding inputs ``j`` and ``4 + j`` in its low and high nibbles) and ``scales_and_zeros
    [N/16, K/32, 2, 16]`` float32 (``q8_rows.cpp`` describes the layout)."""
    n, k = q.shape
    check_q8_shape(n, k)
    if tuple(scale.shape) != (n, k // Q8_BLOCK) or tuple(zero.shape) != tuple(scale.shape):
        raise ShapeError(f"scale and zero must be [N, K/32] = [{n}, {k // Q8_BLOCK}], got {tuple(scale.shape)} and "
                         f"{tuple(zero.shape)}")  # fmt: skip
    lines = q.to(torch.uint8).reshape(n // Q8_TILE, Q8_TILE, k // 8, 2, 4).permute(0, 2, 1, 3, 4)  # [., K/8, 16, 2, 4]
    packed = (lines[..., 0, :] | lines[..., 1, :] << 4).contiguous().reshape(n, k // 2)
    sz = torch.stack([scale.float(), zero.float()], dim=1)  # [N, 2, K/32]
    return packed, sz.reshape(n // Q8_TILE, Q8_TILE, 2, k // Q8_BLOCK).permute(0, 3, 2, 1).contiguous()


def unpack_q4(packed: Tensor, scales_and_zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`pack_q4`'s inverse: ``(q [N, K] uint8, scale, zero [N, K/32] float32)``."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    lines = packed.reshape(n // Q8_TILE, k // 8, Q8_TILE, 1, 4)
    q = torch.cat([lines & 15, lines >> 4], dim=3).permute(0, 2, 1, 3, 4).reshape(n, k)
    sz = scales_and_zeros.permute(0, 3, 2, 1).reshape(n, 2, k // Q8_BLOCK)
    return q, sz[:, 0].contiguous(), sz[:, 1].contiguous()


def q4_rows(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, *, float_out: bool = False) -> Tensor:
    """``x [M, K]`` (float32 / bfloat16, ``M`` in 1..16) times :func:`pack_q4`'s ``W [N, K]`` transposed: ``[M, N]``
    in ``x``'s dtype, or with ``float_out`` float32. llama.cpp's Q4 x Q8 (``q8_rows.cpp``): ``x`` rounded by
    :func:`round_rows_q8`, each block's integer sum exact, the block terms added in float32 in block order; the same
    result to the bit on AVX512-VNNI and AVX2 (:func:`q8_isa`). Checks its arguments (:class:`ShapeError`), then
    :func:`load` and the op."""
    check_rows(x)
    n, k = packed.shape[0], x.shape[1]
    check_q8_shape(n, k)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n, k // 2):
        raise ShapeError(f"packed must be uint8 [N, K/2] = [N, {k // 2}], got {packed.dtype} {tuple(packed.shape)}")
    want = (n // Q8_TILE, k // Q8_BLOCK, 2, Q8_TILE)
    if scales_and_zeros.dtype != torch.float32 or tuple(scales_and_zeros.shape) != want:
        raise ShapeError(f"scales_and_zeros must be float32 [N/16, K/32, 2, 16] = {list(want)}, got "
                         f"{scales_and_zeros.dtype} {tuple(scales_and_zeros.shape)}")  # fmt: skip
    load()
    return torch.ops.archlab_kernels.q4_rows(x, packed, scales_and_zeros, q8_isa(), float_out)


# ---- float32 rows ------------------------------------------------------------------------------------------------

F32_MAX_ROWS = 16  # rows of x per call
F32_LANES = 16  # K must be a multiple of it


def f32_isa() -> int:
    """The variant of :func:`f32_rows` on this CPU, after the cap on PyTorch's kernels (``ATEN_CPU_CAPABILITY``):
    512 (AVX-512) or 256 (AVX2 + FMA), the same result to the bit; :class:`KernelUnavailable` below AVX2."""
    cap = kernel_capability()
    if cap == "AVX512":
        return 512
    if cap == "AVX2":
        return 256
    raise KernelUnavailable(f"archlab's float32 kernel needs AVX2 or AVX-512; PyTorch's CPU kernels run at {cap}")


def _fake_f32_rows(x: Tensor, weight: Tensor, bias: Tensor | None, isa: int) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[..., N]`` float32."""
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _rows_problem(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, most: int, multiple: int
                  ) -> str | None:
    """What :func:`f32_rows_problem` and :func:`bf16_rows_problem` check: ``x [..., K]`` of 1..``most`` rows,
    ``weight [N, K]`` contiguous, ``K`` a positive multiple of ``multiple``, ``bias [N]``, all ``dtype``, on the CPU."""
    name = str(dtype).removeprefix("torch.")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return f"x and weight must be on the CPU, got {x.device} and {weight.device}"
    rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if not 1 <= rows <= most or x.dtype != dtype:
        return f"x must be {name} [..., K] with 1..{most} rows, got {x.dtype} {tuple(x.shape)}"
    k = x.shape[-1]
    if weight.dtype != dtype or weight.ndim != 2 or weight.shape[1] != k or k % multiple:
        return (f"weight must be {name} [N, K] = [N, {k}] with K a positive multiple of {multiple}, "
                f"got {weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    if not weight.is_contiguous():
        return "weight must be contiguous (the kernel reads its rows in place)"
    if bias is not None and (bias.dtype != dtype or tuple(bias.shape) != (weight.shape[0],)):
        return f"bias must be {name} [N] = [{weight.shape[0]}], got {bias.dtype} {tuple(bias.shape)}"
    return None


def f32_rows_problem(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str | None:
    """Why :func:`f32_rows` cannot take these arguments (the argument, its value and what is allowed), or None: the
    one check behind :func:`f32_rows`'s errors and :func:`archlab.nn.linear.linear`'s choice of the kernel."""
    return _rows_problem(x, weight, bias, torch.float32, F32_MAX_ROWS, F32_LANES)


def f32_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [..., K]`` float32 (1..16 rows in all) times ``weight [N, K]`` transposed, plus ``bias [N]``: ``[..., N]``
    float32 (module docstring). Checks its arguments (:class:`ShapeError`, :func:`f32_rows_problem`), then
    :func:`load` and the op."""
    problem = f32_rows_problem(x, weight, bias)
    if problem is not None:
        raise ShapeError(problem)
    load()
    return torch.ops.archlab_kernels.f32_rows(x, weight, bias, f32_isa())


@functools.cache
def _f32_kernel() -> int:
    try:
        variant = f32_isa()
        load()
    except KernelUnavailable as e:
        warnings.warn(f"{e}; float32 decoding products and attention use PyTorch's ops instead", stacklevel=3)
        return 0
    return variant


def compile_constant(fn):
    """``fn``, marked for ``torch.compile`` as returning a constant (called once, when a graph is traced): the mark
    :func:`torch.compiler.assume_constant_result` sets, set here without importing ``torch._dynamo``, which that
    function imports (1.0 s of every archlab start on 2 cores, where only ``--compile`` needs it).
    ``tests/test_cli.py`` checks that it is torch's mark."""
    fn._dynamo_marked_constant = True
    return fn


@compile_constant
def f32_kernel() -> int:
    """The variant (:func:`f32_isa`: 512 or 256) :func:`f32_rows` and :func:`cached_attention` run in this
    process, or 0 where the kernels cannot be built or run (a warning, once: their callers take PyTorch's ops).
    The first call on a machine builds the library (about a minute; cached on disk after). Under
    ``torch.compile`` it is read once, when the graph is traced."""
    return _f32_kernel()


# ---- bfloat16 rows -----------------------------------------------------------------------------------------------

BF16_MAX_ROWS = 16  # rows of x per call
BF16_BLOCK = 32  # K must be a multiple of it


def _fake_bf16_rows(x: Tensor, weight: Tensor, bias: Tensor | None, float_out: bool = False) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[..., N]`` bfloat16, or float32 with ``float_out``."""
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32 if float_out else torch.bfloat16)


def bf16_rows_problem(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str | None:
    """Why :func:`bf16_rows` cannot take these arguments (the argument, its value and what is allowed), or None: the
    one check behind :func:`bf16_rows`'s errors and :func:`archlab.nn.linear.linear`'s choice of the kernel."""
    return _rows_problem(x, weight, bias, torch.bfloat16, BF16_MAX_ROWS, BF16_BLOCK)


def bf16_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, float_out: bool = False) -> Tensor:
    """``x [..., K]`` bfloat16 (1..16 rows in all) times ``weight [N, K]`` bfloat16 transposed, plus ``bias [N]``:
    ``[..., N]`` bfloat16, each product exact, the sums in float32, rounded to bfloat16 once (module docstring);
    ``float_out``: the float32 sums themselves, not rounded (an LM head's logits:
    :func:`archlab.nn.linear.head_logits`), the same values the bfloat16 result rounds. Checks its arguments
    (:class:`ShapeError`, :func:`bf16_rows_problem`) and that the CPU computes bfloat16 (:class:`KernelUnavailable`),
    then :func:`load` and the op."""
    problem = bf16_rows_problem(x, weight, bias)
    if problem is not None:
        raise ShapeError(problem)
    if not _bf16_native():
        raise KernelUnavailable(f"archlab's bfloat16 kernel needs AVX512-BF16 with PyTorch's CPU kernels at AVX-512; "
                                f"this CPU runs them at {kernel_capability()}"
                                f"{'' if cpu_features()['avx512_bf16'] else ' and has no AVX512-BF16'}")  # fmt: skip
    load()
    return torch.ops.archlab_kernels.bf16_rows(x, weight, bias, float_out)


def _bf16_native() -> bool:
    return kernel_capability() == "AVX512" and bool(cpu_features()["avx512_bf16"])


@compile_constant
def bf16_kernel() -> bool:
    """Whether :func:`bf16_rows` runs in this process: the CPU has AVX512-BF16, PyTorch's kernels are not capped
    below AVX-512, and the library builds (else a warning, once, from :func:`f32_kernel`). Read once under
    ``torch.compile``, when the graph is traced."""
    return _bf16_native() and f32_kernel() != 0


#: the dtypes the attention and RMSNorm kernels take (bfloat16 widened exactly as it is read, the result rounded once)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

#: the most queries per head attend() hands to the cached-attention kernels (a decoding step, a verify pass)
CACHED_MAX_QUERIES = 16


def flop_counter(**kwargs):
    """``torch.utils.flop_counter.FlopCounterMode(**kwargs)`` that counts archlab's ops too. The mode copies torch's
    table of FLOP formulas when it is made, and this library registers its ops' formulas when it loads, which is at
    its first use: inside the mode, in a fresh process, the formulas came too late and the kernels' products counted
    0 FLOPs (``archlab lab attention-vs-recurrence`` at N = 16). So the library is loaded first, where it can be."""
    from torch.utils.flop_counter import FlopCounterMode

    f32_kernel()
    return FlopCounterMode(**kwargs)


def _fake_cached_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float, isa: int) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[B, A, N, Dv]``."""
    return q.new_empty(*q.shape[:3], v.shape[3])


def cached_attention_problem(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why :func:`cached_attention` cannot take these tensors (what it takes and what they are), or None."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return f"q, k, v must be tensors, got {type(q).__name__}, {type(k).__name__}, {type(v).__name__}"
    shapes = q.ndim == k.ndim == v.ndim == 4 and q.shape[2] >= 1 and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0
    dtypes = q.dtype == k.dtype == v.dtype and q.dtype in KERNEL_DTYPES
    if not shapes or not dtypes or not q.device.type == k.device.type == v.device.type == "cpu" \
            or q.shape[3] % F32_LANES or v.shape[3] % F32_LANES:  # fmt: skip
        return (f"q must be [B, A, N, D], k [B, G, L, D], v [B, G, L, Dv], all float32 or all bfloat16, on the CPU "
                f"with A a multiple of G and D, Dv multiples of {F32_LANES}; got q {q.dtype} {tuple(q.shape)} on "
                f"{q.device}, k {k.dtype} {tuple(k.shape)}, v {v.dtype} {tuple(v.shape)}")  # fmt: skip
    return None


def cached_attention_serves(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`cached_attention` takes these (:func:`cached_attention_problem`), no gradient is recorded (it has
    no backward), and the kernel runs here (:func:`f32_kernel`)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return cached_attention_problem(q, k, v) is None and f32_kernel() != 0


def _positions_problem(positions: Tensor, length: int, n: int) -> str | None:
    """Why ``positions`` is not the last query's position ``p`` (int64 ``[1]`` on the CPU, ``n - 1 <= p < length``)."""
    if not isinstance(positions, Tensor):
        return f"positions must be an int64 tensor [1] on the CPU, got {type(positions).__name__} {positions!r}"
    if positions.dtype != torch.int64 or positions.numel() != 1 or positions.device.type != "cpu":
        return (f"positions must be int64 [1] on the CPU, got {positions.dtype} {tuple(positions.shape)} "
                f"on {positions.device}")  # fmt: skip
    p = int(positions.reshape(-1)[0])
    if not 0 <= p < length:
        return f"positions[0]={p} is outside the cache's {length} positions (0..{length - 1})"
    if p < n - 1:
        return f"positions[0]={p} leaves no key for the first of the {n} queries (positions {p - n + 1}..{p})"
    return None


def cached_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
    r"""The attention of the last ``N`` positions' queries over a KV cache: query ``i`` (at position ``p - N + 1 + i``,
    ``p = positions[0]``) takes ``softmax(q k^T / \sqrt{D})`` over the keys ``0..p - N + 1 + i`` (causal; the keys after
    ``p`` are not read), times ``v``: ``q [B, A, N, D]``, ``k [B, G, L, D]``, ``v [B, G, L, Dv]`` float32 or bfloat16
    (:data:`KERNEL_DTYPES`; ``A / G`` query heads share a key head) -> ``[B, A, N, Dv]`` in their dtype (bfloat16:
    computed in float32, rounded once); ``F.scaled_dot_product_attention`` under that mask, float rounding aside
    (``cached_attention.cpp``). Each query's result is the same to the bit whatever ``N`` is: a
    speculative verify pass gives the positions the values one-token steps give them. :class:`ShapeError`
    (:func:`cached_attention_problem`, the position), then :func:`load` and the op."""
    problem = cached_attention_problem(q, k, v) or _positions_problem(positions, k.shape[2], q.shape[2])
    if problem is not None:
        raise ShapeError(problem)
    load()
    return torch.ops.archlab_kernels.cached_attention(q, k, v, positions, q.shape[3] ** -0.5, f32_isa())


def _fake_cached_attention_padded(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, positions: Tensor, scale: float,
                                  isa: int) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[B, A, N, Dv]``."""
    return q.new_empty(*q.shape[:3], v.shape[3])


def cached_attention_padded_problem(q: Tensor, k: Tensor, v: Tensor, starts: Tensor,
                                    positions: Tensor) -> str | None:
    """Why :func:`cached_attention_padded` cannot take these tensors (the argument, its value and what is allowed),
    or None: :func:`cached_attention_problem`, then ``positions`` int64 ``[1]`` with ``p`` in ``N - 1..L - 1``, and
    ``starts`` int64 ``[B]`` in ``0..p - N + 1`` (the first query's position), both on the CPU."""
    n = q.shape[2] if q.ndim == 4 else 1
    problem = cached_attention_problem(q, k, v) or _positions_problem(positions, k.shape[2], n)
    if problem is not None:
        return problem
    b, first = q.shape[0], int(positions.reshape(-1)[0]) - n + 1
    if not isinstance(starts, Tensor) or starts.dtype != torch.int64 or tuple(starts.shape) != (b,) \
            or starts.device.type != "cpu":  # fmt: skip
        got = f"{starts.dtype} {tuple(starts.shape)} on {starts.device}" if isinstance(starts, Tensor) else repr(starts)
        return f"starts must be int64 [B] = [{b}] on the CPU (a start per row), got {got}"
    outside = ((starts < 0) | (starts > first)).nonzero()
    if len(outside):
        row = int(outside[0, 0])
        return (f"starts[{row}]={int(starts[row])} is outside 0..{first}: each row's query i reads its keys "
                f"starts[b]..positions[0] - N + 1 + i, at least one")  # fmt: skip
    return None


def cached_attention_padded(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, positions: Tensor,
                            scale: float | None = None) -> Tensor:
    r""":func:`cached_attention` for a left-padded batch: row ``b``'s query ``i`` takes ``softmax(q k^T scale)`` over
    its keys ``starts[b]..p - N + 1 + i`` only (``p = positions[0]``; ``scale`` default ``1/\sqrt{D}``), times ``v``:
    ``q [B, A, N, D]``, ``k [B, G, L, D]``, ``v [B, G, L, Dv]`` float32 or bfloat16 (``A / G`` query heads share a
    key head; the last dimension contiguous, any other strides read in place), ``starts [B]`` int64 ->
    ``[B, A, N, Dv]``;
    ``F.scaled_dot_product_attention`` under that mask, float rounding aside (``cached_attention.cpp``): a left-padded
    batch's decoding step. :class:`ShapeError` (:func:`cached_attention_padded_problem`), then :func:`load` and the
    op."""
    problem = cached_attention_padded_problem(q, k, v, starts, positions)
    if problem is not None:
        raise ShapeError(problem)
    load()
    scale = q.shape[3] ** -0.5 if scale is None else scale
    return torch.ops.archlab_kernels.cached_attention_padded(q, k, v, starts, positions, scale, f32_isa())


# ---- RMSNorm -------------------------------------------------------------------------------------------------------


def _fake_rms_norm(x: Tensor, weight: Tensor, eps: float, isa: int) -> Tensor:
    """Shapes only (torch.compile's tracing): ``x``'s."""
    return torch.empty_like(x)


def shift_rows(stored: list[Tensor], shifts: list[int], length: int) -> None:
    """In every tensor ``t [B, G, C, D]`` of ``stored`` (a KV cache's storages, ``C >= length``), for each row ``b``
    with ``e = shifts[b] > 0``: ``t[b, :, e:length] = t[b, :, :length - e]`` (as they were), ``t[b, :, :e] = 0``.
    One op (``shift_rows.cpp``) where the kernels are built and every tensor is on the CPU with its positions
    contiguous in each row and head; PyTorch slices otherwise (about 10 us each; the same values)."""
    if not stored or not any(shifts):
        return
    if f32_kernel() and all(t.device.type == "cpu" and t.ndim == 4 and t.stride(3) == 1
                            and (t.shape[2] <= 1 or t.stride(2) == t.shape[3]) for t in stored):  # fmt: skip
        torch.ops.archlab_kernels.shift_rows(stored, list(shifts), length)
        return
    for t in stored:
        for b, e in enumerate(shifts):
            if e:
                kept = t[b, :, : length - e].clone()
                t[b, :, e:length] = kept
                t[b, :, :e] = 0


def rms_norm_problem(x: Tensor, weight: Tensor) -> str | None:
    """Why :func:`rms_norm` cannot take these tensors (what it takes and what they are), or None."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        return f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}"
    d = x.shape[-1] if x.ndim else 0
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or x.device.type != "cpu" \
            or weight.device.type != "cpu" or tuple(weight.shape) != (d,) or d == 0 or d % F32_LANES:  # fmt: skip
        return (f"x [..., d] and weight [d] must be both float32 or both bfloat16, on the CPU, d a positive multiple "
                f"of {F32_LANES}; "
                f"got x {x.dtype} {tuple(x.shape)} on {x.device}, weight {weight.dtype} {tuple(weight.shape)} on "
                f"{weight.device}")  # fmt: skip
    return None


def rms_norm_serves(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`rms_norm` takes these (:func:`rms_norm_problem`) in eager inference: no gradient recorded (it
    has no backward), not under ``torch.compile`` (inductor fuses the norm itself), the kernel built here."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return not torch.compiler.is_compiling() and rms_norm_problem(x, weight) is None and f32_kernel() != 0


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    r"""RMSNorm of each row of ``x [..., d]``: ``(x / \sqrt{mean(x^2) + eps}) weight`` -> ``[..., d]`` in ``x``'s dtype
    (float32, or bfloat16 computed in float32 and rounded once, as PyTorch rounds it),
    ``F.rms_norm(x, (d,), weight, eps)`` float rounding aside (``rms_norm.cpp``). :class:`ShapeError`
    (:func:`rms_norm_problem`), then :func:`load` and the op."""
    problem = rms_norm_problem(x, weight)
    if problem is not None:
        raise ShapeError(problem)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ConfigError(f"eps={eps!r}: RMSNorm's eps must be a finite number >= 0")
    load()
    return torch.ops.archlab_kernels.rms_norm(x, weight, float(eps), f32_isa())
