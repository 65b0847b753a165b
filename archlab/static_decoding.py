r"""Decoding whose step never changes shape: a static KV cache, so ``torch.compile`` traces the step once.

At batch 1 a decoding step is a few hundred small ops (norms, RoPE, SwiGLU, casts, cache writes, each a dispatch
through Python and the ATen dispatcher); their count, not the bytes they read, is much of a step's time
(docs/speed.md, "Where the time goes"). ``torch.compile`` (inductor, C++ code generated for the CPU) fuses such ops and
removes the dispatch, but only if it can trace the step once and reuse it: every step must see the same shapes
and no Python number that changes from token to token. archlab's :class:`~archlab.nn.KVCache` grows and its
length is a Python int that RoPE, the learned position table and the cache slices read, so a compiled step
would be specialised to each position. Here, as in gpt-fast:

* :class:`StaticKVCache`: one layer's keys ``k [B, G, L, d_k]`` and values ``v [B, G, L, d_v]``, allocated for
  ``L = max_len`` positions. A step writes its ``n`` new positions in place at ``positions [n]`` (a tensor) and
  attends all ``L`` keys under the mask ``key j <= position i`` (:func:`static_mask`): a position not written
  yet gets exactly zero weight, so attention equals attention over the written keys alone.
* :class:`StaticDecoder`: a decoder-only model (:class:`~archlab.models.decoder.DecoderLM`: GPT, the Llama
  family) decoding through a :class:`StaticDecodingCache`. Its step is the model's own forward pass, the same
  modules (embedding, norms, projections, FFN, the blocks' residual wiring, LM head), with positions as a
  tensor: position vectors, RoPE rows and the mask are looked up at ``positions``. With ``compile=True`` the
  one-token step (``[B, 1]`` tokens) runs through ``torch.compile`` and the prompt (prefill, ``n > 1``) runs
  eagerly: one trace per process, model and batch size, none per token. It speaks
  :mod:`archlab.generation`'s protocol (``decoder_step``, ``new_cache``), so ``generate``, ``stream`` and
  ``beam_search`` take it in place of the model.
* Speculative decoding (:mod:`archlab.speculative`) takes it as the target too: :meth:`StaticDecodingCache.crop`
  forgets the rejected drafts by moving ``length`` back, and a verify pass (several tokens after the prompt) runs a
  second compiled function, traced once for each of a few widths (``verify_widths``): a pass is padded with its last
  token to the narrowest that holds it, the padding's keys landing past the pass's last position, where no query
  reads before the next pass writes.

What it does not serve raises :class:`~archlab.errors.ConfigError` when built or called: encoder-decoder
models, ``compile=True`` with int8-dynamic layers (fbgemm's packed weights break the graph), ALiBi (its bias is not a table lookup here), memory-saving attention backends (``chunked``, ...),
a left-padding ``attention_mask`` (batched prompts of different lengths: :func:`archlab.generation.generate_batch`),
and more positions than ``max_len`` (prompt + ``max_new_tokens`` - 1: ``generate`` refuses it before decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab import kernels
from archlab.errors import ConfigError, ShapeError
from archlab.generation import Step, check_logits_to_keep
from archlab.nn.attention import MultiHeadAttention
from archlab.nn.backends import DENSE
from archlab.nn.positional import (
    LearnedPositionalEncoding,
    NoPositionalEncoding,
    RotaryPositionalEncoding,
    SinusoidalPositionalEncoding,
    sinusoid_table,
)
from archlab.quant import DynamicInt8Linear
from archlab.speculative import DRAFT_TOKENS, PromptLookup


def static_mask(positions: Tensor, max_len: int) -> Tensor:
    """``[N, L]`` boolean, True where the query at ``positions[i]`` may attend key position ``j``: ``j <= positions[i]``
    (causal over the written keys; the positions past the newest one are not written yet, or are stale)."""
    return torch.arange(max_len, device=positions.device)[None, :] <= positions[:, None]


class StaticKVCache:
    """Keys ``k [B, G, L, d_k]`` and values ``v [B, G, L, d_v]`` of one attention layer, ``L = max_len`` positions,
    allocated (zeros) at the first step; :func:`static_attention` writes a step's positions into them in place."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row ``b`` becomes old row ``index[b]``. In place when the batch keeps its
        size, so the storage stays where a CUDA graph of the step reads it."""
        if self.k is None:
            return
        if index.numel() == self.k.shape[0]:
            self.k.copy_(self.k.index_select(0, index))
            self.v.copy_(self.v.index_select(0, index))
        else:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


def static_attention(
    attn: MultiHeadAttention,
    h: Tensor,
    positions: Tensor,
    k_all: Tensor,
    v_all: Tensor,
    rope: tuple[RotaryPositionalEncoding, tuple[Tensor, Tensor, Tensor]] | None = None,
) -> Tensor:
    """``attn``'s causal self-attention of ``h [B, n, d]`` at ``positions [n]`` over a static cache -> ``[B, n, d]``.

    The new keys and values are written into ``k_all [B, G, L, d_k]``, ``v_all [B, G, L, d_v]`` at ``positions``
    (in place), then the queries attend all ``L`` under :func:`static_mask`: what ``attn(h, causal=True,
    cache=KVCache)`` computes over the keys written so far. A step or a verify pass (up to
    :data:`~archlab.kernels.CACHED_MAX_QUERIES` queries) in float32 or bfloat16 takes archlab's kernel
    (:func:`archlab.kernels.cached_attention`: each query reads only the keys up to its own position; PyTorch's flash
    kernel took 40-80 us a one-query call on gpt-mini's and SmolLM2's shapes, 2 threads, and inductor's fused loops for
    the same equation 42 us); otherwise attention is PyTorch's fused ``sdpa`` whatever the
    model's dense backend (``math`` differs by float rounding only): no query here lacks a key to attend, so
    :func:`~archlab.nn.attention.attend`'s rule for such rows is not needed. ``rope``: the encoding and its ``cos, sin, (-sin,
    sin)`` rows at ``positions`` (``[n, d_rot]``), rotating queries and keys.
    """
    q, k, v = attn._project_qkv(h, None, 0)  # q [B, A, n, d_k], k [B, G, n, d_k], v [B, G, n, d_v]
    if rope is not None:
        encoding, rows = rope
        q, k = encoding.rotate_with(q, *rows), encoding.rotate_with(k, *rows)
    k_all.index_copy_(2, positions, k)
    v_all.index_copy_(2, positions, v)
    if q.shape[2] <= kernels.CACHED_MAX_QUERIES and kernels.cached_attention_serves(q, k_all, v_all):
        # a step or a verify pass: each query reads only the keys up to its own position
        out = torch.ops.archlab_kernels.cached_attention(q, k_all, v_all, positions[-1:], q.shape[-1] ** -0.5,
                                                         kernels.f32_kernel())  # fmt: skip
    else:
        if not torch.compiler.is_compiling():  # eager (a prompt): only the keys written so far, not all L
            end = int(positions[-1]) + 1
            k_all, v_all = k_all[:, :, :end], v_all[:, :, :end]
        mask = static_mask(positions, k_all.shape[2])  # [n, L]: every query sees key 0, so no row is all masked
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=attn.n_kv_heads != attn.n_heads)
    b, _, n, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, attn.n_heads * attn.d_v))


class StaticDecodingCache:
    """The :class:`StaticKVCache` of every layer and ``length``, the positions decoded so far (the next token's
    position). Made by :meth:`StaticDecoder.new_cache`; fresh (empty) when given to generation."""

    def __init__(self, n_layers: int, max_len: int):
        self.layers = [StaticKVCache(max_len) for _ in range(n_layers)]
        self.max_len, self.length = max_len, 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (speculative decoding's rollback to the accepted tokens). Nothing
        moves: the next pass writes its positions over the forgotten ones, and no query reads a key past its own
        position (:func:`static_mask`), so what stays there is never read."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self.length:
            raise ShapeError(f"crop length={length!r} must be an int in [0, {self.length}] (the positions held)")
        self.length = length

    def reorder(self, index: Tensor) -> None:
        """Beam search: batch row ``b`` becomes old row ``index[b]`` in every layer."""
        for layer in self.layers:
            layer.reorder(index)


@dataclass(frozen=True)
class StaticContext:
    """What :func:`archlab.generation.check_room` reads of a :class:`StaticDecoder`: the positions its cache holds."""

    context_limit: int


class StaticDecoder(nn.Module):
    """``model`` decoding through a :class:`StaticDecodingCache` of ``max_len`` positions; one-token steps compiled
    by ``torch.compile`` when ``compile`` (module docstring).

    ``generate(StaticDecoder(model, max_len=n0 + n), input_ids, max_new_tokens=n)`` gives the tokens
    ``generate(model, ...)`` gives (equal in float32: the same products, attention over the same keys).

    Args:
        model: a decoder-only :class:`~archlab.models.decoder.DecoderLM` (GPT, Llama; float32, bfloat16, or
            quantized by :func:`archlab.quant.quantize`), in eval mode.
        max_len: ``L``, the positions the cache holds (prompt + new tokens - 1 at least); at most the model's
            context (a learned position table's ``max_len``).
        compile: run the one-token step through ``torch.compile`` (the first such step compiles: seconds to
            minutes). The trace is kept per decoder and batch size; torch caps the traces of one function per
            process (``torch._dynamo.config.recompile_limit``, 8), past which further decoders run their step
            eagerly: the same tokens, without the speed. Measured (docs/speed.md, idle AMD EPYC with AVX512-BF16, 2
            threads, three runs over two sessions): compiled int4 / int8 steps 1.4-1.6x / 1.4-1.5x faster than
            eager, fp32 1.73-1.77x (SmolLM2-135M), and 1.26-1.43x (gpt-mini).
        cpp_wrapper: with ``compile``, inductor calls the step's kernels from generated C++ instead of generated
            Python (``torch._inductor.config.cpp_wrapper``): the same graph and results, less time between kernels.
            Measured 1.04-1.07x faster steps (SmolLM2 int4, gpt-mini fp32; AMD EPYC, 2 threads), for a longer first
            compile: gpt-mini 17 s against 5 s, SmolLM2 int4 minutes on a cold inductor cache (once per machine).
        cuda_graphs: with ``compile`` and the model on a CUDA GPU, record the compiled step once as a CUDA graph
            and replay it (inductor's ``triton.cudagraphs``): one launch a token instead of one per kernel. On an
            H200 the compiled SmolLM2-135M step without it took 6.6 ms a token against a 0.13 ms weight-reading
            bound, launches being most of it (docs/speed.md, "On a GPU"). The graph reads the cache where it was
            recorded, so the decoder keeps one cache storage per batch size and hands it to each
            :meth:`new_cache` in turn: one decoding run at a time per batch size (a cache used after a newer one
            took its storage raises ConfigError). Off by default: written and tested with the CPU standing in,
            not yet run on a GPU (tests/test_cuda.py runs it where there is one).
        verify_widths: with ``compile``, the widths of the compiled verify passes (speculative decoding's last
            token and its drafts), each traced at the first pass it serves; a pass runs at the narrowest that holds
            it, a wider one, or one the cache lacks room to pad, eagerly (``()``: every pass of several tokens
            eagerly, e.g. a chat's later turns prefilled after a kept cache). Default :func:`verify_widths_for`
            (:data:`~archlab.speculative.DRAFT_TOKENS`): 3 and 9. Measured (SmolLM2-135M bf16, AMD EPYC with
            AVX512-BF16, 2 threads): a compiled 9-token pass 12.7 ms against 10.7 for the compiled step and 17.2 for
            the same pass eagerly.
    """

    def __init__(self, model: nn.Module, max_len: int, *, compile: bool = True, cpp_wrapper: bool = False,
                 cuda_graphs: bool = False, verify_widths: Sequence[int] | None = None):  # fmt: skip
        super().__init__()
        if cpp_wrapper and not compile:
            raise ConfigError("cpp_wrapper=True wraps the compiled step: it needs compile=True")
        widths = verify_widths_for(DRAFT_TOKENS) if verify_widths is None else verify_widths
        if not isinstance(widths, Sequence) \
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 2 for w in widths):  # fmt: skip
            raise ConfigError(f"verify_widths={verify_widths!r} must be a list of ints >= 2 (the widths of the "
                              "compiled verify passes: the last token and up to width - 1 drafts; empty: none)")
        _check_model(model, max_len)
        self.model, self.max_len = model, max_len
        c = model.config
        act = model.tok_emb.weight.dtype  # the residual stream's dtype (quantized layers give their input's back)
        device = model.tok_emb.weight.device
        if cuda_graphs and not (compile and device.type == "cuda"):
            raise ConfigError(
                f"cuda_graphs=True replays the compiled step as a CUDA graph: it needs compile=True and the model on a "
                f"CUDA GPU (compile={compile}, the model is on {device})"
            )
        self.cuda_graphs = cuda_graphs
        # cuda_graphs: batch size -> (the cache holding it now, each layer's (keys, values) storage)
        self._storage: dict[int, tuple[StaticDecodingCache, list[tuple[Tensor, Tensor]]]] = {}
        pos = model.pos
        # position lookups as tables of L rows, indexed by a positions tensor inside the step
        if isinstance(pos, RotaryPositionalEncoding):
            self.rope = pos.tables(max_len, act, device)  # cos, sin, (-sin, sin): [L, d_rot] each
        if isinstance(pos, SinusoidalPositionalEncoding):
            self.register_buffer("sinusoid", sinusoid_table(max_len, c.d_model, dtype=act, device=device), persistent=False)
        if compile and any(isinstance(m, DynamicInt8Linear) for m in model.modules()):
            raise ConfigError(
                "compile=True cannot trace int8-dynamic layers (fbgemm's packed weights end torch.compile's graph at "
                "every product): use compile=False, or the weight-only modes int8 / int4"
            )
        # emulate_precision_casts: fused bf16 code rounds where the eager ops round (between ops), so the step and
        # the verify pass, traced apart, give a position the same bits (without it SmolLM2's bf16 speculative tokens
        # left the compiled step's on 2 of benchmarks/speculative.py's 4 abstracts); a no-op in float32
        options = {name: True for name, on in (("cpp_wrapper", cpp_wrapper), ("triton.cudagraphs", cuda_graphs),
                                               ("emulate_precision_casts", True)) if on}  # fmt: skip
        self.compiled = torch.compile(self._forward, dynamic=False, options=options) if compile else None
        self.verify_widths = tuple(sorted(set(widths)))
        self.compiled_verify = torch.compile(self._verify, dynamic=False, options=options) if compile else None

    @property
    def config(self) -> StaticContext:
        return StaticContext(self.max_len)

    def new_cache(self) -> StaticDecodingCache:
        """An empty cache of ``max_len`` positions for one decoding run."""
        return StaticDecodingCache(self.model.config.n_layers, self.max_len)

    def decoder_step(self, attention_mask: Tensor | None = None, *, logits_to_keep: int | None = None) -> Step:
        """A step for :mod:`archlab.generation`: ``(tokens [B, n], cache) -> logits [B, n or k, V]``; ``attention_mask``
        must be None (no left padding here)."""
        check_logits_to_keep(logits_to_keep)
        if attention_mask is not None:
            raise ConfigError(
                "StaticDecoder decodes prompts without padding: attention_mask must be None (for prompts of "
                "different lengths use archlab.generation.generate_batch with the model)"
            )

        def step(tokens: Tensor, cache: StaticDecodingCache | None = None) -> Tensor:
            return self(tokens, cache, logits_to_keep=logits_to_keep)

        return step

    def forward(self, tokens: Tensor, cache: StaticDecodingCache, *, logits_to_keep: int | None = None) -> Tensor:
        """``tokens [B, n]`` at positions ``cache.length ..`` -> logits ``[B, n, V]`` (the last ``logits_to_keep``
        positions' only, if given); their keys and values are written into ``cache``. With ``compile``: one token
        runs the compiled step; several tokens after the prompt (a speculative verify pass) the compiled verify pass
        of the narrowest of ``verify_widths`` that holds them and fits in the cache, padded; anything else (a prompt)
        the same step eagerly."""
        if not isinstance(cache, StaticDecodingCache) or cache.max_len != self.max_len \
                or len(cache.layers) != self.model.config.n_layers:  # fmt: skip
            raise ConfigError(f"cache must be this StaticDecoder's new_cache() (max_len={self.max_len}), got {cache!r:.80}")
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point or not tokens.numel():
            raise ShapeError(f"tokens must be [B, n] integer token ids, got {tokens!r:.80}")
        n, start = tokens.shape[1], cache.length
        if start + n > self.max_len:
            raise ConfigError(
                f"positions {start}..{start + n - 1} are past the static cache's max_len={self.max_len}: build the "
                f"StaticDecoder with max_len >= prompt + max_new_tokens - 1"
            )
        v = self.model.config.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= v:
            raise ShapeError(f"tokens hold ids outside the vocabulary [0, {v})")
        if logits_to_keep is not None and logits_to_keep >= n:
            logits_to_keep = None  # every position's: one trace of the step whether a caller keeps 1 or all
        run, width = self._forward, n
        if self.compiled is not None and n == 1:
            run = self.compiled
            tokens = tokens.new_empty(tokens.shape).copy_(tokens)  # generation feeds a view whose strides grow
        elif self.compiled is not None and start > 0:
            # a verify pass (after the prompt): padded to a traced width with its last token; the padding's keys
            # land past the pass's last position, where no query of this pass reads and the next pass writes
            width = next((w for w in self.verify_widths if n <= w <= self.max_len - start), n)
            if width != n or n in self.verify_widths:
                run = self.compiled_verify
                tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, width - n)], dim=1)
        positions = torch.arange(start, start + width, device=tokens.device)
        held = cache.layers[0].k
        if held is None:  # allocated here, outside the (compiled) step
            self._allocate(cache, tokens.shape[0])
        elif held.shape[0] != tokens.shape[0]:
            raise ShapeError(f"the cache holds batch {held.shape[0]} but tokens has batch {tokens.shape[0]}")
        elif self.cuda_graphs and self._storage.get(held.shape[0], (cache,))[0] is not cache:
            raise ConfigError(
                "this cache's storage was handed to a newer cache of this StaticDecoder (cuda_graphs: one decoding "
                "run at a time per batch size); finish a run before starting the next, or use cuda_graphs=False"
            )
        keys, values = [layer.k for layer in cache.layers], [layer.v for layer in cache.layers]
        if self.cuda_graphs and run is not self._forward:
            torch.compiler.cudagraph_mark_step_begin()  # the last replay's output is not read again: cloned below
        if run is self.compiled_verify:
            logits = run(tokens, positions, keys, values)[:, :n]  # the padding's logits dropped
            if logits_to_keep is not None:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = run(tokens, positions, keys, values, logits_to_keep)
        if self.cuda_graphs and run is not self._forward:
            logits = logits.clone()  # a replay's output is overwritten by the next replay
        cache.length = start + n
        return logits

    def _allocate(self, cache: StaticDecodingCache, batch: int) -> None:
        """Each layer's keys and values, zeros: new, or (cuda_graphs) this batch size's storage, taken over."""
        if self.cuda_graphs and batch in self._storage:
            storage = self._storage[batch][1]
            for k, v in storage:
                k.zero_()
                v.zero_()
        else:
            attn, act = self.model.decoder.blocks[0].attn, self.model.tok_emb.weight
            with torch.inference_mode(False):  # kept storage: normal tensors, writable by later runs in any mode
                storage = [(act.new_zeros(batch, attn.n_kv_heads, self.max_len, attn.d_k),
                            act.new_zeros(batch, attn.n_kv_heads, self.max_len, attn.d_v)) for _ in cache.layers]  # fmt: skip
            if self.cuda_graphs:
                for k, v in storage:  # the graph reads them where they are: not copied in at each replay
                    torch._dynamo.mark_static_address(k, guard=False)
                    torch._dynamo.mark_static_address(v, guard=False)
        if self.cuda_graphs:
            self._storage[batch] = (cache, storage)
        for layer, (k, v) in zip(cache.layers, storage, strict=True):
            layer.k, layer.v = k, v

    def _verify(self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
        """A verify pass of one of ``verify_widths``: :meth:`_forward`, every position's logits. Its own function,
        so its traces are counted apart from the step's (torch's cap on traces per function)."""
        return self._forward(tokens, positions, keys, values, None)

    def _forward(self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor],
                 logits_to_keep: int | None) -> Tensor:  # fmt: skip
        """The step (what ``torch.compile`` traces): ``tokens [B, n]``, ``positions [n]``, each layer's ``keys
        [B, G, L, d_k]`` and ``values [B, G, L, d_v]`` (written in place at ``positions``) -> ``[B, n, V]``."""
        model, pos = self.model, self.model.pos
        x = model.tok_emb(tokens)  # [B, n, d]
        if isinstance(pos, LearnedPositionalEncoding):
            x = x + pos.embedding(positions)
        elif isinstance(pos, SinusoidalPositionalEncoding):
            x = x + self.sinusoid[positions]
        x = model.drop(x)
        rope = (pos, tuple(t[positions] for t in self.rope)) if isinstance(pos, RotaryPositionalEncoding) else None
        for block, k_all, v_all in zip(model.decoder.blocks, keys, values, strict=True):
            x = block.residual(x, block.attn_norm, lambda h, b=block, k=k_all, v=v_all: static_attention(
                b.attn, h, positions, k, v, rope))  # fmt: skip
            x = block.residual(x, block.ffn_norm, block.ffn)
        h = model.decoder.final_norm(x)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return model.lm_head(h)


def verify_widths_for(draft_tokens: int) -> tuple[int, ...]:
    """The verify passes' widths a :class:`StaticDecoder` traces for drafts of up to ``draft_tokens``:
    ``draft_tokens + 1``, and 3 below it: a prompt-lookup pass after a one-token match (two drafts,
    :class:`archlab.speculative.PromptLookup`), which padded to 9 cost SmolLM2's bf16 pass 1.3x its compiled step
    against 1.1x at 3 (AMD EPYC with AVX512-BF16)."""
    short = PromptLookup.one_token_drafts + 1
    return tuple(sorted({min(short, draft_tokens + 1), draft_tokens + 1}))


def _check_model(model: nn.Module, max_len: int) -> None:
    """ConfigError, naming what is wrong, unless ``StaticDecoder`` serves ``model`` with ``max_len`` positions."""
    from archlab.models.decoder import DecoderLM  # models import generation; this module sits beside it

    if not isinstance(model, DecoderLM):
        raise ConfigError(f"StaticDecoder takes a decoder-only DecoderLM (GPT, Llama), got {type(model).__name__}")
    if model.training:
        raise ConfigError("StaticDecoder decodes for inference: call model.eval() first (dropout is on)")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ConfigError(f"max_len={max_len!r} must be an int >= 1 (the positions the static cache holds)")
    c = model.config
    limit = c.context_limit
    if limit is not None and max_len > limit:
        raise ConfigError(f"max_len={max_len} is past the context of {type(model).__name__} ({limit} positions)")
    served = (LearnedPositionalEncoding, SinusoidalPositionalEncoding, RotaryPositionalEncoding, NoPositionalEncoding)
    if not isinstance(model.pos, served):
        raise ConfigError(
            f"StaticDecoder serves positional='learned', 'sinusoidal', 'rope' or 'none', not {c.positional!r} "
            "(ALiBi's bias is computed per call, not looked up): decode with the model itself"
        )
    if c.backend not in DENSE:
        raise ConfigError(f"StaticDecoder needs a dense attention backend {tuple(DENSE)}, not backend={c.backend!r}")
