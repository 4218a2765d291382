"""Fine-tune a GPT2-DFA model as a causal LM on a text or JSONL file (Trainer-based).

The loss is the model's own `outputs.loss`: cross-entropy plus DFA's regulariser (gate-entropy term with its
learned weight and the L1 mask sparsity), so the gates and masks train with the language model. Runs on one device
as `graftlm train dfa ...`, or on several as `accelerate launch -m graftlm.cli train dfa ...`. The result is
exported like a converted model (remote code, tokenizer, Hub-ready), with training_metrics.json.
"""

import logging
import tempfile

import torch

from ..inputs import POSITIVE, bounded
from .common import (add_text_training_arguments, check_launch, export_trained, loss_history, make_optimizer,
                     trainer_arguments, whole_model)
from .data import read_text, split_blocks

logger = logging.getLogger(__name__)

GATE_LEARNING_RATE = 1e-2
ENTROPY_WEIGHT_LEARNING_RATE = 5e-2


def add_arguments(parser):
    add_text_training_arguments(parser, "GPT2-DFA folder or Hub id (from `graftlm convert dfa`)", learning_rate=1e-4)
    parser.add_argument("--seq-len", type=bounded(int, 2), default=128,
                        help="training window in tokens (at most n_positions)")
    parser.add_argument("--gate-learning-rate", type=POSITIVE, default=GATE_LEARNING_RATE,
                        help="learning rate of the head gates (c_gate) and the head-dimension mask logits (dim_masks), "
                        "without weight decay")
    parser.add_argument("--entropy-weight-learning-rate", type=POSITIVE, default=ENTROPY_WEIGHT_LEARNING_RATE,
                        help="learning rate of log(lambda), the self-tuned gate-entropy weight (dual ascent), without "
                        "weight decay")


def make_dfa_optimizer(model, args):
    """AdamW with the common learning rate and no weight decay (Trainer's default), except DFA's own parameters:
    gates and mask logits at --gate-learning-rate, log(lambda) at --entropy-weight-learning-rate. Adam moves a
    parameter by about its learning rate per step, so at 1e-4 lambda could change by about 2% in 200 steps."""
    rates = {".c_gate.": args.gate_learning_rate, ".dim_masks.": args.gate_learning_rate,
             "entropy_balance.": args.entropy_weight_learning_rate}
    return make_optimizer(model, args.learning_rate, rates, weight_decay=0.0)


def main(args):
    from transformers import Trainer

    from ..export import check_output_args
    from ..inference import load_model_and_tokenizer

    check_output_args(args)
    model, tokenizer = load_model_and_tokenizer(args.model, trust_remote_code=args.trust_remote_code, dtype=torch.float32)
    if model.config.model_type != "gpt2_dfa":
        raise ValueError(f"{args.model} is a {model.config.model_type!r} model; `graftlm train dfa` needs a GPT2-DFA one")
    if not 2 <= args.seq_len <= model.config.n_positions:
        raise ValueError(f"seq_len must be in [2, n_positions={model.config.n_positions}], got {args.seq_len}")
    ids = tokenizer(read_text(args.text, args.text_field), return_tensors="pt").input_ids[0]
    train_set, eval_set = split_blocks(ids, args.seq_len, args.eval_fraction)
    logger.info("training %s on %d windows of %d tokens", args.model, len(train_set), args.seq_len)

    with tempfile.TemporaryDirectory(prefix="dfa-train-") as work_dir:
        trainer = Trainer(model=model, args=trainer_arguments(args, work_dir, lr_scheduler_type="cosine"),
                          train_dataset=train_set, optimizers=(make_dfa_optimizer(model, args), None))
        check_launch(trainer.accelerator)
        result = trainer.train()
        metrics = {"train_loss": result.training_loss, "steps": result.global_step, "seq_len": args.seq_len,
                   "loss_history": loss_history(trainer)}
        if len(eval_set):
            metrics["eval_loss"] = trainer.evaluate(eval_dataset=eval_set)["eval_loss"]  # with the regulariser
        trained = whole_model(trainer, model)
        if trained is not None:
            metrics.update(entropy_weight=trained.transformer.entropy_balance().item(),
                           active_dim_fraction=trained.transformer.active_dim_fraction().item())
            export_trained(trainer, trained, args, {"": tokenizer}, metrics)
    return metrics
