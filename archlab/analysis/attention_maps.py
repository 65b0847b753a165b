r"""Attention maps: the weights ``alpha [A, N, M]`` each attention layer of a model puts on its keys, captured
from a real forward pass, with the tokens that label the axes.

Capture. Every :class:`~archlab.nn.attention.MultiHeadAttention` (GPT, Llama, BERT/MiniLM, ViT, the
encoder-decoder Transformer's self- and cross-attention) is asked for its weights through its own
``return_weights`` path while :func:`capture_attention` is active: a forward pre-hook adds
``return_weights=True`` to the call and the layer runs :func:`~archlab.nn.attention.attend`'s reference
``math`` backend while captured (the fused ``sdpa`` kernels never form the weights), and a forward hook takes
the weights out again, so the model sees the usual output::

    alpha = softmax(Q K^T / sqrt(d_k) + bias, masked)        [B, A, N, M]   per layer, in call order

The recurrent RNNsearch returns its alignment ``alpha [B, M_tgt, N_src]`` itself (``return_attention``).

Rollout (Abnar & Zuidema 2020), for a ViT: the residual connection keeps half of each token, so layer ``l``
mixes tokens by ``R_l = (mean_heads alpha_l + I) / 2`` (rows renormalised); the ``[class]`` token's row of
``R_L ... R_1`` says how much each patch flowed into it, drawn over the image.

:func:`maps_for` runs a whole model on a text (or an image) from a run folder, a preset or a pretrained
model; :func:`write_maps` writes one PNG per layer (heads side by side, tokens on the axes) and a JSON file.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from archlab.errors import ConfigError, DataError, ShapeError
from archlab.nn.attention import MultiHeadAttention

# ================================================================================================
# Capture
# ================================================================================================


@dataclass
class CapturedAttention:
    """One attention call: the module's name in the model, whether it attended another sequence (cross-attention)
    and the weights ``[B, A, N, M]`` (queries x keys; rows sum to 1 over the keys a query may attend)."""

    name: str
    cross: bool
    weights: Tensor


@dataclass
class AttentionCapture:
    """What :func:`capture_attention` collected (in call order) and the attention modules it could not ask."""

    calls: list[CapturedAttention] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


#: Backends whose weights are those of the plain equation, so the captured layer runs ``math`` instead: the fused
#: kernels and the exact chunked (online-softmax) one. The others (sliding window, block-sparse, low-rank, kernel)
#: attend differently and form no ``[N, M]`` weights: their layers are skipped, and said so.
EXACT_BACKENDS = ("auto", "math", "sdpa", "chunked")


def _why_not(module: nn.Module) -> str:
    """Why ``module``'s weights cannot be captured ("" when they can)."""
    from archlab.nn.backends import parse_backend

    if "return_weights" not in inspect.signature(module.forward).parameters:
        return "its forward has no return_weights"  # Transformer-XL's relative attention
    if parse_backend(module.backend).kind not in EXACT_BACKENDS:
        return f"backend {module.backend!r} forms no [N, M] weights"
    return ""


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[AttentionCapture]:
    """Inside the ``with``, every forward of ``model`` records each multi-head attention's weights ``[B, A, N, M]``
    (computed by the reference math path of :func:`~archlab.nn.attention.attend` for that layer); the hooks are
    removed on exit. A caller that already asks for weights keeps them (and they are recorded)."""
    capture = AttentionCapture()
    handles = []

    backends: dict[nn.Module, str] = {}
    wants: dict[nn.Module, bool] = {}

    def pre_hook(module, args, kwargs):
        wants[module] = bool(kwargs.get("return_weights", False))
        return args, {**kwargs, "return_weights": True}

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            out, weights = output
            memory = args[1] if len(args) > 1 else kwargs.get("memory")
            capture.calls.append(CapturedAttention(name, memory is not None, weights.detach()))
            return output if wants[module] else out

        return hook

    for name, module in model.named_modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        why = _why_not(module)
        if why:
            capture.skipped.append(f"{name} ({type(module).__name__}: {why})")
            continue
        backends[module] = module.backend
        module.backend = "math"  # the reference path: the only one that forms the weights
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        for module, backend in backends.items():
            module.backend = backend


