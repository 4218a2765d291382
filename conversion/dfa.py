"""Convert a stock GPT-2 (GPT2LMHeadModel) checkpoint into GPT2-DFA.

Every GPT-2 weight is copied under its own name; the only new parameters are, per layer, the head-gate
projection `attn.c_gate` and the head-dimension mask logits `attn.dim_masks.{q,k,v}`, plus
`transformer.entropy_balance.log_weight`. Each is a module, so peft's modules_to_save can train it. They start as
the identity (zero gate logits -> g = 1, zero mask logits -> mask = 1), so the converted model computes what GPT-2
computed.
"""

import logging

from ..configuration.configuration_dfa import DFAConfig
from ..export import source_name
from ..modeling.modeling_dfa import DFAForCausalLM
from .common import (ConversionError, ConversionReport, card_fields, card_metadata, check_option_names, config_fields,
                     copy_weights, load_stock_gpt2, load_tokenizer, max_logit_delta, modules_to_save, new_keys,
                     options_from_args, probe_batch)

logger = logging.getLogger(__name__)

# The converter's options and their defaults: DFAConfig's own, so the two cannot disagree.
OPTIONS = {name: getattr(DFAConfig, name) for name in
           ("gate_mode", "target_entropy_ratio", "entropy_weight_init", "mask_sparsity_weight", "mask_threshold")}
NEW_MODULES = {
    "transformer.h.*.attn.c_gate": "head-gate logits W_g h + b, zero-initialised: uniform gates, g = H * 1/H = 1",
    "transformer.h.*.attn.dim_masks": "head-dimension mask logits q, k, v, zero-initialised: mask = 2 * sigmoid(0) = 1",
    "transformer.entropy_balance": "log_weight = log of the gate-entropy weight lambda, initialised to "
    "log(entropy_weight_init)",
}


def dfa_config_from_gpt2(gpt2_config, **options):
    check_option_names(options, OPTIONS, "DFA")
    return DFAConfig(**config_fields(gpt2_config), **{**OPTIONS, **options})


def convert_gpt2_to_dfa(base, **options):
    """Load a stock GPT-2 checkpoint (local path or Hub id) and return (DFAForCausalLM, ConversionReport).

    Raises ConversionError when `base` is not a GPT-2 checkpoint or its weights do not match GPT-2's
    layout, and TypeError on an unknown option.
    """
    check_option_names(options, OPTIONS, "DFA")  # before any loading
    stock = load_stock_gpt2(base)
    config = dfa_config_from_gpt2(stock.config, **options)
    config._attn_implementation = stock.config._attn_implementation
    model = DFAForCausalLM(config)
    source = stock.state_dict()
    copy_weights(model, source, {key: key for key in source}, new_keys(model))
    model.generation_config = stock.generation_config
    model.eval()

    input_ids, attention_mask = probe_batch(config.vocab_size, seq_len=min(32, config.n_positions))
    delta = max_logit_delta(model, stock, input_ids, attention_mask)
    logger.info("converted %s to GPT2-DFA: max |delta logits| vs stock GPT-2 = %.3g", base, delta)
    report = ConversionReport(
        {"base": str(base)}, {**OPTIONS, **options},
        {"max_abs_logit_delta": delta, "num_parameters": model.num_parameters()}, dict(NEW_MODULES),
        modules_to_save(model),
        "max |logits(GPT2-DFA) - logits(GPT-2)| = {max_abs_logit_delta:.3g} on the probe batch",
    )
    return model, report


def model_card(report, repo_id):
    metadata = card_metadata(report, "text-generation", ["gpt2-dfa", "gpt2"])
    fields = card_fields(report, repo_id, base=source_name(report.base), fidelity=f"{report.max_abs_logit_delta:.3g}")
    return "dfa", metadata, fields


def add_arguments(parser):
    parser.add_argument("--base", required=True, help="stock GPT-2 checkpoint: local folder or Hub id (e.g. gpt2)")
    parser.add_argument("--gate-mode", choices=["token", "sequence"], default=OPTIONS["gate_mode"],
                        help="head gates per token, or once per sequence from its first token (default: token)")
    parser.add_argument("--target-entropy-ratio", type=float, default=OPTIONS["target_entropy_ratio"],
                        help="target gate entropy as a fraction of ln(n_head) (default: 0.9)")
    parser.add_argument("--entropy-weight-init", type=float, default=OPTIONS["entropy_weight_init"],
                        help="initial entropy weight lambda (default: 0.01)")
    parser.add_argument("--mask-sparsity-weight", type=float, default=OPTIONS["mask_sparsity_weight"],
                        help="weight of the L1 term on head-dimension masks (default: 0)")
    parser.add_argument("--mask-threshold", type=float, default=OPTIONS["mask_threshold"],
                        help="mask value under which a dimension counts as closed (default: 0.1)")


def example_arguments(gpt2, second_gpt2, bert, shape):
    """`graftlm convert dfa` arguments for the stock checkpoints that the demo, bench and tests build."""
    return ["--base", gpt2]


def model_from_args(args):
    """(model, report) from parsed arguments: the conversion without tokenizers or export."""
    return convert_gpt2_to_dfa(args.base, **options_from_args(args, OPTIONS))


def convert_from_args(args):
    """CLI entry: returns (model, tokenizers, card builder, report) for the shared export step."""
    tokenizer = load_tokenizer(args.base)
    model, report = model_from_args(args)
    return model, {"": tokenizer}, lambda repo_id: model_card(report, repo_id), report


__all__ = ["ConversionError", "convert_gpt2_to_dfa", "dfa_config_from_gpt2"]
