r"""How many tokens a Vision Transformer reads (lesson 8 card 5, the deck's ViT card).

ViT cuts an ``H x W`` image into ``P x P`` patches, flattens each and projects it to ``d``, so the encoder
reads ``(H / P) (W / P)`` patch tokens plus the ``[class]`` token: ``[B, 1 + (H/P)^2, d]``. "ViT-L/14" names
the patch side (14 pixels), not the grid: at 224 x 224 the grid is 16 x 16. Lesson 8 card 5 gives its
frozen CLIP ViT-L/14 "196 tokens per image (14 x 14 patches)" and "~1 GB" of memory; the lab builds the
encoders on the meta device (no memory, instant), counts the tokens that reach the encoder and the
parameters, and prints both next to the card's figures.
"""

from __future__ import annotations

import torch

from archlab.analysis import count_parameters
from archlab.labs.registry import LabResult, register_lab
from archlab.models import build_model

#: name -> (image side, patch side, d, heads, layers, d_ff): the ViT shapes of Dosovitskiy et al. and CLIP
SHAPES = {
    "ViT-B/16 @224": (224, 16, 768, 12, 12, 3072),
    "ViT-L/16 @224": (224, 16, 1024, 16, 24, 4096),
    "ViT-L/14 @224": (224, 14, 1024, 16, 24, 4096),
    "ViT-L/14 @336": (336, 14, 1024, 16, 24, 4096),
}
CARD_MODEL, CARD_TOKENS, CARD_GB = "ViT-L/14 @224", 196, 1.0


def encoder_tokens(model: torch.nn.Module, image_size: int, channels: int = 3) -> int:
    """Tokens ``N`` in the ``[B, N, d]`` sequence the encoder stack receives for one image (meta device)."""
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        model(torch.zeros(1, channels, image_size, image_size, device="meta"))
    finally:
        handle.remove()
    return seen[0]


@register_lab(
    "vit-tokens",
    claim="A frozen CLIP ViT-L/14 vision encoder at 224 x 224 gives 196 tokens per image (14 x 14 patches) and "
    "takes ~1 GB",
    source="lesson 8 card 5 (image encoder); deck: ViT (16 x 16 patches, linear projection, [class] token)",
    tags=("vision",),
)
def run(quick: bool, seed: int) -> LabResult:
    rows, measured = [], {}
    for name, (image, patch, d, heads, layers, d_ff) in SHAPES.items():
        with torch.device("meta"):  # n_classes=0: the encoder alone, as CLIP's vision tower
            model = build_model("vit-base-16", image_size=image, patch_size=patch, d_model=d, n_heads=heads,
                                n_layers=layers, d_ff=d_ff, n_classes=0)  # fmt: skip
        tokens = encoder_tokens(model, image)
        params = count_parameters(model).total
        measured[name] = (tokens, params)
        side = image // patch
        rows.append([name, f"{side} x {side}", tokens, params, params * 4 / 1e9, params * 2 / 1e9])
    tokens, params = measured[CARD_MODEL]
    gb32, gb16 = params * 4 / 1e9, params * 2 / 1e9
    tokens_right = tokens - 1 == CARD_TOKENS
    memory_right = gb16 <= 2 * CARD_GB and gb32 >= CARD_GB / 2  # "~1 GB": within 2x either way
    finding = (
        f"{CARD_MODEL} feeds its encoder {tokens} tokens ({tokens - 1} patches, a 16 x 16 grid of 14-pixel "
        f"patches, + [class]), not {CARD_TOKENS}: 196 = 14 x 14 is the grid of /16 models at 224 "
        f"(ViT-B/16 and ViT-L/16: {measured['ViT-B/16 @224'][0] - 1} patches). Its {params / 1e6:.0f}M "
        f"parameters take {gb32:.2f} GB in fp32 and {gb16:.2f} GB in bf16, so '~1 GB' holds"
    )

    def plot(fig) -> None:
        ax1, ax2 = fig.subplots(1, 2)
        names = list(SHAPES)
        ax1.bar(names, [measured[n][0] for n in names])
        ax1.axhline(CARD_TOKENS + 1, color="r", ls="--", label=f"card: {CARD_TOKENS} + [class]")
        ax1.set(ylabel="tokens the encoder reads")
        ax2.bar(names, [measured[n][1] * 4 / 1e9 for n in names], label="fp32")
        ax2.bar(names, [measured[n][1] * 2 / 1e9 for n in names], label="bf16")
        ax2.axhline(CARD_GB, color="r", ls="--", label="card: ~1 GB")
        ax2.set(ylabel="weights, GB")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
            ax.legend()
            ax.grid(alpha=0.3, axis="y")

    return LabResult(
        columns=["encoder", "patch grid", "tokens (incl. [class])", "parameters", "GB fp32", "GB bf16"],
        rows=rows,
        criterion=f"the card holds if {CARD_MODEL} yields {CARD_TOKENS} patch tokens and its weights take ~1 GB "
        "(within 2x); both halves must hold",
        supported=tokens_right and memory_right,
        finding=finding,
        plot=plot,
        notes="shapes built with archlab's ViT on the meta device (no weights); CLIP's vision tower adds a pre-LayerNorm "
        "and a projection (about 0.8M parameters) that archlab's ViT does not have",
    )
