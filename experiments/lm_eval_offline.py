"""`graftlm eval` next to lm-evaluation-harness's own command line, offline, on the same documents.

Writes a local lm-eval task (rolling log-likelihood over a JSON-lines file, one document a line: the task the README
shows), runs `lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True --log_samples` on each export,
and prints lm-eval's token perplexity (exp of minus its summed per-document log-likelihoods over the documents'
tokens) beside graftlm's, with their relative difference.

    python experiments/lm_eval_offline.py EXPORT [EXPORT ...] [--documents 3] [--chars 1500]

The documents are the English text that ships with Python (graftlm.offline.offline_text), cut into --documents pieces
of --chars characters, so that each spans several windows of a 128-position test model.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TASK = """task: graftlm_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def lm_eval_token_perplexity(export, task_dir, out_dir):
    """Run the lm_eval command on `export`; return (token perplexity, tokens) from its logged samples."""
    from transformers import AutoTokenizer

    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={export},trust_remote_code=True", "--include_path", str(task_dir), "--tasks",
               "graftlm_text", "--device", "cpu", "--batch_size", "1", "--log_samples", "--output_path", str(out_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    log_likelihood, tokens = 0.0, 0
    for samples in Path(out_dir).rglob("samples_graftlm_text_*.jsonl"):
        for line in samples.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            log_likelihood += float(sample["filtered_resps"][0])
            tokens += len(tokenizer(sample["target"]).input_ids)
    return math.exp(-log_likelihood / tokens), tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("exports", nargs="+", help="exported causal-LM folders (DFA, BSBR, Scaffolded, stock GPT-2)")
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--chars", type=int, default=1500)
    args = parser.parse_args()

    from graftlm.offline import offline_text
    from graftlm.evaluation import causal_perplexity

    text = offline_text()
    documents = [text[i * args.chars : (i + 1) * args.chars] for i in range(args.documents)]
    with tempfile.TemporaryDirectory(prefix="lm-eval-offline-") as work:
        data = Path(work) / "documents.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
        (Path(work) / "graftlm_text.yaml").write_text(TASK.format(data=data), encoding="utf-8")
        for i, export in enumerate(args.exports):
            theirs, tokens = lm_eval_token_perplexity(export, work, Path(work) / f"out{i}")
            ours = causal_perplexity(export, documents, trust_remote_code=True)
            print(json.dumps({"export": export, "tokens": tokens, "graftlm_tokens": ours["tokens_scored"],
                              "lm_eval_perplexity": theirs, "graftlm_perplexity": ours["perplexity"],
                              "relative_difference": ours["perplexity"] / theirs - 1}))


if __name__ == "__main__":
    main()
