r"""Cross-encoder re-ranking (card 5): the first stage's top ``R`` hits re-scored by reading query and document together.

Each (query, document) pair is one input to archlab's :class:`~archlab.models.bert.BertCrossEncoder`::

    [CLS] q_1 .. q_m [SEP] d_1 .. d_n [SEP]            segment 0 on [CLS] q [SEP], 1 on d [SEP]     [R, N]
    logit = w^T tanh(W_p h_[CLS] + b_p) + b             one relevance logit per pair                [R]
    score = sigmoid(logit)                              (the folder's activation; sentence-transformers' default)

Pairs longer than the model's ``max_length`` are cut as Hugging Face's ``longest_first`` truncation cuts them
(the longer side loses tokens first), so scores equal ``sentence_transformers.CrossEncoder(folder).predict``.

A re-ranker folder is a Hugging Face ``BertForSequenceClassification`` folder with one label, as
``save_pretrained`` and sentence-transformers' ``CrossEncoder.save`` write it::

    config.json               model_type "bert", architectures ["BertForSequenceClassification"], one label
    model.safetensors         bert.* + classifier.{weight,bias}
    tokenizer.json            the fast tokenizer (WordPiece); tokenizer_config.json: model_max_length (optional)
    config_sentence_transformers.json   activation_fn (optional; Sigmoid or Identity)
    sentence_bert_config.json           max_seq_length (optional)

:meth:`Reranker.save` writes that layout; the folder loads back here, in ``BertForSequenceClassification
.from_pretrained`` and in ``CrossEncoder``.

**Fusion with the first stage.** A re-ranker trained here without labels (``archlab search adapt``) may rank
worse than the first stage. ``adapt`` checks it on held-out pseudo-queries and writes :data:`HELDOUT_FILE`
beside the weights (other loaders ignore it): the check's numbers and a weight ``w`` on the first stage, the one
that ranked the held-out queries best. The final order of the re-ranked head is then weighted reciprocal rank
fusion (:func:`fuse_ranks`)::

    s_i = w / (k0 + r_first(i)) + (1 - w) / (k0 + r_rerank(i))        ranks from 1, k0 = 60

``w = 0`` (a folder without the file): the re-ranker's order; ``w = 1``: the first stage's order is kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop.bert import bert_config_from_hf, bert_config_to_hf, bert_to_hf, load_bert
from archlab.interop.io import atomic_dir, read_json
from archlab.models.bert import BertCrossEncoder, BertForSequenceClassification, BertModel, PairBatch, pair_inputs
from archlab.nn.linear import RefreshedCopies, packs_bf16
from archlab.precision import PrecisionChoice, announce, choose_precision
from archlab.search.corpus import Document
from archlab.search.fuse import DEFAULT_K0

ARCHITECTURE = "BertForSequenceClassification"
ACTIVATIONS = {  # sentence-transformers' names of the activations applied to the logit -> ours
    "torch.nn.modules.activation.Sigmoid": "sigmoid", "torch.nn.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity", "torch.nn.Identity": "identity",
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SPECIAL_PAIR_TOKENS = 3  # [CLS], [SEP], [SEP]
HELDOUT_FILE = "archlab_heldout.json"  # adapt's held-out check and the first stage's fusion weight


def fuse_ranks(scores: Sequence[float], first_stage_weight: float, k0: float = DEFAULT_K0) -> list[float]:
    """Final scores of ``n`` hits given in first-stage order (hit ``i`` has first-stage rank ``i + 1``) and
    re-ranker ``scores`` ``[n]``: ``w / (k0 + r_first) + (1 - w) / (k0 + r_rerank)`` (module docstring). Equal
    re-ranker scores take the first-stage order's ranks."""
    w = first_stage_weight
    if not 0.0 <= w <= 1.0:
        raise ConfigError(f"first_stage_weight={w!r} must be in [0, 1]")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable
    rerank_rank = [0] * len(scores)
    for r, i in enumerate(order, 1):
        rerank_rank[i] = r
    return [w / (k0 + i + 1) + (1 - w) / (k0 + rerank_rank[i]) for i in range(len(scores))]


