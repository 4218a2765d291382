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
