"""GPT2-DFA against a plain fine-tune of the same base at equal steps: held-out perplexity, and whether the gates
give fewer heads to easy predictions (the seed's claim), over several seeds with 95% confidence intervals.

For each seed, from the offline base (experiments/offline_base.py; the same checkpoint for every run):
- **plain**: the stock GPT-2 fine-tuned with transformers' Trainer on the base corpus's training documents;
- **DFA**: the base converted with `graftlm convert dfa`'s defaults and trained by `graftlm train dfa`'s code with
  its shipped defaults (own learning rates for gates, masks and lambda), same data, steps, batch, learning rate, seed.
Measured on held-out documents (whole documents the base never saw):
- perplexity of each model, and the paired bootstrap over documents of DFA - plain (per seed, and pooled over seeds);
- at every position, DFA's effective number of heads (exp of the gate distribution's entropy, mean over layers)
  against the stock base's surprisal of the token that position predicts: Spearman's rho, with a 95% bootstrap
  interval over documents, beside a shuffled-gate control (the same gate values permuted across positions).
  The claim predicts rho > 0 (harder predictions draw more heads).
Perplexity against latency after prune() versus head-importance pruning at equal size: experiments/dfa_pruning.py.

Writes dfa_allocation.json and dfa_allocation.png, prints the table and the command line.

    python experiments/dfa_allocation.py                                  # the default base (build it first: slow on CPU)
    python experiments/dfa_allocation.py --base n_layer=2 n_embd=128 steps=300 seq_len=128   # a small base, CPU
"""

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_base  # noqa: E402  (the sibling script, shared by every experiment)

logger = logging.getLogger("dfa_allocation")


def corpus_split(train_chars, eval_docs, doc_tokens, tokenizer):
    """(training text, [held-out token tensors]) from the offline base's corpus, held-out documents as it holds them."""
    train, held_out = [], []
    for name, text in offline_base.corpus_documents():
        (held_out if offline_base.is_held_out(name) else train).append(text)
    text = "\n\n".join(train)[:train_chars]
    docs = [torch.tensor(tokenizer(t, add_special_tokens=False).input_ids[:doc_tokens]) for t in held_out]
    return text, [d for d in docs if d.numel() >= 16][:eval_docs]


def training_args(base, text_file, output_dir, args, seed):
    from graftlm.training import dfa as train_dfa

    parser = argparse.ArgumentParser()
    train_dfa.add_arguments(parser)
    return parser.parse_args(["--model", str(base), "--text", str(text_file), "--output-dir", str(output_dir),
                              "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                              "--seq-len", str(args.seq_len), "--learning-rate", str(args.learning_rate),
                              "--eval-fraction", "0", "--seed", str(seed), "--overwrite"])


