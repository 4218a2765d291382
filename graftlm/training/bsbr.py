"""Healing fine-tune of a converted GPT2-BSBR model on a text file, at lengths beyond chunk_size (Trainer-based).

A converted model is GPT-2 restricted to attention inside each chunk; training on windows spanning several chunks
teaches the retrieval term (gates, meta projections) and the rest of the network to use the earlier chunks.
Runs on one device as `graftlm train bsbr ...`, or on several as `accelerate launch -m graftlm.train_bsbr ...`.
The result is exported like a converted model (remote code, tokenizer, Hub-ready), with healing_metrics.json.
"""

import logging
import math
import tempfile

import torch

from ..inputs import POSITIVE, bounded
from .common import (add_text_training_arguments, check_launch, export_trained, loss_history, make_optimizer,
                     trainer_arguments, whole_model)
from .data import read_text, split_blocks

logger = logging.getLogger(__name__)

# Parameters BSBR adds to GPT-2; `--trainable retrieval` trains only these.
RETRIEVAL_PARAMETERS = ("meta_r_proj", "meta_h_proj", "retrieval_gate", "compress_proj")


def set_trainable(model, trainable):
    """'all' trains every parameter; 'retrieval' only the parameters BSBR adds. Returns the trainable count."""
    if trainable not in ("all", "retrieval"):
        raise ValueError(f"trainable must be 'all' or 'retrieval', got {trainable!r}")
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or any(part in name for part in RETRIEVAL_PARAMETERS))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_arguments(parser):
    add_text_training_arguments(parser, "GPT2-BSBR folder or Hub id (from `graftlm convert bsbr`)")
    parser.add_argument("--seq-len", type=bounded(int, 2), default=None,
                        help="training window in tokens (default: 4 * chunk_size, at most n_positions)")
    parser.add_argument("--gate-learning-rate", type=POSITIVE, default=1e-2,
                        help="learning rate of the per-head retrieval gates (no weight decay), which start at 0")
    parser.add_argument("--trainable", choices=["all", "retrieval"], default="all",
                        help="train every weight, or only the retrieval modules BSBR adds")


def main(args):
    from transformers import Trainer

    from ..export import check_output_args
    from ..inference import load_model_and_tokenizer

    check_output_args(args)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code, dtype=torch.float32)
    if model.config.model_type != "gpt2_bsbr":
        raise ValueError(f"{args.model} is a {model.config.model_type!r} model; `graftlm train bsbr` needs a GPT2-BSBR one")
    config = model.config
    seq_len = args.seq_len or min(4 * config.chunk_size, config.n_positions)
    if not 2 <= seq_len <= config.n_positions:
        raise ValueError(f"seq_len must be in [2, n_positions={config.n_positions}], got {seq_len}")
    if seq_len <= config.chunk_size:
        logger.warning("seq_len %d is no longer than chunk_size %d: the retrieval term gets no training signal",
                       seq_len, config.chunk_size)
    ids = tokenizer(read_text(args.text, args.text_field), return_tensors="pt").input_ids[0]
    train_set, eval_set = split_blocks(ids, seq_len, args.eval_fraction)
    trainable = set_trainable(model, args.trainable)
    logger.info("healing %s: %d trainable parameters, %d training windows of %d tokens", args.model, trainable,
                len(train_set), seq_len)

    with tempfile.TemporaryDirectory(prefix="bsbr-heal-") as work_dir:
        training_args = trainer_arguments(args, work_dir, lr_scheduler_type="cosine")
        optimizer = make_optimizer(model, args.learning_rate, {".retrieval_gate.": args.gate_learning_rate})
        trainer = Trainer(model=model, args=training_args, train_dataset=train_set, optimizers=(optimizer, None))
        check_launch(trainer.accelerator)
        result = trainer.train()
        metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seq_len": seq_len,
                   "trainable": args.trainable, "trainable_parameters": trainable, "loss_history": loss_history(trainer)}
        if len(eval_set):
            eval_loss = trainer.evaluate(eval_dataset=eval_set)["eval_loss"]
            metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss))
        trained = whole_model(trainer, model)
        if trained is not None:
            gates = torch.stack([block.attn.retrieval_gate().detach() for block in trained.transformer.h])
            metrics["mean_abs_retrieval_gate"] = gates.abs().mean().item()
            for param in trained.parameters():
                param.requires_grad_(True)
            export_trained(trainer, trained, args, {"": tokenizer}, metrics, "healing_metrics.json")
    return metrics
