"""SmolLM2-135M-Instruct: prompt-lookup speculative decoding vs plain greedy, and batched vs one-at-a-time generation.

Speculative: the model is asked to explain a given abstract (a grounded task: the answer quotes its source, so
n-grams of the prompt predict the reply). For each abstract, plain greedy decoding through the KV cache
(:func:`archlab.generation.generate`) and draft-and-verify decoding with prompt-lookup drafts
(:func:`archlab.speculative.speculative_generate`, ``--drafts``: also ``layers:M``) must give the same tokens, which
the script checks first; then both are timed in interleaved rounds (median reported), with the acceptance rate
and the tokens per pass of the model.

Batched: ``--batch`` prompts of different lengths (the abstracts with several questions) decoded together by
:func:`archlab.generation.generate_batch` vs one at a time by ``generate``; rows compared, tokens/s of both; and both
with prompt-lookup drafts (``generate_batch(draft="lookup")``: each row verifying its own drafts in the batch's
passes, at most 16 tokens a pass; ``speculative_generate`` one at a time).
``--rows B`` decodes them ``B`` rows at a time, a freed row refilled at once by a waiting prompt (continuous
batching; default: all prompts in one batch). The prefills are timed too (each prompt's alone, the batch's), in the
same rounds, which gives a one-row step's cost and, with all prompts in one batch, the most batching can give on this
workload: one at a time's time over the batch's prefill plus its steps each at a one-row step's cost (the batch runs
as many steps as its longest reply has tokens, whatever the other rows do).

``--compile`` adds plain greedy and each draft through one compiled :class:`archlab.static_decoding.StaticDecoder`
(its one-token step and its verify pass each traced once, before the timing), checked the same way against the
compiled greedy tokens; each compiled draft's speedup is over compiled plain greedy, and the summary gives it over
eager plain greedy too.

``--llama-cpp`` adds llama.cpp on the GGUF file as stored (Q4_1 blocks), plain greedy and with llama-cpp-python's
own prompt-lookup drafts, timed in the same rounds (their replies are their own: Q4_1, not archlab's weights; the
first token where each parts from archlab's eager greedy is printed).

``--session`` holds the oneDNN-packed weight copies (:func:`archlab.nn.linear.packed_for_rows`) across all calls, as a
chat session or a server holds them, instead of each call packing its own (0.3-0.5 s for SmolLM2, about 8 one-row
steps): every peer, plain greedy included, runs inside the one block; the copies take the weights' memory again;
the packing time is printed, not timed.

    python benchmarks/speculative.py
    python benchmarks/speculative.py --new-tokens 64 --rounds 3 --drafts lookup layers:10
    python benchmarks/speculative.py --only batched --rounds 2
    python benchmarks/speculative.py --precision bf16    # both comparisons with bf16 weights (auto's choice where
                                                         # the CPU computes bf16 natively)

``--quantize MODE``: every peer with quantized layers (``--quantize int4``: the Q4_1 blocks and the file's Q8_0
head, as ``archlab chat --quantize int4``); where a draft's tokens part from plain greedy's the script says where
and goes on (where PyTorch's int4 kernel serves, without AVX512-BF16, its one-row and several-row products may round
apart, so a near-tie may go either way; archlab's int4 kernel computes each row alike).

``--precision bf16``: every peer in bf16 (archlab's bfloat16 kernels where the CPU has AVX512-BF16). Speculative
tokens must still equal plain greedy's (the kernels compute each row alike whatever the pass's width); batched rows
may part from one-at-a-time ones at near-ties of the padded prefill, which bf16's coarser rounding makes common.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Peer, base_parser, setup, table, time_interleaved, write_json  # noqa: E402

from archlab.chat import load_chat_model  # noqa: E402
from archlab.generation import generate, generate_batch  # noqa: E402
from archlab.nn.linear import packed_for_rows  # noqa: E402
from archlab.quant import MODES  # noqa: E402
from archlab.speculative import make_draft, speculative_generate  # noqa: E402
from archlab.static_decoding import StaticDecoder, verify_widths_for  # noqa: E402

# Short abstracts written for this benchmark (invented studies, so no model has seen them).
ABSTRACTS = [
    "We study how the width of a transformer's feed-forward layer affects its ability to memorise facts. Training "
    "24 models from 10M to 300M parameters on a synthetic biography corpus, we find that recall of rare facts grows "
    "with the feed-forward width but not with the attention width, and that doubling the feed-forward width stores "
    "about 1.8 times as many facts. We argue that the feed-forward layers act as key-value memories.",
    "Coastal wetlands store large amounts of carbon, but their rate of burial is poorly measured. We collected 140 "
    "sediment cores from salt marshes in three estuaries and dated them with lead-210. Burial rates ranged from 80 "
    "to 310 grams of carbon per square metre per year and were highest where the tidal range was largest. Restoring "
    "drained marshes could therefore offset a measurable share of regional emissions.",
    "Children learn new words faster when they hear them in varied sentences. In a study of 96 four-year-olds, each "
    "child heard twelve invented words, either always in the same sentence or in six different sentences. After one "
    "week, children in the varied condition named 40 percent more objects correctly. Variation seems to help "
    "children separate the meaning of a word from the context it first appeared in.",
    "We present a low-cost sensor that detects leaks in household water pipes from the sound they make. A "
    "microphone clamped to the pipe records vibrations, and a small neural network running on a microcontroller "
    "classifies them. On 500 recordings from 60 homes the sensor found 93 percent of leaks with two false alarms "
    "per month. The device costs less than 15 dollars and runs for a year on two batteries.",
]
QUESTIONS = [
    "Explain this abstract in simple terms, quoting its key findings:\n\n{}",
    "Summarise the main result of this abstract in two sentences:\n\n{}",
    "What did the authors measure, and what did they find?\n\n{}",
]


def chat_prompt(tokenizer, question: str, abstract: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question.format(abstract)}])


def speculative_rows(model, tokenizer, eos: int, args) -> list[dict]:
    prompts = [torch.tensor([chat_prompt(tokenizer, QUESTIONS[0], a)]) for a in ABSTRACTS[: args.abstracts]]
    targets = [("", model)]  # (the peers' name suffix, the target)
    if args.compile:  # one decoder for every abstract: its step and its verify pass each compiled once
        longest = max(p.shape[1] for p in prompts) + args.new_tokens + args.draft_tokens + 1
        static = StaticDecoder(model, longest, verify_widths=verify_widths_for(args.draft_tokens))
        start = time.perf_counter()
        with torch.inference_mode():
            speculative_generate(static, prompts[0], max_new_tokens=args.new_tokens, stop_tokens=[eos])
        print(f"compiled: the step and the verify pass traced in {time.perf_counter() - start:.1f} s (not timed)\n")
        targets.append((" compiled", static))
    llama = llama_cpp_models(prompts, args) if args.llama_cpp else None
    results = []
    for i, prompt in enumerate(prompts):
        n0 = prompt.shape[1]
        peers, stats, greedy, refs = [], {}, {}, {}
        for suffix, target in targets:

            @torch.inference_mode()
            def plain(target=target):
                return generate(target, prompt, max_new_tokens=args.new_tokens, stop_tokens=[eos], pad_id=eos)

            reference = refs[suffix] = plain()
            n = reference.shape[1] - n0
            greedy[suffix] = Peer("greedy" + suffix, plain, tokens=n)
            peers.append(greedy[suffix])
            for spec in args.drafts:
                draft = make_draft(spec, target)  # built once (a draft model's weights are the model's)

                @torch.inference_mode()
                def fast(draft=draft, target=target):
                    return speculative_generate(target, prompt, max_new_tokens=args.new_tokens, draft=draft,
                                                draft_tokens=args.draft_tokens, stop_tokens=[eos])  # fmt: skip

                out = fast()
                if not torch.equal(out.sequences, reference):
                    length = min(out.sequences.shape[1], reference.shape[1])
                    differ = (out.sequences[0, :length] != reference[0, :length]).nonzero()
                    first = int(differ[0]) if len(differ) else length
                    said = (f"abstract {i}, {spec}{suffix}: tokens differ from plain greedy{suffix} at new token "
                            f"{first - n0}")  # fmt: skip
                    if args.quantize is None:  # float weights on archlab's kernels: a pass computes each row alike
                        raise SystemExit(said)
                    # PyTorch's int4 kernel (no AVX512-BF16) may round a pass's rows otherwise than one row
                    print(f"{said} (a near-tie: {args.quantize}'s products of one row and of several round apart)")
                stats[spec + suffix] = (out.stats, suffix)
                peers.append(Peer(spec + suffix, fast, tokens=out.sequences.shape[1] - n0))  # its own (int4: may part)
            if i == 0:
                reply = tokenizer.decode(reference[0, n0:].tolist())
                print(f"abstract 0: prompt {n0} tokens; greedy{suffix} reply ({n} tokens):"
                      "\n  " + reply.replace("\n", "\n  "))  # fmt: skip
        for name, run in (llama or {}).items():  # llama.cpp on the same ids, its own stop at <|im_end|>
            tokens = run(prompt[0].tolist(), eos)
            ours = refs[""][0, n0:].tolist()
            same = next((j for j, (x, y) in enumerate(zip(tokens, ours)) if x != y), min(len(tokens), len(ours)))
            print(f"abstract {i}, {name}: {len(tokens)} tokens, equal to archlab's eager greedy for the first {same}")
            peers.append(Peer(name, lambda run=run, ids=prompt[0].tolist(): run(ids, eos), tokens=len(tokens)))
        time_interleaved(peers, rounds=args.rounds, warmup=0)
        for peer in peers:
            if peer.name in (llama or {}):
                base = greedy[""].tokens_per_s
                results.append({"abstract": i, "draft": peer.name, "prompt_tokens": n0, "tokens": peer.tokens,
                                "tokens_per_s": peer.tokens_per_s, "eager_greedy_tokens_per_s": base,
                                "greedy_tokens_per_s": base, "speedup": peer.tokens_per_s / base})  # fmt: skip
            if peer.name not in stats:
                continue
            s, suffix = stats[peer.name]
            results.append({
                "abstract": i, "draft": peer.name, "prompt_tokens": n0, "tokens": peer.tokens,
                "greedy_tokens_per_s": greedy[suffix].tokens_per_s, "tokens_per_s": peer.tokens_per_s,
                "speedup": peer.tokens_per_s / greedy[suffix].tokens_per_s,
                "eager_greedy_tokens_per_s": greedy[""].tokens_per_s, **s.as_dict(),
            })  # fmt: skip
    return results


def llama_cpp_models(prompts, args) -> dict | None:
    """llama.cpp on SmolLM2's GGUF file as stored (Q4_1 blocks, Q8_0 head), ``args.threads`` threads: plain greedy,
    and greedy with llama-cpp-python's prompt-lookup drafts (``LlamaPromptLookupDecoding``, ``num_pred_tokens`` =
    ``--draft-tokens``); each a ``run(ids, eos) -> new tokens`` that stops after ``eos`` or ``--new-tokens``. None
    (said why) where llama_cpp does not import (a benchmark-only extra: ``make bench-llama``)."""
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as e:
        print(f"llama.cpp left out: llama_cpp does not import ({e}); it is a benchmark-only extra (make bench-llama)\n")
        return None
    from archlab.interop.gguf import smollm2_gguf_path

    n_ctx = max(p.shape[1] for p in prompts) + args.new_tokens + args.draft_tokens + 8
    common = dict(model_path=str(smollm2_gguf_path()), n_ctx=n_ctx, n_threads=args.threads,
                  n_threads_batch=args.threads, verbose=False)  # fmt: skip
    models = {"llama.cpp": llama_cpp.Llama(**common),
              "llama.cpp lookup": llama_cpp.Llama(**common, draft_model=LlamaPromptLookupDecoding(
                  num_pred_tokens=args.draft_tokens))}  # fmt: skip
    print(f"llama.cpp {llama_cpp.__version__} on {smollm2_gguf_path().name}, {args.threads} threads: plain greedy and "
          f"prompt-lookup drafts (LlamaPromptLookupDecoding, {args.draft_tokens} tokens); the prompt read every "
          "time, as archlab's peers do\n")  # fmt: skip

    def runner(model):
        def run(ids: list[int], eos: int) -> list[int]:
            model.reset()
            out = []
            for token in model.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                out.append(token)
                if token == eos or len(out) == args.new_tokens:
                    break
            return out
        return run

    return {name: runner(model) for name, model in models.items()}


def batched_row(model, tokenizer, eos: int, args) -> dict:
    pairs = [(q, a) for q in QUESTIONS for a in ABSTRACTS]
    prompts = [chat_prompt(tokenizer, q, a) for q, a in pairs[: args.batch]]

    @torch.inference_mode()
    def together():
        return generate_batch(model, prompts, max_new_tokens=args.new_tokens, stop_tokens=[eos], batch_size=args.rows)

    @torch.inference_mode()
    def one_by_one():
        return [generate(model, torch.tensor([p]), max_new_tokens=args.new_tokens, stop_tokens=[eos], pad_id=eos)
                [0, len(p):].tolist() for p in prompts]  # fmt: skip

    @torch.inference_mode()
    def together_drafts():  # every row verifying its own prompt-lookup drafts in the batch's passes
        return generate_batch(model, prompts, max_new_tokens=args.new_tokens, stop_tokens=[eos], batch_size=args.rows,
                              draft="lookup", draft_tokens=args.draft_tokens)  # fmt: skip

    @torch.inference_mode()
    def one_by_one_drafts():
        return [speculative_generate(model, torch.tensor([p]), max_new_tokens=args.new_tokens, stop_tokens=[eos],
                                     draft="lookup", draft_tokens=args.draft_tokens).sequences[0, len(p):].tolist()
                for p in prompts]  # fmt: skip

    @torch.inference_mode()
    def prefills_alone():  # each prompt's prefill and first token, as one_by_one starts each
        return [generate(model, torch.tensor([p]), max_new_tokens=1) for p in prompts]

    @torch.inference_mode()
    def batch_prefill():  # the batch's prefill and first tokens, as together starts
        return generate_batch(model, prompts, max_new_tokens=1, batch_size=args.rows)

    rows, alone, drafted, drafted_alone = together(), one_by_one(), together_drafts(), one_by_one_drafts()
    equal = sum(a == b for a, b in zip(rows, alone, strict=True))
    drafted_equal = sum(a == b for a, b in zip(drafted, rows, strict=True))
    tokens, tokens_alone = sum(len(r) for r in rows), sum(len(r) for r in alone)
    peers = [Peer("one at a time", one_by_one, tokens=tokens_alone), Peer("batched", together, tokens=tokens),
             Peer("prefills alone", prefills_alone, tokens=len(prompts)),
             Peer("batch prefill", batch_prefill, tokens=len(prompts)),
             Peer("batched, lookup drafts", together_drafts, tokens=sum(len(r) for r in drafted)),
             Peer("one at a time, lookup drafts", one_by_one_drafts,
                  tokens=sum(len(r) for r in drafted_alone))]  # fmt: skip
    time_interleaved(peers, rounds=args.rounds, warmup=0)
    one, batched, prefills, prefill = (peer.seconds for peer in peers[:4])
    step = (one - prefills) / (tokens_alone - len(prompts))  # a one-row step, as one_by_one takes it
    steps = max(len(r) for r in rows)  # the batch's steps after its prefill: its longest row's tokens - 1
    # the most batching can give here: every batched step as cheap as a one-row step, the prefill as timed (one batch
    # of all prompts only: with refilled rows the job has more prefills and steps than these)
    whole = args.rows in (None, len(prompts))
    bound = one / (prefill + (steps - 1) * step) if whole else None
    return {"prompts": len(prompts), "rows": args.rows or len(prompts), "prompt_lengths": [len(p) for p in prompts],
            "rows_equal": equal,
            "tokens": tokens, "one_at_a_time_tokens_per_s": peers[0].tokens_per_s,
            "batched_tokens_per_s": peers[1].tokens_per_s,
            "ratio": peers[1].tokens_per_s / peers[0].tokens_per_s,
            "drafted_rows_equal_batched": drafted_equal,
            "batched_drafts_tokens_per_s": peers[4].tokens_per_s,
            "one_at_a_time_drafts_tokens_per_s": peers[5].tokens_per_s,
            "one_at_a_time_s": one, "prefills_alone_s": prefills, "one_row_step_s": step,
            "batched_s": batched, "batch_prefill_s": prefill, "batch_steps": steps - 1 if whole else None,
            "batched_step_s": (batched - prefill) / max(steps - 1, 1) if whole else None,
            "ratio_if_rows_were_free": bound}  # fmt: skip


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128, help="at most this many tokens per reply (default 128)")
    parser.add_argument("--drafts", nargs="+", default=["lookup"], metavar="DRAFT",
                        help="drafts to time against plain greedy: lookup, layers:M (default: lookup)")  # fmt: skip
    parser.add_argument("--draft-tokens", type=int, default=8, metavar="K", help="the most tokens drafted per step (default 8)")
    parser.add_argument("--abstracts", type=int, default=len(ABSTRACTS), help=f"how many (1-{len(ABSTRACTS)})")
    parser.add_argument("--batch", type=int, default=10, help=f"prompts in the batched comparison (1-{len(QUESTIONS) * len(ABSTRACTS)}; default 10)")
    parser.add_argument("--rows", type=int, default=None, metavar="B",
                        help="decode the batch B rows at a time, refilling freed rows (default: all prompts at once)")
    parser.add_argument("--only", choices=["speculative", "batched"], default=None,
                        help="run one comparison only (default: both)")  # fmt: skip
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the weights' precision for every peer (default fp32)")  # fmt: skip
    parser.add_argument("--quantize", choices=MODES, default=None,
                        help="every peer with quantized linear layers (archlab.quant, as archlab chat --quantize)")
    parser.add_argument("--compile", action="store_true",
                        help="also time plain greedy and each draft through a compiled StaticDecoder (the step and "
                             "the verify pass each traced once; speculative comparison only)")  # fmt: skip
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also time llama.cpp on the GGUF file as stored (Q4_1), plain greedy and with its own "
                             "prompt-lookup drafts (speculative comparison only; needs make bench-llama)")  # fmt: skip
    parser.add_argument("--session", action="store_true",
                        help="pack the weight copies for few-row products once and hold them across every call "
                             "(as a chat session or server does), instead of once per call")  # fmt: skip
    args = parser.parse_args()
    print(setup(args.threads, args.keep_memory))
    start = time.perf_counter()
    model, tokenizer = load_chat_model("smollm2-135m-instruct", precision=args.precision, quantize=args.quantize)
    eos = tokenizer.specials["eos"]
    weights = args.precision if args.quantize is None else str(model.quant_report).splitlines()[-1]
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s; greedy, {weights}, KV cache, "
          f"median of {args.rounds} interleaved rounds\n")  # fmt: skip

    session = contextlib.ExitStack()
    if args.session:
        start = time.perf_counter()
        packed = session.enter_context(packed_for_rows(model, args.draft_tokens + 1))
        print(f"--session: {packed} weight matrices packed once ({time.perf_counter() - start:.2f} s, not timed), "
              f"held across every call below\n")  # fmt: skip
    with session:
        spec = speculative_rows(model, tokenizer, eos, args) if args.only != "batched" else []
        batch = batched_row(model, tokenizer, eos, args) if args.only != "speculative" else None
    if spec:
        print_speculative(spec, args)
    if batch is not None:
        print_batched(batch)
    write_json(args.json, {"speculative": spec, "batched": batch, "session": args.session, "precision": args.precision,
                           "quantize": args.quantize, "compile": args.compile})  # fmt: skip


def print_speculative(spec: list[dict], args) -> None:
    rows = [[r["abstract"], r["draft"], r["prompt_tokens"], r["tokens"], f"{r['greedy_tokens_per_s']:.1f}",
             f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
             f"{r['acceptance_rate'] or 0:.0%}" if "drafted" in r else "-",
             f"{r['tokens_per_pass']:.2f}" if "drafted" in r else "-"] for r in spec]  # fmt: skip
    checked = "checked" if args.quantize is None else "checked, where they part said above"
    print(f"\nspeculative decoding (k={args.draft_tokens} drafted tokens per step); tokens equal to plain greedy: "
          f"{checked}")  # fmt: skip
    print(table(rows, ["abstract", "draft", "prompt", "tokens", "greedy tok/s", "spec tok/s", "speedup", "accepted",
                       "tokens/pass"]))  # fmt: skip
    for draft in dict.fromkeys(r["draft"] for r in spec):
        mine = [r for r in spec if r["draft"] == draft]
        seconds = sum(r["tokens"] / r["tokens_per_s"] for r in mine)
        greedy_seconds = sum(r["tokens"] / r["greedy_tokens_per_s"] for r in mine)
        if "drafted" not in mine[0]:  # llama.cpp: its own replies
            print(f"{draft}: all abstracts {sum(r['tokens'] for r in mine) / seconds:.1f} tokens/s")
            continue
        accepted, drafted = sum(r["accepted"] for r in mine), sum(r["drafted"] for r in mine)
        eager = (f", {sum(r['tokens'] / r['eager_greedy_tokens_per_s'] for r in mine) / seconds:.2f}x eager plain "
                 "greedy's" if draft.endswith(" compiled") else "")  # fmt: skip
        print(f"{draft}: all abstracts {greedy_seconds / seconds:.2f}x {'compiled ' if eager else ''}plain greedy's "
              f"tokens/s{eager}, {accepted}/{drafted} drafted tokens accepted "
              f"({sum(r['tokens'] for r in mine) / seconds:.1f} tokens/s)")  # fmt: skip


def print_batched(batch: dict) -> None:
    print(f"\nbatched generation: {batch['prompts']} prompts of {min(batch['prompt_lengths'])}-"
          f"{max(batch['prompt_lengths'])} tokens, {batch['rows']} rows at a time, {batch['tokens']} new tokens in all")  # fmt: skip
    one = batch["one_at_a_time_tokens_per_s"]
    print(table([["one at a time", f"{one:.1f}", "1.00x"],
                 ["batched", f"{batch['batched_tokens_per_s']:.1f}", f"{batch['ratio']:.2f}x"],
                 ["one at a time, lookup drafts", f"{batch['one_at_a_time_drafts_tokens_per_s']:.1f}",
                  f"{batch['one_at_a_time_drafts_tokens_per_s'] / one:.2f}x"],
                 ["batched, lookup drafts", f"{batch['batched_drafts_tokens_per_s']:.1f}",
                  f"{batch['batched_drafts_tokens_per_s'] / one:.2f}x"]],
                ["peer", "tokens/s", "vs one at a time"]))  # fmt: skip
    print(f"batched with drafts: {batch['batched_drafts_tokens_per_s'] / batch['batched_tokens_per_s']:.2f}x batched "
          f"without, rows equal to it {batch['drafted_rows_equal_batched']}/{batch['prompts']}; "
          f"{batch['batched_drafts_tokens_per_s'] / batch['one_at_a_time_drafts_tokens_per_s']:.2f}x one at a time "
          f"with drafts")  # fmt: skip
    note = "" if batch["rows_equal"] == batch["prompts"] else " (see which: a near-tie in the batched products?)"
    print(f"rows equal to one-at-a-time generation: {batch['rows_equal']}/{batch['prompts']}{note}")
    print(f"one at a time {batch['one_at_a_time_s']:.2f} s: the prompts' prefills {batch['prefills_alone_s']:.2f} s, "
          f"a one-row step {batch['one_row_step_s'] * 1e3:.2f} ms")  # fmt: skip
    if batch["ratio_if_rows_were_free"] is not None:
        print(f"batched {batch['batched_s']:.2f} s: its prefill {batch['batch_prefill_s']:.2f} s, "
              f"{batch['batch_steps']} steps of {batch['batched_step_s'] * 1e3:.2f} ms on average; the most batching "
              f"can give here, every batched step as cheap as a one-row step: "
              f"{batch['ratio_if_rows_were_free']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
