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
import datetime
import json
import logging
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .measure import (ARCHS, CONVERSION_TARGET_S, DECODE_TARGETS, PRUNED_DECODE_TARGET, SIZES, TRAIN_TIME_TARGETS, _stats,
                      convert, convert_arguments, decode_rate, follow_live_tensors, forward_kwargs, peak_memory_mb,
                      prune_half, save_checkpoints, time_runs, timed, train_step_fn, verdict)
from .report import write_report

logger = logging.getLogger(__name__)


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
        if hasattr(model, "add_lora"):
            model.add_lora()  # what `graftlm train <arch>` trains on a model with LoRA adapters (the scaffold's)
        step = train_step_fn(model, ids)
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
                    kwargs = forward_kwargs(models[name], ids)
                    series.append(timed(lambda: models[name](**kwargs, use_cache=False), device, args.repeats))
                result[sweep]["seconds"][name] = series
    return result


def bench_conversion(args, work_dir):
    """Wall time of `graftlm convert <arch> ... --output-dir` (load, convert, fidelity probe, export) on random
    checkpoints of the conversion size. The scaffold reads two GPT-2s (the same folder twice) and the bridge a BERT
    as large as the GPT-2: both convert about twice the parameters."""
    from ..convert import convert as convert_and_export

    shape = SIZES[args.conversion_size]
    gpt2_dir, bert_dir = save_checkpoints(shape, 1024, Path(work_dir) / "conversion", tokenizers=True)
    rows = []
    for arch in tqdm(args.archs, desc="conversion + export"):
        out = Path(work_dir) / "exports" / arch
        start = time.perf_counter()
        convert_and_export(arch, [*convert_arguments(arch, gpt2_dir, bert_dir, shape), "--output-dir", str(out)])
        seconds = time.perf_counter() - start
        size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
        rows.append({"arch": arch, "seconds": seconds, "size": args.conversion_size, "weights_mb": size / 2**20,
                     "target_s": CONVERSION_TARGET_S, "verdict": verdict(seconds, CONVERSION_TARGET_S, False)})
        logger.info("conversion %s: %.2f s", arch, seconds)
    return rows


def run_long_context(args, output_dir):
    """Run bench/bench_bsbr.py (BSBR at 1k..16k tokens) in its own process and return its JSON."""
    script = Path(__file__).resolve().parents[2] / "bench" / "bench_bsbr.py"
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


# ----- the run -----


def machine(device):
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    import transformers

    from .. import __version__

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
