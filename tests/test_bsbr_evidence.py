"""Plumbing of experiments/bsbr_evidence.py: its two controls really are what the README says they are, and the
recall probe's data copy the right chunk. (The experiment itself is a script, not a test.)"""

import copy
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from testing_utils import tiny_gpt2_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bsbr_evidence  # noqa: E402


def test_sliding_window_reads_only_the_last_width_tokens():
    from transformers import GPT2LMHeadModel

    width, n_layer = 4, 2
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(tiny_gpt2_config(n_layer=n_layer, vocab_size=64)).eval()
    sliding = copy.deepcopy(stock)  # its own config: the attention implementation is a config field
    sliding.set_attn_implementation(bsbr_evidence.sliding_window_attention(width))
    ids = torch.randint(0, 64, (2, 20))
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % 64
    with torch.no_grad():
        out, out_changed, reference = (m(input_ids=x).logits for m, x in
                                       ((sliding, ids), (sliding, changed), (stock, ids)))
    # Within the first `width` positions the band is the causal mask: stock GPT-2's logits.
    torch.testing.assert_close(out[:, :width], reference[:, :width])
    assert not torch.allclose(out[:, width:], reference[:, width:], atol=1e-4)
    # Each layer reaches width - 1 tokens back, so token 0 reaches positions < 1 + n_layer * (width - 1) only.
    reach = 1 + n_layer * (width - 1)
    assert (out_changed[:, :reach] - out[:, :reach]).abs().amax() > 1e-4
    torch.testing.assert_close(out_changed[:, reach:], out[:, reach:])
    with pytest.raises(ValueError, match="unpadded"):
        sliding(input_ids=ids, attention_mask=torch.tensor([[0] + [1] * 19, [1] * 20]))


def test_retrieval_off_stays_block_diagonal_under_training():
    from graftlm.configuration.configuration_bsbr import BSBRConfig
    from graftlm.modeling.modeling_bsbr import BSBRForCausalLM
    from graftlm.training.common import make_optimizer

    torch.manual_seed(0)
    chunk = 4
    model = BSBRForCausalLM(BSBRConfig(**tiny_gpt2_config(vocab_size=64).to_dict() | {"chunk_size": chunk}))
    for block in model.transformer.h:  # an opened gate, as after healing: the switch must close it
        block.attn.retrieval_gate.weight.data.fill_(0.5)
    bsbr_evidence.retrieval_off(model)
    optimizer = make_optimizer(model, 1e-2, {".retrieval_gate.": 1e-1})
    ids = torch.randint(0, 64, (2, 3 * chunk))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(float(b.attn.retrieval_gate.weight.abs().max()) == 0.0 for b in model.transformer.h)
    changed = ids.clone()
    changed[:, :chunk] = (ids[:, :chunk] + 1) % 64  # the whole first chunk
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=changed).logits[:, chunk:], model(input_ids=ids).logits[:, chunk:])


def test_recall_data_copy_the_chunk_d_back_and_score_only_the_copy():
    args = Namespace(recall_chunk_size=4, recall_vocab=16)
    ids, labels = bsbr_evidence.recall_batch(3, args, 5, torch.Generator().manual_seed(0))
    assert ids.shape == (5, 16) and int(ids.min()) >= 1
    torch.testing.assert_close(ids[:, -4:], ids[:, :4])
    assert (labels[:, :-4] == -100).all() and (labels[:, -4:] == ids[:, -4:]).all()


def test_buckets_cover_the_window_once():
    assert bsbr_evidence.buckets(64, 8) == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert bsbr_evidence.buckets(100, 16) == [(0, 16), (16, 32), (32, 64), (64, 100)]
