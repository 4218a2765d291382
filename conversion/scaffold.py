"""Combine two stock GPT-2 checkpoints into a Scaffolded GPT-2 (frozen base + LoRA scaffold + gated fusers).

Every weight of the base is copied to base.<its name> and every weight of the scaffold to scaffold.<its name>;
the only new parameters are the fusers (fusers.<layer>.*), whose tanh gates start at 0, so the converted
model computes exactly what the base GPT-2 computed. LoRA adapters are attached when training starts.
"""

import argparse
import logging
import math

from ..configuration.configuration_scaffold import LORA_TARGETS, ScaffoldConfig
from ..export import source_name
from ..modeling.modeling_scaffold import ScaffoldForCausalLM
from .common import (
    ConversionError,
    ConversionReport,
    card_fields,
    card_metadata,
    check_option_names,
    config_errors,
    config_fields,
    copy_weights,
    load_stock_gpt2,
    load_tokenizer,
    max_logit_delta,
    modules_to_save,
    new_keys,
    options_from_args,
    probe_batch,
)

logger = logging.getLogger(__name__)

OPTIONS = {
    "influence": 1.0,
    "fuser_heads": None,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.1,
    "lora_target_modules": list(LORA_TARGETS),
    "train_fuser": True,
}
NEW_MODULES = {
    "fusers.<layer>.ln": "LayerNorm on the base states before the cross-attention: weight 1, bias 0",
    "fusers.<layer>.{q,k,v,o}_proj": "cross-attention projections (k, v from the scaffold's width): normal(0, "
    "base initializer_range), bias 0",
    "fusers.<layer>.gate": "tanh gate, zero-initialised: tanh(0) = 0, so the converted model is the base GPT-2",
}
FIDELITY_TOLERANCE = 1e-5
UNTRAINED = "Not trained yet: the gates are closed and the scaffold carries no adapters. Train with " \
    "`graftlm train scaffold`."


def scaffold_config_from_gpt2(base_config, scaffold_config, cross_attn_layers, **options):
    """A ScaffoldConfig, or a ConversionError naming the option that does not fit these checkpoints."""
    check_option_names(options, OPTIONS, "scaffold")
    with config_errors():
        return ScaffoldConfig(
            base_config=config_fields(base_config, keep=("model_type",)),
            scaffold_config=config_fields(scaffold_config, keep=("model_type",)),
            cross_attn_layers=list(cross_attn_layers),
            base_name_or_path=str(base_config._name_or_path),
            scaffold_name_or_path=str(scaffold_config._name_or_path),
            **{**OPTIONS, **options},
        )


def convert_gpt2_to_scaffold(base, scaffold, cross_attn_layers=(5, 7), **options):
    """Load two stock GPT-2 checkpoints (local paths or Hub ids) and return (ScaffoldForCausalLM, ConversionReport).

    base and scaffold may differ in width and depth but must share the vocabulary. Raises ConversionError when a
    checkpoint is not GPT-2, its weights do not match GPT-2's layout, an option is out of range, or the converted
    model is not the base GPT-2 within FIDELITY_TOLERANCE; TypeError on an unknown option.
    """
    check_option_names(options, OPTIONS, "scaffold")
    stock_base = load_stock_gpt2(base)
    stock_scaffold = load_stock_gpt2(scaffold)
    config = scaffold_config_from_gpt2(stock_base.config, stock_scaffold.config, cross_attn_layers, **options)
    config._attn_implementation = stock_base.config._attn_implementation
    model = ScaffoldForCausalLM(config)

    source = {f"base.{k}": v for k, v in stock_base.state_dict().items()}
    source.update({f"scaffold.{k}": v for k, v in stock_scaffold.state_dict().items()})
    copy_weights(model, source, {key: key for key in source}, new_keys(model))
    model.freeze_base()  # what the converted model is for: training the fusers (and LoRA) over the frozen base
    model.generation_config = stock_base.generation_config
    model.eval()

    base_config = config.base_config
    input_ids, attention_mask = probe_batch(base_config.vocab_size, seq_len=min(32, base_config.n_positions))
    delta = max_logit_delta(model, stock_base, input_ids, attention_mask)
    logger.info("converted %s + scaffold %s: max |delta logits| vs the base GPT-2 = %.3g", base, scaffold, delta)
    if not math.isfinite(delta) or delta > FIDELITY_TOLERANCE:
        raise ConversionError(
            f"the converted model differs from the base GPT-2 by {delta:.3g} (> {FIDELITY_TOLERANCE})"
        )
    report = scaffold_report(base, scaffold, model, {**OPTIONS, **options}, delta)
    return model, report


