"""Adaptive decoding (the Bridged model's per-example temperature/top-k controls) against one global setting fitted
on validation, a per-type oracle and greedy, on a task whose type is not written in the source.

Task. Colours are split into two sets of 8. A source is `--words` colours (MiniLM reads it), all from one set:
- copy set (A): the target repeats the source (one right answer per token);
- free set (B): the target is `--words` colours drawn uniformly from set B, independent of the source (8 equally good
  answers per token; the ideal per-token NLL is log 8 = 2.079 nats).
Nothing in the source says which; the controls (and the decoder) must infer it from the encoder states. Sources are
split into train / validation / test (60/20/20) by a hash of their text, the same for every seed, so test sources
are unseen. Free targets are redrawn at every training step.

Model, per seed. `convert_bert_gpt2_to_bridge(MiniLM, offline base, bridge_type="ga", controls=True)` (the packaged
all-MiniLM-L6-v2 and the offline base of experiments/offline_base.py); MiniLM stays frozen (its states are computed
once); bridge, controls and decoder train with the model's own loss (CE + control_loss_weight * the controls'
likelihood objective). Stopping rule, checked every `--eval-every` steps on validation: greedy copy exact match >=
`--stop-copy-em` and mean probability of a valid token on free pairs >= `--stop-free-valid`, or `--max-steps`
(`--min-steps` trains on past the rule, giving the controls more steps). A seed that hits the cap is reported as
not learned and kept in every table.

Decoding settings compared on held-out (test) sources:
- adaptive: each source's predicted temperature and top-k (top-k rounded, as generate(adaptive_decoding=True) does);
- global: the one (T, k) with the lowest validation NLL (fewest targets outside the top-k first);
- oracle: the best (T, k) per type on validation, chosen with the hidden type labels;
- greedy (k = 1) and plain (T = 1, no top-k: the decoder's own distribution).
Metrics: true NLL per target token under softmax(logits / T) renormalised on the hard top-k (infinite when a target
falls outside it: the share of such tokens is reported), NLL under the temperature alone, and from `--samples`
samples per source: copy exact match; free-choice validity (all colours from set B, then eos), distinct outputs per
source (ideal about 0.985 for 16 draws from 512) and the entropy of the sampled colours (ideal log 8). Means with
95% intervals from the bootstrap over held-out sources (each with its pairs); pooled = per-source values averaged
over seeds, then bootstrapped.

Writes adaptive_decoding.json (with the command line and seeds) and adaptive_decoding.png, prints the tables.

    python experiments/adaptive_decoding.py                       # the default base (build it first: wants a GPU)
    python experiments/adaptive_decoding.py --base n_layer=2 n_embd=64 n_head=2 steps=300 seq_len=64   # CPU
"""

import argparse
import hashlib
import itertools
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offline_base  # noqa: E402  (the sibling script, shared by every experiment)
from dfa_allocation import base_setting  # noqa: E402  (parses --base KEY=VALUE as every experiment does)

logger = logging.getLogger("adaptive_decoding")

COPY_SET = ["red", "blue", "green", "black", "white", "pink", "brown", "grey"]
FREE_SET = ["gold", "silver", "orange", "purple", "yellow", "violet", "navy", "olive"]
TEMPERATURES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0]
METHODS = ["adaptive", "global", "oracle", "greedy", "plain"]


def split_of(text):
    bucket = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 60 else "validation" if bucket < 80 else "test"


def single_token_ids(tokenizer, words, prefix):
    ids = []
    for word in words:
        pieces = tokenizer(prefix + word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"colour {word!r} is {len(pieces)} tokens for {type(tokenizer).__name__}; the task "
                             "needs one token per colour (fixed-length sources and targets)")
        ids.append(pieces[0])
    return ids


