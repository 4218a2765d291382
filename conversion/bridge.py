"""Build a bridged BERT -> GPT-2 seq2seq model from a stock BERT-family encoder and a stock GPT-2.

Every BERT weight is copied to `encoder.*` and every GPT-2 weight to `decoder.*` under its own name (BERT's
pooler, unused by a seq2seq model, is skipped by name). New, and initialised by the model: the bridge, the
decoding controls (with --controls), and each decoder block's cross-attention and its LayerNorm. The
cross-attention output projection starts at zero, so the converted decoder computes what the stock GPT-2 computes
on the same decoder input, whatever the encoder input; the conversion measures both parities.
"""

import copy
import logging

import torch
from transformers import GenerationConfig, GPT2Config

from ..configuration.configuration_bridge import BRIDGE_TYPES, BridgeConfig
from ..export import source_name
from ..modeling.modeling_bridge import BridgeForConditionalGeneration
from ..modeling.pipeline_bridge import CUSTOM_PIPELINES, ENCODER_TOKENIZER_SUBFOLDER
from .common import (
    ConversionError,
    ConversionReport,
    card_fields,
    card_metadata,
    check_option_names,
    config_errors,
    config_fields,
    copy_weights,
    load_stock_bert,
    load_stock_gpt2,
    load_tokenizer,
    modules_to_save,
    new_keys,
    probe_batch,
)

logger = logging.getLogger(__name__)

# Options of BridgeConfig a conversion may set, with the bridges (or "controls") they apply to.
APPLIES_TO = {
    "bridge_type": BRIDGE_TYPES,
    "pop_size": ("population",),
    "selection": ("population",),
    "gated_residual": ("ga",),
    "token_wise": ("ga",),
    "alpha_init": ("ga",),
    "mlp_dim": ("ga", "population"),
    "sigma_init": ("ga", "population"),
    "sigma_schedule": ("ga", "population"),
    "sigma_schedule_steps": ("ga", "population"),
    "noise_in_eval": ("ga", "population"),
    "controls": BRIDGE_TYPES,
    "control_objective": ("controls",),
    "control_loss_weight": ("controls",),
    "control_softness": ("controls",),
    "max_temperature": ("controls",),
    "max_top_k": ("controls",),
}
OPTIONS = {name: BridgeConfig.__dataclass_fields__[name].default for name in APPLIES_TO}
SKIPPED_ENCODER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")  # BERT's [CLS] pooler: unused by seq2seq
NEW_MODULES = {
    "bridge.proj, bridge.ln": "z = LayerNorm(W h + b) from the encoder width to the decoder width: N(0, 0.02) weights, "
    "zero bias, LayerNorm (1, 0)",
    "bridge (ga)": "alpha = sigmoid(alpha_logit) at alpha_init, sigma = softplus(sigma_raw) at sigma_init (token-wise: "
    "MLPs whose last layer is zero with those biases); gated residual gate at 0",
    "bridge (population)": "mutation scales softplus(mutation_raw) at sigma_init; selection logits 0 (uniform) or "
    "a fitness MLP N(0, 0.02)",
    "bridge.noise_step": "training passes seen by the sigma schedule, 0",
    "controls.*": "temperature and top-k heads: zero weights, biases giving temperature 1 and top-k 20",
    "decoder.transformer.h.*.crossattention.{q_attn,c_attn}": "GPT-2's init N(0, 0.02)",
    "decoder.transformer.h.*.crossattention.c_proj": "zero: cross-attention adds nothing at conversion",
    "decoder.transformer.h.*.ln_cross_attn": "LayerNorm (1, 0)",
}


def check_options(options):
    """Reject unknown options and options that the chosen bridge (or controls=False) would ignore."""
    check_option_names(options, OPTIONS, "bridge")
    bridge_type = options.get("bridge_type", OPTIONS["bridge_type"])
    if bridge_type not in BRIDGE_TYPES:
        raise ConversionError(f"unknown bridge type {bridge_type!r}; choose one of {', '.join(BRIDGE_TYPES)}")
    active = {bridge_type, "controls"} if options.get("controls") else {bridge_type}
    unused = sorted(name for name in options if not active & set(APPLIES_TO[name]))
    if unused:
        raise ConversionError(
            f"option(s) {', '.join(unused)} do not apply to bridge_type={bridge_type!r}"
            f"{'' if options.get('controls') else ' without controls'}"
        )


