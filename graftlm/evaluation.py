"""Perplexity of a causal LM on a text file, scored as lm-evaluation-harness scores it (rolling log-likelihood:
every token, the first one from an eos/bos prefix token, in rolling windows), and of a seq2seq model on pairs."""

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .inputs import check_model_folder, read_jsonl, read_text


def rolling_windows(num_tokens, max_length, stride):
    """(start, end, new) of each window over [prefix] + tokens: the model reads positions start..end-1 and its last
    `new` predictions score tokens end-new..end-1 (0-based, without the prefix). Every token is scored once.

    lm-evaluation-harness 0.4.13, lm_eval/utils.py: get_rolling_token_windows(tokens, prefix_token, max_seq_len,
    context_len) then make_disjoint_window, as HFLM.loglikelihood_rolling calls them (context_len=1). The first window
    reads the prefix and the first max_length - 1 tokens and scores all its max_length predictions; each later window
    reads the max_length positions before its end and scores its last `stride` predictions (lm-eval's pred_len =
    max_seq_len - context_len + 1, so stride = max_length is its context_len=1: disjoint windows, the first token of
    a window predicted from the one token before it).
    """
    end = min(max_length, num_tokens)
    windows = [(0, end, end)]
    while end < num_tokens:
        new = min(num_tokens - end, stride)
        end += new
        windows.append((end - max_length, end, new))
    return windows


@torch.no_grad()
def perplexity(model, input_ids, max_length, stride=None, prefix_token_id=None, progress=False):
    """(exp(mean NLL), number of tokens) of every token of `input_ids` (1-D LongTensor) under `model`, the first one
    predicted from `prefix_token_id`, in the windows of rolling_windows (stride default: max_length)."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    stride = max_length if stride is None else stride  # 0 is an error, not the default
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if input_ids.numel() < 1:
        raise ValueError("the text has no tokens")
    if prefix_token_id is None:
        raise ValueError("the first token is predicted from a prefix token: give the tokenizer's bos or eos id")
    device = next(model.parameters()).device
    sequence = torch.cat([input_ids.new_tensor([prefix_token_id]), input_ids]).to(device)
    total_nll = 0.0
    for start, end, new in tqdm(rolling_windows(input_ids.numel(), max_length, stride), desc="perplexity",
                                disable=not progress):
        logits = model(input_ids=sequence[None, start:end], use_cache=False).logits[0, -new:].float()
        total_nll += torch.nn.functional.cross_entropy(logits, sequence[end - new + 1 : end + 1], reduction="sum").item()
    return math.exp(total_nll / input_ids.numel()), input_ids.numel()


def causal_perplexity(name_or_path, texts, max_length=None, stride=None, trust_remote_code=False):
    """Perplexity of a causal LM on each text (every token, rolling windows) and over all of them (tokens pooled)."""
    from .inference import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if model.config.is_encoder_decoder:
        raise ValueError(f"{name_or_path} is an encoder-decoder model: score it with sources and targets")
    if not texts:
        raise ValueError("no texts to score")
    n_positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    max_length = n_positions if max_length is None else max_length
    if max_length > n_positions:
        raise ValueError(f"max_length={max_length} is longer than the n_positions={n_positions} of {name_or_path}")
    # lm-eval's prefix token: the tokenizer's bos, else its eos (HFLM.prefix_token_id).
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    perplexities, total_nll, total_tokens = [], 0.0, 0
    for text in tqdm(texts, desc="texts", disable=len(texts) < 2):
        ppl, tokens = perplexity(model, tokenizer(text, return_tensors="pt").input_ids[0], max_length, stride,
                                 prefix, progress=len(texts) == 1)
        perplexities.append(ppl)
        total_nll, total_tokens = total_nll + math.log(ppl) * tokens, total_tokens + tokens
    return {"perplexity": math.exp(total_nll / total_tokens), "perplexities": perplexities,
            "tokens_scored": total_tokens, "max_length": max_length, "stride": max_length if stride is None else stride}


@torch.no_grad()
def seq2seq_perplexity(name_or_path, sources, targets, trust_remote_code=False):
    """Perplexity of each target given its source under a seq2seq model (target tokens + eos scored, as in training)
    and over all pairs (tokens pooled). GraftLM exports keep the encoder's tokenizer in `encoder_tokenizer/`."""
    from .inference import load_encoder_tokenizer, load_model_and_tokenizer

    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    if not sources:
        raise ValueError("no source/target pairs to score")
    model, target_tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if not model.config.is_encoder_decoder:
        raise ValueError(f"{name_or_path} is not an encoder-decoder model: score it with texts")
    source_tokenizer = load_encoder_tokenizer(name_or_path, model, target_tokenizer)
    device = next(model.parameters()).device
    perplexities, total_nll, total_tokens = [], 0.0, 0
    for source, target in tqdm(list(zip(sources, targets)), desc="pairs", disable=len(sources) < 2):
        inputs = source_tokenizer(source, return_tensors="pt").to(device)
        labels = target_tokenizer(target, add_special_tokens=False, return_tensors="pt").input_ids
        labels = torch.cat([labels, torch.tensor([[target_tokenizer.eos_token_id]])], dim=1).to(device)
        logits = model(**inputs, labels=labels).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
        perplexities.append(math.exp(nll / labels.shape[1]))
        total_nll, total_tokens = total_nll + nll, total_tokens + labels.shape[1]
    return {"perplexity": math.exp(total_nll / total_tokens), "perplexities": perplexities,
            "tokens_scored": total_tokens}


