"""One tester per architecture (DFA, BSBR, Scaffolded, Bridged): how to build a tiny model from a config, how to
convert one from tiny stock checkpoints, and the fixed inputs that the contract tests (test_contract.py) feed it.

TESTERS is the one list of the four; ARCHS, CAUSAL and `build` are the config-built rows of test_contract.py's
transformers-contract tests (the causal LMs: Bridged, a seq2seq model, is built by `build_bridge`).
"""

import copy
import functools
import re
import tempfile
from pathlib import Path

import torch
from testing_utils import gpt2_tokenizer, minilm_dir, open_new_modules, save_tiny_gpt2
from transformers import BertConfig, GPT2Config

from graftlm.configuration.configuration_bridge import BridgeConfig
from graftlm.configuration.configuration_bsbr import BSBRConfig
from graftlm.configuration.configuration_dfa import DFAConfig
from graftlm.configuration.configuration_scaffold import ScaffoldConfig
from graftlm.conversion.common import probe_batch
from graftlm.modeling.modeling_bridge import BridgeForConditionalGeneration
from graftlm.modeling.modeling_bsbr import BSBRForCausalLM, BSBRModel
from graftlm.modeling.modeling_dfa import DFAForCausalLM, DFAModel
from graftlm.modeling.modeling_scaffold import ScaffoldForCausalLM, ScaffoldModel

# --- Rows built from a config (transformers' model contract) -----------------------------------------------------------
TINY = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=99, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)


def scaffold_config(**kwargs):
    """A ScaffoldConfig whose base and scaffold are both the tiny GPT-2 of TINY, with a fuser after every base layer;
    the other options go to the ScaffoldConfig."""
    gpt2 = {k: kwargs.pop(k) for k in TINY if k in kwargs}
    return ScaffoldConfig(base_config=GPT2Config(**gpt2), scaffold_config=GPT2Config(**gpt2),
                          cross_attn_layers=list(range(gpt2["n_layer"])), fuser_heads=gpt2["n_head"], **kwargs)


# name: (config class, causal LM class, base model class, config overrides). BSBR's chunk of 4 makes every test
# input cross chunks, so retrieval shapes the outputs.
ARCHS = {
    "dfa": (DFAConfig, DFAForCausalLM, DFAModel, {}),
    "bsbr": (BSBRConfig, BSBRForCausalLM, BSBRModel, {"chunk_size": 4}),
    "scaffold": (scaffold_config, ScaffoldForCausalLM, ScaffoldModel, {}),
}


def build(arch, model="lm", seed=0, **overrides):
    """A causal LM ("lm") or its base model ("base") built from TINY, its identity-initialised modules opened."""
    config_class, lm_class, base_class, arch_overrides = ARCHS[arch]
    config = config_class(**{**TINY, **arch_overrides, **overrides})
    config._attn_implementation = "eager"  # output_attentions needs the explicit weights, as for GPT-2
    torch.manual_seed(seed)
    model = (lm_class if model == "lm" else base_class)(config).eval()
    with torch.no_grad():  # open the identity-initialised modules, so the new architecture shapes the outputs
        for name, param in model.named_parameters():
            if re.search(type(model)._identity_parameters, name):
                param.normal_()
        if hasattr(model, "scaffold"):  # one token embedding for both GPT-2s, as a scaffold converted from the base has
            model.scaffold.transformer.wte.weight.copy_(model.base.transformer.wte.weight)
    return model


def bridge_config(decoder=None, **options):
    """A tiny Bridged config: a 1-layer BERT encoder and a GPT-2 decoder of `decoder`'s fields (default: TINY's, one
    layer)."""
    decoder = decoder or {**TINY, "n_layer": 1}
    encoder = BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         vocab_size=decoder["vocab_size"])
    decoder = GPT2Config(**decoder, add_cross_attention=True)
    return BridgeConfig(encoder=encoder, decoder=decoder, pad_token_id=0, decoder_start_token_id=1, **options)


def build_bridge(**options):
    torch.manual_seed(0)
    return BridgeForConditionalGeneration(bridge_config(**options)).eval()


