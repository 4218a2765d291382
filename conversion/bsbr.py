"""Convert a stock GPT-2 (GPT2LMHeadModel) checkpoint into GPT2-BSBR (block-sparse attention with block retrieval).

Every GPT-2 weight is copied under its own name. The new parameters are, per layer, the meta-query projection
`attn.meta_r_proj` = (W_q + W_k) / 2, the chunk-key projection `attn.meta_h_proj` = (W_k + W_v) / 2 (both from the
layer's own c_attn, as in the BSBR converter API this one follows), the per-head retrieval gate
`attn.retrieval_gate.weight` = 0 (a module, so peft's modules_to_save can train it) and, with a compression factor
c > 1, `attn.compress_proj`, initialised to average runs of c key/query dimensions.
With the gate at 0 the converted model is GPT-2 with attention restricted to each token's own chunk; on inputs no
longer than chunk_size it is GPT-2.

n_positions may be raised: row p >= n of the new position table copies learned row p mod n (the base's n rows,
tiled), as Longformer initialised its longer position table (Beltagy et al. 2020, arXiv:2004.05150, section 5).
"""

import logging

import torch

from ..configuration.configuration_bsbr import FEATURE_MAPS, BSBRConfig
from ..export import source_name
from ..modeling.modeling_bsbr import BSBRForCausalLM, block_average
from .common import (ConversionError, ConversionReport, card_fields, card_metadata, check_option_names, config_errors,
                     config_fields, copy_weights, load_stock_gpt2, load_tokenizer, max_logit_delta, modules_to_save,
                     new_keys, options_from_args, probe_batch)

logger = logging.getLogger(__name__)

OPTIONS = {"chunk_size": 128, "compression_factor": None, "feature_map": "elu+1", "n_positions": None}
NEW_MODULES = {
    "transformer.h.*.attn.meta_r_proj": "chunk meta-query projection: (W_q + W_k) / 2, (b_q + b_k) / 2 of c_attn",
    "transformer.h.*.attn.meta_h_proj": "chunk-key projection: (W_k + W_v) / 2, (b_k + b_v) / 2 of c_attn",
    "transformer.h.*.attn.retrieval_gate": "per-head gate g of the retrieval term (weight), 0: no chunk state is read",
    "transformer.h.*.attn.compress_proj": "(compression_factor c > 1 only) head_dim -> head_dim / c projection of "
    "keys and queries before phi, initialised to average each run of c consecutive dimensions",
}
FIDELITY_LIMIT = 1e-3  # a larger delta within one chunk means the conversion is wrong, not merely imprecise


def _check_options(options):
    check_option_names(options, OPTIONS, "BSBR")
    for name in ("chunk_size", "compression_factor", "n_positions"):
        value = options.get(name, OPTIONS[name])
        if name == "chunk_size" or value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if options.get("feature_map", OPTIONS["feature_map"]) not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {options['feature_map']!r}")


def bsbr_config_from_gpt2(gpt2_config, **options):
    _check_options(options)
    options = {**OPTIONS, **options}
    fields = config_fields(gpt2_config)
    n_positions = options.pop("n_positions") or gpt2_config.n_positions
    if n_positions < gpt2_config.n_positions:
        raise ValueError(f"n_positions ({n_positions}) must be >= the base model's n_positions ({gpt2_config.n_positions})")
    fields["n_positions"] = n_positions
    with config_errors():
        return BSBRConfig(**fields, **options)


def tiled_positions(wpe, n_positions):
    """(n_positions, n_embd): the learned rows, repeated; row p is learned row p mod len(wpe)."""
    index = torch.arange(n_positions) % wpe.shape[0]
    return wpe[index].clone()


