r"""The memory budget of lesson 8 card 5's document reader, computed from the model and set beside the card's.

The card budgets one 80 GB GPU as::

    text encoder (frozen) 2 + image encoder (frozen) 1 + fusion 4 + hierarchical encoder 8 + reasoning 4
    + KV cache (50 pages) 20 + activations 30 + buffer 11 = 80 GB

:func:`docreader_budget` builds the reader on the meta device (nothing is allocated) and measures instead of
assuming:

* **weights**: each component's parameters counted on the module, at fp32 and bf16;
* **training state**: a trained parameter under bf16 mixed-precision Adam keeps bf16 weights and gradients, an
  fp32 master copy and two fp32 moments, ``2 + 2 + 4 + 4 + 4 = 16`` bytes (ZeRO's accounting); a frozen one keeps
  its bf16 weights, 2 bytes, and no optimizer state;
* **activations**: the tensors autograd saves for backward in one training forward over ``pages`` full pages,
  recorded by ``torch.autograd.graph.saved_tensors_hooks`` on the meta device (each storage once) and attributed
  to the component running; frozen encoders save nothing (nothing needs their gradients). With gradient
  checkpointing a transformer block keeps only its input and recomputes the rest in backward: the inputs of every
  block, what runs outside blocks, plus the largest block's saved tensors (alive while it is recomputed). With
  ``pages_per_chunk = k`` the page stage (:meth:`~archlab.models.docreader.DocReader.read_pages`: page encoders,
  fusion, Perceiver, each page's global tokens) runs ``k`` pages at a time, each chunk checkpointed, so training
  keeps none of its saved tensors but those of the one chunk being recomputed in backward: the page stage's saved
  bytes are measured on a chunk of ``min(k, pages)`` pages (``chunk`` line) instead of on every page, and what the
  levels above save is measured as before;
* **KV cache**: the keys and values the reasoning layers read from the document (what another question about the
  same document reuses), ``2 L_reason N_doc d s``, with the document compressed (``n_global + P L`` tokens, the
  global tokens by role in ``DocReaderConfig.global_tokens``: with ``figure_global`` a figure per page too) and
  flat (every token of every page);
* **latent compression**: the reasoning module's KV cache, dense score matrix and saved activations over
  ``P L`` latents against all ``P N_page`` tokens (``N_page`` both the preset's and the card's 4,000).

Where the card's arithmetic is off, :attr:`DocReaderBudget.notes` says so with the numbers (ViT-L/14 at 224 px
gives 256 patch tokens, not 196).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from archlab.analysis.memory import dtype_bytes, format_bytes, score_matrix_bytes
from archlab.config import check_positive, check_type
from archlab.errors import ConfigError
from archlab.models.docreader import CrossAttentionBlock, DocBatch, DocReader, DocReaderConfig
from archlab.nn import efficient
from archlab.nn.blocks import EncoderBlock

#: The card's budget lines (GB) in its order; ``None``: a line the card does not have.
CARD_GB: dict[str, float | None] = {
    "text encoder": 2, "table encoder": None, "image encoder": 1, "fusion layers": 4, "hierarchical encoder": 8,
    "reasoning module": 4, "KV cache": 20, "activations": 30, "buffer": 11,
}  # fmt: skip
CARD_TOTAL_GB = 80
CARD_TOKENS_PER_PAGE = 4000  # "~4000 tokens/page -> 64 latents"
CARD_IMAGE_TOKENS = 196  # "tokens_per_image: 196 (14x14 patches)"

#: The card's components -> the reader's modules (attribute names of :class:`DocReader`).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "text encoder": ("text",),
    "table encoder": ("table",),
    "image encoder": ("image",),
    "fusion layers": ("fusion",),
    "hierarchical encoder": ("perceiver", "pages"),
    "reasoning module": ("reasoning", "head_norm", "head"),
}
TRAINED_BYTES_PER_PARAM = 16  # bf16 weights + bf16 grads + fp32 master + fp32 Adam m and v
FROZEN_BYTES_PER_PARAM = 2  # bf16 weights only
BLOCK_TYPES = (EncoderBlock, CrossAttentionBlock)  # the units gradient checkpointing recomputes


@dataclass(frozen=True)
class ComponentBudget:
    """One line of the card's budget, from the model: parameters, their bytes and the activations it saves."""

    name: str
    params: int
    trainable: int
    activations: int  # bytes saved for backward, no checkpointing
    activations_checkpointed: int  # bytes kept with every block checkpointed (the recomputed peak not included)

    @property
    def frozen(self) -> bool:
        return self.params > 0 and self.trainable == 0

    def weight_bytes(self, dtype: str = "bf16") -> int:
        return self.params * dtype_bytes(dtype)

    @property
    def training_bytes(self) -> int:
        """Weights, gradients and optimizer state under bf16 mixed-precision Adam (frozen: bf16 weights only)."""
        return self.trainable * TRAINED_BYTES_PER_PARAM + (self.params - self.trainable) * FROZEN_BYTES_PER_PARAM


