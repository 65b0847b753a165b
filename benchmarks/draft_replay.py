"""Prompt-lookup draft policies replayed exactly on ``speculative.py``'s explanations, at verify-pass costs measured.

Greedy tokens do not depend on the drafts, so a draft policy's rounds can be replayed on the greedy replies alone:
each round drafts from the text so far (:func:`archlab.speculative.prompt_lookup`), keeps the drafts that match the
reply up to the first miss, adds the model's own token, and costs one verify pass of ``1 + len(drafts)`` rows. The
script decodes the four abstracts' replies once (SmolLM2-135M-Instruct, plain greedy, fp32 or ``--precision bf16``),
times a verify pass by its row count (a pass at a context of about 300 tokens, interleaved rounds; the median of
each row count's per-round ratio to one row), and prints for each policy the passes, the drafts accepted and the
modelled speedup over plain greedy (every token a one-row pass; each call's prefill, the same in both, left out),
then the ceiling: every pass at one row's cost. ``speculative.py`` measures the default policy end to end.

    python benchmarks/draft_replay.py --rounds 21

The pass costs move with the machine's phase (on the AMD EPYC a 9-row pass measured 1.6-2.1x a one-row one across
runs), and the modelled speedups with them: compare policies within one run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, setup, table, write_json  # noqa: E402
from speculative import ABSTRACTS, QUESTIONS, chat_prompt  # noqa: E402

from archlab.chat import load_chat_model  # noqa: E402
from archlab.generation import generate  # noqa: E402
from archlab.speculative import PromptLookup, Sampling, longest_match, prompt_lookup  # noqa: E402

Policy = Callable[[list[int], int], list[int]]  # (the text so far, the most drafts allowed) -> drafts


def policies(k: int) -> dict[str, Policy]:
    """The default (:class:`archlab.speculative.PromptLookup`: n-grams of 1-4 tokens, 2 drafts after a one-token
    match, else up to ``k``), n-grams of 2-3 tokens with fixed ``k`` (the default before 2026-12-04: ``k = 8``), and
    other drafts by match length."""
    default = PromptLookup()
    out: dict[str, Policy] = {f"PromptLookup(), k={k} (default)": lambda t, m: default.propose(t, min(m, k), Sampling())[0]}
    out |= {f"n-grams 2-3, k={n}": (lambda t, m, n=n: prompt_lookup(t, min(m, n), 3, 2)) for n in sorted({4, 6, k, 12})}
    for one, two in ((1, 4), (2, 4), (3, k)):
        lengths = {1: one, 2: two}

        def policy(t, m, lengths=lengths):
            length = longest_match(t, 4)[0]
            return prompt_lookup(t, min(m, lengths.get(length, k)), 4, 1) if length else []

        out[f"by match: 1 token -> {one}, 2 -> {two}, 3+ -> {k}"] = policy
    return out


def replay(replies: list[tuple[list[int], list[int]]], policy: Policy) -> tuple[int, int, list[int]]:
    """Passes, accepted drafts and each pass's rows of ``policy`` over the ``(prompt, reply)`` pairs (at most the
    reply's tokens still to come, less one, drafted)."""
    passes, accepted, rows = 0, 0, []
    for prompt, reply in replies:
        text, i = list(prompt), 0
        while i < len(reply):
            drafts = policy(text, len(reply) - i - 1)
            kept = next((j for j, d in enumerate(drafts) if d != reply[i + j]), len(drafts))
            text += reply[i : i + kept + 1]
            i += kept + 1
            passes, accepted = passes + 1, accepted + kept
            rows.append(1 + len(drafts))
    return passes, accepted, rows


@torch.inference_mode()
def pass_costs(model, context: list[int], most: int, rounds: int) -> dict[int, float]:
    """Each row count's verify-pass time as a multiple of one row's (median of per-round ratios), at ``context``."""
    cache, verify = model.new_cache(), model.decoder_step()
    model.decoder_step(logits_to_keep=1)(torch.tensor([context[:-1]]), cache)
    n = cache.length
    fed = {r: torch.tensor([context[-1:] * r]) for r in range(1, most + 1)}
    times: dict[int, list[float]] = {r: [] for r in fed}
    for round_ in range(rounds + 1):
        for r, tokens in fed.items():
            start = time.perf_counter()
            verify(tokens, cache)
            if round_:  # the first round warms up
                times[r].append(time.perf_counter() - start)
            cache.crop(n)
    ratios = {r: sorted(a / b for a, b in zip(times[r], times[1], strict=True)) for r in fed}
    return {r: v[len(v) // 2] for r, v in ratios.items()}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--draft-tokens", type=int, default=8, metavar="K", help="the default policy's k (default 8)")
    parser.add_argument("--new-tokens", type=int, default=128, help="at most this many tokens per reply (default 128)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the model's weights (bf16: the replies are bf16's own greedy tokens)")  # fmt: skip
    args = parser.parse_args()
    print(setup(args.threads, args.keep_memory))
    model, tokenizer = load_chat_model("smollm2-135m-instruct", precision=args.precision)
    eos = tokenizer.specials["eos"]
    replies = []
    with torch.inference_mode():
        for abstract in ABSTRACTS:
            prompt = chat_prompt(tokenizer, QUESTIONS[0], abstract)
            out = generate(model, torch.tensor([prompt]), max_new_tokens=args.new_tokens, stop_tokens=[eos], pad_id=eos)
            replies.append((prompt, out[0, len(prompt) :].tolist()))
    tokens = sum(len(reply) for _, reply in replies)
    most = max(12, args.draft_tokens) + 1
    first_prompt, first_reply = replies[0]
    cost = pass_costs(model, first_prompt + first_reply[: len(first_reply) // 2], most, args.rounds)
    print(f"{tokens} greedy tokens over {len(replies)} abstracts; a verify pass of r rows, as a multiple of one row's "
          f"(median of {args.rounds} rounds): " + ", ".join(f"{r}: {c:.2f}" for r, c in cost.items()))  # fmt: skip
    results, lines = [], []
    for name, policy in policies(args.draft_tokens).items():
        passes, accepted, rows = replay(replies, policy)
        speedup = tokens / sum(cost[r] for r in rows)
        results.append({"policy": name, "passes": passes, "accepted": accepted, "modelled_speedup": speedup})
        lines.append([name, passes, accepted, f"{speedup:.2f}x"])
    print(table(lines, ["policy", "passes", "drafts accepted", "modelled speedup"]))
    default = next(r for r in results if "(default)" in r["policy"])
    print(f"ceiling: every pass of the default policy at one row's cost: {tokens / default['passes']:.2f}x")
    write_json(args.json, {"precision": args.precision, "tokens": tokens, "pass_cost": cost, "policies": results})


if __name__ == "__main__":
    main()