class Task:
    """Every source of both sets, MiniLM's states of each (computed once), split by hash."""

    def __init__(self, model, source_tokenizer, target_tokenizer, words):
        self.words = words
        self.eos = model.config.eos_token_id
        self.copy_ids = torch.tensor(single_token_ids(target_tokenizer, COPY_SET, " "))
        self.free_ids = torch.tensor(single_token_ids(target_tokenizer, FREE_SET, " "))
        single_token_ids(source_tokenizer, COPY_SET + FREE_SET, "")
        sources, colours, is_copy = [], [], []
        for copy, names, ids in ((True, COPY_SET, self.copy_ids), (False, FREE_SET, self.free_ids)):
            for combo in itertools.product(range(len(names)), repeat=words):
                sources.append(" ".join(names[i] for i in combo))
                colours.append(ids[list(combo)])
                is_copy.append(copy)
        self.sources = sources
        self.colours = torch.stack(colours)  # (N, words): the copy target of each source
        self.is_copy = torch.tensor(is_copy)
        splits = [split_of(s) for s in sources]
        self.rows = {name: torch.tensor([i for i, s in enumerate(splits) if s == name])
                     for name in ("train", "validation", "test")}
        encoded = source_tokenizer(sources, return_tensors="pt")
        self.mask = encoded["attention_mask"]
        with torch.no_grad():
            self.states = torch.cat([model.encoder(input_ids=ids, attention_mask=m).last_hidden_state
                                     for ids, m in zip(encoded["input_ids"].split(256), self.mask.split(256))])

    def targets(self, rows, generator):
        """(len(rows), words + 1) labels: the source's colours for copy rows, fresh random set-B colours otherwise."""
        free = self.free_ids[torch.randint(0, len(FREE_SET), (len(rows), self.words), generator=generator)]
        body = torch.where(self.is_copy[rows, None], self.colours[rows], free)
        return torch.cat([body, torch.full((len(rows), 1), self.eos)], dim=1)


def encode(model, task, rows):
    """What model.encode() returns, from the cached MiniLM states: the bridge and the controls run here."""
    from graftlm.modeling.modeling_bridge import BridgeEncoderOutput

    bridged = model.bridge(task.states[rows])
    temperature, top_k = model.controls(bridged, task.mask[rows])
    return BridgeEncoderOutput(last_hidden_state=bridged, temperature=temperature, top_k=top_k)


def valid_mass(task, logits):
    """(B,) mean probability of a valid free-choice token: a set-B colour at each colour position, eos at the end."""
    probs = logits.float().softmax(-1)
    colour = probs[:, :-1, task.free_ids].sum(-1)
    return torch.cat([colour, probs[:, -1:, task.eos]], dim=1).mean(1)


@torch.no_grad()
def validation_check(model, task, generator):
    rows = task.rows["validation"]
    labels = task.targets(rows, generator)
    out = model(attention_mask=task.mask[rows], encoder_outputs=encode(model, task, rows), labels=labels)
    copy = task.is_copy[rows]
    exact = (out.logits.argmax(-1) == labels).all(-1)  # teacher-forced argmax = greedy decoding on the copy rows
    return {"copy_exact_match": float(exact[copy].float().mean()),
            "free_valid_mass": float(valid_mass(task, out.logits[~copy]).mean()),
            "ce_loss": out.ce_loss.item(), "control_loss": out.control_loss.item()}


