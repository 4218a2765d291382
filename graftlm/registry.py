"""The architectures GraftLM ships, and their registration with transformers' Auto classes.

Registration lives here and not in the modeling files, because those files are exported as remote code:
a `register` call inside them would clash with this one when both are imported in one process.
"""

from dataclasses import dataclass, field

from transformers import AutoConfig


@dataclass(frozen=True)
class Architecture:
    name: str  # the CLI name: `graftlm convert <name>`, `graftlm train <name>`
    config_class: type
    auto_classes: dict = field(default_factory=dict)  # {"AutoModelForCausalLM": ModelClass, ...}
    converter: str = ""  # module with add_arguments(parser), convert_from_args(args) (see graftlm.convert)
    trainer: str = ""  # module with add_arguments(parser) and main(args)

    @property
    def model_type(self):
        return self.config_class.model_type


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

    register(Architecture("dfa", DFAConfig, {
        "AutoModel": dfa.DFAModel, "AutoModelForCausalLM": dfa.DFAForCausalLM,
        "AutoModelForSequenceClassification": dfa.DFAForSequenceClassification,
        "AutoModelForTokenClassification": dfa.DFAForTokenClassification,
        "AutoModelForQuestionAnswering": dfa.DFAForQuestionAnswering,
    }, converter="graftlm.conversion.dfa", trainer="graftlm.train_dfa"))

    from .configuration.configuration_bsbr import BSBRConfig
    from .modeling import modeling_bsbr as bsbr

    register(Architecture("bsbr", BSBRConfig, {
        "AutoModel": bsbr.BSBRModel, "AutoModelForCausalLM": bsbr.BSBRForCausalLM,
        "AutoModelForSequenceClassification": bsbr.BSBRForSequenceClassification,
        "AutoModelForTokenClassification": bsbr.BSBRForTokenClassification,
        "AutoModelForQuestionAnswering": bsbr.BSBRForQuestionAnswering,
    }, converter="graftlm.conversion.bsbr", trainer="graftlm.train_bsbr"))

    from .configuration.configuration_bridge import BridgeConfig
    from .modeling.modeling_bridge import BridgeForConditionalGeneration

    register(Architecture("bridge", BridgeConfig, {"AutoModelForSeq2SeqLM": BridgeForConditionalGeneration},
                          converter="graftlm.conversion.bridge", trainer="graftlm.train_bridge"))

    from .configuration.configuration_scaffold import ScaffoldConfig
    from .modeling import modeling_scaffold as scaffold

    register(Architecture("scaffold", ScaffoldConfig, {
        "AutoModel": scaffold.ScaffoldModel, "AutoModelForCausalLM": scaffold.ScaffoldForCausalLM,
        "AutoModelForSequenceClassification": scaffold.ScaffoldForSequenceClassification,
        "AutoModelForTokenClassification": scaffold.ScaffoldForTokenClassification,
        "AutoModelForQuestionAnswering": scaffold.ScaffoldForQuestionAnswering,
    }, converter="graftlm.conversion.scaffold", trainer="graftlm.train_scaffold"))
