r"""Chat templates: a conversation -> the text a chat model was tuned on, rendered by archlab (no Jinja).

A model's files carry its template as Jinja source (``tokenizer.chat_template`` in a GGUF,
``chat_template`` in a Hugging Face ``tokenizer_config.json``). archlab recognises the ChatML family and
renders it itself; any other template is refused with a :class:`~archlab.errors.DataError` rather than
rendered approximately. ChatML, for messages ``m_1 .. m_n`` (each ``{"role": r, "content": c}``)::

    [<|im_start|>system\n{default system}<|im_end|>\n]        if the template has one and m_1 is not a system message
    <|im_start|>{r_i}\n{c_i}<|im_end|>\n                      for i = 1 .. n
    [<|im_start|>assistant\n]                                   if add_generation_prompt

:meth:`ChatML.pieces` returns the text split at the markers (``<|im_start|>``, ``<|im_end|>``), so a
tokenizer can map each marker to its special-token id and encode only the text between them: a marker
typed inside a message stays text and cannot open or close a turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from archlab.errors import DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML as Jinja (the form SmolLM2 and others ship): the loop, an optional default system message, the rest.
_JINJA_LOOP = "{% for message in messages %}"
_JINJA_SYSTEM = (
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n",  # + default system +
    "<|im_end|>\n' }}{% endif %}",
)
_JINJA_REST = (
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CHATML_RE = re.compile(
    re.escape(_JINJA_LOOP)
    + f"(?:{re.escape(_JINJA_SYSTEM[0])}(?P<system>[^'\\\\]*){re.escape(_JINJA_SYSTEM[1])})?"
    + re.escape(_JINJA_REST)
)


@dataclass(frozen=True)
class ChatML:
    """The ChatML template; ``default_system`` is the system message used when a conversation has none."""

    default_system: str | None = None

    @classmethod
    def parse(cls, template: str) -> ChatML:
        """The ChatML template that the Jinja ``template`` spells (whitespace around it ignored)."""
        if not isinstance(template, str):
            raise DataError(f"chat template must be a string, got {type(template).__name__}")
        match = _CHATML_RE.fullmatch(template.strip())
        if match is None:
            head = template.strip()
            head = head if len(head) <= 80 else head[:80] + "..."
            raise DataError(
                f"chat template {head!r} is not one archlab can render: only ChatML "
                "(<|im_start|>role\\ncontent<|im_end|>, optionally with a default system message) is supported"
            )
        return cls(match.group("system"))

    @property
    def jinja(self) -> str:
        """The template as Jinja source, as Hugging Face and llama.cpp store it (``parse(t.jinja) == t``)."""
        system = "" if self.default_system is None else _JINJA_SYSTEM[0] + self.default_system + _JINJA_SYSTEM[1]
        return _JINJA_LOOP + system + _JINJA_REST

    def pieces(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[str]:
        """The rendered conversation as a list of markers and the texts between them (joined: :meth:`render`)."""
        messages = check_messages(messages)
        out: list[str] = []
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            out += [IM_START, f"system\n{self.default_system}", IM_END, "\n"]
        for m in messages:
            out += [IM_START, f"{m['role']}\n{m['content']}", IM_END, "\n"]
        if add_generation_prompt:
            out += [IM_START, "assistant\n"]
        return out

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's text (what Jinja prints for :attr:`jinja`)."""
        return "".join(self.pieces(messages, add_generation_prompt))

    @property
    def markers(self) -> tuple[str, str]:
        """The special tokens the template writes: ``(<|im_start|>, <|im_end|>)``."""
        return IM_START, IM_END


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """``messages`` as a list, each a mapping with string ``role`` and ``content``; DataError otherwise."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise DataError(f"messages must be a list of {{'role', 'content'}} mappings, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not all(isinstance(m.get(k), str) for k in ("role", "content")):
            raise DataError(f"messages[{i}] = {m!r} must be a mapping with string 'role' and 'content'")
        if not m["role"] or any(c in m["role"] for c in "\n") or IM_START in m["role"] or IM_END in m["role"]:
            raise DataError(f"messages[{i}]['role'] = {m['role']!r} must be a non-empty single line without markers")
    return list(messages)