@dataclass(frozen=True)
class DocReaderBudget:
    """What :func:`docreader_budget` returns (bytes; see the module docstring for each figure)."""

    config: DocReaderConfig
    pages: int
    batch: int
    components: tuple[ComponentBudget, ...]
    recompute_peak: int  # the largest single block's saved tensors (alive while it is recomputed)
    tokens_per_page: int  # fused tokens of a full page: text + table + [class] + patches
    pages_per_chunk: int | None  # the page stage's chunk (None: every page at once, counted in the components)
    chunk_activations: int  # bytes one chunk of the page stage saves (alive while it is recomputed); 0 unchunked
    chunk_activations_checkpointed: int  # ... with its blocks checkpointed: their inputs, outside them, one block
    reasoning_tokens: int  # the reasoning module's sequence, hierarchical: n_global + P L
    kv_cache: int  # reasoning K/V over the compressed document
    kv_cache_flat: int  # ... over every token of the preset's pages
    kv_cache_flat_card: int  # ... over the card's 4,000 tokens per page
    reasoning_activations: int  # saved bytes of the reasoning module, hierarchical
    reasoning_activations_flat: int  # ... of the flat reader's reasoning over every token (measured)
    notes: tuple[str, ...] = field(default=())

    @property
    def activations(self) -> int:
        """Saved for backward, no block checkpointing: the components' (with ``pages_per_chunk``, outside the page
        stage) and one chunk of the page stage."""
        return sum(c.activations for c in self.components) + self.chunk_activations

    @property
    def activations_checkpointed(self) -> int:
        """Kept with every block checkpointed, plus the largest recompute: one block's, or one page chunk's."""
        recompute = max(self.recompute_peak, self.chunk_activations_checkpointed)
        return sum(c.activations_checkpointed for c in self.components) + recompute

    @property
    def training_state(self) -> int:
        return sum(c.training_bytes for c in self.components)

    @property
    def flat_tokens(self) -> int:
        return self.config.max_question_len + self.pages * self.tokens_per_page

    def to_dict(self) -> dict:
        """The figures as plain numbers (bytes), for JSON."""
        return {
            "pages": self.pages, "batch": self.batch, "dtype": "bf16", "tokens_per_page": self.tokens_per_page,
            "pages_per_chunk": self.pages_per_chunk, "chunk_activations": self.chunk_activations,
            "chunk_activations_checkpointed": self.chunk_activations_checkpointed,
            "components": {
                c.name: {"params": c.params, "trainable": c.trainable, "weights_fp32": c.weight_bytes("fp32"),
                         "weights_bf16": c.weight_bytes("bf16"), "training_state": c.training_bytes,
                         "activations": c.activations, "activations_checkpointed": c.activations_checkpointed,
                         "card_gb": CARD_GB[c.name]}
                for c in self.components
            },
            "recompute_peak": self.recompute_peak, "training_state": self.training_state,
            "activations": self.activations, "activations_checkpointed": self.activations_checkpointed,
            "kv_cache": self.kv_cache, "kv_cache_flat": self.kv_cache_flat,
            "kv_cache_flat_card": self.kv_cache_flat_card,
            "reasoning_tokens": self.reasoning_tokens, "flat_tokens": self.flat_tokens,
            "global_tokens": self.config.global_tokens,
            "reasoning_activations": self.reasoning_activations,
            "reasoning_activations_flat": self.reasoning_activations_flat,
            "total_checkpointed": self.total(), "total": self.total(checkpointing=False),
            "card_gb": CARD_GB, "card_total_gb": CARD_TOTAL_GB, "notes": list(self.notes),
        }  # fmt: skip

    def total(self, *, checkpointing: bool = True) -> int:
        """Training state + KV cache + activations (with or without checkpointing)."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.training_state + self.kv_cache + acts


# ================================================================================================
# Measuring on the meta device
# ================================================================================================


def full_batch(config: DocReaderConfig, pages: int, batch: int = 1, device="meta") -> DocBatch:
    """A batch of ``batch`` documents of ``pages`` full pages (every text, table and question at its maximum
    length, an image on every page), on ``device`` (meta: shapes only)."""
    c = config
    b, p = batch, pages
    ids = lambda *s: torch.zeros(*s, dtype=torch.long, device=device)  # noqa: E731
    yes = lambda *s: torch.ones(*s, dtype=torch.bool, device=device)  # noqa: E731
    return DocBatch(
        ids(b, p, c.max_text_len), yes(b, p, c.max_text_len), ids(b, p, c.max_table_len), yes(b, p, c.max_table_len),
        ids(b, p, c.max_table_len), ids(b, p, c.max_table_len), torch.zeros(b, p, c.max_table_len, device=device),
        torch.zeros(b, p, c.n_channels, c.image_size, c.image_size, device=device), yes(b, p), yes(b, p),
        ids(b, c.max_question_len), yes(b, c.max_question_len), ids(b), ids(b),
    )  # fmt: skip


@dataclass
class _Tally:
    """Saved-tensor bytes by component and by block, each storage counted once."""

    skip: set[int]  # storages not to count (parameters)
    pages: _Tally | None = None  # where what the page stage (DocReader.read_pages) saves goes; None: here
    in_pages: bool = False  # the page stage is running
    seen: set[int] = field(default_factory=set)
    by_component: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_block: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    block_inputs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    outside_blocks: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    component: list[str] = field(default_factory=list)
    block: list[int] = field(default_factory=list)

    @property
    def into(self) -> _Tally:
        """The tally that counts what is saved now: :attr:`pages` while the page stage runs, else this one."""
        return self.pages if self.in_pages and self.pages is not None else self

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.skip or key in self.seen or not self.component:
            return t
        self.seen.add(key)
        n, into = storage.nbytes(), self.into
        name = self.component[-1]
        into.by_component[name] += n
        if self.block:
            into.by_block[self.block[-1]] += n
        else:
            into.outside_blocks[name] += n
        return t


def _storage_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def _measuring(model: DocReader, tally: _Tally) -> Iterator[None]:
    handles = []
    for name, modules in COMPONENTS.items():
        for attr in modules:
            module = getattr(model, attr)
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: tally.component.append(n)))
            handles.append(module.register_forward_hook(lambda m, a, o: tally.component.pop() and None))
    for module in model.modules():
        if isinstance(module, BLOCK_TYPES):

            def enter(m, args, kwargs):
                if not tally.block:  # the outermost block: its input is what checkpointing keeps
                    tally.into.block_inputs[tally.component[-1]] += _storage_bytes(args[0])
                tally.block.append(id(m))

            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(lambda m, a, o: tally.block.pop() and None))
    if tally.pages is not None:  # the page stage's saves go to tally.pages

        def read_pages(read, batch, *args, _read_pages=model.read_pages):
            tally.in_pages = True
            try:
                return _read_pages(read, batch, *args)
            finally:
                tally.in_pages = False

        model.read_pages = read_pages
    sdpa, tiles = F.scaled_dot_product_attention, efficient._Tiles.forward
    F.scaled_dot_product_attention, efficient._Tiles.forward = _flash_on_meta, _tiles_on_meta
    try:
        with torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda t: t):
            yield
    finally:
        F.scaled_dot_product_attention, efficient._Tiles.forward = sdpa, tiles
        model.__dict__.pop("read_pages", None)
        for h in handles:
            h.remove()


_SDPA = F.scaled_dot_product_attention
_TILES = efficient._Tiles.forward


def _tiles_on_meta(tiles):
    """The tiled kernels of :mod:`archlab.nn.efficient` (block-sparse pages, sliding-window reasoning) save ``q, k,
    v``, the output and the log-sum-exp whatever their tiles compute; on the meta device, which holds no values,
    only those shapes are made (the tile loop costs a Python meta call per tile operation, minutes at the card's
    sizes)."""
    if not tiles.q.is_meta:
        return _TILES(tiles)
    q, v = tiles.q, tiles.v
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1])


def _flash_on_meta(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as a CPU or GPU runs it: the flash kernel, which saves ``q, k, v``, the
    output and the log-sum-exp, never the ``N x M`` weights. On the meta device PyTorch would decompose it into the
    math path (which saves the weights), so meta tensors go to the CPU flash kernel's meta function."""
    if not q.is_meta or enable_gqa:
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)  # fmt: skip
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out[0]


