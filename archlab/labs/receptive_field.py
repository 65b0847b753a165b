r"""WaveNet's dilated (atrous) convolutions: a receptive field that grows exponentially with depth.

Causal convolutions of width ``k`` and dilations ``r_1 .. r_L`` let output ``t`` see the inputs
``t - R + 1 .. t`` with ``R = 1 + (k - 1) sum_l r_l`` (:func:`archlab.nn.conv.receptive_field`). With
every ``r_l = 1`` that is ``1 + (k - 1) L``: linear in depth. With WaveNet's doubling ``r_l = 2^(l-1)`` it
is ``1 + (k - 1)(2^L - 1)``: exponential, so ``log_2 N`` layers connect ``N`` samples (the deck's maximum
path length ``O(log_k N)`` for convolutions).

The lab measures ``R`` rather than trusting the formula: it builds stacks of WaveNet's gated residual
units (:class:`archlab.nn.conv.GatedResidualUnit`, random weights, float64), backpropagates from the last
output position to the input sequence ``x [1, C, N]`` and counts the positions whose gradient is nonzero.
"""

from __future__ import annotations

import math

import torch

from archlab.labs.registry import LabResult, register_lab
from archlab.nn.conv import GatedResidualUnit, doubling_dilations, receptive_field

CHANNELS = 8
AUDIO_SECOND = 16_000  # samples in one second of 16 kHz audio


def measured_receptive_field(dilations: tuple[int, ...], kernel_size: int = 2, seed: int = 0) -> int:
    """How many input positions the last output of a stack of gated residual units depends on."""
    g = torch.Generator().manual_seed(seed)
    layers = [GatedResidualUnit(CHANNELS, CHANNELS, CHANNELS, kernel_size, r).double() for r in dilations]
    for layer in layers:
        for p in layer.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    length = receptive_field(kernel_size, dilations) + 8  # a few positions more than the formula's reach
    x = torch.randn(1, CHANNELS, length, generator=g, dtype=torch.float64, requires_grad=True)
    h, skips = x, 0
    for layer in layers:
        h, skip = layer(h)
        skips = skips + skip
    skips[..., -1].sum().backward()
    return int((x.grad.abs().sum(dim=1)[0] != 0).sum())


def layers_to_reach(n: int, kernel_size: int, dilated: bool) -> int:
    """Fewest layers whose receptive field covers ``n`` samples: ``ceil(log2 ...)`` dilated, linear otherwise."""
    if dilated:
        return max(0, math.ceil(math.log2((n - 1) / (kernel_size - 1) + 1)))
    return math.ceil((n - 1) / (kernel_size - 1))


@register_lab(
    "dilated-receptive-field",
    claim="WaveNet's atrous (dilated) convolutions, doubling the dilation per layer, expand the receptive field "
    "exponentially with depth; convolutions connect N positions in O(log_k N) layers",
    source="deck: WaveNet atrous convolutions; deck: maximum path length",
    tags=("convolution",),
)
def run(quick: bool, seed: int) -> LabResult:
    kernel_size = 2
    depths = range(1, 7) if quick else range(1, 12)
    rows, curves = [], {"dilated": [], "undilated": []}
    exact = True
    for depth in depths:
        for name, dilations in (("dilated", doubling_dilations(depth)), ("undilated", (1,) * depth)):
            formula = receptive_field(kernel_size, dilations)
            measured = measured_receptive_field(dilations, kernel_size, seed)
            exact &= measured == formula
            curves[name].append((depth, measured))
            rows.append([depth, name, measured, formula])
    dilated = [r for _, r in curves["dilated"]]
    doubling = all(b == 2 * a for a, b in zip(dilated, dilated[1:], strict=False))
    reach = {d: layers_to_reach(AUDIO_SECOND, kernel_size, d) for d in (True, False)}
    supported = exact and doubling
    finding = (
        f"measured receptive fields equal 1 + (k-1) sum r_l at every depth; dilated: {dilated[0]} -> {dilated[-1]} "
        f"samples over {len(dilated)} layers (doubling each layer), undilated: {curves['undilated'][-1][1]}; "
        f"one second of 16 kHz audio needs {reach[True]} dilated layers or {reach[False]:,} undilated ones"
    )

    def plot(fig) -> None:
        ax = fig.subplots()
        for name, style in (("dilated", "o-"), ("undilated", "s-")):
            depth, field = zip(*curves[name])
            ax.plot(depth, field, style, label=f"{name} (measured)")
        ax.set(yscale="log", xlabel="layers L (kernel width k = 2)", ylabel="receptive field R (samples)")
        ax.grid(alpha=0.3)
        ax.legend()

    return LabResult(
        columns=["layers", "dilations", "R measured", "R = 1 + (k-1) sum r"],
        rows=rows,
        criterion="the measured receptive field equals the formula at every depth, and the dilated one doubles "
        "with each added layer",
        supported=supported,
        finding=finding,
        plot=plot,
        notes=f"R counted as the input positions with a nonzero gradient from the last output ({CHANNELS} channels, "
        "random float64 weights)",
    )