def bridge_config(encoder_config, decoder_config, **options):
    """BridgeConfig from stock BERT and GPT-2 configs; GPT-2's eos id serves as decoder start and pad token."""
    check_options(options)
    decoder_fields = config_fields(decoder_config)
    decoder_fields["add_cross_attention"] = True
    eos = decoder_config.eos_token_id
    start = decoder_config.bos_token_id if decoder_config.bos_token_id is not None else eos
    with config_errors():
        return BridgeConfig(
            encoder=encoder_config,
            decoder=GPT2Config(**decoder_fields),
            pad_token_id=eos,
            bos_token_id=start,
            eos_token_id=eos,
            decoder_start_token_id=start,
            **{**OPTIONS, **options},
        )


@torch.no_grad()
def fidelity(model, bert, gpt2, seed=0):
    """(max |encoder - stock BERT| on real tokens, max |decoder logits - stock GPT-2 logits| on real positions).

    The encoder batch is padded and unrelated to the decoder batch: the decoder parity holds for any encoder input.
    """
    enc_ids, enc_mask = probe_batch(model.config.encoder.vocab_size, seq_len=16, seed=seed,
                                    pad_id=model.config.encoder.pad_token_id or 0)
    dec_ids, dec_mask = probe_batch(model.config.decoder.vocab_size, seq_len=12, seed=seed + 1,
                                    pad_id=model.config.pad_token_id)
    ours = model.encoder(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
    stock = bert(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
    encoder_delta = (ours - stock)[enc_mask.bool()].abs().max().item()
    logits = model(input_ids=enc_ids, attention_mask=enc_mask, decoder_input_ids=dec_ids,
                   decoder_attention_mask=dec_mask, use_cache=False).logits
    stock_logits = gpt2(input_ids=dec_ids, attention_mask=dec_mask).logits
    decoder_delta = (logits - stock_logits)[dec_mask.bool()].abs().max().item()
    return encoder_delta, decoder_delta


def convert_bert_gpt2_to_bridge(encoder, decoder, **options):
    """Load a stock BERT-family encoder and a stock GPT-2 (local paths or Hub ids); return
    (BridgeForConditionalGeneration in eval mode, ConversionReport).

    Raises ConversionError when `encoder` is not a BERT checkpoint, `decoder` not a GPT-2 checkpoint, a weight does
    not fit, or an option is invalid or does not apply to the bridge; TypeError on an unknown option.
    """
    check_options(options)
    bert = load_stock_bert(encoder)
    gpt2 = load_stock_gpt2(decoder)
    config = bridge_config(bert.config, gpt2.config, **options)
    model = BridgeForConditionalGeneration(config)
    model.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)  # pipeline("text2text-generation", ..., trust_remote_code=True)

    bert_state = {k: v for k, v in bert.state_dict().items() if k not in SKIPPED_ENCODER_KEYS}
    source = {f"encoder.{k}": v for k, v in bert_state.items()}
    source.update({f"decoder.{k}": v for k, v in gpt2.state_dict().items()})
    added = new_keys(model)
    copy_weights(model, source, {key: key for key in source}, added)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.eval()

    encoder_delta, decoder_delta = fidelity(model, bert, gpt2)
    logger.info("converted %s + %s: max |encoder delta| = %.3g, max |decoder logit delta| = %.3g",
                encoder, decoder, encoder_delta, decoder_delta)
    state = model.state_dict()
    measurements = {
        "encoder_max_abs_delta": encoder_delta,  # |BERT states (converted) - BERT states (stock)|, padded probe batch
        "decoder_max_abs_logit_delta": decoder_delta,  # |decoder logits (any encoder input) - stock GPT-2 logits|
        "num_parameters": model.num_parameters(),
        "num_new_parameters": sum(state[k].numel() for k in added if state[k].is_floating_point()),
    }
    report = ConversionReport(
        {"encoder": str(encoder), "decoder": str(decoder)}, {**OPTIONS, **options}, measurements, dict(NEW_MODULES),
        modules_to_save(model),
        "encoder max |delta| = {encoder_max_abs_delta:.3g} vs stock BERT; decoder max |delta logits| = "
        "{decoder_max_abs_logit_delta:.3g} vs stock GPT-2",
        notes={"skipped_keys": SKIPPED_ENCODER_KEYS},
    )
    return model, report


def model_card(report, repo_id):
    # The weights combine two checkpoints (e.g. BERT: Apache-2.0, GPT-2: MIT), so both licences apply; the converter
    # cannot read them offline. `graftlm convert ... --license ID` states the one to publish under. The link is the
    # card's Licence section, which names both sources.
    metadata = card_metadata(report, "text2text-generation", ["bert-gpt2-bridge", "bert", "gpt2", "encoder-decoder"],
                             license="other", license_name="encoder-and-decoder-licences",
                             license_link="README.md#licence")
    fields = card_fields(
        report, repo_id,
        encoder=source_name(report.encoder),
        decoder=source_name(report.decoder),
        bridge_type=report.options["bridge_type"],
        encoder_fidelity=f"{report.encoder_max_abs_delta:.3g}",
        decoder_fidelity=f"{report.decoder_max_abs_logit_delta:.3g}",
        num_new_parameters=f"{report.num_new_parameters:,}",
        skipped_keys=", ".join(f"`{k}`" for k in report.skipped_keys),
        encoder_tokenizer=ENCODER_TOKENIZER_SUBFOLDER,
    )
    return "bridge", metadata, fields


def add_arguments(parser):
    parser.add_argument("--encoder", required=True, help="stock BERT-family checkpoint: local folder or Hub id")
    parser.add_argument("--decoder", required=True, help="stock GPT-2 checkpoint: local folder or Hub id")
    parser.add_argument("--bridge", choices=BRIDGE_TYPES, default=OPTIONS["bridge_type"], help="bridge type")
    parser.add_argument("--pop-size", type=int, help="virtual candidates of the population bridge (default: 4)")
    parser.add_argument("--selection", choices=["learned", "fitness"],
                        help="population selection: learned softmax weights or per-token fitness (default: learned)")
    parser.add_argument("--gated-residual", action="store_true", help="ga: out = z + gate * (bridged - z)")
    parser.add_argument("--token-wise", action="store_true", help="ga: alpha and sigma per token from tiny MLPs")
    parser.add_argument("--sigma-init", type=float, help="initial mutation scale (default: 0.05)")
    parser.add_argument("--sigma-schedule", choices=["constant", "linear", "cosine"],
                        help="decay of the mutation scale over training passes (default: constant)")
    parser.add_argument("--sigma-schedule-steps", type=int, help="training passes for the schedule to reach 0")
    parser.add_argument("--controls", action="store_true",
                        help="add temperature/top-k heads for generate(..., adaptive_decoding=True)")
    parser.add_argument("--control-objective", choices=["likelihood", "prior"],
                        help="control loss: soft temperature/top-k target NLL, or the seed's prior (default: likelihood)")
    parser.add_argument("--control-loss-weight", type=float, help="lambda of the control loss (default: 0.1)")


_CLI_VALUES = ("pop_size", "selection", "sigma_init", "sigma_schedule", "sigma_schedule_steps", "control_objective",
               "control_loss_weight")


def options_from_args(args):
    """Only the options the user gave, so that one which does not apply to the chosen bridge is an error."""
    options = {"bridge_type": args.bridge}
    options.update({name: getattr(args, name) for name in _CLI_VALUES if getattr(args, name) is not None})
    for flag in ("gated_residual", "token_wise", "controls"):
        if getattr(args, flag):
            options[flag] = True
    return options


def example_arguments(gpt2, second_gpt2, bert, shape):
    """`graftlm convert bridge` arguments for the stock checkpoints that the demo, bench and tests build."""
    return ["--encoder", bert, "--decoder", gpt2, "--bridge", "ga", *(["--controls"] if shape["controls"] else [])]


def model_from_args(args):
    """(model, report) from parsed arguments: the conversion without tokenizers or export."""
    return convert_bert_gpt2_to_bridge(args.encoder, args.decoder, **options_from_args(args))


def convert_from_args(args):
    """CLI entry: returns (model, tokenizers, card builder, report) for the shared export step."""
    check_options(options_from_args(args))  # before reading the tokenizers
    decoder_tokenizer = load_tokenizer(args.decoder)
    encoder_tokenizer = load_tokenizer(args.encoder)
    model, report = model_from_args(args)
    if decoder_tokenizer.pad_token is None:  # GPT-2 has none; the model pads with eos, so the tokenizer does too
        decoder_tokenizer.pad_token = decoder_tokenizer.eos_token
    tokenizers = {"": decoder_tokenizer, ENCODER_TOKENIZER_SUBFOLDER: encoder_tokenizer}
    return model, tokenizers, lambda repo_id: model_card(report, repo_id), report


__all__ = ["ConversionError", "bridge_config", "check_options", "convert_bert_gpt2_to_bridge"]
