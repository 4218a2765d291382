"""Healing experiment for GPT2-BSBR: perplexity of stock vs converted vs healed GPT-2 at several context lengths.

Everything ships offline:
1. a small stock GPT-2 (graftlm.offline.build_local_gpt2: GPT-2's tokenizer, trained on Python's help() topic pages,
   `pydoc_data.topics`), with n_positions = 256;
2. its GPT2-BSBR conversion (`graftlm convert bsbr`, chunk_size 16 by default, so 128 tokens span 8 chunks);
3. the converted model healed by `graftlm train bsbr` on the same help() text, with windows of 128 tokens;
4. a control: the stock GPT-2 fine-tuned with the same Trainer settings on the same text, so that the healed model's
   gain over "converted" is not mistaken for plain extra training.
Perplexity (`graftlm eval`'s strided evaluation, windows of L tokens, stride L) is measured on held-out text none of
the models trained on: the docstrings of standard-library modules. Writes bsbr_healing.json and bsbr_healing.png.
Superseded as evidence by experiments/bsbr_evidence.py (several seeds, the offline base, retrieval-off and
sliding-window controls, paired bootstrap intervals); kept for the README's earlier table.

    python experiments/bsbr_healing.py                # about 10-15 CPU minutes on 2 cores
    python experiments/bsbr_healing.py --stock-steps 100 --heal-steps 40 --lengths 16 32 64
"""

import argparse
import importlib
import inspect
import json
import logging
import time
from argparse import Namespace
from pathlib import Path

import torch

logger = logging.getLogger("bsbr_healing")

# Standard-library modules whose docstrings form the held-out evaluation text.
HELD_OUT_MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "unittest", "datetime",
    "decimal", "fractions", "statistics", "textwrap", "string", "functools", "itertools", "contextlib", "dataclasses",
    "enum", "typing", "email", "http.client", "urllib.request", "zipfile", "tarfile", "csv", "sqlite3", "socket",
    "shutil", "tempfile", "random", "difflib", "heapq", "queue", "io", "pickle", "inspect", "ast", "codecs",
)


def held_out_text(max_chars):
    """Module, class and function docstrings (of 200+ characters) of HELD_OUT_MODULES, up to `max_chars`."""
    parts = []
    for name in HELD_OUT_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)] + [
            inspect.getdoc(obj) for attr, obj in sorted(vars(module).items())
            if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__
        ]
        parts += [doc for doc in docs if doc and len(doc) >= 200]
    return "\n\n".join(parts)[:max_chars]


def fine_tune_stock(stock_dir, text_file, output_dir, args):
    """The control: stock GPT-2 trained exactly as `graftlm train bsbr` trains the converted model."""
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer, TrainingArguments

    from graftlm.training.data import split_blocks

    model = GPT2LMHeadModel.from_pretrained(stock_dir)
    tokenizer = AutoTokenizer.from_pretrained(stock_dir)
    ids = tokenizer(Path(text_file).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    train_set, _ = split_blocks(ids, args.seq_len, 0.0)
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), max_steps=args.heal_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=10, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=10, save_strategy="no", report_to="none", seed=0,
    )
    Trainer(model=model, args=training_args, train_dataset=train_set).train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, by_length in results["perplexity"].items():
        lengths = sorted(int(n) for n in by_length)
        ax.plot(lengths, [by_length[str(n)] for n in lengths], marker="o", label=name)
    ax.axvline(results["chunk_size"], color="grey", linestyle=":", label="chunk_size")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation window (tokens)")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_title("GPT2-BSBR healing")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args):
    from graftlm.training import bsbr as train_bsbr
    from graftlm.conversion.bsbr import convert_gpt2_to_bsbr, model_card
    from graftlm.conversion.common import load_tokenizer
    from graftlm.offline import build_local_gpt2, offline_text
    from graftlm.evaluation import evaluate_perplexity
    from graftlm.export import export_model

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    timings, start = {}, time.perf_counter()
    train_text, eval_text = out / "train_text.txt", out / "eval_text.txt"
    train_text.write_text(offline_text(), encoding="utf-8")
    eval_text.write_text(held_out_text(args.eval_chars), encoding="utf-8")

    stock = out / "stock"
    if args.reuse_stock and (stock / "config.json").is_file():
        logger.info("reusing the stock GPT-2 already trained in %s", stock)
    else:
        build_local_gpt2(stock, train_steps=args.stock_steps, seed=0, seq_len=args.seq_len, batch_size=args.batch_size)
        timings["stock_training_s"] = time.perf_counter() - start

    model, report = convert_gpt2_to_bsbr(stock, chunk_size=args.chunk_size)
    converted = export_model(model, out / "converted", tokenizers={"": load_tokenizer(stock)},
                             card=model_card(report, str(out / "converted"), model.config), overwrite=True)

    start = time.perf_counter()
    heal_args = Namespace(
        model=str(converted), text=str(train_text), output_dir=str(out / "healed"), overwrite=True,
        seq_len=args.seq_len, max_steps=args.heal_steps, batch_size=args.batch_size, grad_accum=1,
        learning_rate=args.learning_rate, gate_learning_rate=args.gate_learning_rate, warmup_steps=10,
        eval_fraction=0.0, trainable="all", logging_steps=10,
        seed=0, trust_remote_code=False,
    )
    healing = train_bsbr.main(heal_args)
    timings["healing_s"] = time.perf_counter() - start
    start = time.perf_counter()
    control = fine_tune_stock(stock, train_text, out / "stock_fine_tuned", args)
    timings["control_fine_tune_s"] = time.perf_counter() - start

    models = {"stock GPT-2": stock, "stock GPT-2, fine-tuned (control)": control, "converted BSBR": converted,
              "healed BSBR": out / "healed"}
    perplexity = {}
    for name, folder in models.items():
        perplexity[name] = {
            str(n): evaluate_perplexity(folder, eval_text, max_length=n)["perplexity"] for n in args.lengths
        }
        logger.info("%s: %s", name, {n: round(p, 2) for n, p in perplexity[name].items()})
    results = {
        "chunk_size": args.chunk_size, "seq_len": args.seq_len, "stock_steps": args.stock_steps,
        "heal_steps": args.heal_steps, "conversion_chunk_delta": report.chunk_delta,
        "conversion_block_delta": report.block_delta, "healing": healing, "perplexity": perplexity,
        "eval_tokens": evaluate_perplexity(stock, eval_text, max_length=max(args.lengths))["tokens_scored"],
        "timings_s": timings,
    }
    (out / "bsbr_healing.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    plot(results, out / "bsbr_healing.png")

    print(f"{'window':>7} | " + " | ".join(f"{name:>22}" for name in perplexity))
    for n in args.lengths:
        print(f"{n:>7} | " + " | ".join(f"{perplexity[name][str(n)]:>22.2f}" for name in perplexity))
    print(f"wrote {out / 'bsbr_healing.json'} and {out / 'bsbr_healing.png'}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results/bsbr_healing"))
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="training window of all three trainings (<= 256)")
    parser.add_argument("--stock-steps", type=int, default=300, help="training steps of the local stock GPT-2")
    parser.add_argument("--heal-steps", type=int, default=100, help="steps of healing (and of the control fine-tune)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--gate-learning-rate", type=float, default=1e-2, help="healing: learning rate of the gates")
    parser.add_argument("--reuse-stock", action="store_true", help="reuse the stock GPT-2 of an earlier run")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--eval-chars", type=int, default=60_000, help="characters of held-out text to score")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
