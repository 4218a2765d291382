"""`graftlm bench`'s report: the markdown table with each ratio's target and verdict, the JSON and the PNG plots."""

import json
from pathlib import Path

from . import measure
from .measure import DECODE_TARGETS, PRUNED_DECODE_TARGET, TRAIN_TIME_TARGETS

# ----- report -----

LABELS = {**measure.LABELS, "dfa_pruned": f"{measure.LABELS['dfa']} pruned"}


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
    for i, r in enumerate(train):
        if r["arch"] in TRAIN_TIME_TARGETS:
            axes[0].hlines(TRAIN_TIME_TARGETS[r["arch"]], i - 0.4, i + 0.4, colors="red", linestyles="--")
    axes[0].set_title("training step time, model / stock GPT-2 (red: target)")
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


