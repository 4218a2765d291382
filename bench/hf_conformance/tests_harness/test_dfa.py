"""GPT2-DFA (DFAModel, DFAForCausalLM) under transformers' ModelTesterMixin + GenerationTesterMixin (+ ConfigTester),
set up as tests/models/gpt2/test_modeling_gpt2.py sets up GPT-2 (see common.py)."""

import unittest

from transformers.testing_utils import require_torch

from graftlm.configuration.configuration_dfa import DFAConfig
from graftlm.modeling.modeling_dfa import (
    DFAForCausalLM, DFAForQuestionAnswering, DFAForSequenceClassification, DFAForTokenClassification, DFAModel,
)

from ..causal_lm_tester import CausalLMModelTest
from .common import GPT2LikeModelTester


class DFAModelTester(GPT2LikeModelTester):
    config_class = DFAConfig
    base_model_class = DFAModel
    causal_lm_class = DFAForCausalLM
    sequence_classification_class = DFAForSequenceClassification
    token_classification_class = DFAForTokenClassification
    question_answering_class = DFAForQuestionAnswering


@require_torch
class DFAModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = DFAModelTester
    test_missing_keys = False  # as upstream GPT2ModelTest
    model_split_percents = [0.5, 0.6, 0.7]  # as upstream GPT2ModelTest
