"""GPT2-DFA's prune() against head-importance pruning of a plain fine-tune at the same size: held-out perplexity
against measured prefill and decode latency, over several seeds with 95% confidence intervals.

For each seed, from the offline base (experiments/offline_base.py), the two models of experiments/dfa_allocation.py
(its code): **plain**, the stock GPT-2 fine-tuned by transformers' Trainer, and **DFA**, `graftlm convert dfa`
(mask_sparsity_weight from --mask-sparsity-weight, the shipped 0.1 by default) trained by `graftlm train dfa`'s code,
same data, steps, batch, learning rate and seed. Then:
- **DFA pruned**: `DFAForCausalLM.prune(threshold=t)` of a copy of the trained DFA for every t in --thresholds (head
  dimensions whose mask is below t go; heads are kept);
- **head-importance pruned**: the plain model with its least important heads removed, importance as in Michel, Levy
  & Neubig 2019 ("Are Sixteen Heads Really Better than One?", arXiv:1905.10650, eq. 2 and sec. 4.2): I_h = mean over
  calibration windows (training text, never the held-out documents) of |dL/d xi_h|, xi_h = 1 a gate on head h's
  output, each layer's scores divided by their l2 norm; heads removed in increasing importance, at least one kept
  per layer. Every count of removed heads is built (the curve); the one **matched** to a DFA threshold is the count
  whose removed attention parameters (weights and biases of c_attn and c_proj) are nearest to what prune() removed
  (ties: fewer heads). DFA's own gate and mask parameters are not attention parameters in this count.
Measured: held-out perplexity of every model (whole documents the base never saw) with the paired bootstrap over
documents of DFA pruned - matched head-pruned (per seed, and pooled over seeds); latency on --threads CPU threads
(default one): prefill (one forward over the first --prompt-tokens of a held-out document, filling the cache) and
decode (its next --new-tokens fed one at a time with the cache, per token), of the whole model and of its body
(model.transformer, without the vocabulary projection, which dominates a tiny model's time and no pruning touches);
the median of --repeats rounds, each timing every model once in a shuffled order, as ratios to the unpruned plain
model (stock GPT-2 shapes) of the same seed.

Writes dfa_pruning.json and dfa_pruning.png, prints the table and the command line.

    python experiments/dfa_pruning.py                                     # the default base (build it first: slow on CPU)
    python experiments/dfa_pruning.py --base n_layer=2 n_embd=64 n_head=4 steps=300 seq_len=64 --steps 100 --seq-len 64
"""

import argparse
import copy
import json
import logging
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dfa_allocation  # noqa: E402  (the sibling script: corpus split, the two trainings, scoring, bootstrap)
import offline_base  # noqa: E402

logger = logging.getLogger("dfa_pruning")
TIMINGS = ("prefill", "decode", "body_prefill", "body_decode")  # latency()'s four figures, in its order


def head_gates(model, gates):
    """Forward pre-hooks scaling each head's output by gates[layer, head] before c_proj (its input is the heads'
    outputs side by side); returns the hook handles."""
    def scale(layer):
        def hook(module, args):
            heads = args[0].unflatten(-1, (gates.shape[1], -1))
            return (heads * gates[layer, :, None].to(heads.dtype)).flatten(-2),
        return hook

    return [block.attn.c_proj.register_forward_pre_hook(scale(i)) for i, block in enumerate(model.transformer.h)]


def head_importance(model, windows):
    """(layers, heads) Michel et al.'s importance: mean over windows of |dL/d xi| at xi = 1, unnormalised."""
    gates = torch.ones(model.config.n_layer, model.config.n_head, requires_grad=True)
    handles = head_gates(model, gates)
    total = torch.zeros_like(gates)
    try:
        for ids in windows:
            loss = model(input_ids=ids[None], labels=ids[None], use_cache=False).loss
            total += torch.autograd.grad(loss, gates)[0].abs()
    finally:
        for handle in handles:
            handle.remove()
    return total / len(windows)


