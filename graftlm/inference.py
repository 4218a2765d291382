"""Loading any GraftLM (or stock) model folder with the right Auto class, and text generation from the CLI."""

import torch


def load_model_and_tokenizer(name_or_path, trust_remote_code=False, **kwargs):
    """The model behind `name_or_path` (causal or seq2seq, from its config) in eval mode, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    import graftlm  # noqa: F401  registers the GraftLM architectures with the Auto classes

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_encoder_tokenizer(name_or_path, model, tokenizer):
    """The tokenizer of a seq2seq model's inputs: bridged exports keep their encoder's (BERT) tokenizer in
    encoder_tokenizer/; other seq2seq models share `tokenizer` between both sides."""
    from transformers import AutoTokenizer

    from .modeling.pipeline_bridge import ENCODER_TOKENIZER_SUBFOLDER

    try:
        return AutoTokenizer.from_pretrained(name_or_path, subfolder=ENCODER_TOKENIZER_SUBFOLDER)
    except OSError:
        if model.config.model_type == "bert_gpt2_bridge":
            raise ValueError(f"{name_or_path} has no {ENCODER_TOKENIZER_SUBFOLDER}/ folder: a bridged model reads its "
                             "input with its encoder's tokenizer") from None
        return tokenizer


def generate_text(name_or_path, prompts, max_new_tokens=40, seed=0, trust_remote_code=False, **generate_kwargs):
    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    encoder_tokenizer = tokenizer
    if model.config.is_encoder_decoder:
        encoder_tokenizer = load_encoder_tokenizer(name_or_path, model, tokenizer)
    inputs = encoder_tokenizer(list(prompts), return_tensors="pt", padding=True)
    if not generate_kwargs.get("do_sample"):
        for key in ("temperature", "top_k", "top_p"):
            generate_kwargs.pop(key, None)
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generate_kwargs
        )
    if not model.config.is_encoder_decoder:
        output = output[:, inputs["input_ids"].shape[1] :]
        return [p + t for p, t in zip(prompts, tokenizer.batch_decode(output, skip_special_tokens=True))]
    return tokenizer.batch_decode(output, skip_special_tokens=True)
