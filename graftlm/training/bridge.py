"""Fine-tune a bridged BERT -> GPT-2 model on source/target pairs (Trainer-based).

Pairs come from a JSONL or CSV file with `src` and `tgt` columns (names configurable) or from a `datasets` name.
The source is tokenized with the encoder (BERT) tokenizer, the target with the decoder (GPT-2) tokenizer plus its
eos token; BridgeCollator pads both and turns target padding into -100 labels. Runs on one device as
`graftlm train bridge ...`, or on several as `accelerate launch -m graftlm.train_bridge ...`. The result is exported
like a converted model (remote code, both tokenizers, Hub-ready), with training_metrics.json.
"""

import logging
import math
import tempfile

import torch

from ..inputs import POSITIVE_INT
from ..modeling.pipeline_bridge import ENCODER_TOKENIZER_SUBFOLDER
from .common import add_trainer_arguments, check_launch, export_trained, loss_history, trainer_arguments, whole_model
from .data import load_records

logger = logging.getLogger(__name__)


def load_pairs(source, src_column="src", tgt_column="tgt", split="train", dataset_config=None):
    """A datasets.Dataset of (src, tgt) strings from a .jsonl/.json/.csv file or a `datasets` name. Data without
    `src_column`/`tgt_column`, a record that lacks one, and a blank source or target (an empty CSV cell, say;
    `graftlm eval` refuses them too) are ValueErrors naming them (data.load_records)."""
    import datasets

    records = load_records(source, (src_column, tgt_column), split, dataset_config, what="pairs",
                           flags="--src-column/--tgt-column", non_empty=(src_column, tgt_column))
    return datasets.Dataset.from_list([{"src": r[src_column], "tgt": r[tgt_column]} for r in records])


def tokenize_pairs(data, source_tokenizer, target_tokenizer, max_source_length=128, max_target_length=128):
    """Add input_ids/attention_mask (source) and labels (target ids + eos, at most max_target_length)."""
    eos = target_tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the target (decoder) tokenizer has no eos token")

    def encode(batch):
        for column in ("src", "tgt"):
            bad = [i for i, text in enumerate(batch[column]) if not isinstance(text, str)]
            if bad:
                raise ValueError(f"column {column!r} holds a non-string value at row {bad[0]} of a batch")
        source = source_tokenizer(batch["src"], truncation=True, max_length=max_source_length)
        targets = target_tokenizer(batch["tgt"], add_special_tokens=False)["input_ids"]
        labels = [ids[: max_target_length - 1] + [eos] for ids in targets]
        out = {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"], "labels": labels}
        if "token_type_ids" in source:
            out["token_type_ids"] = source["token_type_ids"]
        return out

    return data.map(encode, batched=True, remove_columns=data.column_names, desc="tokenizing pairs")


class BridgeCollator:
    """Pad a list of tokenized pairs into a batch: source ids with the encoder pad id (mask 0), labels with -100."""

    def __init__(self, source_pad_token_id):
        if source_pad_token_id is None:
            raise ValueError("the source (encoder) tokenizer has no pad token")
        self.source_pad_token_id = source_pad_token_id

    @staticmethod
    def _pad(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def __call__(self, features):
        batch = {
            "input_ids": self._pad([f["input_ids"] for f in features], self.source_pad_token_id),
            "attention_mask": self._pad([f["attention_mask"] for f in features], 0),
            "labels": self._pad([f["labels"] for f in features], -100),
        }
        if all("token_type_ids" in f for f in features):
            batch["token_type_ids"] = self._pad([f["token_type_ids"] for f in features], 0)
        return batch


def load_bridge(name_or_path, trust_remote_code=False):
    """(model, source tokenizer, target tokenizer) from a converted or trained bridge folder or Hub id."""
    from ..inference import load_encoder_tokenizer, load_model_and_tokenizer

    model, target_tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code, dtype=torch.float32)
    if model.config.model_type != "bert_gpt2_bridge":
        raise ValueError(f"{name_or_path} is a {model.config.model_type!r} model; `graftlm train bridge` needs a "
                         "bridged BERT -> GPT-2 one")
    source_tokenizer = load_encoder_tokenizer(name_or_path, model, target_tokenizer)
    if target_tokenizer.pad_token is None:
        target_tokenizer.pad_token = target_tokenizer.eos_token
    return model, source_tokenizer, target_tokenizer


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="bridge folder or Hub id (from `graftlm convert bridge`)")
    parser.add_argument("--data", required=True, help="training pairs: .jsonl/.json/.csv file or a datasets name")
    parser.add_argument("--eval-data", help="held-out pairs (file or datasets name); default: --eval-split of --data "
                                            "for a datasets name, none for a file")
    parser.add_argument("--dataset-config", help="configuration name of a datasets dataset")
    parser.add_argument("--split", default="train", help="split of a datasets dataset to train on")
    parser.add_argument("--eval-split", help="split of a datasets dataset to evaluate on")
    parser.add_argument("--src-column", default="src")
    parser.add_argument("--tgt-column", default="tgt")
    parser.add_argument("--max-source-length", type=POSITIVE_INT, default=128)
    parser.add_argument("--max-target-length", type=POSITIVE_INT, default=128)
    add_trainer_arguments(parser, max_steps=500, batch_size=8, learning_rate=5e-5, warmup_steps=20, unit="pairs")


def main(args):
    from transformers import Trainer

    from ..export import check_output_args

    check_output_args(args)
    model, source_tokenizer, target_tokenizer = load_bridge(args.model, args.trust_remote_code)
    lengths = dict(max_source_length=args.max_source_length, max_target_length=args.max_target_length)
    columns = dict(src_column=args.src_column, tgt_column=args.tgt_column, dataset_config=args.dataset_config)
    train_set = tokenize_pairs(load_pairs(args.data, split=args.split, **columns), source_tokenizer,
                               target_tokenizer, **lengths)
    eval_set = None
    if args.eval_data or args.eval_split:
        eval_source = args.eval_data or args.data
        eval_set = tokenize_pairs(load_pairs(eval_source, split=args.eval_split or "validation", **columns),
                                  source_tokenizer, target_tokenizer, **lengths)
    logger.info("training %s on %d pairs (%s)", args.model, len(train_set), args.data)

    with tempfile.TemporaryDirectory(prefix="bridge-train-") as work_dir:
        training_args = trainer_arguments(
            args, work_dir, lr_scheduler_type="linear", weight_decay=0.01, remove_unused_columns=False,
            prediction_loss_only=True,
            ddp_find_unused_parameters=False,  # every bridge parameter takes part in a training forward pass
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                          data_collator=BridgeCollator(source_tokenizer.pad_token_id))
        check_launch(trainer.accelerator)
        result = trainer.train()
        metrics = {"train_loss": result.training_loss, "steps": result.global_step, "train_pairs": len(train_set),
                   "loss_history": loss_history(trainer)}
        if eval_set is not None:
            eval_loss = trainer.evaluate(eval_dataset=eval_set)["eval_loss"]
            metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50.0)))
        tokenizers = {"": target_tokenizer, ENCODER_TOKENIZER_SUBFOLDER: source_tokenizer}
        trained = whole_model(trainer, model)
        if trained is not None:
            export_trained(trainer, trained, args, tokenizers, metrics)
    return metrics