def measure_activations(model: DocReader, batch: DocBatch, *, page_stage: bool = False) -> _Tally:
    """The bytes a training forward of ``model`` on ``batch`` saves for backward, by component and block;
    ``page_stage``: what the page stage (:meth:`DocReader.read_pages`) saves is counted apart, in the tally's
    ``pages``."""
    skip = {p.untyped_storage()._cdata for p in model.parameters()}
    tally = _Tally(skip=skip, pages=_Tally(skip=skip) if page_stage else None)
    model.train()
    with _measuring(model, tally):
        model(batch)
    return tally


# ================================================================================================
# The budget
# ================================================================================================


def docreader_budget(config: DocReaderConfig, *, pages: int | None = None, batch: int = 1) -> DocReaderBudget:
    """The card's budget for ``config`` read over ``pages`` full pages (default ``max_pages``), ``batch`` documents,
    in bf16 (module docstring). Built and run on the meta device: no memory is allocated."""
    if not isinstance(config, DocReaderConfig):
        raise ConfigError(f"docreader_budget needs a DocReaderConfig, got {type(config).__name__}")
    pages = config.max_pages if pages is None else pages
    for name, value in (("pages", pages), ("batch", batch)):
        check_type(name, value, int)
        check_positive(name, value)
    if pages > config.max_pages:
        raise ConfigError(f"pages={pages} is more than the reader's page table holds (max_pages={config.max_pages})")
    # dropout masks are a training choice, not the design's; checkpointed blocks and page chunks would hide what
    # autograd saves from the tally (the budget adds both itself: a chunk's page stage is measured on its pages)
    k = config.pages_per_chunk
    c = config.replace(dropout=0.0, checkpointing=False, pages_per_chunk=None)
    with torch.device("meta"):
        model = DocReader(c).to(torch.bfloat16)
        flat = DocReader(c.replace(reader="flat")).to(torch.bfloat16)
    tally = measure_activations(model, full_batch(c, pages, batch), page_stage=k is not None)
    flat_tally = measure_activations(flat, full_batch(c, pages, batch))
    chunk = _Tally(skip=set())  # unchunked: nothing apart
    if k is not None:
        one_chunk = measure_activations(model, full_batch(c, k, batch), page_stage=True) if k < pages else tally
        chunk = one_chunk.pages

    components = []
    for name, attrs in COMPONENTS.items():
        params = [p for a in attrs for p in getattr(model, a).parameters()]
        kept = tally.block_inputs[name] + tally.outside_blocks[name]
        components.append(ComponentBudget(
            name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
            tally.by_component[name], min(kept, tally.by_component[name]),
        ))  # fmt: skip
    s = dtype_bytes("bf16")
    d, n_layers = c.d_model, c.reason_layers
    reasoning_tokens = c.n_global + pages * c.n_latents
    tokens_per_page = c.page_tokens
    kv = lambda n: 2 * n_layers * batch * n * d * s  # noqa: E731  keys and values, every reasoning layer
    flat_tokens = c.max_question_len + pages * tokens_per_page
    card_tokens = c.max_question_len + pages * CARD_TOKENS_PER_PAGE
    return DocReaderBudget(
        config=config, pages=pages, batch=batch, components=tuple(components),
        recompute_peak=max(tally.by_block.values(), default=0), tokens_per_page=tokens_per_page,
        pages_per_chunk=k, chunk_activations=sum(chunk.by_component.values()),
        chunk_activations_checkpointed=sum(chunk.block_inputs.values()) + sum(chunk.outside_blocks.values())
        + max(chunk.by_block.values(), default=0),
        reasoning_tokens=reasoning_tokens, kv_cache=kv(reasoning_tokens), kv_cache_flat=kv(flat_tokens),
        kv_cache_flat_card=kv(card_tokens), reasoning_activations=tally.by_component["reasoning module"],
        reasoning_activations_flat=flat_tally.by_component["reasoning module"],
        notes=tuple(card_notes(config, model, pages)),
    )  # fmt: skip


