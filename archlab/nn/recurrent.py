r"""Recurrent building blocks: the RNN, LSTM and GRU cells written out, and PyTorch's fused layers.

Notation: batch ``B``, sequence length ``N``, input width ``d_in``, hidden width ``H``; ``x_t [B, d_in]``
is the input at step ``t`` and ``h_t [B, H]`` the hidden state (``c_t`` the LSTM's cell state).

The three cells (equations and gate order exactly as PyTorch's, so weights copy over)::

    RNN   h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)

    LSTM  [i; f; g; o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh        four blocks of H rows
          i, f, o = sigmoid(.)   g = tanh(.)                         input, forget, output gates; candidate
          c_t = f * c_{t-1} + i * g
          h_t = o * tanh(c_t)

    GRU   [r; z; n] rows of W_ih x_t + b_ih  and of  W_hh h_{t-1} + b_hh
          r = sigmoid(x_r + h_r)   z = sigmoid(x_z + h_z)            reset and update gates
          n = tanh(x_n + r * h_n)                                    candidate (reset acts after W_hn)
          h_t = (1 - z) * n + z * h_{t-1}

``weight_ih [G H, d_in]``, ``weight_hh [G H, H]``, ``bias_ih [G H]``, ``bias_hh [G H]`` with ``G`` = 1, 4, 3
gate blocks. One equation lives in one function (:func:`rnn_step`, :func:`lstm_step`, :func:`gru_step`);
the cell modules (:class:`RNNCell`, :class:`LSTMCell`, :class:`GRUCell`) and the stacked
:class:`RecurrentStack` call it. :func:`run_cell` runs any cell over a sequence.

For speed, :func:`build_rnn` returns PyTorch's fused ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``
(``batch_first=True``); ``fused=False`` gives the :class:`RecurrentStack` written out here, with the
same parameter names (``weight_ih_l0``, ``weight_hh_l1_reverse``, ...), so one ``state_dict`` loads into
either. :func:`run_rnn` runs both over right-padded batches.

Training recurrent nets (notes, section 2.2): gradients explode or vanish through the ``N`` steps; "always
start with gradient clipping and gated cells (GRU / LSTM)". The clipping is the trainer's job: the RNN
language model's config carries the recommended max-norm (``RNNConfig.grad_clip``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from archlab.config import check_choice, check_positive, check_probability
from archlab.errors import ConfigError, ShapeError

#: A cell's state: ``h [B, H]`` (RNN, GRU) or ``(h, c)`` (LSTM). Stacks use ``[L D, B, H]`` tensors.
State = Tensor | tuple[Tensor, Tensor]

RECURRENT_KINDS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # G: blocks of H rows in weight_ih / weight_hh


# ================================================================================================
# The three equations
# ================================================================================================


def rnn_step(
    x: Tensor, h: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> Tensor:
    """Elman RNN: ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; ``x [B, d_in]``, ``h [B, H]`` (None: zeros)."""
    if h is None:
        h = x.new_zeros(x.shape[0], w_hh.shape[1])
    return torch.tanh(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh))


def lstm_step(
    x: Tensor, state: tuple[Tensor, Tensor] | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> tuple[Tensor, Tensor]:
    """LSTM: gates ``i, f, g, o`` (PyTorch's order); ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``.

    ``x [B, d_in]``, ``state = (h, c)`` each ``[B, H]`` (None: zeros) -> ``(h_t, c_t)``.
    """
    if state is None:
        zeros = x.new_zeros(x.shape[0], w_hh.shape[1])
        state = (zeros, zeros)
    h, c = state
    i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_step(
    x: Tensor, h: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
) -> Tensor:
    """GRU: ``r, z`` gates, candidate ``n = tanh(x_n + r * h_n)``, ``h_t = (1 - z) n + z h_{t-1}``.

    ``x_* = W_i* x_t + b_i*`` and ``h_* = W_h* h_{t-1} + b_h*`` (the reset gate multiplies ``h_n`` after
    its matmul and bias, as in PyTorch and cuDNN). ``x [B, d_in]``, ``h [B, H]`` (None: zeros).
    """
    if h is None:
        h = x.new_zeros(x.shape[0], w_hh.shape[1])
    x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


STEPS: dict[str, Callable] = {"rnn": rnn_step, "lstm": lstm_step, "gru": gru_step}


def _init_uniform(module: nn.Module, hidden_size: int) -> None:
    """PyTorch's recurrent init: every weight and bias ``U(-1/sqrt(H), 1/sqrt(H))``."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        for p in module.parameters():
            nn.init.uniform_(p, -bound, bound)


# ================================================================================================
# Cells
# ================================================================================================


class _Cell(nn.Module):
    """One recurrent cell; parameters and call signature as ``torch.nn.<Kind>Cell``."""

    kind = ""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True):
        super().__init__()
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        self.input_size, self.hidden_size = input_size, hidden_size
        rows = GATES[self.kind] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(rows)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(rows)) if bias else None
        _init_uniform(self, hidden_size)

    def forward(self, x: Tensor, state: State | None = None) -> State:
        """``x [B, d_in]`` and the previous state (None: zeros) -> the next state."""
        if x.ndim != 2 or x.shape[-1] != self.input_size:
            raise ShapeError(f"{type(self).__name__}: x must be [B, d_in={self.input_size}], got {tuple(x.shape)}")
        _check_state(type(self).__name__, state, self.kind, (x.shape[0], self.hidden_size))
        return STEPS[self.kind](x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}"


