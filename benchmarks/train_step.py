"""One training step of a small GPT: archlab vs Hugging Face GPT2LMHeadModel vs x-transformers, side by side.

x-transformers runs twice: as the issue names it (``TransformerWrapper(Decoder)`` with its defaults, which
compute attention with einsum and softmax), and with its ``attn_flash=True`` switch (PyTorch's fused
attention, the kernel archlab and HF use). The same shape for all: 6 layers, d=384, 6 heads, T=256, B=8, vocabulary 50,304, tied input and
output embeddings, learned positions, float32, no dropout (x-transformers' default; the others set to
match), AdamW (lr 3e-4, PyTorch's fused implementation for all, as archlab's Trainer uses). A step is
forward, next-token cross-entropy, backward, optimizer step, zero_grad. Each peer runs in a fresh
process of its own, one after the other (``--together``: all alive, taking turns round by round); the
median round is reported. Achieved FLOP/s
use the same model-FLOPs count for every peer (PaLM appendix B: ``6 N + 12 L T d`` per token, N = the matmul weights including the LM head, attention scores counted
in full) and are shown as a share of the fp32 matmul peak measured first on this machine.

    python benchmarks/train_step.py                 # all peers, 5 rounds of 2 steps
    python benchmarks/train_step.py --peers archlab --rounds 3
    python benchmarks/train_step.py --keep-memory   # glibc keeps freed memory: no page faults for anyone

bf16 rows, where the CPU computes bf16 natively (AMX or AVX512-BF16; :func:`archlab.hardware.native_bf16`),
skipped with the reason elsewhere: ``archlab-bf16`` (the Trainer's path, :mod:`archlab.train.mixed`: fp32 master
weights and AdamW, weights cast to bf16 once per step, the fused loss in bf16 with fp32 sums) and ``hf-bf16``
(``torch.autocast`` bf16 around HF's forward). Their "% peak" column is against the bf16 matmul peak.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Peer, base_parser, matmul_peak, setup, table, time_in_processes, write_json  # noqa: E402

from archlab.hardware import native_bf16  # noqa: E402
from archlab.models import build_model  # noqa: E402
from archlab.train.mixed import compute_weights  # noqa: E402

LAYERS, D, HEADS, T, B, VOCAB = 6, 384, 6, 256, 8, 50304
MATMUL_WEIGHTS = LAYERS * 12 * D * D + VOCAB * D  # per layer: W_QKV 3d^2, W_O d^2, FFN 8d^2; plus the head
FLOPS_PER_STEP = B * T * (6 * MATMUL_WEIGHTS + 12 * LAYERS * T * D)  # forward + backward


def archlab_step():
    model = build_model("gpt-mini", dropout=0.0, attn_dropout=0.0).train()

    def loss_fn(ids):
        return model.loss(ids[:, :-1], ids[:, 1:])

    return model, loss_fn


def archlab_bf16_step():
    model, loss_fn = archlab_step()
    loss_fn.around_step = lambda: compute_weights(model)  # one cast of every weight per step
    return model, loss_fn


def hf_bf16_step():
    model, loss_fn = hf_step()

    def autocast_loss(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(ids)

    return model, autocast_loss


def hf_step():
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=LAYERS, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).train()

    def loss_fn(ids):
        # HF shifts labels itself: inputs ids[:, :-1], labels the same tokens -> predicts ids[:, 1:]
        x = ids[:, :-1]
        return model(x, labels=torch.cat([x[:, 1:], ids[:, -1:]], dim=1)).loss

    return model, loss_fn


def xtransformers_step(flash: bool = False):
    from x_transformers import Decoder, TransformerWrapper

    model = TransformerWrapper(
        num_tokens=VOCAB, max_seq_len=T, tie_embedding=True,
        attn_layers=Decoder(dim=D, depth=LAYERS, heads=HEADS, attn_flash=flash),
    ).train()  # fmt: skip

    def loss_fn(ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    return model, loss_fn


PEERS = {
    "archlab": archlab_step,
    "hf": hf_step,
    "x-transformers": xtransformers_step,
    "x-transformers-flash": functools.partial(xtransformers_step, flash=True),
    "archlab-bf16": archlab_bf16_step,
    "hf-bf16": hf_bf16_step,
}
BF16_PEERS = ("archlab-bf16", "hf-bf16")
BASELINES = {"hf": "vs hf", "x-transformers": "vs x-t", "x-transformers-flash": "vs x-t flash"}


def make_peer(name: str, ids: torch.Tensor) -> tuple[Peer, int]:
    model, loss_fn = PEERS[name]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

    around = getattr(loss_fn, "around_step", contextlib.nullcontext)

    def step():
        with around():
            loss = loss_fn(ids)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    params = sum(p.numel() for p in model.parameters())
    return Peer(name, step, tokens=B * T), params


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--together", action="store_true",
                        help="keep every peer's process alive and take turns round by round (default: one "
                             "process at a time, alone on the machine)")  # fmt: skip
    args = parser.parse_args()
    print(setup(args.threads, args.keep_memory))
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3 sgemm, best of 10): {peak / 1e9:.1f} GFLOP/s")
    native, why = native_bf16("cpu")
    peaks = {name: peak for name in PEERS}
    if native:
        peaks.update(dict.fromkeys(BF16_PEERS, matmul_peak(dtype=torch.bfloat16)))
        print(f"bf16 matmul peak (2048^3, best of 10): {peaks[BF16_PEERS[0]] / 1e9:.1f} GFLOP/s ({why})")
    elif any(name in BF16_PEERS for name in args.peers):
        print(f"bf16 rows skipped: {why}")
        args.peers = [name for name in args.peers if name not in BF16_PEERS]
    ids = torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(0))
    peers, params = time_in_processes(
        args.peers, make_peer, (ids,), rounds=args.rounds, per_round=args.steps_per_round, threads=args.threads,
        keep_memory=args.keep_memory, together=args.together,
    )  # fmt: skip
    ref = {p.name: p.tokens_per_s for p in peers}
    rows = []
    for p in peers:
        achieved = FLOPS_PER_STEP / p.seconds
        ratios = [f"{ref[p.name] / ref[o]:.2f}x" if o in ref else "-" for o in BASELINES]
        rows.append([p.name, f"{params[p.name] / 1e6:.1f}M", f"{p.seconds * 1e3:.0f}", f"{p.tokens_per_s:.0f}",
                     *ratios, f"{achieved / 1e9:.1f}", f"{achieved / peaks[p.name]:.0%}"])  # fmt: skip
    print(f"\nGPT train step, {LAYERS} layers, d={D}, {HEADS} heads, T={T}, B={B}, vocab {VOCAB}, fp32 (bf16 rows: "
          "bf16 compute, fp32 master weights), AdamW; "
          f"median of {args.rounds} rounds x {args.steps_per_round} steps")  # fmt: skip
    print(f"model FLOPs per step: {FLOPS_PER_STEP / 1e9:.1f} G")
    print(table(rows, ["peer", "params", "ms/step", "tokens/s", *BASELINES.values(), "GFLOP/s", "% peak"]))
    write_json(args.json, {"peak_flops": peak, "results": {p.name: {
        "tokens_per_s": p.tokens_per_s, "seconds_per_step": p.seconds, "times": p.times,
        "params": params[p.name]} for p in peers}, "flops_per_step": FLOPS_PER_STEP})  # fmt: skip


if __name__ == "__main__":
    main()
