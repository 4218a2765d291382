"""Convert a stock GPT-2 (GPT2LMHeadModel) checkpoint into GPT2-DFA.

Every GPT-2 weight is copied under its own name; the only new parameters are, per layer, the head-gate
projection `attn.c_gate` and the head-dimension mask logits `attn.dim_masks.{q,k,v}`, plus
`transformer.entropy_balance.log_weight`. Each is a module, so peft's modules_to_save can train it. They start as the identity (zero gate logits -> g = 1, zero mask logits -> mask = 1), so the converted
model computes what GPT-2 computed.
"""

import logging
from dataclasses import dataclass, field

from ..configuration.configuration_dfa import DFAConfig
from ..export import hub_ids, source_name
from ..modeling.modeling_dfa import DFAForCausalLM
from .common import (ConversionError, card_tables, check_option_names, config_fields, copy_weights, load_stock_gpt2,
                     max_logit_delta, options_from_args, probe_batch)

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
_NEW_SUFFIXES = (".attn.c_gate.weight", ".attn.c_gate.bias", ".attn.dim_masks.q", ".attn.dim_masks.k", ".attn.dim_masks.v")
# GPT2Config fields that are bookkeeping rather than architecture.


@dataclass
class ConversionReport:
    base: str
    options: dict
    max_abs_logit_delta: float
    num_parameters: int
    new_modules: dict = field(default_factory=lambda: dict(NEW_MODULES))

    def summary(self):
        return f"max |logits(GPT2-DFA) - logits(GPT-2)| = {self.max_abs_logit_delta:.3g} on the probe batch"


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
    new_keys = [k for k in model.state_dict() if k.endswith(_NEW_SUFFIXES) or k == "transformer.entropy_balance.log_weight"]
    copy_weights(model, source, {key: key for key in source}, new_keys)
    model.generation_config = stock.generation_config
    model.eval()

    input_ids, attention_mask = probe_batch(config.vocab_size, seq_len=min(32, config.n_positions))
    delta = max_logit_delta(model, stock, input_ids, attention_mask)
    logger.info("converted %s to GPT2-DFA: max |delta logits| vs stock GPT-2 = %.3g", base, delta)
    report = ConversionReport(str(base), {**OPTIONS, **options}, delta, model.num_parameters())
    return model, report


def model_card(report, repo_id):
    options, new_modules = card_tables(report)
    metadata = {
        "library_name": "transformers",
        "base_model": hub_ids(report.base),
        "license": "mit",
        "pipeline_tag": "text-generation",
        "tags": ["graftlm", "gpt2-dfa", "gpt2", "custom_code"],
    }
    fields = {
        "base": source_name(report.base),
        "options": options,
        "fidelity": f"{report.max_abs_logit_delta:.3g}",
        "num_parameters": f"{report.num_parameters:,}",
        "new_modules": new_modules,
        "repo_id": repo_id,
    }
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


def convert_from_args(args):
    """CLI entry: returns (model, tokenizers, card builder, report) for the shared export step."""
    from .common import load_tokenizer

    tokenizer = load_tokenizer(args.base)
    model, report = convert_gpt2_to_dfa(args.base, **options_from_args(args, OPTIONS))
    return model, {"": tokenizer}, lambda repo_id: model_card(report, repo_id), report


__all__ = ["ConversionError", "convert_gpt2_to_dfa", "dfa_config_from_gpt2"]
