r"""``y = x W^T + b`` for decoding: matrix-vector products that use every CPU thread.

Decoding one token multiplies a single row ``x [1, d_in]`` by every weight matrix ``W [d_out, d_in]``:
it reads each weight once and does 2 FLOPs per 4-byte float, so its speed is the speed at which the
weights stream from memory. PyTorch's CPU ``F.linear`` hands such a product to one BLAS
matrix-vector kernel that runs on **one thread** (measured here: 10 GB/s with 1 thread or 2, where
a plain ``W.sum()`` reads 74 GB/s with 2). The remedies, written once here:

* :func:`linear` runs a product of at most :data:`archlab.kernels.F32_MAX_ROWS` float32 rows on a CPU through
  archlab's float32 kernel (:func:`archlab.kernels.f32_rows`): ``W`` read in place, the output rows split over the
  threads, each row's weights one sequential stream (from 2 rows on AVX-512, tiles of rows held in registers; past
  :data:`KERNEL_FIRST_ROWS` rows a oneDNN-packed copy of ``W`` is taken instead where one exists, below). gpt-mini's
  ``[50304, 384]`` LM head took 1.7 ms against 4.2 ms for the split ``torch.bmm`` below, and a ``[1536, 384]`` block
  matrix 18 against 41 us (2 threads, AMD EPYC kind).
  The kernel gives the same result to the bit on AVX-512 and AVX2 CPUs. It serves where archlab's kernels run
  (:func:`archlab.kernels.f32_kernel`: built at first use; without a compiler a warning says so once), ``K`` is a
  multiple of 16, ``W`` is contiguous and no gradient is recorded (it has no backward).
* A bfloat16 product of 1-16 rows (a bf16 model's decoding step, verify pass or batch step) runs on archlab's
  bfloat16 kernel (:func:`archlab.kernels.bf16_rows`) where the CPU has AVX512-BF16: ``W`` read in place, each
  pair of inputs multiplied exactly by ``vdpbf16ps``, the sums in float32, rounded once; SmolLM2-135M's 121
  matrices at one row in 6.3 ms against 12.9 for the float32 kernel on float32 weights and 21.3 for ``F.linear``
  in bf16 (2 threads, AMD EPYC AVX512-BF16), so a bf16 model (``precision="auto"``'s choice on such a CPU) decodes
  faster than float32 instead of slower. From 2 rows it yields to a oneDNN-packed bf16 copy where one exists (made
  only where the CPU has AMX: :func:`packs_bf16`; not measured against the kernel there).
* An LM head (:func:`Linear` with ``head=True``, the decoder-only models' ``lm_head``) gives float32 logits from
  bfloat16 activations, the kernel's float32 sums not rounded (:func:`head_logits`): 8-bit logits tie where a
  model's two best tokens are close, and greedy decoding then takes the lower id.
* Where no kernel serves (float64, bfloat16 without AVX512-BF16, a product that needs gradients), :func:`linear`
  splits the output
  features into ``k = torch.get_num_threads()`` blocks and runs them as one batched product (``torch.bmm`` spreads a batch over the threads): ``W`` viewed as
  ``[k, d_out / k, d_in]``, no copy. :func:`Linear` makes an ``nn.Linear`` with this forward; the
  attention, feed-forward and output layers of archlab's Transformers are made by it.
* :class:`PackedLinear` stores a copy of ``W`` as ``[k, d_in, d_out / k]`` (each block transposed
  and contiguous), the layout the kernel streams fastest (about 2x the row-major one, measured on a
  ``50304 x 384`` LM head). It is a snapshot for inference: a GPT's decoding cache packs the LM head
  in it once per generation, the largest matrix a step reads.

A product of a few rows (a batch of prompts decoded together, a speculative verify pass of ``k + 1``
tokens) is no better served by ``F.linear``: measured on SmolLM2-135M's layers, 10 rows cost 2-3.5x one
row where they stream the same weights (the BLAS repacks ``W`` on every call). :func:`packed_for_rows`
gives every float32 layer of a model, for the duration of a ``with`` block, a copy of ``W`` in oneDNN's
own blocked layout; :func:`linear` then runs every product of 2 rows or more that archlab's float32 kernel does
not take first (it takes 1-:data:`KERNEL_FIRST_ROWS` rows where it runs: 12 on AVX-512, as fast as oneDNN's copies
or faster over SmolLM2-135M's matrices and slower from 13 rows; 10 on AVX2, even at 11) through oneDNN's matmul on
it (1.2-2.3x faster than ``F.linear`` at 10 rows; the 49,152-row LM head 2x). Where every few-row product is the
kernel's (a speculative verify pass of ``k + 1`` rows, a batch's step of up to 12 rows on AVX-512:
:func:`kernel_takes_rows`), no copy is needed. The same copy serves the prompt's prefill inside the block (1,440
rows: oneDNN 25 ms against MKL's sgemm 31 ms on a ``[1536, 576]`` SmolLM2 layer, one thread on the AMD EPYC kind).
The copies cost the weights' memory again while the block runs.

A prompt's prefill, an uncached forward pass and an evaluation's LM head (float32, more rows than the kernel
takes, no copy) stay on ``F.linear``: oneDNN's matmul on ``W`` as it is ran SmolLM2's prefill 1.15x faster on the
AMD EPYC (AVX-512) kind, but its sums err 1.4-2x more than MKL's sgemm (mean error against float64 over SmolLM2's
shapes, 3-140 rows), enough to put SmolLM2's float32 logits at 4x HF's error on some prompts (2.1e-4 against
4.9e-5 on a French sentence), so it was withdrawn (2026-12-05; ``docs/speed.md``).

All give ``F.linear``'s result up to float rounding (the dot products are the same; only the kernel
that sums them differs). Other inputs with more than :data:`MAX_SPLIT_ROWS` rows (those above, products that
record gradients, float64, small matrices) and CUDA tensors take ``F.linear`` unchanged, and so do products of up
to :data:`MAX_SPLIT_ROWS` rows in single-threaded runs where no kernel above serves them.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab import kernels
from archlab.hardware import cpu_features, kernel_capability

#: inputs with at most this many rows (all dimensions but the last) take the split path
MAX_SPLIT_ROWS = 4
#: below this many weight elements a matrix stays in cache and one kernel call is cheaper
MIN_SPLIT_ELEMENTS = 1 << 16
#: up to this many rows archlab's float32 kernel takes a product even where the weight has a oneDNN-packed copy
#: (:func:`packed_for_rows`), by the kernel's variant (:func:`archlab.kernels.f32_kernel`: 512, 256); past it, up to
#: :data:`archlab.kernels.F32_MAX_ROWS`, only where it has none. Over SmolLM2-135M's 121 matrices at 2 threads (AMD
#: EPYC, in-process rounds, ms, kernel against oneDNN's copies), 2026-12-04 with every tile group prefetching and
#: 3 x 4 tiles past K = 682 (``f32_rows.cpp``): 5 rows 20.7 / 22.4, 9 rows 23.6 / 26.6, 10 rows 23.6 / 25.9, 11 rows
#: 25.5 / 26.8, 12 rows 26.8 / 27.7, 13 rows 30.3 / 29.3, 16 rows 36.0 / 31.4 (before them: 9 rows 27.8 / 27.7,
#: 10 rows 31.5 / 31.5); capped at AVX2 (oneDNN too), with the AVX2 variant's prefetch: 5 rows 20.2 / 32.9, 9 rows
#: 26.1 / 34.9, 10 rows 31.5 / 37.0, 11 rows 37.5 / 37.7, 12 rows 43.2 / 37.1, 16 rows 56.7 / 43.4 (before it: 9 rows
#: 53 / 61, 10 rows 56 / 47).
KERNEL_FIRST_ROWS = {512: 12, 256: 10}

# id(weight) -> (a weak reference to it, its _version when packed, the oneDNN-packed copy)
_ONEDNN_PACKED: dict[int, tuple[weakref.ref, int, Tensor]] = {}


@kernels.compile_constant
def _threads() -> int:
    """The intra-op thread count; under ``torch.compile`` read once, when the graph is traced (a read inside the
    graph would end it). A count changed later leaves compiled products split the old way: the same result."""
    return torch.get_num_threads()


def _f32_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """``F.linear(x, weight, bias)`` on archlab's float32 kernel where it serves (no gradient recorded, arguments it
    takes: :func:`archlab.kernels.f32_rows_problem`, the kernel built here, and past :data:`KERNEL_FIRST_ROWS` rows
    no oneDNN-packed copy of ``weight``), else None."""
    if _records_grad(x, weight, bias):
        return None  # the kernel has no backward
    if kernels.f32_rows_problem(x, weight, bias) is not None or kernels.f32_kernel() == 0:
        return None
    if _rows(x) > KERNEL_FIRST_ROWS[kernels.f32_kernel()] and not torch.compiler.is_compiling() \
            and _onednn_copy(weight, x) is not None:
        return None  # oneDNN's copy is the faster there
    return torch.ops.archlab_kernels.f32_rows(x, weight, bias, kernels.f32_kernel())


def _bf16_product(x: Tensor, weight: Tensor, bias: Tensor | None, float_out: bool = False) -> Tensor | None:
    """``F.linear(x, weight, bias)`` on archlab's bfloat16 kernel where it serves (no gradient recorded, arguments it
    takes: :func:`archlab.kernels.bf16_rows_problem`, a CPU with AVX512-BF16: :func:`archlab.kernels.bf16_kernel`;
    from 2 rows only where ``weight`` has no oneDNN-packed copy, which on a CPU with AMX may be the faster, unless
    ``float_out``), else None. ``float_out``: the float32 sums, not rounded to bfloat16 (:func:`head_logits`)."""
    if x.dtype != torch.bfloat16 or _records_grad(x, weight, bias):
        return None
    if kernels.bf16_rows_problem(x, weight, bias) is not None or not kernels.bf16_kernel():
        return None
    if not float_out and _rows(x) > 1 and not torch.compiler.is_compiling() and _onednn_copy(weight, x) is not None:
        return None
    return torch.ops.archlab_kernels.bf16_rows(x, weight, bias, float_out)


def head_logits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """An LM head's product ``x [..., d] W^T (+ b)`` -> logits ``[..., V]``, float32 where ``x`` is bfloat16 or
    float16 (as llama.cpp keeps them; float32 and float64 stay as they are).

    Logits rounded to bfloat16 keep 8 bits: between 16 and 32 they step by 0.125, so two tokens closer than that
    tie, and greedy decoding takes the one of lower id. SmolLM2-135M-Instruct in bf16 answered "What is the capital
    of France?" with "L'Étoile, la Marseur, la France, la France, ..." because of one: float64 ranks "The" (25.325)
    before "L" (25.243); rounded, both were 25.25. With bfloat16 ``x`` and ``W`` on archlab's kernel (1-16 rows,
    AVX512-BF16) the logits are the kernel's float32 sums themselves (:func:`archlab.kernels.bf16_rows`,
    ``float_out``), which rounded give its bfloat16 result to the bit; more rows (a whole sequence's logits) go
    through it 16 at a time, so each row's logits are the ones a decoding step gives it (168 rows of SmolLM2's
    ``[49152, 576]`` head: 43.9 ms against 28.7 for ``F.linear`` in bf16, 2 threads). Elsewhere (no kernel, a product
    autograd records) :func:`linear`'s result in float32."""
    out = _bf16_product(x, weight, bias, float_out=True)  # 1-16 rows: one call
    if out is None and x.dtype == torch.bfloat16 and x.ndim and _rows(x) > kernels.BF16_MAX_ROWS:
        rows, most = x.reshape(-1, x.shape[-1]), kernels.BF16_MAX_ROWS
        parts = [_bf16_product(rows[i : i + most], weight, bias, float_out=True) for i in range(0, len(rows), most)]
        if parts[0] is not None:  # the kernel serves one chunk, so every chunk (only the row count differs)
            out = torch.cat(parts).reshape(*x.shape[:-1], weight.shape[0])
    if out is not None:
        return out
    out = linear(x, weight, bias)
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def _records_grad(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether autograd would record ``x @ weight.T (+ bias)``: products that need a backward keep ``F.linear``."""
    return torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                        or (bias is not None and bias.requires_grad))  # fmt: skip


def kernel_takes_rows(rows: int) -> bool:
    """Whether archlab's float32 kernel runs here and takes first a float32 product of ``rows`` rows
    (:data:`KERNEL_FIRST_ROWS`): then such products gain nothing from :func:`packed_for_rows`'s copies."""
    return 1 <= rows <= KERNEL_FIRST_ROWS.get(kernels.f32_kernel(), 0)


def _blocks(d_out: int, device: torch.device) -> int:
    """How many output blocks a product is split into (1: don't split)."""
    k = _threads()
    return k if device.type == "cpu" and k > 1 and d_out % k == 0 else 1


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _blocked_product(x: Tensor, blocks: Tensor, bias: Tensor | None) -> Tensor:
    """``x [..., d_in]`` times ``blocks [k, d_in, d_out / k]`` -> ``[..., d_out]`` (+ ``bias [d_out]``)."""
    k, _, width = blocks.shape
    rows = x.reshape(1, -1, x.shape[-1]).expand(k, -1, -1)  # [k, R, d_in]
    out = torch.bmm(rows, blocks)  # [k, R, d_out / k]
    out = out.transpose(0, 1).reshape(*x.shape[:-1], k * width)  # a view when R = 1
    return out if bias is None else out + bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., d_in]``, ``weight [d_out, d_in]`` -> ``[..., d_out]``.

    Where archlab's float32 kernel serves it (1-16 float32 rows, past :data:`KERNEL_FIRST_ROWS` only without a
    oneDNN-packed copy; module docstring), the product is the kernel's;
    else with 2 rows or more and a packed copy of ``weight`` (:func:`packed_for_rows`), oneDNN's on that copy; else
    with at most :data:`MAX_SPLIT_ROWS` rows on a multi-threaded CPU,
    it runs as ``k`` blocks of output features, one per thread (see the module docstring); otherwise it is
    ``F.linear``. Traced by ``torch.compile`` (:mod:`archlab.static_decoding`) the packed copies are not used
    (they are eager-side state) and the split is kept, with the thread count read at trace time: without it the
    compiled one-row step was 2x slower than the eager one (gpt-mini, 2 threads).
    """
    d_out, d_in = weight.shape
    out = _f32_product(x, weight, bias) if x.dtype == torch.float32 else _bf16_product(x, weight, bias)
    if out is not None:
        return out
    packed = None if torch.compiler.is_compiling() else _onednn_copy(weight, x)
    if packed is not None:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, d_in), packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], d_out)
    k = _blocks(d_out, x.device)
    small = _rows(x) <= MAX_SPLIT_ROWS and weight.numel() >= MIN_SPLIT_ELEMENTS
    if k == 1 or not small or not weight.is_contiguous() or x.shape[-1] != d_in:
        return F.linear(x, weight, bias)
    return _blocked_product(x, weight.view(k, d_out // k, d_in).transpose(1, 2), bias)


def Linear(  # noqa: N802 - it makes layers, as the class it stands in for
    in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *, head: bool = False
) -> nn.Linear:
    """An ``nn.Linear`` (same parameters, state dict and initialisation) whose forward is :func:`linear`, or with
    ``head`` (an LM head) :func:`head_logits`: float32 logits from bfloat16 activations (:func:`is_logits_head`).

    The layer's type is ``nn.Linear`` itself, not a subclass: PyTorch's tools that match layers by exact
    type (eager and FX quantization: ``quantize_dynamic(model, {nn.Linear})`` replaces every such layer
    by its int8 version) treat it as what it is. Only this instance's ``forward`` is the few-row product
    (a bound method: ``copy.deepcopy`` rebinds it to the copy).
    """
    layer = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    layer.forward = types.MethodType(_logits_forward if head else _linear_forward, layer)
    return layer


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, self.weight, self.bias)


def _logits_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return head_logits(x, self.weight, self.bias)


def is_logits_head(layer: nn.Module) -> bool:
    """Whether ``layer`` is an LM head made by :func:`Linear` with ``head=True`` (forward: :func:`head_logits`)."""
    return getattr(getattr(layer, "forward", None), "__func__", None) is _logits_forward


class PackedLinear:
    """A frozen copy of ``weight [d_out, d_in]`` (and ``bias``) packed for few-row products on CPU.

    ``packed(x)`` equals ``F.linear(x, weight, bias)`` (float rounding aside) for ``x [..., d_in]``.
    The copy costs as much memory as ``weight`` and carries no gradients: build it for one inference
    run. If ``weight`` is changed in place afterwards, calls use ``weight`` itself (correct, unpacked).
    Where the packed copy does not apply (CUDA, one thread, a ``d_out`` not divisible by the thread
    count, a matrix under :data:`MIN_SPLIT_ELEMENTS`, many rows, another dtype, autograd recording a product that needs gradients) the call is
    :func:`linear` on ``weight`` (``F.linear``, or a oneDNN-packed copy of ``weight`` for a few rows).
    A product of 2 rows or more where ``weight`` has a oneDNN-packed copy (:func:`packed_for_rows`) is
    :func:`linear`'s (archlab's float32 kernel for 1-:data:`KERNEL_FIRST_ROWS` rows where it runs, else oneDNN's on
    that copy), as for every other layer: for 2-4 rows of SmolLM2's ``[49152, 576]`` head at 2 threads oneDNN took
    9-18 ms against 26-37 ms on the blocks (best of 60, loaded AMD EPYC). The copy (:attr:`blocks`) is made at the
    first product that reads it, so a decoding cache whose head only serves such products (the rows of
    :func:`archlab.generation.generate_batch`), or products archlab's float32 kernel serves (:func:`linear`: it reads
    ``weight`` in place, 2.4x faster than these blocks on gpt-mini's head), never makes it (113 MB for SmolLM2).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, *, head: bool = False):
        self.weight, self.bias, self.head = weight, bias, head
        self.version = weight._version  # in-place updates (an optimizer step, copy_) bump it
        self._blocks: Tensor | None = None
        self._made = False

    @property
    def blocks(self) -> Tensor | None:
        """The copy ``[k, d_in, d_out / k]`` (``k`` threads at the time it is made), or None where it does not apply;
        made at the first read."""
        if not self._made:
            d_out, d_in = self.weight.shape
            w = self.weight
            k = _blocks(d_out, w.device) if w.numel() >= MIN_SPLIT_ELEMENTS else 1  # small: one call is cheaper
            with torch.no_grad():
                self._blocks = None if k == 1 else w.detach().reshape(k, d_out // k, d_in).transpose(1, 2).contiguous()
            self._made = True
        return self._blocks

    def __call__(self, x: Tensor) -> Tensor:
        if self.head and x.dtype in (torch.bfloat16, torch.float16):
            return head_logits(x, self.weight, self.bias)  # float32 logits (an LM head's, as its forward gives them)
        # archlab's kernels read weight in place: no copy wanted
        product = _f32_product if x.dtype == torch.float32 else _bf16_product
        out = product(x, self.weight, self.bias)
        if out is not None:
            return out
        tracked = _records_grad(x, self.weight)
        compiling = torch.compiler.is_compiling()  # traced: no eager-side state read, no copy made in the graph
        if tracked or self.weight._version != self.version or _rows(x) > MAX_SPLIT_ROWS \
                or (compiling and not self._made) or (not compiling and _onednn_copy(self.weight, x) is not None):
            return linear(x, self.weight, self.bias)
        blocks = self.blocks
        if blocks is None or blocks.shape[0] != torch.get_num_threads() or x.dtype != blocks.dtype:
            return linear(x, self.weight, self.bias)
        return _blocked_product(x, blocks, self.bias)


def onednn_packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed CPU matmul (:func:`packed_for_rows`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_copy(weight: Tensor, x: Tensor) -> Tensor | None:
    """``weight``'s oneDNN-packed copy if it has one that serves ``x`` (2 rows or more of ``weight``'s dtype,
    no gradient recorded, ``weight`` unchanged since packing: ``.float()`` swaps the data and keeps ``_version``, so
    the copy's dtype is checked too), else None."""
    entry = _ONEDNN_PACKED.get(id(weight)) if _ONEDNN_PACKED else None
    if entry is None or entry[0]() is not weight or weight._version != entry[1]:
        return None
    if _rows(x) < 2 or not x.dtype == weight.dtype == entry[2].dtype or x.device.type != "cpu":
        return None
    return None if _records_grad(x, weight) else entry[2]


def _onednn_packed_copies(weights: list[Tensor], rows: int) -> list[Tensor]:
    """oneDNN's packed copy of each ``weight [d_out, d_in]`` (``torch.ops.mkldnn._reorder_linear_weight``, the
    layout chosen for ``rows``-row products), in order; the matrices are spread over ``torch.get_num_threads()``
    Python threads, each reorder on one thread.

    A reorder is a short copy (SmolLM2-135M's 121 matrices: 0.15-0.2 s of one-thread CPU time, plus the page faults
    of 540 MB of new memory) that gains little from oneDNN's own threads: at 2 threads, one call at a time, each
    waited for the second thread. Packing SmolLM2's matrices at 2 threads on the loaded AMD EPYC (load ~7, six
    interleaved rounds): 1.64 s one call at a time (1.10 s CPU), 0.55 s over two Python threads (0.38 s CPU); in a
    quiet window (load 0.2-2) 0.35 s against 0.37 s: no gain without contention. The copies are identical (tested)."""
    threads = min(torch.get_num_threads(), len(weights))
    with torch.no_grad():
        if threads <= 1:
            return [torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows) for w in weights]
        with ThreadPoolExecutor(threads, thread_name_prefix="archlab-pack") as pool:
            return list(pool.map(lambda w: torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows), weights))


