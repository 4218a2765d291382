"""The GPT-2 skeleton that GPT2-DFA and GPT2-BSBR are built on, and the pieces of it Scaffolded GPT-2 (whose base is a
stock GPT2Model) shares: exported with the modeling files that import it.

An architecture on this skeleton writes only its attention, its block's forward, its model's forward body and its
new modules:

    class XBlock(GPT2SkeletonBlock):                  ln_1, attn = attention_class(config, layer_idx), ln_2, mlp
        attention_class = XAttention
    class XPreTrainedModel(GPT2SkeletonPreTrainedModel):   GPT-2's init with residual scaling, shared declarations
    class XModel(GPT2SkeletonModel, XPreTrainedModel):     wte, wpe, drop, h (block_class), ln_f
        block_class = XBlock
    class XForCausalLM(GPT2SkeletonForCausalLM, XPreTrainedModel, GenerationMixin):   lm_head tied to wte, the loss
        base_model_class = XModel

Its attention subclasses GPT2SkeletonAttention. Its forward prologue reads its inputs with embedded_inputs,
cache_in_use and positions_after (checked_position_ids), dispatches attention through attention_function, and records hidden states and attention weights with transformers'
capture_outputs (a model whose blocks are stock GPT2Blocks beside others collects them itself: selected_hidden_states).

None of the input checks waits for the device (no host sync), so a decode step stays one graph under torch.compile:
lengths are checked on the host from shapes, and what only the device knows (explicit position_ids, the fill of a
static cache without an attention mask) with torch._assert_async, which raises at once on the CPU and as a
device-side assert on an accelerator.

transformers internals imported here (beyond its top-level API), on every release in hf_compat's range:
initialization, modeling_layers.GradientCheckpointingLayer, modeling_utils.{ALL_ATTENTION_FUNCTIONS,
slice_logits_to_keep}, models.gpt2.modeling_gpt2.GPT2MLP, pytorch_utils.Conv1D.
"""

import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D


def checked_position_ids(inputs_embeds, past_length, n_positions, attention_mask=None, position_ids=None):
    """Validate a forward's length and 2-D attention mask against GPT-2's position table; return position_ids.

    past_length: the cache's get_seq_length(), an int (DynamicCache) or a 0-d tensor (StaticCache counts on the
    device; then the 2-D mask, which spans cached + new tokens, gives the length on the host).
    Without position_ids, positions continue from the cache (0, 1, 2, ... as in stock GPT-2); generate() passes
    positions derived from the attention mask for left-padded batches, and packed (padding-free) rows restart them.
    The input's length must fit the table, except for packed rows, which only their positions bound.
    """
    seq = inputs_embeds.shape[1]
    mask_2d = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    if not isinstance(past_length, torch.Tensor):
        total = past_length + seq
        # Packed rows (position_ids with no mask and nothing cached, as DataCollatorWithFlattening lays them out) may
        # be longer than the table as long as each row's positions fit it.
        packed = position_ids is not None and attention_mask is None and past_length == 0
        if total > n_positions and not packed:
            raise ValueError(
                f"input of {total} positions ({past_length} cached + {seq} new) is longer than n_positions={n_positions}"
            )
        if mask_2d is not None and mask_2d.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {mask_2d.shape[1]} positions, expected {total} ({past_length} cached + {seq} new)"
            )
    elif mask_2d is not None:
        if mask_2d.shape[1] > n_positions:
            raise ValueError(
                f"attention_mask covers {mask_2d.shape[1]} positions (cached + new), longer than n_positions={n_positions}"
            )
    else:
        torch._assert_async(past_length + seq <= n_positions, f"input is longer than n_positions={n_positions}")
    if position_ids is None:
        return torch.arange(seq, device=inputs_embeds.device)[None, :] + past_length
    if position_ids.numel():
        torch._assert_async((position_ids < n_positions).all(), f"position_ids reach n_positions={n_positions}")
    return position_ids


def embedded_inputs(wte, input_ids, inputs_embeds):
    """The input embeddings: wte(input_ids), or inputs_embeds as given; exactly one of the two."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    return wte(input_ids) if inputs_embeds is None else inputs_embeds


def cache_in_use(config, training, cache, use_cache, new_cache):
    """The cache a forward reads and fills: None unless use_cache (default: config.use_cache outside training); the
    given one, else new_cache()."""
    use_cache = use_cache if use_cache is not None else (config.use_cache and not training)
    if not use_cache:
        return None
    return cache if cache is not None else new_cache()


def positions_after(cache, inputs_embeds, n_positions, attention_mask, position_ids):
    """(past_length, position_ids) of new tokens after a cache that counts its tokens on the host (DynamicCache; None:
    nothing cached), checked against GPT-2's position table (checked_position_ids)."""
    past_length = cache.get_seq_length() if cache is not None else 0
    return past_length, checked_position_ids(inputs_embeds, past_length, n_positions, attention_mask, position_ids)


