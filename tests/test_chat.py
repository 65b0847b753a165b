"""archlab.chat and `archlab chat`: streamed replies equal greedy decoding of the templated conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from archlab.chat import Chat, load_chat_model
from archlab.cli import main
from archlab.data.tokenizers import load_tokenizer
from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.generation import generate, stream
from archlab.interop.convert import convert
from archlab.models import build_model
from archlab.speculative import PromptLookup

sys.path.insert(0, str(Path(__file__).parent / "interop"))
from gguf_files import write_tiny_chat_gguf  # noqa: E402


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """A random tiny Llama with a ChatML byte-level tokenizer, written as llama.cpp writes GGUF files."""
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    return write_tiny_chat_gguf(tmp_path / "tiny.gguf")


def test_stream_yields_the_tokens_generate_returns():
    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=64, max_len=64).eval()
    prompt = torch.randint(0, 64, (2, 5))
    for options in ({}, {"do_sample": True, "temperature": 0.9, "seed": 3}, {"stop_tokens": [7, 9], "pad_id": 0}):
        steps = list(stream(model, prompt, max_new_tokens=12, **options))
        full = generate(model, prompt, max_new_tokens=12, **options)
        assert torch.equal(torch.stack(steps, dim=1), full[:, 5:])


def test_stream_checks_its_arguments_before_decoding():
    model = build_model("gpt-nano", vocab_size=64, max_len=64).eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="max_new_tokens=-1"):
        stream(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=-1)  # raised by the call, not by next()
    steps = stream(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=50)
    next(steps)
    steps.close()  # closing ends the decoding
    assert len(calls) == 1 and list(steps) == []


def test_chat_reply_is_greedy_decoding_of_the_templated_conversation(tiny_gguf):
    model, tok = load_chat_model(tiny_gguf)
    chat = Chat(model, tok, max_new_tokens=8)
    history = []
    for text in ("hello", "well"):
        history.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(history, add_generation_prompt=True)
        out = generate(model, torch.tensor([ids]), max_new_tokens=8, stop_tokens=[tok.eos_id], pad_id=tok.eos_id)
        expected = out[0, len(ids):].tolist()
        expected = expected[: expected.index(tok.eos_id)] if tok.eos_id in expected else expected
        pieces = list(chat.send(text))
        assert len(set(expected)) > 2 and "".join(pieces) == tok.decode(expected)
        history.append({"role": "assistant", "content": tok.decode(expected)})
        assert chat.messages == history


def test_a_long_conversation_drops_its_oldest_turns(tiny_gguf):
    model, tok = load_chat_model(tiny_gguf)
    chat = Chat(model, tok, system="Be brief.", max_new_tokens=4)
    for _ in range(6):
        chat.reply("hello hello")
    ids = chat.prompt_ids([*chat.messages, {"role": "user", "content": "hello"}])
    assert len(ids) + 4 <= model.config.max_len
    assert chat.notes and "oldest turns" in chat.notes[0]
    assert tok.decode(ids).startswith("system\nBe brief.")  # the system message stays
    with pytest.raises(DataError, match="exceeds the model's context of 96 tokens"):
        chat.reply("hello " * 90)
    with pytest.raises(DataError, match="empty"):
        chat.reply("  ")


def test_chat_needs_a_template_and_an_existing_model(tiny_gguf, tmp_path):
    model, tok = load_chat_model(tiny_gguf)
    folder = tmp_path / "no-template"
    convert(tiny_gguf, folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="no chat template"):
        load_chat_model(folder)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_chat_model(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="top_k / top_p"):
        Chat(model, tok, top_k=5)
    with pytest.raises(ConfigError, match="chat template"):
        Chat(model, load_tokenizer(folder))


def test_the_gguf_is_converted_once_into_the_cache(tiny_gguf, tmp_path):
    first, _ = load_chat_model(tiny_gguf)
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    again, _ = load_chat_model(tiny_gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == cached
    direct, _ = load_chat_model(tiny_gguf, use_cache=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]) and torch.equal(tensor, direct.state_dict()[name])


def test_cli_chat_json_reads_messages_from_stdin(tiny_gguf, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n\nwell\n"))
    assert main(["chat", "--model", str(tiny_gguf), "--json", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["user"] for line in lines] == ["hello", "well"]
    model, tok = load_chat_model(tiny_gguf)
    assert lines[0]["assistant"] == Chat(model, tok, max_new_tokens=6).reply("hello")


def test_cli_chat_errors_are_one_line(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nothing.gguf"), "--json"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path), "--max-new-tokens", "0", "--json"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_cli_chat_refuses_undecodable_stdin_naming_the_place_in_the_message(tiny_gguf, monkeypatch, capsys):
    """stdin read with surrogateescape hands b"a\\xffb" over as "a\\udcffb": one error line, not a traceback."""
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("a\udcffb\n"))
    assert main(["chat", "--model", str(tiny_gguf), "--json", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("archlab: error: text is not valid Unicode: lone surrogate '\\udcff' at position 1\n")


def test_interactive_chat_says_a_refused_message_and_goes_on(tiny_gguf, monkeypatch, capsys):
    """At the terminal an undecodable message is said in one line and the next message is answered (it ended the
    session, exit 2); the conversation holds only what was answered."""
    import builtins
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    typed = iter(["a\udcffb", "hello"])

    def type_line(prompt=""):
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(builtins, "input", type_line)
    assert main(["chat", "--model", str(tiny_gguf), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "archlab: error: text is not valid Unicode: lone surrogate '\\udcff' at position 1\n" in err
    model, tok = load_chat_model(tiny_gguf)
    assert out.count("assistant> ") == 2 and Chat(model, tok, max_new_tokens=4).reply("hello") in out


def test_chat_seeds_past_the_last_wrap_into_torchs_range(tiny_gguf, monkeypatch):
    """Reply i samples with seed + i: seed 2**64 - 1 made the second reply's seed past torch's range (refused)."""
    import archlab.generation
    from archlab.config import MAX_SEED

    seeds, stream = [], archlab.generation.stream
    monkeypatch.setattr(archlab.generation, "stream", lambda *a, **k: seeds.append(k["seed"]) or stream(*a, **k))
    model, tok = load_chat_model(tiny_gguf)
    chat = Chat(model, tok, max_new_tokens=2, temperature=1.0, seed=MAX_SEED)
    chat.reply("hello")
    chat.reply("again")
    assert seeds == [MAX_SEED, 0] and len(chat.messages) == 4


def test_cli_generate_with_a_chat_model_answers_once(tiny_gguf, capsys):
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, tok = load_chat_model(tiny_gguf)
    assert result["task"] == "chat" and result["output"] == Chat(model, tok, max_new_tokens=6).reply("hello")
    assert main(["generate", "--prompt", "hello"]) == 2
    assert "one of the two" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--beam", "2"]) == 2
    assert "--beam" in capsys.readouterr().err


def test_cli_default_reply_length_fits_a_short_context(tiny_gguf, monkeypatch, capsys):
    """Not given, --max-new-tokens (generate --model: 100, chat: 256) was refused when the model's context (96
    here) could not hold it after the message; now the reply takes what fits, said in one note line."""
    import re

    model, tok = load_chat_model(tiny_gguf)
    n = len(tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True))
    room = model.config.context_limit - n
    assert 0 < room < 100
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--json"]) == 0
    out, err = capsys.readouterr()
    notes = re.findall(r"^archlab: replying in at most (\d+) tokens, not the default 100: .*$", err, re.M)
    assert notes == [str(room)], err
    assert json.loads(out)["output"] == Chat(model, tok, max_new_tokens=room).reply("hello")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--model", str(tiny_gguf), "--json"]) == 0
    out, err = capsys.readouterr()
    assert re.findall(r"^archlab: replying in at most (\d+) tokens, not the default 256: ", err, re.M) == [str(room)]
    assert json.loads(out)["assistant"] == Chat(model, tok, max_new_tokens=room).reply("hello")
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-new-tokens", "100"]) == 2
    assert "with max_new_tokens=100 that exceeds the model's context of 96 tokens" in capsys.readouterr().err


def test_speculative_chat_replies_as_plain_chat(tiny_gguf):
    model, tok = load_chat_model(tiny_gguf)
    texts = ("hello there", "hello again")  # two turns: a draft model keeps what it read
    plain = Chat(model, tok, max_new_tokens=24)
    expected = [plain.reply(text) for text in texts]
    assert all(expected)
    # this random tiny model seldom repeats two tokens: one-token matches draft too (the default needs two)
    for draft in (PromptLookup(min_ngram=1), "layers:1"):
        fast = Chat(model, tok, max_new_tokens=24, speculative=draft, draft_tokens=3)
        assert [fast.reply(text) for text in texts] == expected
        assert fast.stats.generated >= len(tok.encode(expected[1])) and fast.stats.drafted > 0
    with pytest.raises(ConfigError, match="draft='layers:x' is not one of"):
        Chat(model, tok, speculative="layers:x")


def test_several_messages_answered_as_one_batch_as_each_alone(tiny_gguf):
    """Chat.answer_each: three messages after a system message, decoded as one batch (generate_batch), with and without
    prompt-lookup drafts verified per row, give the replies each message gets alone (float64: no near-ties); the
    conversation does not grow; a draft model, an empty message and a bare string are refused."""
    model, tok = load_chat_model(tiny_gguf)
    model.double()
    texts = ["hello there", "a much longer message than the others, to pad", "hi"]
    alone = [Chat(model, tok, system="be brief", max_new_tokens=10).reply(t) for t in texts]
    assert len(set(alone)) == 3
    for draft in (None, "lookup"):
        chat = Chat(model, tok, system="be brief", max_new_tokens=10, speculative=draft, draft_tokens=3)
        assert chat.answer_each(texts) == alone
        assert chat.messages == [{"role": "system", "content": "be brief"}]
    with pytest.raises(ConfigError, match="speculative='layers:1' decodes one conversation at a time"):
        Chat(model, tok, speculative="layers:1").answer_each(texts)
    with pytest.raises(DataError, match="message 2 is empty"):
        Chat(model, tok).answer_each(["hi", "  "])
    with pytest.raises(ConfigError, match="texts must be a non-empty list of messages, got str"):
        Chat(model, tok).answer_each("hi")


def test_cli_generate_with_several_prompts_answers_each_in_one_batch(tiny_gguf, capsys):
    args = ["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--prompt", "hi there", "--max-new-tokens", "6"]
    assert main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    model, tok = load_chat_model(tiny_gguf)
    replies = Chat(model, tok, max_new_tokens=6).answer_each(["hello", "hi there"])
    assert [r["prompt"] for r in results] == ["hello", "hi there"] and [r["output"] for r in results] == replies
    assert main(args) == 0
    assert capsys.readouterr().out == f"[1] {replies[0]}\n\n[2] {replies[1]}\n"
    assert main([*args, "--speculative", "lookup"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("[1] ") and "\n\n[2] " in out
    assert "speculative (lookup, 2 rows in one batch): " in err and "tokens per pass of the model" in err
    assert main([*args, "--speculative", "layers:1"]) == 2
    assert "--speculative layers:1 decodes one prompt at a time" in capsys.readouterr().err
    assert main([*args, "--prompt", ""]) == 2
    assert "--prompt 3 is empty" in capsys.readouterr().err


def test_cli_speculative_option(tiny_gguf, monkeypatch, capsys):
    args = ["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-new-tokens", "8", "--json"]
    assert main([*args, "--speculative", "lookup", "--draft-tokens", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, tok = load_chat_model(tiny_gguf)
    assert result["output"] == Chat(model, tok, max_new_tokens=8).reply("hello")
    stats = result["speculative"]
    assert stats["draft"] == "lookup" and stats["drafted"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    assert main([*args[:-1], "--speculative", "layers:1"]) == 0
    assert "drafted tokens accepted" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--model", str(tiny_gguf), "--json", "--max-new-tokens", "6", "--speculative", "lookup"]) == 0
    assert json.loads(capsys.readouterr().out)["speculative"]["draft"] == "lookup"
    for bad, message in [(["--speculative", "layers:9"], "takes 1 to 1"), (["--speculative", "x"], "draft='x'"),
                         (["--speculative", "lookup", "--draft-tokens", "0"], "--draft-tokens")]:  # fmt: skip
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", str(tiny_gguf.parent), "--prompt", "hi", "--speculative", "lookup"]) == 2
    assert "--speculative lookup goes with --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["chat", "--temperature", "0"], "temperature=0.0 must be a finite number > 0"),
        (["chat", "--temperature", "nan"], "temperature=nan must be a finite number > 0"),
        (["chat", "--temperature", "1", "--top-p", "2"], r"top_p=2.0 must be in (0, 1]"),
        (["chat", "--temperature", "1", "--top-k", "0"], "top_k=0 must be an int >= 1"),
        (["chat", "--temperature", "1", "--seed", "-1"], "seed=-1 must be an int >= 0"),
        (["generate", "--prompt", "hi", "--temperature", "inf"], "temperature=inf must be a finite number > 0"),
        (["generate", "--prompt", "   "], "--prompt is empty"),
        (["chat", "--speculative", "layer:2"], "draft='layer:2' is not one of ('lookup', 'layers:M')"),
        (["generate", "--prompt", "hi", "--speculative", "bogus"], "draft='bogus' is not one of"),
        (["generate", "--prompt", "a\udcffb"], "text is not valid Unicode: lone surrogate '\\udcff' at position 1"),
        (["generate", "--prompt", "a", "--prompt", "b", "--compile"], "--compile decodes one prompt at a time"),
        (["chat", "--compile", "--quantize", "int8-dynamic"], "--compile cannot trace --quantize int8-dynamic"),
    ],
)
def test_cli_chat_options_and_prompt_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, words):
    """They were checked at the first message, after the model had loaded: `chat --temperature 0` with nothing on
    stdin ended with exit code 0, and `generate --model` loaded the model before saying the prompt was empty."""
    import archlab.cli

    def loads(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(archlab.cli, "load_chat_model_noted", loads)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(""))
    assert main([*argv, "--model", str(tmp_path / "any.gguf"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"archlab: error: {words}") and err.count("\n") == 1, err


def test_chat_checks_its_sampling_options_when_made(tiny_gguf):
    model, tok = load_chat_model(tiny_gguf)
    bad = [({"temperature": 0.0}, "temperature=0.0"), ({"temperature": 0.7, "top_p": 0.0}, "top_p=0.0"),
           ({"seed": 2**64}, "seed=18446744073709551616"), ({"max_new_tokens": True}, "max_new_tokens=True")]
    for options, words in bad:
        with pytest.raises(ConfigError, match=words):
            Chat(model, tok, **options)
    with pytest.raises(DataError, match="the message must be a string, got bytes"):
        Chat(model, tok).reply(b"hello")


def test_compiled_chat_decodes_through_a_static_decoder_of_the_context(tiny_gguf):
    """Chat(compile=True) decodes through a StaticDecoder of the model's whole context (routed here through its
    graphs' eager functions, float64: the wiring; the graphs themselves: the slow test below): the replies plain Chat
    gives, with and without drafts (a draft model from the decoder's model), verify passes at 3 or draft_tokens + 1."""
    from archlab.static_decoding import StaticDecoder
    from tests.test_static_decoding import standing_in_for_compiled

    model, tok = load_chat_model(tiny_gguf)
    model.double()
    texts = ("hello there", "hello again")
    expected = [Chat(model, tok, max_new_tokens=24).reply(text) for text in texts]
    for draft in (None, PromptLookup(min_ngram=1), "layers:1"):
        chat = Chat(model, tok, max_new_tokens=24, speculative=draft, draft_tokens=3, compile=True)
        assert isinstance(chat.decoder, StaticDecoder) and chat.decoder.max_len == chat.limit == 96
        widths: list[int] = []
        standing_in_for_compiled(chat.decoder, widths)
        assert [chat.reply(text) for text in texts] == expected, draft
        assert (widths and set(widths) <= {3, 4} and chat.stats.drafted > 0) if draft is not None else widths == []
    with pytest.raises(ConfigError, match="draft_tokens=0 must be an int >= 1"):
        Chat(model, tok, compile=True, draft_tokens=0)
    limitless = torch.nn.Module()
    limitless.config = type("Config", (), {"context_limit": None})()
    with pytest.raises(ConfigError, match="compile=True decodes through a static cache of the model's context, but "
                                          "this Module has no context limit"):  # fmt: skip
        Chat(limitless, tok, compile=True)


def test_cli_compile_goes_with_a_chat_model(tiny_gguf, capsys):
    assert main(["generate", str(tiny_gguf.parent), "--prompt", "hi", "--compile"]) == 2
    assert "--compile goes with --model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compiled_chat_replies_as_eager_chat(tiny_gguf, monkeypatch, capsys):
    """`archlab chat --compile` (float32: the compiled step and verify pass round as the eager model does), with and
    without prompt-lookup drafts: two replies equal to eager chat's, the compile said once on stderr."""
    messages = "hello there\nhello again\n"
    replies = {}
    for extra in ([], ["--compile"], ["--compile", "--speculative", "lookup", "--draft-tokens", "3"]):
        monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(messages))
        argv = ["chat", "--model", str(tiny_gguf), "--json", "--max-new-tokens", "20", "--precision", "fp32", *extra]
        assert main(argv) == 0
        out, err = capsys.readouterr()
        replies[" ".join(extra)] = [json.loads(line)["assistant"] for line in out.splitlines()]
        assert err.count("--compile: the decoding step is compiled during the first reply") == (1 if extra else 0)
    assert len(set(map(tuple, replies.values()))) == 1 and all(replies[""]), replies


