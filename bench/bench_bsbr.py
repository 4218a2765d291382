"""Long-context benchmark of GPT2-BSBR against stock GPT-2 (SDPA) on the same small config, in one run.

Measures, at each context length n: forward time and peak memory of the base model (no LM head), the size of the
generation cache after a prefill of n tokens, and the decoding time per token after that prefill (averaged over a
round of 2 * chunk_size steps, so that it includes the retrieval refreshes at chunk boundaries; best of --repeats
rounds). Prints the ratios against the issue's targets, and writes bsbr_bench.json and bsbr_bench.png.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call; on CPU, the peak
resident set size above the resident size before the call (Linux VmHWM, reset through /proc/self/clear_refs). On CPU
the script re-runs itself with MALLOC_MMAP_THRESHOLD_ fixed, so that glibc returns freed tensors to the system and
the resident size follows the live tensors instead of keeping earlier runs' memory.

    python bench/bench_bsbr.py                          # 1k .. 16k on CPU here, or on a GPU when there is one
    python bench/bench_bsbr.py --lengths 1024 2048 --decode-steps 64
    python bench/bench_bsbr.py --size small --dtype bfloat16 --device cuda --lengths 1024 32768   # GPT-2-small shapes
    python bench/bench_bsbr.py --size small --dtype bfloat16 --device cpu --quick                 # seconds: a smoke run
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from graftlm.bench.measure import SIZES, peak_memory_mb, timed  # the suite's shapes and measuring helpers, shared
from graftlm.modeling.hf_compat import cache_kwargs, cache_of

logger = logging.getLogger("bench_bsbr")

# Targets of issue 3, checked at the longest length measured.
TARGETS = {"forward_time": 0.5, "peak_memory": 1.1, "cache_size": 0.25, "decode_flatness": 1.2}


# (key, title, format) of each figure a run may hold (--decode-only leaves out the forward's; syncs: CUDA only)
FIGURES = (("forward_s", "forward time (s)", ".4f"), ("peak_mb", "forward peak memory (MiB)", ".1f"),
           ("decode_ms", "decoding time per token (ms)", ".2f"), ("cache_mb", "generation cache (MiB)", ".1f"),
           ("decode_syncs_per_token", "host synchronisations per decoded token", ".3f"))


def cache_bytes(cache):
    if hasattr(cache, "nbytes"):  # BSBRCache
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)  # GPT-2's DynamicCache


def host_syncs(fn, device):
    """CUDA: the synchronising calls fn() makes, counted by torch.cuda.set_sync_debug_mode("warn") (one warning per
    call); None on other devices."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def decode_time_per_token(model, ids, steps, rounds, device):
    """Prefill `ids`, then a warm-up round and `rounds` timed rounds of `steps` greedy single-token steps through the cache,
    then one more round counting host synchronisations. Returns (seconds per token of the best round, cache bytes
    after the prefill, host synchronisations per token or None off CUDA)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    size = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)

    def one_round():
        nonlocal out, token
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **cache_kwargs(cache))
            token = out.logits[:, -1:].argmax(-1)

    per_token = timed(one_round, device, rounds) / steps
    syncs = host_syncs(one_round, device)
    return per_token, size, None if syncs is None else syncs / steps, one_round


def profile_table(fn, device, rows=25):
    """torch.profiler's table of fn()'s operators, by self time on the device (CUDA) or the CPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def build_models(args, device, work_dir):
    """A random stock GPT-2 of the benchmark config and its GPT2-BSBR conversion (same weights), both loaded in
    --dtype as a user would load them (BSBR's small modules stay float32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from graftlm.conversion.bsbr import convert_gpt2_to_bsbr
    from graftlm.modeling.modeling_bsbr import BSBRForCausalLM

    torch.manual_seed(0)
    n_positions = max(args.lengths) + (args.repeats + 1) * args.decode_steps + 1
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=n_positions,
                        vocab_size=args.vocab_size)
    work_dir, dtype = Path(work_dir), getattr(torch, args.dtype)
    GPT2LMHeadModel(config).save_pretrained(work_dir / "gpt2")
    gpt2 = GPT2LMHeadModel.from_pretrained(work_dir / "gpt2", attn_implementation="sdpa", dtype=dtype)
    bsbr, _ = convert_gpt2_to_bsbr(work_dir / "gpt2", chunk_size=args.chunk_size,
                                   compression_factor=args.compression_factor)
    bsbr.save_pretrained(work_dir / "bsbr")
    bsbr = BSBRForCausalLM.from_pretrained(work_dir / "bsbr", dtype=dtype)
    return {"gpt2_sdpa": gpt2.to(device).eval(), "bsbr": bsbr.to(device).eval()}


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as work_dir:
        models = build_models(args, device, work_dir)
    results = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads", "config": {k: v for k, v in vars(args).items()
               if k not in ("output_dir", "device")}, "runs": []}
    generator = torch.Generator().manual_seed(0)
    for n in tqdm(args.lengths, desc="context lengths"):
        ids = torch.randint(0, args.vocab_size, (1, n), generator=generator).to(device)
        row = {"n": n}
        for name, model in models.items():
            if not args.decode_only:
                forward = lambda: model.transformer(input_ids=ids, use_cache=False)  # noqa: E731
                row[f"{name}_forward_s"] = timed(forward, device, args.repeats)
                _, row[f"{name}_peak_mb"] = peak_memory_mb(forward, device)
            per_token, size, syncs, one_round = decode_time_per_token(model, ids, args.decode_steps, args.repeats,
                                                                      device)
            if args.profile and n == args.lengths[0]:  # one round of decoding steps at the first length
                args.output_dir.mkdir(parents=True, exist_ok=True)
                table = profile_table(one_round, device)
                (args.output_dir / f"decode_profile_{name}.txt").write_text(table, encoding="utf-8")
                print(f"decoding profile of {name} at n={n} ({args.decode_steps} steps):\n{table}")
            row[f"{name}_decode_ms"], row[f"{name}_cache_mb"] = 1e3 * per_token, size / 2**20
            if syncs is not None:
                row[f"{name}_decode_syncs_per_token"] = syncs
        for key in (k for k, _, _ in FIGURES if row.get(f"gpt2_sdpa_{k}")):  # measured (and not 0: no ratio of 0)
            row[f"ratio_{key}"] = row[f"bsbr_{key}"] / row[f"gpt2_sdpa_{key}"]
        logger.info("n=%d: %s", n, {k: round(v, 4) for k, v in row.items() if k != "n"})
        results["runs"].append(row)
    results["targets"] = check_targets(results["runs"])
    return results


def check_targets(runs):
    last, first = runs[-1], runs[0]
    measured = {"forward_time": last.get("ratio_forward_s"), "peak_memory": last.get("ratio_peak_mb"),
                "cache_size": last["ratio_cache_mb"], "decode_flatness": last["bsbr_decode_ms"] / first["bsbr_decode_ms"]}
    return {key: {"measured": value, "target": TARGETS[key], "met": value <= TARGETS[key], "at_n": last["n"]}
            for key, value in measured.items() if value is not None}


def report(results, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bsbr_bench.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    runs = results["runs"]
    ns = [r["n"] for r in runs]
    figures = [f for f in FIGURES if f"bsbr_{f[0]}" in runs[0]]
    fig, axes = plt.subplots(1, len(figures), figsize=(4.5 * len(figures), 4))
    for ax, (key, title, _) in zip(axes, figures):
        for name, label in (("gpt2_sdpa", "GPT-2 (SDPA)"), ("bsbr", "GPT2-BSBR")):
            ax.plot(ns, [r[f"{name}_{key}"] for r in runs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length n")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"GPT2-BSBR vs GPT-2 on {results['device_name']}")
    fig.tight_layout()
    fig.savefig(output_dir / "bsbr_bench.png", dpi=120)

    config = results["config"]
    print(f"device: {results['device_name']}; {config['n_layer']} layers x {config['n_embd']} wide x "
          f"{config['n_head']} heads, vocab {config['vocab_size']}, chunk {config['chunk_size']}, {config['dtype']}")
    print("     n | " + " | ".join(f"{title}: GPT-2 / BSBR (ratio)" for _, title, _ in figures))
    for r in runs:
        cells = []
        for key, _, fmt in figures:
            ratio = f" ({r[f'ratio_{key}']:.2f})" if f"ratio_{key}" in r else ""
            cells.append(f"{r[f'gpt2_sdpa_{key}']:{fmt}} / {r[f'bsbr_{key}']:{fmt}}{ratio}")
        print(f"{r['n']:>6} | " + " | ".join(cells))
    for key, t in results["targets"].items():
        print(f"target {key}: {t['measured']:.3f} (<= {t['target']}) at n={t['at_n']}: {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {output_dir / 'bsbr_bench.json'} and {output_dir / 'bsbr_bench.png'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--decode-steps", type=int, default=None, help="decoding steps per length (default: 2 * chunk)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs (forward) and rounds (decoding) after one warm-up; the best is reported")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--compression-factor", type=int, default=None)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=512, help="small, so the LM head does not dominate decoding")
    parser.add_argument("--size", choices=[name for name in SIZES if name != "quick"], default=None,
                        help="graftlm bench's model shapes (small: GPT-2-small, 12 layers x 768 wide x 12 heads, vocab "
                        "50257, chunk 128); replaces --n-layer, --n-embd, --n-head, --vocab-size and --chunk-size")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype both models are loaded in")
    parser.add_argument("--decode-only", action="store_true",
                        help="measure decoding (time, cache size, host synchronisations) only, not the forward")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler's table of one decoding round per model at the first length")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: lengths 256 and 512, 4 decoding steps, 1 repeat (checks it runs, not speed)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.size:
        shape = SIZES[args.size]
        args.n_layer, args.n_embd, args.n_head = shape["n_layer"], shape["n_embd"], shape["n_head"]
        args.vocab_size, args.chunk_size = shape["vocab_size"], shape["chunk_size"]
    if args.quick:
        args.lengths, args.decode_steps, args.repeats = [256, 512], 4, 1
    args.lengths = sorted(args.lengths)
    args.decode_steps = args.decode_steps or 2 * args.chunk_size
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report(run(args), args.output_dir)


if __name__ == "__main__":
    main()