def train(model, task, args, seed):
    generator = torch.Generator().manual_seed(seed)
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    train_rows, history, learned_at = task.rows["train"], [], None
    start = time.perf_counter()
    for step in range(1, args.max_steps + 1):
        model.train()
        rows = train_rows[torch.randint(0, len(train_rows), (args.batch_size,), generator=generator)]
        out = model(attention_mask=task.mask[rows], encoder_outputs=encode(model, task, rows),
                    labels=task.targets(rows, generator))
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.max_steps:
            model.eval()
            check = {"step": step, **validation_check(model, task, torch.Generator().manual_seed(1))}
            history.append(check)
            logger.info("seed %s %s", seed, {k: round(v, 4) for k, v in check.items()})
            if check["copy_exact_match"] >= args.stop_copy_em and check["free_valid_mass"] >= args.stop_free_valid:
                learned_at = learned_at or step
            if learned_at and step >= args.min_steps:
                break
    model.eval()
    return {"learned": learned_at is not None, "learned_at": learned_at, "steps": history[-1]["step"],
            "history": history,
            "training_seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def teacher_forced(model, task, rows, free_targets, generator, temperatures=(), batch_size=64):
    """Held-out pairs (each copy source once, each free source with `free_targets` random targets): per pair its
    source index, the target logits, the max_top_k largest logits, full-vocabulary logsumexp of logits/T for each of
    `temperatures` and for the source's own predicted temperature, and the predicted (T, k)."""
    rows = torch.cat([rows[task.is_copy[rows]], rows[~task.is_copy[rows]].repeat_interleave(free_targets)])
    labels = task.targets(rows, generator)
    k_max = model.config.max_top_k
    parts = []
    for chunk, chunk_labels in zip(rows.split(batch_size), labels.split(batch_size)):
        enc = encode(model, task, chunk)
        logits = model(attention_mask=task.mask[chunk], encoder_outputs=enc,
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(chunk_labels)).logits.float()
        own_t = enc.temperature[:, None, None]
        parts.append({
            "source": chunk, "target": logits.gather(-1, chunk_labels[..., None]).squeeze(-1),
            "top": logits.topk(k_max, dim=-1).values,
            **{("lse", t): (logits / t).logsumexp(-1) for t in temperatures},
            "lse_own": (logits / own_t).logsumexp(-1),
            "temperature": enc.temperature, "top_k": enc.top_k.round().clamp(1, k_max),
        })
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def pair_nll(tf, temperature, top_k, lse):
    """Per pair (summed true NLL, targets outside the top-k, summed temperature-only NLL).

    temperature: (P,) or a number; top_k: (P,) long, or None for no truncation; lse: (P, L) logsumexp of logits/T
    over the whole vocabulary, or None (the temperature-only NLL is then not computed: nan).
    The top-k distribution is softmax(logits / T) over the tokens whose logit is >= the k-th largest (ties kept,
    as AdaptiveLogitsProcessor does): NLL = logsumexp(top_k logits / T) - target / T, infinite outside.
    """
    t = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1, 1)
    scaled_target = tf["target"] / t
    temp_only = (lse - scaled_target).sum(-1) if lse is not None else torch.full(scaled_target.shape[:1], math.nan)
    if top_k is None:
        return temp_only, torch.zeros_like(temp_only), temp_only
    k = torch.as_tensor(top_k).long().reshape(-1, 1, 1).expand(*tf["target"].shape, 1)
    kth = tf["top"].gather(-1, k - 1).squeeze(-1)
    inside = tf["target"] >= kth
    kept = tf["top"] >= kth[..., None]  # the k largest, and any tied with the k-th
    lse_k = (tf["top"] / t[..., None]).masked_fill(~kept, -math.inf).logsumexp(-1)
    nll = torch.where(inside, lse_k - scaled_target, torch.full_like(scaled_target, math.inf))
    return nll.sum(-1), (~inside).sum(-1).float(), temp_only


def fit(tf, pairs):
    """The grid (T, k) with the fewest targets outside the top-k over `pairs`, then the lowest true NLL."""
    best = None
    for t in TEMPERATURES:
        for k in range(1, tf["top"].shape[-1] + 1):
            nll, misses, _ = pair_nll({key: tf[key][pairs] for key in ("target", "top")}, t, k, None)
            key = (float(misses.sum()), float(nll[nll.isfinite()].sum()))
            if best is None or key < best[0]:
                best = (key, t, k)
    return best[1], best[2]


def settings(tf, copy, fitted):
    """Per method: (temperature (P,), top_k (P,) or None, lse (P, L)) for the pairs of tf."""
    n = copy.numel()

    def fixed(per_pair_t, per_pair_k):
        lse = torch.stack([tf["lse", t][p] for p, t in enumerate(per_pair_t)])
        return torch.tensor(per_pair_t), torch.tensor(per_pair_k), lse

    oracle = [fitted["oracle_copy"] if c else fitted["oracle_free"] for c in copy.tolist()]
    return {
        "adaptive": (tf["temperature"], tf["top_k"].long(), tf["lse_own"]),
        "global": fixed([fitted["global"][0]] * n, [fitted["global"][1]] * n),
        "oracle": fixed([o[0] for o in oracle], [o[1] for o in oracle]),
        "greedy": fixed([1.0] * n, [1] * n),
        "plain": (torch.ones(n), None, tf["lse", 1.0]),
    }


