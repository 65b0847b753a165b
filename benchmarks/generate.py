"""Batch-1 greedy decoding: archlab ``generate`` vs Hugging Face ``generate`` on the same GPT-2 weights.

A random-init GPT of the ``gpt-mini`` shape (6 layers, d=384, 6 heads, vocab 50,304; position table 512
so prompt + 256 new tokens fit) is built in archlab and copied into ``transformers.GPT2LMHeadModel``
with archlab's converter; both decode 256 new tokens greedily from the same 16-token prompt through
their KV caches, float32, in interleaved rounds (median reported). The generated tokens must be
identical, which the script checks before timing.

Batch-1 decoding reads every weight once per token, so it is bounded by memory bandwidth. The script
measures the rate of a plain read by all threads (``W.sum()``, best of 30) of a buffer as large as the
weights a token reads (the bound: ``parameter bytes / rate`` per token), and, for comparison, of a matrix the
size of the LM head (smaller, so more of it can stay in the CPU's last-level cache between repeats: it read
42-77 GB/s where the weights' size read 33-38 on the AMD EPYC kind) and ``torch.mv`` on it (PyTorch's CPU
matrix-vector product, which runs on one thread). archlab's few-row products use every thread
(``archlab.nn.linear``), so the first bound applies to it.

``--compile`` adds the peer ``archlab compiled``: the same model through :class:`archlab.static_decoding.StaticDecoder`
(a static KV cache, the one-token step compiled by ``torch.compile``), its tokens checked equal to the others', its
compile time printed apart from the timed rounds.

    python benchmarks/generate.py
    python benchmarks/generate.py --preset gpt2-small --new-tokens 128
    python benchmarks/generate.py --compile
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Peer, base_parser, compiled_decoding_peer, setup, table, time_interleaved, write_json  # noqa: E402

from archlab.generation import generate  # noqa: E402
from archlab.interop.gpt2 import config_to_gpt2, gpt2_state_from_archlab  # noqa: E402
from archlab.models import build_model  # noqa: E402


def read_rates(weight_bytes: int, rows: int, cols: int, repeats: int = 30) -> dict[str, float]:
    """Bytes/s (best of ``repeats``) at which all threads read ``weight_bytes`` of fp32 (``W.sum()``: the bound),
    and at which ``W [rows, cols]`` (the LM head's size) is read by ``W.sum()`` and by ``torch.mv``."""
    weights, w, x = torch.ones(weight_bytes // 4), torch.randn(rows, cols), torch.randn(cols)
    rates = {}
    for name, t, fn in ((f"streaming read of {weight_bytes / 1e6:.0f} MB (W.sum)", weights, weights.sum),
                        (f"streaming read of the head's {w.numel() * 4 / 1e6:.0f} MB (W.sum)", w, w.sum),
                        ("torch.mv on the head", w, lambda: torch.mv(w, x))):  # fmt: skip
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rates[name] = t.numel() * 4 / best
    return rates


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-mini")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512, help="position table size (prompt + new tokens must fit)")
    parser.add_argument("--compile", action="store_true", help="add archlab's compiled static-cache decoding")
    args = parser.parse_args()
    print(setup(args.threads, args.keep_memory))
    import transformers

    ours = build_model(args.preset, max_len=args.max_len, dropout=0.0, attn_dropout=0.0).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_gpt2(ours.config))).eval()
    hf.load_state_dict(gpt2_state_from_archlab(ours.state_dict()), strict=False)  # strict=False: HF's tied lm_head
    prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    @torch.inference_mode()
    def run_archlab():
        return generate(ours, prompt, max_new_tokens=n)

    @torch.inference_mode()
    def run_hf():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)  # fmt: skip

    a, b = run_archlab(), run_hf()
    if not torch.equal(a, b):
        raise SystemExit(f"generated tokens differ: first mismatch at {int((a != b).nonzero()[0, 1])}")
    print(f"{args.preset} (max_len {args.max_len}): both generate the same {n} tokens")
    peers = [Peer("archlab", run_archlab, tokens=n), Peer("hf", run_hf, tokens=n)]
    if args.compile:
        compiled, seconds, tokens, _ = compiled_decoding_peer("archlab compiled", ours, prompt, n)
        if not torch.equal(tokens, a):
            raise SystemExit(f"compiled tokens differ: first mismatch at {int((tokens != a).nonzero()[0, 1])}")
        print(f"archlab compiled: the same {n} tokens; torch.compile took {seconds:.1f} s (once per process)")
        peers.append(compiled)
    time_interleaved(peers, rounds=args.rounds)
    hf_rate = peers[1].tokens_per_s
    rows = [[p.name, f"{p.seconds * 1e3 / n:.2f}", f"{p.tokens_per_s:.1f}", f"{p.tokens_per_s / hf_rate:.2f}x"]
            for p in peers]  # fmt: skip
    print(f"\nbatch-1 greedy decoding of {n} tokens after a {args.prompt_tokens}-token prompt, fp32, KV cache; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(table(rows, ["peer", "ms/token", "tokens/s", "vs hf"]))
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"\n{weight_bytes / 1e6:.0f} MB of weights read per token; bounds at the measured read rates "
          "(the first is the bound: the weights' size read by every thread):")  # fmt: skip
    for name, rate in read_rates(weight_bytes, ours.config.vocab_size, ours.config.d_model).items():
        bound = weight_bytes / rate
        at = ", ".join(f"{p.name} at {bound / p.seconds * n:.0%}" for p in peers if p.name.startswith("archlab"))
        print(f"  {name}: {rate / 1e9:.1f} GB/s -> {bound * 1e3:.2f} ms/token ({at} of it)")
    write_json(args.json, {p.name: {"tokens_per_s": p.tokens_per_s, "times": p.times} for p in peers})


if __name__ == "__main__":
    main()
