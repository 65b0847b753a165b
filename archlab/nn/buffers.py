"""Buffers that keep their dtype when the module's dtype changes.

``model.bfloat16()`` / ``model.to(dtype)`` cast every floating buffer. Some are constants whose dtype is part of
their meaning: RoPE's float64 frequencies and ALiBi's slopes (:mod:`archlab.nn.positional`), a quantized layer's
float32 scales, which its kernel reads as they are (:mod:`archlab.quant`). A module that subclasses
:class:`KeptDtypeBuffers` names them (:meth:`KeptDtypeBuffers._kept_dtype_buffers`); a dtype change leaves them as
they were, a device move applies to them.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class KeptDtypeBuffers(nn.Module):
    """``_apply`` (``.to``, ``.float()``, ``.bfloat16()``, ``.cuda()``, ...) keeps the dtype of the buffers
    :meth:`_kept_dtype_buffers` names, and moves them to the device the call moves the rest to."""

    def _kept_dtype_buffers(self) -> Iterable[str]:
        """The names of the buffers (of this module, not its children) whose dtype a dtype change leaves alone."""
        return ()

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self._kept_dtype_buffers() if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            now = self._buffers[name]
            if now is not None and now.dtype != before.dtype:
                self._buffers[name] = before.to(device=now.device)
        return self