def batch(seq=11):
    """Two rows of TINY's vocabulary, row 0 left-padded by 3."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


# --- Conversions of tiny stock checkpoints ---------------------------------------------------------------------------
VOCAB = 50257  # GPT-2's, as the stock checkpoints have it
BERT_VOCAB = 30522  # the packaged MiniLM's
# Tiny stock GPT-2s: 4 heads of 8 dims, and 3 heads of 16 dims with 3 layers (a head count that is not a power of 2).
GPT2_SHAPES = {"4heads": dict(n_head=4, n_embd=32), "3heads": dict(n_head=3, n_embd=48, n_layer=3)}


@functools.cache
def stock_gpt2(shape="4heads", seed=1):
    """A tiny stock GPT-2 checkpoint (GPT2_SHAPES[shape] or a dict of config fields as a sorted tuple of items),
    written once per session."""
    fields = GPT2_SHAPES[shape] if isinstance(shape, str) else dict(shape)
    return save_tiny_gpt2(Path(tempfile.mkdtemp(prefix="graftlm-stock-")), seed=seed, **fields)


def causal_inputs(seq=12, seed=3):
    """The fixed left-padded batch: 3 rows of GPT-2's vocabulary, rows 1 and 2 padded over their first quarter."""
    ids, mask = probe_batch(VOCAB, seq_len=seq, batch_size=3, seed=seed)
    return dict(input_ids=ids, attention_mask=mask)


class Tester:
    """What the contract tests need to know about one architecture. `options`: converter options that differ from
    the defaults, so that a reload is seen to keep them. `gpt2_root`: where the GPT-2 (lm_head and transformer) whose
    blocks the architecture changes sits in the parameter names."""

    name = auto_class = gpt2_root = ""
    options = {}
    seq2seq = False
    pads = (0, 3, 11)  # left padding of the rows of step_batch: row 2 is all padding during a short prefill
    identity_overrides = {}  # config fields under which the identity-initialised model computes stock GPT-2
    new_tokens = 10  # what generate tests decode

    def config(self, **gpt2_fields):
        config_class = ARCHS[self.name][0]
        return config_class(**{**gpt2_fields, **self.identity_overrides})

    def from_config(self, **gpt2_fields):
        """A model built from a config (no checkpoint) around a GPT-2 of `gpt2_fields`."""
        return ARCHS[self.name][1](self.config(**gpt2_fields))

    def _convert(self, base, **options):
        raise NotImplementedError

    def convert(self, shape="4heads", options=None):
        """(model in eval mode, report) converted from the stock GPT-2 of `shape` with `options` (default: the
        tester's): a fresh copy of one conversion per session."""
        options = self.options if options is None else options
        return copy.deepcopy(_conversion(self.name, shape, tuple(sorted(options.items()))))

    def trained(self, shape="4heads", options=None):
        """A conversion with its identity-initialised modules opened (seeded noise), as after training."""
        model, _ = self.convert(shape, options)
        open_new_modules(model, self.name)
        return model.eval()

    def gpt2(self, model):
        return model.get_submodule(self.gpt2_root.rstrip("."))

    # --- fixed inputs
    def inputs(self, seq=12):
        """Forward inputs: the fixed left-padded batch."""
        return causal_inputs(seq)

    def generate_inputs(self):
        return dict(causal_inputs(), pad_token_id=0)

    def step(self, ids, mask, positions, start, end):
        """Forward inputs for slots start:end of a step_batch, after a cache holding slots :start."""
        return dict(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end])

    def encoded(self, model, rows):
        """What every step of a step_batch shares (Bridged: the encoder's outputs, computed once)."""
        return {}

    def full(self, ids, mask, positions, prefill):
        """Forward inputs for all slots without a cache, reading what cached decoding read after a prefill."""
        return self.step(ids, mask, positions, 0, ids.shape[1])

    def train_batch(self, seq=24):
        ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0))
        return dict(input_ids=ids, labels=ids)

    # --- export
    def card(self, report, model):
        raise NotImplementedError

    def card_facts(self, report):
        """Lines the card must hold beyond the common metadata."""
        return ["pipeline_tag: text-generation"]

    def tokenizers(self):
        return {"": gpt2_tokenizer()}


