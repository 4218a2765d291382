"""Perplexity of a causal LM on a text file, in strided windows (the sliding-window method of the
transformers perplexity guide: each window scores only the tokens the previous window did not)."""

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, input_ids, max_length, stride=None, progress=False):
    """exp(mean NLL) of `input_ids` (1-D LongTensor) under `model`, scored in windows of `max_length`."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if input_ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    device = next(model.parameters()).device
    total_nll, total_tokens, previous_end = 0.0, 0, 0
    starts = range(0, input_ids.numel() - 1, stride)
    for start in tqdm(starts, desc="perplexity", disable=not progress):
        end = min(start + max_length, input_ids.numel())
        window = input_ids[start:end][None].to(device)
        labels = window.clone()
        labels[:, : max(previous_end - start, 0)] = -100  # tokens already scored by the previous window
        logits = model(input_ids=window, use_cache=False).logits.float()
        scored = labels[:, 1:] != -100
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][scored], labels[:, 1:][scored], reduction="sum")
        total_nll += nll.item()
        total_tokens += int(scored.sum())
        previous_end = end
        if end == input_ids.numel():
            break
    return math.exp(total_nll / total_tokens), total_tokens


def evaluate_perplexity(name_or_path, text_file, max_length=None, stride=None, trust_remote_code=False):
    """Perplexity of the model at `name_or_path` on a UTF-8 text file; returns a JSON-ready dict."""
    from .inference import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if model.config.is_encoder_decoder:
        raise ValueError(f"{name_or_path} is an encoder-decoder model; `graftlm eval` scores causal LMs")
    text = Path(text_file).read_text(encoding="utf-8")
    input_ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    max_length = max_length or n_positions
    if max_length > n_positions:
        raise ValueError(f"max_length={max_length} is longer than the model's n_positions={n_positions}")
    ppl, tokens = perplexity(model, input_ids, max_length, stride, progress=True)
    return {"model": str(name_or_path), "text": str(text_file), "max_length": max_length,
            "stride": stride or max_length, "tokens_scored": tokens, "perplexity": ppl}
