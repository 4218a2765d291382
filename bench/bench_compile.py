"""Eager vs torch.compile'd decoding with a static cache: every architecture that declares a compilable decode step
(its class's `_can_compile_fullgraph`) against stock GPT-2 of the same shapes, in one run.

Each model prefills the prompt into a transformers StaticCache (eager), then runs `--new-tokens` greedy decode steps,
one token per step, through the model itself (eager) or through torch.compile(model, fullgraph=True) (inductor;
compiled once, in the warm-up, since a static cache keeps every shape fixed). Prints ms/token (best of `--repeats`
rounds over every model and mode, after a warm-up), compiled / eager speed-up, and each architecture's ms/token
against stock GPT-2's in the same mode. Random weights, new modules opened with noise as in `graftlm bench`.

    python bench/bench_compile.py --threads 1             # tiny shapes on CPU: a few minutes here (compiling)
    python bench/bench_compile.py --size small --device cuda
"""

import argparse
import sys
import tempfile
import time

import torch

from graftlm.bench.measure import ARCHS, SIZES, _sync, convert, save_checkpoints


def stock_and_converted(shape, n_positions, archs, folder):
    from transformers import GPT2LMHeadModel

    gpt2_dir, bert_dir = save_checkpoints(shape, n_positions, folder)
    models = {"gpt2": GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()}
    for arch in archs:
        model = convert(arch, gpt2_dir, bert_dir, shape)
        if not type(model)._can_compile_fullgraph:
            print(f"{arch}: not measured, {type(model).__name__}._can_compile_fullgraph is False")
            continue
        models[arch] = model
    return models


def decoder(model, step_model, prompt, new_tokens, device):
    """A function that times one run, in seconds per decode step (batch = prompt rows): prefill `prompt` eagerly
    into the reset StaticCache, then `new_tokens` greedy steps through `step_model`."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)

    @torch.no_grad()
    def run():
        cache.reset()
        token = model(input_ids=prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = step_model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        _sync(device)
        return (time.perf_counter() - start) / new_tokens

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="model shapes (graftlm bench's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--prompt", type=int, default=128, help="prompt length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (None: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, shape = torch.device(args.device), SIZES[args.size]
    with tempfile.TemporaryDirectory() as folder:
        models = stock_and_converted(shape, args.prompt + args.new_tokens, args.archs, folder)
    prompt = torch.randint(0, shape["vocab_size"] - 1, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    runs = {}
    for name, model in models.items():
        model.to(device)
        for mode, step_model in (("eager", model), ("compiled", torch.compile(model, fullgraph=True))):
            runs[name, mode] = decoder(model, step_model, prompt, args.new_tokens, device)
            runs[name, mode]()  # warm-up (compiles)
    # Rounds over every (model, mode), so that load from other processes falls on all of them alike; the best counts.
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            times[key].append(run())
    rows = {name: {mode: 1000 * min(times[name, mode]) for mode in ("eager", "compiled")} for name in models}
    print(f"\nstatic-cache decoding, {args.size} shapes, prompt {args.prompt}, batch {args.batch}, "
          f"{args.new_tokens} steps, {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | eager ms/token | compiled ms/token | compiled speed-up | eager time / stock's | compiled time / stock's |")
    print("|---|---|---|---|---|---|")
    stock = rows["gpt2"]
    for name, r in rows.items():
        print(f"| {name} | {r['eager']:.2f} | {r['compiled']:.2f} | {r['eager'] / r['compiled']:.2f}x | "
              f"{r['eager'] / stock['eager']:.2f}x | {r['compiled'] / stock['compiled']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