def scoring_precision(precision: str, model: torch.nn.Module) -> PrecisionChoice:
    """The precision ``model`` scores in: :func:`archlab.precision.choose_precision` for the device and dtype of its
    weights, so ``auto`` follows the device the model is on (a CUDA model: that GPU's bf16 support, not the host
    CPU's; a CPU model: AMX / AVX512-BF16 and the kernel cap), and keeps a float64 model float64."""
    weight = next(model.parameters())
    return choose_precision(precision, weight.device, weight.dtype)


def longest_first(n_query: int, n_doc: int, room: int) -> tuple[int, int]:
    """Tokens kept of a query and a document so that ``kept_q + kept_d <= room``: Hugging Face's ``longest_first``.

    With ``s <= l`` the shorter and longer lengths: nothing is cut when ``s + l <= room``; else the longer keeps
    ``max(s, room - s)``; if that still does not fit, the shorter keeps ``room // 2`` and the longer
    ``room // 2 + room % 2``.
    """
    if n_query + n_doc <= room:
        return n_query, n_doc
    short, long = sorted((n_query, n_doc))
    long = short if short > room else max(short, room - short)
    if short + long > room:
        short, long = room // 2, room // 2 + room % 2
    return (short, long) if n_query <= n_doc else (long, short)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has, else ConfigError naming it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but torch sees no CUDA GPU: use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={str(device)!r}: the re-ranker runs on 'cpu' or 'cuda'")
    return device


def _text(doc: Document | str) -> str:
    return doc if isinstance(doc, str) else doc.full_text


