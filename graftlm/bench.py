"""Performance suite: every GraftLM architecture against stock GPT-2 of the same size, in one run.

Measures cached greedy decoding (tokens/s), one training step (time, peak memory), GPT2-DFA after pruning half of
its head dimensions, conversion + export of GPT-2-small-sized checkpoints, and the cost of a forward pass as the
sequence and the batch grow. Prints each ratio with its target and a PASS/MISS verdict, and writes bench.json,
bench.md and PNG plots. A missed target is reported, never raised: the exit code is 0 when the measurements ran.

    graftlm bench                       # tiny shapes on CPU (a few minutes); --size small for GPT-2-small shapes
    graftlm bench --device cuda --size small
    python bench/bench_all.py --quick   # seconds: the structure of the outputs, not meaningful numbers
"""

import copy
import ctypes
import datetime
import json
import logging
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import registry

logger = logging.getLogger(__name__)

ARCHS = tuple(registry.names())
# Model shapes. "tiny" shrinks the vocabulary with the width, so that the LM head's share of the work stays close to
# GPT-2-small's (head / blocks = 38.6M / 85M parameters there, 2.1M / 3.1M here).
SIZES = {
    "quick": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, cross_attn_layers=[0, 1], chunk_size=16),
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, cross_attn_layers=[1, 2], chunk_size=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, cross_attn_layers=[5, 7], chunk_size=128),
}
DECODE_TARGETS = {"dfa": 0.8, "bsbr": 0.8, "bridge": 0.75, "scaffold": 0.7}  # tokens/s ratio, at least
TRAIN_TIME_TARGETS = {"dfa": 1.15}  # step time ratio, at most; the others are reported
PRUNED_DECODE_TARGET = 1.3  # pruned / unpruned tokens/s, at least
CONVERSION_TARGET_S = 15.0  # seconds, at most
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# ----- measuring (also used by bench/bench_bsbr.py) -----


