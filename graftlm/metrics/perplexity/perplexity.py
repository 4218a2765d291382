"""Perplexity of a causal language model (any AutoModelForCausalLM folder or Hub id, GraftLM exports included) on
texts, scored in strided windows. A local `evaluate` module: evaluate.load(graftlm.evaluation.metric_path("perplexity"))."""

import datasets
import evaluate

from graftlm.evaluation import causal_perplexity

_DESCRIPTION = "exp(mean negative log-likelihood) of each text's tokens under a causal LM, in strided windows."
_INPUTS = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): model folder or Hub id.
    max_length (int, optional): window length in tokens (default: the model's n_positions).
    stride (int, optional): window stride (default: max_length); each window scores only tokens not scored before.
    trust_remote_code (bool): load through the folder's own code.
Returns:
    perplexity (float, all tokens pooled), perplexities (list of float, one per text), tokens_scored, max_length, stride.
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, max_length=None, stride=None, trust_remote_code=False):
        return causal_perplexity(model_id, list(predictions), max_length=max_length, stride=stride,
                                 trust_remote_code=trust_remote_code)
