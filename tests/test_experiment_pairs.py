"""Plumbing of the docstring -> signature experiments (experiments/stdlib_pairs.py): the pairs a module gives, and the
per-document paired comparison the scaffold and bridge experiments report."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import stdlib_pairs  # noqa: E402

SOURCE = '''
def add(a, b: int = 2, *rest, key=None, **options):
    """Return the sum of a
    and b.

    A second paragraph that is not kept.
    """

class Box:
    async def fetch(self, url):
        """Fetch url into the box."""

    def short(self):
        """Tiny."""

    def bare(self):
        pass
'''


def test_pairs_are_first_paragraph_to_signature():
    assert stdlib_pairs.document_pairs(SOURCE) == [
        ("Return the sum of a and b.", "add(a, b: int=2, *rest, key=None, **options)"),
        ("Fetch url into the box.", "fetch(self, url)"),
    ]  # "Tiny." is under 10 characters, bare() has no docstring
    assert stdlib_pairs.document_pairs("def broken(:\n") == []


def test_paired_difference_over_documents():
    documents = ["a.py", "b.py", "c.py"]
    rows = [{"document": d} for d in ["b.py", "a.py", "b.py", "c.py"]]
    nll, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    stdlib_pairs.per_document(rows, documents, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 2, 3, 4]),
                              nll, count)
    assert nll.tolist() == [2.0, 4.0, 4.0] and count.tolist() == [2.0, 4.0, 4.0]
    generator = torch.Generator().manual_seed(0)
    same = stdlib_pairs.difference(nll, nll.clone(), count, 200, generator)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    worse = stdlib_pairs.difference(nll + 0.5 * count, nll, count, 200, generator)  # +0.5 nats on every token
    assert abs(worse["perplexity"] - worse["reference_perplexity"] * torch.e**0.5) < 1e-9
    low, high = worse["ci95"]  # bootstrap quantiles are float32
    assert 0 < low and low - 1e-5 <= worse["difference"] <= high + 1e-5


# One arm of experiments/scaffold_gain.py in a fresh process: the global RNG is first moved to an arbitrary state (what
# earlier arms, a --resume, or torch's own start seed leave there); the arm must not depend on it.
SCAFFOLD_ARM = """
import hashlib, sys
import torch
sys.path.insert(0, sys.argv[2])
import scaffold_gain
from graftlm.training.scaffold import TrainingOptions
from transformers import AutoTokenizer

torch.set_num_threads(1)
torch.seed()
pairs = [{"prompt": f"def f{a}(x):\\n    return", "completion": f" x + {a}"} for a in range(15)]
options = TrainingOptions(seed=0, samples_per_epoch=0, epochs=1, learning_rate=1e-2, gradient_accumulation_steps=2)
model, _, _ = scaffold_gain.train_scaffold_arm(sys.argv[1], [0, 1], AutoTokenizer.from_pretrained(sys.argv[1]),
                                               pairs[:12], pairs[12:], options, "scaffolded", 0.5)
digest = hashlib.sha256()
for name, param in model.named_parameters():
    if param.requires_grad:
        digest.update(name.encode() + param.detach().numpy().tobytes())
print(digest.hexdigest(), min(abs(g) for g in model.gate_values().values()))
"""


def test_scaffold_arm_training_is_bit_identical_across_processes(tmp_path):
    import os
    import subprocess

    from testing_utils import save_tiny_gpt2

    base = save_tiny_gpt2(tmp_path / "base")
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", SCAFFOLD_ARM, str(base), str(experiments)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(run.stdout.split()[-2:])
    assert float(outputs[0][1]) > 0  # the fusers' gates trained away from 0
    assert outputs[0][0] == outputs[1][0], outputs