def _status_kb(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory_mb(fn, device):
    """Run fn() once; return (its result, peak memory above the level before the call, in MiB).

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak resident set size (Linux VmHWM, reset through
    /proc/self/clear_refs); call follow_live_tensors() first, so that the resident size follows the live tensors."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    before = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before) / 2**10


def follow_live_tensors():
    """Make glibc return freed tensors (>= 64 KiB) to the system, as MALLOC_MMAP_THRESHOLD_=65536 would, so that the
    resident size measured by peak_memory_mb does not keep earlier runs' memory. Returns False off glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536))
    except (OSError, AttributeError):
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, device, repeats):
    """Wall times of `repeats` runs of fn() after one warm-up run, synchronising CUDA around each."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def timed(fn, device, repeats):
    """Best wall time of fn() over `repeats` runs after one warm-up (the minimum is the least disturbed by other
    processes sharing the machine, as timeit recommends)."""
    return min(time_runs(fn, device, repeats))


def _stats(times):
    return {"best_s": min(times), "median_s": statistics.median(times)}


# ----- models -----


def stock_config(shape, n_positions):
    from transformers import GPT2Config

    return GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                      vocab_size=shape["vocab_size"], n_positions=n_positions,
                      bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1)


def save_checkpoints(shape, n_positions, folder, tokenizers=False):
    """Random stock GPT-2 and BERT checkpoints of one shape (BERT as wide and deep as GPT-2), as Hub folders; with
    `tokenizers`, also the real tokenizers, with the vocabularies their ids need."""
    from transformers import BertConfig, BertModel, GPT2LMHeadModel

    folder = Path(folder)
    torch.manual_seed(0)
    gpt2_vocab = 50257 if tokenizers else shape["vocab_size"]  # GPT-2's tokenizer: each of its ids needs an embedding
    GPT2LMHeadModel(stock_config({**shape, "vocab_size": gpt2_vocab}, n_positions)).save_pretrained(folder / "gpt2")
    bert_vocab = 30522 if tokenizers else shape["vocab_size"]  # the packaged BERT tokenizer's vocabulary
    bert = BertConfig(vocab_size=bert_vocab, hidden_size=shape["n_embd"], num_hidden_layers=shape["n_layer"],
                      num_attention_heads=shape["n_head"], intermediate_size=4 * shape["n_embd"],
                      max_position_embeddings=max(512, n_positions))
    BertModel(bert).save_pretrained(folder / "bert")
    if tokenizers:
        from .conversion.common import load_tokenizer
        from .offline import packaged_bert, write_gpt2_tokenizer_files

        write_gpt2_tokenizer_files(folder / "gpt2")
        load_tokenizer(packaged_bert()).save_pretrained(folder / "bert")
    return folder / "gpt2", folder / "bert"


# Identity-initialised parameters of each converter; opened with noise as training would, so that every branch runs.
OPEN_PARAMETERS = {
    "dfa": r"attn\.(c_gate|dim_masks)\.",
    "bsbr": r"retrieval_gate",
    "bridge": r"crossattention\.c_proj",
    "scaffold": r"^fusers\.\d+\.gate$",
}


@torch.no_grad()
def open_gates(model, arch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    names = [n for n, p in model.named_parameters() if re.search(OPEN_PARAMETERS[arch], n)]
    if not names:
        raise RuntimeError(f"{arch}: no parameter matches {OPEN_PARAMETERS[arch]!r}; the converter changed")
    params = dict(model.named_parameters())
    for name in names:
        params[name].add_(0.5 * torch.randn(params[name].shape, generator=generator))
    return model


def convert(arch, gpt2_dir, bert_dir, shape):
    """The converted model (eval mode) with its new modules opened."""
    if arch == "dfa":
        from .conversion.dfa import convert_gpt2_to_dfa as fn

        model, _ = fn(gpt2_dir)
    elif arch == "bsbr":
        from .conversion.bsbr import convert_gpt2_to_bsbr

        model, _ = convert_gpt2_to_bsbr(gpt2_dir, chunk_size=shape["chunk_size"])
    elif arch == "bridge":
        from .conversion.bridge import convert_bert_gpt2_to_bridge

        model, _ = convert_bert_gpt2_to_bridge(bert_dir, gpt2_dir, bridge_type="ga")
    elif arch == "scaffold":
        from .conversion.scaffold import convert_gpt2_to_scaffold

        model, _ = convert_gpt2_to_scaffold(gpt2_dir, gpt2_dir, cross_attn_layers=shape["cross_attn_layers"])
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return open_gates(model, arch).eval()


def prune_half(dfa):
    """A copy of GPT2-DFA whose masks close half of every head's q/k/v dimensions, then pruned away."""
    pruned = copy.deepcopy(dfa)
    with torch.no_grad():
        for block in pruned.transformer.h:
            for mask in (block.attn.dim_masks.q, block.attn.dim_masks.k, block.attn.dim_masks.v):
                mask[:, mask.shape[1] // 2:] = -10.0  # 2 * sigmoid(-10) ~ 1e-4 < mask_threshold
    pruned.prune()
    return pruned


# ----- measurements -----


def forward_kwargs(arch, ids, labels=False):
    """One full forward over `ids`: the bridge's encoder and decoder both read them."""
    kwargs = {"input_ids": ids}
    if arch == "bridge":
        kwargs["decoder_input_ids"] = ids
    if labels:
        kwargs["labels"] = ids
    return kwargs


class StepClock:
    """A stopping criterion that never stops: it timestamps every token generate() produces (after a CUDA sync)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_rate(model, ids, new_tokens, device, repeats):
    """Greedy cached decoding of exactly `new_tokens` tokens through generate(), timed per token. The bridge's encoder
    reads the prompt and its decoder starts from decoder_start_token_id; every other model continues the prompt.

    prefill: from the call to the first token (the scaffold's and the encoder's one read of the prompt included);
    tokens/s: of the new_tokens - 1 cached steps after it, in the best of `repeats` runs after a warm-up."""
    from transformers import StoppingCriteriaList

    runs = []
    for _ in range(repeats + 1):
        clock = StepClock(device)
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
        if len(clock.stamps) != new_tokens:
            raise RuntimeError(f"generate produced {len(clock.stamps)} tokens instead of {new_tokens}")
        runs.append((clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0]))
    prefill, steps = [r[0] for r in runs[1:]], [r[1] for r in runs[1:]]
    return {"tokens_per_s": ids.shape[0] * (new_tokens - 1) / min(steps), "decode_s": _stats(steps),
            "prefill_s": _stats(prefill)}


def train_step_fn(model, arch, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(**forward_kwargs(arch, ids, labels=True)).loss.backward()

    return step


def verdict(value, target, at_least):
    if target is None:
        return "report"
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


def bench_decoding(models, args, device, generator):
    rows = []
    grid = [(p, b) for p in args.prompts for b in args.batches]
    for prompt, batch in tqdm(grid, desc="decoding"):
        ids = torch.randint(0, args.shape["vocab_size"], (batch, prompt), generator=generator).to(device)
        with torch.no_grad():
            raw = {name: decode_rate(m, ids, args.new_tokens, device, args.repeats) for name, m in models.items()}
        for arch in (a for a in models if a not in ("gpt2", "dfa_pruned")):
            ratio = raw[arch]["tokens_per_s"] / raw["gpt2"]["tokens_per_s"]
            rows.append({"arch": arch, "prompt": prompt, "batch": batch, "stock": raw["gpt2"], "model": raw[arch],
                         "ratio": ratio, "target": DECODE_TARGETS[arch],
                         "verdict": verdict(ratio, DECODE_TARGETS[arch], True)})
        if "dfa_pruned" in raw:
            speedup = raw["dfa_pruned"]["tokens_per_s"] / raw["dfa"]["tokens_per_s"]
            rows.append({"arch": "dfa_pruned", "prompt": prompt, "batch": batch, "stock": raw["dfa"],
                         "model": raw["dfa_pruned"], "ratio": speedup, "target": PRUNED_DECODE_TARGET,
                         "verdict": verdict(speedup, PRUNED_DECODE_TARGET, True)})
        logger.info("decoding prompt=%d batch=%d: %s", prompt, batch,
                    {k: round(v["tokens_per_s"], 1) for k, v in raw.items()})
    return rows


def memory_ratio(model_mb, stock_mb):
    """None when the stock peak is below what the RSS method resolves (toy shapes)."""
    return model_mb / stock_mb if stock_mb > 0 else None


def bench_training(models, args, device, generator):
    ids = torch.randint(0, args.shape["vocab_size"], (args.train_batch, args.train_seq), generator=generator)
    ids = ids.to(device)
    raw = {}
    for name in tqdm([n for n in models if n != "dfa_pruned"], desc="training step"):
        model = copy.deepcopy(models[name]).train()
        if name == "scaffold":
            model.add_lora()  # what `graftlm train scaffold` trains: LoRA + fusers, base frozen
        step = train_step_fn(model, name, ids)
        times = time_runs(step, device, args.repeats)
        _, peak = peak_memory_mb(step, device)
        raw[name] = {**_stats(times), "peak_mb": peak,
                     "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        del model, step
    rows = []
    for arch in (a for a in raw if a != "gpt2"):
        time_ratio = raw[arch]["best_s"] / raw["gpt2"]["best_s"]
        target = TRAIN_TIME_TARGETS.get(arch)
        rows.append({"arch": arch, "stock": raw["gpt2"], "model": raw[arch], "time_ratio": time_ratio,
                     "memory_ratio": memory_ratio(raw[arch]["peak_mb"], raw["gpt2"]["peak_mb"]), "target": target,
                     "verdict": verdict(time_ratio, target, False)})
    return rows


def bench_pruned_attention(dfa, pruned, args, device, generator):
    """Forward time of layer 0's attention alone, on a prompt-length batch, unpruned vs pruned."""
    prompt, batch = max(args.prompts), max(args.batches)
    hidden = torch.randn(batch, prompt, args.shape["n_embd"], generator=generator).to(device)
    raw = {}
    with torch.no_grad():
        for name, model in (("dfa", dfa), ("dfa_pruned", pruned)):
            attn = model.transformer.h[0].attn
            raw[name] = _stats(time_runs(lambda: attn(hidden, None), device, args.repeats))
    return {"prompt": prompt, "batch": batch, "unpruned": raw["dfa"], "pruned": raw["dfa_pruned"],
            "speedup": raw["dfa"]["best_s"] / raw["dfa_pruned"]["best_s"],
            "qk_dims": pruned.config.layer_qk_dims, "v_dims": pruned.config.layer_v_dims,
            "head_dim": pruned.config.head_dim}


def bench_scaling(models, args, device, generator):
    """Forward time (no cache) against the sequence length at batch 1, and against the batch at the shortest prompt."""
    vocab = args.shape["vocab_size"]
    sweeps = {"seq": [(1, n) for n in args.scaling_lengths], "batch": [(b, min(args.prompts)) for b in args.scaling_batches]}
    result = {"seq": {"x": list(args.scaling_lengths), "batch": 1, "seconds": {}},
              "batch": {"x": list(args.scaling_batches), "seq": min(args.prompts), "seconds": {}}}
    names = [n for n in models if n != "dfa_pruned"]
    with torch.no_grad():
        for sweep, points in sweeps.items():
            for name in tqdm(names, desc=f"scaling ({sweep})"):
                series = []
                for batch, seq in points:
                    ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
                    kwargs = forward_kwargs(name, ids)
                    series.append(timed(lambda: models[name](**kwargs, use_cache=False), device, args.repeats))
                result[sweep]["seconds"][name] = series
    return result


CONVERT_ARGUMENTS = {
    "dfa": lambda gpt2, bert, shape: ["--base", gpt2],
    "bsbr": lambda gpt2, bert, shape: ["--base", gpt2, "--chunk-size", str(shape["chunk_size"])],
    "bridge": lambda gpt2, bert, shape: ["--encoder", bert, "--decoder", gpt2, "--bridge", "ga"],
    "scaffold": lambda gpt2, bert, shape: ["--base", gpt2, "--scaffold", gpt2, "--cross-attn-layers",
                                           ",".join(map(str, shape["cross_attn_layers"]))],
}


def bench_conversion(args, work_dir):
    """Wall time of `graftlm convert <arch> ... --output-dir` (load, convert, fidelity probe, export) on random
    checkpoints of the conversion size. The scaffold reads two GPT-2s (the same folder twice) and the bridge a BERT
    as large as the GPT-2: both convert about twice the parameters."""
    from .convert import convert as convert_and_export

    shape = SIZES[args.conversion_size]
    gpt2_dir, bert_dir = save_checkpoints(shape, 1024, Path(work_dir) / "conversion", tokenizers=True)
    rows = []
    for arch in tqdm(args.archs, desc="conversion + export"):
        out = Path(work_dir) / "exports" / arch
        start = time.perf_counter()
        convert_and_export(arch, [*CONVERT_ARGUMENTS[arch](str(gpt2_dir), str(bert_dir), shape), "--output-dir", str(out)])
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
        rows.append({"arch": arch, "seconds": seconds, "size": args.conversion_size, "weights_mb": size / 2**20,
                     "target_s": CONVERSION_TARGET_S, "verdict": verdict(seconds, CONVERSION_TARGET_S, False)})
        logger.info("conversion %s: %.2f s", arch, seconds)
    return rows


def run_long_context(args, output_dir):
    """Run bench/bench_bsbr.py (BSBR at 1k..16k tokens) in its own process and return its JSON."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_bsbr.py"
    if not script.exists():
        raise FileNotFoundError(f"--long-context runs {script}, which only a source checkout of graftlm has")
    folder = output_dir / "bsbr_long_context"
    cmd = [sys.executable, str(script), "--output-dir", str(folder), "--device", args.device.type]
    if args.quick:
        cmd += ["--quick", "--chunk-size", "64"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True)
    return json.loads((folder / "bsbr_bench.json").read_text(encoding="utf-8"))


# ----- report -----

LABELS = {"gpt2": "GPT-2", "dfa": "GPT2-DFA", "bsbr": "GPT2-BSBR", "bridge": "Bridged", "scaffold": "Scaffolded",
          "dfa_pruned": "GPT2-DFA pruned"}


def _times(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


def _machine_line(m):
    where = m["gpu"] if m["device"] == "cuda" else f"{m['cpu']}, {m['torch_threads']} torch threads, no GPU"
    return (f"{m['date']} on {where}; torch {m['torch']}, transformers {m['transformers']}, "
            f"graftlm {m['graftlm']}, Python {m['python']}")


def markdown(results):
    """bench.md: one table per measurement, each ratio with its target and verdict."""
    s = results["settings"]
    lines = [f"# GraftLM performance, `{'quick' if s['quick'] else s['size']}` shapes", "",
             _machine_line(results["machine"]), "",
             f"Shapes: {s['shape']}. Best of {s['repeats']} runs after one warm-up; stock GPT-2 of the same shapes "
             "in the same run.", "",
             f"## Cached greedy decoding ({s['new_tokens']} new tokens; tokens/s of the steps after the prefill)", "",
             "| architecture | prompt | batch | stock tok/s | model tok/s | ratio | target | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["decoding"]:
        lines.append(f"| {LABELS[r['arch']]} | {r['prompt']} | {r['batch']} | {r['stock']['tokens_per_s']:.1f} | "
                     f"{r['model']['tokens_per_s']:.1f} | {r['ratio']:.2f}x | >= {r['target']}x | {r['verdict']} |")
    lines += ["", f"## One training step (forward + backward, batch {s['train_batch']} x {s['train_seq']} tokens)", "",
              "| architecture | stock s | model s | time ratio | stock peak MiB | model peak MiB | memory ratio | "
              "target (time) | verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["training"]:
        target = f"<= {r['target']}x" if r["target"] is not None else "-"
        lines.append(f"| {LABELS[r['arch']]} | {r['stock']['best_s']:.4f} | {r['model']['best_s']:.4f} | "
                     f"{r['time_ratio']:.2f}x | {r['stock']['peak_mb']:.1f} | {r['model']['peak_mb']:.1f} | "
                     f"{_times(r['memory_ratio'])} | {target} | {r['verdict']} |")
    if "pruning" in results:
        p = results["pruning"]
        a = p["attention"]
        lines += ["", f"## GPT2-DFA with half of each head's dimensions pruned (q/k {a['qk_dims']}, v {a['v_dims']} "
                  f"of {a['head_dim']})", "",
                  f"Attention of layer 0 alone, batch {a['batch']} x {a['prompt']} tokens: "
                  f"{1e3 * a['unpruned']['best_s']:.2f} ms unpruned, {1e3 * a['pruned']['best_s']:.2f} ms pruned: "
                  f"{a['speedup']:.2f}x faster.", "",
                  "| prompt | batch | unpruned tok/s | pruned tok/s | speedup | target | verdict |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for r in p["decoding"]:
            lines.append(f"| {r['prompt']} | {r['batch']} | {r['stock']['tokens_per_s']:.1f} | "
                         f"{r['model']['tokens_per_s']:.1f} | {r['ratio']:.2f}x | >= {r['target']}x | {r['verdict']} |")
    if "conversion" in results:
        lines += ["", f"## Conversion + export (`graftlm convert`, `{results['conversion'][0]['size']}` shapes, "
                  "random weights, CPU)", "", "| architecture | seconds | weights MiB | target | verdict |",
                  "|---|---:|---:|---:|---|"]
        for r in results["conversion"]:
            lines.append(f"| {LABELS[r['arch']]} | {r['seconds']:.1f} | {r['weights_mb']:.0f} | <= {r['target_s']} s | "
                         f"{r['verdict']} |")
    sc = results["scaling"]
    lines += ["", "## Scaling: forward time (ms, no cache)", "",
              "| architecture | " + " | ".join(f"T={n}" for n in sc["seq"]["x"]) + " | "
              + " | ".join(f"B={b}" for b in sc["batch"]["x"]) + " |",
              "|---|" + "---:|" * (len(sc["seq"]["x"]) + len(sc["batch"]["x"]))]
    for name in sc["seq"]["seconds"]:
        cells = [f"{1e3 * t:.1f}" for t in sc["seq"]["seconds"][name] + sc["batch"]["seconds"][name]]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines += ["", f"T: sequence length at batch 1; B: batch at T={sc['batch']['seq']}."]
    if "long_context" in results:
        lc = results["long_context"]
        lines += ["", "## GPT2-BSBR long context (bench/bench_bsbr.py)", "", f"{lc['device_name']}, config {lc['config']}",
                  "", "| n | forward ratio | peak memory ratio | cache ratio | BSBR decode ms | GPT-2 decode ms |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in lc["runs"]:
            lines.append(f"| {r['n']} | {r['ratio_forward_s']:.3f} | {r['ratio_peak_mb']:.3f} | "
                         f"{r['ratio_cache_mb']:.3f} | {r['bsbr_decode_ms']:.2f} | {r['gpt2_sdpa_decode_ms']:.2f} |")
        for key, t in lc["targets"].items():
            lines.append(f"\n- {key}: {t['measured']:.3f} (target <= {t['target']} at n={t['at_n']}): "
                         f"{'PASS' if t['met'] else 'MISS'}")
    return "\n".join(lines) + "\n"


def verdicts(results):
    """(what, measured, target, verdict) of every measurement that has a target."""
    out = [(f"decoding {LABELS[r['arch']]} prompt={r['prompt']} batch={r['batch']}", f"{r['ratio']:.2f}x",
            f">= {r['target']}x", r["verdict"]) for r in results["decoding"]]
    out += [(f"training step {LABELS[r['arch']]}", f"{r['time_ratio']:.2f}x", f"<= {r['target']}x", r["verdict"])
            for r in results["training"] if r["target"] is not None]
    out += [(f"pruned DFA decoding prompt={r['prompt']} batch={r['batch']}", f"{r['ratio']:.2f}x", f">= {r['target']}x",
             r["verdict"]) for r in results.get("pruning", {}).get("decoding", [])]
    out += [(f"conversion + export {LABELS[r['arch']]}", f"{r['seconds']:.1f} s", f"<= {r['target_s']} s", r["verdict"])
            for r in results.get("conversion", [])]
    return out


def plots(results, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = _machine_line(results["machine"]).split(";")[0]
    paths = []

    def save(fig, name):
        fig.suptitle(f"{fig._suptitle.get_text()}\n{title}" if fig._suptitle else title, fontsize=9)
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=110)
        plt.close(fig)
        paths.append(output_dir / name)

    rows = results["decoding"]
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    points = list(dict.fromkeys((r["prompt"], r["batch"]) for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(points)
    for j, (prompt, batch) in enumerate(points):
        values = [next(r["ratio"] for r in rows if (r["arch"], r["prompt"], r["batch"]) == (a, prompt, batch))
                  for a in archs]
        ax.bar([i + j * width for i in range(len(archs))], values, width, label=f"prompt {prompt}, batch {batch}")
    for i, a in enumerate(archs):
        ax.hlines(DECODE_TARGETS[a], i - width / 2, i + 0.8 - width / 2, colors="red", linestyles="--")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(archs))], [LABELS[a] for a in archs])
    ax.set_ylabel("decoding tokens/s, model / stock GPT-2")
    ax.set_title("Cached greedy decoding (red: target)")
    ax.legend(fontsize=8)
    save(fig, "decoding.png")

    train = results["training"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in ((axes[0], "time_ratio", "step time"), (axes[1], "memory_ratio", "peak memory")):
        ax.bar([LABELS[r["arch"]] for r in train], [r[key] or 0.0 for r in train], color="tab:blue")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"training {label}, model / stock GPT-2")
    if any(r["arch"] == "dfa" for r in train):
        axes[0].axhline(TRAIN_TIME_TARGETS["dfa"], color="red", linestyle="--", label="DFA target")
        axes[0].legend(fontsize=8)
    save(fig, "training.png")

    if "pruning" in results:
        p = results["pruning"]
        labels = ["attention (layer 0)"] + [f"decode p{r['prompt']} b{r['batch']}" for r in p["decoding"]]
        values = [p["attention"]["speedup"]] + [r["ratio"] for r in p["decoding"]]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        ax.bar(labels, values, color="tab:green")
        ax.axhline(PRUNED_DECODE_TARGET, color="red", linestyle="--", label="decoding target")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_ylabel("pruned / unpruned speed")
        ax.set_title("GPT2-DFA with half of the head dimensions pruned")
        ax.legend(fontsize=8)
        save(fig, "dfa_pruning.png")

    sc = results["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, xlabel in ((axes[0], "seq", f"sequence length (batch {sc['seq']['batch']})"),
                              (axes[1], "batch", f"batch (sequence {sc['batch']['seq']})")):
        for name, seconds in sc[sweep]["seconds"].items():
            ax.plot(sc[sweep]["x"], [1e3 * t for t in seconds], marker="o", label=LABELS[name])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward time (ms)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Scaling of a forward pass")
    save(fig, "scaling.png")
    return paths


def write_report(results, output_dir):
    """Write bench.json, bench.md and the plots; return the lines to print (verdicts and file names)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    (output_dir / "bench.md").write_text(markdown(results), encoding="utf-8")
    paths = plots(results, output_dir)
    lines = [_machine_line(results["machine"])]
    lines += [f"{verdict_:6} {what}: {measured} (target {target})" for what, measured, target, verdict_ in
              verdicts(results)]
    lines += [f"wrote {output_dir / 'bench.json'}, {output_dir / 'bench.md'}"] + [f"wrote {p}" for p in paths]
    return lines


# ----- the run -----


def machine(device):
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    import transformers

    from . import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "graftlm": __version__,
    }


