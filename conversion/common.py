"""Shared by every converter: strict loading of stock checkpoints, literal weight copies, fidelity probes."""

import contextlib
import json
import logging
from dataclasses import dataclass, field

import torch
from huggingface_hub.errors import StrictDataclassError

from ..export import hub_ids
from ..inputs import check_model_folder, check_tokenizer

logger = logging.getLogger(__name__)

# Buffers that old GPT-2 checkpoints carry and transformers 5 no longer uses (the causal mask is built on the fly).
GPT2_LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")


class ConversionError(ValueError):
    pass


# Fields of a stock config that describe the checkpoint, not the architecture: a converter's new config drops them.
META_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype", "torch_dtype")


def config_fields(config, keep=()):
    """The fields of a stock config without META_KEYS (except those named in `keep`)."""
    return {k: v for k, v in config.to_dict().items() if k not in META_KEYS or k in keep}


def check_option_names(options, known, what):
    """TypeError naming every option of `options` that `known` (the converter's OPTIONS) lacks."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown {what} option(s): {', '.join(unknown)} (known: {', '.join(known)})")


@contextlib.contextmanager
def config_errors():
    """A config field that fails its validation becomes a ConversionError carrying the field's own message."""
    try:
        yield
    except StrictDataclassError as err:
        raise ConversionError(str(err.__cause__ or err)) from err


def options_from_args(args, options):
    """The converter's options (the keys of its OPTIONS) as the command line parsed them."""
    return {name: getattr(args, name) for name in options}


def _load_strict(model_class, name_or_path, expected_model_types, what, **kwargs):
    """from_pretrained with every missing, unexpected or mismatched key turned into an error that names it."""
    from transformers import AutoConfig

    check_model_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read a config from {name_or_path!r}: {err}") from err
    if config.model_type not in expected_model_types:
        raise ConversionError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint; {what} needs one of {sorted(expected_model_types)}"
        )
    model, info = model_class.from_pretrained(
        name_or_path, config=config, output_loading_info=True, dtype=torch.float32, **kwargs
    )
    unexpected = [k for k in info["unexpected_keys"] if not k.endswith(GPT2_LEGACY_BUFFERS)]
    problems = {
        "missing": list(info["missing_keys"]),
        "unexpected": unexpected,
        "mismatched shapes": [str(m) for m in info.get("mismatched_keys", [])],
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        details = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in problems.items())
        raise ConversionError(f"{name_or_path!r} does not match {model_class.__name__}: {details}")
    not_finite = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise ConversionError(f"{name_or_path!r} holds NaN or infinite weights in {', '.join(not_finite[:5])}"
                              f"{f' and {len(not_finite) - 5} more' if len(not_finite) > 5 else ''}")
    return model.eval()


def load_stock_gpt2(name_or_path, **kwargs):
    """A stock GPT2LMHeadModel in float32, or a ConversionError naming what does not fit."""
    from transformers import GPT2LMHeadModel

    return _load_strict(GPT2LMHeadModel, name_or_path, {"gpt2"}, "a GPT-2 (GPT2LMHeadModel) checkpoint", **kwargs)


def load_stock_bert(name_or_path, **kwargs):
    """A stock BertModel in float32 (BERT-family checkpoints), or a ConversionError naming what does not fit."""
    from transformers import BertModel

    return _load_strict(BertModel, name_or_path, {"bert"}, "a BERT-family encoder", **kwargs)


def copy_weights(target, source_state, key_map, new_keys):
    """Copy `source_state` into `target` through a literal key map, failing loudly on anything unaccounted for.

    key_map: {target key: source key}; every source key must be mapped, every target key must be either mapped
    or listed in `new_keys` (modules the architecture adds, initialised by the model's own _init_weights).
    """
    target_state = target.state_dict()
    unmapped_source = sorted(set(source_state) - set(key_map.values()))
    unknown_target = sorted(set(key_map) - set(target_state))
    uncovered_target = sorted(set(target_state) - set(key_map) - set(new_keys))
    missing_source = sorted(v for v in key_map.values() if v not in source_state)
    problems = {
        "source keys with no target": unmapped_source,
        "mapped target keys the model does not have": unknown_target,
        "target keys neither mapped nor new": uncovered_target,
        "mapped source keys absent from the checkpoint": missing_source,
    }
    shape_errors = [
        f"{t} {tuple(target_state[t].shape)} <- {s} {tuple(source_state[s].shape)}"
        for t, s in key_map.items()
        if t in target_state and s in source_state and target_state[t].shape != source_state[s].shape
    ]
    problems["shape mismatches"] = shape_errors
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise ConversionError("; ".join(f"{k}: {', '.join(v)}" for k, v in problems.items()))
    with torch.no_grad():
        for t, s in key_map.items():
            target_state[t].copy_(source_state[s])