def metric_path(name):
    """Folder of a local `evaluate` metric module shipped in graftlm/metrics: evaluate.load(metric_path(name))."""
    path = Path(__file__).parent / "metrics" / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no metric module {name!r} in {path.parent}")
    return str(path)


def read_pairs(pairs_file=None, sources_file=None, targets_file=None, src_field="src", tgt_field="tgt"):
    """(sources, targets) from a JSONL file with src/tgt fields, or from two files with one text per line. A file
    without pairs, a line that is not JSON, and a missing, empty or non-text source or target are errors naming the
    file and the record."""
    if (pairs_file is None) == (sources_file is None and targets_file is None):
        raise ValueError("give either a JSONL pairs file or both a sources and a targets file")
    if pairs_file is not None:
        records = [(number, r if isinstance(r, dict) else {}) for number, r in read_jsonl(pairs_file)]
        pairs = [(f"{pairs_file}, line {n}", r.get(src_field), r.get(tgt_field)) for n, r in records]
        fields = (repr(src_field), repr(tgt_field))
    else:
        if sources_file is None or targets_file is None:
            raise ValueError("--sources and --targets go together")
        sources, targets = read_text(sources_file).splitlines(), read_text(targets_file).splitlines()
        if len(sources) != len(targets):
            raise ValueError(f"{sources_file} has {len(sources)} lines but {targets_file} has {len(targets)}")
        pairs = [(f"line {n} of {sources_file} / {targets_file}", s, t)
                 for n, (s, t) in enumerate(zip(sources, targets), 1)]
        fields = ("source", "target")
    for where, *texts in pairs:
        for name, text in zip(fields, texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: the {name} is missing, empty or not text ({text!r})")
    return [s for _, s, _ in pairs], [t for _, _, t in pairs]


def evaluate_perplexity(name_or_path, text_file=None, max_length=None, stride=None, trust_remote_code=False,
                        pairs_file=None, sources_file=None, targets_file=None):
    """`graftlm eval`: perplexity through graftlm's evaluate metric modules; returns a JSON-ready dict.

    Causal LMs: every token of the UTF-8 `text_file`, in rolling windows (as lm-evaluation-harness scores it). Seq2seq models: targets given sources, from a JSONL
    `pairs_file` (src/tgt) or from `sources_file` + `targets_file` (one text per line)."""
    import evaluate
    from transformers import AutoConfig

    import graftlm  # noqa: F401  registers the GraftLM architectures

    check_model_folder(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    common = {"model_id": str(name_or_path), "trust_remote_code": trust_remote_code}
    if config.is_encoder_decoder:
        if text_file is not None or max_length is not None or stride is not None:
            raise ValueError("a seq2seq model is scored on --pairs or --sources/--targets, without --text, "
                             "--max-length or --stride")
        sources, targets = read_pairs(pairs_file, sources_file, targets_file)
        result = evaluate.load(metric_path("seq2seq_perplexity")).compute(sources=sources, targets=targets, **common)
        return {"model": str(name_or_path), "pairs": len(sources), **result}
    if text_file is None or pairs_file or sources_file or targets_file:
        raise ValueError("a causal LM is scored on --text (not --pairs/--sources/--targets)")
    text = read_text(text_file)
    result = evaluate.load(metric_path("perplexity")).compute(predictions=[text], max_length=max_length,
                                                                stride=stride, **common)
    return {"model": str(name_or_path), "text": str(text_file), **result}