def run(args):
    device = args.device
    results = {"machine": machine(device), "settings": {
        k: v for k, v in vars(args).items() if k not in ("device", "output_dir", "func", "verbose", "debug", "command")}}
    generator = torch.Generator().manual_seed(0)
    n_positions = max(1024, max(args.prompts) + args.new_tokens, max(args.scaling_lengths), args.train_seq)
    with tempfile.TemporaryDirectory(prefix="graftlm-bench-") as work_dir:
        from transformers import GPT2LMHeadModel

        gpt2_dir, bert_dir = save_checkpoints(args.shape, n_positions, work_dir)
        models = {"gpt2": GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()}
        for arch in tqdm(args.archs, desc="converting"):
            models[arch] = convert(arch, gpt2_dir, bert_dir, args.shape)
        if "dfa" in models:
            models["dfa_pruned"] = prune_half(models["dfa"])
        models = {name: model.to(device) for name, model in models.items()}
        results["decoding"] = bench_decoding(models, args, device, generator)
        results["training"] = bench_training(models, args, device, generator)
        if "dfa" in models:
            results["pruning"] = {
                "attention": bench_pruned_attention(models["dfa"], models["dfa_pruned"], args, device, generator),
                "decoding": [r for r in results["decoding"] if r["arch"] == "dfa_pruned"],
            }
            results["decoding"] = [r for r in results["decoding"] if r["arch"] != "dfa_pruned"]
        results["scaling"] = bench_scaling(models, args, device, generator)
        del models
        if not args.skip_conversion:
            results["conversion"] = bench_conversion(args, work_dir)
    if args.long_context:
        results["long_context"] = run_long_context(args, args.output_dir)
    return results


