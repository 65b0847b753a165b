r"""Megatron sharding: tensor parallelism splits every block's weights, gradients and most of its activations
between the ranks, and gives the one-process model's outputs (notes 4: "Megatron-LM shows how tensor + pipeline
sharding lets a single model grow to billions of parameters without blowing GPU memory"; "Megatron sharding
governs block design").

One GPT (random weights, float64, fixed seed) takes one training step (forward, loss, backward) on one batch of
random token ids, twice: in this process, and on ``T = 2`` ranks started with ``torchrun`` (gloo, CPU; one thread
each) with ``parallel=tp`` (:func:`archlab.parallel.tensor_parallel`: attention heads and FFN units split by rank,
two all-reduces per block forward). Measured per rank, on each side::

    parameters     bytes each rank holds (:func:`archlab.parallel.parameter_bytes_by_rank`, the same measurement
                   as benchmarks/tp_memory.py), all of them and those of the decoder blocks
    step peak      the allocator's peak while the step runs, above the parameters (activations kept for the
                   backward pass, gradients, temporaries: :func:`archlab.labs.common.peak_bytes`), measured on a
                   second step after a first one (warm caches)
    outputs        logits and every gradient (whole, in the one-process layout: :func:`archlab.parallel.full_gradients`)

The block design is what makes this work: ``W_in`` column-parallel (each rank its heads / its FFN units), ``W_O``
and ``W_2`` row-parallel (one all-reduce sums the ranks' halves), so nothing else is exchanged; embeddings, norms,
the LM head and the residual stream ``[B, N, d]`` stay whole on every rank (Megatron without sequence parallelism).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from archlab.errors import ArchlabError
from archlab.labs.common import peak_bytes
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.models.gpt import GPT, GPTConfig
from archlab.parallel import parameter_bytes_by_rank

RANKS = 2
BLOCK_SHARE = 0.55  # each rank's decoder-block parameters, of one process's: half, plus norms and biases kept whole
PEAK_SHARE = 0.8  # each rank's step peak, of one process's: activations and gradients of the split layers halve
OUTPUT_RTOL = 1e-9  # float64: the ranks' sums run in another order, nothing else differs
WORKER = "archlab.labs.megatron_ranks"


def config(quick: bool) -> GPTConfig:
    """The GPT the lab shards: 4 blocks of d = 256, 8 heads (quick: 2 blocks of d = 64, 4 heads), byte vocabulary."""
    d, heads, layers = (64, 4, 2) if quick else (256, 8, 4)
    return GPTConfig(vocab_size=256, max_len=128, d_model=d, n_heads=heads, n_layers=layers, dropout=0.0,
                     attn_dropout=0.0)  # fmt: skip


def model(quick: bool, seed: int) -> GPT:
    """The lab's GPT in float64, the same weights in every process for the same ``seed``."""
    torch.manual_seed(seed)
    return GPT(config(quick)).double()


