"""Bridged BERT -> GPT-2: a BERT encoder, a bridge (linear, GA or virtual population), and a GPT-2 decoder that
reads the bridged states through cross-attention, as one Hugging Face seq2seq model.

Parameter names are the stock ones: `encoder.*` is a BertModel (without its pooler), `decoder.transformer.*` and
`decoder.lm_head` a GPT2LMHeadModel with add_cross_attention=True. New are `bridge.*`, `controls.*` and, in each
decoder block, `crossattention.*` and `ln_cross_attn`. The cross-attention output projection
`crossattention.c_proj` starts at zero (STYLE.md rule 3), so at conversion each block adds 0 to its residual
stream and the decoder computes exactly what the stock GPT-2 computes on the same decoder input, whatever the
encoder input; training moves it away.

BERT and the bridge run once per generate() call (get_encoder()); the decoder caches its self- and
cross-attention keys/values in an EncoderDecoderCache. Labels follow transformers' EncoderDecoderModel: decoder
inputs are the labels shifted right behind decoder_start_token_id, with -100 replaced by pad_token_id.

transformers internals imported here (beyond its top-level API), on every release in hf_compat's range:
initialization, modeling_outputs.{BaseModelOutput, Seq2SeqLMOutput}; BertModel and GPT2LMHeadModel (with
add_cross_attention) are called by keyword. The cache's name differs between releases: hf_compat.CACHE_NAME.
"""

from dataclasses import dataclass

import torch
from transformers import BertModel, GenerationMixin, GPT2LMHeadModel, LogitsProcessorList, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from ..configuration.configuration_bridge import BridgeConfig
from .bridge_decoding import (
    AdaptiveLogitsProcessor,
    DecodingControls,
    expand_controls,
    likelihood_control_loss,
    prior_control_loss,
)
from .bridge_layers import BRIDGES, GABridge, PopulationBridge
from .gpt2_skeleton import checked_position_ids
from .hf_compat import cache_kwargs, cache_of, check_forward_kwargs, output_flags, pick_cache, returned
from .scalar_params import LegacyScalarsMixin

# The text2text-generation pipeline that config.json names (custom_pipelines) is part of this model's code: imported
# here, so that save_pretrained of a model loaded through trust_remote_code copies pipeline_bridge.py with this file
# (transformers copies a remote-code module and its relative imports; nothing else).
from .pipeline_bridge import BridgeText2TextPipeline  # noqa: F401


@dataclass
class BridgeEncoderOutput(BaseModelOutput):
    """last_hidden_state: the bridged states (B, L, D_dec), what cross-attention reads; hidden_states and attentions:
    BERT's, when asked for."""

    bert_last_hidden_state: torch.FloatTensor | None = None  # BERT's output, before the bridge (B, L, D_enc)
    temperature: torch.FloatTensor | None = None  # (B,) predicted decoding temperature, with config.controls
    top_k: torch.FloatTensor | None = None  # (B,) predicted top-k (continuous), with config.controls


@dataclass
class BridgeSeq2SeqLMOutput(Seq2SeqLMOutput):
    """loss = ce_loss + control_loss_weight * control_loss; encoder_last_hidden_state: the bridged states."""

    ce_loss: torch.FloatTensor | None = None
    control_loss: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None
    top_k: torch.FloatTensor | None = None


