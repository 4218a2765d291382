"""Perplexity of a causal language model (any AutoModelForCausalLM folder or Hub id, GraftLM exports included) on
texts, every token scored as lm-evaluation-harness's rolling log-likelihood scores it. A local `evaluate` module: evaluate.load(graftlm.evaluation.metric_path("perplexity"))."""

import datasets
import evaluate

from graftlm.evaluation import causal_perplexity

_DESCRIPTION = ("exp(mean negative log-likelihood) of every token of each text under a causal LM, the first one "
                "predicted from the bos/eos token, in rolling windows (lm-evaluation-harness's loglikelihood_rolling).")
_INPUTS = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): model folder or Hub id.
    max_length (int, optional): window length in tokens (default: the model's n_positions).
    stride (int, optional): tokens each later window predicts (default: max_length, disjoint windows as lm-eval's);
        a smaller stride gives each predicted token up to max_length tokens of context.
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