def batch(quick: bool, seed: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)``, ``[B, N]`` random ids (B, N = 8, 128; quick: 4, 32), the same in every process."""
    b, n = (4, 32) if quick else (8, 128)
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 256, (b, n + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def measure_step(net: GPT, ids: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor], int]:
    """``(logits [B, N, V], {name: gradient}, step peak bytes)``: one forward + backward for the outputs, then the
    allocator's peak over a second one (gradients freed first, so they count); the gradients are whole tensors in
    the one-process layout (a collective under tensor parallelism)."""
    from archlab.parallel import full_gradients

    logits = net(ids).detach()
    net(ids, labels=labels).backward()
    grads = full_gradients(net)
    net.zero_grad(set_to_none=True)
    peak = peak_bytes(lambda: net(ids, labels=labels).backward())
    return logits, grads, peak


def run_ranks(quick: bool, seed: int, out: Path) -> dict:
    """Run :mod:`archlab.labs.megatron_ranks` on :data:`RANKS` CPU processes under torchrun (``--standalone``,
    gloo, one thread each) and return what rank 0 saved; an :class:`~archlab.errors.ArchlabError` with the ranks'
    output if they fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a lab run inside another torchrun job starts its own group
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}", "-m", WORKER,
           str(out), str(int(quick)), str(seed)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise ArchlabError(f"the {RANKS} tensor-parallel ranks failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           + proc.stdout[-2000:] + proc.stderr[-4000:])  # fmt: skip
    return torch.load(out / "ranks.pt", weights_only=True)


def largest_difference(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """The largest ``|got - want| / max|want|`` over the tensors of ``want`` (each scaled by its own largest value)."""
    if set(got) != set(want):
        raise ArchlabError(f"the ranks returned gradients of {sorted(set(got) ^ set(want))} that one process does not")
    return max(((got[k] - w).abs().max() / w.abs().max().clamp_min(1e-300)).item() for k, w in want.items())


@register_lab(
    "megatron-sharding",
    claim="Megatron-LM's tensor sharding lets a single model grow without blowing memory: every block's weights are "
    "split between the devices (which governs the block's design), and the sharded model computes what the whole "
    "one does",
    source="notes 4 (Scaling & Efficiency: Megatron-LM); notes: Megatron sharding governs block design",
    tags=("parallelism", "memory"),
    minutes=1.2,  # the full run's wall time, torchrun's start included: 71 s on the shared, loaded machine
)
def run(quick: bool, seed: int) -> LabResult:
    ids, labels = batch(quick, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_ranks(quick, seed, Path(tmp))
    with one_thread():
        single = model(quick, seed)
        logits, grads, peak = measure_step(single, ids, labels)
    (total, blocks), = parameter_bytes_by_rank(single)  # fmt: skip
    logits_diff = largest_difference({"logits": ranks["logits"]}, {"logits": logits})
    grads_diff = largest_difference(ranks["grads"], grads)

    rows = [["one process", total, blocks, peak, 1.0, 1.0]]
    for r, ((t, b), p) in enumerate(zip(ranks["bytes"], ranks["peaks"], strict=True)):
        rows.append([f"tp rank {r} of {RANKS}", t, b, p, b / blocks, p / peak])
    block_shares = [row[4] for row in rows[1:]]
    peak_shares = [row[5] for row in rows[1:]]
    equal = logits_diff <= OUTPUT_RTOL and grads_diff <= OUTPUT_RTOL
    supported = equal and max(block_shares) <= BLOCK_SHARE and max(peak_shares) <= PEAK_SHARE
    c = config(quick)
    finding = (
        f"on {RANKS} ranks each holds {max(block_shares):.3f} of the decoder blocks' parameter bytes "
        f"({max(row[2] for row in rows[1:]) / 2**20:.2f} of {blocks / 2**20:.2f} MiB; "
        f"{max(row[1] for row in rows[1:]) / total:.3f} of all parameters, the embeddings and LM head whole) and "
        f"{max(peak_shares):.3f} of one process's training-step peak ({max(row[3] for row in rows[1:]) / 2**20:.2f} "
        f"of {peak / 2**20:.2f} MiB); the logits and gradients equal one process's up to "
        f"{max(logits_diff, grads_diff):.1e} (relative, float64)"
    )

    def plot(fig) -> None:
        names = [row[0] for row in rows]
        left, right = fig.subplots(1, 2)
        x = torch.arange(3).double()
        kinds = ["parameters\n(decoder blocks)", "parameters\n(embeddings, head)",
                 "training-step peak\n(activations, grads)"]
        for i, row in enumerate(rows):
            values = [row[2] / 2**20, (row[1] - row[2]) / 2**20, row[3] / 2**20]
            left.bar(x + (i - 1) * 0.27, values, 0.27, label=names[i], color=["#888", "#2a7", "#7c4"][i])
        left.set_xticks(x, kinds, fontsize=7)
        left.set_ylabel("MiB per process (float64)")
        left.set_title(f"GPT {c.n_layers} x d={c.d_model}, {c.n_heads} heads: bytes per process", fontsize=8)
        left.legend(fontsize=7)
        shares = [("block parameters", block_shares), ("step peak", peak_shares)]
        for j, (what, values) in enumerate(shares):
            right.bar([j * 3 + k for k in range(RANKS)], values, 0.8, color="#2a7")
        right.axhline(0.5, color="k", lw=0.8, ls="--", label="half (perfect split)")
        right.axhline(1.0, color="#888", lw=0.8, label="one process")
        right.set_xticks([j * 3 + (RANKS - 1) / 2 for j in range(len(shares))],
                         [f"{what}\n(rank 0, rank 1)" for what, _ in shares], fontsize=7)  # fmt: skip
        right.set_ylim(0, 1.1)
        right.set_ylabel("share of one process's bytes")
        right.set_title(f"each rank's share; outputs equal to {max(logits_diff, grads_diff):.0e}", fontsize=8)
        right.legend(fontsize=7)

    return LabResult(
        columns=["process", "parameter bytes", "block parameter bytes", "step peak bytes", "block share",
                 "peak share"],  # fmt: skip
        rows=rows,
        criterion=f"on {RANKS} ranks with parallel=tp the logits and every gradient equal one process's (largest "
        f"relative difference <= {OUTPUT_RTOL:.0e}, float64), each rank holds at most {BLOCK_SHARE} of the decoder "
        f"blocks' parameter bytes (half, with norms and row-parallel biases whole) and its training-step peak is at "
        f"most {PEAK_SHARE} of one process's",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"GPT of {c.n_layers} blocks, d={c.d_model}, {c.n_heads} heads, d_ff={c.ffn_width}, V=256, float64, "
        f"batch {tuple(ids.shape)} of random ids; ranks: torchrun --standalone --nproc_per_node={RANKS}, gloo on "
        "the CPU, one thread each. The step peak is the allocator's, above the parameters: the split layers' "
        "activations (Q, K, V, the scores [B, A, N, N], the FFN's hidden units) and gradients halve, while the "
        "residual stream, the norms, the embeddings and the logits [B, N, V] stay whole on each rank, so it falls by "
        "less than half. Pipeline sharding (the notes' other half) and time are not measured: gloo on one CPU says "
        "nothing about a GPU interconnect",
    )
