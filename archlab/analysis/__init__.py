"""Analysis of a model from its shapes: parameters by component (``params``), forward FLOPs by component
(``flops``), and the memory of attention scores, KV caches and training activations (``memory``).

Counts read shapes only: give them a model built on the ``meta`` device and nothing is allocated or
computed (a forward that reads tensor values, such as a data-dependent branch, cannot run there).
"""

from archlab.analysis.flops import FlopCounter, FlopReport, count_flops
from archlab.analysis.memory import (
    attention_bytes,
    dtype_bytes,
    kv_cache_bytes,
    score_matrix_bytes,
    training_activation_bytes,
)
from archlab.analysis.params import ParamReport, ParamRow, count_parameters, human

__all__ = [
    "FlopCounter", "FlopReport", "ParamReport", "ParamRow", "attention_bytes", "count_flops", "count_parameters",
    "dtype_bytes", "human", "kv_cache_bytes", "score_matrix_bytes", "training_activation_bytes",
]  # fmt: skip
