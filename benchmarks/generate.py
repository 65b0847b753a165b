"""Batch-1 greedy decoding: archlab ``generate`` vs Hugging Face ``generate`` on the same GPT-2 weights.

A random-init GPT of the ``gpt-mini`` shape (6 layers, d=384, 6 heads, vocab 50,304; position table 512
so prompt + 256 new tokens fit) is built in archlab and copied into ``transformers.GPT2LMHeadModel``
with archlab's converter; both decode 256 new tokens greedily from the same 16-token prompt through
their KV caches, float32, in interleaved rounds (median reported). The generated tokens must be
identical, which the script checks before timing.

Batch-1 decoding reads every weight once per token, so it is bounded by memory bandwidth. The bound is a
peer of its own, timed in the same interleaved rounds as the decoders: a plain read by all threads
(``W.sum()``) of a buffer as large as the weights a token reads, once per token (on the shared AMD EPYC kind
the rate swung between 32 and 49 GB/s from minute to minute, so a rate measured apart from the decoding made
its share swing with it). For comparison the script also prints best-of-30 rates of a matrix the size of the
LM head (smaller, so more of it can stay in the CPU's last-level cache between repeats) and of ``torch.mv`` on
it (PyTorch's CPU matrix-vector product, which runs on one thread). archlab's few-row products use every
thread (``archlab.nn.linear``), so the first bound applies to it.

``--compile`` adds the peers ``archlab compiled``: the same model through :class:`archlab.static_decoding.StaticDecoder`
(a static KV cache, the one-token step compiled by ``torch.compile``), its tokens checked equal to the others', its
compile time printed apart from the timed rounds; and ``archlab compiled cpp-wrapper``, the same with inductor's C++
wrapper (``StaticDecoder(..., cpp_wrapper=True)``).

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


def read_rates(rows: int, cols: int, repeats: int = 30) -> dict[str, float]:
    """Bytes/s (best of ``repeats``) at which ``W [rows, cols]`` fp32 (the LM head's size) is read by ``W.sum()``
    (all threads) and by ``torch.mv``."""
    w, x = torch.randn(rows, cols), torch.randn(cols)
    rates = {}
    for name, fn in ((f"streaming read of the head's {w.numel() * 4 / 1e6:.0f} MB (W.sum), best of {repeats}", w.sum),
                     (f"torch.mv on the head, best of {repeats}", lambda: torch.mv(w, x))):  # fmt: skip
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rates[name] = w.numel() * 4 / best
    return rates


def bound_peer(weight_bytes: int, tokens: int) -> Peer:
    """The streaming bound as a peer: all threads read a buffer of ``weight_bytes`` (``W.sum()``) once per token."""
    weights = torch.ones(weight_bytes // 4)
    return Peer("streaming read (the bound)", lambda: [weights.sum() for _ in range(tokens)], tokens=tokens)


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
        for name, cpp in (("archlab compiled", False), ("archlab compiled cpp-wrapper", True)):
            compiled, seconds, tokens, _ = compiled_decoding_peer(name, ours, prompt, n, cpp_wrapper=cpp)
            if not torch.equal(tokens, a):
                raise SystemExit(f"{name}: tokens differ: first mismatch at {int((tokens != a).nonzero()[0, 1])}")
            print(f"{name}: the same {n} tokens; torch.compile took {seconds:.1f} s (once per process)")
            peers.append(compiled)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    bound = bound_peer(weight_bytes, n)
    time_interleaved([*peers, bound], rounds=args.rounds)
    hf_rate = peers[1].tokens_per_s
    rows = [[p.name, f"{p.seconds * 1e3 / n:.2f}", f"{p.tokens_per_s:.1f}", f"{p.tokens_per_s / hf_rate:.2f}x"]
            for p in peers]  # fmt: skip
    print(f"\nbatch-1 greedy decoding of {n} tokens after a {args.prompt_tokens}-token prompt, fp32, KV cache; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(table(rows, ["peer", "ms/token", "tokens/s", "vs hf"]))
    print(f"\n{weight_bytes / 1e6:.0f} MB of weights read per token. The bound, timed in the same rounds (all threads "
          f"read that many bytes once per token): {weight_bytes / bound.seconds * n / 1e9:.1f} GB/s, "
          f"{bound.seconds * 1e3 / n:.2f} ms/token (median; rounds {min(bound.times) * 1e3 / n:.2f}-"
          f"{max(bound.times) * 1e3 / n:.2f})")  # fmt: skip
    for p in peers:
        if p.name.startswith("archlab"):
            shares = sorted(b / t for b, t in zip(bound.times, p.times))
            print(f"  {p.name}: at {bound.seconds / p.seconds:.0%} of the bound (medians; round by round "
                  f"{shares[0]:.0%}-{shares[-1]:.0%})")  # fmt: skip
    print("For comparison (measured apart, not the bound):")
    for name, rate in read_rates(ours.config.vocab_size, ours.config.d_model).items():
        ms = weight_bytes / rate * 1e3
        at = ", ".join(f"{p.name} at {ms / 1e3 / p.seconds * n:.0%}" for p in peers if p.name.startswith("archlab"))
        print(f"  {name}: {rate / 1e9:.1f} GB/s -> {ms:.2f} ms/token ({at} of it)")
    write_json(args.json, {p.name: {"tokens_per_s": p.tokens_per_s, "times": p.times} for p in [*peers, bound]})


if __name__ == "__main__":
    main()
