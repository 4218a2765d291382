"""Does the control bridge's per-example temperature/top-k beat fixed decoding settings? (seed 001's experiment)

A bridged MiniLM -> tiny GPT-2 with controls is trained on a small synthetic src/tgt set that mixes two kinds of
pairs: "copy" (the target repeats the source's two colours: one right answer per token) and "pick" (the target is
two random colours: 12 equally good answers per token). MiniLM stays frozen (its states are computed once); the
bridge, the controls and the decoder learn. On held-out pairs, each decoding setting (the predicted per-example
temperature and top-k, temperature 1 with top-k 20, and a small fixed grid) is scored by teacher forcing:
- soft PPL: perplexity under the temperature-scaled, softly top-k-truncated distribution (the control objective);
- temp PPL: perplexity under softmax(logits / T), without truncation;
- miss rate: share of target tokens outside the hard top-k (hard top-k perplexity is infinite when any is missed);
- covered PPL: perplexity of the hard top-k distribution on the tokens it covers.
It also samples once per held-out pair and reports the exact-match rate of the copy pairs.
Outputs: experiments/results/adaptive_decoding.{json,md,png}. A few CPU minutes.

    python experiments/adaptive_decoding.py [--steps 300] [--output-dir experiments/results]
"""

import argparse
import json
import logging
import math
import random
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("adaptive_decoding")

COLOURS = ["red", "blue", "green", "black", "white", "pink", "brown", "grey", "gold", "silver", "orange", "purple"]


def make_pairs(n, seed):
    """Half "copy" pairs (deterministic target), half "pick" pairs (random colours: high-entropy target)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        words = rng.sample(COLOURS, 2)
        if i % 2 == 0:
            pairs.append({"src": "copy: " + " ".join(words), "tgt": " " + " ".join(words), "kind": "copy"})
        else:
            pairs.append({"src": "pick any colours", "tgt": " " + " ".join(rng.choices(COLOURS, k=2)), "kind": "pick"})
    return pairs


def encode_pairs(model, pairs, source_tokenizer, target_tokenizer):
    """Frozen MiniLM states of every source (padded to one length) and the -100-padded labels, computed once."""
    from graftlm.train_bridge import BridgeCollator

    eos = model.config.eos_token_id
    source = source_tokenizer([p["src"] for p in pairs])
    features = [{"input_ids": ids, "attention_mask": mask, "labels": target_tokenizer(p["tgt"])["input_ids"] + [eos]}
                for ids, mask, p in zip(source["input_ids"], source["attention_mask"], pairs)]
    batch = BridgeCollator(source_tokenizer.pad_token_id)(features)
    with torch.no_grad():
        states = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return {"states": states, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


def forward(model, data, rows):
    """The model's forward on cached MiniLM states: bridge and controls run here, as model.encode() would."""
    from graftlm.modeling.modeling_bridge import BridgeEncoderOutput

    mask = data["attention_mask"][rows]
    bridged = model.bridge(data["states"][rows])
    temperature, top_k = model.controls(bridged, mask)
    encoder_outputs = BridgeEncoderOutput(last_hidden_state=bridged, temperature=temperature, top_k=top_k)
    return model(attention_mask=mask, encoder_outputs=encoder_outputs, labels=data["labels"][rows])


