"""Sharded training == unsharded training, for every architecture: FSDP1, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

Each architecture is built as a tiny random model (2 layers, 64 wide, vocabulary 1000, dropout 0, every new module
opened with seeded noise) and exported with `graftlm.export.export_model`, as a user would push it. Every training run
then loads that folder the way a Hub user does: `from_pretrained(folder, trust_remote_code=True)` in a process where
graftlm cannot be imported, so the exported code is what trains. Each (architecture, strategy) trains for --steps
AdamW steps on 2 CPU processes over gloo, each process taking half of a global batch of 4 sequences; the reference
is one unsharded run of the same folder on the whole batch, same data.
FSDP: FULL_SHARD, auto-wrapped over the model's `_no_split_modules` (FSDP1 with use_orig_params=True, as accelerate
does: Scaffolded's blocks mix frozen and LoRA parameters). DeepSpeed: deepspeed.initialize with the same AdamW as a
client optimizer, DS_ACCELERATOR=cpu (its CPU accelerator communicates over gloo).

    python bench/scale_out.py                                   # the whole matrix, a table of max |loss diff|
    python bench/scale_out.py --archs dfa --strategies fsdp2 --steps 3 --json out.json

Prints one row per architecture, max |per-step loss - unsharded loss| per strategy (or why it failed), and writes
the figures as JSON (with the class that trained, from the export's code). Exit code 1 when a run fails or differs
by more than --tolerance.
"""

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

ARCHS = ("dfa", "bsbr", "bridge", "scaffold")
STRATEGIES = ("fsdp1", "fsdp2", "zero2", "zero3")
GLOBAL_BATCH, SEQ, VOCAB, WORLD = 4, 16, 1000, 2
GPT2 = dict(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def build(arch):
    """A tiny random model of `arch`, identical in every process (seeded), with its new modules opened."""
    from transformers import BertConfig, GPT2Config

    torch.manual_seed(0)
    if arch == "dfa":
        from graftlm.configuration.configuration_dfa import DFAConfig
        from graftlm.modeling.modeling_dfa import DFAForCausalLM

        model = DFAForCausalLM(DFAConfig(**GPT2))
    elif arch == "bsbr":
        from graftlm.configuration.configuration_bsbr import BSBRConfig
        from graftlm.modeling.modeling_bsbr import BSBRForCausalLM

        model = BSBRForCausalLM(BSBRConfig(chunk_size=4, **GPT2))
    elif arch == "bridge":
        from graftlm.configuration.configuration_bridge import BridgeConfig
        from graftlm.modeling.modeling_bridge import BridgeForConditionalGeneration

        bert = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config = BridgeConfig(encoder=bert.to_dict(), decoder=GPT2Config(add_cross_attention=True, **GPT2).to_dict(),
                              bridge_type="ga", controls=True, decoder_start_token_id=0, pad_token_id=0)
        model = BridgeForConditionalGeneration(config)
    elif arch == "scaffold":
        from graftlm.configuration.configuration_scaffold import ScaffoldConfig
        from graftlm.modeling.modeling_scaffold import ScaffoldForCausalLM

        config = ScaffoldConfig(base_config=GPT2Config(**GPT2).to_dict(), scaffold_config=GPT2Config(**GPT2).to_dict(),
                                cross_attn_layers=[0, 1], lora_dropout=0.0)
        model = ScaffoldForCausalLM(config).add_lora()
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
            if name.endswith("sigma_raw"):
                param.fill_(-40.0)  # the bridge's mutation noise, sigma = softplus(-40) ~ 4e-18: no randomness
    return model


def export_all(archs, folder):
    """Export each architecture's model to folder/<arch> (graftlm is needed here only)."""
    from graftlm.export import export_model

    for arch in archs:
        export_model(build(arch), Path(folder) / arch)


def load(arch, folder):
    """The exported model of `arch`, loaded through its own code as a Hub user without graftlm loads it."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if arch == "bridge" else AutoModelForCausalLM
    model = auto.from_pretrained(Path(folder) / arch, trust_remote_code=True, dtype=torch.float32)
    if not type(model).__module__.startswith("transformers_modules."):
        raise RuntimeError(f"{arch}: {type(model).__module__}.{type(model).__name__} is not the export's code")
    return model.train()


def batches(arch, steps):
    """`steps` global batches of GLOBAL_BATCH x SEQ tokens, the same in every process."""
    generator = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator)
        labels = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator) if arch == "bridge" else ids
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)


def reference(arch, steps, folder):
    """{"losses": per-step losses of one unsharded process on the whole global batch, "moved": the largest change of a
    trainable parameter over the run (0 would mean nothing trained, and equal losses would prove nothing)}."""
    model = load(arch, folder)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = optimizer_for(model)
    losses = []
    for batch in batches(arch, steps):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    params = dict(model.named_parameters())
    moved = max((params[name].detach() - value).abs().max().item() for name, value in before.items())
    return {"losses": losses, "moved": moved, "class": f"{type(model).__module__}.{type(model).__name__}"}


def _wrap_classes(model):
    return {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}


def _sharded(strategy, model):
    """(forward/backward/step callables) of `model` under `strategy` in this process."""
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                           auto_wrap_policy=ModuleWrapPolicy(_wrap_classes(model)),
                                           use_orig_params=True, device_id=torch.device("cpu"))
        optimizer = optimizer_for(wrapped)
        return wrapped, lambda loss: loss.backward(), lambda: (optimizer.step(), optimizer.zero_grad())
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for module in [m for m in model.modules() if type(m) in _wrap_classes(model)]:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = optimizer_for(model)
        return model, lambda loss: loss.backward(), lambda: (optimizer.step(), optimizer.zero_grad())
    if strategy in ("zero2", "zero3"):
        import deepspeed

        # DeepSpeed clips gradients to norm 1.0 unless told (0.19.8's default); the unsharded run does not clip.
        config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 0.0, "zero_optimization": {"stage": int(strategy[-1])},
                  "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer_for(model), config=config)
        return engine, engine.backward, engine.step
    raise ValueError(f"unknown strategy {strategy!r}")


def train_sharded(rank, arch, strategy, steps, folder):
    """Per-step global losses (mean of the processes' losses) of `arch` under `strategy`, in process `rank`."""
    import torch.distributed as dist

    model, backward, step = _sharded(strategy, load(arch, folder))
    half = GLOBAL_BATCH // WORLD
    losses = []
    for batch in batches(arch, steps):
        local = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
        loss = model(**local, use_cache=False).loss
        backward(loss)
        step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / WORLD)
    return losses


def worker(rank, archs, strategies, steps, port, folder):
    """One of WORLD processes, where graftlm cannot be imported: rank 0 trains each architecture's export unsharded,
    then both train every (architecture, strategy) in turn, in one gloo group; rank 0 writes folder/results.json."""
    import datetime

    import torch.distributed as dist

    for name in ("graftlm", "modeling", "configuration", "conversion"):
        sys.modules[name] = None  # any import of these now raises ImportError: the exports' own code must do
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                      HF_MODULES_CACHE=str(Path(folder) / f"hf_modules_{rank}"))
    torch.set_num_threads(1)
    results = {}

    def attempt(key, run):
        start = time.time()
        try:
            results[key] = run()
        except Exception as error:  # reported in the table, with the traceback in the JSON
            first_line = str(error).splitlines()[0] if str(error) else ""
            results[key] = {"error": f"{type(error).__name__}: {first_line}"[:300],
                            "traceback": traceback.format_exc()[-4000:]}
        results[key]["seconds"] = round(time.time() - start, 1)
        if rank == 0:
            (Path(folder) / "results.json").write_text(json.dumps(results))

    if rank == 0:
        for arch in archs:
            attempt(f"{arch}/unsharded", lambda: reference(arch, steps, folder))
    # A run that fails in one process only leaves the other waiting in a collective: the timeout ends it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    for arch in archs:
        for strategy in strategies:
            attempt(f"{arch}/{strategy}", lambda: {"losses": train_sharded(rank, arch, strategy, steps, folder)})
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(archs, strategies, steps, folder):
    """{"arch/strategy": {"losses": [...]} or {"error": ...}} of every architecture unsharded and under each strategy,
    trained from its export on WORLD processes started once."""
    import torch.multiprocessing as mp

    export_all(archs, folder)
    mp.spawn(worker, args=(archs, strategies, steps, free_port(), str(folder)), nprocs=WORLD, join=True)
    return json.loads((Path(folder) / "results.json").read_text())


