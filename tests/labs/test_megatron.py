"""megatron-sharding: its quick run on 2 torchrun ranks (gloo) against one process, and its comparison helper."""

import pytest
import torch

from archlab.errors import ArchlabError
from archlab.labs import run_lab
from archlab.labs.megatron import BLOCK_SHARE, PEAK_SHARE, batch, largest_difference, model


def test_largest_difference_is_relative_to_each_tensor_and_needs_the_same_names():
    want = {"a": torch.tensor([1.0, -4.0]), "b": torch.tensor([1e-6, 0.0])}
    got = {"a": torch.tensor([1.0, -3.0]), "b": torch.tensor([1e-6, 1e-7])}
    assert largest_difference(got, want) == pytest.approx(0.25)  # |-3 - -4| / 4 beats 1e-7 / 1e-6 = 0.1
    with pytest.raises(ArchlabError, match=r"\['c'\]"):
        largest_difference({**got, "c": torch.zeros(1)}, want)


def test_the_ranks_and_one_process_start_from_the_same_model_and_batch():
    assert torch.equal(model(True, 3).lm_head.weight, model(True, 3).lm_head.weight)
    ids, labels = batch(True, 3)
    assert ids.shape == labels.shape == (4, 32) and torch.equal(ids[:, 1:], labels[:, :-1])


def test_quick_run_halves_each_ranks_block_parameters_and_matches_one_process():
    result = run_lab("megatron-sharding", quick=True).result
    assert result.verdict == "supported", result.finding
    (single, *ranks) = result.rows
    assert single[0] == "one process" and len(ranks) == 2
    for name, total, blocks, peak, block_share, peak_share in ranks:
        assert 0.5 <= block_share <= BLOCK_SHARE and peak_share <= PEAK_SHARE  # halved, norms/biases whole
        assert total - blocks == single[1] - single[2]  # embeddings and LM head whole on every rank
        assert peak < single[3]
