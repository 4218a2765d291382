"""Scaffolded GPT-2 (ScaffoldModel, ScaffoldForCausalLM and GPT-2's three task heads) under transformers'
ModelTesterMixin + GenerationTesterMixin (+ ConfigTester), set up as tests/models/gpt2/test_modeling_gpt2.py sets up
GPT-2 (see common.py).

Differences forced by the architecture (not by the harness's taste):
- the config is two GPT-2 sub-configs: base and scaffold are each the exact tiny GPT2Config that GPT-2's tester
  builds (hidden 32, 2 layers, 2 heads, vocab 99, pad/bos/eos 0/1/2); fusers after both base layers, fuser_heads=2;
  being a composite config, it goes through ConfigTester with has_text_modality=False, as transformers' tests of
  composite configs do (vocab_size lives in the sub-configs);
- the classes are named explicitly: the tester infers them from transformers' own namespace, where GraftLM's are not.
"""

import unittest

from transformers.testing_utils import require_torch

from graftlm.configuration.configuration_scaffold import ScaffoldConfig
from graftlm.modeling.modeling_scaffold import (
    ScaffoldForCausalLM,
    ScaffoldForQuestionAnswering,
    ScaffoldForSequenceClassification,
    ScaffoldForTokenClassification,
    ScaffoldModel,
)

from ..causal_lm_tester import CausalLMModelTest
from ..test_configuration_common import ConfigTester
from .common import GPT2LikeModelTester, tiny_gpt2_config
from .composite import ExposeTextConfigForGenerateChecks


class ScaffoldModelTester(GPT2LikeModelTester):
    config_class = ScaffoldConfig
    base_model_class = ScaffoldModel
    causal_lm_class = ScaffoldForCausalLM
    sequence_classification_class = ScaffoldForSequenceClassification
    token_classification_class = ScaffoldForTokenClassification
    question_answering_class = ScaffoldForQuestionAnswering

    def get_config(self):
        base = tiny_gpt2_config(self)
        scaffold = tiny_gpt2_config(self)
        return ScaffoldConfig(
            base_config=base,
            scaffold_config=scaffold,
            cross_attn_layers=list(range(self.num_hidden_layers)),
            fuser_heads=self.num_attention_heads,
        )


@require_torch
class ScaffoldModelTest(ExposeTextConfigForGenerateChecks, CausalLMModelTest, unittest.TestCase):
    model_tester_class = ScaffoldModelTester
    test_missing_keys = False  # as upstream GPT2ModelTest
    model_split_percents = [0.5, 0.6, 0.7]  # as upstream GPT2ModelTest

    def setUp(self):
        super().setUp()
        self.config_tester = ConfigTester(self, config_class=ScaffoldConfig, has_text_modality=False)
