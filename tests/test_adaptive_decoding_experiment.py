"""Plumbing of experiments/adaptive_decoding.py: its NLL is the NLL of what adaptive generate() samples from."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import adaptive_decoding  # noqa: E402

from graftlm.modeling.bridge_decoding import AdaptiveLogitsProcessor  # noqa: E402


def summaries(logits, labels, k_max):
    return {"target": logits.gather(-1, labels[..., None]).squeeze(-1), "top": logits.topk(k_max, dim=-1).values}


def test_pair_nll_matches_the_adaptive_logits_processor():
    torch.manual_seed(0)
    pairs, length, vocab = 6, 3, 64
    logits = torch.randn(pairs, length, vocab) * 3
    labels = torch.randint(0, vocab, (pairs, length))
    labels[0] = logits[0].argmax(-1)  # a pair whose targets are all inside k = 1
    logits[1, :, :3] = 20.0  # a three-way tie at the top with k = 5 ...
    logits[5, :, :5] = 20.0  # ... and a five-way tie with k = 3: ties with the k-th are kept
    labels[5, 0] = 4
    temperature = torch.tensor([0.3, 0.7, 1.0, 1.3, 2.0, 0.05])
    top_k = torch.tensor([1, 5, 50, 12, 64 - 14, 3])
    tf = summaries(logits, labels, 50)
    lse = (logits / temperature[:, None, None]).logsumexp(-1)
    nll, misses, temp_only = adaptive_decoding.pair_nll(tf, temperature, top_k, lse)

    rows = logits.reshape(-1, vocab)
    processed = AdaptiveLogitsProcessor(temperature.repeat_interleave(length), top_k.float().repeat_interleave(length))(
        None, rows)
    expected = -processed.log_softmax(-1).gather(-1, labels.reshape(-1, 1)).reshape(pairs, length)
    assert torch.equal(misses, expected.isinf().sum(-1).float())
    assert misses[0] == 0 and misses.sum() > 0  # both cases occur
    finite = expected.isfinite().all(-1)
    assert torch.allclose(nll[finite], expected.sum(-1)[finite], atol=1e-4)
    assert nll[~finite].isinf().all()
    scaled = (logits / temperature[:, None, None]).log_softmax(-1)
    assert torch.allclose(temp_only, -scaled.gather(-1, labels[..., None]).squeeze(-1).sum(-1), atol=1e-4)


def test_fit_covers_every_target_then_minimises_nll():
    # Every row has 4 nearly tied top tokens and the targets spread evenly over them: the best (T, k) keeps exactly
    # those 4 (fewer misses targets, more adds mass off them) and flattens them as far as the grid allows.
    vocab, pairs = 60, 40
    logits = torch.full((pairs, 1, vocab), -5.0)
    logits[:, :, :4] = torch.tensor([5.0, 5.1, 5.2, 5.3])
    logits[:, :, 4:8] = 4.0
    labels = (torch.arange(pairs) % 4)[:, None]
    tf = summaries(logits, labels, 50)
    temperature, k = adaptive_decoding.fit(tf, torch.arange(pairs))
    assert (temperature, k) == (max(adaptive_decoding.TEMPERATURES), 4)
    nll, misses, _ = adaptive_decoding.pair_nll(tf, temperature, torch.full((pairs,), k), None)
    assert misses.sum() == 0 and abs(float(nll.mean()) - math.log(4)) < 0.01