def add_arguments(parser):
    parser.add_argument("--size", choices=[s for s in SIZES if s != "quick"], default="tiny",
                        help="model shapes: tiny (4 layers, 256 wide) or small (GPT-2-small: 12 layers, 768 wide)")
    parser.add_argument("--device", default=None, help="cpu or cuda (None: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (None: torch's choice)")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="architectures to measure")
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 1024], help="prompt lengths for decoding")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes for decoding")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per decoding run")
    parser.add_argument("--train-batch", type=int, default=8, help="batch of the training step")
    parser.add_argument("--train-seq", type=int, default=128, help="sequence length of the training step")
    parser.add_argument("--scaling-lengths", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="sequence lengths of the scaling sweep (batch 1)")
    parser.add_argument("--scaling-batches", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="batch sizes of the scaling sweep (at the shortest prompt)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the best counts")
    parser.add_argument("--conversion-size", choices=list(SIZES), default="small",
                        help="checkpoint shapes of the conversion + export timing (small: GPT-2-small, 124M)")
    parser.add_argument("--skip-conversion", action="store_true", help="do not time conversion + export")
    parser.add_argument("--long-context", action="store_true",
                        help="also run bench/bench_bsbr.py (BSBR vs GPT-2 at 1k..16k tokens; source checkout only)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke run at toy shapes (checks the outputs, not the speed)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results"),
                        help="where bench.json, bench.md and the PNG plots go")
    parser.set_defaults(func=main_from_args)


def _apply_quick(args):
    args.prompts, args.batches, args.new_tokens = [16, 32], [1, 2], 4
    args.train_batch, args.train_seq, args.repeats = 2, 16, 1
    args.scaling_lengths, args.scaling_batches, args.conversion_size = [16, 32], [1, 2], "quick"


def main_from_args(args):
    for name in ("prompts", "batches", "scaling_lengths", "scaling_batches"):
        if min(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} values must be >= 1")
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (the first token is the prefill; the rest are decoding steps)")
    if args.quick:
        _apply_quick(args)
    args.shape = dict(SIZES["quick" if args.quick else args.size])
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cpu" and not follow_live_tensors():
        logger.warning("could not set glibc's mmap threshold: CPU peak memory may include freed tensors")
    torch.manual_seed(0)
    results = run(args)
    for line in write_report(results, args.output_dir):
        print(line)
    return results


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="graftlm bench", description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main_from_args(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
