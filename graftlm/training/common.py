"""Pieces the training commands share: the common command-line options, the optimizer with per-module learning rates
and the TrainingArguments of the Trainer-based ones (`graftlm train dfa`, `bsbr`, `bridge`), the launch checks, the
trained model gathered whole, the per-step losses they write as JSON, the trained model's export with its card (and
upload), and the `python -m graftlm.train_<arch>` aliases."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from ..inputs import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, bounded


def make_optimizer(model, learning_rate, own_learning_rates, weight_decay=0.01):
    """AdamW: weight decay on matrices, none on biases and norms; every parameter whose name contains a key of
    `own_learning_rates` gets that learning rate and no weight decay. Those are an architecture's small control
    parameters (gates, mask logits, a dual variable): at the common rate they move by about learning_rate per step,
    too slowly to open or to track their target, and weight decay would pull them back to their start."""
    groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    own = {part: {"params": [], "weight_decay": 0.0, "lr": lr} for part, lr in own_learning_rates.items()}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = next((part for part in own if part in name), None)  # also matches peft's modules_to_save copies
        group = own[part] if part is not None else groups[0] if param.ndim >= 2 else groups[1]
        group["params"].append(param)
    return torch.optim.AdamW([g for g in groups + list(own.values()) if g["params"]], lr=learning_rate)


def add_text_training_arguments(parser, model_help, max_steps=200, learning_rate=3e-4):
    """Options of the causal-LM text commands (train dfa, train bsbr); each adds its own beside these."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--text", required=True, help="UTF-8 training text file, or a .jsonl file (see --text-field)")
    parser.add_argument("--text-field", default="text", help="field holding the text when --text is a .jsonl file")
    parser.add_argument("--eval-fraction", type=bounded(float, 0, 1, high_open=True), default=0.1,
                        help="share of the text held out for evaluation")
    add_trainer_arguments(parser, max_steps=max_steps, batch_size=4, learning_rate=learning_rate, warmup_steps=10,
                          unit="windows")


def add_trainer_arguments(parser, max_steps, batch_size, learning_rate, warmup_steps, unit):
    """Options of every Trainer-based command (train dfa, bsbr, bridge), read by trainer_arguments and
    export_trained; `unit` names what a batch holds ("windows", "pairs")."""
    from ..export import add_hub_arguments

    parser.add_argument("--output-dir", required=True, help="folder for the trained, exported model")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_hub_arguments(parser)
    parser.add_argument("--max-steps", type=POSITIVE_INT, default=max_steps)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size, help=f"{unit} per device and step")
    parser.add_argument("--grad-accum", type=POSITIVE_INT, default=1)
    parser.add_argument("--learning-rate", type=POSITIVE, default=learning_rate)
    parser.add_argument("--warmup-steps", type=NON_NEGATIVE_INT, default=warmup_steps)
    parser.add_argument("--logging-steps", type=POSITIVE_INT, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true", help="load through the folder's own code")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPUs and GPUs that support it)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass to save memory")


def trainer_arguments(args, work_dir, **overrides):
    """TrainingArguments from the shared options; per-step losses are logged every --logging-steps steps."""
    from transformers import TrainingArguments

    options = dict(
        output_dir=work_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        # Without an accelerator, several processes (accelerate launch / torchrun) join over gloo only with use_cpu.
        use_cpu=not torch.accelerator.is_available(),
    )
    options.update(overrides)
    return TrainingArguments(**options)


def check_launch(accelerator):
    """Refuse to train when `accelerate launch` asked for FSDP or DeepSpeed, or for more processes, than the
    accelerator runs. accelerate 1.15 shards only on accelerators (CUDA, XPU, ...): on CPU, `--use_fsdp` and
    `--use_deepspeed` are dropped, and each process then trains alone or all run plain data parallel, unsharded."""
    from accelerate.utils import DistributedType

    asked = {"ACCELERATE_USE_FSDP": ("FSDP", DistributedType.FSDP),
             "ACCELERATE_USE_DEEPSPEED": ("DeepSpeed", DistributedType.DEEPSPEED)}
    for variable, (name, kind) in asked.items():
        if os.environ.get(variable, "false").lower() in ("1", "true") and accelerator.distributed_type != kind:
            raise RuntimeError(
                f"accelerate launch asked for {name} ({variable}=true), but accelerate runs "
                f"{accelerator.distributed_type.value} here ({accelerator.device.type}): it shards only on GPUs and "
                f"other accelerators, so this run would train unsharded. Launch on GPUs, or without --use_fsdp / "
                f"--use_deepspeed (e.g. --multi_gpu for data parallel)"
            )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE), but accelerate joined {accelerator.num_processes}: "
            f"each would train on its own. On CPU, launch with --multi_gpu (processes join over gloo)"
        )


