"""Does the data pipeline keep up with training? A GPT train step fed by LMWindows vs by a pre-tokenised tensor.

Issue #4's target: the pipeline feeds >= 95 % of the tokens/s of pre-tokenised synthetic input, i.e. the
loader is not the bottleneck. Both sides run the same tiny GPT train step (forward, backward, AdamW); the
only difference is where the batch comes from:

    pipeline       next(LMWindows(ids of the stdlib corpus, BPE-tokenised))  random windows, gathered, cast
    pre-tokenised  data[k % n]: a slice of one int64 tensor [n, B, T+1] made before timing

They alternate step by step (so a busy machine slows both alike); tokens/s from the median and from the
mean step time and their ratios are printed, with the batch-production cost alone and the one-time costs
(reading the corpus, training the BPE, tokenising).

    .venv/bin/python benchmarks/data_pipeline.py [--batch 16 --seq-len 128 --steps 24 --threads 1 --device cpu]

On a shared, busy CPU use --threads 1: two threads fighting other processes make step times erratic.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from archlab.data import LMWindows, encode_texts, python_source, train_bpe
from archlab.models.gpt import GPT, GPTConfig


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="timed train steps per source")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B, T = args.batch, args.seq_len

    # -- one-time costs
    corpus, t_read = timed(lambda: python_source(max_bytes=args.corpus_bytes))
    tok, t_bpe = timed(lambda: train_bpe(corpus.train_texts, vocab_size=args.vocab))
    ids, t_enc = timed(lambda: encode_texts(corpus.train_texts, tok))
    mb = sum(len(t.encode()) for t in corpus.train_texts) / 1e6
    print(f"corpus: {len(corpus.train_texts)} files, {mb:.2f} MB, read in {t_read:.2f} s")
    print(f"BPE (vocab {args.vocab}) trained in {t_bpe:.2f} s; tokenised into {len(ids):,} tokens in {t_enc:.2f} s")
    print(f"  ({mb / t_enc:.2f} MB/s, {len(ids) / t_enc:,.0f} tokens/s)")

    # -- the two sources
    pipeline = LMWindows(ids, seq_len=T, batch_size=B, seed=0)
    n_pre = 64
    pre = torch.randint(tok.vocab_size, (n_pre, B, T + 1))
    counter = {"k": 0}

    def pretokenised() -> dict[str, torch.Tensor]:
        w = pre[counter["k"] % n_pre]
        counter["k"] += 1
        return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}

    sources = {"pipeline": lambda: next(pipeline), "pre-tokenised": pretokenised}

    # -- batch production alone
    n = 2000
    production = {}
    for name, source in sources.items():
        _, seconds = timed(lambda source=source: [source() for _ in range(n)])
        production[name] = seconds / n
        print(f"batch production alone, {name:14s} {seconds / n * 1e6:6.0f} us per {B}x{T} batch")

    # -- the same train step fed by each
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size, max_len=T, d_model=args.d_model, n_heads=4, n_layers=args.layers,
        dropout=0.0, attn_dropout=0.0,
    )  # fmt: skip
    model = GPT(config).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), eps=1e-9)

    def timed_step(source) -> float:
        start = time.perf_counter()
        batch = source()
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for source in sources.values():  # warm-up
        timed_step(source)
    times: dict[str, list[float]] = {name: [] for name in sources}
    for i in range(args.steps):  # alternate, and alternate who goes first
        for name in sorted(sources, reverse=i % 2 == 1):
            times[name].append(timed_step(sources[name]))

    print(f"train step on {device}: GPT d={args.d_model}, L={args.layers}, V={tok.vocab_size}, batch {B}x{T},")
    print(f"  {torch.get_num_threads()} threads, {args.steps} steps each")
    rate = {}
    for name, ts in times.items():
        median, mean = statistics.median(ts), statistics.fmean(ts)
        rate[name] = (B * T / median, B * T / mean)
        print(f"  {name:14s} median {median * 1e3:8.1f} ms = {rate[name][0]:9,.0f} tokens/s; "
              f"mean {mean * 1e3:8.1f} ms = {rate[name][1]:9,.0f} tokens/s")  # fmt: skip
    by_median = rate["pipeline"][0] / rate["pre-tokenised"][0]
    by_mean = rate["pipeline"][1] / rate["pre-tokenised"][1]
    print(f"ratio pipeline / pre-tokenised: {by_median:.3f} (medians), {by_mean:.3f} (means); target >= 0.95")
    extra = production["pipeline"] - production["pre-tokenised"]
    print(f"the pipeline's extra cost per batch is {extra / statistics.median(times['pre-tokenised']):.3%} of a step")


if __name__ == "__main__":
    main()