def attention_rollout(layers: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    r"""Attention rollout (Abnar & Zuidema 2020) of self-attention weights ``[B, A, N, N]`` per layer (first to
    last) -> ``[B, N, N]``: ``R = R_L ... R_1`` with ``R_l = residual I + (1 - residual) mean_heads(alpha_l)``,
    rows renormalised. Row ``i`` is how much each input token reaches token ``i`` at the top."""
    layers = list(layers)  # a list of [B, A, N, N] (or one stacked tensor [L, B, A, N, N])
    if not layers:
        raise ShapeError("attention_rollout needs the weights of at least one layer")
    if isinstance(residual, bool) or not isinstance(residual, numbers.Real) or not 0 <= residual < 1:
        raise ConfigError(f"residual={residual!r} must be in [0, 1)")
    result = None
    for i, w in enumerate(layers):
        if not isinstance(w, Tensor):
            raise ShapeError(f"layer {i}: rollout takes tensors of weights [B, A, N, N], got {type(w).__name__}")
        if w.ndim != 4 or w.shape[-1] != w.shape[-2] or (i and (w.shape[0], w.shape[-1]) != tuple(result.shape[:2])):
            wanted = "[B, A, N, N]" if not i else f"[B={result.shape[0]}, A, N={result.shape[-1]}, N] as layer 0"
            raise ShapeError(f"layer {i}: rollout takes self-attention weights {wanted}, got {tuple(w.shape)}")
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        r = residual * eye + (1 - residual) * w.mean(dim=1)
        r = r / r.sum(dim=-1, keepdim=True)
        result = r if result is None else r @ result
    return result


# ================================================================================================
# Maps with their tokens
# ================================================================================================


@dataclass
class AttentionMap:
    """One layer's weights for one input: ``weights [A, N, M]`` (queries x keys), the query and key labels, its
    ``kind`` (``self``, ``cross``, ``alignment`` for RNNsearch, ``rollout`` for a ViT's [class] token) and a title."""

    title: str
    kind: str
    weights: Tensor
    queries: list[str]
    keys: list[str]
    layer: int
    image: Tensor | None = None  # rollout: the input image [H, W] the map is drawn over

    def to_dict(self) -> dict:
        return {
            "title": self.title, "kind": self.kind, "layer": self.layer, "queries": self.queries, "keys": self.keys,
            "heads": self.weights.shape[0], "weights": [[[round(x, 6) for x in row] for row in head]
                                                        for head in self.weights.tolist()],
        }  # fmt: skip


@dataclass
class AttentionMaps:
    """Every map of one forward pass: the model (as given), the input text and the maps in layer order."""

    model: str
    text: str
    maps: list[AttentionMap]
    notes: list[str] = field(default_factory=list)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One short, printable label per token id: its text (spaces shown as ``␣``), else its spelling in the vocabulary
    (sub-word pieces, special tokens)."""
    labels = []
    spell = getattr(getattr(tokenizer, "_tok", None), "id_to_token", None)
    roles = {} if tokenizer is None else {i: role for role, i in reversed(tokenizer.specials.items())}
    for i in ids:
        if i in roles and spell is None:
            labels.append(f"<{roles[i]}>")
            continue
        text = tokenizer.decode([i]) if tokenizer is not None else str(i)
        if (not text or "\ufffd" in text) and spell is not None and spell(i) is not None:  # whitespace stays text
            text = spell(i)
        if not text:
            text = f"#{i}"
        labels.append(text.replace(" ", "\u2423").replace("\n", "\\n").replace("\t", "\\t")[:12])
    return labels


def maps_from_capture(
    capture: AttentionCapture,
    queries: dict[bool, list[str]],
    keys: dict[bool, list[str]],
    *,
    row: int = 0,
    decoder_keys: list[str] | None = None,
) -> list[AttentionMap]:
    """:class:`AttentionMap` per captured call (batch row ``row``); ``queries`` / ``keys`` map ``cross`` (False/True)
    to the labels. Self-attention calls of modules named ``decoder...`` (when ``queries`` has cross labels) are the
    decoder's: their rows take the cross-attention's query labels and their keys ``decoder_keys`` (the decoder's
    input tokens, which its self-attention attends; None: the query labels)."""
    maps, layer_of = [], {}
    for call in capture.calls:
        w = call.weights[row].float()
        n, m = w.shape[-2:]
        if call.cross:
            q, k, kind = queries[True], keys[True], "cross"
        else:
            decoder = True in queries and call.name.startswith("decoder")
            q = queries[True] if decoder else queries[False]
            k = decoder_keys if decoder and decoder_keys is not None else q
            kind = "self"
        if (len(q), len(k)) != (n, m):  # labels that do not fit (a cache, a prefix): number the positions
            q, k = [str(i) for i in range(n)], [str(j) for j in range(m)]
        stack = call.name.rsplit(".blocks.", 1)[0] if ".blocks." in call.name else call.name
        key = (stack, kind)
        layer_of[key] = layer_of.get(key, -1) + 1
        title = f"{call.name} ({kind}-attention)"
        maps.append(AttentionMap(title, kind, w, q, k, layer_of[key]))
    return maps


# ================================================================================================
# Running a model on an input
# ================================================================================================

PRETRAINED = ("minilm-l6",)  # plus the chat models of archlab.chat (SmolLM2) and .gguf files


def maps_for(target: str, text: str | None = None, *, image: int | None = None, seed: int = 0) -> AttentionMaps:
    """The attention maps of ``target`` on ``text`` (or on held-out digit ``image`` for a ViT).

    ``target``: a run folder or checkpoint (GPT / Llama lm, BERT, encoder-decoder Transformer, RNNsearch, ViT
    runs), ``minilm-l6`` (all-MiniLM-L6-v2, real weights), a chat model name or ``.gguf`` file (SmolLM2), or a
    preset name (random weights, seeded: what the architecture does before training; text as UTF-8 bytes).
    """
    from archlab.chat import CHAT_MODELS
    from archlab.models.registry import PRESETS

    if not isinstance(target, str | Path) or not str(target).strip():
        raise ConfigError(f"target={target!r} must name a run folder or checkpoint, a pretrained model or a preset")
    target = str(target)
    if text is not None and not isinstance(text, str):
        raise DataError(f"text must be a str, got {type(text).__name__}")
    for name, value in (("image", image), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{name}={value!r} must be an int")
    path = Path(target)
    if image is not None and (target in PRETRAINED or target in CHAT_MODELS or target.endswith(".gguf")):
        raise ConfigError(f"--image is for ViT models; {target!r} is a text model (use --text)")
    if target in PRETRAINED:
        return _sentence_maps(target, _need_text(text, target))
    if target in CHAT_MODELS or target.endswith(".gguf"):
        from archlab.chat import load_chat_model

        model, tokenizer = load_chat_model(target)
        return _lm_maps(target, model.eval(), tokenizer, _need_text(text, target))
    if path.exists():
        from archlab.train.run import open_run

        opened = open_run(path)
        return _model_maps(target, opened.model, opened.tokenizer, text, image)
    if target in PRESETS:
        from archlab.data.tokenizers import ByteTokenizer
        from archlab.models.registry import build_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(target).eval()
        maps = _model_maps(target, model, ByteTokenizer(), text, image)
        maps.notes.append(f"{target} is a preset with random weights (seed {seed}): the maps show the architecture "
                          "before any training, not learned patterns")  # fmt: skip
        return maps
    raise ConfigError(
        f"{target!r} is neither a run folder or checkpoint (no such path), a pretrained model "
        f"({', '.join(PRETRAINED + tuple(CHAT_MODELS))}, or a .gguf file) nor a preset (see `archlab presets`)"
    )


def _need_text(text: str | None, target: str) -> str:
    if text is None or not text.strip():
        raise DataError(f"--text is required (and not blank) for {target!r}: the maps are of a forward pass over it")
    return text


def _encode(tokenizer, text: str, vocab_size: int, what: str) -> list[int]:
    if tokenizer is None:
        raise DataError(f"{what} has no tokenizer (tokenizer.json) to read --text with")
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError(f"--text {text!r} encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DataError(f"--text {text!r} gives token id {bad[0]}, outside the model's vocabulary [0, {vocab_size}); "
                        "a preset reads UTF-8 bytes and needs vocab_size >= 256")  # fmt: skip
    return ids


def _model_maps(target: str, model: nn.Module, tokenizer, text: str | None, image: int | None) -> AttentionMaps:
    from archlab.models.decoder import DecoderLM
    from archlab.models.seq2seq import RNNsearch, _RNNSeq2Seq
    from archlab.models.transformer import EncoderDecoderTransformer
    from archlab.models.vit import ViT

    model.eval()
    if isinstance(model, ViT):
        if text is not None:
            raise ConfigError(f"--text is for token models; {target!r} is a ViT, whose maps are drawn over a held-out "
                              "8x8 digit (--image I)")  # fmt: skip
        return _vit_maps(target, model, 0 if image is None else image)
    if image is not None:
        raise ConfigError(f"--image is for ViT models; {target!r} is a {type(model).__name__} (use --text)")
    text = _need_text(text, target)
    if isinstance(model, DecoderLM):
        return _lm_maps(target, model, tokenizer, text)
    if isinstance(model, (EncoderDecoderTransformer, _RNNSeq2Seq)):
        if isinstance(model, _RNNSeq2Seq) and not isinstance(model, RNNsearch):
            raise ConfigError(f"{target!r} is an RNNenc: it has no attention (its decoder reads one fixed vector); "
                              "RNNsearch has alignments")  # fmt: skip
        return _seq2seq_maps(target, model, tokenizer, text)
    bert = getattr(model, "bert", model)
    from archlab.models.bert import BertModel

    if isinstance(bert, BertModel):
        ids = _encode(tokenizer, text, bert.config.vocab_size, target)
        cls_id, sep_id = tokenizer.specials.get("cls"), tokenizer.specials.get("sep")
        ids = ([cls_id] if cls_id is not None else []) + ids + ([sep_id] if sep_id is not None else [])
        return _bert_maps(target, bert, ids, token_labels(tokenizer, ids), text)
    raise ConfigError(f"{target!r} is a {type(model).__name__}, which has no attention maps archlab can draw "
                      "(GPT/Llama, BERT, ViT, the encoder-decoder Transformer and RNNsearch have)")  # fmt: skip


@torch.no_grad()
def _lm_maps(target: str, model: nn.Module, tokenizer, text: str) -> AttentionMaps:
    ids = _encode(tokenizer, text, model.config.vocab_size, target)
    labels = token_labels(tokenizer, ids)
    with capture_attention(model) as capture:
        model(torch.tensor([ids]), logits_to_keep=1)
    return AttentionMaps(target, text, maps_from_capture(capture, {False: labels}, {False: labels}),
                         [f"not captured: {s}" for s in capture.skipped])  # fmt: skip


@torch.no_grad()
def _bert_maps(target: str, bert: nn.Module, ids: list[int], labels: list[str], text: str) -> AttentionMaps:
    input_ids = torch.tensor([ids])
    with capture_attention(bert) as capture:
        bert(input_ids, attention_mask=torch.ones_like(input_ids), token_type_ids=torch.zeros_like(input_ids))
    return AttentionMaps(target, text, maps_from_capture(capture, {False: labels}, {False: labels}))


def _sentence_maps(target: str, text: str) -> AttentionMaps:
    from archlab.interop.sentence import sentence_encoder

    encoder = sentence_encoder(target)
    ids = encoder.tokenize([text], encoder.max_seq_length)[0][0].tolist()  # [CLS] ... [SEP], as embed reads it
    labels = [encoder.tokenizer.id_to_token(i) for i in ids]
    return _bert_maps(target, encoder.bert, ids, labels, text)


@torch.no_grad()
def _seq2seq_maps(target: str, model: nn.Module, tokenizer, text: str, max_new_tokens: int = 64) -> AttentionMaps:
    """Greedy translation of ``text``, then one teacher-forced pass over the output for the maps; decoder rows are
    labelled by the token each step produces (the last: ``</s>``), the decoder self-attention's keys by the token
    each step reads (the first: ``<s>``)."""
    from archlab.generation import generate
    from archlab.models.seq2seq import RNNsearch

    src = _encode(tokenizer, text, model.config.vocab_size, target)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if bos is None or eos is None or max(bos, eos) >= model.config.vocab_size:
        raise DataError(f"{target!r}: its tokenizer has no <s> / </s> inside the model's vocabulary to start and stop "
                        "the decoder with (a seq2seq preset reads bytes: train a run first)")  # fmt: skip
    src_ids = torch.tensor([src])
    mask = torch.ones_like(src_ids, dtype=torch.bool)
    memory = model.encode(src_ids, mask)
    out = generate(model.decoder_step(memory, mask), torch.tensor([[bos]]), max_new_tokens=max_new_tokens,
                   cache=model.new_cache(), stop_tokens=[eos], pad_id=eos)[0, 1:].tolist()  # fmt: skip
    if eos in out:
        out = out[: out.index(eos)]
    tgt_in = torch.tensor([[bos] + out])
    src_labels = token_labels(tokenizer, src)
    produced = token_labels(tokenizer, out) + ["</s>"]
    output_text = tokenizer.decode(out)
    if isinstance(model, RNNsearch):
        _, alpha = model(src_ids, tgt_in, mask, return_attention=True)  # [1, M, N]
        maps = [AttentionMap("RNNsearch alignment (decoder step x source token)", "alignment", alpha[0][None].float(),
                             produced, src_labels, 0)]  # fmt: skip
        return AttentionMaps(target, text, maps, [f"output: {output_text!r}"])
    with capture_attention(model) as capture:
        model(src_ids, tgt_in, mask)
    read = ["<s>"] + token_labels(tokenizer, out)  # the decoder's inputs: the keys of its self-attention
    maps = maps_from_capture(capture, {False: src_labels, True: produced}, {False: src_labels, True: src_labels},
                             decoder_keys=read)  # fmt: skip
    return AttentionMaps(target, text, maps, [f"output: {output_text!r}"])


@torch.no_grad()
def _vit_maps(target: str, model: nn.Module, index: int) -> AttentionMaps:
    from archlab.data.images import digits

    c = model.config
    (_, _), (x_test, y_test) = digits()
    if (c.n_channels, c.image_size) != (1, 8):
        raise ConfigError(f"{target!r} takes {c.n_channels}x{c.image_size}x{c.image_size} images; archlab draws ViT "
                          "maps on the 8x8 grey digits (the vit-tiny shape)")  # fmt: skip
    if not 0 <= index < len(y_test):
        raise ConfigError(f"--image {index} must be in [0, {len(y_test)}) (a held-out digit)")
    pixels = x_test[index : index + 1]
    with capture_attention(model) as capture:
        model(pixels)
    g = c.grid_size
    labels = ["[class]"] + [f"p{r},{q}" for r in range(g) for q in range(g)]
    maps = maps_from_capture(capture, {False: labels}, {False: labels})
    rollout = attention_rollout([call.weights for call in capture.calls])[0, 0, 1:]  # [class] row over the patches
    maps.append(AttentionMap(f"attention rollout of [class] over the image (digit {int(y_test[index])})", "rollout",
                             rollout.reshape(1, g, g).float(), [str(r) for r in range(g)], [str(q) for q in range(g)],
                             len(capture.calls), image=pixels[0, 0]))  # fmt: skip
    return AttentionMaps(target, f"held-out digit #{index} (a {int(y_test[index])})", maps)


# ================================================================================================
# Drawing and writing
# ================================================================================================


MIN_WIDTH = 5.6  # inches: a one-head figure (RNNsearch, --head H) still fits its title and axis labels

#: What a map's rows and columns are, by its kind (the figure's axis labels).
AXES = {
    "self": ("query: the token attending", "key: the token attended to"),
    "cross": ("decoder query: the output token produced", "key: the source token attended to"),
    "alignment": ("decoder step: the output token produced", "source token aligned to"),
}


def draw_map(ax, weights: Tensor, queries: Sequence[str], keys: Sequence[str], title: str) -> None:
    """One ``[N, M]`` map on ``ax``: queries down the rows, keys along the columns, the tokens on the axes."""
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6), aspect="auto",
              interpolation="nearest")  # fmt: skip
    n, m = weights.shape
    size = 7 if max(n, m) <= 24 else 5
    if m <= 64:
        ax.set_xticks(range(m), keys, rotation=90, fontsize=size)
    if n <= 64:
        ax.set_yticks(range(n), queries, fontsize=size)
    ax.set_title(title, fontsize=8)


def draw_layer(fig, amap: AttentionMap, head: int | None = None) -> None:
    """A layer's heads side by side (or head ``head`` alone) on ``fig``; a rollout over its image."""
    if amap.kind == "rollout":
        ax1, ax2 = fig.subplots(1, 2)
        ax1.imshow(amap.image.numpy(), cmap="gray")
        ax1.set_title("input", fontsize=8)
        g = amap.weights.shape[-1]
        ax2.imshow(amap.image.numpy(), cmap="gray")
        h, w = amap.image.shape
        shown = ax2.imshow(amap.weights[0].numpy(), cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                           interpolation="nearest")  # fmt: skip
        fig.colorbar(shown, ax=ax2, shrink=0.8, label="rollout weight of the patch in [class]")
        ax2.set_title(f"rollout of [class] over {g}x{g} patches", fontsize=8)
        for ax in (ax1, ax2):
            ax.set_xticks([])
            ax.set_yticks([])
        return
    heads = range(amap.weights.shape[0]) if head is None else [head]
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(heads) :]:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        draw_map(ax, amap.weights[h], amap.queries, amap.keys, f"head {h}")
    rows_are, columns_are = AXES.get(amap.kind, AXES["self"])
    fig.supylabel(rows_are, fontsize=8)
    fig.supxlabel(f"{columns_are}\ncolour: weight, 0 (dark) to the head's largest (yellow)", fontsize=8)