def pruning_order(importance):
    """(layer, head) pairs in the order they are removed: lowest layer-normalised importance first, skipping the
    last head of a layer."""
    scores = importance / importance.norm(dim=1, keepdim=True)
    left = [scores.shape[1]] * scores.shape[0]
    order = []
    for flat in scores.flatten().argsort().tolist():
        layer, head = divmod(flat, scores.shape[1])
        if left[layer] > 1:
            left[layer] -= 1
            order.append((layer, head))
    return order


@torch.no_grad()
def remove_heads(model, heads):
    """A copy of a stock GPT2LMHeadModel without `heads` ((layer, original head) pairs). transformers 5 has no
    prune_heads(); GPT2Attention reshapes with -1 heads of head_dim, so narrower c_attn and c_proj are enough.
    The per-layer head counts do not fit GPT2Config: the copy is for measuring, not for saving."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    n_head, d = model.config.n_head, model.config.n_embd // model.config.n_head
    for i, block in enumerate(model.transformer.h):
        keep = torch.tensor([h for h in range(n_head) if (i, h) not in heads])
        rows = (keep[:, None] * d + torch.arange(d)).flatten()  # this layer's kept head dimensions
        cols = torch.cat([rows + part * n_head * d for part in range(3)])  # c_attn columns: [q | k | v]
        attn = block.attn
        c_attn = Conv1D(len(cols), attn.c_attn.weight.shape[0]).to(attn.c_attn.weight)
        c_attn.weight.copy_(attn.c_attn.weight[:, cols])
        c_attn.bias.copy_(attn.c_attn.bias[cols])
        c_proj = Conv1D(attn.c_proj.weight.shape[1], len(rows)).to(attn.c_proj.weight)
        c_proj.weight.copy_(attn.c_proj.weight[rows])
        c_proj.bias.copy_(attn.c_proj.bias)
        attn.c_attn, attn.c_proj = c_attn, c_proj
        attn.split_size, attn.num_heads = len(rows), len(keep)
    return model


def attention_parameters(model):
    """Weights and biases of every layer's c_attn and c_proj (stock GPT-2 and GPT2-DFA name them alike)."""
    return sum(p.numel() for block in model.transformer.h for p in (*block.attn.c_attn.parameters(),
                                                                    *block.attn.c_proj.parameters()))


def matched(removed, head_removed):
    """Index of the head-pruned model whose removed attention parameters are nearest `removed` (ties: fewer heads)."""
    return min(range(len(head_removed)), key=lambda k: (abs(head_removed[k] - removed), k))


@torch.no_grad()
def latency(models, tokens, prompt_tokens, repeats, seed):
    """{name: [prefill, decode] x [whole model, body]} median seconds: prefill = one forward over the first
    prompt_tokens of `tokens` filling a cache, decode = the rest fed one token at a time with the cache (per token);
    body = model.transformer alone, without the vocabulary projection. Each round times every model once, in a
    shuffled order, after one untimed warm-up round."""
    from graftlm.modeling.hf_compat import cache_kwargs, cache_of

    def once(module):
        start = time.perf_counter()
        cache = cache_of(module(input_ids=tokens[:, :prompt_tokens], use_cache=True))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(prompt_tokens, tokens.shape[1]):
            cache = cache_of(module(input_ids=tokens[:, i : i + 1], use_cache=True, **cache_kwargs(cache)))
        return prefill, (time.perf_counter() - start) / (tokens.shape[1] - prompt_tokens)

    shuffle = random.Random(seed)
    times = {name: [] for name in models}
    for round_ in range(repeats + 1):
        names = list(models)
        shuffle.shuffle(names)
        for name in names:
            measured = once(models[name]) + once(models[name].transformer)
            if round_:
                times[name].append(measured)
    return {name: [statistics.median(t[j] for t in rows) for j in range(4)] for name, rows in times.items()}


