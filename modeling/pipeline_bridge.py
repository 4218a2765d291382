"""text2text-generation for the bridged BERT -> GPT-2 model, as a custom pipeline shipped with its export.

transformers 5 has no built-in text2text-generation pipeline. The export's config.json names this class under
`custom_pipelines`, so `pipeline("text2text-generation", model=folder, trust_remote_code=True)` loads it from the
folder. The source text is encoded with the encoder's (BERT) tokenizer from the folder's `encoder_tokenizer`
subfolder; the generated ids are decoded with the decoder's (GPT-2) tokenizer at the folder's root.
"""

from transformers import AutoTokenizer, Pipeline

ENCODER_TOKENIZER_SUBFOLDER = "encoder_tokenizer"
TASK = "text2text-generation"
# config.json `custom_pipelines` entry (written by the bridge converter; the export copies this file).
CUSTOM_PIPELINES = {TASK: {"impl": "pipeline_bridge.BridgeText2TextPipeline", "pt": ["AutoModelForSeq2SeqLM"],
                           "type": "text"}}


class BridgeText2TextPipeline(Pipeline):
    """pipeline(text or list of texts, max_new_tokens=..., **generate kwargs) -> [{"generated_text": str}] per text."""

    _load_tokenizer = True  # the decoder's tokenizer, from the folder's root
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(self, *args, encoder_tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None:
            raise ValueError("the text2text-generation pipeline needs the decoder (GPT-2) tokenizer")
        if encoder_tokenizer is None:
            encoder_tokenizer = AutoTokenizer.from_pretrained(self.model.name_or_path,
                                                              subfolder=ENCODER_TOKENIZER_SUBFOLDER)
        self.encoder_tokenizer = encoder_tokenizer

    def _sanitize_parameters(self, max_source_length=None, skip_special_tokens=None, **generate_kwargs):
        preprocess = {} if max_source_length is None else {"max_source_length": max_source_length}
        postprocess = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
        return preprocess, generate_kwargs, postprocess

    def preprocess(self, text, max_source_length=None):
        if not isinstance(text, str):
            raise TypeError(f"text2text-generation takes a string or a list of strings, got {type(text).__name__}")
        return self.encoder_tokenizer(text, return_tensors="pt", truncation=max_source_length is not None,
                                      max_length=max_source_length)

    def _forward(self, inputs, **generate_kwargs):
        pad = self.tokenizer.pad_token_id
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.eos_token_id if pad is None else pad)
        return {"output_ids": self.model.generate(**inputs, **generate_kwargs)}

    def postprocess(self, outputs, skip_special_tokens=True):
        texts = self.tokenizer.batch_decode(outputs["output_ids"], skip_special_tokens=skip_special_tokens)
        return [{"generated_text": text} for text in texts]
