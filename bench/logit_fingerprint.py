"""Fingerprint every GraftLM model class's outputs, to show that a refactoring computes exactly what it did before.

Builds each architecture's classes (base model, causal LM or seq2seq model, the GPT-2 task heads) from fixed tiny
configs and seeds, records the freshly initialised weights, then perturbs every parameter with seeded noise (so the
identity-initialised new modules take part) and runs fixed inputs: a padded forward with hidden states and
attention weights, a loss, and a cached decode of a few steps, under each attention implementation the class
supports. Every tensor goes into one .pt file.

    python bench/logit_fingerprint.py --save /tmp/before.pt
    python bench/logit_fingerprint.py --compare /tmp/before.pt   # max |diff| of each tensor and torch.equal

--compare exits with status 1 unless every recorded tensor is present and bit-identical.
"""

import argparse
import sys

import torch
from transformers import BertConfig, GPT2Config

from graftlm.configuration.configuration_bridge import BridgeConfig
from graftlm.configuration.configuration_bsbr import BSBRConfig
from graftlm.configuration.configuration_dfa import DFAConfig
from graftlm.configuration.configuration_scaffold import ScaffoldConfig
from graftlm.modeling import modeling_bridge, modeling_bsbr, modeling_dfa, modeling_scaffold

GPT2_SIZE = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=97, bos_token_id=1, eos_token_id=2)
HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
DECODE_STEPS = 3