def card_notes(config: DocReaderConfig, model: DocReader, pages: int) -> list[str]:
    """Where the card's arithmetic disagrees with the model built at its sizes, with the numbers."""
    c = config
    notes = []
    per_layer = 2 * pages * CARD_TOKENS_PER_PAGE * c.d_model * dtype_bytes("bf16")  # K and V of every token, bf16
    notes.append(
        f"KV cache ~{CARD_GB['KV cache']:g} GB: keys and values of all {pages} x {CARD_TOKENS_PER_PAGE:,} tokens at "
        f"d = {c.d_model} take {format_bytes(per_layer)} per layer in bf16, so {CARD_GB['KV cache']:g} GB is "
        f"{CARD_GB['KV cache'] * 1e9 / per_layer:.1f} layers over every token (XLM-R-large has 24): a cache "
        f"without the latent compression the card also counts on; over the compressed document ({c.n_global} global "
        f"+ {pages} x {c.n_latents} latents) the reasoning module's {c.reason_layers} layers keep "
        f"{format_bytes(2 * c.reason_layers * (c.n_global + pages * c.n_latents) * c.d_model * 2)}"
    )
    grid = c.image_size // c.patch_size
    if c.n_patches != CARD_IMAGE_TOKENS:
        notes.append(
            f"image tokens: ViT with {c.patch_size} px patches at {c.image_size} px gives ({c.image_size} / "
            f"{c.patch_size})^2 = {grid} x {grid} = {c.n_patches} patch tokens (+1 [class] = {c.n_patches + 1}); the "
            f"card's {CARD_IMAGE_TOKENS} = 14 x 14 is the count of 16 px patches (ViT-*/16) at 224 px"
        )
    if c.page_tokens != CARD_TOKENS_PER_PAGE:
        notes.append(
            f"tokens per page: {c.max_text_len} text (the card's max_tokens_per_page) + {c.max_table_len} table + "
            f"{c.n_patches + 1} image = {c.page_tokens}, not ~{CARD_TOKENS_PER_PAGE:,} (that would need "
            f"~{CARD_TOKENS_PER_PAGE - c.max_text_len - c.n_patches - 1:,} table tokens per page); compressing to "
            f"{c.n_latents} latents is then {c.page_tokens / c.n_latents:.0f}x, not "
            f"{CARD_TOKENS_PER_PAGE / c.n_latents:.1f}x"
        )
    for name, card_gb in (("text", 2), ("image", 1)):
        n = sum(p.numel() for p in getattr(model, name).parameters())
        notes.append(
            f"frozen {name} encoder ~{card_gb} GB: its {n / 1e6:.0f}M parameters are {format_bytes(n * 4)} in fp32, "
            f"{format_bytes(n * 2)} in bf16; the card's figure is the fp32 one, though it lists bf16 among its "
            "strategies"
        )
    page_scores = score_matrix_bytes(c.page_tokens, heads=c.text_n_heads, dtype="bf16")
    notes.append(
        f"flash attention does not cut attention memory by a constant 4x: it never stores the N x N scores, "
        f"{format_bytes(page_scores)} per layer and page at N = {c.page_tokens} ({c.text_n_heads} heads, bf16), "
        "leaving O(N d)"
    )
    return notes


