"""Fine-tune a Scaffolded GPT-2 on prompt/completion pairs (LoRA on the scaffold, fusers; the base stays frozen).

The seed's loop, made real with accelerate: loss on the completion tokens only (prompt and padding labels are
-100), a validation split, AdamW with a linear schedule, gradient accumulation, early stopping on validation
loss, sample generations and memory statistics every epoch, mixed precision where the hardware has it,
progress bars, checkpoints a run resumes from, and several processes under `accelerate launch`.
"""

import json
import logging
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from .common import check_launch
from .data import load_records

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainingOptions:
    """Every hyperparameter of the loop; the defaults are the seed's."""

    epochs: int = 3
    batch_size: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 4
    max_length: int = 128
    valid_split: float = 0.2
    patience: int = 2  # epochs without a lower validation loss before stopping
    min_delta: float = 0.0  # a validation loss must fall by more than this to count as lower
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, none on CPU
    samples_per_epoch: int = 2  # validation prompts answered after every epoch (0: none)
    sample_max_new_tokens: int = 32
    checkpoint_dir: str | None = None  # where each epoch's checkpoint goes (None: no checkpoints)
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in checkpoint_dir

    def __post_init__(self):
        positive = ("epochs", "batch_size", "gradient_accumulation_steps", "patience", "sample_max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (one prompt and one completion token), got {self.max_length}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "min_delta", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.valid_split < 1.0:
            raise ValueError(f"valid_split must be in (0, 1), got {self.valid_split}")
        if self.samples_per_epoch < 0:
            raise ValueError(f"samples_per_epoch must be >= 0, got {self.samples_per_epoch}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.resume_from_checkpoint == "latest" and self.checkpoint_dir is None:
            raise ValueError("resume_from_checkpoint='latest' needs a checkpoint_dir")


@dataclass
class TrainingResult:
    initial_valid_loss: float
    best_valid_loss: float
    epochs_run: int
    stopped_early: bool
    history: list = field(default_factory=list)  # one record per epoch: losses, gates, memory, samples


# ----- data -----


def load_pairs(source, prompt_field="prompt", completion_field="completion", split="train"):
    """[{"prompt", "completion"}] from a list of dicts, a .jsonl/.json/.csv file, or a `datasets` name.

    Raises ValueError naming the file and record when a record lacks a field or has an empty completion, and when
    there are no pairs.
    """
    records = load_records(source, (prompt_field, completion_field), split, what="prompt/completion pairs",
                           flags="--prompt-field/--completion-field", non_empty=(completion_field,))
    return [{"prompt": r[prompt_field], "completion": r[completion_field]} for r in records]


def split_pairs(pairs, valid_split, seed):
    """Shuffle with `seed` and hold out round(valid_split * n) pairs (at least one) for validation."""
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} pair(s) cannot be split into training and validation; pass validation data")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_valid = min(max(1, round(valid_split * len(order))), len(order) - 1)
    return order[n_valid:], order[:n_valid]


def encode_pair(tokenizer, prompt, completion, max_length):
    """(prompt ids, completion ids + eos), cut to max_length: the prompt keeps its end, the completion its start."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[-(max_length - 1) :]
    return prompt_ids, completion_ids[: max_length - len(prompt_ids)]


def collate_pairs(examples, pad_id):
    """Right-padded batch: the base reads prompt + completion, the scaffold the prompt; labels mark the completion."""
    import torch

    width = max(len(p) + len(c) for p, c in examples)
    prompt_width = max(len(p) for p, _ in examples)
    batch = {k: torch.full((len(examples), width), pad_id) for k in ("input_ids", "labels")}
    batch["labels"].fill_(-100)
    batch["attention_mask"] = torch.zeros(len(examples), width, dtype=torch.long)
    batch["scaffold_input_ids"] = torch.full((len(examples), prompt_width), pad_id)
    batch["scaffold_attention_mask"] = torch.zeros(len(examples), prompt_width, dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        n, total = len(prompt), len(prompt) + len(completion)
        batch["input_ids"][row, :total] = torch.tensor(prompt + completion)
        batch["attention_mask"][row, :total] = 1
        batch["labels"][row, n:total] = torch.tensor(completion)
        batch["scaffold_input_ids"][row, :n] = torch.tensor(prompt)
        batch["scaffold_attention_mask"][row, :n] = 1
    return batch


# ----- the loop -----


def memory_stats():
    """CUDA memory when a GPU is in use, the process's resident memory otherwise (MiB)."""
    import torch

    if torch.cuda.is_available():
        return {
            "cuda_allocated_mib": torch.cuda.memory_allocated() / 2**20,
            "cuda_reserved_mib": torch.cuda.memory_reserved() / 2**20,
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        }
    import psutil

    return {"rss_mib": psutil.Process().memory_info().rss / 2**20}


def resolve_mixed_precision(choice):
    import torch

    if choice == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if choice == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU; use 'bf16' or 'no' on CPU")
    return choice


def completion_loss_terms(model, batch):
    """Per-row (sum of completion-token cross-entropies, number of completion tokens)."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return losses.sum(1), (targets != -100).sum(1)


def _validation_loss(model, loader, accelerator):
    import torch

    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for batch in loader:
            sums, counts = completion_loss_terms(model, batch)
            sums, counts = accelerator.gather_for_metrics((sums, counts))
            total += sums.double().sum().cpu()
            count += int(counts.sum())
    return (total / max(count, 1)).item()


def generate_answers(model, tokenizer, prompts, max_new_tokens, scaffold_weight=1.0, truncate_repeats=3, **kwargs):
    """Greedy (unless kwargs say otherwise) continuations of `prompts`, decoded without the prompt."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token, tokenizer.pad_token = tokenizer.pad_token, tokenizer.pad_token or tokenizer.eos_token
    try:
        inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, scaffold_weight=scaffold_weight,
                                truncate_repeats=truncate_repeats, pad_token_id=pad_id, **kwargs)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable_state(model, state):
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(f"checkpoint does not match the model's trainable parameters: missing "
                         f"{sorted(set(params) - set(state))[:5]}, unexpected {sorted(set(state) - set(params))[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


KEPT_CHECKPOINTS = 2  # the newest, and the one before it to resume from if the newest is damaged


def _save_checkpoint(folder, model, optimizer, scheduler, best_state, trainer_state):
    """Write one epoch's checkpoint atomically (staged_folder); keep only the newest KEPT_CHECKPOINTS."""
    import torch
    from safetensors.torch import save_file

    from ..export import staged_folder

    folder = Path(folder)
    with staged_folder(folder, overwrite=True) as staging:
        save_file(_trainable_state(model), staging / "trainable.safetensors")
        if best_state is not None:
            save_file(best_state, staging / "best_trainable.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save(rng, staging / "rng.pt")  # dropout masks continue as in an uninterrupted run
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    for old in checkpoints(folder.parent)[:-KEPT_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(checkpoint_dir):
    """The checkpoint-epoch-N folders of `checkpoint_dir`, oldest first."""
    found = [p for p in Path(checkpoint_dir).glob("checkpoint-epoch-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def latest_checkpoint(checkpoint_dir):
    found = checkpoints(checkpoint_dir)
    if not found:
        raise ValueError(f"no checkpoint-epoch-* folder in {checkpoint_dir} to resume from")
    return found[-1]


def load_checkpoint(folder):
    """What a checkpoint folder holds: trainer state, trainable (and best) weights, optimizer, scheduler and RNG
    states. A missing or damaged file is a ValueError naming the folder and the previous checkpoint, if one is left."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        best = folder / "best_trainable.safetensors"
        return {
            "state": json.loads((folder / "trainer_state.json").read_text(encoding="utf-8")),
            "trainable": load_file(folder / "trainable.safetensors"),
            "best": load_file(best) if best.is_file() else None,
            **{name: torch.load(folder / f"{name}.pt", weights_only=True) for name in ("optimizer", "scheduler", "rng")},
        }
    except Exception as err:  # missing, truncated or garbled (JSON, safetensors, torch): the same answer for each
        found = checkpoints(folder.parent)
        names = [p.name for p in found]
        earlier = found[: names.index(folder.name)] if folder.name in names else []
        offer = (f"resume from the previous one with --resume-from-checkpoint {earlier[-1]}" if earlier
                 else "no earlier checkpoint is left to resume from")
        raise ValueError(f"checkpoint {folder} is damaged or incomplete ({type(err).__name__}: {err}); {offer}") from None


def check_parameters_whole(accelerator):
    """This loop keeps its best epoch, reads the fuser gates and exports from the model's own parameters, so it needs
    each process to hold them whole: refuse FSDP and DeepSpeed ZeRO-3, which shard them (ZeRO-2 and data parallel
    keep them whole)."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
    if accelerator.distributed_type == DistributedType.FSDP or zero3:
        raise RuntimeError(f"`graftlm train scaffold` cannot run under {'FSDP' if not zero3 else 'DeepSpeed ZeRO-3'}: "
                           "its loop reads and exports the model's own parameters, which that shards across processes. "
                           "Launch it with --multi_gpu (data parallel) or DeepSpeed ZeRO-2; the base is frozen, so "
                           "only the scaffold's LoRA and fusers have gradients and optimizer state")


def train(model, tokenizer, train_pairs, valid_pairs, options):
    """Train `model` (a ScaffoldForCausalLM; LoRA is attached if it has none) in place; return a TrainingResult.

    At the end the model holds the trainable weights of its best validation epoch.
    """
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    if not train_pairs or not valid_pairs:
        raise ValueError("training needs at least one training and one validation pair")
    accelerator = Accelerator(
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(options.mixed_precision),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun / accelerate launch) then join over gloo
    )
    check_launch(accelerator)
    check_parameters_whole(accelerator)
    set_seed(options.seed)
    if not model.has_lora():
        model.add_lora()
    if not model.config.train_fuser and all(g == 0 for g in model.gate_values().values()):
        logger.warning("train_fuser=False with closed gates: the scaffold has no influence and LoRA gets no gradient")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = partial(collate_pairs, pad_id=pad_id)

    def encode(pairs):
        return [encode_pair(tokenizer, p["prompt"], p["completion"], options.max_length) for p in pairs]

    train_loader = DataLoader(encode(train_pairs), batch_size=options.batch_size, shuffle=True, collate_fn=collate)
    valid_loader = DataLoader(encode(valid_pairs), batch_size=options.batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=options.learning_rate, weight_decay=options.weight_decay
    )
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, optimizer, train_loader, valid_loader)
    unwrapped = accelerator.unwrap_model(model)
    steps_per_epoch = math.ceil(len(train_loader) / options.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * options.epochs)

    start_epoch, best_loss, bad_epochs, history, best_state = 0, math.inf, 0, [], None
    initial_loss = None
    if options.resume_from_checkpoint:
        folder = options.resume_from_checkpoint
        folder = latest_checkpoint(options.checkpoint_dir) if folder == "latest" else Path(folder)
        checkpoint = load_checkpoint(folder)
        state = checkpoint["state"]
        _load_trainable_state(unwrapped, checkpoint["trainable"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        best_state = checkpoint["best"]
        start_epoch, best_loss, bad_epochs = state["epoch"], state["best_valid_loss"], state["bad_epochs"]
        history, initial_loss = state["history"], state["initial_valid_loss"]
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
        logger.info("resumed from %s after epoch %d", folder, start_epoch)
    if initial_loss is None:
        initial_loss = _validation_loss(model, valid_loader, accelerator)
        logger.info("validation loss before training: %.4f", initial_loss)

    stopped_early = bad_epochs >= options.patience
    for epoch in range(start_epoch, options.epochs):
        if stopped_early:
            break
        model.train()
        train_loader.set_epoch(epoch)
        running, steps = torch.zeros((), device=accelerator.device), 0
        progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{options.epochs}",
                        disable=not accelerator.is_local_main_process)
        for batch in progress:
            with accelerator.accumulate(model):
                loss = model(**batch, use_cache=False).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    trainable = [p for p in model.parameters() if p.requires_grad]
                    accelerator.clip_grad_norm_(trainable, options.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            running += loss.detach().float()
            steps += 1
            progress.set_postfix(loss=f"{loss.item():.4f}")
        train_loss = accelerator.reduce(running / max(steps, 1), reduction="mean").item()
        valid_loss = _validation_loss(model, valid_loader, accelerator)

        record = {"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                  "learning_rate": scheduler.get_last_lr()[0], "gates": unwrapped.gate_values(),
                  "memory": memory_stats(), "samples": []}
        if accelerator.is_main_process and options.samples_per_epoch:
            prompts = [p["prompt"] for p in valid_pairs[: options.samples_per_epoch]]
            with accelerator.autocast():
                answers = generate_answers(unwrapped, tokenizer, prompts, options.sample_max_new_tokens)
            record["samples"] = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
            for sample in record["samples"]:
                logger.info("sample after epoch %d: %r -> %r", epoch + 1, sample["prompt"], sample["answer"])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            logger.info("epoch %d: train loss %.4f, validation loss %.4f, gates %s, memory %s",
                        epoch + 1, train_loss, valid_loss, record["gates"], record["memory"])

        if valid_loss < best_loss - options.min_delta:
            best_loss, bad_epochs, best_state = valid_loss, 0, _trainable_state(unwrapped)
        else:
            bad_epochs += 1
        history.append(record)
        stopped_early = bad_epochs >= options.patience
        if options.checkpoint_dir and accelerator.is_main_process:
            trainer_state = {"epoch": epoch + 1, "best_valid_loss": best_loss, "bad_epochs": bad_epochs,
                             "initial_valid_loss": initial_loss, "history": history, "options": asdict(options)}
            _save_checkpoint(Path(options.checkpoint_dir) / f"checkpoint-epoch-{epoch + 1}", unwrapped, optimizer,
                             scheduler, best_state, trainer_state)
        accelerator.wait_for_everyone()
        if stopped_early:
            logger.info("early stopping: no lower validation loss for %d epoch(s)", bad_epochs)

    if best_state is not None:
        _load_trainable_state(unwrapped, best_state)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drop accelerate's autocast patch of forward
    unwrapped.eval()
    return TrainingResult(initial_loss, best_loss, len(history), stopped_early, history)


def run_training_cycle(model, tokenizer, train_data, valid_data=None, *, epochs=3, batch_size=1, **options):
    """The seed's run_training_cycle(train_data, valid_data, epochs=..., batch_size=...) for a given model.

    train_data / valid_data: lists of {"prompt", "completion"} dicts, data files or dataset names; without
    valid_data, valid_split (default 0.2) of train_data is held out. Other options: see TrainingOptions.
    """
    options = TrainingOptions(epochs=epochs, batch_size=batch_size, **options)
    train_pairs = load_pairs(train_data)
    if valid_data is None:
        train_pairs, valid_pairs = split_pairs(train_pairs, options.valid_split, options.seed)
    else:
        valid_pairs = load_pairs(valid_data)
    return train(model, tokenizer, train_pairs, valid_pairs, options)


class ScaffoldSession:
    """The seed's system object over one model: run_training_cycle(train_data, valid_data, epochs=..., batch_size=...)
    and generate(prompt, max_new_tokens=..., scaffold_weight=...) -> text."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_pretrained(cls, path):
        from ..conversion.common import load_tokenizer
        from ..modeling.modeling_scaffold import ScaffoldForCausalLM

        return cls(load_scaffold_model(path, ScaffoldForCausalLM).eval(), load_tokenizer(path))

    def run_training_cycle(self, train_data, valid_data=None, epochs=3, batch_size=1, **options):
        return run_training_cycle(self.model, self.tokenizer, train_data, valid_data, epochs=epochs,
                                  batch_size=batch_size, **options)

    def generate(self, prompt, max_new_tokens=50, scaffold_weight=1.0, truncate_repeats=3, **kwargs):
        return generate_answers(self.model, self.tokenizer, [prompt], max_new_tokens, scaffold_weight,
                                truncate_repeats, **kwargs)[0]


# ----- CLI: graftlm train scaffold -----


def add_arguments(parser):
    from ..export import add_hub_arguments

    defaults = TrainingOptions()
    parser.add_argument("model", help="Scaffolded GPT-2 folder (from `graftlm convert scaffold` or an earlier run)")
    parser.add_argument("--data", required=True,
                        help="prompt/completion pairs: .jsonl, .json or .csv file, or a datasets name")
    parser.add_argument("--valid-data", help="validation pairs (default: hold out --valid-split of --data)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--completion-field", default="completion")
    parser.add_argument("--dataset-split", default="train", help="split to read when --data is a datasets name")
    parser.add_argument("--output-dir", required=True, help="folder for the trained, Hub-ready export")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output folder, and start the checkpoints of an earlier run afresh")
    add_hub_arguments(parser)
    parser.add_argument("--adapter", choices=["merged", "separate"], default="merged",
                        help="merge LoRA into the scaffold's weights, or keep it apart in scaffold_adapter/")
    parser.add_argument("--checkpoint-dir", help="per-epoch checkpoints (default: <output-dir>-checkpoints)")
    parser.add_argument("--resume-from-checkpoint", metavar="PATH|latest", help="continue a run from a checkpoint")
    for name, value in asdict(defaults).items():
        if name in ("checkpoint_dir", "resume_from_checkpoint"):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "mixed_precision":
            parser.add_argument(flag, choices=MIXED_PRECISION, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def main(args):
    from accelerate import PartialState

    from ..conversion.common import load_tokenizer
    from ..export import check_output_args, export_model, push_from_args
    from ..modeling.modeling_scaffold import ScaffoldForCausalLM

    option_names = set(TrainingOptions.__dataclass_fields__)
    options = TrainingOptions(**{
        **{k: v for k, v in vars(args).items() if k in option_names},
        "checkpoint_dir": args.checkpoint_dir or f"{str(args.output_dir).rstrip('/')}-checkpoints",
    })
    check_output_args(args)  # fail before any training
    earlier = [] if options.resume_from_checkpoint else checkpoints(options.checkpoint_dir)
    if earlier and not args.overwrite:
        raise ValueError(f"checkpoint folder {options.checkpoint_dir} holds an earlier run's checkpoints "
                         f"({earlier[-1].name}): continue it with --resume-from-checkpoint latest, or pass --overwrite "
                         "to start again")
    train_pairs = load_pairs(args.data, args.prompt_field, args.completion_field, args.dataset_split)
    if args.valid_data:
        valid_pairs = load_pairs(args.valid_data, args.prompt_field, args.completion_field, args.dataset_split)
    else:
        train_pairs, valid_pairs = split_pairs(train_pairs, options.valid_split, options.seed)
    model = load_scaffold_model(args.model, ScaffoldForCausalLM)
    tokenizer = load_tokenizer(args.model)
    for old in earlier:  # --overwrite: this run's checkpoints replace the earlier run's
        shutil.rmtree(old, ignore_errors=True)
    result = train(model, tokenizer, train_pairs, valid_pairs, options)
    if PartialState().is_main_process:
        if args.adapter == "merged":
            model.merge_lora()
        card = training_card(model, result, args.adapter, len(train_pairs), args.push_to_hub or str(args.output_dir))
        folder = export_model(model, args.output_dir, tokenizers={"": tokenizer}, card=card, overwrite=args.overwrite)
        print(f"validation loss {result.initial_valid_loss:.4f} -> {result.best_valid_loss:.4f} "
              f"after {result.epochs_run} epoch(s){' (early stop)' if result.stopped_early else ''}")
        print(f"exported to {folder}")
        push_from_args(folder, args)
    PartialState().wait_for_everyone()


def load_scaffold_model(path, model_class):
    from transformers import AutoConfig

    import graftlm  # noqa: F401  registers gpt2_scaffold with AutoConfig

    from ..inputs import check_model_folder

    check_model_folder(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type != model_class.config_class.model_type:
        raise ValueError(
            f"{path} holds a {config.model_type!r} model; convert it first with `graftlm convert scaffold`"
        )
    return model_class.from_pretrained(path)


def training_card(model, result, adapter, num_pairs, repo_id):
    """Model card of a trained model: the scaffold template with its training section filled in."""
    import torch

    from ..conversion.common import probe_batch
    from ..conversion.scaffold import model_card, scaffold_report

    config = model.config
    ids, mask = probe_batch(config.base_config.vocab_size, seq_len=min(32, config.base_config.n_positions))
    with torch.no_grad():  # scaffold_weight = 0 must still give the base GPT-2 exactly
        delta = (model(input_ids=ids, attention_mask=mask, scaffold_weight=0.0).logits
                 - model.base(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max().item()
    options = {k: getattr(config, k) for k in ("influence", "fuser_heads", "lora_r", "lora_alpha", "lora_dropout",
                                               "lora_target_modules", "train_fuser")}
    training = (
        f"Trained on {num_pairs} prompt/completion pairs for {result.epochs_run} epoch(s)"
        f"{' (early stop)' if result.stopped_early else ''}: validation loss {result.initial_valid_loss:.4f} -> "
        f"{result.best_valid_loss:.4f}. Fuser gates tanh(gate): {model.gate_values()}. LoRA adapter: "
        + ("merged into the scaffold's weights." if adapter == "merged" else "kept apart in `scaffold_adapter/`.")
    )
    report = scaffold_report(config.base_name_or_path, config.scaffold_name_or_path, model, options, delta,
                             training=training)
    return model_card(report, repo_id)