def fine_tune_plain(base, text_file, output_dir, train_args):
    """The control: the stock base under the same Trainer, data, steps and AdamW (no weight decay) as DFA."""
    from transformers import AutoTokenizer, GPT2LMHeadModel, Trainer

    from graftlm.training.common import make_optimizer, trainer_arguments
    from graftlm.training.data import split_blocks

    model = GPT2LMHeadModel.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(Path(text_file).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    train_set, _ = split_blocks(ids, train_args.seq_len, 0.0)
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = Trainer(model=model, args=trainer_arguments(train_args, work_dir, lr_scheduler_type="cosine"),
                          train_dataset=train_set,
                          optimizers=(make_optimizer(model, train_args.learning_rate, {}, weight_decay=0.0), None))
        trainer.train()
    model.save_pretrained(output_dir)
    return model.cpu().eval()  # scored where the DFA model is loaded (load_model_and_tokenizer: the CPU)


@torch.no_grad()
def score(model, docs, window, eos, gates=False):
    """Per document: (summed NLL, tokens) in disjoint windows, the first token from eos; with gates, also per
    position the effective heads and the NLL of the token that position predicts."""
    nll, count, heads, position_nll = [], [], [], []
    for doc in docs:
        sequence = torch.cat([doc.new_tensor([eos]), doc])
        total, effective, losses = 0.0, [], []
        for start in range(0, doc.numel(), window):
            ids = sequence[start : start + window + 1]
            out = model(input_ids=ids[None, :-1], use_cache=False, **({"output_gates": True} if gates else {}))
            loss = torch.nn.functional.cross_entropy(out.logits[0].float(), ids[1:], reduction="none")
            total += loss.sum().item()
            losses.append(loss)
            if gates:
                n_head = model.config.n_head
                per_layer = []
                for g in out.gates:
                    p = g[0].expand(ids.numel() - 1, -1) / n_head
                    per_layer.append((-(p * p.clamp_min(1e-12).log()).sum(-1)).exp())
                effective.append(torch.stack(per_layer).mean(0))
        nll.append(total)
        count.append(doc.numel())
        position_nll.append(torch.cat(losses))
        if gates:
            heads.append(torch.cat(effective))
    return torch.tensor(nll, dtype=torch.float64), torch.tensor(count, dtype=torch.float64), heads, position_nll


def spearman(x, y):
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731  (continuous values: ties have measure zero)
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def bootstrap(statistic, n_docs, samples, generator):
    """2.5 and 97.5 percentiles of statistic(document indices) over resamples of the documents."""
    values = torch.tensor([statistic(torch.randint(0, n_docs, (n_docs,), generator=generator))
                           for _ in range(samples)])
    return float(values.quantile(0.025)), float(values.quantile(0.975))


def ppl(nll, count, index=None):
    index = slice(None) if index is None else index
    return math.exp(float(nll[index].sum() / count[index].sum()))


def plot(results, heads, surprisal, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = [str(s) for s in results["seeds"]]
    for offset, name in ((-0.15, "plain"), (0.15, "dfa")):
        values = [results["per_seed"][s][f"{name}_perplexity"] for s in seeds]
        left.bar([i + offset for i in range(len(seeds))], values, width=0.3, label=name)
    left.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    left.set_ylabel("held-out perplexity")
    left.set_title("plain fine-tune vs GPT2-DFA, equal steps")
    left.legend()
    bins = torch.quantile(surprisal, torch.linspace(0, 1, 11, dtype=surprisal.dtype))
    which = torch.bucketize(surprisal, bins[1:-1])
    right.plot([float(surprisal[which == b].mean()) for b in range(10)],
               [float(heads[which == b].mean()) for b in range(10)], marker="o")
    right.set_xlabel("stock surprisal of the predicted token (nats, deciles)")
    right.set_ylabel("DFA effective heads (mean over layers)")
    right.set_title(f"seed {seeds[0]}: rho = {results['per_seed'][seeds[0]]['spearman']:.3f}")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from graftlm.training import dfa as train_dfa
    from graftlm.conversion.dfa import convert_gpt2_to_dfa, model_card
    from graftlm.conversion.common import load_tokenizer
    from graftlm.export import export_model
    from graftlm.inference import load_model_and_tokenizer

    base = offline_base.base_checkpoint(**args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    text, docs = corpus_split(args.train_chars, args.eval_docs, args.doc_tokens, tokenizer)
    text_file = out / "train_text.txt"
    text_file.write_text(text, encoding="utf-8")
    eos = tokenizer.eos_token_id
    stock = GPT2LMHeadModel.from_pretrained(base).eval()
    stock_nll, count, _, stock_surprisal = score(stock, docs, args.seq_len, eos)
    model, report = convert_gpt2_to_dfa(base)
    converted = export_model(model, out / "converted", tokenizers={"": load_tokenizer(base)},
                             card=model_card(report, str(out / "converted")), overwrite=True)

    generator = torch.Generator().manual_seed(0)
    per_seed, pooled = {}, {"plain": [], "dfa": []}
    for seed in args.seeds:
        train_args = training_args(converted, text_file, out / f"dfa-seed{seed}", args, seed)
        metrics = train_dfa.main(train_args)
        dfa, _ = load_model_and_tokenizer(out / f"dfa-seed{seed}")
        plain = fine_tune_plain(base, text_file, out / f"plain-seed{seed}", train_args)
        plain_nll, _, _, _ = score(plain, docs, args.seq_len, eos)
        dfa_nll, _, heads, _ = score(dfa.eval(), docs, args.seq_len, eos, gates=True)
        pooled["plain"].append(plain_nll)
        pooled["dfa"].append(dfa_nll)
        all_heads, all_surprisal = torch.cat(heads).double(), torch.cat(stock_surprisal).double()
        owner = torch.cat([torch.full((h.numel(),), i) for i, h in enumerate(heads)])
        rho = spearman(all_heads, all_surprisal)
        rho_ci = bootstrap(lambda idx: spearman(torch.cat([heads[i] for i in idx]).double(),
                                                torch.cat([stock_surprisal[i] for i in idx]).double()),
                           len(docs), args.bootstrap // 10, generator)
        shuffled = [spearman(all_heads[torch.randperm(all_heads.numel(), generator=generator)], all_surprisal)
                    for _ in range(args.bootstrap // 10)]
        shuffled = torch.tensor(shuffled)
        per_seed[str(seed)] = {
            "plain_perplexity": ppl(plain_nll, count), "dfa_perplexity": ppl(dfa_nll, count),
            "dfa_minus_plain_ci95": bootstrap(lambda idx: ppl(dfa_nll, count, idx) - ppl(plain_nll, count, idx),
                                              len(docs), args.bootstrap, generator),
            "spearman": rho, "spearman_ci95": rho_ci,
            "shuffled_spearman_ci95": (float(shuffled.quantile(0.025)), float(shuffled.quantile(0.975))),
            "effective_heads_mean": float(all_heads.mean()), "effective_heads_std": float(all_heads.std()),
            "positions": int(owner.numel()), "entropy_weight": metrics["entropy_weight"],
            "active_dim_fraction": metrics["active_dim_fraction"],
        }
        logger.info("seed %s: %s", seed, per_seed[str(seed)])
        if seed == args.seeds[0]:
            first_heads, first_surprisal = all_heads, all_surprisal
    plain_nll, dfa_nll = torch.stack(pooled["plain"]).mean(0), torch.stack(pooled["dfa"]).mean(0)
    results = {
        "command": "python " + shlex.join(sys.argv), "base": str(base), "seeds": args.seeds,
        "held_out_documents": len(docs), "held_out_tokens": int(count.sum()), "train_chars": len(text),
        "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "stock_perplexity": ppl(stock_nll, count),
        "per_seed": per_seed,
        "pooled": {"plain_perplexity": ppl(plain_nll, count), "dfa_perplexity": ppl(dfa_nll, count),
                   "dfa_minus_plain_ci95": bootstrap(lambda idx: ppl(dfa_nll, count, idx) - ppl(plain_nll, count, idx),
                                                     len(docs), args.bootstrap, generator)},
    }
    (out / "dfa_allocation.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, first_heads, first_surprisal, out / "dfa_allocation.png")
    print(f"{results['command']}\nbase {base.name}; {len(docs)} held-out documents, {int(count.sum())} tokens; "
          f"stock base perplexity {results['stock_perplexity']:.2f}")
    print(f"{'seed':>6} | {'plain ppl':>9} | {'DFA ppl':>8} | {'DFA - plain [95% CI]':>24} | "
          f"{'rho(heads, surprisal) [95% CI]':>30} | {'shuffled rho 95%':>17} | {'heads':>10}")
    for seed, r in per_seed.items():
        lo, hi = r["dfa_minus_plain_ci95"]
        print(f"{seed:>6} | {r['plain_perplexity']:>9.2f} | {r['dfa_perplexity']:>8.2f} | "
              f"{r['dfa_perplexity'] - r['plain_perplexity']:>+7.2f} [{lo:+7.2f}, {hi:+7.2f}] | "
              f"{r['spearman']:>+8.3f} [{r['spearman_ci95'][0]:+.3f}, {r['spearman_ci95'][1]:+.3f}]    | "
              f"[{r['shuffled_spearman_ci95'][0]:+.3f}, {r['shuffled_spearman_ci95'][1]:+.3f}] | "
              f"{r['effective_heads_mean']:.2f}+-{r['effective_heads_std']:.2f}")
    p = results["pooled"]
    print(f"{'pooled':>6} | {p['plain_perplexity']:>9.2f} | {p['dfa_perplexity']:>8.2f} | "
          f"{p['dfa_perplexity'] - p['plain_perplexity']:>+7.2f} [{p['dfa_minus_plain_ci95'][0]:+7.2f}, "
          f"{p['dfa_minus_plain_ci95'][1]:+7.2f}] |")
    print(f"wrote {out / 'dfa_allocation.json'} and {out / 'dfa_allocation.png'}")
    return results


def base_setting(text):
    key, _, value = text.partition("=")
    if key not in offline_base.DEFAULTS:
        raise argparse.ArgumentTypeError(f"unknown base setting {key!r}; known: {', '.join(offline_base.DEFAULTS)}")
    return key, type(offline_base.DEFAULTS[key])(value)


def add_arguments(parser, name):
    """The base, the two fine-tunings, the held-out scoring and the bootstrap (experiments/dfa_pruning.py shares them);
    results go to bench/results/<name> by default."""
    parser.add_argument("--base", type=base_setting, nargs="*", default=[],
                        help="offline base settings KEY=VALUE (experiments/offline_base.py DEFAULTS)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results") / name)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of both models")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--train-chars", type=int, default=2_000_000, help="characters of training documents")
    parser.add_argument("--eval-docs", type=int, default=32, help="held-out documents scored")
    parser.add_argument("--doc-tokens", type=int, default=1024, help="tokens scored per held-out document (its start)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    add_arguments(parser, "dfa_allocation")
    args = parser.parse_args(argv)
    args.base = dict(args.base)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
