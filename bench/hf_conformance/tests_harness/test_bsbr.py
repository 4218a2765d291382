"""GPT2-BSBR (BSBRModel, BSBRForCausalLM) under transformers' ModelTesterMixin + GenerationTesterMixin (+ ConfigTester),
set up as tests/models/gpt2/test_modeling_gpt2.py sets up GPT-2 (see common.py).

Only BSBR-specific setting: chunk_size=4 (default 128), so that the 7-token test inputs and the generate tests
cross chunk boundaries and exercise block retrieval; with chunk_size >= seq_length BSBR is plain causal attention.
"""

import unittest

from transformers.testing_utils import require_torch

from graftlm.configuration.configuration_bsbr import BSBRConfig
from graftlm.modeling.modeling_bsbr import (
    BSBRForCausalLM, BSBRForQuestionAnswering, BSBRForSequenceClassification, BSBRForTokenClassification, BSBRModel,
)

from ..causal_lm_tester import CausalLMModelTest
from .common import GPT2LikeModelTester


class BSBRModelTester(GPT2LikeModelTester):
    config_class = BSBRConfig
    base_model_class = BSBRModel
    causal_lm_class = BSBRForCausalLM
    sequence_classification_class = BSBRForSequenceClassification
    token_classification_class = BSBRForTokenClassification
    question_answering_class = BSBRForQuestionAnswering

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("chunk_size", 4)
        super().__init__(parent, **kwargs)


@require_torch
class BSBRModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = BSBRModelTester
    test_missing_keys = False  # as upstream GPT2ModelTest
    model_split_percents = [0.5, 0.6, 0.7]  # as upstream GPT2ModelTest

    # BSBR keeps the open chunk's keys/values only (completed chunks live as compressed states), so the generic
    # shape check (every past token) cannot apply; transformers' own tests override this check the same way for
    # models with their own cache formats (e.g. tests/models/qwen3_next, minicpm3).
    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """BSBR's own cache format: one layer per block, keys/values of the open chunk only."""
        self.assertEqual(len(past_key_values.layers), config.num_hidden_layers)
        self.assertEqual(int(past_key_values.get_seq_length()), seq_length)
        head_dim = config.hidden_size // config.num_attention_heads
        for layer in past_key_values.layers:
            for t in (layer.keys, layer.values):
                self.assertEqual((t.shape[0], t.shape[1], t.shape[3]), (batch_size, config.num_attention_heads, head_dim))
                self.assertLessEqual(t.shape[2], config.chunk_size)

    def test_custom_4d_attention_mask(self):
        self.skipTest("GPT2-BSBR counts chunks over each row's real tokens from a 2-D attention_mask: no custom 4-D masks")
