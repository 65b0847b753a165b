"""archlab on a CUDA GPU beside its peers: a GPT-2-small training step and batch-1 greedy decoding of SmolLM2-135M.

Training step (``--part train``): GPT-2 small's shape (12 layers, d=768, 12 heads, T=1024, B=8, vocabulary
50,304, tied embeddings, learned positions, no dropout), forward + next-token cross-entropy + backward + fused
AdamW, for archlab, Hugging Face ``GPT2LMHeadModel`` (same weights, its default sdpa attention) and
x-transformers (``attn_flash=True``), archlab also with its loss through ``torch.compile`` (``archlab+compile``),
in bf16 (archlab: the Trainer's path, fp32 master weights and AdamW with the
weights cast to bf16 once per step; the peers: ``torch.autocast``) and in fp32 with TF32 products (PyTorch's
``set_float32_matmul_precision("high")``, what GPU training in fp32 uses). Model FLOPs as in train_step.py
(``6 N + 12 L T d`` per token), shown as a share of the bf16 matmul peak measured first (8192^3).

Decoding (``--part decode``): SmolLM2-135M's architecture with random weights in bf16 (30 layers, GQA 9/3; the
real weights are not on a GPU machine, and the time does not depend on their values), a 16-token prompt, 128
greedy tokens, no stop token, the same weights for all: HF ``generate`` with its dynamic cache and with a static
cache (which generate compiles itself on a GPU, with CUDA graphs), against archlab's ``generate`` and its compiled
static-cache step (:class:`archlab.static_decoding.StaticDecoder`: inductor's Triton kernels, without and with
CUDA graphs). The tokens are not compared (random weights give near-flat logits, whose argmax bf16 rounding
flips; tests/test_cuda.py checks the GPU's tokens). The bound is the weights' bytes read once per token at the
copy bandwidth measured first.

Re-ranking (``--part rerank``): the search engine's cross-encoder (card 5: re-rank the first stage's top 100
within 100 ms) over ``--rerank-depth`` abstracts of ~250 tokens (benchmarks/search_latency.py's), one query,
pairs cut to 256 tokens: :class:`archlab.search.rerank.Reranker` on the GPU in fp32 and in bf16 (``precision=auto``),
and on the machine's CPU with ``--cpu-threads`` threads, beside sentence-transformers' ``CrossEncoder`` on the GPU
over the same folder. The model is all-MiniLM-L6-v2's BERT with a fresh one-logit head
(``Reranker.from_encoder``; the time does not depend on the head's values). Wall-clock per query, tokenizing
included, median of ``--rounds``.

Peers alternate round by round; each reports its median round, timed with CUDA events. The peak memory of each
training peer is ``torch.cuda.max_memory_allocated`` over its warm-up steps alone.

    python benchmarks/gpu.py                 # both parts
    python benchmarks/gpu.py --part decode --rounds 3
    python benchmarks/gpu.py --part rerank --rerank-depth 100
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json  # noqa: E402

from archlab.errors import ConfigError  # noqa: E402
from archlab.generation import generate  # noqa: E402
from archlab.models import build_model  # noqa: E402
from archlab.static_decoding import StaticDecoder  # noqa: E402
from archlab.train.mixed import compute_weights  # noqa: E402

LAYERS, D, HEADS, T, B, VOCAB = 12, 768, 12, 1024, 8, 50304
MATMUL_WEIGHTS = LAYERS * 12 * D * D + VOCAB * D
FLOPS_PER_STEP = B * T * (6 * MATMUL_WEIGHTS + 12 * LAYERS * T * D)
PROMPT, NEW = 16, 128


def gpu_time(run: Callable[[], object], repeats: int = 1) -> float:
    """Seconds per ``run()``, over ``repeats`` calls, by CUDA events (the GPU's own clock)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def bf16_peak(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2 * n**3 / gpu_time(lambda: a @ b, repeats=10)


def copy_bandwidth(n_bytes: int = 4 << 30) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of ``n_bytes``."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * n_bytes / gpu_time(lambda: dst.copy_(src), repeats=10)


def interleave(runs: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(gpu_time(run, per_round))
    return times


# -- training ------------------------------------------------------------------------------------------------


def _gpt():
    model = build_model("gpt2-small", vocab_size=VOCAB, max_len=T, dropout=0.0, attn_dropout=0.0)
    return model.cuda().train()


def _hf_gpt(like):
    import transformers

    from archlab.interop.gpt2 import config_to_gpt2, gpt2_state_from_archlab

    config = transformers.GPT2Config(**{**config_to_gpt2(like.config), "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                        "attn_pdrop": 0.0})  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).cuda().train()
    model.load_state_dict(gpt2_state_from_archlab(like.state_dict()))
    return model


def _xt():
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=T, tie_embedding=True,
                              attn_layers=Decoder(dim=D, depth=LAYERS, heads=HEADS, attn_flash=True)).cuda().train()  # fmt: skip


def training_peers(ids: torch.Tensor, names: list[str]) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (one optimizer step, parameter count)."""
    x, y = ids[:, :-1], ids[:, 1:]
    peers = {}
    for name in names:
        base, _, precision = name.rpartition("-")
        if base in ("archlab", "archlab+compile"):
            model = _gpt()
            loss = torch.compile(model.loss) if base == "archlab+compile" else model.loss
            loss_fn = (lambda loss=loss: loss(x, y))
        elif base == "hf":
            model = _hf_gpt(_gpt())
            loss_fn = (lambda m=model: m(x, labels=torch.cat([x[:, 1:], y[:, -1:]], dim=1)).loss)
        else:
            model = _xt()
            loss_fn = (lambda m=model: F.cross_entropy(m(x).reshape(-1, VOCAB).float(), y.reshape(-1)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

        def step(model=model, loss_fn=loss_fn, optimizer=optimizer, precision=precision, base=base):
            if precision == "bf16" and base.startswith("archlab"):
                with compute_weights(model):  # the Trainer's bf16 path: one cast of each weight per step
                    loss_fn().backward()
            elif precision == "bf16":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn()
                loss.backward()
            else:
                loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        peers[name] = step, sum(p.numel() for p in model.parameters())
    return peers


def train_part(args, peak: float) -> dict:
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 rows, as fp32 GPU training runs
    names = [n for n in ("archlab-bf16", "archlab+compile-bf16", "hf-bf16", "x-transformers-bf16", "archlab-fp32",
                         "hf-fp32") if n.rpartition("-")[0].partition("+")[0] in args.train_peers]  # fmt: skip
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0)).cuda()
    peers = training_peers(ids, names)
    memory = {}
    for name, (step, _) in peers.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        memory[name] = torch.cuda.max_memory_allocated()
    times = interleave({n: s for n, (s, _) in peers.items()}, args.rounds, args.steps_per_round)
    seconds = {n: statistics.median(t) for n, t in times.items()}
    rows = []
    for name in peers:
        base = name.rpartition("-")[2]
        vs_hf = seconds.get(f"hf-{base}")
        achieved = FLOPS_PER_STEP / seconds[name]
        rows.append([name, f"{peers[name][1] / 1e6:.1f}M", f"{seconds[name] * 1e3:.1f}", f"{B * T / seconds[name]:,.0f}",
                     f"{vs_hf / seconds[name]:.2f}x" if vs_hf else "-", f"{achieved / 1e12:.0f}",
                     f"{achieved / peak:.0%}", f"{memory[name] / 2**30:.2f}"])  # fmt: skip
    print(f"\nGPT-2 small train step: {LAYERS} layers, d={D}, {HEADS} heads, T={T}, B={B}, vocab {VOCAB}; AdamW (fused);"
          f" median of {args.rounds} rounds x {args.steps_per_round} steps; model FLOPs {FLOPS_PER_STEP / 1e12:.2f} T/step")  # fmt: skip
    print(table(rows, ["peer", "params", "ms/step", "tokens/s", "vs hf (same precision)", "TFLOP/s",
                       "% bf16 peak", "peak GiB"]))  # fmt: skip
    return {n: {"seconds_per_step": seconds[n], "times": times[n], "peak_bytes": memory[n]} for n in peers}


# -- decoding ------------------------------------------------------------------------------------------------


def decode_part(args, bandwidth: float) -> dict:
    import transformers

    from archlab.interop.llama import config_to_llama, llama_state_from_archlab

    torch.manual_seed(0)
    model = build_model("smollm2-135m", max_len=PROMPT + NEW).to("cuda", torch.bfloat16).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_llama(model.config)))
    hf.load_state_dict(llama_state_from_archlab(model.state_dict(), model.config))
    hf = hf.to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).cuda()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    @torch.inference_mode()
    def hf_run():
        return hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0)  # fmt: skip

    @torch.inference_mode()
    def hf_static_run():  # a static cache: generate compiles the step itself on a GPU ("reduce-overhead": CUDA graphs)
        return hf.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0, cache_implementation="static")  # fmt: skip

    def archlab_run(decoder):
        @torch.inference_mode()
        def run():
            return generate(decoder, prompt, max_new_tokens=NEW)

        return run

    runs = {
        "hf bf16": hf_run,
        "hf bf16 static cache, compiled": hf_static_run,
        "archlab bf16": archlab_run(model),
        "archlab bf16 compiled": archlab_run(StaticDecoder(model, max_len=PROMPT + NEW)),
    }
    try:
        graphs = StaticDecoder(model, max_len=PROMPT + NEW, cuda_graphs=True)
        runs["archlab bf16 compiled + CUDA graphs"] = archlab_run(graphs)
    except ConfigError as e:
        print(f"archlab bf16 compiled + CUDA graphs: left out: {e}")
    print()
    for name, run in list(runs.items()):  # warm-up; the compiled ones compile here
        start = time.perf_counter()
        try:
            run()
        except Exception as e:  # a peer's failure is reported, not fatal: the others are still measured
            print(f"{name}: failed in its warm-up, left out: {type(e).__name__}: {str(e)[:300]}")
            del runs[name]
            continue
        print(f"{name}: first run (its compile included) {time.perf_counter() - start:.1f} s")
    times = interleave(runs, args.rounds, 1)
    seconds = {n: statistics.median(t) / NEW for n, t in times.items()}
    bound = weight_bytes / (bandwidth / 2)  # the weights read once per token at the copy's read rate
    hf_seconds = seconds.get("hf bf16")  # None if HF's own run failed its warm-up
    rows = [[name, f"{seconds[name] * 1e3:.2f}", f"{1 / seconds[name]:,.0f}",
             f"{hf_seconds / seconds[name]:.2f}x" if hf_seconds else "-", f"{bound / seconds[name]:.1%}"]
            for name in runs]  # fmt: skip
    print(f"SmolLM2-135M shape (random weights, {weight_bytes / 1e6:.0f} MB in bf16), batch 1, {PROMPT}-token prompt, "
          f"{NEW} greedy tokens; median of {args.rounds} rounds; bound {bound * 1e6:.0f} us/token")  # fmt: skip
    print(table(rows, ["peer", "ms/token", "tokens/s", "vs hf", "share of bound"]))
    return {n: {"seconds_per_token": seconds[n], "times": times[n]} for n in runs}


# -- re-ranking ----------------------------------------------------------------------------------------------


def rerank_part(args) -> dict:
    import tempfile

    from search_latency import abstracts

    from archlab.search.rerank import Reranker

    texts, query = abstracts(args.rerank_depth), "how are the attention weights of a transformer computed"
    folder = Path(tempfile.mkdtemp(prefix="archlab-ce-")) / "ce"
    Reranker.from_encoder("minilm-l6", max_length=256).save(folder)
    runs: dict[str, Callable[[], object]] = {}
    for device, precision in (("cuda", "fp32"), ("cuda", "auto"), ("cpu", "fp32"), ("cpu", "auto")):
        reranker = Reranker.load(folder, device=device, precision=precision)
        runs[f"archlab {device} {reranker.precision}"] = (lambda r=reranker: r.score(query, texts))
    try:
        from sentence_transformers import CrossEncoder

        st = CrossEncoder(str(folder), device="cuda", max_length=256)
        runs["sentence-transformers cuda fp32"] = lambda: st.predict([(query, t) for t in texts], batch_size=32)
    except Exception as e:  # noqa: BLE001 -- a missing peer is reported, the others still timed
        print(f"sentence-transformers CrossEncoder: left out: {type(e).__name__}: {e}")
    scores = {}
    for name, run in runs.items():  # warm-up
        scores[name] = torch.as_tensor(run(), dtype=torch.float32).flatten()
    times: dict[str, list[float]] = {name: [] for name in runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads)
    try:
        for _ in range(args.rounds):
            for name, run in runs.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    reference = scores["archlab cuda fp32"]
    seconds = {n: statistics.median(t) for n, t in times.items()}
    rows = [[name, f"{seconds[name] * 1e3:.1f}", f"{seconds['archlab cpu fp32'] / seconds[name]:.1f}x",
             f"{float((scores[name] - reference).abs().max()):.1e}"] for name in runs]  # fmt: skip
    print(f"\nRe-ranking {len(texts)} abstracts (~250 tokens, pairs cut to 256) for one query, MiniLM-L6 cross-encoder;"
          f" CPU rows at {args.cpu_threads} threads; median of {args.rounds} rounds; card budget 100 ms")  # fmt: skip
    print(table(rows, ["peer", "ms/query", "vs archlab cpu fp32", "max |score - archlab cuda fp32|"]))
    return {n: {"seconds_per_query": seconds[n], "times": times[n]} for n in runs}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("train", "decode", "rerank", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per peer (median reported)")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--train-peers", nargs="+", default=["archlab", "hf", "x-transformers"],
                        choices=["archlab", "hf", "x-transformers"])  # fmt: skip
    parser.add_argument("--rerank-depth", type=int, default=100, help="candidates re-ranked per query")
    parser.add_argument("--cpu-threads", type=int, default=2, help="threads of the CPU re-ranking rows")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False")
    props = torch.cuda.get_device_properties(0)
    peak, bandwidth = bf16_peak(), copy_bandwidth()
    print(f"torch {torch.__version__}; {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB;"
          f" bf16 matmul peak (8192^3) {peak / 1e12:.0f} TFLOP/s; copy {bandwidth / 1e12:.2f} TB/s (read + write)")  # fmt: skip
    results = {"device": props.name, "bf16_peak": peak, "copy_bandwidth": bandwidth}
    if args.part in ("train", "all"):
        results["train"] = train_part(args, peak)
    if args.part in ("decode", "all"):
        results["decode"] = decode_part(args, bandwidth)
    if args.part in ("rerank", "all"):
        results["rerank"] = rerank_part(args)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
