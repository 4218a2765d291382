"""List the GraftLM classes in transformers' MODEL_*_MAPPING_NAMES tables, exactly where graftlm's registry registers
them with the Auto classes (AutoModel / AutoModelForCausalLM / AutoModelForSeq2SeqLM / the task heads' Auto classes).

Why: ModelTesterMixin recognises a class's role by these in-library name tables, not by the Auto registry. Without
this, e.g. test_training treats DFAModel as a head model and trains it (no loss), and _prepare_for_class(
return_labels=True) adds no labels for DFAForCausalLM. An in-library model is listed there; GPT-2 (the control) is.
"""

from transformers.models.auto import modeling_auto

ENTRIES = {
    "MODEL_MAPPING_NAMES": {"gpt2_dfa": "DFAModel", "gpt2_bsbr": "BSBRModel", "gpt2_scaffold": "ScaffoldModel"},
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {
        "gpt2_dfa": "DFAForCausalLM",
        "gpt2_bsbr": "BSBRForCausalLM",
        "gpt2_scaffold": "ScaffoldForCausalLM",
    },
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": {"bert_gpt2_bridge": "BridgeForConditionalGeneration"},
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": {
        "gpt2_dfa": "DFAForSequenceClassification",
        "gpt2_bsbr": "BSBRForSequenceClassification",
        "gpt2_scaffold": "ScaffoldForSequenceClassification",
    },
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": {
        "gpt2_dfa": "DFAForTokenClassification",
        "gpt2_bsbr": "BSBRForTokenClassification",
        "gpt2_scaffold": "ScaffoldForTokenClassification",
    },
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": {
        "gpt2_dfa": "DFAForQuestionAnswering",
        "gpt2_bsbr": "BSBRForQuestionAnswering",
        "gpt2_scaffold": "ScaffoldForQuestionAnswering",
    },
}

for table, entries in ENTRIES.items():
    for model_type, class_name in entries.items():
        getattr(modeling_auto, table).setdefault(model_type, class_name)
