"""Tests of ``archlab.analysis.memory``: exact arithmetic, and estimates checked against what really happens.

What is checked against what:

* Lesson 8 card 3: the score matrix of 100K tokens in float32 is 100K^2 x 4 B = 40 GB (4e10 bytes)
  per head and batch item; the card's "40 TB" is a spec error.
* Scaling of each backend's working set: quadratic for ``math``, at most 2.2x per doubling for the
  memory-saving ones, and the naive peak against the peak RSS really measured in a child process.
* KV cache bytes against the tensors a real decoding cache holds (gpt-nano), and the GPT-2 small figure.
* The training-activation estimate within 20% of the bytes autograd really saves for archlab's GPT
  (sdpa and math backends, with and without dropout).
* Bad arguments raise ConfigError naming them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from archlab.analysis.memory import (
    attention_bytes,
    dtype_bytes,
    kv_cache_bytes,
    score_matrix_bytes,
    training_activation_bytes,
)
from archlab.errors import ConfigError
from archlab.models import build_model, get_config
from archlab.models.transformer import TransformerConfig


def test_card3_score_matrix_of_100k_tokens_is_40_gigabytes_not_terabytes():
    assert score_matrix_bytes(100_000) == 40 * 10**9  # 1e10 entries x 4 bytes
    assert score_matrix_bytes(100_000) < 10**12  # not 40 TB
    assert score_matrix_bytes(100_000, heads=8, batch=2, dtype="bf16") == 2 * 8 * 10**10 * 2
    assert score_matrix_bytes(10, 30, dtype=torch.float64) == 10 * 30 * 8


def test_dtype_bytes_by_name_and_dtype():
    assert [dtype_bytes(x) for x in ("float32", "fp16", "bf16", "float64", torch.int8)] == [4, 2, 2, 8, 1]


def per_doubling(backend: str, n: int) -> float:
    return attention_bytes(backend, 2 * n) / attention_bytes(backend, n)


@pytest.mark.parametrize(
    "backend",
    ["sdpa", "chunked", "sliding:window=512", "bigbird", "linformer:rank=256,max_len=200000", "performer", "linear"],
)
def test_memory_saving_backends_grow_at_most_2_2x_per_doubling(backend):
    for n in (1024, 8192, 65536):
        assert 1.0 < per_doubling(backend, n) <= 2.2
    assert attention_bytes(backend, 100_000) < 4 * 10**9  # 100K tokens, 8 heads: well under 24 GiB


def test_naive_attention_grows_quadratically_and_cannot_hold_100k_tokens():
    assert per_doubling("math", 8192) == pytest.approx(4.0, rel=0.01)
    assert attention_bytes("math", 100_000) > 3 * score_matrix_bytes(100_000, heads=8)  # > 900 GB
    assert attention_bytes("math", 4096, causal=False) < attention_bytes("math", 4096, causal=True)


CHILD = """
import json, re, sys, torch
from pathlib import Path
from archlab.nn import attend
torch.set_num_threads(1)
n, backend = int(sys.argv[1]), sys.argv[2]
q, k, v = (torch.randn(1, 2, n, 64) for _ in range(3))
status = lambda key: int(re.search(key + r':\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1)) * 1024
Path('/proc/self/clear_refs').write_text('5')
base = status('VmRSS')
with torch.no_grad():
    out = attend(q, k, v, causal=True, backend=backend)
print(json.dumps(status('VmHWM') - base))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS read from /proc (Linux)")
def test_naive_prediction_matches_the_peak_memory_measured_in_a_child_process():
    n = 2048  # scores [1, 2, 2048, 2048] float32 = 32 MiB each
    done = subprocess.run([sys.executable, "-c", CHILD, str(n), "math"], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    predicted = attention_bytes("math", n, heads=2)
    assert 0.85 * predicted <= measured <= 1.25 * predicted, (measured, predicted)


@pytest.mark.parametrize("d_k", [None, 4])  # d_k = d / A = 16 (keys and values alike), or keys of 4, values of 16
def test_kv_cache_bytes_equal_what_a_decoding_cache_holds(d_k):
    torch.manual_seed(0)
    model = build_model("gpt-nano", d_k=d_k)
    cache = model.new_cache()
    model(torch.randint(0, 256, (2, 20)), cache=cache)
    held = sum(b.self_attn.keys.nbytes + b.self_attn.values.nbytes for b in cache.blocks)
    assert held == kv_cache_bytes(model.config, batch=2, length=20, dtype=torch.float32)
    # GPT-2 small, one 1,024-token sequence in fp16: 2 x 12 layers x 1024 x 768 x 2 bytes
    assert kv_cache_bytes(get_config("gpt2-small"), batch=1, length=1024, dtype="fp16") == 37_748_736


def saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for backward in one LM forward + loss (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(b for ptr, b in seen.items() if ptr not in params)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("dropout, attn_dropout", [(0.0, 0.0), (0.1, 0.0), (0.1, 0.1)])
def test_training_activation_estimate_within_20_percent_of_what_autograd_saves(backend, dropout, attn_dropout):
    torch.manual_seed(0)
    config = get_config(
        "gpt-mini", vocab_size=1000, n_layers=2, backend=backend, dropout=dropout, attn_dropout=attn_dropout
    )
    model = build_model(config).train()
    ids = torch.randint(0, 1000, (2, 128))
    measured = saved_activation_bytes(model, ids)
    predicted = training_activation_bytes(config, batch=2, seq_len=128)
    assert 0.8 * measured <= predicted <= 1.2 * measured, (measured, predicted)


@pytest.mark.parametrize("n_kv_heads", [1, 3, 9])
def test_activation_estimate_with_grouped_query_attention_and_swiglu(n_kv_heads):
    torch.manual_seed(0)
    config = get_config("smollm2-135m", vocab_size=1000, n_layers=2, max_len=256, n_kv_heads=n_kv_heads)
    model = build_model(config).train()
    ids = torch.randint(0, 1000, (2, 128))
    measured = saved_activation_bytes(model, ids)
    predicted = training_activation_bytes(config, batch=2, seq_len=128)
    assert 0.8 * measured <= predicted <= 1.2 * measured, (measured, predicted)


def test_activation_estimate_grows_as_expected():
    c = get_config("gpt2-small")
    small = training_activation_bytes(c, batch=1, seq_len=512, backend="sdpa")
    assert training_activation_bytes(c, batch=4, seq_len=512, backend="sdpa") == 4 * small  # linear in B
    # math keeps the N x N weights: grows faster than linearly in N
    ratio = training_activation_bytes(c, batch=1, seq_len=1024, backend="math") / training_activation_bytes(
        c, batch=1, seq_len=512, backend="math"
    )
    assert ratio > 2.5
    assert training_activation_bytes(TransformerConfig(), batch=1, seq_len=16) > 0  # other families too


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dtype_bytes("float33"), r"unknown dtype 'float33' \(did you mean 'float32'\?\)"),
        (lambda: score_matrix_bytes(-1), r"n=-1 must be an integer >= 0"),
        (lambda: attention_bytes("chunked:block=0", 10), r"block='0'"),
        (lambda: attention_bytes("math", 10, heads=2.5), r"heads=2.5 must be an integer"),
        (lambda: kv_cache_bytes(object(), batch=1, length=1), r"object is not a Transformer config"),
    ],
)
def test_bad_arguments_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_a_config_class_and_sizes_of_zero_that_price_nothing_are_refused():
    with pytest.raises(ConfigError, match=r"TransformerConfig is a config class; pass a config, e\.g\. Transf"):
        kv_cache_bytes(TransformerConfig, batch=1, length=8)
    with pytest.raises(ConfigError, match="TransformerConfig is a config class"):
        training_activation_bytes(TransformerConfig, batch=1, seq_len=8)
    for name in ("heads", "d_k", "d_v", "threads"):
        with pytest.raises(ConfigError, match=f"{name}=0 must be >= 1"):
            attention_bytes("sdpa", 16, **{name: 0})
    assert attention_bytes("sdpa", 0) > 0 and score_matrix_bytes(16, batch=0) == 0  # empty inputs stay allowed
    with pytest.raises(ConfigError, match=r"causal='no' must be True or False"):  # a non-empty string read as True
        attention_bytes("math", 16, causal="no")