def step_batch(seq, pads=(0, 3, 11), seed=0):
    """Rows of `seq` slots of GPT-2's vocabulary, row r left-padded with pads[r] zeros; position ids as generate()
    builds them."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(pads), seq), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


class DFATester(Tester):
    name, auto_class = "dfa", "AutoModelForCausalLM"
    options = {"gate_mode": "sequence"}

    def _convert(self, base, **options):
        from graftlm.conversion.dfa import convert_gpt2_to_dfa

        return convert_gpt2_to_dfa(base, **options)

    def card(self, report, model):
        from graftlm.conversion.dfa import model_card

        return model_card(report, "user/gpt2-dfa-tiny")


class BSBRTester(Tester):
    name, auto_class = "bsbr", "AutoModelForCausalLM"
    chunk = 8  # tiny chunks, so short inputs cross several chunk boundaries
    new_tokens = 3 * chunk  # decoding crosses three chunk boundaries
    options = {"compression_factor": 2}
    identity_overrides = {"chunk_size": 16}  # one chunk holds the input: no retrieval

    def _convert(self, base, **options):
        from graftlm.conversion.bsbr import convert_gpt2_to_bsbr

        return convert_gpt2_to_bsbr(base, **{"chunk_size": self.chunk, **options})

    def card(self, report, model):
        from graftlm.conversion.bsbr import model_card

        return model_card(report, "someone/gpt2-bsbr", model.config)

    def card_facts(self, report):
        return super().card_facts(report) + [f"**{report.chunk_delta:.3g}**"]


class ScaffoldTester(Tester):
    name, auto_class, gpt2_root = "scaffold", "AutoModelForCausalLM", "base."
    options = {"cross_attn_layers": (0, 1)}
    scaffold_shape = (("n_embd", 48), ("n_head", 4), ("n_layer", 3))  # wider and deeper than the base

    def _convert(self, base, **options):
        from graftlm.conversion.scaffold import convert_gpt2_to_scaffold

        options = dict(options, cross_attn_layers=list(options.get("cross_attn_layers", (0, 1))))
        return convert_gpt2_to_scaffold(base, stock_gpt2(self.scaffold_shape, seed=2), **options)

    def full(self, ids, mask, positions, prefill):
        # cached decoding reads the scaffold states of the prompt (the prefill) at every step
        return dict(super().full(ids, mask, positions, prefill), scaffold_input_ids=ids[:, :prefill],
                    scaffold_attention_mask=mask[:, :prefill])

    def card(self, report, model):
        from graftlm.conversion.scaffold import model_card

        return model_card(report, "user/scaffold")


class BridgeTester(Tester):
    name, auto_class, gpt2_root = "bridge", "AutoModelForSeq2SeqLM", "decoder."
    seq2seq = True
    pads = (0, 0, 0)  # decoder inputs start at decoder_start_token_id: no left padding
    # the seeds' options: a token-wise, gated bridge whose noise follows a schedule (a buffer counts its steps)
    options = {"bridge_type": "ga", "token_wise": True, "gated_residual": True, "sigma_schedule": "linear"}

    def config(self, **gpt2_fields):
        return bridge_config(decoder=gpt2_fields)

    def from_config(self, **gpt2_fields):
        return BridgeForConditionalGeneration(self.config(**gpt2_fields))

    def _convert(self, base, **options):
        from graftlm.conversion.bridge import convert_bert_gpt2_to_bridge

        return convert_bert_gpt2_to_bridge(minilm_dir(), base, **options)

    def trained(self, shape="4heads", options=None):
        model = super().trained(shape, options)
        for name, buffer in model.named_buffers():
            if name.endswith("noise_step"):
                buffer.fill_(7)  # the noise schedule has advanced
        return model

    def source(self, rows=3):
        ids, mask = probe_batch(BERT_VOCAB, seq_len=8, batch_size=rows, seed=3)
        return dict(input_ids=ids, attention_mask=mask)

    def inputs(self, seq=12):
        return dict(self.source(), decoder_input_ids=causal_inputs(seq)["input_ids"])

    def generate_inputs(self):
        return self.source()

    def encoded(self, model, rows):
        return {"encoder_outputs": model.encode(**self.source(rows))}

    def step(self, ids, mask, positions, start, end):
        return dict(attention_mask=self.source(len(ids))["attention_mask"], decoder_input_ids=ids[:, start:end])

    def train_batch(self, seq=24):
        return dict(self.source(2), labels=super().train_batch(seq)["labels"])

    def card(self, report, model):
        from graftlm.conversion.bridge import model_card

        return model_card(report, "user/bridge")

    def card_facts(self, report):
        return ["pipeline_tag: text2text-generation"]

    def tokenizers(self):
        from graftlm.conversion.common import load_tokenizer

        target = gpt2_tokenizer()
        target.pad_token = target.eos_token
        return {"": target, "encoder_tokenizer": load_tokenizer(minilm_dir())}


TESTERS = {tester.name: tester for tester in (DFATester(), BSBRTester(), ScaffoldTester(), BridgeTester())}
CAUSAL = tuple(name for name, tester in TESTERS.items() if not tester.seq2seq)


@functools.cache
def _conversion(arch, shape, options):
    model, report = TESTERS[arch]._convert(stock_gpt2(shape), **dict(options))
    return model.eval(), report
