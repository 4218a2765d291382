"""GPT-2's three task heads (sequence classification, token classification, question answering) over a GraftLM
model built on GPT-2: the same module names (`transformer`, `score`, `classifier`, `qa_outputs`), pooling and losses
as transformers' GPT2ForSequenceClassification, GPT2ForTokenClassification and GPT2ForQuestionAnswering, so GPT-2's
head weights load into them. Exported with the modeling files that use them. An architecture declares each head as

    class XForSequenceClassification(SequenceClassificationHead, XPreTrainedModel):
        base_model_class = XModel

transformers internals imported here (beyond its top-level API), on every release in hf_compat's range:
modeling_outputs.{QuestionAnsweringModelOutput, SequenceClassifierOutputWithPast, TokenClassifierOutput}.
"""

import torch
from torch import nn
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

from .hf_compat import cache_kwargs, cache_of, output_flags, pick_cache, returned


class TaskHead:
    """A task head on `base_model_class` (mixed in before the architecture's PreTrainedModel): `_encode` runs the base
    model with the standard arguments, plus the architecture's `encode_kwargs`, and returns its output.

    With base_model_class None, the class mixed in after the head is the base model itself (the head keeps its
    parameter names, e.g. Scaffolded's base.* / scaffold.* / fusers.*) and its forward encodes."""

    base_model_class = None  # the architecture's base model (e.g. DFAModel), built as `transformer`
    encode_kwargs = {}  # extra base-model arguments of the architecture (e.g. DFA: no regulariser terms)
    passed_kwargs = ()  # the base model's own forward arguments a caller may give a head (e.g. scaffold_weight)
    frozen_parameters = ()  # name prefixes of base-model parameters a head never computes: frozen when built

    def __init__(self, config):
        super().__init__(config)
        if self.base_model_class is not None:
            self.transformer = self.base_model_class(config)
        for name, param in self.named_parameters():
            if name.startswith(self.frozen_parameters):
                param.requires_grad_(False)

    def _encode(self, input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                output_hidden_states, cache=None, use_cache=None, **kwargs):
        passed = {name: kwargs[name] for name in self.passed_kwargs if name in kwargs}
        encode = self.transformer if self.base_model_class is not None else super(TaskHead, self).forward
        return encode(
            input_ids=input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, **self.encode_kwargs, **passed,
        )


class SequenceClassificationHead(TaskHead):
    """Classifies each row by its last non-padding token (rightmost token that is not config.pad_token_id; the last
    token without a pad_token_id, which then allows one row only, or with inputs_embeds), as GPT-2 does."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                cache=None, return_dict=None, **kwargs):
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states, pick_cache(cache, past_key_values), use_cache, **kwargs)
        logits = self.score(out.last_hidden_state)
        batch, seq = logits.shape[:2]
        if self.config.pad_token_id is None and batch != 1:
            raise ValueError("classifying more than one row needs config.pad_token_id to find each row's last token")
        last = torch.full((batch,), seq - 1, device=logits.device)
        if self.config.pad_token_id is not None and input_ids is not None:
            not_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            last = (torch.arange(seq, device=logits.device, dtype=torch.int32) * not_pad).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, hidden_states=out.hidden_states, attentions=out.attentions,
            **cache_kwargs(cache_of(out)),
        )
        return returned(output, return_dict)


class TokenClassificationHead(TaskHead):
    """One label per token, after dropout of config.classifier_dropout (else 0.1), as GPT-2 does."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states, use_cache=False, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return returned(output, return_dict)


class QuestionAnsweringHead(TaskHead):
    """Start and end logits of an answer span per token (qa_outputs: hidden_size -> 2), as GPT-2 does."""

    def __init__(self, config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self._encode(input_ids, attention_mask, position_ids, inputs_embeds, output_attentions,
                           output_hidden_states, use_cache=False, **kwargs)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        output = QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return returned(output, return_dict)