def shift_tokens_right(labels, pad_token_id, decoder_start_token_id):
    """Decoder inputs from labels: [start, y_0, ..., y_{T-2}], with -100 replaced by pad_token_id."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError("config.decoder_start_token_id and config.pad_token_id must be set to train with labels")
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


def decoder_mask_from_labels(labels):
    """1 for the start token and every position whose previous label is real (not -100).

    GPT-2 has no pad token, so pad_token_id is usually its eos id, which is also a real target: the mask is
    built from the -100 positions, never by comparing ids with pad_token_id.
    """
    mask = torch.ones_like(labels)
    mask[:, 1:] = (labels[:, :-1] != -100).long()
    return mask


class _BridgedEncoder:
    """What generate() calls once per batch: BERT, then the bridge (and the controls). Holds no weights itself."""

    main_input_name = "input_ids"

    def __init__(self, model):
        self.model = model

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=True):
        return self.model.encode(input_ids, attention_mask, token_type_ids, inputs_embeds,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states)

    __call__ = forward


class BridgePreTrainedModel(LegacyScalarsMixin, PreTrainedModel):
    config: BridgeConfig
    config_class = BridgeConfig
    base_model_prefix = "bridge_model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BertLayer", "GPT2Block"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # The new modules that training opens (the bridge, the decoding-control heads with one output each) stay float32
    # and unquantized under fp16, bf16 and bitsandbytes; encode() casts into and out of them. They hold nn.Linear
    # layers, so they are named in both lists: transformers' bitsandbytes quantizers leave unconverted only the
    # modules of _keep_in_fp32_modules, and bfloat16 loading keeps float32 only those of the strict list. `controls`
    # exists only with config.controls (__init__).
    _keep_in_fp32_modules = ["bridge"]
    _keep_in_fp32_modules_strict = ["bridge"]
    # The modules this architecture adds beyond those float32 lists (graftlm's converter counts both as new), and the
    # parameters that start them as the identity, which tests and bench open with noise. graftlm's registry reads
    # these two and the float32 lists; peft's modules_to_save is the strict float32 list.
    _new_modules_in_model_dtype = ["crossattention", "ln_cross_attn"]
    _identity_parameters = r"crossattention\.c_proj|^bridge\.|^controls\."

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if config.controls:
            self._keep_in_fp32_modules = [*self._keep_in_fp32_modules, "controls"]
            self._keep_in_fp32_modules_strict = [*self._keep_in_fp32_modules_strict, "controls"]

    @torch.no_grad()
    def initialize_weights(self):
        """transformers' init (Linear N(0, initializer_range), LayerNorm (1, 0); BERT's and GPT-2's own init in
        the sub-models), then the values the new modules start from. The transformers.initialization functions
        skip tensors already loaded from a checkpoint, so from_pretrained leaves them as saved."""
        super().initialize_weights()
        self.bridge.reset_parameters()
        if self.controls is not None:
            self.controls.reset_parameters()
        # Start as identity: zero cross-attention output, so each decoder block adds nothing at conversion.
        for block in self.decoder.transformer.h:
            init.zeros_(block.crossattention.c_proj.weight)
            init.zeros_(block.crossattention.c_proj.bias)


class BridgeForConditionalGeneration(BridgePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.encoder = BertModel(config.encoder, add_pooling_layer=False)
        self.bridge = BRIDGES[config.bridge_type](config)
        self.controls = DecodingControls(config) if config.controls else None
        self.decoder = GPT2LMHeadModel(config.decoder)
        # The sub-models read the shared sub-configs (as in EncoderDecoderModel), so one save holds one truth.
        self.config.encoder._attn_implementation = self.encoder.config._attn_implementation
        self.config.decoder._attn_implementation = self.decoder.config._attn_implementation
        self.encoder.config = self.config.encoder
        self.decoder.config = self.config.decoder
        self.post_init()

    def get_encoder(self, modality=None):
        return _BridgedEncoder(self)

    def get_decoder(self):
        return self.decoder

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.decoder.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(
            "resize the encoder or the decoder itself: model.encoder.resize_token_embeddings(...) or "
            "model.decoder.resize_token_embeddings(...)"
        )

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
               output_attentions=None, output_hidden_states=None):
        """BERT, then the bridge (and the controls): a BridgeEncoderOutput, what cross-attention reads."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds (the encoder input)")
        bert_kwargs = {k: v for k, v in (("output_attentions", output_attentions),
                                          ("output_hidden_states", output_hidden_states)) if v}
        bert = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds, return_dict=True, **bert_kwargs)
        bridged = self.bridge(bert.last_hidden_state.to(self.bridge.ln.weight.dtype))
        temperature = top_k = None
        if self.controls is not None:
            temperature, top_k = self.controls(bridged, attention_mask)
        return BridgeEncoderOutput(
            last_hidden_state=bridged.to(self.decoder.transformer.ln_f.weight.dtype),
            hidden_states=bert.hidden_states,
            attentions=bert.attentions,
            bert_last_hidden_state=bert.last_hidden_state,
            temperature=temperature,
            top_k=top_k,
        )

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_outputs=None, past_key_values=None, inputs_embeds=None,
                decoder_inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, logits_to_keep=0, num_items_in_batch=None, cache=None,
                **kwargs):
        """Seq2seq forward. `attention_mask` is the encoder's; it masks BERT and the decoder's cross-attention.

        labels: (B, T) target ids, -100 where ignored. Without decoder inputs, decoder_input_ids =
        shift_tokens_right(labels) and decoder_attention_mask = decoder_mask_from_labels(labels).
        loss = ce_loss + control_loss_weight * control_loss (ce_loss alone without controls).
        The decoder's cache comes as `cache` (transformers >= 5.24) or `past_key_values` (before) and is returned
        under the running release's name. Output flags left None come from the config; return_dict=False returns a
        tuple.
        """
        cache = pick_cache(cache, past_key_values)
        check_forward_kwargs(self, kwargs, ("position_ids", "decoder_position_ids", "cache_position"))
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, token_type_ids, inputs_embeds,
                                          output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = BridgeEncoderOutput(*encoder_outputs)
        use_cache = use_cache if use_cache is not None else (self.config.decoder.use_cache and not self.training)

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
            if decoder_attention_mask is None:
                decoder_attention_mask = decoder_mask_from_labels(labels)

        decoder_inputs = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
        if decoder_inputs is not None:  # stock GPT-2 indexes its position table unchecked: refuse a too-long input here
            checked_position_ids(decoder_inputs, 0 if cache is None else cache.get_seq_length(),
                                 self.config.decoder.n_positions)
        decoder_kwargs = {k: v for k, v in (("output_attentions", output_attentions),
                                            ("output_hidden_states", output_hidden_states)) if v}
        if kwargs.get("decoder_position_ids") is not None:
            decoder_kwargs["position_ids"] = kwargs["decoder_position_ids"]
        decoder = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **cache_kwargs(cache),
            **decoder_kwargs,
        )

        loss = ce_loss = control_loss = None
        if labels is not None:
            logits = decoder.logits.float()
            ce_loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            tokens = (labels != -100).sum()
            # Trainer passes the label count of the whole accumulated batch (num_items_in_batch) and then does not
            # average over accumulation steps: both terms are scaled by this micro-batch's share of the labels.
            share = 1.0 if num_items_in_batch is None else tokens / torch.as_tensor(num_items_in_batch, device=tokens.device).clamp_min(1)
            ce_loss = ce_loss / tokens.clamp_min(1)
            loss = ce_loss * share
            if self.controls is not None:
                control_loss = self.control_loss(decoder.logits, labels, encoder_outputs)
                loss = loss + self.config.control_loss_weight * control_loss * share

        output = BridgeSeq2SeqLMOutput(
            loss=loss,
            logits=decoder.logits,
            **cache_kwargs(cache_of(decoder)),
            decoder_hidden_states=decoder.hidden_states,
            decoder_attentions=decoder.attentions,
            cross_attentions=decoder.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            ce_loss=ce_loss,
            control_loss=control_loss,
            temperature=getattr(encoder_outputs, "temperature", None),
            top_k=getattr(encoder_outputs, "top_k", None),
        )
        return returned(output, return_dict)

    def control_loss(self, logits, labels, encoder_outputs):
        """The controls' objective. The decoder logits are detached: it trains the control heads (and, through
        them, the bridge and encoder), and leaves the language-model loss to ce_loss."""
        temperature, top_k = getattr(encoder_outputs, "temperature", None), getattr(encoder_outputs, "top_k", None)
        if temperature is None or top_k is None:
            raise ValueError("encoder_outputs carry no temperature/top_k: compute them with model.encode()")
        if self.config.control_objective == "prior":
            return prior_control_loss(temperature, top_k)
        return likelihood_control_loss(logits.detach(), labels, temperature, top_k, self.config.control_softness)

    def prepare_decoder_input_ids_from_labels(self, labels):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @torch.no_grad()
    def generate(self, inputs=None, *, adaptive_decoding=False, **kwargs):
        """transformers' generate(), plus `adaptive_decoding=True`: sample with each example's predicted temperature
        and top-k (config.controls), applied per row by AdaptiveLogitsProcessor. Sampling is the default then;
        temperature, top_k and top_p may not be passed alongside."""
        if not adaptive_decoding:
            return super().generate(inputs, **kwargs)
        if self.controls is None:
            raise ValueError("adaptive_decoding=True needs a model converted with controls (config.controls=True)")
        clashing = sorted(k for k in ("temperature", "top_k", "top_p") if kwargs.get(k) is not None)
        if clashing:
            raise ValueError(f"adaptive_decoding=True sets the temperature and top-k itself; do not pass {clashing}")
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        encoder_outputs = kwargs.pop("encoder_outputs", None)
        if encoder_outputs is not None:  # generate expands it in place: leave the caller's object as it was
            encoder_outputs = type(encoder_outputs)(**encoder_outputs)
        else:
            encoder_outputs = self.encode(input_ids, kwargs.get("attention_mask"), kwargs.get("token_type_ids"),
                                          kwargs.pop("inputs_embeds", None))
        config = kwargs.get("generation_config", self.generation_config)
        num_beams = kwargs.get("num_beams") or config.num_beams or 1
        num_return = kwargs.get("num_return_sequences") or config.num_return_sequences or 1
        temperature, top_k = expand_controls(encoder_outputs.temperature, encoder_outputs.top_k,
                                             max(num_beams, num_return))
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(AdaptiveLogitsProcessor(temperature, top_k))
        kwargs.setdefault("do_sample", True)
        return super().generate(input_ids, encoder_outputs=encoder_outputs, logits_processor=processors,
                                temperature=1.0, top_k=0, top_p=1.0, **kwargs)  # no other temperature/top-k


__all__ = [
    "BridgeEncoderOutput",
    "BridgeForConditionalGeneration",
    "BridgePreTrainedModel",
    "BridgeSeq2SeqLMOutput",
    "GABridge",
    "PopulationBridge",
]
