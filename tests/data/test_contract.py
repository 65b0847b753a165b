"""Each task's batches go straight into the archlab model that trains on it (the TASKS contract of the registry)."""

import torch
import torch.nn.functional as F

from archlab.data import (
    IGNORE_INDEX,
    ClassificationBatches,
    LMWindows,
    MLMBatches,
    Seq2SeqBatches,
    SyntheticTask,
    digits,
    encode_texts,
    minilm_wordpiece,
)
from archlab.data.tokenizers import ByteTokenizer
from archlab.models.bert import BertConfig, BertForPreTraining
from archlab.models.gpt import GPT, GPTConfig
from archlab.models.transformer import EncoderDecoderTransformer, TransformerConfig
from archlab.models.vit import ViT, ViTConfig

TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0}


def _finite_loss(logits, labels):
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.isfinite(loss)
    return loss


def test_lm_batches_feed_gpt():
    tok = ByteTokenizer()
    ids = encode_texts(["def f(x):\n    return x + 1\n" * 20], tok)
    batch = next(LMWindows(ids, seq_len=32, batch_size=4))
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, max_len=32, attn_dropout=0.0, **TINY))
    logits = model(batch["input_ids"])
    assert logits.shape == (4, 32, tok.vocab_size)
    _finite_loss(logits, batch["labels"])


def test_mlm_batches_feed_bert_pretraining():
    tok = minilm_wordpiece()
    ids = encode_texts(["The quick brown fox jumps over the lazy dog."] * 40, tok)
    batch = next(MLMBatches(ids, tok, seq_len=24, batch_size=4))
    model = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size, max_len=32, d_ff=32, attn_dropout=0.0, **TINY))
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    _finite_loss(out.mlm_logits, batch["labels"])
    _finite_loss(out.nsp_logits, batch["next_sentence_label"])


def test_seq2seq_batches_feed_the_transformer():
    task = SyntheticTask("dates")
    tok = task.tokenizer()
    batch = next(Seq2SeqBatches.from_text(task.pairs(16), tok, batch_size=8))
    model = EncoderDecoderTransformer(TransformerConfig(vocab_size=tok.vocab_size, d_ff=32, max_len=64,
                                                        pad_id=tok.pad_id, **TINY))  # fmt: skip
    logits = model(batch["src_ids"], batch["tgt_in"], src_mask=batch["src_mask"])
    assert logits.shape == (*batch["tgt_out"].shape, tok.vocab_size)
    _finite_loss(logits, batch["tgt_out"])


def test_digit_batches_feed_vit():
    (x, y), test = digits()
    batch = next(ClassificationBatches(x, y, batch_size=8, valid=test))
    model = ViT(ViTConfig(image_size=8, patch_size=4, n_channels=1, d_ff=32, n_classes=10, **TINY))
    logits = model(batch["inputs"])
    assert logits.shape == (8, 10)
    _finite_loss(logits, batch["labels"])
