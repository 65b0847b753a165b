"""archlab.generation.RowBatch: rows that join and leave a running batch at any time decode as they do alone.

Float64 tiny GPT and Llama; every logit a row gets in the batch is compared with one forward pass of the model
over that row's own sequence (no cache, no other rows), so a row reading another's keys, a wrong position, or a
padding position read as real fails."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from archlab.errors import ConfigError
from archlab.generation import RowBatch

sys.path.insert(0, str(Path(__file__).parent))
from test_generate_batch_rows import V, family_model  # noqa: E402


@pytest.mark.parametrize("family", ["gpt", "llama"])
@torch.no_grad()
def test_rows_joining_leaving_and_rewinding_at_any_time_decode_as_alone(family):
    m = family_model(family)
    g = torch.Generator().manual_seed(3)
    lengths = {"a": 5, "b": 8, "c": 3, "d": 16, "e": 4}
    prompts = {key: torch.randint(1, V, (n,), generator=g).tolist() for key, n in lengths.items()}
    batch = RowBatch(m)
    seqs: dict[str, list[int]] = {}  # prompt + chosen tokens; the last one not yet fed
    seen: dict[str, list[torch.Tensor]] = {}  # the logits each chosen token came from

    def choose(key, logits):
        seen[key].append(logits)
        seqs[key].append(int(logits.argmax()))

    def start(key, join=True):
        seqs[key], seen[key] = list(prompts[key]), []
        choose(key, batch.prefill(key, prompts[key]))
        if join:
            batch.join(key)

    def step():
        out = batch.step({key: seqs[key][-1:] for key in batch.joined})
        for key, logits in out.items():
            choose(key, logits[-1])

    start("a"), start("b")
    step(), step()
    start("c")  # shorter than the batch's positions: padded at its end
    step()
    start("e", join=False)  # prefilled, waits
    start("d")  # longer than the batch's positions: the batch is padded
    assert batch.joined == ["a", "b", "c", "d"] and batch.waiting == ["e"]
    step(), step()
    batch.remove(["a"])  # ends early
    step()
    batch.join("e")  # joins late, after waiting three steps
    step(), step()
    batch.remove(["b", "c", "e"])
    assert batch.joined == ["d"] and batch.length == len(seqs["d"]) - 1  # the positions no row reads are gone
    drafts = [seqs["d"][-1], 7, 7, 7]  # a verification pass: the first position's logits are the next token's
    out = batch.step({"d": drafts})["d"]
    batch.rewind(3)
    choose("d", out[0])
    step(), step()

    assert {key: len(s) - lengths[key] for key, s in seqs.items()} == {"a": 6, "b": 9, "c": 7, "d": 9, "e": 3}
    for key, logits in seen.items():
        alone = m(torch.tensor([seqs[key][:-1]]))[0, lengths[key] - 1 :]  # [t, V]: after the prompt, then each token
        torch.testing.assert_close(torch.stack(logits), alone, rtol=1e-9, atol=1e-9, msg=f"row {key}")
    batch.remove(["d"])
    assert batch.joined == [] and batch.length == 0


@pytest.mark.parametrize("family", ["gpt", "llama"])
@torch.no_grad()
def test_a_batch_that_never_empties_holds_its_oldest_rows_positions_and_decodes_as_alone(family):
    """A new row every step, each leaving after 3 steps: the leading positions no row reads are dropped (RoPE keys
    moved back with them), so the cache holds the oldest row's positions, and every row's logits stay its own."""
    m = family_model(family)
    batch, seqs, seen = RowBatch(m), {}, {}
    for t in range(12):
        seqs[t] = [1 + t % 5, 2 + t % 3, 3, 4][: 2 + t % 3]  # prompts of 2 to 4 tokens
        seen[t] = [batch.prefill(t, seqs[t])]
        seqs[t].append(int(seen[t][-1].argmax()))
        batch.join(t)
        batch.remove([k for k in batch.joined if k <= t - 3])
        out = batch.step({k: seqs[k][-1:] for k in batch.joined})
        for k, logits in out.items():
            seen[k].append(logits[-1])
            seqs[k].append(int(logits[-1].argmax()))
        assert batch.length == max(len(seqs[k]) - 1 for k in batch.joined)  # the longest row's, no more
    for k, logits in seen.items():
        n = len(logits)
        alone = m(torch.tensor([seqs[k][:-1]]))[0, -n:]
        torch.testing.assert_close(torch.stack(logits), alone, rtol=1e-9, atol=1e-9, msg=f"row {k}")


@pytest.mark.parametrize("family", ["gpt", "llama"])
@torch.no_grad()
def test_rows_fed_different_numbers_of_tokens_and_keeping_different_numbers_decode_as_alone(family):
    """A batch of speculative rounds: each round feeds every row its last token and 0-2 drafts (a ragged pass, the
    shorter rows padded), then each row keeps its own number of them (``rewind`` with a count per row, the padding
    forgotten in the same move; or no rewind at all when every row keeps all it was fed). Rows join and leave
    between rounds. Every logit a row keeps equals one forward pass over its own sequence, and the cache holds no
    more positions than the longest row."""
    m = family_model(family)
    g = torch.Generator().manual_seed(5)
    batch, seqs, seen = RowBatch(m), {}, {}

    def start(key, n):
        seqs[key] = torch.randint(1, V, (n,), generator=g).tolist()
        seen[key] = [batch.prefill(key, seqs[key])]
        seqs[key].append(int(seen[key][-1].argmax()))
        batch.join(key)

    def rounds(count, keep_all=False):
        for _ in range(count):
            keys = batch.joined
            drafts = {k: torch.randint(1, V, (int(torch.randint(0, 3, (), generator=g)),), generator=g).tolist()
                      for k in keys}  # fmt: skip
            out = batch.step({k: [seqs[k][-1], *drafts[k]] for k in keys})
            kept = {k: len(drafts[k]) if keep_all else int(torch.randint(0, len(drafts[k]) + 1, (), generator=g))
                    for k in keys}  # fmt: skip
            if not keep_all:
                batch.rewind({k: len(drafts[k]) - kept[k] for k in keys})
            for k in keys:
                assert out[k].shape[0] == 1 + len(drafts[k])
                seen[k].extend(out[k][: 1 + kept[k]])
                seqs[k] += drafts[k][: kept[k]] + [int(out[k][kept[k]].argmax())]
            if not keep_all:  # else the padding is held until the next pass
                assert batch.length == max(len(seqs[k]) - 1 for k in keys)

    start("a", 3), start("b", 7)
    rounds(2)
    start("c", 2)
    rounds(2, keep_all=True)  # the padding forgotten before the next pass, not by a rewind
    start("d", 5)
    rounds(2)
    batch.remove(["b"])
    rounds(1, keep_all=True)
    batch.remove(["a"])  # the padding of the last pass forgotten with it
    rounds(2)
    for k, logits in seen.items():
        alone = m(torch.tensor([seqs[k][:-1]]))[0, -len(logits) :]
        torch.testing.assert_close(torch.stack(logits), alone, rtol=1e-9, atol=1e-9, msg=f"row {k}")


@pytest.mark.parametrize("family", ["gpt", "llama"])
@torch.no_grad()
def test_verify_keeps_the_drafts_each_row_s_greedy_choice_accepts(family):
    """RowBatch.verify: three rows fed their last token and drafts (all right, right then wrong, none); each keeps
    its accepted drafts and the token its own logits choose after them, which equal greedy decoding alone, and the
    batch then decodes on as each row alone (the rejected draft and the padding forgotten in the same move)."""
    m = family_model(family)
    prompts = {"a": [3, 1, 4, 1], "b": [5, 9, 2, 6, 5, 3], "c": [5, 8]}

    def greedy(seq, n):
        for _ in range(n):
            seq = seq + [int(m(torch.tensor([seq]))[0, -1].argmax())]
        return seq

    alone = {k: greedy(p, 6)[len(p) :] for k, p in prompts.items()}
    batch = RowBatch(m)
    for k, p in prompts.items():
        assert int(batch.prefill(k, p).argmax()) == alone[k][0]
        batch.join(k)
    wrong = (alone["b"][2] + 1) % V
    fed = {"a": alone["a"][:3], "b": [*alone["b"][:2], wrong], "c": alone["c"][:1]}
    new = batch.verify(fed)
    assert new == {"a": alone["a"][1:4], "b": alone["b"][1:3], "c": alone["c"][1:2]}
    seqs = {k: [*alone[k][: 1 + len(new[k])]] for k in prompts}
    for _ in range(2):
        out = batch.step({k: s[-1:] for k, s in seqs.items()})
        for k, logits in out.items():
            seqs[k].append(int(logits[-1].argmax()))
    assert all(seqs[k] == alone[k][: len(seqs[k])] for k in prompts)
    with pytest.raises(ConfigError, match=r"verify's tokens\['c'\] must be a non-empty list of token ids"):
        batch.verify({"a": [1], "b": [1], "c": []})


@torch.no_grad()
def test_steps_are_built_when_rows_change_not_at_every_step():
    """The model's step is built when rows join or leave (or positions are cropped or dropped), once for all the
    steps until then: five steps of two rows build none; their logits stay each row's own (the mask grows with
    the fed tokens inside the built step)."""
    m = family_model("llama")
    builds = []

    @functools.wraps(m.decoder_step)  # the signature kept: RowBatch reads it
    def counted(*args, **kwargs):
        builds.append(1)
        return counted.__wrapped__(*args, **kwargs)

    m.decoder_step = counted
    batch, seqs, seen = RowBatch(m), {"a": [1, 2, 3], "b": [4, 5]}, {}
    for key in seqs:
        seen[key] = [batch.prefill(key, seqs[key])]
        seqs[key].append(int(seen[key][-1].argmax()))
        batch.join(key)
    before = len(builds)
    for _ in range(5):
        out = batch.step({k: seqs[k][-1:] for k in batch.joined})
        for k, logits in out.items():
            seen[k].append(logits[-1])
            seqs[k].append(int(logits[-1].argmax()))
    assert len(builds) == before
    batch.remove(["a"])
    assert len(builds) > before  # the remaining row's step, on its own mask
    for k, logits in seen.items():
        alone = m(torch.tensor([seqs[k][:-1]]))[0, -len(logits):]
        torch.testing.assert_close(torch.stack(logits), alone, rtol=1e-9, atol=1e-9, msg=f"row {k}")


def test_row_batch_refusals():
    m = family_model("gpt")
    with pytest.raises(ConfigError, match="decoder-only"):
        RowBatch(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="pad_front, join, rewind_rows, drop_front, empty_like"):
        RowBatch(family_model("lstm"))
    batch = RowBatch(m)
    batch.prefill("x", [1, 2])
    with pytest.raises(ConfigError, match="key='x' is in use"):
        batch.prefill("x", [3])
    with pytest.raises(ConfigError, match="prompt must be a non-empty list"):
        batch.prefill("y", [])
    with pytest.raises(ConfigError, match="not waiting to join"):
        batch.join("y")
    with pytest.raises(ConfigError, match=r"step feeds every joined row: got rows \['x'\], joined \[\]$"):
        batch.step({"x": [1]})  # x waits, not joined (the keys as they are, not their reprs quoted again)
    batch.join("x")
    batch.prefill("z", [4, 5, 6])
    batch.join("z")
    with pytest.raises(ConfigError, match=r"step's tokens\['z'\] must be a non-empty list of token ids, got \[\]"):
        batch.step({"x": [1], "z": []})
    with pytest.raises(ConfigError, match=r"step's tokens\['z'\]\[j\]='a' must be an int >= 0"):
        batch.step({"x": [1], "z": [2, "a"]})
    with pytest.raises(ConfigError, match=r"step's tokens\['x'\]\[j\]=True must be an int >= 0"):
        batch.step({"x": [True], "z": [2]})
    with pytest.raises(ConfigError, match="rewind n=99 for row 'x': the row holds 2 positions"):
        batch.rewind(99)
    batch.step({"x": [1], "z": [1, 2, 3]})  # x padded by 2 positions, which it does not hold
    with pytest.raises(ConfigError, match="rewind n=4 for row 'x': the row holds 3 positions"):
        batch.rewind({"x": 4})
    with pytest.raises(ConfigError, match=r"rewind names rows \['w'\] that are not joined; joined: \['x', 'z'\]"):
        batch.rewind({"w": 1})
    with pytest.raises(ConfigError, match="n\\['z'\\]=-1 must be"):
        batch.rewind({"z": -1})
    batch.rewind({"x": 3, "z": 6})  # every position fed to x (its prompt's 2 and 1) and to z (3 and 3)
    assert batch.length == 0


@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_rope_at_rows_rotates_each_row_at_its_own_positions_to_the_bit(rotary_dim):
    """RoPE at per-row positions (a left-padded batch: positions_from_mask) rotates each row's real tokens as the row
    alone is rotated from position 0, to the bit (float32), and a step's new token at the row's own next position;
    queries and keys of different head counts alike; the table rows are gathered once per dtype for all the layers
    that ask, and alternating dtypes does not grow the tables; a positions tensor of the wrong kind, or x of another
    shape, is refused."""
    from archlab.errors import ShapeError
    from archlab.models.decoder import positions_from_mask
    from archlab.nn.positional import RotaryPositionalEncoding

    rope = RotaryPositionalEncoding(8, rotary_dim=rotary_dim)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    real = (4, 6, 1)
    rows = rope.at_rows(positions_from_mask(mask))
    out = rows.rotate(x)
    step = rope.at_rows(positions_from_mask(torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1))[:, -1:])
    for b, n in enumerate(real):
        assert torch.equal(out[b : b + 1, :, 6 - n :], rope.rotate(x[b : b + 1, :, 6 - n :], 0))
        assert torch.equal(step.rotate(y)[b : b + 1], rope.rotate(y[b : b + 1], n))
    tables = rows._rows_for(x)
    assert rows._rows_for(x) is tables and tables[0].shape == (3, 1, 6, rotary_dim or 8)
    assert torch.equal(rope.at_rows(positions_from_mask(mask), end=6).rotate(x), out)  # a bound: the same rows
    q, k = rows.transform_qk(x, x[:, :1])  # grouped-query attention: fewer key heads
    assert torch.equal(q, out) and torch.equal(k, out[:, :1])
    assert torch.equal(rows.transform_qk_heads(x, 1), out) and rows.attention_bias(6, 6) is None
    assert rope.at_rows(positions_from_mask(mask)).rotate(x.double()).dtype == torch.float64
    for _ in range(6):  # callers alternating dtypes rebuild the tables at their length, never grow them
        rope.at_rows(positions_from_mask(mask)).rotate(x.double())
        rope.at_rows(positions_from_mask(mask)).rotate(x)
    assert rope._cache[0] == 256
    with pytest.raises(ShapeError, match=r"positions must be integer \[B, N\]"):
        rope.at_rows(torch.zeros(3, 6))
    with pytest.raises(ShapeError, match=r"x must be \[B, H, N, d\] = \[3, H, 6, d\]"):
        rows.rotate(x[:, :, :5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rewind_rows_moves_rows_that_forget_more_on_with_zeros_before_them(dtype, monkeypatch):
    """``rewind_rows`` over two layers' caches of 18 positions (one a view after ``drop_front``), rows forgetting
    2, 4, 1 and 3: the caches keep 17 positions, row ``b`` its first ``18 - n[b]`` keys and values ending at the last,
    zeros before them; the kernel's one call and PyTorch's slices (no kernel) give the same bits, and counts out of
    range or of another batch are refused first."""
    from archlab import kernels
    from archlab.errors import ShapeError
    from archlab.nn.attention import KVCache, rewind_rows

    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(4, 3, 20, 16, generator=g).to(dtype), torch.randn(4, 3, 20, 32, generator=g).to(dtype))
              for _ in range(2)]  # fmt: skip
    forget = [2, 4, 1, 3]
    got = {}
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(kernels, "f32_kernel", lambda: 0)
        caches = [KVCache(), KVCache()]
        caches[0].append(*layers[0])
        caches[0].drop_front(2)  # a view of its storage
        caches[1].append(layers[1][0][:, :, 2:], layers[1][1][:, :, 2:])
        with pytest.raises(ShapeError, match=r"rewind_rows n=\[1, 19, 0, 2\] must hold one int count in \[0, 18\]"):
            rewind_rows(caches, [1, 19, 0, 2])
        with pytest.raises(ShapeError, match=r"one int count in \[0, 18\] per row \(4\)"):
            rewind_rows(caches, [1, 2])
        rewind_rows(caches, forget)
        assert [c.length for c in caches] == [17, 17]
        for c, (k, v) in zip(caches, layers, strict=True):
            for held, full in ((c.keys, k[:, :, 2:]), (c.values, v[:, :, 2:])):
                for b, e in enumerate(forget):
                    moved = e - 1  # forgets e - 1 more than the least
                    assert torch.equal(held[b, :, moved:], full[b, :, : 18 - e]), f"row {b}"
                    assert not held[b, :, :moved].any()
        got[kernel] = [t for c in caches for t in (c.keys, c.values)]
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False], strict=True))