def convert(base, out, mask_sparsity_weight):
    from graftlm.conversion.common import load_tokenizer
    from graftlm.conversion.dfa import convert_gpt2_to_dfa, model_card
    from graftlm.export import export_model

    model, report = convert_gpt2_to_dfa(base, mask_sparsity_weight=mask_sparsity_weight)
    return export_model(model, out / "converted", tokenizers={"": load_tokenizer(base)},
                        card=model_card(report, str(out / "converted")), overwrite=True)


def run_seed(seed, args, base, converted, text_file, docs, count, calibration, prompt, generator):
    from graftlm import train_dfa
    from graftlm.inference import load_model_and_tokenizer

    out, eos = args.output_dir, args.eos
    train_args = dfa_allocation.training_args(converted, text_file, out / f"dfa-seed{seed}", args, seed)
    train_args.gate_learning_rate = args.gate_learning_rate
    metrics = train_dfa.main(train_args)
    dfa, _ = load_model_and_tokenizer(out / f"dfa-seed{seed}")
    dfa.eval()
    plain = dfa_allocation.fine_tune_plain(base, text_file, out / f"plain-seed{seed}", train_args)
    masks = [m.detach() for block in dfa.transformer.h for m in block.attn.dim_masks()]
    qk_v = torch.cat([torch.cat([(q * k).flatten(), v.flatten()]) for q, k, v in zip(*[iter(masks)] * 3)])

    importance = head_importance(plain, calibration)
    order = pruning_order(importance)
    heads = [plain] + [remove_heads(plain, set(order[:k])) for k in range(1, len(order) + 1)]
    total = attention_parameters(plain)
    head_removed = [total - attention_parameters(m) for m in heads]
    pruned, dfa_removed = [], []
    for threshold in args.thresholds:
        model = copy.deepcopy(dfa)
        model.prune(threshold=threshold)
        pruned.append(model)
        dfa_removed.append(attention_parameters(dfa) - attention_parameters(model))
    match = [matched(r, head_removed) for r in dfa_removed]

    models = {"plain": plain, "dfa": dfa, **{f"heads-{k}": m for k, m in enumerate(heads) if k},
              **{f"dfa-t{t}": m for t, m in zip(args.thresholds, pruned)}}
    nll = {name: dfa_allocation.score(m, docs, args.seq_len, eos)[0] for name, m in models.items()}
    nll["heads-0"] = nll["plain"]
    times = latency(models, prompt, args.prompt_tokens, args.repeats, seed)
    times["heads-0"] = times["plain"]
    ppl = {name: dfa_allocation.ppl(v, count) for name, v in nll.items()}

    def measured(name):
        return {"perplexity": ppl[name], **{f"{kind}_ratio": t / reference for kind, t, reference in
                                             zip(TIMINGS, times[name], times["plain"])}}

    rows = []
    for t, removed, k in zip(args.thresholds, dfa_removed, match):
        a, b = nll[f"dfa-t{t}"], nll[f"heads-{k}"]
        rows.append({"threshold": t, "dfa_removed_attention_parameters": removed, "matched_heads_removed": k,
                     "heads_removed_attention_parameters": head_removed[k],
                     "dfa": measured(f"dfa-t{t}"), "heads": measured(f"heads-{k}"),
                     "dfa_minus_heads_ci95": dfa_allocation.bootstrap(
                         lambda idx: dfa_allocation.ppl(a, count, idx) - dfa_allocation.ppl(b, count, idx),
                         len(docs), args.bootstrap, generator)})
    result = {
        "attention_parameters": total, "train_loss": metrics["train_loss"],
        "active_dim_fraction": metrics["active_dim_fraction"], "entropy_weight": metrics["entropy_weight"],
        "qk_v_mask_quantiles": {str(q): float(qk_v.quantile(q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)},
        "head_importance": importance.tolist(), "pruning_order": order,
        "head_curve": [{"heads_removed": k, "attention_parameters_removed": head_removed[k],
                        **measured(f"heads-{k}")} for k in range(len(heads))],
        "unpruned": {name: {**measured(name), **{f"{kind}_s": t for kind, t in zip(TIMINGS, times[name])}}
                     for name in ("plain", "dfa")},
        "thresholds": rows,
    }
    return result, nll, match


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, which in zip(axes, ("decode", "body_decode", "body_prefill")):
        for i, (seed, r) in enumerate(results["per_seed"].items()):
            label = (lambda text: text) if i == 0 else (lambda text: None)
            curve = r["head_curve"]
            axis.plot([c[f"{which}_ratio"] for c in curve], [c["perplexity"] for c in curve], "o-", color="C0",
                      alpha=0.7, label=label("plain, head-importance pruned (0, 1, ... heads)"))
            axis.plot([t["dfa"][f"{which}_ratio"] for t in r["thresholds"]], [t["dfa"]["perplexity"] for t in r["thresholds"]],
                      "s-", color="C1", alpha=0.7, label=label("DFA prune(threshold)"))
            dfa = r["unpruned"]["dfa"]
            axis.plot([dfa[f"{which}_ratio"]], [dfa["perplexity"]], "*", color="C3", markersize=10,
                      label=label("DFA unpruned"))
        axis.set_xlabel(f"{which.replace('_', ' ')} latency / unpruned plain (same seed)")
        axis.set_ylabel("held-out perplexity")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("perplexity against latency: DFA prune() vs head-importance pruning (each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args):
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    base = offline_base.base_checkpoint(**args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    text, docs = dfa_allocation.corpus_split(args.train_chars, args.eval_docs, args.doc_tokens, tokenizer)
    text_file = out / "train_text.txt"
    text_file.write_text(text, encoding="utf-8")
    args.eos = tokenizer.eos_token_id
    count = torch.tensor([d.numel() for d in docs], dtype=torch.float64)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # calibration: evenly spaced training windows
    stride = (ids.numel() - args.seq_len) // args.calibration_windows
    calibration = [ids[i * stride : i * stride + args.seq_len] for i in range(args.calibration_windows)]
    prompt = docs[0][None, : args.prompt_tokens + args.new_tokens]
    if prompt.shape[1] != args.prompt_tokens + args.new_tokens:
        raise ValueError(f"the first held-out document has {docs[0].numel()} tokens, fewer than --prompt-tokens + "
                         "--new-tokens")
    converted = convert(base, out, args.mask_sparsity_weight)

    generator = torch.Generator().manual_seed(0)
    per_seed, pooled = {}, []
    for seed in args.seeds:
        start = time.perf_counter()
        result, nll, match = run_seed(seed, args, base, converted, text_file, docs, count, calibration, prompt,
                                      generator)
        result["seconds"] = round(time.perf_counter() - start, 1)
        per_seed[str(seed)] = result
        pooled.append((nll, match))
        logger.info("seed %s: %s", seed, json.dumps(result["thresholds"]))
    pooled_rows = []
    for j, t in enumerate(args.thresholds):
        a = torch.stack([nll[f"dfa-t{t}"] for nll, _ in pooled]).mean(0)
        b = torch.stack([nll[f"heads-{match[j]}"] for nll, match in pooled]).mean(0)
        pooled_rows.append({"threshold": t, "dfa_perplexity": dfa_allocation.ppl(a, count),
                            "heads_perplexity": dfa_allocation.ppl(b, count),
                            "dfa_minus_heads_ci95": dfa_allocation.bootstrap(
                                lambda idx: dfa_allocation.ppl(a, count, idx) - dfa_allocation.ppl(b, count, idx),
                                len(docs), args.bootstrap, generator)})
    results = {
        "command": "python " + shlex.join(sys.argv), "base": str(base), "seeds": args.seeds,
        "held_out_documents": len(docs), "held_out_tokens": int(count.sum()), "train_chars": len(text),
        "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "mask_sparsity_weight": args.mask_sparsity_weight, "gate_learning_rate": args.gate_learning_rate,
        "calibration_windows": len(calibration), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "threads": args.threads, "per_seed": per_seed, "pooled": pooled_rows,
    }
    (out / "dfa_pruning.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, out / "dfa_pruning.png")
    print_table(results)
    print(f"wrote {out / 'dfa_pruning.json'} and {out / 'dfa_pruning.png'}")
    return results


def print_table(results):
    print(f"{results['command']}\nbase {Path(results['base']).name}; {results['held_out_documents']} held-out "
          f"documents, {results['held_out_tokens']} tokens; mask_sparsity_weight {results['mask_sparsity_weight']}, "
          f"gate learning rate {results['gate_learning_rate']}; latency ratios to the unpruned plain model: "
          "prefill / decode, whole model | body")
    print(f"{'seed':>6} | {'thr':>5} | {'DFA removed':>11} | {'heads (params)':>14} | {'DFA ppl':>8} | {'heads ppl':>9} | "
          f"{'DFA - heads [95% CI]':>25} | {'DFA latency':>21} | {'heads latency':>21}")
    ratios = lambda m: "{:.2f}/{:.2f} | {:.2f}/{:.2f}".format(*(m[f"{kind}_ratio"] for kind in TIMINGS))  # noqa: E731
    for seed, r in results["per_seed"].items():
        for name in ("plain", "dfa"):
            u = r["unpruned"][name]
            print(f"{seed:>6} | {name:>5} | unpruned ppl {u['perplexity']:.2f}; prefill {u['prefill_s'] * 1e3:.1f} ms, "
                  f"decode {u['decode_s'] * 1e3:.2f} ms/token, body {u['body_prefill_s'] * 1e3:.1f} ms, "
                  f"{u['body_decode_s'] * 1e3:.2f} ms/token; ratios {ratios(u)}")
        for t in r["thresholds"]:
            lo, hi = t["dfa_minus_heads_ci95"]
            print(f"{seed:>6} | {t['threshold']:>5} | {t['dfa_removed_attention_parameters']:>11} | "
                  f"{t['matched_heads_removed']:>2} ({t['heads_removed_attention_parameters']:>8}) | "
                  f"{t['dfa']['perplexity']:>8.2f} | {t['heads']['perplexity']:>9.2f} | "
                  f"{t['dfa']['perplexity'] - t['heads']['perplexity']:>+8.2f} [{lo:+7.2f}, {hi:+7.2f}] | "
                  f"{ratios(t['dfa'])} | {ratios(t['heads'])}")
    for p in results["pooled"]:
        lo, hi = p["dfa_minus_heads_ci95"]
        print(f"pooled | {p['threshold']:>5} | DFA {p['dfa_perplexity']:.2f} | heads {p['heads_perplexity']:.2f} | "
              f"{p['dfa_perplexity'] - p['heads_perplexity']:+.2f} [{lo:+.2f}, {hi:+.2f}]")


def main(argv=None):
    from graftlm.configuration.configuration_dfa import DFAConfig
    from graftlm.train_dfa import GATE_LEARNING_RATE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    dfa_allocation.add_arguments(parser, "dfa_pruning")
    parser.add_argument("--mask-sparsity-weight", type=float, default=DFAConfig.mask_sparsity_weight,
                        help="DFA's option (default: the shipped one)")
    parser.add_argument("--gate-learning-rate", type=float, default=GATE_LEARNING_RATE,
                        help="`graftlm train dfa --gate-learning-rate` (gates and masks; default: the shipped one)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[DFAConfig.mask_threshold, 0.5, 0.7, 0.8, 0.9, 1.0],
                        help="prune() thresholds (the first default is the shipped mask_threshold)")
    parser.add_argument("--calibration-windows", type=int, default=32, help="training windows for head importance")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length of the latency prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=30, help="timed latency rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (latency is measured on these)")
    args = parser.parse_args(argv)
    args.base = dict(args.base)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