@torch.no_grad()
def sample(model, task, rows, temperature, top_k, samples, generator):
    """(len(rows), samples, words + 1) tokens sampled with AdaptiveLogitsProcessor (the adaptive path of
    generate()), each row with its own temperature and top-k; top_k None: softmax(logits / T) over the whole
    vocabulary. With a top-k the processor runs on each row's max_top_k largest logits, the only ones it can keep."""
    from graftlm.modeling.bridge_decoding import AdaptiveLogitsProcessor

    rows = rows.repeat_interleave(samples)
    enc = encode(model, task, rows)
    t = temperature.repeat_interleave(samples)
    processor = None if top_k is None else AdaptiveLogitsProcessor(t, top_k.float().repeat_interleave(samples))
    ids = torch.full((len(rows), 1), model.config.decoder_start_token_id)
    for _ in range(task.words + 1):
        logits = model(attention_mask=task.mask[rows], encoder_outputs=enc, decoder_input_ids=ids,
                       use_cache=False, logits_to_keep=1).logits[:, -1].float()
        if processor is None:
            step = torch.multinomial((logits / t[:, None]).softmax(-1), 1, generator=generator)
        else:
            values, candidates = logits.topk(model.config.max_top_k, dim=-1)
            choice = torch.multinomial(processor(ids, values).softmax(-1), 1, generator=generator)
            step = candidates.gather(-1, choice)
        ids = torch.cat([ids, step], dim=1)
    return ids[:, 1:].reshape(-1, samples, task.words + 1)


def per_source(model, task, tf, rows, methods, samples, generator):
    """Per method, per held-out source (rows order): NLL sums, misses, tokens, and the generation metrics."""
    copy = task.is_copy[rows]
    position = {int(r): i for i, r in enumerate(rows)}
    owner = torch.tensor([position[int(s)] for s in tf["source"]])
    tokens = torch.zeros(len(rows)).index_add_(0, owner, torch.full((len(owner),), float(task.words + 1)))
    source_t = torch.zeros(len(rows)).index_copy_(0, owner, tf["temperature"])
    source_k = torch.zeros(len(rows)).index_copy_(0, owner, tf["top_k"])
    out = {}
    for name, (t, k, lse) in methods.items():
        nll, misses, temp_only = pair_nll(tf, t, k, lse)
        t_row = torch.zeros(len(rows)).index_copy_(0, owner, t.float())
        k_row = None if k is None else torch.zeros(len(rows)).index_copy_(0, owner, k.float())
        drawn = sample(model, task, rows, t_row, k_row, samples, generator)
        body, end = drawn[..., :-1], drawn[..., -1]
        exact = ((body == task.colours[rows, None]).all(-1) & (end == task.eos)).float().mean(1)
        valid = (torch.isin(body, task.free_ids).all(-1) & (end == task.eos))
        distinct = torch.tensor([len({tuple(s) for s in source.tolist()}) / samples for source in drawn])
        counts = (body[..., None] == task.free_ids).sum((1, 2)).float()  # (sources, 8) sampled set-B colours
        out[name] = {
            "nll": torch.zeros(len(rows)).index_add_(0, owner, nll),
            "misses": torch.zeros(len(rows)).index_add_(0, owner, misses),
            "temp_nll": torch.zeros(len(rows)).index_add_(0, owner, temp_only),
            "tokens": tokens, "copy": copy, "exact": exact, "valid": valid.float().mean(1),
            "distinct": distinct, "counts": counts, "temperature": t_row if name != "adaptive" else source_t,
            "top_k": (k_row if k_row is not None else torch.full((len(rows),), float("nan")))
            if name != "adaptive" else source_k,
        }
    return out


def summary(s, index):
    """The reported figures of one method over the held-out sources `index` (a bootstrap resample or all)."""
    copy, free = index[s["copy"][index]], index[~s["copy"][index]]

    def per_token(key, idx):
        return float(s[key][idx].sum() / s["tokens"][idx].sum())

    counts = s["counts"][free].sum(0)
    p = counts / counts.sum().clamp_min(1)
    return {
        "nll": per_token("nll", index), "nll_copy": per_token("nll", copy), "nll_free": per_token("nll", free),
        "outside_top_k": per_token("misses", index), "outside_top_k_free": per_token("misses", free),
        "temp_nll": per_token("temp_nll", index), "temp_nll_copy": per_token("temp_nll", copy),
        "temp_nll_free": per_token("temp_nll", free),
        "copy_exact_match": float(s["exact"][copy].mean()), "free_validity": float(s["valid"][free].mean()),
        "free_distinct": float(s["distinct"][free].mean()),
        "free_colour_entropy": float(-(p * p.clamp_min(1e-12).log()).sum()) + 0.0,  # + 0.0: no "-0.00"
        "temperature_copy": float(s["temperature"][copy].mean()),
        "temperature_free": float(s["temperature"][free].mean()),
        "top_k_copy": float(s["top_k"][copy].mean()), "top_k_free": float(s["top_k"][free].mean()),
    }