def select_maps(maps: AttentionMaps, layer: int | None, head: int | None) -> list[AttentionMap]:
    """The maps of layer ``layer`` (every layer: None), checked: ConfigError naming the allowed range."""
    chosen = maps.maps if layer is None else [m for m in maps.maps if m.layer == layer and m.kind != "rollout"]
    if not chosen:
        top = max((m.layer for m in maps.maps if m.kind != "rollout"), default=-1)
        raise ConfigError(f"--layer {layer} is out of range: the attention layers are 0..{top}")
    if head is not None:
        for m in chosen:
            if m.kind != "rollout" and not 0 <= head < m.weights.shape[0]:
                raise ConfigError(f"--head {head} is out of range: {m.title} has heads 0..{m.weights.shape[0] - 1}")
    return chosen


def write_maps(
    maps: AttentionMaps, out: str | Path, *, layer: int | None = None, head: int | None = None
) -> list[Path]:
    """One PNG per chosen layer (``NN-<kind>-<name>.png``) and ``attention.json`` (tokens, weights) in ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = select_maps(maps, layer, head)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, amap in enumerate(chosen):
        heads = 1 if head is not None or amap.kind == "rollout" else amap.weights.shape[0]
        cols = min(heads, 4)
        n = max(len(amap.queries), len(amap.keys))
        cell = min(max(2.6, 0.16 * n + 1.2), 6.0)
        width = max(cell * (2 if amap.kind == "rollout" else cols), MIN_WIDTH)  # room for the titles and labels
        fig = Figure(figsize=(width, cell * math.ceil(heads / cols) + 0.8), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        draw_layer(fig, amap, head)
        fig.suptitle(amap.title, fontsize=9)
        stem = "".join(ch if ch.isalnum() else "-" for ch in amap.title.split(" (")[0]).strip("-")
        path = out / f"{i:02d}-{amap.kind}-{stem[:60]}.png"
        fig.savefig(str(path))
        files.append(path)
    data = {"model": maps.model, "text": maps.text, "notes": maps.notes, "head": head,
            "maps": [{**m.to_dict(), "png": f.name} for m, f in zip(chosen, files)]}  # fmt: skip
    if head is not None:
        for entry in data["maps"]:
            if entry["kind"] != "rollout":
                entry["weights"] = [entry["weights"][head]]
    (out / "attention.json").write_text(json.dumps(data) + "\n")
    files.append(out / "attention.json")
    return files


__all__ = [
    "AttentionCapture", "AttentionMap", "AttentionMaps", "CapturedAttention", "attention_rollout", "capture_attention",
    "draw_layer", "draw_map", "maps_for", "maps_from_capture", "select_maps", "token_labels", "write_maps",
]  # fmt: skip