def test_a_conversation_keeps_its_kv_cache_across_turns(tiny_gguf):
    """Each reply after the first feeds only what the cache does not hold yet (the tokens after the longest prefix
    it shares with the templated conversation), and replies are those of a fresh decoding of the whole conversation
    (float64), plain, with drafts, and through a static decoder, also after the caller edited the last reply; a reply
    closed early, or one whose model call fails, leaves a cache the next turn decodes right from (the failed one's
    dropped)."""
    from tests.test_static_decoding import standing_in_for_compiled

    model, tok = load_chat_model(tiny_gguf)
    model.double()
    texts = ["hello there", "more", "then?"]

    def fresh(chat, text):
        """The reply to ``text`` decoded afresh over the whole conversation (as ``chat`` templates and trims it)."""
        ids = chat.prompt_ids([*chat.messages, {"role": "user", "content": text}])
        out = generate(model, torch.tensor([ids]), max_new_tokens=8, stop_tokens=[tok.eos_id], pad_id=tok.eos_id)
        new = out[0, len(ids):].tolist()
        return tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new), len(ids)

    for options in ({}, {"speculative": PromptLookup(min_ngram=1), "draft_tokens": 3}, {"compile": True}):
        chat = Chat(model, tok, max_new_tokens=8, **options)
        if options.get("compile"):
            standing_in_for_compiled(chat.decoder, [])
        fed: list[int] = []  # the tokens of each pass (embedded)
        hook = model.tok_emb.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
        for i, text in enumerate(texts[:2]):
            expected, n_ids = fresh(chat, text)
            fed.clear()
            assert chat.reply(text) == expected, (options, i)
            assert fed[0] == n_ids if i == 0 else fed[0] < n_ids - 10, (options, i, fed[0], n_ids)
        hook.remove()
        chat.messages[-1]["content"] = "an edited reply"  # the cache holds the reply it replaces
        expected, _ = fresh(chat, "ok")
        assert chat.reply("ok") == expected
    chat = Chat(model, tok, max_new_tokens=8)
    pieces = chat.send(texts[0])
    next(pieces)
    pieces.close()  # Ctrl-C after the first piece: the partial reply joins the conversation, the cache is kept
    expected, n_ids = fresh(chat, texts[1])
    fed = []
    hook = model.tok_emb.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    assert chat.reply(texts[1]) == expected and fed[0] < n_ids - 10
    hook.remove()
    calls = []

    def fails_at_the_third_pass(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")

    hook = model.decoder.blocks[-1].register_forward_pre_hook(fails_at_the_third_pass)  # after the first layer's write
    with pytest.raises(RuntimeError, match="out of memory"):
        chat.reply(texts[2])
    assert chat._cache is None
    hook.remove()
    expected, _ = fresh(chat, "ok")
    assert chat.reply("ok") == expected


def test_a_reused_cache_holds_fewer_tokens_than_the_prompt():
    """generate / stream / speculative_stream take a cache holding the prompt's first tokens and feed only the rest
    (the tokens of a fresh decoding, float64); a cache holding as many as the prompt, or with a padding mask, is
    refused before any model call."""
    from archlab.speculative import speculative_generate, speculative_stream

    torch.manual_seed(0)
    model = build_model("gpt-nano", vocab_size=64, max_len=64).eval().double()
    ids = torch.randint(0, 64, (1, 6))
    want = generate(model, ids, max_new_tokens=8)
    for decode in (lambda c: generate(model, ids, max_new_tokens=8, cache=c),
                   lambda c: speculative_generate(model, ids, max_new_tokens=8, cache=c).sequences):  # fmt: skip
        cache = model.new_cache()
        model.decoder_step()(ids, cache)
        cache.crop(4)
        assert torch.equal(decode(cache), want)
    cache = model.new_cache()
    model.decoder_step()(ids, cache)
    words = r"cache holds 6 positions: a reused cache holds the first tokens of input_ids, which must have more \(it has"
    with pytest.raises(ConfigError, match=words):
        stream(model, ids, max_new_tokens=3, cache=cache)
    with pytest.raises(ConfigError, match=words):
        speculative_stream(model, ids, max_new_tokens=3, cache=cache)
    with pytest.raises(ConfigError, match=r"must have more \(it has 12\), without an attention_mask \(given\)"):
        stream(model, torch.cat([ids, ids], 1), max_new_tokens=3, cache=cache, attention_mask=torch.ones(1, 12))
