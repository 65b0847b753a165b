r"""The residual stream: early blocks represent the current token, the last ones the next (deck: "At early blocks,
the stream represents the current token; at the highest blocks, it shifts to represent the following token").

The logit lens (nostalgebraist 2020) reads the stream ``h_l [B, N, d]`` after ``l`` blocks (``l = 0``: the
embeddings) with the model's own output head, as if the model ended there::

    p_l = softmax(Norm_f(h_l) W_head^T)                         [B, N, V]

and asks, per layer, how much probability (and which rank) it gives the current token ``x_i`` and the next one
``x_{i+1}``. The GPT's head is *untied* from its embeddings here, so that layer 0 reading its own token is a
finding, not the identity ``E E^T`` of a tied head.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archlab.data import LMWindows
from archlab.labs.common import byte_lm_data, learned_too_little, train_gpt
from archlab.labs.registry import LabResult, one_thread, register_lab
from archlab.models.gpt import GPT, GPTConfig

D_MODEL, HEADS, LAYERS, SEQ_LEN = 64, 4, 3, 64
LR = 3e-3
CORPUS_BYTES = 400_000


@torch.no_grad()
def residual_stream(model: GPT, input_ids: Tensor) -> list[Tensor]:
    """``[h_0, h_1, ..., h_L]``, each ``[B, N, d]``: the stream before the first block and after each block (before the
    final norm), captured by forward hooks on the blocks of one ordinary forward pass."""
    states: list[Tensor] = []
    blocks = model.decoder.blocks
    handles = [blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0]))]
    handles += [b.register_forward_hook(lambda m, args, out: states.append(out)) for b in blocks]
    try:
        model(input_ids, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return states


@torch.no_grad()
def lens(model: GPT, h: Tensor) -> Tensor:
    """``log p_l [B, N, V]`` of a stream ``h [B, N, d]`` read by the final norm and the output head."""
    return torch.log_softmax(model.lm_head(model.decoder.final_norm(h)).double(), dim=-1)


def token_stats(logp: Tensor, tokens: Tensor) -> dict[str, float]:
    """Mean probability, median rank (0 = top) and top-1 rate of ``tokens [B, N]`` under ``logp [B, N, V]``."""
    chosen = logp.gather(-1, tokens[..., None])  # [B, N, 1]
    rank = (logp > chosen).sum(-1).flatten().double()
    return {"p": chosen.exp().mean().item(), "rank": rank.median().item(), "top1": (rank == 0).double().mean().item()}


def layer_table(model: GPT, inputs: Tensor, labels: Tensor) -> list[dict[str, float]]:
    """Per layer ``l = 0..L``: the current token's (``inputs``) and the next token's (``labels``) stats; positions
    where the two are the same token are left out (they would count for both)."""
    model.eval()
    keep = inputs != labels
    rows = []
    for layer, h in enumerate(residual_stream(model, inputs)):
        logp = lens(model, h)[keep]  # [K, V]
        current, nxt = token_stats(logp, inputs[keep]), token_stats(logp, labels[keep])
        rows.append({"layer": layer, **{f"cur_{k}": v for k, v in current.items()},
                     **{f"next_{k}": v for k, v in nxt.items()}})  # fmt: skip
    return rows


@register_lab(
    "logit-lens",
    claim="In the residual stream, early blocks represent the current token and the highest blocks shift to "
    "represent the following token",
    source="deck: the residual stream viewpoint",
    tags=("interpretability", "residual stream"),
    minutes=1.0,
)
def run(quick: bool, seed: int) -> LabResult:
    steps, batch_size, windows = (30, 8, 16) if quick else (600, 16, 64)
    data = byte_lm_data(CORPUS_BYTES, SEQ_LEN, windows)
    tokenizer, train_ids, unigram = data.tokenizer, data.train_ids, data.unigram
    inputs, labels = data.inputs, data.labels
    config = GPTConfig(vocab_size=tokenizer.vocab_size, max_len=SEQ_LEN, d_model=D_MODEL, n_heads=HEADS,
                       n_layers=LAYERS, dropout=0.0, attn_dropout=0.0, tie_embeddings=False)  # fmt: skip
    batches = LMWindows(train_ids, seq_len=SEQ_LEN, batch_size=batch_size, seed=seed)
    with one_thread():
        model, _ = train_gpt(config, batches, steps, lr=LR, seed=seed, label="GPT (logit lens)")
    model.eval()
    with torch.no_grad():
        loss = model.loss(inputs, labels).item()
    table = layer_table(model, inputs, labels)
    first, last = table[0], table[-1]
    supported = first["cur_p"] > first["next_p"] and last["next_p"] > last["cur_p"]
    shift = next((r["layer"] for r in table if r["next_p"] > r["cur_p"]), None)
    undecided = learned_too_little({"GPT": loss}, unigram)
    rows = [[r["layer"], r["cur_p"], r["next_p"], r["cur_rank"], r["next_rank"], r["cur_top1"], r["next_top1"]]
            for r in table]  # fmt: skip
    finding = (
        f"at layer 0 (the embeddings) the lens gives the current token p={first['cur_p']:.3f} (top-1 "
        f"{first['cur_top1']:.0%}) and the next p={first['next_p']:.3f} (top-1 {first['next_top1']:.0%}); after the last block the current token "
        f"p={last['cur_p']:.3f}, the next p={last['next_p']:.3f} (top-1 {last['next_top1']:.0%}); the next token "
        + (f"overtakes the current one at layer {shift}" if shift is not None else "never overtakes the current one")
        + f" (held-out loss {loss:.2f} nats, unigram {unigram:.2f})"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        layers = [r["layer"] for r in table]
        for key, label, style in (("cur", "current token x_i", "o-"), ("next", "next token x_{i+1}", "s-")):
            ax1.plot(layers, [r[f"{key}_p"] for r in table], style, label=label)
            ax2.plot(layers, [max(r[f"{key}_rank"], 0.5) for r in table], style, label=label)
        ax1.set(xlabel="layer l (0 = embeddings)", ylabel="mean probability under the lens", title="probability")
        ax2.set(xlabel="layer l (0 = embeddings)", ylabel="median rank (0 drawn at 0.5)", yscale="log", title="rank")
        for ax in (ax1, ax2):
            ax.set_xticks(layers)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)

    return LabResult(
        columns=["layer", "P(current)", "P(next)", "rank current", "rank next", "top-1 current", "top-1 next"],
        rows=rows,
        criterion="on held-out text, the lens at layer 0 (the embeddings) gives the current token more probability "
        "than the next one, and after the last block the next token more than the current one (mean over positions "
        "whose current and next tokens differ)",
        supported=supported,
        finding=finding,
        plot=plot,
        undecided=undecided,
        notes=f"byte-level GPT, {LAYERS} layers, d={D_MODEL}, {HEADS} heads, untied output head, windows of {SEQ_LEN} "
        f"bytes of Python source ({CORPUS_BYTES // 1000} kB), {steps} AdamW steps of {batch_size} (lr {LR}); lens on "
        f"{windows} held-out windows ({int((inputs != labels).sum())} positions). The lens uses the final norm and "
        f"head as they are; intermediate layers were not trained to be read that way, so their probabilities are a "
        f"lower bound (the tuned lens fits a map per layer). Rank 0 is the top of the lens's distribution. With an "
        f"untied head the path from the embeddings straight to the head learns bigram statistics, so layer 0 can "
        f"already lean to the next token; with a tied head layer 0 would read its own token almost by construction",
    )
