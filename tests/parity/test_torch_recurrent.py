"""archlab's written-out recurrent cells and stacks (``archlab/nn/recurrent.py``) against PyTorch's.

Weights are copied from the PyTorch module (random ``U(-1, 1)`` values, larger than the default init
so the gates saturate and differ from one another), both run in float64; max abs error <= 1e-10:

* ``RNNCell`` / ``LSTMCell`` / ``GRUCell`` vs ``torch.nn.RNNCell`` / ``LSTMCell`` / ``GRUCell``: one step,
  from zeros and from a given state, with and without biases; and whole sequences through ``run_cell``;
* ``RecurrentStack`` vs ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (``batch_first=True``): 1 and 3 layers, one
  and two directions, with an initial state, and on right-padded batches (PyTorch on a packed
  sequence, archlab with a mask), outputs, final states and gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from archlab.nn.recurrent import CELLS, RecurrentStack, build_rnn, run_cell, run_rnn

F64 = torch.float64
TOL = 1e-10
TORCH_CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
KINDS = ["rnn", "lstm", "gru"]


def randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1)
    return module


def max_err(a, b) -> float:
    if isinstance(a, tuple):
        return max(max_err(x, y) for x, y in zip(a, b, strict=True))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_step_equals_torch_cell(kind, bias):
    ref = randomize(TORCH_CELLS[kind](5, 7, bias=bias).to(F64), seed=1)
    mine = CELLS[kind](5, 7, bias=bias).to(F64)
    mine.load_state_dict(ref.state_dict())  # same names, same shapes: weight_ih, weight_hh, bias_ih, bias_hh
    x = torch.randn(4, 5, dtype=F64)
    assert max_err(mine(x), ref(x)) <= TOL  # from zeros
    h, c = torch.randn(4, 7, dtype=F64), torch.randn(4, 7, dtype=F64)
    state = (h, c) if kind == "lstm" else h
    out, expected = mine(x, state), ref(x, state)
    assert max_err(out, expected) <= TOL
    assert max_err(out, ref(x)) > 1e-3  # the state matters: the comparison above can fail


@pytest.mark.parametrize("kind", KINDS)
def test_cell_over_a_sequence_equals_torch_cell_unrolled(kind):
    ref = randomize(TORCH_CELLS[kind](3, 6).to(F64), seed=2)
    mine = CELLS[kind](3, 6).to(F64)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 3, dtype=F64)
    out_mine, final_mine = run_cell(mine, x)
    state, outs = None, []
    for t in range(9):
        state = ref(x[:, t], state)
        outs.append(state[0] if kind == "lstm" else state)
    assert max_err(out_mine, torch.stack(outs, 1)) <= TOL
    assert max_err(final_mine, state) <= TOL
    # run_cell drives a torch cell identically
    out_ref, _ = run_cell(ref, x)
    assert max_err(out_mine, out_ref) <= TOL


def _stack_pair(kind: str, layers: int, bidirectional: bool, seed: int):
    fused = randomize(build_rnn(kind, 4, 5, num_layers=layers, bidirectional=bidirectional).to(F64), seed)
    explicit = RecurrentStack(kind, 4, 5, layers, bidirectional=bidirectional).to(F64)
    explicit.load_state_dict(fused.state_dict())  # strict: every name matches
    return fused, explicit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (3, False), (1, True), (3, True)])
def test_stack_equals_torch_fused_layer(kind, layers, bidirectional):
    fused, explicit = _stack_pair(kind, layers, bidirectional, seed=3)
    x = torch.randn(3, 7, 4, dtype=F64)
    rows = layers * (2 if bidirectional else 1)
    h0 = torch.randn(rows, 3, 5, dtype=F64)
    state = (h0, torch.randn(rows, 3, 5, dtype=F64)) if kind == "lstm" else h0
    for start in (None, state):
        out_f, fin_f = fused(x, start)
        out_e, fin_e = explicit(x, start)
        assert out_e.shape == (3, 7, 5 * (2 if bidirectional else 1))
        assert max_err(out_e, out_f) <= TOL
        assert max_err(fin_e, fin_f) <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_stack_on_padded_batch_equals_packed_torch_layer_with_gradients(kind):
    fused, explicit = _stack_pair(kind, 2, True, seed=4)
    x = torch.randn(3, 6, 4, dtype=F64)
    lengths = torch.tensor([6, 2, 4])
    x_f, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, fin_f = run_rnn(fused, x_f, lengths=lengths)  # pack_padded_sequence
    out_e, fin_e = run_rnn(explicit, x_e, lengths=lengths)  # masked steps
    assert max_err(out_e, out_f) <= TOL
    assert max_err(fin_e, fin_f) <= TOL
    assert torch.all(out_e[1, 2:] == 0) and torch.all(out_e[2, 4:] == 0)  # no output at padding
    weights = torch.randn_like(out_f)
    loss_f = (out_f * weights).sum() + sum(s.sum() for s in (fin_f if isinstance(fin_f, tuple) else (fin_f,)))
    loss_e = (out_e * weights).sum() + sum(s.sum() for s in (fin_e if isinstance(fin_e, tuple) else (fin_e,)))
    loss_f.backward()
    loss_e.backward()
    assert max_err(x_e.grad, x_f.grad) <= TOL
    assert torch.all(x_e.grad[1, 2:] == 0)  # padded inputs never reach anything
    for (name, p_f), p_e in zip(fused.named_parameters(), explicit.parameters(), strict=True):
        assert max_err(p_e.grad, p_f.grad) <= TOL, name