def whole_model(trainer, model):
    """The trained `model` with every parameter whole, on the main process; None on the others.

    Under FSDP or DeepSpeed the module a Trainer trained holds only this process's shard of each parameter (under
    ZeRO-3, none), so exporting it or reading its scalars would be wrong. There its full state is gathered from every
    process, as Trainer.save_model gathers it (accelerator.get_state_dict: a collective call, so every process makes
    it), into a fresh copy of the model. Otherwise the model itself."""
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return model if trainer.is_world_process_zero() else None
    state = accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    whole = type(model)(model.config)
    whole.load_state_dict(state)  # strict: a partial gather is an error, never a half-random export
    return whole.to(next(value.dtype for value in state.values() if value.is_floating_point()))  # e.g. ZeRO-3's 16-bit


def loss_history(trainer):
    """[{"step", "loss"}] of every logged training step (averaged over the logging interval and all processes)."""
    return [{"step": entry["step"], "loss": entry["loss"]} for entry in trainer.state.log_history if "loss" in entry]


def export_trained(trainer, model, args, tokenizers, metrics, metrics_name="training_metrics.json"):
    """On the main process only (the others return None): export the trained model to --output-dir with its card and
    `metrics` as JSON beside it, print them, upload with --push-to-hub, and return the folder."""
    from ..export import export_model, push_from_args

    if not trainer.is_world_process_zero():
        return None
    model.eval()
    card = training_card(model, args, metrics, metrics_name)
    folder = export_model(model, args.output_dir, tokenizers=tokenizers, card=card, overwrite=args.overwrite,
                          files={metrics_name: json.dumps(metrics, indent=2)})
    print(json.dumps(metrics, indent=2))
    print(f"exported to {folder}")
    push_from_args(folder, args)
    return folder


def source_card_metadata(name_or_path):
    """The YAML metadata of the card of a local folder or Hub repo ({} when it has none or cannot be reached)."""
    from huggingface_hub import hf_hub_download, metadata_load
    from huggingface_hub.errors import EntryNotFoundError

    path = Path(name_or_path) / "README.md"
    if not Path(name_or_path).exists():
        try:
            path = Path(hf_hub_download(str(name_or_path), "README.md"))
        except (OSError, EntryNotFoundError):  # offline, or a repo without a card
            return {}
    return (metadata_load(path) or {}) if path.is_file() else {}


def _figure(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def training_card(model, args, metrics, metrics_name):
    """(template, metadata, fields) of the card of a model trained by `graftlm train dfa|bsbr|bridge`: the run's
    figures; `base_model` is the Hub id of the model it was trained from (a local folder has none and is named in the
    body), and the licence is that model card's."""
    from .. import registry
    from ..export import hub_ids, source_name

    source = args.model
    card = source_card_metadata(source)
    licence = {key: card.get(key) for key in ("license", "license_name", "license_link")}
    if licence["license"] == "other" and not (licence["license_name"] and licence["license_link"]):
        licence = {}  # the Hub needs both with `other` (render_card refuses it without): the body names it alone
    seq2seq = model.config.is_encoder_decoder
    metadata = {
        "library_name": "transformers",
        "base_model": hub_ids(source),
        "base_model_relation": "finetune" if hub_ids(source) else None,
        **licence,
        "pipeline_tag": "text2text-generation" if seq2seq else "text-generation",
        "tags": ["graftlm", model.config.model_type, "custom_code"],
    }
    data = getattr(args, "text", None) or getattr(args, "data", None)
    figures = {"trained from": f"`{source_name(source)}`", "training data": f"`{source_name(data)}`"}
    figures.update({name: getattr(args, name) for name in ("max_steps", "batch_size", "grad_accum", "learning_rate")})
    figures.update({name: value for name, value in metrics.items() if name != "loss_history"})
    history = metrics.get("loss_history") or []
    if history:
        figures["logged loss, first -> last step"] = f"{history[0]['loss']:.4g} -> {history[-1]['loss']:.4g}"
    fields = {
        "model_type": model.config.model_type,
        "source": source_name(source),
        "command": registry.get(model.config.model_type).name,
        "figures": "\n".join(f"| {name.replace('_', ' ')} | {_figure(value)} |" for name, value in figures.items()),
        "metrics_file": metrics_name,
        "pipeline_tag": metadata["pipeline_tag"],
        "repo_id": args.push_to_hub or str(args.output_dir),
        "example": "the cat sat on the mat" if seq2seq else "The meaning of life is",
        "licence": (f"`{card['license']}`" + (f" (`{card['license_name']}`)" if card.get("license_name") else "")
                    if card.get("license") else "not stated in its card"),
    }
    return "trained", metadata, fields


def command_alias(name, prog, command):
    """The body of graftlm/train_<arch>.py, the module path the README gives for `python -m` and `accelerate launch
    -m`: run as a script (`name` is "__main__"), it runs `command` (a module with add_arguments and main) as program
    `prog`; imported, it puts `command` itself in its place in sys.modules, so that `from graftlm.train_<arch> import
    X` and `import graftlm.train_<arch>` give the very objects of graftlm.training.<arch>."""
    if name != "__main__":
        sys.modules[name] = command
        return
    parser = argparse.ArgumentParser(prog=prog, description=command.__doc__.splitlines()[0], allow_abbrev=False)
    command.add_arguments(parser)
    logging.basicConfig(level=logging.INFO)
    command.main(parser.parse_args())
    sys.exit(0)
