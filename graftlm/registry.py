"""The architectures GraftLM ships, and their registration with transformers' Auto classes.

Registration lives here and not in the modeling files, because those files are exported as remote code:
a `register` call inside them would clash with this one when both are imported in one process.
"""

from dataclasses import dataclass, field

from transformers import AutoConfig


@dataclass(frozen=True)
class Architecture:
    """One row of the table. The modules an architecture adds are declared once, on its model class (beside
    transformers' _keep_in_fp32_modules lists: see conversion.common.new_modules); its recipe for converting the
    stock checkpoints that the demo, bench and tests build is its converter's example_arguments()."""

    name: str  # the CLI name: `graftlm convert <name>`, `graftlm train <name>`
    label: str  # how reports and tables name it
    config_class: type
    # {"AutoModelForCausalLM": ModelClass, ...}, with one CausalLM or Seq2SeqLM class: the one that generates
    auto_classes: dict = field(default_factory=dict)
    converter: str = ""  # module with add_arguments, example_arguments, model_from_args, convert_from_args
    trainer: str = ""  # module with add_arguments(parser) and main(args)
    decode_target: float = None  # `graftlm bench`: decoding tokens/s against stock GPT-2, at least (None: report)
    train_time_target: float = None  # `graftlm bench`: training step time against stock GPT-2, at most (None: report)

    @property
    def model_type(self):
        return self.config_class.model_type

    @property
    def generation_class(self):
        """The model class `graftlm convert` builds (it generates: causal LM or seq2seq LM)."""
        return self.auto_classes[self.generation_auto_class]

    @property
    def generation_auto_class(self):
        """The Auto class that loads an export of this architecture for generation, by name."""
        return next(auto for auto in self.auto_classes if auto.endswith(("CausalLM", "Seq2SeqLM")))

    @property
    def is_encoder_decoder(self):
        """Whether its converter reads an encoder checkpoint (BERT) as well as GPT-2."""
        return self.generation_auto_class == "AutoModelForSeq2SeqLM"


_BY_MODEL_TYPE = {}


def register(arch):
    import transformers

    AutoConfig.register(arch.model_type, arch.config_class, exist_ok=True)
    for auto_name, model_class in arch.auto_classes.items():
        getattr(transformers, auto_name).register(arch.config_class, model_class, exist_ok=True)
    _BY_MODEL_TYPE[arch.model_type] = arch


def get(model_type):
    if model_type not in _BY_MODEL_TYPE:
        raise KeyError(f"model_type {model_type!r} is not a GraftLM architecture (known: {sorted(_BY_MODEL_TYPE)})")
    return _BY_MODEL_TYPE[model_type]


def all_architectures():
    return list(_BY_MODEL_TYPE.values())


def by_name(name):
    """The architecture `graftlm convert <name>` / `graftlm train <name>` names."""
    for arch in _BY_MODEL_TYPE.values():
        if arch.name == name:
            return arch
    raise KeyError(f"{name!r} is not a GraftLM architecture (known: {names()})")


def names():
    """The architectures' CLI names, in registration order."""
    return [arch.name for arch in _BY_MODEL_TYPE.values()]


def _register_all():
    # One line per architecture; each architecture's owner edits only its own line.
    from .configuration.configuration_dfa import DFAConfig
    from .modeling import modeling_dfa as dfa

    register(Architecture("dfa", "GPT2-DFA", DFAConfig, {
        "AutoModel": dfa.DFAModel, "AutoModelForCausalLM": dfa.DFAForCausalLM,
        "AutoModelForSequenceClassification": dfa.DFAForSequenceClassification,
        "AutoModelForTokenClassification": dfa.DFAForTokenClassification,
        "AutoModelForQuestionAnswering": dfa.DFAForQuestionAnswering,
    }, converter="graftlm.conversion.dfa", trainer="graftlm.training.dfa", decode_target=0.8, train_time_target=1.15))

    from .configuration.configuration_bsbr import BSBRConfig
    from .modeling import modeling_bsbr as bsbr

    register(Architecture("bsbr", "GPT2-BSBR", BSBRConfig, {
        "AutoModel": bsbr.BSBRModel, "AutoModelForCausalLM": bsbr.BSBRForCausalLM,
        "AutoModelForSequenceClassification": bsbr.BSBRForSequenceClassification,
        "AutoModelForTokenClassification": bsbr.BSBRForTokenClassification,
        "AutoModelForQuestionAnswering": bsbr.BSBRForQuestionAnswering,
    }, converter="graftlm.conversion.bsbr", trainer="graftlm.training.bsbr", decode_target=0.8))

    from .configuration.configuration_bridge import BridgeConfig
    from .modeling.modeling_bridge import BridgeForConditionalGeneration

    register(Architecture("bridge", "Bridged", BridgeConfig, {"AutoModelForSeq2SeqLM": BridgeForConditionalGeneration},
                          converter="graftlm.conversion.bridge", trainer="graftlm.training.bridge", decode_target=0.75))

    from .configuration.configuration_scaffold import ScaffoldConfig
    from .modeling import modeling_scaffold as scaffold

    register(Architecture("scaffold", "Scaffolded", ScaffoldConfig, {
        "AutoModel": scaffold.ScaffoldModel, "AutoModelForCausalLM": scaffold.ScaffoldForCausalLM,
        "AutoModelForSequenceClassification": scaffold.ScaffoldForSequenceClassification,
        "AutoModelForTokenClassification": scaffold.ScaffoldForTokenClassification,
        "AutoModelForQuestionAnswering": scaffold.ScaffoldForQuestionAnswering,
    }, converter="graftlm.conversion.scaffold", trainer="graftlm.training.scaffold", decode_target=0.7))
