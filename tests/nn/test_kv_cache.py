"""``KVCache.reorder`` (beam search) after the cache has grown: exact values, the doubling capacity kept,
only the positions in use copied; beam search over a cache that grows and reorders equals beam search
without a cache."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from archlab.generation import beam_search
from archlab.models.gpt import GPT, GPTConfig
from archlab.nn import KVCache

A, D_K, D_V = 2, 3, 5


def chunk(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, A, n, D_K, generator=g, dtype=torch.float64), torch.randn(
        b, A, n, D_V, generator=g, dtype=torch.float64
    )


def capacity(cache: KVCache) -> int:
    return cache._k.shape[-2]


class ElementsWritten(TorchDispatchMode):
    """Counts the elements each op writes (its outputs), skipping views and allocations."""

    def __init__(self):
        super().__init__()
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        is_view = func._schema.name.split("::")[-1] in ("slice", "select", "view", "alias", "as_strided")
        if not is_view and "empty" not in func._schema.name:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.written += t.numel()
        return out


def test_reorder_after_growth_keeps_values_exactly_and_the_capacity():
    cache, keys, values = KVCache(), [], []
    for step, n in enumerate([10, 9, 7, 15]):  # 10 -> capacity 16; 19 -> 32; 26; 41 -> 64
        k, v = chunk(3, n, seed=step)
        cache.append(k, v)
        keys.append(k), values.append(v)
    all_k, all_v = torch.cat(keys, dim=-2), torch.cat(values, dim=-2)
    assert len(cache) == 41 and capacity(cache) == 64  # grew by doubling
    index = torch.tensor([2, 0, 0, 1])  # beam expansion 3 -> 4 rows, a row repeated
    cache.reorder(index)
    assert torch.equal(cache.keys, all_k[index]) and torch.equal(cache.values, all_v[index])
    assert capacity(cache) == 64  # the spare capacity stays: the next appends copy nothing old
    storage = cache._k.data_ptr()
    k, v = chunk(4, 20, seed=9)  # 61 <= 64: written in place
    got_k, got_v = cache.append(k, v)
    assert cache._k.data_ptr() == storage
    assert torch.equal(got_k, torch.cat([all_k[index], k], dim=-2))
    assert torch.equal(got_v, torch.cat([all_v[index], v], dim=-2))
    shrink = torch.tensor([3, 1])  # and back down to 2 rows, then growth past 64 again
    cache.reorder(shrink)
    k2, v2 = chunk(2, 10, seed=10)
    got_k, got_v = cache.append(k2, v2)
    assert len(cache) == 71 and capacity(cache) == 128
    assert torch.equal(got_k, torch.cat([all_k[index][shrink], k[shrink], k2], dim=-2))
    assert torch.equal(got_v, torch.cat([all_v[index][shrink], v[shrink], v2], dim=-2))


def test_reorder_copies_the_positions_in_use_only():
    cache = KVCache()
    cache.append(*chunk(3, 40, seed=0))  # capacity 40 ...
    cache.append(*chunk(3, 1, seed=1))  # ... doubled to 80, 41 in use
    assert capacity(cache) == 80
    index = torch.tensor([1, 2, 0, 0])
    with ElementsWritten() as counter:
        cache.reorder(index)
    assert counter.written == 4 * A * 41 * (D_K + D_V)  # not 4 * A * 80 * (D_K + D_V)


def test_reorder_of_an_empty_or_cropped_cache():
    cache = KVCache()
    cache.reorder(torch.tensor([0, 0]))  # nothing stored yet: nothing to do
    assert cache.keys is None and len(cache) == 0
    k, v = chunk(2, 12, seed=3)
    cache.append(k, v)
    cache.crop(5)
    cache.reorder(torch.tensor([1, 1, 0]))
    assert torch.equal(cache.keys, k[[1, 1, 0], :, :5]) and torch.equal(cache.values, v[[1, 1, 0], :, :5])


def test_reorder_under_autograd_keeps_gradients():
    """Training-time caches (appends out of place) reorder with autograd, not with an out= copy."""
    k, v = chunk(2, 4, seed=4)
    k.requires_grad_(True)
    cache = KVCache()
    cache.append(k, v)
    cache.reorder(torch.tensor([1, 1]))
    cache.keys.sum().backward()
    assert torch.equal(k.grad, torch.tensor([0.0, 2.0], dtype=torch.float64)[:, None, None, None].expand_as(k))


def test_beam_search_over_a_growing_reordered_cache_equals_no_cache():
    """45 positions: every layer's cache grows 16 -> 32 -> 64 while beams are re-ranked at each step."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=23, max_len=64, d_model=32, n_heads=4, n_layers=2, dropout=0.0, attn_dropout=0.0)
    model = GPT(config).double().eval()
    with torch.no_grad():  # peaky next-token distributions, so beams really reorder
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    ids = torch.randint(2, 23, (2, 5))
    cached = beam_search(model, ids, beam_size=4, max_new_tokens=40)
    uncached = beam_search(model, ids, beam_size=4, max_new_tokens=40, use_cache=False)
    assert cached.sequences.shape == (2, 45)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-10, rtol=0)


def test_rows_leaving_move_within_the_storage():
    """A selection where no row is read after it is written (``index[b] >= b``: rows leaving a batch) copies only the
    moved rows into the same storage; the values, later appends and growth are those of a copying selection."""
    cache = KVCache()
    cache.append(*chunk(5, 40, seed=0))
    k1, v1 = chunk(5, 1, seed=1)
    cache.append(k1, v1)  # capacity 80, 41 in use
    all_k, all_v = cache.keys.clone(), cache.values.clone()
    storage = cache._k.data_ptr()
    index = torch.tensor([0, 4, 2])  # rows 1 and 3 leave; the last row fills row 1
    with ElementsWritten() as counter:
        cache.reorder(index)
    assert counter.written == 1 * A * 41 * (D_K + D_V)  # one row moved, in place
    assert cache._k.data_ptr() == storage and capacity(cache) == 80
    assert torch.equal(cache.keys, all_k[index]) and torch.equal(cache.values, all_v[index])
    k2, v2 = chunk(3, 50, seed=2)  # 91 > 80: grows out of the selected rows
    got_k, got_v = cache.append(k2, v2)
    assert torch.equal(got_k, torch.cat([all_k[index], k2], dim=-2))
    assert torch.equal(got_v, torch.cat([all_v[index], v2], dim=-2))
    before = cache.keys.clone()
    cache.reorder(torch.tensor([1, 0]))  # row 0 would be read after row 0 is written: a copying selection
    assert torch.equal(cache.keys, before[[1, 0]])
