"""Does the scaffold improve its base? Scaffolded GPT-2 against the base alone and against LoRA on the base at equal
trainable parameters and equal steps, with fuser-only and scaffold-only ablations and a scaffold_weight sweep.

Task (experiments/stdlib_pairs.py): a standard-library function's docstring -> its signature, as prompt/completion
pairs (prompt: the docstring's first paragraph, a newline and "def "; completion: `name(arguments)`, then eos).
Training pairs come from the offline base's training documents, test pairs from its held-out documents.

Every model starts from the offline base (experiments/offline_base.py), which is both the frozen base and the
scaffold (the design allows any GPT-2 with the same vocabulary; the same checkpoint keeps the comparison about the
fusion, not about a second, different model). Fusers follow base layers `--cross-attn-layers` (default: the middle
and the last layer). Arms, each trained on the same pairs, with the same validation split, epochs, batch, gradient
accumulation, learning rate and schedule (`graftlm train scaffold`'s defaults: AdamW 3e-4, linear, batch 1,
accumulation 4, 3 epochs, best validation epoch kept):
- **base**: the offline base, not trained on the task;
- **scaffolded**: `graftlm convert scaffold` + `graftlm train scaffold` (graftlm.train_scaffold.train): LoRA on the
  scaffold (r 8) and the fusers train;
- **lora**: peft LoRA on the base's c_attn, c_proj, c_fc at the rank whose parameter count is nearest to the
  scaffolded model's trainable count (alpha = 2 r and dropout 0.1 as the scaffold's), same loop;
- **fuser-only** (ablation): the scaffolded model with its LoRA adapters frozen at zero, only the fusers train;
- **scaffold-only** (ablation): the fusers frozen with random projections and gates set open at
  tanh(gate) = `--scaffold-only-gate`, only the scaffold's LoRA trains. (With the shipped closed gates a frozen
  fuser passes no gradient, so scaffold-only training would change nothing.)
- **sweep**: each trained scaffolded model evaluated at scaffold_weight in `--weights` (0 is the base exactly).
Measured: perplexity of the completion tokens (eos included) of the held-out pairs; differences with a paired
bootstrap over held-out documents (95%), per seed and pooled over seeds (per-document NLL averaged over seeds).

    python experiments/scaffold_gain.py                   # the default 6x256 base (build it first: wants a GPU)
    python experiments/scaffold_gain.py --base n_layer=2 n_embd=64 n_head=2 steps=300 seq_len=64 --threads 1

Cost: the small-base command above (with `--train-pairs 500 --weights 0 0.5 1 --ablation-seeds 0`) took about 45
minutes on this project's 2 CPU cores shared with other jobs: 2.5-8 minutes per trained arm.
"""

import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_base  # noqa: E402  (sibling scripts)
import stdlib_pairs  # noqa: E402
from dfa_allocation import ppl  # noqa: E402

logger = logging.getLogger("scaffold_gain")
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def prompt_pairs(rows):
    return [{"prompt": r["src"] + "\ndef ", "completion": r["tgt"], "document": r["document"]} for r in rows]


