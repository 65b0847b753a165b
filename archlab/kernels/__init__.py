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

The op is registered with a fake (meta) implementation, so ``torch.compile`` keeps it as one opaque call.
:func:`load` builds the library once per machine and source (cache: ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``); where it cannot (no compiler, no ninja), it raises :class:`KernelUnavailable`.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from archlab.errors import ArchlabError, ShapeError
from archlab.hardware import cpu_features, kernel_capability

MAX_ROWS = 16  # rows of x per call (the kernel's check; a prompt goes to other kernels)
BLOCK = 64  # inputs per 32-byte run of the packed layout: K must be a multiple of it
SOURCE = Path(__file__).with_name("int4_rows.cpp")
SOURCES = (SOURCE, Path(__file__).with_name("q8_rows.cpp"))  # one library: both ops


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
        torch.library.register_fake("archlab_kernels::int4_rows")(_fake_int4_rows)
        torch.library.register_fake("archlab_kernels::q8_rows")(_fake_q8_rows)
        _fake_registered.append(True)


_fake_registered: list[bool] = []


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


def _fake_int4_rows(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int, isa: int) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[M, N]`` in ``x``'s dtype."""
    return x.new_empty(x.shape[0], packed.shape[0])


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


def int4_rows(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """``x [M, K]`` (float32 / bfloat16, ``M`` in 1..16) times the packed int4 ``W [N, K]`` transposed: ``[M, N]``
    in ``x``'s dtype. Checks its arguments (:class:`ShapeError`), then :func:`load` and the op."""
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
    return torch.ops.archlab_kernels.int4_rows(x, packed, scales_and_zeros, group_size, isa(x.dtype))


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


def _fake_q8_rows(x: Tensor, packed: Tensor, scales: Tensor, isa: int) -> Tensor:
    """Shapes only (torch.compile's tracing): ``[M, N]`` in ``x``'s dtype."""
    return x.new_empty(x.shape[0], packed.shape[0])


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


def q8_rows(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """``x [M, K]`` (float32 / bfloat16, ``M`` in 1..16) times the packed Q8_0 ``W [N, K]`` transposed:
    ``[M, N]`` in ``x``'s dtype (``q8_rows.cpp``'s equation: ``x`` rounded by :func:`round_rows_q8`, the block terms
    summed in float32). Checks its arguments (:class:`ShapeError`), then :func:`load` and the op."""
    check_rows(x)
    n, k = packed.shape
    check_q8_shape(n, k)
    if packed.dtype != torch.uint8 or k != x.shape[1]:
        raise ShapeError(f"packed must be uint8 [N, K] = [N, {x.shape[1]}], got {packed.dtype} {tuple(packed.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (n // Q8_TILE, k // Q8_BLOCK, Q8_TILE):
        raise ShapeError(f"scales must be float32 [N/16, K/32, 16] = [{n // Q8_TILE}, {k // Q8_BLOCK}, {Q8_TILE}], "
                         f"got {scales.dtype} {tuple(scales.shape)}")  # fmt: skip
    load()
    return torch.ops.archlab_kernels.q8_rows(x, packed, scales, q8_isa())