def deepspeed_missing():
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        return f"deepspeed not installed (pip install -e '.[deepspeed]'): {error}"
    return None


def main(argv=None):
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--json", default="scale_out.json")
    args = parser.parse_args(argv)
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    report = {"steps": args.steps, "global_batch": GLOBAL_BATCH, "processes": WORLD, "backend": "gloo",
              "models": "exports loaded with trust_remote_code in processes where graftlm cannot be imported",
              "tolerance": args.tolerance, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "runs": {}}
    missing = deepspeed_missing()
    strategies = [s for s in args.strategies if not (missing and s.startswith("zero"))]
    with tempfile.TemporaryDirectory() as folder:
        results = run_all(args.archs, strategies, args.steps, folder)
    failed = False
    for arch in args.archs:
        ref = results[f"{arch}/unsharded"]
        report["runs"][arch] = {"unsharded": ref.get("losses"), "unsharded_run": ref}
        failed |= "losses" not in ref or not ref["moved"] > 0
        for strategy in args.strategies:
            result = results.get(f"{arch}/{strategy}", {"error": missing})
            if "losses" in result and "losses" in ref:
                result["max_abs_diff"] = max(abs(a - b) for a, b in zip(result["losses"], ref["losses"]))
                failed |= result["max_abs_diff"] > args.tolerance
            else:
                failed = True
            report["runs"][arch][strategy] = result
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"max |loss - unsharded loss| over {args.steps} steps, {WORLD} CPU processes (gloo), global batch "
          f"{GLOBAL_BATCH}; each model is its export, loaded through its own code without graftlm:")
    print("| architecture | " + " | ".join(args.strategies) + " |")
    print("|---" * (len(args.strategies) + 1) + "|")
    for arch, runs in report["runs"].items():
        cells = [f"{runs[s]['max_abs_diff']:.1e}" if "max_abs_diff" in runs[s]
                 else f"FAILED: {runs[s].get('error') or runs['unsharded_run'].get('error')}"
                 for s in args.strategies]
        print(f"| {arch} | " + " | ".join(cells) + " |")
    print(f"figures in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