class Reranker:
    """A cross-encoder with its tokenizer: ``score(query, docs)`` and ``rerank(query, hits, depth)``.

    Args:
        model: the cross-encoder (its ``cls_id``/``sep_id`` are the tokenizer's).
        tokenizer: a ``tokenizers.Tokenizer`` (the folder's ``tokenizer.json``).
        max_length: the longest packed pair, special tokens included (at most the position table).
        activation: ``"sigmoid"`` or ``"identity"``, applied to the logits by :meth:`score`.
        batch_size: pairs per forward pass.
        first_stage_weight: ``w`` of :func:`fuse_ranks` applied by :meth:`rerank` and the search engine (0: the
            re-ranker's order alone).
        heldout: what ``adapt``'s held-out check measured (:data:`HELDOUT_FILE`), or None.
        precision: ``fp32`` (default: the scores equal sentence-transformers'), ``bf16``, or ``auto`` (bf16 where
            the model's device computes it natively: :func:`scoring_precision`): the model's weights are cast to it
            for scoring (a re-ranker to train stays fp32).
        device: where the model scores (``"cpu"``, ``"cuda"``, ``"cuda:1"``), moved there before its precision is
            chosen; None (default) leaves it where it is. Pairs are packed on the CPU and moved to it.
    """

    def __init__(self, model: BertCrossEncoder, tokenizer, *, max_length: int | None = None,
                 activation: str = "sigmoid", batch_size: int = 32, first_stage_weight: float = 0.0,
                 heldout: dict | None = None, precision: str = "fp32", device: str | torch.device | None = None):  # fmt: skip
        limit = model.config.max_len
        max_length = limit if max_length is None else max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 4 <= max_length <= limit:
            raise ConfigError(f"max_length={max_length!r} must be an int in [4, {limit}] (the model's max_len)")
        if activation not in ("sigmoid", "identity"):
            raise ConfigError(f"activation={activation!r} must be 'sigmoid' or 'identity'")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive int")
        if device is not None:
            model.to(check_device(device))
        choice = scoring_precision(precision, model)
        if choice.dtype is not None:
            model.to(choice.dtype)
        if precision != "fp32":  # the default says nothing
            announce(choice.line("cross-encoder re-ranking"))
        self.precision = choice.name
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.activation, self.batch_size = max_length, activation, batch_size
        fuse_ranks([], first_stage_weight)  # checks the weight
        self.first_stage_weight, self.heldout = float(first_stage_weight), heldout
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        # on a CPU, scoring's products run on oneDNN-packed copies of the weights (bf16 ones only where the CPU has AMX),
        # made at the first scoring call and made again after training. fp32, MiniLM-L6, 2 threads, AMD EPYC, 5
        # interleaved rounds: 10 abstracts 1.32x, 32 1.14x
        self._copies = RefreshedCopies(model, batch_size * max_length, bf16=packs_bf16())
        self.packed = 0  # weights with a packed copy

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, **options) -> Reranker:
        """The cross-encoder in a Hugging Face / sentence-transformers folder (layout in the module docstring).

        Raises :class:`CheckpointError` naming the file for a missing file, a model that is not a BERT
        sequence classifier, or one with more than one label.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder (expected a cross-encoder: config.json, "
                                  "model.safetensors, tokenizer.json)")  # fmt: skip
        config_file = folder / "config.json"
        hf = read_json(config_file)
        architectures = hf.get("architectures") or [ARCHITECTURE]
        if architectures[0] != ARCHITECTURE:
            raise CheckpointError(f"{config_file}: architectures={architectures} is not a cross-encoder "
                                  f"(expected {ARCHITECTURE!r} with one label)")  # fmt: skip
        config = bert_config_from_hf(hf, source=str(config_file))
        if config.n_classes != 1:
            raise CheckpointError(f"{config_file}: the model has {config.n_classes} labels; a re-ranker has one "
                                  "(num_labels=1: one relevance logit per pair)")  # fmt: skip
        tokenizer, cls_id, sep_id = _read_tokenizer(folder)
        loaded = load_bert(folder)
        if not isinstance(loaded, BertForSequenceClassification):
            raise CheckpointError(f"{folder / 'model.safetensors'} holds no classifier.* head: not a cross-encoder")
        model = BertCrossEncoder(loaded.config, cls_id=cls_id, sep_id=sep_id, bert=loaded.bert)
        model.classifier.load_state_dict(loaded.classifier.state_dict())
        options.setdefault("max_length", _max_length(folder, loaded.config.max_len))
        options.setdefault("activation", _activation(folder, hf))
        heldout_file = folder / HELDOUT_FILE
        if heldout_file.is_file():
            heldout = read_json(heldout_file)
            weight = heldout.get("first_stage_weight") if isinstance(heldout, dict) else None
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
                raise CheckpointError(f"{heldout_file}: first_stage_weight={weight!r} must be a number in [0, 1]")
            options.setdefault("first_stage_weight", float(weight))
            options.setdefault("heldout", heldout)
        return cls(model, tokenizer, **options)

    @classmethod
    def from_encoder(cls, encoder: str | Path = "minilm-l6", *, seed: int = 0, max_length: int = 256,
                     **options) -> Reranker:  # fmt: skip
        """A cross-encoder to train: the BERT of a sentence-transformers folder (default the real all-MiniLM-L6-v2)
        with a fresh one-unit head, initialised from ``seed``."""
        from archlab.interop.sentence import load_sentence_encoder, minilm_path

        folder = minilm_path() if str(encoder) == "minilm-l6" else Path(encoder)
        # uncached, and without packed copies: the weights are about to change, and PyTorch's fused AdamW changes
        # them without bumping their _version, which is how a stale copy is told (archlab.nn.linear)
        st = load_sentence_encoder(folder, packed=False)
        bert: BertModel = st.bert
        tokenizer = st.tokenizer  # with the folder's lower-casing, if it asks for it
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise CheckpointError(f"{folder}: the tokenizer has no [CLS] / [SEP] token; a BERT cross-encoder needs both")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertCrossEncoder(bert.config.replace(n_classes=1), cls_id=cls_id, sep_id=sep_id, bert=bert)
        return cls(model, tokenizer, max_length=min(max_length, bert.config.max_len), **options)

    def save(self, folder: str | Path) -> Path:
        """Write the Hugging Face layout (config, safetensors, tokenizer, sentence-transformers' activation),
        atomically; returns ``folder``."""
        folder = Path(folder)
        config = bert_config_to_hf(self.model.config, architecture=ARCHITECTURE)
        _, encoder_state = bert_to_hf(self.model.bert)
        state = {f"bert.{k}": v for k, v in encoder_state.items()}
        state.update({f"classifier.{k}": v for k, v in self.model.classifier.state_dict().items()})
        with atomic_dir(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            specials = {"cls_token": self.tokenizer.id_to_token(self.model.cls_id),
                        "sep_token": self.tokenizer.id_to_token(self.model.sep_id),
                        "pad_token": self.tokenizer.id_to_token(self.model.config.pad_id)}  # fmt: skip
            unk = "[UNK]" if self.tokenizer.token_to_id("[UNK]") is not None else None
            tok_config = {"tokenizer_class": "BertTokenizer", "model_max_length": self.max_length, **specials,
                          "unk_token": unk, "mask_token": "[MASK]" if self.tokenizer.token_to_id("[MASK]") else None}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
            activation = {"sigmoid": "torch.nn.modules.activation.Sigmoid",
                          "identity": "torch.nn.modules.linear.Identity"}[self.activation]  # fmt: skip
            st = {"model_type": "CrossEncoder", "activation_fn": activation}
            (tmp / "config_sentence_transformers.json").write_text(json.dumps(st, indent=2) + "\n")
            if self.heldout is not None or self.first_stage_weight:
                heldout = {**(self.heldout or {}), "first_stage_weight": self.first_stage_weight}
                (tmp / HELDOUT_FILE).write_text(json.dumps(heldout, indent=2) + "\n")
        return folder

    # ------------------------------------------------------------------------------------------
    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def pack(self, queries: Sequence[str], docs: Sequence[Document | str]) -> PairBatch:
        """``[CLS] q_i [SEP] d_i [SEP]`` for each pair, cut to ``max_length`` by :func:`longest_first`, padded:
        a :class:`~archlab.models.bert.PairBatch` of ``[B, N]`` tensors."""
        room = self.max_length - SPECIAL_PAIR_TOKENS
        cut_q, cut_d = [], []
        for q, d in zip(self._ids(queries), self._ids([_text(doc) for doc in docs]), strict=True):
            kq, kd = longest_first(len(q), len(d), room)
            cut_q.append(q[:kq])
            cut_d.append(d[:kd])
        return pair_inputs(cut_q, cut_d, cls_id=self.model.cls_id, sep_id=self.model.sep_id,
                           pad_id=self.model.config.pad_id, max_length=self.max_length)  # fmt: skip

    def forward(self, batch: PairBatch) -> Tensor:
        """Logits ``[B]`` of a packed batch (built on the CPU, moved to the model's device), with autograd and the
        model's current mode (training uses this)."""
        device = next(self.model.parameters()).device
        return self.model.score(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                token_type_ids=batch.token_type_ids.to(device))  # fmt: skip

    def logits(self, query: str, docs: Sequence[Document | str]) -> Tensor:
        """Relevance logits ``[n]`` (float32) of ``query`` against each of the ``n`` ``docs``, in their order.

        Pairs are batched ``batch_size`` at a time, longest first (little padding); each is cut to
        ``max_length`` by :func:`longest_first`.
        """
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"query must be a non-empty string, got {query!r:.60}")
        if isinstance(docs, str) or not isinstance(docs, Sequence):
            raise DataError(f"docs must be a list of Documents or strings, got {type(docs).__name__}")
        if not docs:
            return torch.empty(0)
        texts = [_text(doc) for doc in docs]
        lengths = [len(ids) for ids in self._ids(texts)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = torch.empty(len(texts))
        if next(self.model.parameters()).device.type == "cpu":
            self.packed = self._copies.refresh()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    out[rows] = self.forward(self.pack([query] * len(rows), [texts[i] for i in rows])).float().cpu()
        finally:
            self.model.train(was_training)
        return out

    def score(self, query: str, docs: Sequence[Document | str]) -> list[float]:
        """The folder's activation of :meth:`logits` (default sigmoid): ``CrossEncoder.predict``'s numbers."""
        logits = self.logits(query, docs)
        return (torch.sigmoid(logits) if self.activation == "sigmoid" else logits).tolist()

    def final_scores(self, scores: Sequence[float], first_stage_weight: float | None = None) -> list[float]:
        """The scores that order a re-ranked head given in first-stage order: ``scores`` themselves, or their
        :func:`fuse_ranks` with the first stage when the weight ``w`` > 0 (default :attr:`first_stage_weight`;
        another ``w`` measures what that fusion would give)."""
        w = self.first_stage_weight if first_stage_weight is None else first_stage_weight
        return fuse_ranks(scores, w) if w else list(scores)

    def rerank(self, query: str, hits: Sequence, depth: int) -> list:
        """The first ``depth`` of ``hits`` re-ordered by :meth:`final_scores` (``score``; the re-ranker's own in
        ``stage_scores["rerank"]``), then the rest in their order; ranks renumbered from 1. The timing is in
        :attr:`last_ms`."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ConfigError(f"depth={depth!r} must be an int >= 0")
        head, tail = list(hits[:depth]), list(hits[depth:])
        start = time.perf_counter()
        scores = self.score(query, [h.doc for h in head]) if head else []
        self.last_ms = (time.perf_counter() - start) * 1000
        rescored = [replace(h, score=f, stage_scores={**h.stage_scores, "rerank": s})
                    for h, s, f in zip(head, scores, self.final_scores(scores))]  # fmt: skip
        rescored.sort(key=lambda h: -h.score)  # stable: ties keep the first stage's order
        return [replace(h, rank=i + 1) for i, h in enumerate(rescored + tail)]


# ================================================================================================
# Folder parts
# ================================================================================================


def _read_tokenizer(folder: Path):
    """``(tokenizers.Tokenizer, cls_id, sep_id)`` from ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"missing tokenizer.json in {folder} (archlab reads the fast-tokenizer file; "
                              "save the tokenizer with save_pretrained)")  # fmt: skip
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise CheckpointError(f"{path} is not a readable tokenizer: {e}") from None
    tok_config_file = folder / "tokenizer_config.json"
    tok_config = read_json(tok_config_file) if tok_config_file.is_file() else {}
    ids = []
    for role, default in (("cls_token", "[CLS]"), ("sep_token", "[SEP]")):
        token = tok_config.get(role) or default
        token = token.get("content", default) if isinstance(token, dict) else token
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{path}: the {role} {token!r} is not in the vocabulary")
        ids.append(token_id)
    return tokenizer, ids[0], ids[1]


def _max_length(folder: Path, max_len: int) -> int:
    """sentence-transformers' rule: ``sentence_bert_config.json`` ``max_seq_length``, else the tokenizer's
    ``model_max_length``, capped at the position table ``max_len``."""
    st_file, tok_file = folder / "sentence_bert_config.json", folder / "tokenizer_config.json"
    st = read_json(st_file) if st_file.is_file() else {}
    if st.get("max_seq_length"):
        return min(int(st["max_seq_length"]), max_len)
    tok = read_json(tok_file) if tok_file.is_file() else {}
    length = tok.get("model_max_length")
    return min(int(length), max_len) if isinstance(length, int | float) and length > 0 else max_len


def _activation(folder: Path, hf: dict) -> str:
    """The activation sentence-transformers applies in ``predict`` (its files, newest layout first; default sigmoid)."""
    st_file = folder / "config_sentence_transformers.json"
    candidates = [
        (st_file, (read_json(st_file) if st_file.is_file() else {}).get("activation_fn")),
        (folder / "config.json", (hf.get("sentence_transformers") or {}).get("activation_fn")),
        (folder / "config.json", hf.get("sbert_ce_default_activation_function")),
    ]
    for source, name in candidates:
        if name is not None:
            if name not in ACTIVATIONS:
                raise CheckpointError(f"{source}: activation_fn={name!r} is not supported "
                                      f"(allowed: {sorted(ACTIVATIONS)})")  # fmt: skip
            return ACTIVATIONS[name]
    return "sigmoid"


__all__ = ["HELDOUT_FILE", "Reranker", "fuse_ranks", "longest_first", "scoring_precision"]