def hold_packed_for_rows(owner: object, model: nn.Module, rows: int, *, bf16: bool = False
                         ) -> tuple[int, weakref.finalize]:  # fmt: skip
    """Enter :func:`packed_for_rows` for ``model`` (``bf16`` as there) and keep the block open for ``owner``'s life
    (an encoder, a server's decoding streams): returns how many layers got a copy and the finalizer that closes the
    block, which runs when ``owner`` is collected or when called (to drop the copies sooner)."""
    held = contextlib.ExitStack()
    packed = held.enter_context(packed_for_rows(model, rows, bf16=bf16))
    return packed, weakref.finalize(owner, held.close)


def packs_bf16() -> bool:
    """Whether holders of packed copies (the sentence encoder, the re-ranker) pack bf16 weights too: the CPU has AMX
    tiles and PyTorch's kernels are not capped below AVX-512 (oneDNN refuses bf16 packing there anyway; then
    :func:`packed_for_rows` leaves them unpacked). Packed bf16 encoded 1.29x faster on an AMX Xeon and 0.96-0.99x on
    the AMD EPYC's AVX512-BF16 (:mod:`archlab.interop.sentence`)."""
    return cpu_features()["amx"] and kernel_capability() == "AVX512"


class RefreshedCopies:
    """Packed copies of ``model``'s weights (:func:`hold_packed_for_rows`, ``rows`` and ``bf16`` as there) for a
    holder that may also train those weights (the search engine's re-ranker): :meth:`refresh` before each use makes
    them again when :func:`weights_fingerprint` has changed since they were made, which an optimizer step does,
    fused AdamW included (it leaves ``_version`` as it was, :func:`packed_for_rows`). The copies are dropped when this
    object is collected."""

    def __init__(self, model: nn.Module, rows: int, *, bf16: bool = False):
        self.model, self.rows, self.bf16 = model, rows, bf16
        self.count = 0  # weights with a copy
        self._release: weakref.finalize | None = None
        self._fingerprint: Tensor | None = None

    def refresh(self) -> int:
        """Make the copies if there are none or the weights changed; returns how many weights have one."""
        fingerprint = weights_fingerprint(self.model)
        if self._fingerprint is None or not torch.equal(fingerprint, self._fingerprint):
            if self._release is not None:
                self._release()  # the stale copies go first
            self.count, self._release = hold_packed_for_rows(self, self.model, self.rows, bf16=self.bf16)
            self._fingerprint = fingerprint
        return self.count


