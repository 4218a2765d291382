"""Loading any GraftLM (or stock) model folder with the right Auto class, and text generation from the CLI."""

import torch

from .inputs import check_model_folder, check_tokenizer


def load_model_and_tokenizer(name_or_path, trust_remote_code=False, **kwargs):
    """The model behind `name_or_path` (causal or seq2seq, from its config) in eval mode, and its tokenizer.

    Refuses, naming the folder: damaged weights or config (inputs.check_model_folder), a masked LM such as BERT
    (transformers would give it an untrained causal head), and a tokenizer that is missing or larger than the
    model's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    import graftlm  # noqa: F401  registers the GraftLM architectures with the Auto classes

    check_model_folder(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if masked and not config.is_encoder_decoder:
        raise ValueError(f"{name_or_path} is a masked language model ({config.model_type!r}), not a causal LM: it "
                         "neither generates text nor has a perplexity")
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    vocab_size = getattr(config.get_text_config(decoder=True), "vocab_size", None)
    check_tokenizer(tokenizer, vocab_size, f"the tokenizer of {name_or_path}")
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
