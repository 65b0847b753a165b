"""WaveNet: causality and the receptive field measured from gradients, incremental generation with per-layer
queues equal to the full forward (and O(1) work per sample), mu-law companding, errors, a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab import kernels
from archlab.errors import ConfigError, DataError, ShapeError
from archlab.generation import beam_search, generate
from archlab.models import build_model, get_config
from archlab.models.wavenet import WaveNet, WaveNetConfig, mu_law_decode, mu_law_encode, receptive_field

CONFIGS = [
    dict(kernel_size=2, layers_per_stack=3, n_stacks=2),  # dilations 1 2 4 1 2 4: R = 15
    dict(kernel_size=3, layers_per_stack=2, n_stacks=3),  # dilations 1 2 x3, width 3: R = 1 + 2 * 3 * 3 = 19
    dict(kernel_size=2, layers_per_stack=5, n_stacks=1),  # 1..16: R = 32
]


def small(seed: int = 0, **overrides) -> WaveNet:
    torch.manual_seed(seed)
    base = dict(vocab_size=16, residual_channels=6, gate_channels=5, skip_channels=7)
    return WaveNet(WaveNetConfig(**{**base, **overrides})).double().eval()


def input_gradient(model: WaveNet, ids: torch.Tensor, t: int) -> torch.Tensor:
    """``|d logits[0, t] / d x_0[0, :, s]|`` summed over channels, for every position ``s``: ``[N]``."""
    captured = []

    def keep(module, args, out):
        out.retain_grad()
        captured.append(out)

    hook = model.embedding.register_forward_hook(keep)
    try:
        model(ids)[0, t].sum().backward()
    finally:
        hook.remove()
    return captured[0].grad[0].abs().sum(-1)


# ------------------------------------------------------------------------------------------------
# causality and the receptive field
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", CONFIGS)
def test_output_never_depends_on_later_inputs_and_sees_exactly_the_receptive_field(overrides):
    """The gradient of output t w.r.t. the inputs after t is exactly 0; it is nonzero on exactly the
    ``R`` inputs ``t - R + 1 .. t``, ``R`` = :func:`receptive_field`."""
    model = small(**overrides)
    R = receptive_field(model.config)
    ids = torch.randint(0, 16, (1, 2 * R + 10))
    for t in (0, 5, R - 1, R + 3, 2 * R + 9):
        grad = input_gradient(model, ids, t)
        assert torch.all(grad[t + 1 :] == 0), f"output {t} depends on later inputs"
        seen = (grad != 0).nonzero().flatten().tolist()
        assert seen == list(range(max(0, t - R + 1), t + 1)), (t, R, seen)


@pytest.mark.parametrize(
    "overrides, R",
    [(dict(layers_per_stack=10, n_stacks=3), 3070), (dict(layers_per_stack=8, n_stacks=2), 511),
     (dict(kernel_size=3, layers_per_stack=4, n_stacks=1), 31), (dict(layers_per_stack=1, n_stacks=1), 2)],
)  # fmt: skip
def test_receptive_field_formula(overrides, R):
    """``1 + (k - 1) S (2^L - 1)`` = ``1 + (k - 1) * sum(dilations)``."""
    config = WaveNetConfig(**overrides)
    assert receptive_field(config) == R == 1 + (config.kernel_size - 1) * sum(config.dilations)
    assert config.dilations[: config.layers_per_stack] == tuple(2**i for i in range(config.layers_per_stack))


def test_preset_receptive_fields():
    assert receptive_field(get_config("wavenet-small")) == 511
    assert receptive_field(get_config("wavenet-large")) == 3070
    assert build_model("wavenet-small").receptive_field == 511


# ------------------------------------------------------------------------------------------------
# fast generation with per-layer queues
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", CONFIGS)
def test_incremental_equals_full_forward_float64(overrides):
    """A prompt chunk, then one sample at a time, well past the receptive field (the queues wrap)."""
    model = small(**overrides)
    ids = torch.randint(0, 16, (3, 60))
    full = model(ids)
    cache = model.new_cache()
    outs = [model(ids[:, :9], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(9, 60)]
    assert cache.length == 60
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-10, rtol=0)


def test_incremental_equals_full_forward_float32_preset():
    torch.manual_seed(0)
    model = build_model("wavenet-small").eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(40)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_one_step_costs_the_same_at_any_point_of_the_sequence():
    """No recomputation: the FLOPs of one sample are the same after 5 samples and after 200, and are
    those of one position of the full forward (O(layers) per sample)."""
    model = small(**CONFIGS[0]).float()
    ids = torch.randint(0, 16, (1, 201))
    cache = model.new_cache()

    def flops(run) -> int:
        counter = kernels.flop_counter(display=False)
        with counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    model(ids[:, :5], cache=cache)
    early = flops(lambda: model(ids[:, 5:6], cache=cache))
    model(ids[:, 6:200], cache=cache)
    late = flops(lambda: model(ids[:, 200:201], cache=cache))
    per_position = flops(lambda: model(ids)) / ids.shape[1]
    assert early == late == per_position > 0


def test_generate_with_queues_equals_generate_by_recomputation():
    """archlab.generation drives WaveNet through decoder_step / new_cache: greedy and sampled continuations
    with the cache equal those that recompute the whole prefix, and beam search agrees too."""
    model = small(seed=3, **CONFIGS[1])
    prompt = torch.randint(0, 16, (2, 6))
    fast = generate(model, prompt, max_new_tokens=30)
    slow = generate(model, prompt, max_new_tokens=30, use_cache=False)
    assert fast.shape == (2, 36) and torch.equal(fast, slow)
    sampled = generate(model, prompt, max_new_tokens=20, do_sample=True, seed=7)
    assert torch.equal(sampled, generate(model, prompt, max_new_tokens=20, do_sample=True, seed=7, use_cache=False))
    beams = beam_search(model, prompt, beam_size=3, max_new_tokens=8)
    beams_slow = beam_search(model, prompt, beam_size=3, max_new_tokens=8, use_cache=False)
    assert torch.equal(beams.sequences, beams_slow.sequences)


# ------------------------------------------------------------------------------------------------
# mu-law companding
# ------------------------------------------------------------------------------------------------


def test_mu_law_encode_formula_and_endpoints():
    x = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    q = mu_law_encode(x)
    f = torch.sign(x) * torch.log(1 + 255 * x.abs()) / math.log(256)
    assert torch.equal(q, torch.round((f + 1) / 2 * 255).long())
    assert (q[0].item(), mu_law_encode(torch.zeros(1)).item(), q[-1].item()) == (0, 128, 255)
    assert torch.all(q[1:] >= q[:-1])  # monotone
    assert q.dtype == torch.int64 and q.min() >= 0 and q.max() <= 255


def test_mu_law_round_trip():
    """decode(encode(x)) is x up to half a quantisation step in the companded domain: fine near 0, coarse near 1."""
    x = torch.linspace(-1, 1, 2001)
    y = mu_law_decode(mu_law_encode(x))
    f = lambda v: torch.sign(v) * torch.log1p(255 * v.abs()) / math.log(256)  # noqa: E731
    assert (f(y) - f(x)).abs().max() <= 1 / 255 + 1e-6
    levels = torch.arange(256)
    assert torch.equal(mu_law_encode(mu_law_decode(levels)), levels)  # decode then encode is exact
    assert mu_law_decode(torch.tensor([0, 255])).tolist() == pytest.approx([-1.0, 1.0])
    assert torch.equal(mu_law_encode(x, levels=16), mu_law_encode(mu_law_decode(mu_law_encode(x, 16), 16), 16))


def test_mu_law_errors():
    with pytest.raises(DataError, match=r"audio must lie in \[-1, 1\]; got values up to \|x\| = 1.5"):
        mu_law_encode(torch.tensor([0.0, 1.5]))
    with pytest.raises(DataError, match="floating-point"):
        mu_law_encode(torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"levels_ids must be in \[0, 256\), got 0..256"):
        mu_law_decode(torch.tensor([0, 256]))
    with pytest.raises(DataError, match="integer tensor"):
        mu_law_decode(torch.tensor([0.5]))
    with pytest.raises(ConfigError, match="levels=1 must be >= 2"):
        mu_law_encode(torch.zeros(2), levels=1)


# ------------------------------------------------------------------------------------------------
# bad configs and inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kernel_size=0), "kernel_size=0 must be > 0"),
        (dict(layers_per_stack=0), "layers_per_stack=0 must be > 0"),
        (dict(layers_per_stack=40), "layers_per_stack=40 must be <= 30"),
        (dict(n_stacks=-1), "n_stacks=-1 must be > 0"),
        (dict(vocab_size=1), "vocab_size=1 must be >= 2"),
        (dict(residual_channels=2.5), "residual_channels=2.5 must be an integer"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        WaveNetConfig(**overrides)
    with pytest.raises(ConfigError, match="did you mean 'n_stacks'"):
        WaveNetConfig.from_dict({"n_stack": 2})


def test_bad_inputs():
    model = small(**CONFIGS[0])
    with pytest.raises(ShapeError, match=r"input_ids must be a \[B, N\] tensor of levels, got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ShapeError, match="integer levels"):
        model(torch.zeros(1, 5))
    with pytest.raises(ShapeError, match=r"level 16, outside \[0, vocab_size=16\)"):
        model(torch.tensor([[1, 16]]))
    with pytest.raises(ShapeError, match=r"level -1"):
        model(torch.tensor([[-1, 2]]))
    cache = model.new_cache()
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match="cache holds batch 2 but input_ids has batch 3"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ShapeError, match="ConvCache of this model's 6 layers"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=small(**CONFIGS[2]).new_cache())
    with pytest.raises(ConfigError, match="WaveNet takes no padding"):
        model.decoder_step(attention_mask=torch.tensor([[0, 1, 1]]))


def test_config_json_round_trip():
    config = get_config("wavenet-small", dropout=0.1)
    assert WaveNetConfig.from_json(config.to_json()) == config


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def sine_levels(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """mu-law levels of sine waves with random frequencies and phases, ``[batch, length]``."""
    g = torch.Generator().manual_seed(seed)
    freq = 0.02 + 0.08 * torch.rand(batch, 1, generator=g)
    phase = 2 * math.pi * torch.rand(batch, 1, generator=g)
    audio = 0.8 * torch.sin(2 * math.pi * freq * torch.arange(length) + phase)
    return mu_law_encode(audio)


def test_wavenet_small_trains_a_few_steps():
    """The lm task: logits[:, t] predicts sample t + 1. Loss starts near ln 256 and falls."""
    torch.manual_seed(0)
    model = build_model("wavenet-small").train()
    ids = sine_levels(8, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(256), abs=0.5)
    assert losses[-1] < 0.7 * losses[0], losses