class RNNCell(_Cell):
    """``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``; state ``h [B, H]``. Twin of ``torch.nn.RNNCell``."""

    kind = "rnn"


class LSTMCell(_Cell):
    """``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``; state ``(h, c)``. Twin of ``torch.nn.LSTMCell``."""

    kind = "lstm"


class GRUCell(_Cell):
    """``h_t = (1 - z) n + z h_{t-1}``; state ``h [B, H]``. Twin of ``torch.nn.GRUCell``."""

    kind = "gru"


CELLS: dict[str, type[_Cell]] = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}
_TORCH_CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


def build_cell(kind: str, input_size: int, hidden_size: int, *, bias: bool = True, fused: bool = True) -> nn.Module:
    """A single cell: PyTorch's ``nn.<Kind>Cell`` (``fused``, one C++ kernel per step) or archlab's twin."""
    check_choice("kind", kind, RECURRENT_KINDS)
    if fused:
        check_positive("input_size", input_size)
        check_positive("hidden_size", hidden_size)
        return _TORCH_CELLS[kind](input_size, hidden_size, bias=bias)
    return CELLS[kind](input_size, hidden_size, bias=bias)


def _check_state(owner: str, state, kind: str, shape: tuple[int, ...]) -> None:
    if state is None:
        return
    parts = state if kind == "lstm" else (state,)
    ok = (kind == "lstm") == isinstance(state, tuple) and len(parts) == (2 if kind == "lstm" else 1)
    if not ok or any(not isinstance(p, Tensor) or tuple(p.shape) != shape for p in parts):
        want = f"(h, c), each {list(shape)}" if kind == "lstm" else f"h {list(shape)}"
        got = [tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__ for p in (parts if ok else [state])]
        raise ShapeError(f"{owner}: state must be {want}, got {', '.join(map(str, got))}")


# ================================================================================================
# Running a cell over a sequence
# ================================================================================================


def _hidden(state: State) -> Tensor:
    return state[0] if isinstance(state, tuple) else state


def _keep(mask_t: Tensor, new: State, old: State) -> State:
    """Per row: the new state where ``mask_t [B]`` is True, the old one where it is False (padding)."""
    m = mask_t[:, None]
    if isinstance(new, tuple):
        return tuple(torch.where(m, n, o) for n, o in zip(new, old, strict=True))
    return torch.where(m, new, old)


def run_cell(
    cell: Callable[[Tensor, State | None], State],
    inputs: Tensor,
    state: State | None = None,
    *,
    mask: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, State]:
    r"""Unroll ``cell`` over ``inputs [B, N, d_in]``: ``h_t = cell(x_t, h_{t-1})`` for ``t = 1..N``.

    Args:
        cell: ``(x_t [B, d_in], state or None) -> state``: an archlab or a ``torch.nn`` cell.
        state: the initial state (None: zeros).
        mask: ``[B, N]`` bool, True = real token. A padded step leaves the state unchanged and
            outputs zeros, so a right-padded row ends in the state of its last real token, in either
            direction: what ``pack_padded_sequence`` gives PyTorch's fused layers.
        reverse: run ``t = N..1`` (the backward direction of a bidirectional layer).

    Returns:
        ``outputs [B, N, H]`` (the hidden state after each step, at its own position) and the final state.
    """
    if inputs.ndim != 3:
        raise ShapeError(f"inputs must be [B, N, d_in], got {tuple(inputs.shape)}")
    b, n = inputs.shape[:2]
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (b, n) or mask.dtype != torch.bool):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(f"mask must be a bool [B, N] = [{b}, {n}] tensor (True = real token), got {got}")
    outputs: list[Tensor] = [None] * n  # type: ignore[list-item]
    for t in reversed(range(n)) if reverse else range(n):
        new = cell(inputs[:, t], state)
        if mask is None:
            state = new
            outputs[t] = _hidden(new)
        else:
            old = state if state is not None else _zeros_like(new)
            state = _keep(mask[:, t], new, old)
            outputs[t] = _hidden(new) * mask[:, t, None]
    return torch.stack(outputs, dim=1), state