def with_intervals(s, n_boot, generator):
    """{metric: [value, low, high]}: the value on all sources and the 95% bootstrap interval over sources
    (order statistics, so an infinite NLL in some resamples stays infinite rather than becoming nan)."""
    n = len(s["tokens"])
    point = summary(s, torch.arange(n))
    draws = [summary(s, torch.randint(0, n, (n,), generator=generator)) for _ in range(n_boot)]
    out = {}
    for key, value in point.items():
        values = torch.tensor([d[key] for d in draws]).sort().values
        out[key] = [value, float(values[int(0.025 * n_boot)]), float(values[int(0.975 * n_boot) - 1])]
    return out


def pooled(per_seed_sources):
    """Per method: the per-source values averaged over seeds (counts summed), for the pooled bootstrap."""
    out = {}
    for name in METHODS:
        runs = [s[name] for s in per_seed_sources]
        out[name] = {key: (runs[0][key] if key in ("copy", "tokens") else
                           torch.stack([r[key] for r in runs]).sum(0) if key == "counts" else
                           torch.stack([r[key] for r in runs]).mean(0)) for key in runs[0]}
    return out


def build_model(base, seed, control_loss_weight=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from testing_utils import minilm_dir

    from graftlm.conversion.bridge import convert_bert_gpt2_to_bridge
    from graftlm.conversion.common import load_tokenizer

    torch.manual_seed(seed)  # the new modules' initialisation
    options = {} if control_loss_weight is None else {"control_loss_weight": control_loss_weight}
    model, _ = convert_bert_gpt2_to_bridge(minilm_dir(), base, bridge_type="ga", controls=True, **options)
    return model, load_tokenizer(minilm_dir()), load_tokenizer(base)


def jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def fmt(cell, digits=3):
    value, low, high = cell
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def print_table(title, table):
    print(title)
    print("| method | T copy / free | k copy / free | NLL copy | NLL free | outside top-k (free) | temp-only NLL copy "
          "| temp-only NLL free | copy exact match | free validity | free distinct | free colour entropy |")
    print("|---" * 12 + "|")
    for name in METHODS:
        r = table[name]
        print(f"| {name} | {r['temperature_copy'][0]:.2f} / {r['temperature_free'][0]:.2f} | "
              f"{r['top_k_copy'][0]:.1f} / {r['top_k_free'][0]:.1f} | {fmt(r['nll_copy'])} | {fmt(r['nll_free'])} | "
              f"{r['outside_top_k_free'][0]:.3f} | {fmt(r['temp_nll_copy'])} | {fmt(r['temp_nll_free'])} | "
              f"{fmt(r['copy_exact_match'], 2)} | {fmt(r['free_validity'], 2)} | {fmt(r['free_distinct'], 2)} | "
              f"{fmt(r['free_colour_entropy'], 2)} |")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for seed, r in results["per_seed"].items():
        steps = [h["step"] for h in r["training"]["history"]]
        axes[0].plot(steps, [h["copy_exact_match"] for h in r["training"]["history"]], label=f"seed {seed} copy EM")
        axes[0].plot(steps, [h["free_valid_mass"] for h in r["training"]["history"]], ls="--",
                     label=f"seed {seed} free valid mass")
    axes[0].set_xlabel("step")
    axes[0].set_title("validation (stopping rule)")
    axes[0].legend(fontsize=7)
    table = results["pooled"]
    x = range(len(METHODS))
    for ax, keys, title in ((axes[1], ("temp_nll_copy", "temp_nll_free"), "held-out temperature-only NLL / token"),
                            (axes[2], ("copy_exact_match", "free_validity", "free_distinct"), "sampled outputs")):
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            values = [table[m][key] for m in METHODS]
            centre = [v[0] if math.isfinite(v[0]) else float("nan") for v in values]
            err = [[c - v[1] for c, v in zip(centre, values)], [v[2] - c for c, v in zip(centre, values)]]
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in x], centre, width, yerr=err, capsize=3, label=key)
        ax.set_xticks(list(x), METHODS)
        ax.set_title(title + " (pooled, 95% CI)")
        ax.legend(fontsize=7)
    axes[1].axhline(results["ideal_free_nll_per_token"], color="grey", lw=0.8, ls=":")  # uniform over set B
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seed(base, args, seed):
    """Train one seed's model, fit the global and oracle settings on validation, score and sample the test sources."""
    model, source_tokenizer, target_tokenizer = build_model(base, seed, args.control_loss_weight)
    task = Task(model, source_tokenizer, target_tokenizer, args.words)
    training = train(model, task, args, seed)
    generator = torch.Generator().manual_seed(seed)
    val = teacher_forced(model, task, task.rows["validation"], args.free_targets, generator)
    val_copy = task.is_copy[val["source"]]
    fitted = {"global": fit(val, torch.arange(len(val_copy))), "oracle_copy": fit(val, val_copy.nonzero()[:, 0]),
              "oracle_free": fit(val, (~val_copy).nonzero()[:, 0])}
    logger.info("seed %s: fitted on validation %s", seed, fitted)
    test_rows = task.rows["test"]
    chosen = {fitted["global"][0], fitted["oracle_copy"][0], fitted["oracle_free"][0], 1.0}
    test = teacher_forced(model, task, test_rows, args.free_targets, generator, sorted(chosen))
    methods = settings(test, task.is_copy[test["source"]], fitted)
    logger.info("seed %s: held-out pairs scored; sampling", seed)
    source_metrics = per_source(model, task, test, test_rows, methods, args.samples, generator)
    logger.info("seed %s: sampled; bootstrapping", seed)
    boot = torch.Generator().manual_seed(seed)
    record = {"training": training, "fitted": fitted,
              "table": {m: with_intervals(source_metrics[m], args.bootstrap, boot) for m in METHODS}}
    held_out = {"copy": int(task.is_copy[test_rows].sum()), "free": int((~task.is_copy[test_rows]).sum())}
    return record, source_metrics, held_out


