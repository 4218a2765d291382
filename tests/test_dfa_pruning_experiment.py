"""Plumbing of experiments/dfa_pruning.py: the head-importance scores are the gradients they claim to be, removing a
head computes what zeroing its gate computes, and sizes are matched as the README says. (The experiment itself is
a script, not a test.)"""

import sys
from pathlib import Path

import pytest
import torch

from graftlm.modeling.hf_compat import cache_kwargs, cache_of
from testing_utils import tiny_gpt2_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import dfa_pruning  # noqa: E402


@pytest.fixture
def stock():
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config(n_layer=2, n_head=4, vocab_size=64)).double().eval()


def loss_with_gates(model, ids, gates):
    handles = dfa_pruning.head_gates(model, gates)
    try:
        with torch.no_grad():  # in float64 (the model's own loss upcasts logits to float32 only)
            logits = model(input_ids=ids[None]).logits[0, :-1]
            return torch.nn.functional.cross_entropy(logits, ids[1:]).item()
    finally:
        for handle in handles:
            handle.remove()


def test_head_importance_is_the_mean_absolute_gate_gradient(stock):
    windows = [torch.randint(0, 64, (12,)) for _ in range(2)]
    importance = dfa_pruning.head_importance(stock, windows)
    eps, expected = 1e-5, torch.zeros(2, 4, dtype=torch.float64)
    for ids in windows:
        for layer in range(2):
            for head in range(4):
                up, down = torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
                up[layer, head] += eps
                down[layer, head] -= eps
                expected[layer, head] += abs(loss_with_gates(stock, ids, up) - loss_with_gates(stock, ids, down)) / (2 * eps)
    torch.testing.assert_close(importance.double(), expected / len(windows), rtol=1e-4, atol=1e-7)
    assert (importance > 0).all()


def test_removing_heads_equals_zeroing_their_gates_and_keeps_the_cache_exact(stock):
    heads = {(0, 1), (1, 0), (1, 3)}
    pruned = dfa_pruning.remove_heads(stock, heads)
    gates = torch.ones(2, 4, dtype=torch.float64)
    for layer, head in heads:
        gates[layer, head] = 0
    ids = torch.randint(0, 64, (1, 10))
    handles = dfa_pruning.head_gates(stock, gates)
    with torch.no_grad():
        reference = stock(input_ids=ids).logits
        for handle in handles:
            handle.remove()
        full = pruned(input_ids=ids).logits
        prefix = pruned(input_ids=ids[:, :-1], use_cache=True)
        step = pruned(input_ids=ids[:, -1:], **cache_kwargs(cache_of(prefix))).logits
    torch.testing.assert_close(full, reference)
    torch.testing.assert_close(step[:, -1], full[:, -1])
    per_head = 3 * 8 * 33 + 8 * 32  # c_attn columns (q, k, v) with biases, c_proj rows: head_dim 8, n_embd 32
    assert dfa_pruning.attention_parameters(stock) - dfa_pruning.attention_parameters(pruned) == 3 * per_head
    assert stock.transformer.h[0].attn.c_attn.weight.shape == (32, 96)  # the original is untouched


def test_pruning_order_keeps_a_head_per_layer_and_matching_picks_the_nearest_size():
    importance = torch.tensor([[1.0, 2.0, 3.0], [0.1, 0.2, 5.0]])
    order = dfa_pruning.pruning_order(importance)
    assert len(order) == 4 and {layer for layer, _ in order} == {0, 1}
    assert (0, 2) not in order and (1, 2) not in order  # each layer's most important head stays
    assert order[0] == (1, 0)  # lowest once each layer is divided by its norm
    assert dfa_pruning.matched(140, [0, 100, 200, 300]) == 1
    assert dfa_pruning.matched(150, [0, 100, 200, 300]) == 1  # a tie goes to fewer heads
    assert dfa_pruning.matched(0, [0, 100]) == 0