@torch.no_grad()
def document_nll(model, tokenizer, pairs, documents, scaffold, batch_size=16, **forward):
    """(summed completion NLL, completion tokens) per document, in the order of `documents`."""
    from graftlm.training.scaffold import TrainingOptions, collate_pairs, completion_loss_terms, encode_pair

    max_length = TrainingOptions().max_length  # as training encodes them
    model.eval()
    nll, count = torch.zeros(len(documents), dtype=torch.float64), torch.zeros(len(documents), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        batch = collate_pairs([encode_pair(tokenizer, r["prompt"], r["completion"], max_length) for r in rows],
                              tokenizer.eos_token_id)
        if not scaffold:
            batch = {k: v for k, v in batch.items() if not k.startswith("scaffold_")}
        sums, counts = completion_loss_terms(model, {**batch, **forward})
        stdlib_pairs.per_document(rows, documents, sums, counts, nll, count)
    return nll, count


def convert(base, layers):
    from graftlm.conversion.scaffold import convert_gpt2_to_scaffold

    model, _ = convert_gpt2_to_scaffold(str(base), str(base), cross_attn_layers=layers)
    return model


def train_lora_base(base, rank, tokenizer, train_pairs, valid_pairs, options):
    """peft LoRA on the base GPT-2, trained as graftlm.train_scaffold.train trains (`graftlm train scaffold`): same
    pairs and encoding, completion-only loss, AdamW, linear schedule, accumulation, clipping, epochs and best
    validation epoch kept (the shuffling order differs: accelerate's seeded sampler there, a seeded loader here)."""
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

    from graftlm.training.scaffold import collate_pairs, completion_loss_terms, encode_pair

    set_seed(options.seed)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=LORA_TARGETS, fan_in_fan_out=True, bias="none"))
    encode = lambda pairs: [encode_pair(tokenizer, p["prompt"], p["completion"], options.max_length)  # noqa: E731
                            for p in pairs]
    plain = lambda batch: {k: v for k, v in batch.items() if not k.startswith("scaffold_")}  # noqa: E731
    collate = lambda examples: plain(collate_pairs(examples, tokenizer.eos_token_id))  # noqa: E731
    loader = torch.utils.data.DataLoader(encode(train_pairs), batch_size=options.batch_size, shuffle=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(options.seed))
    valid = [collate([e]) for e in encode(valid_pairs)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=options.weight_decay)
    steps = math.ceil(len(loader) / options.gradient_accumulation_steps) * options.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    best, best_state = math.inf, None
    for _ in range(options.epochs):
        model.train()
        for i, batch in enumerate(loader):
            (model(**batch, use_cache=False).loss / options.gradient_accumulation_steps).backward()
            if (i + 1) % options.gradient_accumulation_steps == 0 or i + 1 == len(loader):
                torch.nn.utils.clip_grad_norm_(trainable, options.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            terms = [completion_loss_terms(model, b) for b in valid]
        loss = sum(float(s.sum()) for s, _ in terms) / sum(int(c.sum()) for _, c in terms)
        if loss < best:
            best, best_state = loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in best_state:
                param.copy_(best_state[name])
    return model.eval(), steps


def trainable_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank_for(base, target):
    """The LoRA rank on the base whose trainable count is nearest to `target`, and that count."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    config = LoraConfig(r=1, target_modules=LORA_TARGETS, fan_in_fan_out=True)
    per_rank = trainable_count(get_peft_model(GPT2LMHeadModel.from_pretrained(base), config))
    rank = max(1, round(target / per_rank))
    return rank, rank * per_rank


def train_scaffold_arm(base, layers, tokenizer, train_pairs, valid_pairs, options, arm, open_gate):
    from graftlm.training.scaffold import train

    # The fusers' projections and the LoRA A matrices are drawn at conversion from the global RNG, which train() seeds
    # only later: seed it here, or the arm depends on what ran before it in the process (earlier arms, --resume) and
    # on torch's start seed, which differs from process to process.
    torch.manual_seed(options.seed)
    model = convert(base, layers).add_lora()
    if arm == "fuser-only":
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(False)
    elif arm == "scaffold-only":
        model.config.train_fuser = False
        model.freeze_base()
        with torch.no_grad():
            for fuser in model.fusers.values():
                fuser.gate.fill_(math.atanh(open_gate))
    count = trainable_count(model)
    result = train(model, tokenizer, train_pairs, valid_pairs, options)
    return model, count, result


def run(args):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from graftlm.training.scaffold import TrainingOptions, split_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    base = offline_base.base_checkpoint(**args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    n_layer = GPT2LMHeadModel.config_class.from_pretrained(base).n_layer
    layers = args.cross_attn_layers or sorted({n_layer // 2 - 1 if n_layer > 1 else 0, n_layer - 1})
    train_rows, test_rows = stdlib_pairs.docstring_signature_pairs(args.train_pairs)
    test = prompt_pairs(test_rows)
    documents = sorted({p["document"] for p in test})
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    score = lambda model, scaffold, **kw: document_nll(model, tokenizer, test, documents, scaffold, **kw)  # noqa: E731
    base_nll, count = score(GPT2LMHeadModel.from_pretrained(base), scaffold=False)
    probe = convert(base, layers).add_lora()
    scaffold_trainable = trainable_count(probe)
    rank, lora_trainable = lora_rank_for(base, scaffold_trainable)
    del probe

    generator = torch.Generator().manual_seed(0)
    nll = {}  # (arm, seed) -> per-document NLL
    runs = []
    partial = out / "runs.partial.json"  # every finished run, so that --resume skips it
    if args.resume and partial.is_file():
        saved = json.loads(partial.read_text(encoding="utf-8"))
        runs = [r for r in saved["runs"] if r["seed"] in args.seeds]
        nll = {(arm, r["seed"]): torch.tensor(v, dtype=torch.float64) for r in runs for arm, v in r["nll"].items()}
    for seed in args.seeds:
        train_pairs, valid_pairs = split_pairs(prompt_pairs(train_rows), 0.2, seed)
        options = TrainingOptions(seed=seed, samples_per_epoch=0, epochs=args.epochs)
        arms = ["scaffolded", "lora"] + (["fuser-only", "scaffold-only"] if seed in args.ablation_seeds else [])
        for arm in arms:
            if (arm, seed) in nll:
                continue
            start = time.perf_counter()
            if arm == "lora":
                model, steps = train_lora_base(str(base), rank, tokenizer, train_pairs, valid_pairs, options)
                record = {"trainable": trainable_count(model), "optimizer_steps": steps}
                nll[arm, seed], _ = score(model, scaffold=False)
            else:
                model, trainable, result = train_scaffold_arm(base, layers, tokenizer, train_pairs, valid_pairs,
                                                              options, arm, args.scaffold_only_gate)
                record = {"trainable": trainable, "gates": model.gate_values(),
                          "valid_loss": [result.initial_valid_loss, result.best_valid_loss],
                          "epochs_run": result.epochs_run}
                nll[arm, seed], _ = score(model, scaffold=True)
                if arm == "scaffolded":
                    for weight in args.weights:
                        nll[f"scaffolded@w={weight:g}", seed], _ = score(model, scaffold=True, scaffold_weight=weight)
            record.update(arm=arm, seed=seed, seconds=round(time.perf_counter() - start, 1),
                          perplexity=ppl(nll[arm, seed], count))
            logger.info("%s", record)
            record["nll"] = {k: v.tolist() for (k, s), v in nll.items() if s == seed and k.split("@")[0] == arm}
            runs.append(record)
            partial.write_text(json.dumps({"command": sys.argv, "runs": runs}), encoding="utf-8")

    def compare(arm, reference, seeds):
        a = torch.stack([nll[arm, s] for s in seeds]).mean(0)
        b = base_nll if reference == "base" else torch.stack([nll[reference, s] for s in seeds]).mean(0)
        return {"reference": reference, "seeds": list(seeds),
                **stdlib_pairs.difference(a, b, count, args.bootstrap, generator)}

    table = []
    for seed in args.seeds:
        table += [dict(row="per seed", arm=arm, **compare(arm, ref, [seed]))
                  for arm, ref in (("scaffolded", "base"), ("lora", "base"), ("scaffolded", "lora"))]
        if seed in args.ablation_seeds:
            table += [dict(row="ablation, 1 seed", arm=arm, **compare(arm, "scaffolded", [seed]))
                      for arm in ("fuser-only", "scaffold-only")]
    table += [dict(row="pooled", arm=arm, **compare(arm, ref, args.seeds))
              for arm, ref in (("scaffolded", "base"), ("lora", "base"), ("scaffolded", "lora"))]
    if len(args.ablation_seeds) > 1:  # each ablation against the scaffolded model of the same seeds
        table += [dict(row="ablation, pooled", arm=arm, **compare(arm, "scaffolded", args.ablation_seeds))
                  for arm in ("fuser-only", "scaffold-only")]
    table += [dict(row="sweep, pooled", arm=f"scaffolded@w={w:g}", **compare(f"scaffolded@w={w:g}", "base", args.seeds))
              for w in args.weights]
    results = {
        "command": "python " + shlex.join(sys.argv), "base": str(base), "seeds": args.seeds,
        "ablation_seeds": args.ablation_seeds, "cross_attn_layers": layers, "train_pairs": len(train_rows),
        "test_pairs": len(test), "test_documents": len(documents), "test_tokens": int(count.sum()),
        "base_perplexity": ppl(base_nll, count), "scaffold_trainable": scaffold_trainable, "lora_rank": rank,
        "lora_trainable": lora_trainable, "epochs": args.epochs, "runs": runs, "table": table,
    }
    (out / "scaffold_gain.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, out / "scaffold_gain.png")
    print(f"{results['command']}\nbase {base.name}; fusers after layers {layers}; {len(train_rows)} training pairs "
          f"(80% train, 20% validation), {len(test)} test pairs from {len(documents)} held-out documents, "
          f"{int(count.sum())} completion tokens; trainable: scaffolded {scaffold_trainable:,}, LoRA on base r={rank} "
          f"{lora_trainable:,}; base perplexity {results['base_perplexity']:.2f}")
    print(f"{'row':>16} | {'arm':>20} | {'seeds':>7} | {'ppl':>8} | {'vs':>10} | {'ref ppl':>8} | difference [95% CI]")
    for r in table:
        print(f"{r['row']:>16} | {r['arm']:>20} | {','.join(map(str, r['seeds'])):>7} | {r['perplexity']:>8.2f} | "
              f"{r['reference']:>10} | {r['reference_perplexity']:>8.2f} | {r['difference']:+8.2f} "
              f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]")
    print(f"wrote {out / 'scaffold_gain.json'} and {out / 'scaffold_gain.png'}")
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    pooled = any(r["row"] == "ablation, pooled" for r in results["table"])
    shown = ("pooled", "ablation, pooled" if pooled else "ablation, 1 seed")
    rows = [r for r in results["table"] if r["row"] in shown and r["reference"] != "lora"]
    names = ["base"] + [f"{r['arm']} ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''})" for r in rows]
    values = [results["base_perplexity"]] + [r["perplexity"] for r in rows]
    left.bar(range(len(values)), values, color=["grey"] + ["C0"] * len(rows))
    left.set_xticks(range(len(values)), names, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("held-out completion perplexity")
    left.set_title("docstring -> signature, held-out documents")
    sweep = [r for r in results["table"] if r["row"] == "sweep, pooled"]
    weights = [float(r["arm"].split("=")[1]) for r in sweep]
    right.plot(weights, [r["perplexity"] for r in sweep], marker="o")
    right.fill_between(weights, [r["reference_perplexity"] + r["ci95"][0] for r in sweep],
                       [r["reference_perplexity"] + r["ci95"][1] for r in sweep], alpha=0.2,
                       label="base + 95% CI of the difference")
    right.set_xlabel("scaffold_weight at inference")
    right.set_ylabel("perplexity (pooled over seeds)")
    right.set_title("scaffold_weight sweep of the trained scaffolded model")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = stdlib_pairs.argument_parser(__doc__, "scaffold_gain")
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=None,
                        help="seeds that also train the fuser-only and scaffold-only ablations (default: all)")
    parser.add_argument("--train-pairs", type=int, default=4000, help="training + validation pairs (80/20)")
    parser.add_argument("--epochs", type=int, default=3, help="graftlm train scaffold's default")
    parser.add_argument("--cross-attn-layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="base layers followed by a fuser (default: the middle and the last)")
    parser.add_argument("--scaffold-only-gate", type=float, default=0.5, help="tanh(gate) of the frozen fusers")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs in <output-dir>/runs.partial.json (same settings assumed)")
    args = parser.parse_args(argv)
    args.base = dict(args.base)
    if not 0 < args.scaffold_only_gate < 1:
        parser.error("--scaffold-only-gate must be in (0, 1)")
    args.ablation_seeds = args.seeds if args.ablation_seeds is None else args.ablation_seeds
    unknown = set(args.ablation_seeds) - set(args.seeds)
    if unknown:
        parser.error(f"--ablation-seeds {sorted(unknown)} are not in --seeds")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