def _zeros_like(state: State) -> State:
    return tuple(torch.zeros_like(s) for s in state) if isinstance(state, tuple) else torch.zeros_like(state)


# ================================================================================================
# Stacked (and bidirectional) layers: PyTorch's fused ones, and the same written out
# ================================================================================================


class RecurrentStack(nn.Module):
    r"""``num_layers`` recurrent layers, optionally bidirectional, written out with archlab's cells.

    The explicit twin of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` with ``batch_first=True``: same parameter
    names (``weight_ih_l{k}``, ``bias_hh_l{k}_reverse``, ...), same state layout and same outputs, so
    it reads the fused layer's ``state_dict`` and checks it. Layer ``k > 0`` reads layer ``k - 1``'s
    outputs ``[B, N, D H]`` (``D`` = 2 directions concatenated, or 1), after dropout when training.

    ``forward(x [B, N, d_in], state=None, *, lengths=None) -> (out [B, N, D H], state)``, the state
    ``h [L D, B, H]`` (LSTM: ``(h, c)``), row ``k D + direction``.
    """

    def __init__(
        self,
        kind: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ):
        super().__init__()
        check_choice("kind", kind, RECURRENT_KINDS)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            check_positive(name, value)
        check_probability("dropout", dropout)
        self.kind, self.input_size, self.hidden_size = kind, input_size, hidden_size
        self.num_layers, self.dropout, self.bidirectional = num_layers, dropout, bidirectional
        self.bias = bias
        self.num_directions = 2 if bidirectional else 1
        rows = GATES[kind] * hidden_size
        for layer in range(num_layers):
            d_in = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes(layer):
                self.register_parameter(f"weight_ih{suffix}", nn.Parameter(torch.empty(rows, d_in)))
                self.register_parameter(f"weight_hh{suffix}", nn.Parameter(torch.empty(rows, hidden_size)))
                for which in ("ih", "hh"):
                    self.register_parameter(f"bias_{which}{suffix}", nn.Parameter(torch.empty(rows)) if bias else None)
        _init_uniform(self, hidden_size)

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def cell(self, layer: int, reverse: bool = False) -> Callable[[Tensor, State | None], State]:
        """The step function of one layer and direction, bound to its parameters."""
        suffix = self._suffixes(layer)[int(reverse)]
        weights = [getattr(self, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return partial(_bound_step, STEPS[self.kind], weights)

    def forward(
        self, x: Tensor, state: State | None = None, *, lengths: Tensor | None = None
    ) -> tuple[Tensor, State]:
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ShapeError(f"RecurrentStack: x must be [B, N, d_in={self.input_size}], got {tuple(x.shape)}")
        b, n = x.shape[:2]
        rows = self.num_layers * self.num_directions
        _check_state("RecurrentStack", state, self.kind, (rows, b, self.hidden_size))
        if lengths is not None:
            check_lengths(lengths, x)
        mask = None if lengths is None else torch.arange(n, device=x.device)[None, :] < lengths.to(x.device)[:, None]
        finals: list[State] = []
        for layer in range(self.num_layers):
            if layer > 0 and self.training and self.dropout > 0:
                x = nn.functional.dropout(x, self.dropout, training=True)
            outs = []
            for direction in range(self.num_directions):
                row = layer * self.num_directions + direction
                start = None if state is None else _row(state, row)
                out, final = run_cell(self.cell(layer, bool(direction)), x, start, mask=mask, reverse=bool(direction))
                outs.append(out)
                finals.append(final)
            x = torch.cat(outs, dim=-1)
        if self.kind == "lstm":
            return x, (torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals]))
        return x, torch.stack(finals)

    def extra_repr(self) -> str:
        return (f"{self.kind}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}, bidirectional={self.bidirectional}")  # fmt: skip


def _bound_step(step: Callable, weights: list, x: Tensor, state: State | None) -> State:
    return step(x, state, *weights)


def _row(state: State, row: int) -> State:
    return (state[0][row], state[1][row]) if isinstance(state, tuple) else state[row]