def attention_function(config, eager, unset="eager"):
    """The attention function of config._attn_implementation (set_attn_implementation() changes it after loading):
    any function registered with transformers' attention interface (sdpa, flash, ...), and `eager`, the
    architecture's own explicit math, for "eager"; `unset` stands in where the config names none."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation or unset, eager)


class GPT2SkeletonAttention(nn.Module):
    """Base of an architecture's self-attention (self.config: its config): attention_interface() dispatches through
    transformers' attention interface.

    transformers' set_attn_implementation() decides from the source of the model's module whether the model
    dispatches that way: a module declaring an `...Attention(nn.Module)` class must contain the call
    `ALL_ATTENTION_FUNCTIONS.get_interface(`, or the switch is refused with a warning
    (PreTrainedModel._can_set_attn_implementation, 5.23 and 5.24). An attention subclassing this class is not such a
    declaration, and the dispatch it inherits is the one above."""

    def attention_interface(self, eager, unset="eager"):
        return attention_function(self.config, eager, unset)


def selected_hidden_states(all_hidden, output_hidden_states):
    """The hidden states asked for: all (True), none (False/None), or those at the given indices (a list, as
    transformers 5 reads output_hidden_states=[...]: the others are None; negative indices count from the end)."""
    if not output_hidden_states:
        return None
    if output_hidden_states is True:
        return tuple(all_hidden)
    keep = {i % len(all_hidden) for i in output_hidden_states}
    return tuple(h if i in keep else None for i, h in enumerate(all_hidden))


class GPT2SkeletonBlock(GradientCheckpointingLayer):
    """GPT-2's block modules under GPT-2's names: ln_1, attn (the architecture's attention_class(config, layer_idx)),
    ln_2, mlp (GPT2MLP). The architecture writes forward()."""

    attention_class = None

    def __init__(self, config, layer_idx):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = self.attention_class(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner_dim, config)
        for projection in (self.attn.c_proj, self.mlp.c_proj):
            projection.residual_projection = True  # scaled init (_init_weights)


class GPT2SkeletonPreTrainedModel(PreTrainedModel):
    """What every model on the skeleton declares as stock GPT-2 does, and GPT-2's initialisation. The architecture adds
    config_class, _no_split_modules, _can_record_outputs, its _keep_in_fp32_modules* and its new modules' init."""

    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Attention goes through ALL_ATTENTION_FUNCTIONS (attention_function), and a decode step with a static cache
    # traces as one graph under torch.compile.
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Conv1D):
            # GPT-2's scaled init of the residual projections (std / sqrt(2 * n_layer)), marked by the blocks: for
            # remote code, transformers initialises only modules holding parameters, so this happens at the leaf.
            scale = math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_projection", False) else 1.0
            init.normal_(module.weight, mean=0.0, std=std / scale)
            if module.bias is not None:
                init.zeros_(module.bias)


class GPT2SkeletonModel:
    """GPT2Model's modules under GPT-2's names (mixed in before the architecture's PreTrainedModel): wte, wpe, drop,
    h (n_layer block_class blocks), ln_f. The architecture adds its own modules, then calls post_init()."""

    block_class = None

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([self.block_class(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def embedded_positions(self, inputs_embeds, position_ids):
        """The first block's input, as GPT-2 computes it: dropout of token plus position embeddings."""
        return self.drop(inputs_embeds + self.wpe(position_ids))


class GPT2SkeletonForCausalLM:
    """GPT2LMHeadModel's head (mixed in before the architecture's PreTrainedModel, GenerationMixin last): the base
    model base_model_class as `transformer` and lm_head, tied to its wte."""

    base_model_class = None
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = self.base_model_class(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def base_outputs(self, input_ids, cache, attention_mask, position_ids, inputs_embeds, use_cache, output_attentions,
                     output_hidden_states, **base_kwargs):
        """The base model's ModelOutput for a causal-LM forward's arguments, plus the architecture's base_kwargs."""
        return self.transformer(
            input_ids=input_ids, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, **base_kwargs,
        )

    def lm_logits(self, hidden_states, logits_to_keep):
        """Logits of the positions logits_to_keep selects (0: all; n: the last n; or a 1-D tensor of indices)."""
        return self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

    def lm_loss(self, logits, labels, **kwargs):
        """transformers' causal-LM loss (labels shifted inside; kwargs: num_items_in_batch, ...); None without
        labels."""
        if labels is None:
            return None
        return self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
