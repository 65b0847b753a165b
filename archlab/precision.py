"""Which float precision a run computes in, chosen from the machine: one rule for training and inference.

``precision`` is one of :data:`PRECISIONS`:

* ``auto``: bf16 where the device computes it natively (a CPU with AMX or AVX512-BF16 and its kernels not
  capped below AVX-512; a GPU with bf16), fp32 where bf16 would be emulated through fp32 (an AVX2-only CPU:
  slower than fp32 itself). :func:`archlab.hardware.native_bf16` answers the question.
  ``auto`` changes only float32 weights: a float64 model (a reference computation) stays float64.
* ``fp32`` / ``bf16``: as asked, whatever the machine (bf16 on an AVX2 CPU runs, emulated and slower).

What bf16 means: training keeps fp32 master weights and AdamW state and casts the weights to bf16 once per
step (:mod:`archlab.train.mixed`); inference loaders (:func:`archlab.chat.load_chat_model`,
:func:`archlab.interop.sentence.load_sentence_encoder`) convert the weights to bf16.

:func:`choose_precision` decides; :func:`announce` prints its line once per process (stderr).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from archlab import hardware
from archlab.config import check_choice

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The outcome: ``name`` (``fp32 | bf16``), the ``requested`` value and the ``reason`` (a phrase)."""

    name: str
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """``torch.float32`` / ``torch.bfloat16``; None when auto keeps the weights' own dtype (float64)."""
        return DTYPES.get(self.name)

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def line(self, what: str) -> str:
        """``precision=auto: training in bf16 (the CPU has AMX bf16 tiles)``; ``what`` names the activity."""
        return f"precision={self.requested}: {what} in {self.name} ({self.reason})"


def choose_precision(
    precision: str, device: torch.device | str = "cpu", weights: torch.dtype = torch.float32, *, given: str = "as asked"
) -> PrecisionChoice:
    """``auto | fp32 | bf16`` on ``device`` for a model whose ``weights`` have this dtype -> the
    :class:`PrecisionChoice` (see the module docstring). ``given``: why an fp32 / bf16 request holds (a user's: "as
    asked"; a search index's recorded precision: "the index's precision")."""
    check_choice("precision", precision, PRECISIONS)
    native, why = hardware.native_bf16(device)
    if precision == "fp32":
        return PrecisionChoice("fp32", precision, given)
    if precision == "bf16":
        return PrecisionChoice("bf16", precision, f"{given}; {why}" + ("" if native else ", slower than fp32"))
    if weights != torch.float32:  # auto: float64 (or already bf16) weights are kept as they are
        name = str(weights).removeprefix("torch.")
        return PrecisionChoice(name, precision, f"the weights are {name}; auto changes only float32 ones")
    return PrecisionChoice("bf16" if native else "fp32", precision, why)


_ANNOUNCED: set[str] = set()


def announce(line: str) -> None:
    """Print ``archlab: <line>`` to stderr, once per process for each distinct line."""
    if line not in _ANNOUNCED:
        _ANNOUNCED.add(line)
        print(f"archlab: {line}", file=sys.stderr)