def weights_fingerprint(model: nn.Module, samples: int = 16) -> Tensor:
    """``samples`` values of each ``nn.Linear`` weight of ``model``, spread evenly over it, in one tensor: what an
    object holding packed copies of weights that may be trained compares before it uses them. Any optimizer step
    changes them, fused AdamW too, which leaves ``_version`` as it was (:func:`packed_for_rows`); a few hundred reads.
    """
    with torch.no_grad():
        picks = [w.detach().reshape(-1)[:: max(1, w.numel() // samples)][:samples].float()
                 for layer in model.modules() if isinstance(layer, nn.Linear)
                 for w in (layer.weight,)]  # fmt: skip
        return torch.cat(picks) if picks else torch.empty(0)


@contextlib.contextmanager
def packed_for_rows(model: nn.Module, rows: int, *, bf16: bool = False) -> Iterator[int]:
    """Within the block, products of 2 rows or more through ``model``'s layers (a prompt's prefill too; not those
    archlab's float32 kernel takes first, 1-:data:`KERNEL_FIRST_ROWS` rows where it runs) run on oneDNN-packed
    copies of their weights (module docstring); yields how many layers got one.

    Packed: every ``nn.Linear`` weight that is float32 (and bfloat16 with ``bf16=True``), on the CPU, of at least
    :data:`MIN_SPLIT_ELEMENTS` elements, whose layer computes through :func:`linear` (archlab's :func:`Linear`; the
    LM head through a decoding cache's :class:`PackedLinear`). ``rows`` is the product size the layout is chosen for
    (any size is served); a bfloat16 copy serves bfloat16 inputs. Nothing is packed where the build has no oneDNN
    (:func:`onednn_packing_available`), and no bfloat16 weight where oneDNN refuses to pack one (its kernels capped
    below AVX-512). The copies are dropped when the block ends; a weight changed in place meanwhile by an op that
    bumps its ``_version`` (``copy_``, ``mul_``, the foreach and for-loop optimizers) is used unpacked. PyTorch's
    *fused* AdamW (``fused=True``, archlab's training default on a CPU) does not bump it: weights trained so inside
    a block would be read through their stale copies, so an object that holds copies of weights it may also train
    packs again when :func:`weights_fingerprint` changed (:class:`RefreshedCopies`: the search engine's re-ranker).
    A sentence encoder holds a block open for its life (:mod:`archlab.interop.sentence`: its ``[32 x 256, 384]``
    batches too run faster on the copies than through ``F.linear``; bf16 weights only where the CPU has AMX).

    Blocks nest: an inner block packs only the weights no enclosing block has packed and drops only its own
    copies. So a block around several calls that pack (``generate_batch``, speculative decoding: the turns of a
    chat, a server's requests) makes the copies once, where each call alone packs again (SmolLM2-135M: 121
    matrices, 0.26-0.5 s of one-thread CPU time on the loaded AMD EPYC, the reorders spread over the torch
    threads: :func:`_onednn_packed_copies`), at the cost of holding them throughout.
    """
    added: list[int] = []
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    if onednn_packing_available():
        weights: dict[int, Tensor] = {}  # by id: a weight shared by two layers is packed once
        for layer in model.modules():
            w = getattr(layer, "weight", None)
            through_linear = getattr(layer.forward, "__func__", None) in (_linear_forward, _logits_forward)
            if not isinstance(layer, nn.Linear) or not through_linear or id(w) in _ONEDNN_PACKED:
                continue
            if w.dtype not in dtypes or w.device.type != "cpu" or w.numel() < MIN_SPLIT_ELEMENTS:
                continue
            weights.setdefault(id(w), w)
        try:
            copies = _onednn_packed_copies(list(weights.values()), max(rows, 2))
        except RuntimeError:  # oneDNN refuses bf16 below AVX-512 (float32 always packs): all stay unpacked
            if not bf16:
                raise
            copies, weights = [], {}
        for key, packed in zip(weights, copies, strict=True):
            _ONEDNN_PACKED[key] = (weakref.ref(weights[key]), weights[key]._version, packed)
            added.append(key)
    try:
        yield len(added)
    finally:
        for key in added:
            _ONEDNN_PACKED.pop(key, None)