def build_model(work_dir, seed):
    """Convert the packaged MiniLM and a freshly initialised tiny GPT-2 (no Hub access needed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from testing_utils import minilm_dir, save_tiny_gpt2

    from graftlm.conversion.bridge import convert_bert_gpt2_to_bridge
    from graftlm.conversion.common import load_tokenizer

    decoder_dir = save_tiny_gpt2(Path(work_dir) / "gpt2", seed=seed, n_embd=64, n_head=4, n_layer=2)
    model, _ = convert_bert_gpt2_to_bridge(minilm_dir(), decoder_dir, bridge_type="ga", controls=True)
    return model, load_tokenizer(minilm_dir()), load_tokenizer(decoder_dir)


def train(model, data, steps, batch_size, lr, seed):
    torch.manual_seed(seed)
    model.encoder.requires_grad_(False)  # MiniLM stays as converted: the bridge, controls and decoder learn
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    history = []
    progress = tqdm(range(steps), desc="training the control bridge")
    for step in progress:
        rows = torch.randint(0, data["labels"].shape[0], (batch_size,))
        out = forward(model, data, rows)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        history.append({"step": step, "ce_loss": out.ce_loss.item(), "control_loss": out.control_loss.item()})
        progress.set_postfix(ce=f"{out.ce_loss.item():.3f}", control=f"{out.control_loss.item():.3f}")
    model.eval()
    return history


@torch.no_grad()
def score(model, pairs, data, settings, batch_size):
    """Per setting: summed soft NLL, temperature-only NLL, covered NLL, token and miss counts, per pair kind."""
    from graftlm.modeling.bridge_decoding import soft_top_k_log_probs

    softness = model.config.control_softness
    totals = {name: {} for name in settings}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out = forward(model, data, torch.arange(start, start + len(chunk)))
        labels = data["labels"][start : start + len(chunk)]
        real = labels != -100
        targets = labels.clamp_min(0).unsqueeze(-1)
        for name, setting in settings.items():
            if setting == "adaptive":
                temperature, top_k = out.temperature, out.top_k
            else:
                temperature = torch.full((labels.shape[0],), setting[0])
                top_k = torch.full((labels.shape[0],), float(setting[1]))
            soft = -soft_top_k_log_probs(out.logits, temperature, top_k, softness).gather(-1, targets).squeeze(-1)
            scaled = out.logits / temperature[:, None, None]
            temp_only = -scaled.log_softmax(-1).gather(-1, targets).squeeze(-1)
            k = top_k.round().long()
            kth = scaled.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None, None].expand(-1, scaled.shape[1], 1))
            inside = scaled >= kth
            target_inside = inside.gather(-1, targets).squeeze(-1)
            hard = scaled.masked_fill(~inside, float("-inf")).log_softmax(-1)
            covered = -hard.gather(-1, targets).squeeze(-1)
            for row, pair in enumerate(chunk):
                for kind in (pair["kind"], "all"):
                    t = totals[name].setdefault(kind, dict(soft=0.0, temp=0.0, covered=0.0, tokens=0, misses=0,
                                                          temperature=0.0, top_k=0.0, pairs=0))
                    mask = real[row]
                    hit = mask & target_inside[row]
                    t["soft"] += soft[row][mask].sum().item()
                    t["temp"] += temp_only[row][mask].sum().item()
                    t["covered"] += covered[row][hit].sum().item()
                    t["tokens"] += int(mask.sum())
                    t["misses"] += int((mask & ~target_inside[row]).sum())
                    t["temperature"] += temperature[row].item()
                    t["top_k"] += top_k[row].item()
                    t["pairs"] += 1
    table = {}
    for name, kinds in totals.items():
        table[name] = {
            kind: {
                "mean_temperature": t["temperature"] / t["pairs"],
                "mean_top_k": t["top_k"] / t["pairs"],
                "soft_ppl": math.exp(t["soft"] / t["tokens"]),
                "temp_ppl": math.exp(t["temp"] / t["tokens"]),
                "miss_rate": t["misses"] / t["tokens"],
                "covered_ppl": math.exp(t["covered"] / max(t["tokens"] - t["misses"], 1)),
            }
            for kind, t in kinds.items()
        }
    return table


@torch.no_grad()
def copy_exact_match(model, pairs, tokenizers, seed, adaptive, batch_size):
    """Share of held-out copy pairs reproduced exactly by one sampled generation."""
    source_tokenizer, target_tokenizer = tokenizers
    copies = [p for p in pairs if p["kind"] == "copy"]
    torch.manual_seed(seed)
    hits = 0
    for start in range(0, len(copies), batch_size):
        chunk = copies[start : start + batch_size]
        inputs = source_tokenizer([p["src"] for p in chunk], return_tensors="pt", padding=True)
        kwargs = dict(adaptive_decoding=True) if adaptive else dict(do_sample=True, temperature=1.0, top_k=20)
        output = model.generate(**inputs, max_new_tokens=4, **kwargs)
        texts = target_tokenizer.batch_decode(output, skip_special_tokens=True)
        hits += sum(text.strip() == p["tgt"].strip() for text, p in zip(texts, chunk))
    return hits / len(copies)


def markdown(table, settings, exact):
    lines = ["| setting | pairs | mean T | mean top-k | soft PPL | temp PPL | miss rate | covered PPL |",
             "|---|---|---|---|---|---|---|---|"]
    for name in settings:
        for kind in ("all", "copy", "pick"):
            r = table[name][kind]
            lines.append(f"| {name} | {kind} | {r['mean_temperature']:.2f} | {r['mean_top_k']:.1f} | "
                         f"{r['soft_ppl']:.3f} | {r['temp_ppl']:.3f} | {r['miss_rate']:.3f} | {r['covered_ppl']:.3f} |")
    lines += ["", f"Copy pairs reproduced exactly by one sample: adaptive {exact['adaptive']:.2f}, "
                  f"T=1/top-k 20 {exact['T=1.0,k=20']:.2f}."]
    return "\n".join(lines) + "\n"


def plot(table, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(settings)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    x = range(len(names))
    for offset, kind in ((-width / 2, "copy"), (width / 2, "pick")):
        axes[0].bar([i + offset for i in x], [table[n][kind]["soft_ppl"] for n in names], width, label=kind)
        axes[1].bar([i + offset for i in x], [table[n][kind]["miss_rate"] for n in names], width, label=kind)
    for ax, title in zip(axes, ("held-out soft top-k perplexity (lower is better)", "target outside top-k (share)")):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--train-pairs", type=int, default=512)
    parser.add_argument("--eval-pairs", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work_dir:
        model, *tokenizers = build_model(work_dir, args.seed)
    train_pairs = make_pairs(args.train_pairs, args.seed)
    eval_pairs = make_pairs(args.eval_pairs, args.seed + 1)
    train_data, eval_data = (encode_pairs(model, p, *tokenizers) for p in (train_pairs, eval_pairs))
    history = train(model, train_data, args.steps, args.batch_size, args.learning_rate, args.seed)

    settings = {"adaptive": "adaptive", "T=1.0,k=20": (1.0, 20)}
    for temperature in (0.5, 0.8, 1.0, 1.2):
        for top_k in (1, 5, 20, 50):
            settings[f"T={temperature},k={top_k}"] = (temperature, top_k)
    table = score(model, eval_pairs, eval_data, settings, args.batch_size)
    exact = {"adaptive": copy_exact_match(model, eval_pairs, tokenizers, args.seed, True, args.batch_size),
             "T=1.0,k=20": copy_exact_match(model, eval_pairs, tokenizers, args.seed, False, args.batch_size)}
    fixed = [n for n in settings if n != "adaptive"]
    best_fixed = min(fixed, key=lambda n: table[n]["all"]["soft_ppl"])
    result = {
        "config": vars(args),
        "settings": {n: s for n, s in settings.items()},
        "table": table,
        "copy_exact_match": exact,
        "best_fixed_setting": best_fixed,
        "final_train": history[-1],
        "first_train": history[0],
    }
    (output_dir / "adaptive_decoding.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (output_dir / "adaptive_decoding.md").write_text(markdown(table, settings, exact), encoding="utf-8")
    plot(table, settings, output_dir / "adaptive_decoding.png")
    print(markdown(table, list(dict.fromkeys(["adaptive", "T=1.0,k=20", best_fixed])), exact))
    print(f"wrote {output_dir / 'adaptive_decoding.json'}, .md and .png")
    return result


if __name__ == "__main__":
    main()