# ================================================================================================
# The table
# ================================================================================================


CHUNK_NOTE = (
    ", or one chunk's if larger. Pages read in chunks: the components count what is saved outside the page stage "
    "(page encoders, fusion, Perceiver: read_pages); the chunk line is what one chunk of the page stage saves, alive "
    "while backward recomputes it (its ckpt: its blocks' inputs, what runs outside them and one block)."
)


def format_budget(budget: DocReaderBudget) -> str:
    """The budget as text: per component beside the card's figures, then latent compression and the notes."""
    b, c = budget, budget.config
    unit, scale = ("GB", 1e9) if b.total() >= 1e9 else ("MB", 1e6)
    num = lambda n: f"{n / scale:.2f}"  # noqa: E731
    card = lambda key: "-" if CARD_GB[key] is None else f"{CARD_GB[key]:g}"  # noqa: E731
    scores = lambda n: score_matrix_bytes(n, heads=c.n_heads, batch=b.batch, dtype="bf16")  # noqa: E731
    chunked = "" if b.pages_per_chunk is None else f", pages read {b.pages_per_chunk} at a time"
    pages = f"{b.pages} page{'s' * (b.pages != 1)}"  # "1 page", "50 pages"
    lines = [
        f"memory budget of the document reader: {pages} of {b.tokens_per_page} tokens, batch {b.batch}, bf16"
        f"{chunked} (archlab.analysis.docreader_budget; the model built and run on the meta device)",
        "",
        f"{'component':<24}{'params':>9}{'fp32':>9}{'bf16':>9}{'train':>9}{'acts':>9}{'ckpt':>9}{'card GB':>9}",
    ]
    for comp in b.components:
        name = comp.name + (" (frozen)" if comp.frozen else "")
        lines.append(
            f"{name:<24}{comp.params / 1e6:>8.1f}M"
            f"{num(comp.weight_bytes('fp32')):>9}{num(comp.weight_bytes('bf16')):>9}"
            f"{num(comp.training_bytes):>9}{num(comp.activations):>9}{num(comp.activations_checkpointed):>9}"
            f"{card(comp.name):>9}"
        )
    if b.pages_per_chunk is not None:
        label = f"chunk of {min(b.pages_per_chunk, b.pages)} page{'s' * (min(b.pages_per_chunk, b.pages) > 1)}"
        lines.append(f"{label:<24}{'':>36}{num(b.chunk_activations):>9}{num(b.chunk_activations_checkpointed):>9}")
    lines += [
        f"{'block recompute (ckpt)':<24}{'':>45}{num(b.recompute_peak):>9}",
        f"{'KV cache (reasoning)':<24}{'':>18}{num(b.kv_cache):>9}{'':>27}{card('KV cache'):>9}",
        "",
        f"columns in {unit}. fp32, bf16: the weights. train: weights, gradients and optimizer state under bf16 "
        "mixed-precision Adam, 16 B per trained parameter (bf16 weights and grads, fp32 master, m, v), 2 B per frozen "
        "one. acts: tensors saved for backward in one training forward, measured (attention as flash attention "
        "keeps it; frozen encoders save none). ckpt: the same with every transformer block checkpointed (its input "
        "kept), plus one block's recompute" + ("." if b.pages_per_chunk is None else CHUNK_NOTE),
        "",
        f"totals ({unit})                          archlab     card GB",
        f"  weights, grads, optimizer state {num(b.training_state):>12}"
        f"{sum(CARD_GB[k] or 0 for k in COMPONENTS):>10g}   (the card's five model lines)",
        f"  KV cache, {pages:<23}{num(b.kv_cache):>12}{CARD_GB['KV cache']:>10g}",
        f"  activations, no checkpointing   {num(b.activations):>12}{CARD_GB['activations']:>10g}",
        f"  activations, checkpointed       {num(b.activations_checkpointed):>12}",
        f"  total, checkpointed             {num(b.total()):>12}{CARD_TOTAL_GB - CARD_GB['buffer']:>10g}"
        f"   (+ the card's {CARD_GB['buffer']:g} GB buffer = {CARD_TOTAL_GB})",
        f"  total, no checkpointing         {num(b.total(checkpointing=False)):>12}",
        "",
        f"latent compression ({b.tokens_per_page} -> {c.n_latents} tokens per page), the reasoning module over "
        f"{pages}, against reading every token (the flat reader):",
        f"  sequence     {b.reasoning_tokens:,} tokens ({c.n_global} global + {b.pages} x {c.n_latents} latents) vs "
        f"{b.flat_tokens:,} ({b.flat_tokens / b.reasoning_tokens:.1f}x); global: "
        + ", ".join(f"{n:,} {role.replace('_', ' ')}" for role, n in c.global_tokens.items()),
        f"  KV cache     {format_bytes(b.kv_cache)} vs {format_bytes(b.kv_cache_flat)} "
        f"({b.kv_cache_flat / b.kv_cache:.1f}x); at the card's {CARD_TOKENS_PER_PAGE:,} tokens per page "
        f"{format_bytes(b.kv_cache_flat_card)} ({b.kv_cache_flat_card / b.kv_cache:.1f}x)",
        f"  activations  {format_bytes(b.reasoning_activations)} vs {format_bytes(b.reasoning_activations_flat)} "
        f"({b.reasoning_activations_flat / b.reasoning_activations:.1f}x, measured)",
        f"  scores       {format_bytes(scores(b.reasoning_tokens))} vs {format_bytes(scores(b.flat_tokens))} per "
        "layer if stored densely (flash attention stores neither)",
        "",
        "where the card's arithmetic is off:",
        *[f"  - {note}" for note in b.notes],
    ]
    return "\n".join(lines)
