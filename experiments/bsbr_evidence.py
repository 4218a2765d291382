"""GPT2-BSBR's long-context claim against its controls, over several seeds: per-position held-out loss, and a recall
probe with learning curves.

**lm** (from the offline base, experiments/offline_base.py; the same checkpoint for every model and seed). Four
models, each trained from the base for the same steps on the same training windows of `--seq-len` tokens, by
transformers' Trainer with graftlm's training pieces (`trainer_arguments`, cosine schedule, `make_optimizer` with the
retrieval gates at `--gate-learning-rate`: what `graftlm train bsbr` runs):
- **full**: the stock base fine-tuned (full causal attention over the window);
- **bsbr**: `graftlm convert bsbr --chunk-size B` of the base, healed (softmax inside chunks + retrieval of earlier
  chunks);
- **retrieval off**: the same conversion with the retrieval gates held at 0 and every retrieval module frozen, so
  each token reads only its own chunk (GPT-2 with block-diagonal causal attention, exact: tests/test_bsbr.py);
- **sliding window**: the stock base whose attention reads only the last B tokens (a band mask of width B, the chunk
  size, set up here as an attention function registered with transformers, not a library option).
Scored on held-out documents (whole documents the base never saw): disjoint windows of `--seq-len` tokens from each
document's start (the first from end-of-text), the loss at every position, averaged in position buckets; differences
between models with 95% intervals from a paired bootstrap over documents, per seed and pooled over seeds (each
document's losses averaged over the seeds first). The not-fine-tuned base is scored as a reference.

**recall** (synthetic, no base): sequences of d + 1 chunks of B random tokens, the last chunk a copy of the first
(the chunk seen d chunks earlier, d - 1 random chunks between); the loss is on the copy only. Tiny models trained
from scratch at each distance d: BSBR, full attention (stock GPT-2), BSBR with retrieval off; token accuracy on the
copy of fixed held-out sequences every `--recall-eval-every` steps (the learning curves; a run stops once two
evaluations in a row reach `--recall-stop-at`, and counts at that accuracy), mean and 95% t-interval over seeds. Retrieval off cannot see the source chunk from the copy: its accuracy is chance, 1 / (vocabulary - 1), except at
d = 1, where the copy's first token is predicted at the source chunk's last position, inside the source chunk:
there any model can get 1 of the B tokens, so retrieval off's ceiling is 1/B + (1 - 1/B) * chance.

Writes bsbr_evidence_<part>.json (with the command line and seeds) and bsbr_evidence_<part>.png, prints the tables.

    python experiments/bsbr_evidence.py                       # defaults: the default base (GPU), 1024-token windows
    # the README's runs (CPU, about 50 min each on a shared 2-core machine, run side by side):
    python experiments/bsbr_evidence.py --parts lm --base n_layer=2 n_embd=64 n_head=2 steps=300 seq_len=64 \\
        --chunk-size 8 --seq-len 64 --steps 60 --train-chars 400000 --eval-docs 32 --doc-tokens 512 --threads 1
    python experiments/bsbr_evidence.py --parts recall --recall-steps 400 --threads 1
"""

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_base  # noqa: E402  (sibling scripts, shared by every experiment)
from dfa_allocation import base_setting, bootstrap, corpus_split  # noqa: E402

logger = logging.getLogger("bsbr_evidence")
MODELS = ("full", "bsbr", "retrieval off", "sliding window")
RECALL_MODELS = ("full", "bsbr", "retrieval off")
# Differences reported with intervals: (model, minus model).
CONTRASTS = (("bsbr", "retrieval off"), ("bsbr", "sliding window"), ("bsbr", "full"))