def scaffold_report(base, scaffold, model, options, delta, training=UNTRAINED):
    """The report on `model`, converted from `base` and `scaffold` (or, with `training`, trained: its card): delta is
    max |logits - base GPT-2 logits| with the scaffold's influence at 0."""
    return ConversionReport(
        {"base": str(base), "scaffold": str(scaffold)}, options,
        {"max_abs_logit_delta": delta, "num_parameters": model.num_parameters()}, dict(NEW_MODULES),
        modules_to_save(model),
        "max |logits(scaffolded) - logits(base GPT-2)| = {max_abs_logit_delta:.3g} on the probe batch",
        notes={"cross_attn_layers": list(model.config.cross_attn_layers), "training": training},
    )


def check_same_vocabulary(base_tokenizer, scaffold_tokenizer):
    """The scaffold reads the base's token ids: its tokenizer, when it ships one, must be the same vocabulary."""
    if scaffold_tokenizer is not None and scaffold_tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise ConversionError("the base and scaffold tokenizers have different vocabularies; the scaffold must read "
                              "the base's token ids")


def model_card(report, repo_id):
    metadata = card_metadata(report, "text-generation", ["gpt2-scaffold", "gpt2", "lora", "cross-attention"])
    fields = card_fields(
        report, repo_id,
        base=source_name(report.base),
        scaffold=source_name(report.scaffold),
        layers=", ".join(str(i) for i in report.cross_attn_layers),
        fidelity=f"{report.max_abs_logit_delta:.3g}",
        training=report.training,
    )
    return "scaffold", metadata, fields


def parse_layers(text):
    """'5,7' -> [5, 7] (argparse type); duplicates and ranges are checked against the base by the config."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 5,7, got {text!r}") from None


def add_arguments(parser):
    parser.add_argument("--base", required=True, help="stock GPT-2 checkpoint for the frozen base: folder or Hub id")
    parser.add_argument("--scaffold", required=True,
                        help="stock GPT-2 checkpoint for the scaffold (any width/depth, same vocabulary)")
    parser.add_argument("--cross-attn-layers", type=parse_layers, default=[5, 7],
                        help="base layers followed by a fuser, comma-separated (default: 5,7 for a 12-layer base)")
    parser.add_argument("--influence", type=float, default=OPTIONS["influence"], help="fixed fuser weight in [0, 1]")
    parser.add_argument("--fuser-heads", type=int, default=None, help="cross-attention heads (default: base n_head)")
    parser.add_argument("--lora-r", type=int, default=OPTIONS["lora_r"], help="LoRA rank of the scaffold's adapters")
    parser.add_argument("--lora-alpha", type=float, default=OPTIONS["lora_alpha"], help="LoRA alpha")
    parser.add_argument("--lora-dropout", type=float, default=OPTIONS["lora_dropout"], help="LoRA dropout")
    parser.add_argument("--lora-target-modules", type=lambda s: [m for m in s.split(",") if m],
                        default=list(LORA_TARGETS), help="scaffold layers that get adapters, comma-separated")
    parser.add_argument("--train-fuser", action=argparse.BooleanOptionalAction, default=True,
                        help="train the fusers with the adapters (--no-train-fuser freezes them, as the seed did)")


def example_arguments(gpt2, second_gpt2, bert, shape):
    """`graftlm convert scaffold` arguments for the stock checkpoints that the demo, bench and tests build."""
    layers = ",".join(map(str, shape["cross_attn_layers"]))
    return ["--base", gpt2, "--scaffold", second_gpt2, "--cross-attn-layers", layers]


def model_from_args(args):
    """(model, report) from parsed arguments: the conversion without tokenizers or export."""
    return convert_gpt2_to_scaffold(args.base, args.scaffold, cross_attn_layers=args.cross_attn_layers,
                                    **options_from_args(args, OPTIONS))


def convert_from_args(args):
    """CLI entry: returns (model, tokenizers, card builder, report) for the shared export step."""
    tokenizer = load_tokenizer(args.base)
    check_same_vocabulary(tokenizer, load_tokenizer(args.scaffold, required=False))
    model, report = model_from_args(args)
    return model, {"": tokenizer}, lambda repo_id: model_card(report, repo_id), report


__all__ = ["ConversionError", "convert_gpt2_to_scaffold", "scaffold_config_from_gpt2"]
