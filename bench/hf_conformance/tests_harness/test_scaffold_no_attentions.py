"""Scaffolded GPT-2 again, with `has_attentions = False` (what transformers' own tests set for models that return no
attention weights), so that the generate tests that ask for attentions run past that request.

Scaffolded GPT-2 returns the base's attention weights (test_scaffold.py runs those tests); this class repeats the
attention-dependent tests without that request. run.sh runs only the tests that depend on has_attentions here (see
NO_ATTN_K in run.sh).
"""

from transformers.testing_utils import require_torch

from . import test_scaffold as _scaffold


@require_torch
class ScaffoldNoAttentionsModelTest(_scaffold.ScaffoldModelTest):
    has_attentions = False
