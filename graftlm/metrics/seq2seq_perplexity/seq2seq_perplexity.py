"""Perplexity of each target given its source under a seq2seq model (bridged BERT -> GPT-2 or any
AutoModelForSeq2SeqLM). A local `evaluate` module:
evaluate.load(graftlm.evaluation.metric_path("seq2seq_perplexity"))."""

import datasets
import evaluate

from graftlm.evaluation import seq2seq_perplexity

_DESCRIPTION = "exp(mean negative log-likelihood) of the target tokens (plus eos) given the source, per pair and pooled."
_INPUTS = """
Args:
    sources (list of str): encoder inputs.
    targets (list of str): texts the decoder should produce.
    model_id (str): model folder or Hub id (GraftLM exports keep the encoder tokenizer in `encoder_tokenizer/`).
    trust_remote_code (bool): load through the folder's own code.
Returns:
    perplexity (float, all target tokens pooled), perplexities (list of float, one per pair), tokens_scored.
"""


class Seq2SeqPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"sources": datasets.Value("string"), "targets": datasets.Value("string")}),
        )

    def _compute(self, sources, targets, model_id, trust_remote_code=False):
        return seq2seq_perplexity(model_id, list(sources), list(targets), trust_remote_code=trust_remote_code)
