r"""Dropout that costs nothing when it does nothing.

``nn.Dropout`` in eval mode (or with ``p = 0``) still dispatches an ``aten::dropout`` call that returns its input.
A decoding step of a 30-layer decoder passes three dropouts a layer, 91 calls a token: op count, not arithmetic,
is what a one-row step spends its time on. :class:`Dropout` returns ``x`` itself in that case and is
``nn.Dropout`` (same ``p``, same training behaviour, no parameters) otherwise.
"""

from __future__ import annotations

from torch import Tensor, nn


class Dropout(nn.Dropout):
    """``nn.Dropout(p)``; ``[...] -> [...]``. In eval mode or with ``p = 0`` the input is returned as it is (no op)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return super().forward(x)
