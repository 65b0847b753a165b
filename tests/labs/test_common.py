"""labs.common's byte corpus for the language-model labs: windows, labels, the unigram baseline, too few bytes."""

import pytest
import torch

from archlab.data import unigram_loss
from archlab.errors import DataError
from archlab.labs.common import byte_lm_data

MAX_BYTES = 200_000


def test_held_out_windows_are_consecutive_bytes_and_labels_the_next_ones():
    data = byte_lm_data(MAX_BYTES, 16, 8)
    assert data.inputs.shape == data.labels.shape == (8, 16) and data.inputs.dtype == torch.int64
    assert torch.equal(data.inputs.flatten(), data.held_out[:128])
    assert torch.equal(data.labels.flatten(), data.held_out[1:129])
    assert data.train_ids.size > 10 * data.held_out.numel() > 0
    want = unigram_loss(data.train_ids, data.labels.flatten().numpy(), data.tokenizer.vocab_size)
    assert data.unigram == want


def test_the_unigram_baseline_can_count_a_training_prefix():
    whole, prefix = byte_lm_data(MAX_BYTES, 16, 8), byte_lm_data(MAX_BYTES, 16, 8, unigram_bytes=1000)
    assert torch.equal(whole.labels, prefix.labels)
    counted = unigram_loss(whole.train_ids[:1000], whole.labels.flatten().numpy(), whole.tokenizer.vocab_size)
    assert prefix.unigram == counted != whole.unigram


def test_more_windows_than_held_out_bytes_is_a_data_error():
    with pytest.raises(DataError, match=r"held-out windows of 64 bytes need .* max_bytes=20,000 gives"):
        byte_lm_data(20_000, 64, 10_000)