def sliding_window_attention(width):
    """The name of an attention function, registered with transformers, by which a GPT-2 reads only its last `width`
    tokens: query t attends to keys t - width + 1 .. t (SDPA with a band mask). Unpadded batches only."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("the sliding-window control takes unpadded batches only (it got an attention mask)")
        i = torch.arange(query.shape[-2], device=query.device)[:, None]
        j = torch.arange(key.shape[-2], device=query.device)[None, :]
        band = (j <= i) & (j > i - width)  # (T, T): causal, at most `width` keys
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=band, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2), None

    name = f"sliding_window_{width}"
    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, sdpa_mask)  # no padding: transformers passes no mask (checked in attend)
    return name


def retrieval_off(model):
    """Hold a BSBR model's retrieval gates at 0 and freeze every retrieval module: block-diagonal attention."""
    from graftlm.training.bsbr import RETRIEVAL_PARAMETERS

    for block in model.transformer.h:
        block.attn.retrieval_gate.weight.data.zero_()
    for name, param in model.named_parameters():
        if any(part in name for part in RETRIEVAL_PARAMETERS):
            param.requires_grad_(False)
    return model


def lm_models(base, chunk_size):
    """{name: model} of the four LM variants, freshly built from the base."""
    from transformers import GPT2LMHeadModel

    from graftlm.conversion.bsbr import convert_gpt2_to_bsbr

    sliding = GPT2LMHeadModel.from_pretrained(base)
    sliding.set_attn_implementation(sliding_window_attention(chunk_size))
    return {"full": GPT2LMHeadModel.from_pretrained(base), "bsbr": convert_gpt2_to_bsbr(base, chunk_size=chunk_size)[0],
            "retrieval off": retrieval_off(convert_gpt2_to_bsbr(base, chunk_size=chunk_size)[0]),
            "sliding window": sliding}


def fine_tune(model, train_set, args, seed):
    """`graftlm train bsbr`'s Trainer setup (graftlm.training) for any of the models; returns the logged losses."""
    from transformers import Trainer

    from graftlm.training.common import loss_history, make_optimizer, trainer_arguments

    options = Namespace(max_steps=args.steps, batch_size=args.batch_size, grad_accum=1,
                        learning_rate=args.learning_rate, warmup_steps=10, logging_steps=10, bf16=False,
                        gradient_checkpointing=False, seed=seed)
    optimizer = make_optimizer(model, args.learning_rate, {".retrieval_gate.": args.gate_learning_rate})
    with tempfile.TemporaryDirectory(prefix="bsbr-evidence-") as work_dir:
        trainer = Trainer(model=model, args=trainer_arguments(options, work_dir, lr_scheduler_type="cosine"),
                          train_dataset=train_set, optimizers=(optimizer, None))
        trainer.train()
    return loss_history(trainer)


@torch.no_grad()
def position_losses(model, docs, seq_len, eos, batch_size=8):
    """(documents, seq_len) float64: each document's next-token loss at each window position, averaged over its
    disjoint windows of seq_len tokens (the first from end-of-text)."""
    model.eval()
    rows = []
    for doc in docs:
        sequence = torch.cat([doc.new_tensor([eos]), doc])
        windows = torch.stack([sequence[s : s + seq_len + 1] for s in range(0, doc.numel() - seq_len + 1, seq_len)])
        losses = []
        for batch in windows.to(model.device).split(batch_size):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
            losses.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none"))
        rows.append(torch.cat(losses).double().mean(0).cpu())
    return torch.stack(rows)


def buckets(seq_len, chunk_size):
    """[(start, end)] position buckets: the first chunk, then doubling up to seq_len."""
    edges = [0, chunk_size]
    while edges[-1] < seq_len:
        edges.append(min(2 * edges[-1], seq_len))
    return list(zip(edges[:-1], edges[1:]))


def bucket_means(losses, spans, index=None):
    """Mean loss per bucket over the documents `index` (all by default)."""
    losses = losses if index is None else losses[index]
    return [float(losses[:, a:b].mean()) for a, b in spans]