def gpt2_configs():
    """(architecture name, module, class prefix, config) of each GPT-2-based variant."""
    yield "dfa-token", modeling_dfa, "DFA", DFAConfig(**GPT2_SIZE, gate_mode="token", pad_token_id=0)
    yield "dfa-sequence", modeling_dfa, "DFA", DFAConfig(**GPT2_SIZE, gate_mode="sequence", pad_token_id=0)
    yield "bsbr", modeling_bsbr, "BSBR", BSBRConfig(**GPT2_SIZE, chunk_size=4, pad_token_id=0)
    yield "bsbr-compressed", modeling_bsbr, "BSBR", BSBRConfig(**GPT2_SIZE, chunk_size=4, compression_factor=2,
                                                               pad_token_id=0)
    base = GPT2Config(**GPT2_SIZE)
    scaffold = GPT2Config(**{**GPT2_SIZE, "n_embd": 16, "n_head": 2, "n_layer": 3})
    yield "scaffold", modeling_scaffold, "Scaffold", ScaffoldConfig(
        base_config=base, scaffold_config=scaffold, cross_attn_layers=[0, 1], pad_token_id=0
    )


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, GPT2_SIZE["vocab_size"], (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    ids[1, :3] = 0
    return ids, mask


def built(cls, config, attn):
    torch.manual_seed(0)
    config = type(config).from_dict(config.to_dict())
    config._attn_implementation = attn
    model = cls(config).eval()
    return model


def perturbed(model):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def record_gpt2(out):
    ids, mask = inputs()
    for name, module, prefix, config in gpt2_configs():
        for attn in ("eager", "sdpa"):
            tag = f"{name}/{attn}"
            for suffix in ("Model", "ForCausalLM", *HEADS):
                cls = getattr(module, prefix + suffix)
                model = built(cls, config, attn)
                if attn == "eager":  # the initialisation does not depend on the attention implementation
                    for key, value in model.state_dict().items():
                        out[f"init/{name}/{suffix}/{key}"] = value.clone()
                perturbed(model)
                with torch.no_grad():
                    kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                    if suffix in ("Model", "ForCausalLM", "ForSequenceClassification"):
                        kwargs["use_cache"] = False
                    if suffix == "ForCausalLM":
                        labels = ids.masked_fill(mask == 0, -100)
                        result = model(**kwargs, labels=labels, output_attentions=True)
                        out[f"{tag}/{suffix}/loss"] = result.loss
                        out[f"{tag}/{suffix}/logits"] = result.logits
                        out[f"{tag}/{suffix}/decode"] = decoded(model, ids, mask)
                    elif suffix == "Model":
                        result = model(**kwargs, output_attentions=True)
                        out[f"{tag}/{suffix}/last_hidden_state"] = result.last_hidden_state
                    elif suffix == "ForQuestionAnswering":
                        result = model(**kwargs)
                        out[f"{tag}/{suffix}/start_logits"] = result.start_logits
                        out[f"{tag}/{suffix}/end_logits"] = result.end_logits
                    else:
                        result = model(**kwargs)
                        out[f"{tag}/{suffix}/logits"] = result.logits
                    for i, state in enumerate(result.hidden_states):
                        out[f"{tag}/{suffix}/hidden_states/{i}"] = state
                    for i, weights in enumerate(getattr(result, "attentions", None) or ()):
                        if weights is not None:  # None: the implementation returns no weights (GPT-2's sdpa)
                            out[f"{tag}/{suffix}/attentions/{i}"] = weights


def decoded(model, ids, mask):
    """Greedy cached decode of DECODE_STEPS tokens, one forward per step: the logits of every step, stacked."""
    result = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
    steps = [result.logits[:, -1]]
    for _ in range(DECODE_STEPS):
        token = steps[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        result = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
        steps.append(result.logits[:, -1])
    return torch.stack(steps, dim=1)


def record_bridge(out):
    encoder = BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         vocab_size=100)
    decoder = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=120, n_positions=32, add_cross_attention=True,
                         bos_token_id=1, eos_token_id=2)
    generator = torch.Generator().manual_seed(3)
    src = torch.randint(2, 100, (2, 7), generator=generator)
    src_mask = torch.ones_like(src)
    src_mask[1, -2:] = 0
    labels = torch.randint(2, 120, (2, 5), generator=generator)
    variants = {
        "ga": dict(bridge_type="ga"),
        "ga-controls": dict(bridge_type="ga", controls=True),
        "ga-tokenwise-gated": dict(bridge_type="ga", token_wise=True, gated_residual=True),
        "population-fitness-controls": dict(bridge_type="population", selection="fitness", controls=True,
                                            control_objective="prior"),
        "linear": dict(bridge_type="linear"),
    }
    for name, options in variants.items():
        config = BridgeConfig(encoder=encoder, decoder=decoder, pad_token_id=0, decoder_start_token_id=1, **options)
        model = built(modeling_bridge.BridgeForConditionalGeneration, config, "eager")
        for key, value in model.state_dict().items():
            out[f"init/bridge-{name}/{key}"] = value.clone()
        perturbed(model)
        with torch.no_grad():
            result = model(input_ids=src, attention_mask=src_mask, labels=labels, output_hidden_states=True)
        for field in ("loss", "logits", "ce_loss", "control_loss", "temperature", "top_k", "encoder_last_hidden_state"):
            if getattr(result, field, None) is not None:
                out[f"bridge-{name}/{field}"] = getattr(result, field)
        with torch.no_grad():
            generated = model.generate(input_ids=src, attention_mask=src_mask, max_new_tokens=4, do_sample=False,
                                       adaptive_decoding=bool(options.get("controls")))
        out[f"bridge-{name}/generate"] = generated


def record():
    out = {}
    record_gpt2(out)
    record_bridge(out)
    empty = sorted(key for key, value in out.items() if value is None)
    if empty:
        raise AssertionError(f"no tensor recorded for {empty}")
    return {key: value.detach().clone() for key, value in out.items()}


def compare(before, after):
    missing = sorted(set(before) - set(after))
    added = sorted(set(after) - set(before))
    unequal = []
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        if not same:
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
            unequal.append(key)
            print(f"DIFFERENT {key}: max |diff| {diff:.3e}")
    n = len(set(before) & set(after))
    print(f"{n} tensors compared: {n - len(unequal)} bit-identical, {len(unequal)} different; "
          f"{len(missing)} missing, {len(added)} new")
    for key in missing:
        print(f"MISSING {key}")
    return not (unequal or missing)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the fingerprint to this .pt file")
    group.add_argument("--compare", help="compare the current code's fingerprint with this .pt file")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    current = record()
    if args.save:
        torch.save(current, args.save)
        print(f"{len(current)} tensors written to {args.save}")
        return 0
    return 0 if compare(torch.load(args.compare), current) else 1


if __name__ == "__main__":
    sys.exit(main())