_FUSED = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def build_rnn(
    kind: str,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    dropout: float = 0.0,
    bidirectional: bool = False,
    fused: bool = True,
) -> nn.Module:
    """A stack of recurrent layers, ``batch_first=True``: PyTorch's fused ``nn.RNN`` / ``nn.LSTM`` /
    ``nn.GRU`` (``fused``), or the :class:`RecurrentStack` written out here (same parameters, same outputs).

    ``dropout`` acts between layers (on every layer's output but the last), as in PyTorch.
    """
    check_choice("kind", kind, RECURRENT_KINDS)
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        check_positive(name, value)
    check_probability("dropout", dropout)
    if dropout > 0 and num_layers == 1:
        raise ConfigError(f"dropout={dropout} acts between recurrent layers, so it needs num_layers > 1 (got 1)")
    if fused:
        return _FUSED[kind](input_size, hidden_size, num_layers, dropout=dropout, bidirectional=bidirectional,
                            batch_first=True)  # fmt: skip
    return RecurrentStack(kind, input_size, hidden_size, num_layers, dropout=dropout, bidirectional=bidirectional)


def run_rnn(
    rnn: nn.Module, x: Tensor, state: State | None = None, *, lengths: Tensor | None = None
) -> tuple[Tensor, State]:
    """Run a :func:`build_rnn` stack over ``x [B, N, d_in]``; ``lengths [B]`` marks right padding.

    With ``lengths``, a fused layer runs on a packed sequence: padded steps neither change the state
    nor produce output (zeros at padded positions); the explicit stack masks the same steps.
    Returns ``(out [B, N, D H], state)``.
    """
    if lengths is None:
        return rnn(x, state)
    if isinstance(rnn, RecurrentStack):
        return rnn(x, state, lengths=lengths)
    check_lengths(lengths, x)
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = rnn(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, state


def check_lengths(lengths: Tensor, x: Tensor) -> None:
    """ShapeError unless ``lengths`` is an integer ``[B]`` tensor of lengths in ``[1, N]`` for ``x [B, N, d_in]`` (a
    fused layer would drop the rows past a shorter ``lengths``, and the explicit stack read a length past ``N`` as
    ``N``, a length 0 as a sequence without input)."""
    if x.ndim != 3:
        raise ShapeError(f"x must be [B, N, d_in] with lengths, got {tuple(x.shape)}")
    b, n = x.shape[:2]
    if not isinstance(lengths, Tensor) or tuple(lengths.shape) != (b,) or lengths.is_floating_point() \
            or lengths.dtype == torch.bool:  # fmt: skip
        got = (tuple(lengths.shape), lengths.dtype) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ShapeError(f"lengths must be an integer [B] = [{b}] tensor (each row's real tokens), got {got}")
    if b and not lengths.is_meta:
        low, high = (int(t) for t in torch.aminmax(lengths))
        if low < 1 or high > n:
            raise ShapeError(f"lengths holds {low if low < 1 else high}; each must be in [1, N={n}]")


def lengths_from_mask(mask: Tensor, name: str = "mask") -> Tensor:
    """``[B, N]`` right-padding mask (True / 1 = real token) -> ``lengths [B]``; checks its form.

    Each row must be real tokens then padding (``[1, 1, 1, 0, 0]``), with at least one real token:
    a recurrent layer reads tokens in order, so a hole or left padding would be read as input.
    """
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
            raise ShapeError(f"{name} must hold only True/1 (real token) and False/0 (padding), got dtype {mask.dtype}")
        mask = mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise ShapeError(f"{name} row {row} has no real token; every sequence needs at least one")
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask):
        row = int((prefix != mask).any(dim=1).nonzero()[0, 0])
        raise ShapeError(
            f"{name} row {row} is {mask[row].int().tolist()}: recurrent models need right padding "
            "(real tokens first, then padding)"
        )
    return lengths


# ================================================================================================
# The state carried between calls (incremental decoding)
# ================================================================================================


class RecurrentCache:
    """A recurrent model's state between calls, for :mod:`archlab.generation`.

    ``state``: a tensor or a tuple of tensors whose batch axis is ``batch_dim`` (``h [L, B, H]`` of
    a fused stack: 1; a decoder cell's ``s [B, H]``: 0); ``None`` before the first call. ``length``
    counts the tokens fed so far. Unlike a KV cache it does not grow: an RNN's memory is ``O(1)`` per token.
    """

    def __init__(self, batch_dim: int = 1):
        self.state: State | None = None
        self.length = 0
        self.batch_dim = batch_dim

    def update(self, state: State, n_new: int) -> None:
        self.state, self.length = state, self.length + n_new

    def batch_size(self) -> int | None:
        return None if self.state is None else _hidden(self.state).shape[self.batch_dim]

    def reorder(self, index: Tensor) -> None:
        """Beam search: batch row ``b`` becomes old row ``index[b]``."""
        if self.state is None:
            return
        pick = partial(torch.index_select, dim=self.batch_dim, index=index)
        self.state = tuple(pick(s) for s in self.state) if isinstance(self.state, tuple) else pick(self.state)