def block_diagonal_mask(length, chunk_size, dtype=torch.float32):
    """(1, 1, length, length) additive mask: causal, and no attention across chunk boundaries. For probes and tests
    only (it is the n x n tensor the model itself never builds)."""
    pos = torch.arange(length)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // chunk_size == pos[:, None] // chunk_size)
    return torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def init_new_modules(model):
    """Set the modules BSBR adds from each layer's own GPT-2 weights (see NEW_MODULES)."""
    n_embd = model.config.n_embd
    for block in model.transformer.h:
        attn = block.attn
        w_q, w_k, w_v = attn.c_attn.weight.split(n_embd, dim=1)  # Conv1D weights are (in, out)
        b_q, b_k, b_v = attn.c_attn.bias.split(n_embd)
        attn.meta_r_proj.weight.copy_((w_q + w_k) / 2)
        attn.meta_r_proj.bias.copy_((b_q + b_k) / 2)
        attn.meta_h_proj.weight.copy_((w_k + w_v) / 2)
        attn.meta_h_proj.bias.copy_((b_k + b_v) / 2)
        attn.retrieval_gate.weight.zero_()
        if attn.compress_proj is not None:
            attn.compress_proj.weight.copy_(block_average(attn.head_dim, model.config.compression_factor))


@torch.no_grad()
def measure_fidelity(model, stock, chunk_size, base_n_positions):
    """(delta within one chunk vs GPT-2, its length, delta across chunks vs block-diagonal GPT-2, its length)."""
    vocab = model.config.vocab_size
    short = min(chunk_size, base_n_positions)
    input_ids, attention_mask = probe_batch(vocab, seq_len=short)
    chunk_delta = max_logit_delta(model, stock, input_ids, attention_mask)
    long = min(base_n_positions, 3 * chunk_size + chunk_size // 2)
    input_ids, _ = probe_batch(vocab, seq_len=long, batch_size=1, seed=1)
    reference = stock(input_ids=input_ids, attention_mask=block_diagonal_mask(long, chunk_size)).logits
    block_delta = (model(input_ids=input_ids).logits - reference).abs().max().item()
    return chunk_delta, short, block_delta, long


def convert_gpt2_to_bsbr(base, **options):
    """Load a stock GPT-2 checkpoint (local path or Hub id) and return (BSBRForCausalLM, ConversionReport).

    Raises ConversionError when `base` is not a GPT-2 checkpoint, its weights do not match GPT-2's layout or the
    converted model does not reproduce GPT-2 within one chunk; ValueError on a bad option value; TypeError on an
    unknown option.
    """
    _check_options(options)
    stock = load_stock_gpt2(base)
    config = bsbr_config_from_gpt2(stock.config, **options)
    model = BSBRForCausalLM(config)
    source = stock.state_dict()
    base_n_positions = stock.config.n_positions
    if config.n_positions != base_n_positions:
        source["transformer.wpe.weight"] = tiled_positions(source["transformer.wpe.weight"], config.n_positions)
    copy_weights(model, source, {key: key for key in source}, new_keys(model))
    init_new_modules(model)
    model.generation_config = stock.generation_config
    model.eval()

    chunk_delta, short, block_delta, long = measure_fidelity(model, stock, config.chunk_size, base_n_positions)
    logger.info("converted %s to GPT2-BSBR: max |delta logits| = %.3g within a chunk (n=%d), %.3g vs block-diagonal "
                "GPT-2 (n=%d)", base, chunk_delta, short, block_delta, long)
    if max(chunk_delta, block_delta) > FIDELITY_LIMIT:
        raise ConversionError(
            f"the converted model does not reproduce GPT-2: max |delta logits| = {chunk_delta:.3g} within one chunk, "
            f"{block_delta:.3g} against block-diagonal GPT-2 (limit {FIDELITY_LIMIT})"
        )
    report_options = {**OPTIONS, **options, "n_positions": config.n_positions}
    measurements = {
        "chunk_delta": chunk_delta,  # max |logits - GPT-2 logits| on a left-padded batch no longer than chunk_size
        "chunk_probe_length": short,
        "block_delta": block_delta,  # max |logits - block-diagonal GPT-2 logits| across several chunks
        "block_probe_length": long,
        "base_n_positions": base_n_positions,
        "n_positions": config.n_positions,
        "num_parameters": model.num_parameters(),
    }
    report = ConversionReport(
        {"base": str(base)}, report_options, measurements, dict(NEW_MODULES), modules_to_save(model),
        "max |logits(GPT2-BSBR) - logits(GPT-2)| = {chunk_delta:.3g} within one chunk (n={chunk_probe_length}); "
        "{block_delta:.3g} against block-diagonal GPT-2 (n={block_probe_length})",
    )
    return model, report


class TransformerToBSBRConverter:
    """The converter API of the original BSBR project (chunk_size, compression_factor, convert_pretrained_model),
    returning a GPT2-BSBR BSBRForCausalLM. The report of the last conversion is kept in `self.report`."""

    def __init__(self, chunk_size=128, compression_factor=None, **options):
        self.options = {"chunk_size": chunk_size, "compression_factor": compression_factor, **options}
        _check_options(self.options)
        self.chunk_size, self.compression_factor = chunk_size, compression_factor
        self.report = None

    def convert_pretrained_model(self, model_name_or_path):
        model, self.report = convert_gpt2_to_bsbr(model_name_or_path, **self.options)
        return model


def convert_to_bsbr(model_name_or_path, chunk_size=128, compression_factor=None, **options):
    """Convert a stock GPT-2 checkpoint to a GPT2-BSBR BSBRForCausalLM (the original project's one-call API)."""
    converter = TransformerToBSBRConverter(chunk_size=chunk_size, compression_factor=compression_factor, **options)
    return converter.convert_pretrained_model(model_name_or_path)


def state_sizes(config):
    """Floats kept per head and per completed chunk, against GPT-2's KV cache for the same chunk of tokens."""
    d, s, b = config.head_dim, config.state_dim, config.chunk_size
    return {"state": s * d + s + d, "uncompressed": d * d + 2 * d, "kv": 2 * b * d}


def model_card(report, repo_id, config):
    sizes = state_sizes(config)
    if report.n_positions > report.base_n_positions:
        positions = (f"raised from {report.base_n_positions} to {report.n_positions}: position p >= "
                     f"{report.base_n_positions} starts as a copy of learned position p mod {report.base_n_positions} "
                     "(the learned table tiled, as Longformer did, arXiv:2004.05150 section 5)")
    else:
        positions = f"{report.n_positions}, GPT-2's learned table unchanged"
    metadata = card_metadata(report, "text-generation", ["gpt2-bsbr", "gpt2", "long-context"])
    fields = card_fields(
        report, repo_id,
        base=source_name(report.base),
        chunk_delta=f"{report.chunk_delta:.3g}",
        chunk_probe_length=report.chunk_probe_length,
        block_delta=f"{report.block_delta:.3g}",
        block_probe_length=report.block_probe_length,
        positions=positions,
        chunk_size=config.chunk_size,
        head_dim=config.head_dim,
        state_dim=config.state_dim,
        state_floats=sizes["state"],
        state_ratio=f"{sizes['state'] / sizes['uncompressed']:.3f}",
        cache_ratio=f"{sizes['state'] / sizes['kv']:.3f}",
        feature_map=config.feature_map,
    )
    return "bsbr", metadata, fields


def add_arguments(parser):
    parser.add_argument("--base", required=True, help="stock GPT-2 checkpoint: local folder or Hub id (e.g. gpt2)")
    parser.add_argument("--chunk-size", type=int, default=OPTIONS["chunk_size"], help="tokens per chunk B")
    parser.add_argument("--compression-factor", type=int, default=None,
                        help="compress each chunk state to 1/N of head_dim x head_dim (N must divide head_dim)")
    parser.add_argument("--n-positions", type=int, default=None,
                        help="raise the context length; new positions copy the learned ones, tiled (default: the base's)")
    parser.add_argument("--feature-map", choices=FEATURE_MAPS, default=OPTIONS["feature_map"],
                        help="positive feature map phi of the retrieval term")


def example_arguments(gpt2, second_gpt2, bert, shape):
    """`graftlm convert bsbr` arguments for the stock checkpoints that the demo, bench and tests build."""
    return ["--base", gpt2, "--chunk-size", str(shape["chunk_size"])]


def model_from_args(args):
    """(model, report) from parsed arguments: the conversion without tokenizers or export."""
    return convert_gpt2_to_bsbr(args.base, **options_from_args(args, OPTIONS))


def convert_from_args(args):
    """CLI entry: returns (model, tokenizers, card builder, report) for the shared export step."""
    tokenizer = load_tokenizer(args.base)
    model, report = model_from_args(args)
    return model, {"": tokenizer}, lambda repo_id: model_card(report, repo_id, model.config), report


__all__ = ["ConversionError", "TransformerToBSBRConverter", "convert_gpt2_to_bsbr", "convert_to_bsbr"]
