"""An offline seq2seq task for the Scaffolded and Bridged experiments: a function's docstring -> its signature.

Every function and method with a docstring in the offline base's standard-library documents (experiments/
offline_base.py: the same files, the same held-out split by document) gives one pair:
- source: the docstring's first paragraph (whitespace collapsed, at most 400 characters);
- target: the signature as the source spells it, `name(arguments)` (ast.unparse of the arguments, annotations kept).
Pairs from the held-out documents are the test set (the offline base never read those files); pairs from training
documents train. The base did read the training files, where each signature stands just above its docstring; here
the order is reversed (docstring first), which is what makes the task a task.
"""

import ast
import random
import re

import offline_base


def signature(node):
    return f"{node.name}({ast.unparse(node.args)})"


def document_pairs(text):
    """[(docstring paragraph, signature)] of every function in one module's source; [] when it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            paragraph = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip() if doc else ""
            if len(paragraph) >= 10:
                pairs.append((paragraph[:400], signature(node)))
    return pairs


def docstring_signature_pairs(max_train, seed=0):
    """(train, test): lists of {"document", "src", "tgt"}; train is a seeded sample of at most max_train pairs."""
    train, test = [], []
    for name, text in offline_base.corpus_documents():
        if name.startswith("stdlib/"):
            rows = [{"document": name, "src": src, "tgt": tgt} for src, tgt in document_pairs(text)]
            (test if offline_base.is_held_out(name) else train).extend(rows)
    random.Random(seed).shuffle(train)
    return train[:max_train], test


def argument_parser(doc, name):
    """A parser with the options both experiments on these pairs share (each adds its own)."""
    import argparse
    from pathlib import Path

    from dfa_allocation import base_setting

    parser = argparse.ArgumentParser(description=doc.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--base", type=base_setting, nargs="*", default=[],
                        help="offline base settings KEY=VALUE (experiments/offline_base.py DEFAULTS)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results") / name)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser


def per_document(rows, documents, sums, counts, nll, count):
    """Add each row's summed NLL and token count to its document's entry of `nll` and `count` (in place)."""
    index = {d: i for i, d in enumerate(documents)}
    for row, s, c in zip(rows, sums.tolist(), counts.tolist()):
        nll[index[row["document"]]] += s
        count[index[row["document"]]] += c


def difference(a, b, count, samples, generator):
    """Perplexities of per-document NLLs `a` and `b`, and the paired bootstrap over documents (95%) of a - b."""
    from dfa_allocation import bootstrap, ppl

    lo, hi = bootstrap(lambda idx: ppl(a, count, idx) - ppl(b, count, idx), len(count), samples, generator)
    return {"perplexity": ppl(a, count), "reference_perplexity": ppl(b, count),
            "difference": ppl(a, count) - ppl(b, count), "ci95": [lo, hi]}