def probe_batch(vocab_size, seq_len=16, batch_size=2, seed=0, pad_id=0):
    """A fixed, left-padded probe batch: the second row has its first quarter padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch_size > 1:
        attention_mask[1:, : seq_len // 4] = 0
        input_ids[1:, : seq_len // 4] = pad_id
    return input_ids, attention_mask


@torch.no_grad()
def max_logit_delta(model_a, model_b, input_ids, attention_mask, **forward_kwargs):
    """max |logits_a - logits_b| over real (non-padded) positions."""
    a = model_a(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    b = model_b(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    real = attention_mask.bool()
    return (a[real] - b[real]).abs().max().item()


def load_tokenizer(name_or_path, required=True):
    """The tokenizer saved with a checkpoint, checked against its config's vocabulary (inputs.check_tokenizer); an
    error (or None when not `required`) if there is none or it does not fit."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_folder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path).get_text_config(decoder=True)
        return check_tokenizer(tokenizer, getattr(config, "vocab_size", None), "it")
    except (OSError, ValueError, TypeError) as err:
        if required:
            raise ConversionError(f"no usable tokenizer in {name_or_path!r}: {err}") from err
        logger.warning("no usable tokenizer at %s (%s); the export will carry none", name_or_path, err)
        return None


@dataclass
class ConversionReport:
    """What a conversion read, chose and measured. Its sources and measurements read as attributes too
    (report.base, report.max_abs_logit_delta); summary() is one line on the fidelity probes."""

    sources: dict  # role -> checkpoint it was read from, e.g. {"encoder": ..., "decoder": ...}
    options: dict
    measurements: dict  # fidelity probes, their lengths, parameter counts
    new_modules: dict  # module pattern -> how it is initialised (the card's list)
    modules_to_save: list  # peft's modules_to_save for the new modules (modules_to_save(model))
    summary_format: str  # str.format over the measurements
    notes: dict = field(default_factory=dict)  # anything else the card states (skipped keys, training status)

    def __getattr__(self, name):
        for table in ("sources", "measurements", "notes"):
            if name in self.__dict__.get(table, {}):
                return self.__dict__[table][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def summary(self):
        return self.summary_format.format(**self.measurements)


def card_metadata(report, pipeline_tag, tags, license="mit", **license_details):
    """A card's YAML metadata: the Hub ids of the report's sources, the licence, the pipeline and graftlm's tags."""
    return {"library_name": "transformers", "base_model": hub_ids(*report.sources.values()), "license": license,
            **license_details, "pipeline_tag": pipeline_tag, "tags": ["graftlm", *tags, "custom_code"]}


def card_fields(report, repo_id, **fields):
    """A card's body fields that every template may read (options table rows, new-module bullets, peft's
    modules_to_save as a Python list, parameter count, repo id), then the architecture's own."""
    return {
        "options": "\n".join(f"| `{k}` | `{v}` |" for k, v in report.options.items()),
        "new_modules": "\n".join(f"- `{k}`: {v}" for k, v in report.new_modules.items()),
        "modules_to_save": json.dumps(report.modules_to_save),
        "num_parameters": f"{report.num_parameters:,}",
        "repo_id": repo_id,
        **fields,
    }


# ----- the new modules: read from the model class (its float32 lists and _new_modules_in_model_dtype) -----


def new_modules(model):
    """Names of the modules the architecture adds to its stock checkpoints, as transformers' float32 lists name them
    (sorted: transformers keeps the strict list of an instance as a set)."""
    return sorted({*model._keep_in_fp32_modules_strict, *model._new_modules_in_model_dtype})


def new_keys(model):
    """The state-dict keys of the new modules: those with a new module's name among their dotted parts."""
    names = set(new_modules(model))
    return [key for key in model.state_dict() if names & set(key.split("."))]


def modules_to_save(model):
    """peft's modules_to_save for the new modules trained whole: the strict float32 list, a container (ModuleDict,
    ModuleList) replaced by its entries, since peft trains the copy of a module that forward() calls."""
    names = []
    for name in sorted(model._keep_in_fp32_modules_strict):  # an instance's strict list is a set
        module = getattr(model, name, None)
        if isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList)):
            names += [f"{name}.{key}" for key, _ in module.named_children()]
        else:
            names.append(name)
    return names
