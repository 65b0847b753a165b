"""Analysis of a model from its shapes: parameters by component (``params``), forward FLOPs by component
(``flops``), and the memory of attention scores, KV caches and training activations (``memory``); and of
measured losses: power-law (scaling-law) fits (``scaling``).

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
from archlab.analysis.scaling import PowerLawFit, fit_power_law

__all__ = [
    "FlopCounter", "FlopReport", "ParamReport", "ParamRow", "PowerLawFit", "attention_bytes", "count_flops",
    "count_parameters", "dtype_bytes", "fit_power_law", "human", "kv_cache_bytes", "score_matrix_bytes",
    "training_activation_bytes",
]  # fmt: skip