def compare(losses, spans, args, generator):
    """Bucket means of every model, and each contrast's difference with its 95% paired-bootstrap interval."""
    n_docs = next(iter(losses.values())).shape[0]
    result = {"loss": {name: bucket_means(value, spans) for name, value in losses.items()}, "difference": {}}
    for name, minus in CONTRASTS:
        diff = losses[name] - losses[minus]
        samples = [bootstrap(lambda idx, k=k: bucket_means(diff, [spans[k]], idx)[0], n_docs, args.bootstrap, generator)
                   for k in range(len(spans))]
        result["difference"][f"{name} - {minus}"] = [
            {"mean": m, "ci95": ci} for m, ci in zip(bucket_means(diff, spans), samples)]
    return result


def publish(results, out, part, plot, show):
    """Write bsbr_evidence_<part>.json and .png under `out`, print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bsbr_evidence_{part}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    plot(results, out / f"bsbr_evidence_{part}.png")
    show(results)
    print(f"wrote {out / f'bsbr_evidence_{part}.json'} and {out / f'bsbr_evidence_{part}.png'}")
    return results


def run_lm(args):
    from transformers import AutoTokenizer

    from graftlm.training.data import split_blocks

    base = offline_base.base_checkpoint(**args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    n_positions = json.loads((base / "config.json").read_text(encoding="utf-8"))["n_positions"]
    if args.seq_len > n_positions:
        raise ValueError(f"--seq-len {args.seq_len} is beyond the base's n_positions ({n_positions})")
    text, docs = corpus_split(args.train_chars, 10_000, args.doc_tokens, tokenizer)
    docs = [d for d in docs if d.numel() >= args.seq_len][: args.eval_docs]
    train_set, _ = split_blocks(tokenizer(text, return_tensors="pt").input_ids[0], args.seq_len, 0.0)
    eos, spans = tokenizer.eos_token_id, buckets(args.seq_len, args.chunk_size)
    from transformers import GPT2LMHeadModel

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where Trainer puts the models it trains
    base_losses = position_losses(GPT2LMHeadModel.from_pretrained(base).to(device), docs, args.seq_len, eos)
    generator = torch.Generator().manual_seed(0)
    per_seed, pooled, histories, seconds = {}, {name: [] for name in MODELS}, {}, {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        losses = {}
        for name, model in lm_models(base, args.chunk_size).items():
            start = time.perf_counter()
            histories[f"{name}, seed {seed}"] = fine_tune(model, train_set, args, seed)
            seconds[f"{name}, seed {seed}"] = round(time.perf_counter() - start, 1)
            losses[name] = position_losses(model, docs, args.seq_len, eos)
            pooled[name].append(losses[name])
            logger.info("seed %s, %s: trained in %.0f s; bucket losses %s", seed, name, seconds[f"{name}, seed {seed}"],
                        [round(v, 3) for v in bucket_means(losses[name], spans)])
            if name == "bsbr":
                gates = torch.stack([block.attn.retrieval_gate().detach() for block in model.transformer.h])
                per_seed.setdefault(str(seed), {})["mean_abs_retrieval_gate"] = float(gates.abs().mean())
        per_seed[str(seed)].update(compare(losses, spans, args, generator))
    pooled_losses = {name: torch.stack(value).mean(0) for name, value in pooled.items()}
    offsets = {name: [float(v[:, args.chunk_size:].reshape(len(docs), -1, args.chunk_size)[:, :, o].mean())
                      for o in range(args.chunk_size)] for name, v in pooled_losses.items()
               } if args.seq_len % args.chunk_size == 0 else {}
    results = {
        "command": "python " + shlex.join(sys.argv), "base": str(base), "seeds": args.seeds,
        "chunk_size": args.chunk_size, "seq_len": args.seq_len, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "gate_learning_rate": args.gate_learning_rate,
        "held_out_documents": len(docs), "held_out_tokens": int(sum(d.numel() // args.seq_len * args.seq_len
                                                                    for d in docs)),
        "train_chars": len(text), "buckets": spans, "base_loss": bucket_means(base_losses, spans),
        "per_seed": per_seed, "pooled": compare(pooled_losses, spans, args, generator),
        "loss_by_offset_in_chunk_after_the_first": offsets, "training_seconds": seconds, "loss_history": histories,
    }
    return publish(results, args.output_dir, "lm", plot_lm, print_lm)


def print_lm(results):
    spans, pooled = results["buckets"], results["pooled"]
    print(f"{results['command']}\n{results['held_out_documents']} held-out documents, {results['held_out_tokens']} "
          f"tokens; chunk {results['chunk_size']}, windows of {results['seq_len']}, {results['steps']} steps, "
          f"seeds {results['seeds']}; mean loss (nats) per position bucket, pooled over seeds")
    print(f"{'positions':>10} | {'base':>6} | " + " | ".join(f"{m:>14}" for m in MODELS) + " | "
          + " | ".join(f"{c:>30}" for c in pooled["difference"]))
    for k, (a, b) in enumerate(spans):
        cells = [f"{pooled['loss'][m][k]:>14.3f}" for m in MODELS]
        diffs = [f"{d[k]['mean']:>+8.4f} [{d[k]['ci95'][0]:+.4f}, {d[k]['ci95'][1]:+.4f}]"
                 for d in pooled["difference"].values()]
        print(f"{f'{a}-{b - 1}':>10} | {results['base_loss'][k]:>6.3f} | " + " | ".join(cells) + " | "
              + " | ".join(f"{d:>30}" for d in diffs))
    for seed, r in results["per_seed"].items():
        d = r["difference"]["bsbr - retrieval off"][-1]
        print(f"seed {seed}: bsbr - retrieval off at positions {spans[-1][0]}-{spans[-1][1] - 1}: {d['mean']:+.4f} "
              f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]; mean |gate| {r['mean_abs_retrieval_gate']:.3f}")


def plot_lm(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    centres = [(a + b - 1) / 2 for a, b in results["buckets"]]
    full = results["pooled"]["loss"]["full"]  # differences to full attention: the text's own difficulty cancels
    for name, values in results["pooled"]["loss"].items():
        left.plot(centres, [v - f for v, f in zip(values, full)], marker="o", label=name)
    left.set_xscale("log", base=2)
    left.set_xlabel("position in the window (bucket centre)")
    left.set_ylabel("held-out loss - full attention's (nats), pooled")
    left.set_title(f"chunk {results['chunk_size']}, {results['steps']} steps from the same base")
    left.grid(alpha=0.3)
    left.legend()
    by_offset = results["loss_by_offset_in_chunk_after_the_first"]
    for name, values in by_offset.items():
        right.plot(range(len(values)), [v - f for v, f in zip(values, by_offset["full"])], marker=".", label=name)
    right.set_xlabel("offset inside the chunk (positions after the first chunk)")
    right.set_ylabel("held-out loss - full attention's (nats)")
    right.set_title("where in a chunk the loss is")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def recall_batch(distance, args, size, generator):
    """(input_ids, labels) of `size` sequences: d + 1 chunks of random tokens 1..vocab-1, the last copying the first;
    labels only on the copy."""
    chunk = args.recall_chunk_size
    ids = torch.randint(1, args.recall_vocab, (size, (distance + 1) * chunk), generator=generator)
    ids[:, -chunk:] = ids[:, :chunk]
    labels = torch.full_like(ids, -100)
    labels[:, -chunk:] = ids[:, -chunk:]
    return ids, labels


def recall_model(name, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from graftlm.configuration.configuration_bsbr import BSBRConfig
    from graftlm.modeling.modeling_bsbr import BSBRForCausalLM

    shape = dict(n_layer=args.recall_layers, n_embd=args.recall_width, n_head=args.recall_heads,
                 vocab_size=args.recall_vocab, n_positions=(max(args.distances) + 1) * args.recall_chunk_size,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "full":
        return GPT2LMHeadModel(GPT2Config(**shape))
    model = BSBRForCausalLM(BSBRConfig(**shape, chunk_size=args.recall_chunk_size))
    return retrieval_off(model) if name == "retrieval off" else model


@torch.no_grad()
def copy_accuracy(model, ids, labels):
    model.eval()
    predicted = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    model.train()
    return float((predicted == target)[target != -100].float().mean())


def train_recall(name, distance, seed, args):
    """Accuracy curve [(step, accuracy)] of one model trained from scratch on the copy at `distance`, stopped early
    once two evaluations in a row reach --recall-stop-at."""
    from graftlm.training.common import make_optimizer

    torch.manual_seed(seed)
    model = recall_model(name, args).train()
    optimizer = make_optimizer(model, args.recall_learning_rate, {".retrieval_gate.": args.gate_learning_rate},
                               weight_decay=0.0)
    warmup = 20
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    data = torch.Generator().manual_seed(1000 + seed)
    held_out = recall_batch(distance, args, args.recall_eval_sequences, torch.Generator().manual_seed(10**6 + seed))
    curve = [(0, copy_accuracy(model, *held_out))]
    for step in range(1, args.recall_steps + 1):
        ids, labels = recall_batch(distance, args, args.recall_batch_size, data)
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.recall_eval_every == 0 or step == args.recall_steps:
            curve.append((step, copy_accuracy(model, *held_out)))
            if len(curve) > 2 and min(curve[-1][1], curve[-2][1]) >= args.recall_stop_at:
                break  # learned: two evaluations in a row at the stopping accuracy
    return curve


def t_interval(values):
    """Mean and 95% t-interval over seeds (normal quantile beyond 30 values)."""
    values = torch.tensor(values, dtype=torch.float64)
    mean = float(values.mean())
    if values.numel() < 2:
        return mean, (mean, mean)
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(
        values.numel(), 1.96)
    half = t * float(values.std()) / math.sqrt(values.numel())
    return mean, (mean - half, mean + half)


def first_step_at(curve, level):
    return next((step for step, accuracy in curve if accuracy >= level), None)


def run_recall(args):
    curves, seconds = {}, {}
    for distance in args.distances:
        for name in RECALL_MODELS:
            for seed in args.seeds:
                start = time.perf_counter()
                curves[f"{name}|{distance}|{seed}"] = curve = train_recall(name, distance, seed, args)
                seconds[f"{name}|{distance}|{seed}"] = round(time.perf_counter() - start, 1)
                logger.info("recall d=%d %s seed %d: accuracy %.3f after %d steps (%.0f s)", distance, name, seed,
                            curve[-1][1], curve[-1][0], seconds[f"{name}|{distance}|{seed}"])
    summary = {}
    for distance in args.distances:
        for name in RECALL_MODELS:
            runs = [curves[f"{name}|{distance}|{seed}"] for seed in args.seeds]
            mean, ci = t_interval([c[-1][1] for c in runs])
            summary[f"{name}|{distance}"] = {
                "final_accuracy": mean, "final_accuracy_ci95": ci, "per_seed": [c[-1][1] for c in runs],
                "first_step_at_0.9": [first_step_at(c, 0.9) for c in runs]}
    results = {
        "command": "python " + shlex.join(sys.argv), "seeds": args.seeds, "distances": args.distances,
        "chunk_size": args.recall_chunk_size, "vocab": args.recall_vocab, "chance": 1 / (args.recall_vocab - 1),
        "model": {"n_layer": args.recall_layers, "n_embd": args.recall_width, "n_head": args.recall_heads},
        "steps": args.recall_steps, "batch_size": args.recall_batch_size, "learning_rate": args.recall_learning_rate,
        "gate_learning_rate": args.gate_learning_rate, "eval_sequences": args.recall_eval_sequences,
        "stop_at": args.recall_stop_at,
        "summary": summary, "curves": curves, "training_seconds": seconds,
    }
    return publish(results, args.output_dir, "recall", plot_recall, print_recall)


def print_recall(results):
    print(f"{results['command']}\nrecall probe: chunk {results['chunk_size']}, vocabulary {results['vocab']} "
          f"(chance {results['chance']:.3f}), {results['steps']} steps of {results['batch_size']}, seeds "
          f"{results['seeds']}; copy accuracy at the last step (or the early stop), mean [95% t-interval over seeds]; "
          f"first step at >= 0.9 per seed")
    print(f"{'distance':>8} | " + " | ".join(f"{m:>40}" for m in RECALL_MODELS))
    for distance in results["distances"]:
        cells = []
        for name in RECALL_MODELS:
            s = results["summary"][f"{name}|{distance}"]
            lo, hi = s["final_accuracy_ci95"]
            cells.append(f"{s['final_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] {s['first_step_at_0.9']}")
        print(f"{distance:>8} | " + " | ".join(f"{c:>40}" for c in cells))


def plot_recall(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distances = results["distances"]
    fig, axes = plt.subplots(1, len(distances), figsize=(3.6 * len(distances), 3.6), sharey=True, squeeze=False)
    for ax, distance in zip(axes[0], distances):
        for colour, name in zip(("C0", "C1", "C2"), RECALL_MODELS):
            for i, seed in enumerate(results["seeds"]):
                curve = results["curves"][f"{name}|{distance}|{seed}"]
                ax.plot([s for s, _ in curve], [a for _, a in curve], color=colour, alpha=0.8,
                        label=name if i == 0 else None)
        ax.axhline(results["chance"], color="grey", linestyle=":")
        ax.set_title(f"copy the chunk {distance} back")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("copy accuracy (held-out sequences)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--parts", nargs="+", choices=["lm", "recall"], default=["lm", "recall"])
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results/bsbr_evidence"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--gate-learning-rate", type=float, default=1e-2, help="of the retrieval gates (both parts)")
    lm = parser.add_argument_group("lm")
    lm.add_argument("--base", type=base_setting, nargs="*", default=[],
                    help="offline base settings KEY=VALUE (experiments/offline_base.py DEFAULTS)")
    lm.add_argument("--chunk-size", type=int, default=128, help="BSBR's chunk, and the sliding window's width")
    lm.add_argument("--seq-len", type=int, default=1024, help="training and scoring window (<= the base's n_positions)")
    lm.add_argument("--steps", type=int, default=300, help="training steps of every model")
    lm.add_argument("--batch-size", type=int, default=8)
    lm.add_argument("--learning-rate", type=float, default=3e-4)
    lm.add_argument("--train-chars", type=int, default=4_000_000, help="characters of training documents")
    lm.add_argument("--eval-docs", type=int, default=32, help="held-out documents of at least --seq-len tokens")
    lm.add_argument("--doc-tokens", type=int, default=4096, help="tokens scored per held-out document (its start)")
    lm.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    recall = parser.add_argument_group("recall")
    recall.add_argument("--distances", type=int, nargs="+", default=[1, 2, 4, 8])
    recall.add_argument("--recall-chunk-size", type=int, default=8)
    recall.add_argument("--recall-vocab", type=int, default=32)
    recall.add_argument("--recall-layers", type=int, default=2)
    recall.add_argument("--recall-width", type=int, default=64)
    recall.add_argument("--recall-heads", type=int, default=2)
    recall.add_argument("--recall-steps", type=int, default=3000)
    recall.add_argument("--recall-batch-size", type=int, default=32)
    recall.add_argument("--recall-learning-rate", type=float, default=1e-3)
    recall.add_argument("--recall-eval-every", type=int, default=50)
    recall.add_argument("--recall-stop-at", type=float, default=0.99,
                        help="a run stops once two evaluations in a row reach this accuracy (> 1: never)")
    recall.add_argument("--recall-eval-sequences", type=int, default=256)
    args = parser.parse_args(argv)
    args.base = dict(args.base)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "lm" in args.parts:
        run_lm(args)
    if "recall" in args.parts:
        run_recall(args)


if __name__ == "__main__":
    main()