def run(args):
    """Every seed in turn; the JSON and PNG are rewritten after each (pooled over the seeds done so far)."""
    torch.set_num_threads(args.threads)
    base = offline_base.base_checkpoint(**args.base)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    per_seed, sources = {}, []
    for seed in args.seeds:
        record, source_metrics, held_out = run_seed(base, args, seed)
        per_seed[str(seed)] = record
        sources.append(source_metrics)
        training, fitted = record["training"], record["fitted"]
        status = f"learned at step {training['learned_at']}" if training["learned"] else "NOT LEARNED"
        print_table(f"seed {seed}: {status}, trained {training['steps']} steps; global (T, k) = {fitted['global']}, "
                    f"oracle copy {fitted['oracle_copy']}, free {fitted['oracle_free']}", record["table"])
        merged, boot = pooled(sources), torch.Generator().manual_seed(0)
        results = {
            "command": "python " + shlex.join(sys.argv), "base": str(base), "seeds": list(map(int, per_seed)),
            "seeds_requested": args.seeds, "words": args.words, "copy_set": COPY_SET, "free_set": FREE_SET,
            "temperature_grid": TEMPERATURES, "held_out_sources": held_out,
            "settings": {k: v for k, v in vars(args).items() if k not in ("output_dir", "base")},
            "ideal_free_nll_per_token": math.log(len(FREE_SET)) * args.words / (args.words + 1),
            "per_seed": per_seed,
            "pooled": {m: with_intervals(merged[m], args.bootstrap, boot) for m in METHODS},
        }
        (out / "adaptive_decoding.json").write_text(json.dumps(jsonable(results), indent=1), encoding="utf-8")
        plot(results, out / "adaptive_decoding.png")
    print(results["command"])
    print_table(f"pooled over seeds {results['seeds']} ({held_out} held-out sources)", results["pooled"])
    print(f"wrote {out / 'adaptive_decoding.json'} and {out / 'adaptive_decoding.png'}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--base", type=base_setting, nargs="*", default=[],
                        help="offline base settings KEY=VALUE (experiments/offline_base.py DEFAULTS)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results/adaptive_decoding"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--words", type=int, default=3, help="colours per source (8**words sources per set)")
    parser.add_argument("--max-steps", type=int, default=3000, help="step cap of the stopping rule")
    parser.add_argument("--min-steps", type=int, default=0,
                        help="keep training to at least this step after the rule is met (more steps for the controls)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--stop-copy-em", type=float, default=0.95)
    parser.add_argument("--stop-free-valid", type=float, default=0.95)
    parser.add_argument("--control-loss-weight", type=float, default=None,
                        help="the bridge option control_loss_weight (default: the converter's, 0.1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--free-targets", type=int, default=4, help="random targets scored per held-out free source")
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out source")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    args.base = dict(args.base)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
