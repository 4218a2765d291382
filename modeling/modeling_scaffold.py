"""Scaffolded GPT-2: a frozen base GPT-2 that reads a LoRA-adapted scaffold GPT-2 through gated cross-attention.

The scaffold GPT-2 reads the prompt once; after each chosen base layer a fuser adds

    h <- h + scaffold_weight * influence * tanh(gate) * CrossAttn(q = LN(h), k, v = scaffold states)

(composition of a frozen anchor LM with an augmenting LM: CALM, Bansal et al. 2024, arXiv:2401.02412;
zero-initialised tanh gate: Flamingo, Alayrac et al. 2022, arXiv:2204.14198). The gate starts at 0, so a
converted model computes exactly what the base GPT-2 computed, and so does any model at scaffold_weight = 0.

Both GPT-2s keep their own parameter names (base.transformer.h.N.*, scaffold.transformer.h.N.*); the fusers
live in fusers.<layer>.*. The scaffold's tokens are aligned with the base's: scaffold token j sits at base
position j, and base position i reads scaffold tokens j <= i only, so the model stays a causal LM even when the
scaffold reads the whole input. Normally the scaffold reads the prompt, a prefix of the base's input; at
generation every new token reads the whole prompt, whose scaffold states are computed once and kept.

transformers internals imported here (beyond its top-level API), on every release in hf_compat's range:
cache_utils.DynamicCache, initialization, masking_utils.create_causal_mask, modeling_layers.GradientCheckpointingLayer,
modeling_outputs.CausalLMOutputWithPast, modeling_utils.slice_logits_to_keep (and gpt2_skeleton's),
models.gpt2.modeling_gpt2.eager_attention_forward, utils.{TransformersKwargs, cached_file}; GPT2LMHeadModel's
submodules (transformer.wte/wpe/drop/h/ln_f, GPT2Block called by keyword) and _gradient_checkpointing_func.
The cache's name differs between releases: hf_compat.CACHE_NAME.
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationMixin, GPT2LMHeadModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward
from transformers.utils import TransformersKwargs, cached_file

from ..configuration.configuration_scaffold import ScaffoldConfig
from .gpt2_heads import QuestionAnsweringHead, SequenceClassificationHead, TokenClassificationHead
from .gpt2_skeleton import (
    attention_function,
    cache_in_use,
    embedded_inputs,
    positions_after,
    selected_hidden_states,
)
from .hf_compat import cache_kwargs, check_forward_kwargs, output_flags, pick_cache, returned
from .scaffold_lora import (
    ADAPTER_SUBFOLDER,
    ADAPTER_WEIGHTS,
    attach_lora,
    load_adapter,
    lora_detached,
    lora_layers,
    merge_lora,
    save_adapter,
)

_HEAD_LAYERS = ("score", "classifier", "qa_outputs")  # the task heads' own layers (gpt2_heads)
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


@dataclass
class ScaffoldContext:
    """Scaffold states of one prompt and each fuser's projected keys/values: the static cross-attention cache."""

    states: torch.Tensor  # (batch, scaffold_len, scaffold n_embd)
    mask: torch.Tensor | None  # (batch, scaffold_len), 1 = real token
    source: object = None  # the tensor the states came from, to recognise later calls with the same inputs
    kv: dict = field(default_factory=dict)  # fuser layer -> (key, value), each (batch, heads, scaffold_len, head_dim)

    def for_batch(self, batch):
        """This context for `batch` rows: generate() repeats each prompt's row for beams and num_return_sequences
        (consecutive rows, repeat_interleave), and each prompt's scaffold states are repeated the same way."""
        rows = self.states.shape[0]
        if batch == rows:
            return self
        if batch % rows:
            raise ValueError(f"scaffold batch {rows} != input batch {batch}")
        repeat = batch // rows
        mask = None if self.mask is None else self.mask.repeat_interleave(repeat, 0)
        return ScaffoldContext(self.states.repeat_interleave(repeat, 0), mask, self.source)


@dataclass
class ScaffoldGeneration:
    """What one generate() call fixes for every forward it makes: the scaffold weight and the prompt's scaffold states.
    Held by the model while generate() runs, so that they are no model kwargs (which transformers would also hand to
    an assistant model, generate(..., assistant_model=...))."""

    weight: float
    context: ScaffoldContext | None  # None at scaffold_weight = 0


class ScaffoldFuser(GradientCheckpointingLayer):
    """Gated multi-head cross-attention from base states (queries) to scaffold states (keys and values)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        width, scaffold_width = config.base_config.n_embd, config.scaffold_config.n_embd
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False
        self.num_heads = config.fuser_heads
        self.head_dim = width // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.ln = nn.LayerNorm(width, eps=config.base_config.layer_norm_epsilon)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(scaffold_width, width)  # projects the scaffold's width onto the base's
        self.v_proj = nn.Linear(scaffold_width, width)
        self.o_proj = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0: no influence until training opens it

    def project(self, states):
        """Scaffold states (batch, len, scaffold width) -> keys and values, each (batch, heads, len, head_dim)."""
        batch, length, _ = states.shape
        k = self.k_proj(states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, hidden_states, states, attention_mask, has_key, weight, kv_cache=None):
        """hidden_states (batch, seq, width); states: the scaffold's (batch, scaffold_len, scaffold width);
        attention_mask additive (batch, 1, seq, scaffold_len); has_key (batch, seq): False where a position sees no
        scaffold token (its update is zeroed). kv_cache: {layer: (key, value)} kept across decoding steps (the
        projection runs here, inside forward, so that an FSDP-wrapped fuser projects with its gathered weights; it is
        kept only outside training, where gradient checkpointing re-runs this forward)."""
        batch, seq, width = hidden_states.shape
        kv = kv_cache.get(self.layer_idx) if kv_cache is not None else None
        if kv is None:
            kv = self.project(states.to(self.ln.weight.dtype))
            if kv_cache is not None and not self.training:
                kv_cache[self.layer_idx] = kv
        key, value = kv
        x = hidden_states.to(self.ln.weight.dtype)  # the fuser stays float32 under fp16/bf16 (_keep_in_fp32_modules)
        q = self.q_proj(self.ln(x)).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        attention_mask = attention_mask.to(q.dtype)
        attention = attention_function(self.config, eager_attention_forward)
        out, _ = attention(self, q, key, value, attention_mask, dropout=0.0, scaling=self.scaling)  # (b, seq, h, d)
        out = self.o_proj(out.reshape(batch, seq, width)) * has_key[..., None].to(out.dtype)
        return hidden_states + ((weight * self.config.influence) * torch.tanh(self.gate) * out).to(hidden_states.dtype)


class ScaffoldPreTrainedModel(PreTrainedModel):
    config: ScaffoldConfig
    config_class = ScaffoldConfig
    base_model_prefix = "base"  # the frozen base GPT-2 (model.base_model); checkpoints keep their full names
    _no_split_modules = ["GPT2Block", "ScaffoldFuser"]
    # The fusers (what training opens on top of the frozen base) stay float32 and unquantized under fp16, bf16 and
    # bitsandbytes, so that they train in full precision, also as peft modules_to_save over a 4-bit base. They hold
    # nn.Linear layers, so they are named in both lists: transformers' bitsandbytes quantizers leave unconverted only
    # the modules of _keep_in_fp32_modules, and bfloat16 loading keeps float32 only those of the strict list.
    _keep_in_fp32_modules = ["fusers"]
    _keep_in_fp32_modules_strict = ["fusers"]
    # The modules this architecture adds beyond those float32 lists (graftlm's converter counts both as new), and the
    # parameters that start them as the identity, which tests and bench open with noise. graftlm's registry reads
    # these two and the float32 lists; peft's modules_to_save is the strict float32 list.
    _new_modules_in_model_dtype = []
    _identity_parameters = r"^fusers\.\d+\.gate$"
    # Each GPT-2 ties its lm_head to its token embeddings, as GPT2LMHeadModel does.
    _tied_weights_keys = {
        "base.lm_head.weight": "base.transformer.wte.weight",
        "scaffold.lm_head.weight": "scaffold.transformer.wte.weight",
    }
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_attention_backend = True  # the base's blocks and the fusers dispatch through ALL_ATTENTION_FUNCTIONS
    _can_compile_fullgraph = True  # static cache: the decode step compiles to one graph
    supports_gradient_checkpointing = True  # GPT-2 blocks (base and scaffold) and fusers, transformers' mechanism

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, ScaffoldFuser):
            std = self.config.base_config.initializer_range
            for linear in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                init.normal_(linear.weight, mean=0.0, std=std)
                init.zeros_(linear.bias)
            init.ones_(module.ln.weight)
            init.zeros_(module.ln.bias)
            init.zeros_(module.gate)  # identity at conversion (Flamingo's tanh gate at 0)
        elif any(module is getattr(self, name, None) for name in _HEAD_LAYERS):
            # a task head's own layer, initialised as GPT-2 initialises its heads' (nn.Linear)
            init.normal_(module.weight, mean=0.0, std=self.config.base_config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


def _check_weight(scaffold_weight):
    weight = 1.0 if scaffold_weight is None else scaffold_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"scaffold_weight must be a number in [0, 1], got {scaffold_weight!r}")
    return float(weight)


def _cache_filled(past_length):
    """Whether the cache holds tokens: True or False, or None where it is not read. A static cache counts on the device
    (a tensor): reading it would sync the host and break a compiled graph, so while compiling it is not read (generate
    compiles the decode steps, whose cache holds the prompt's scaffold states)."""
    if isinstance(past_length, torch.Tensor) and torch.compiler.is_compiling():
        return None
    return bool(past_length > 0)


def _positions_from_mask(mask):
    """Position ids that skip padding: 0, 1, 2, ... over the real tokens of each row."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class ScaffoldModel(ScaffoldPreTrainedModel):
    """The base GPT-2 with the scaffold fused in; forward returns its final hidden states (AutoModel). Holds
    every weight ScaffoldForCausalLM holds, under the same names, so one checkpoint loads as either.

    Built from a config (random weights), every parameter that computes trains, as in any transformers model; the
    converter, from_pretrained, add_lora and merge_lora freeze the base (freeze_base), as peft freezes what it does not
    adapt. An lm_head that is not its GPT-2's token embeddings (untied) and never computes here (the scaffold's; the
    base's outside the causal LM) is frozen from the start, as transformers' tests expect of unused parameters."""

    _computes_base_lm_head = False  # ScaffoldForCausalLM: True


    def __init__(self, config):
        super().__init__(config)
        self.base = GPT2LMHeadModel(config.base_config)
        self.scaffold = GPT2LMHeadModel(config.scaffold_config)
        self.fusers = nn.ModuleDict({str(i): ScaffoldFuser(config, i) for i in config.cross_attn_layers})
        self._generating = None  # a ScaffoldGeneration while generate() runs
        self.post_init()
        self._freeze_unused_lm_heads()

    def _freeze_unused_lm_heads(self):
        gpt2s = [self.scaffold] if self._computes_base_lm_head else [self.scaffold, self.base]
        for gpt2 in gpt2s:
            if gpt2.lm_head.weight is not gpt2.transformer.wte.weight:
                gpt2.lm_head.requires_grad_(False)

    def get_input_embeddings(self):
        return self.base.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.base.transformer.wte = new_embeddings

    def get_output_embeddings(self):
        return self.base.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.base.lm_head = new_embeddings

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Resize the base's embeddings (transformers' resize) and the scaffold's to the same vocabulary: the scaffold
        reads the base's token ids."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.scaffold.resize_token_embeddings(embeddings.num_embeddings, mean_resizing=mean_resizing)
        self._freeze_unused_lm_heads()  # an untied lm_head is a new parameter now
        return embeddings

    def train(self, mode=True):
        super().train(mode)
        self.base.eval()  # the frozen base runs without dropout, as in the seed...
        for block in self.base.transformer.h:
            block.training = mode  # ...and its blocks still checkpoint (GradientCheckpointingLayer reads .training)
        return self

    # ----- LoRA on the scaffold -----

    def has_lora(self):
        return bool(lora_layers(self.scaffold))

    def add_lora(self):
        """Attach fresh LoRA adapters (config's r, alpha, dropout, targets) to the scaffold; B = 0: nothing changes."""
        attach_lora(self.scaffold, self.config)
        self.freeze_base()
        return self

    def merge_lora(self):
        """Fold the adapters into the scaffold's weights: plain GPT-2 names again, no peft needed to load."""
        merge_lora(self.scaffold)
        self.config.scaffold_adapter = None
        self.freeze_base()
        return self

    def freeze_base(self):
        """Only LoRA parameters, the fusers when config.train_fuser, and a task head's own layer (left as it is)
        require grad; the two GPT-2s' own weights do not. Returns the model."""
        for name, param in self.named_parameters():
            if name.startswith(("base.", "scaffold.")):
                param.requires_grad_(name.startswith("scaffold.") and ".lora_" in name)
            elif name.startswith("fusers."):
                param.requires_grad_(self.config.train_fuser)
        return self

    def gate_values(self):
        """{base layer: tanh(gate)} of every fuser."""
        return {int(i): torch.tanh(f.gate.detach()).item() for i, f in self.fusers.items()}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """With LoRA attached, the scaffold's plain weights go into the main checkpoint and the adapter, apart,
        into <save_directory>/scaffold_adapter (peft's format); from_pretrained attaches it again."""
        if not self.has_lora():
            self.config.scaffold_adapter = None
            return super().save_pretrained(save_directory, *args, **kwargs)
        for key in ("state_dict", "push_to_hub"):
            if kwargs.get(key):
                raise ValueError(f"save_pretrained({key}=...) is not supported with LoRA attached; merge_lora() first")
        self.config.scaffold_adapter = ADAPTER_SUBFOLDER
        with lora_detached(self.scaffold):
            result = super().save_pretrained(save_directory, *args, **kwargs)
        save_adapter(self.scaffold, self.config, f"{save_directory}/{ADAPTER_SUBFOLDER}")
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.scaffold_adapter:
            hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            prefix = f"{hub_kwargs.pop('subfolder')}/" if hub_kwargs.get("subfolder") else ""
            adapter_file = f"{prefix}{model.config.scaffold_adapter}/{ADAPTER_WEIGHTS}"
            weights = cached_file(pretrained_model_name_or_path, adapter_file, **hub_kwargs)
            attach_lora(model.scaffold, model.config)
            model.scaffold.to(next(model.base.parameters()).device)
            load_adapter(model.scaffold, weights)
        model.freeze_base()
        return loaded

    # ----- forward -----

    def scaffold_states(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None):
        """The scaffold GPT-2's final hidden states (after ln_f), (batch, len, scaffold n_embd).

        attention_mask: 2-D (positions then skip padding) or a custom 4-D mask; position_ids: packed sequences
        (padding-free batches) when there is no 2-D mask. inputs_embeds stand in for the scaffold's own token
        embeddings (they must have its width)."""
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        packed = position_ids is not None and attention_mask is None  # packed rows: only their positions are bounded
        if length > self.config.scaffold_config.n_positions and not packed:
            raise ValueError(
                f"the scaffold reads {length} tokens, more than its n_positions={self.config.scaffold_config.n_positions}"
            )
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.scaffold_config.n_embd:
            raise ValueError(
                f"inputs_embeds of width {inputs_embeds.shape[-1]} cannot stand in for the scaffold's token embeddings "
                f"(scaffold n_embd={self.config.scaffold_config.n_embd}): pass scaffold_input_ids or scaffold_states"
            )
        if attention_mask is not None and attention_mask.ndim == 2:
            position_ids = _positions_from_mask(attention_mask)
        out = self.scaffold.transformer(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def _scaffold_context(self, input_ids, inputs_embeds, attention_mask, position_ids, scaffold_input_ids,
                          scaffold_attention_mask, scaffold_states, cache, past_length, batch):
        if scaffold_states is not None and scaffold_input_ids is not None:
            raise ValueError("pass scaffold_input_ids or scaffold_states, not both")
        given = scaffold_states if scaffold_states is not None else scaffold_input_ids
        if given is None and self._generating is not None and self._generating.context is not None:
            # Inside generate(): the prompt's states, not model kwargs (those would reach an assistant model too).
            context = self._generating.context = self._generating.context.for_batch(batch)
            if cache is not None:
                cache.scaffold_context = context
            return context
        stored = getattr(cache, "scaffold_context", None)
        if stored is not None and _cache_filled(past_length) is not False:
            if given is not None and given is not stored.source:
                raise ValueError(
                    "the cache already holds the scaffold states of its prompt; pass new scaffold inputs "
                    "only with an empty cache"
                )
            return stored
        if scaffold_states is not None:
            states, mask = scaffold_states, scaffold_attention_mask
        elif scaffold_input_ids is not None:
            states, mask = self.scaffold_states(scaffold_input_ids, scaffold_attention_mask), scaffold_attention_mask
        else:
            if _cache_filled(past_length):
                raise ValueError("the cache holds no scaffold states: pass scaffold_input_ids or scaffold_states")
            # The scaffold reads the base's own input (with inputs_embeds: those embeddings in place of its own).
            mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
            states = self.scaffold_states(input_ids, attention_mask, inputs_embeds if input_ids is None else None,
                                          position_ids)
            given = input_ids if input_ids is not None else inputs_embeds
        if mask is not None and mask.shape != states.shape[:2]:
            raise ValueError(
                f"scaffold_attention_mask {tuple(mask.shape)} does not match the scaffold states "
                f"{tuple(states.shape[:2])}"
            )
        context = ScaffoldContext(states, mask, source=given)
        if cache is not None:
            cache.scaffold_context = context
        return context

    @staticmethod
    def _cross_mask(context, batch, seq, past_length, dtype, attention_mask=None, position_ids=None):
        """Additive mask (batch, 1, seq, scaffold_len): base position i reads real scaffold tokens j <= i (a custom
        4-D attention mask instead says which j each i reads; in a padding-free batch, the j of i's own sequence).
        Also (batch, seq): whether position i reads any scaffold token."""
        length = context.states.shape[1]
        device = context.states.device
        if attention_mask is not None and attention_mask.ndim == 4:
            keys = attention_mask[:, 0, -seq:, :length].to(device)
            visible = keys.bool() if keys.dtype == torch.bool else (keys == 0 if keys.is_floating_point() else keys != 0)
            visible = visible.expand(batch, seq, length)
        else:
            query_pos = torch.arange(seq, device=device) + past_length  # a tensor past_length stays on the device
            visible = torch.arange(length, device=device)[None, :] <= query_pos[:, None]  # (seq, scaffold_len)
            visible = visible[None].expand(batch, seq, length)
            if attention_mask is None and position_ids is not None and seq == length:
                # padding-free batch (packed sequences, no cache): a new sequence starts where positions do not step by 1
                packed = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
                visible = visible & (packed[:, :, None] == packed[:, None, :])
        if context.mask is not None:
            visible = visible & context.mask.bool()[:, None, :]
        additive = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
        return additive[:, None], visible.any(-1)

    def _fused_forward(self, input_ids, attention_mask, cache, position_ids, inputs_embeds, use_cache,
                       scaffold_input_ids, scaffold_attention_mask, scaffold_states, scaffold_weight,
                       output_attentions, output_hidden_states):
        """The base GPT-2 with the scaffold fused in: (last hidden state, hidden states, attentions, cache)."""
        if scaffold_weight is None and self._generating is not None:
            scaffold_weight = self._generating.weight
        gpt2, base_config = self.base.transformer, self.config.base_config
        ids_or_embeds = input_ids
        inputs_embeds = embedded_inputs(gpt2.wte, input_ids, inputs_embeds)
        weight = _check_weight(scaffold_weight)
        batch, seq = inputs_embeds.shape[:2]
        cache = cache_in_use(base_config, self.training, cache, use_cache, lambda: DynamicCache(config=base_config))
        given_positions = position_ids
        past_length, position_ids = positions_after(
            cache, inputs_embeds, base_config.n_positions, attention_mask, position_ids
        )

        context = cross_mask = has_key = None
        if weight > 0:
            context = self._scaffold_context(
                ids_or_embeds, inputs_embeds if ids_or_embeds is None else None, attention_mask, given_positions,
                scaffold_input_ids, scaffold_attention_mask, scaffold_states, cache, past_length, batch,
            )
            if context.states.shape[0] != batch:
                raise ValueError(f"scaffold batch {context.states.shape[0]} != input batch {batch}")
            cross_mask, has_key = self._cross_mask(
                context, batch, seq, past_length, inputs_embeds.dtype, attention_mask,
                given_positions if cache is None or _cache_filled(past_length) is False else None,
            )

        causal_mask = create_causal_mask(
            config=base_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
        )
        # GPT2Model.forward, with a fuser after each chosen block. The base's self-attention weights are read by hooks
        # (GPT2Block returns only its hidden states), as transformers' own output recording does.
        attentions = []
        hooks = [b.attn.register_forward_hook(lambda m, args, out: attentions.append(out[1])) for b in gpt2.h] \
            if output_attentions else []
        hidden_states = gpt2.drop(inputs_embeds + gpt2.wpe(position_ids))
        all_hidden = []
        try:
            for i, block in enumerate(gpt2.h):
                all_hidden.append(hidden_states)
                hidden_states = block(
                    hidden_states, attention_mask=causal_mask, use_cache=cache is not None, position_ids=position_ids,
                    **cache_kwargs(cache),
                )
                fuser = self.fusers[str(i)] if str(i) in self.fusers else None
                if fuser is not None and context is not None:
                    hidden_states = fuser(hidden_states, context.states, cross_mask, has_key, weight, context.kv)
        finally:
            for hook in hooks:
                hook.remove()
        hidden_states = gpt2.ln_f(hidden_states)
        all_hidden.append(hidden_states)
        return hidden_states, selected_hidden_states(all_hidden, output_hidden_states), tuple(attentions) or None, cache

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, position_ids=None, inputs_embeds=None,
                use_cache=None, scaffold_input_ids=None, scaffold_attention_mask=None, scaffold_states=None,
                scaffold_weight=None, output_attentions=None, output_hidden_states=None, return_dict=None, cache=None,
                **kwargs):
        """The base GPT-2's final hidden states with the scaffold fused in (arguments as ScaffoldForCausalLM.forward)."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        check_forward_kwargs(self, kwargs, TransformersKwargs.__optional_keys__)
        hidden, all_hidden, attentions, cache = self._fused_forward(
            input_ids, attention_mask, pick_cache(cache, past_key_values), position_ids, inputs_embeds, use_cache,
            scaffold_input_ids, scaffold_attention_mask, scaffold_states, scaffold_weight,
            output_attentions, output_hidden_states,
        )
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=all_hidden, attentions=attentions, **cache_kwargs(cache)
        )
        return returned(output, return_dict)


class ScaffoldForCausalLM(ScaffoldModel, GenerationMixin):
    _computes_base_lm_head = True

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, scaffold_input_ids=None, scaffold_attention_mask=None,
                scaffold_states=None, scaffold_weight=None, logits_to_keep=0, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache=None, **kwargs):
        """Causal-LM forward of the base GPT-2 with the scaffold fused in.

        scaffold_input_ids / scaffold_attention_mask: what the scaffold reads (default: input_ids itself; with
            inputs_embeds alone, those embeddings in place of the scaffold's own, which needs equal widths).
        scaffold_states: precomputed scaffold states instead, with scaffold_attention_mask. Without any of these,
            inside generate(), the prompt's states that generate() computed (repeated for beams) are read.
        scaffold_weight: in [0, 1], scales every fuser (default 1); 0 skips the scaffold and gives the base exactly.
        attentions (output_attentions): the base's self-attention weights per layer, as GPT-2 returns them.
        The cache comes as `cache` (transformers >= 5.24) or `past_key_values` (before) and is returned under the
        running release's name. Output flags left None come from the config; return_dict=False returns a tuple.
        """
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        check_forward_kwargs(self, kwargs, (*TransformersKwargs.__optional_keys__, "shift_labels"))
        hidden, all_hidden, attentions, cache = self._fused_forward(
            input_ids, attention_mask, pick_cache(cache, past_key_values), position_ids, inputs_embeds, use_cache,
            scaffold_input_ids, scaffold_attention_mask, scaffold_states, scaffold_weight,
            output_attentions, output_hidden_states,
        )
        logits = self.base.lm_head(slice_logits_to_keep(hidden, logits_to_keep))
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "shift_labels") if k in kwargs}
            loss = self.loss_function(logits, labels, vocab_size=self.config.base_config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=all_hidden, attentions=attentions, **cache_kwargs(cache)
        )
        return returned(output, return_dict)

    # ----- generation -----

    def generate(self, inputs=None, generation_config=None, scaffold_weight=None, truncate_repeats=None, **kwargs):
        """GenerationMixin.generate with the scaffold reading the prompt once.

        scaffold_weight: in [0, 1] (default 1), reaches every forward; 0 gives the base's own generations.
        truncate_repeats: n (the seed used 3) cuts each continuation before the first n-gram it repeats, filling
            the rest with the pad token; no_repeat_ngram_size and every other generate option pass through.
        scaffold_input_ids / scaffold_attention_mask (or scaffold_states): what the scaffold reads instead of the
            prompt. The states and the weight stay with the model while generate() runs (ScaffoldGeneration).
        """
        weight = _check_weight(scaffold_weight)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if truncate_repeats is not None and (isinstance(truncate_repeats, bool) or not isinstance(truncate_repeats, int)
                                             or truncate_repeats < 1):
            raise ValueError(f"truncate_repeats must be a positive integer n-gram size, got {truncate_repeats!r}")
        scaffold = [kwargs.pop(k, None) for k in ("scaffold_input_ids", "scaffold_attention_mask", "scaffold_states")]
        cache = pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        outer, self._generating = self._generating, None  # a generate() inside generate(): the model assists itself
        context = None  # no prompt (generate() starts from its bos token): the first forward reads that token
        if weight > 0:
            stored = getattr(cache, "scaffold_context", None)
            if stored is not None and all(x is None for x in scaffold) and cache.get_seq_length() > 0:
                context = stored  # continuing from a returned cache: the states of the prompt it started from
            elif input_ids is not None or kwargs.get("inputs_embeds") is not None or any(x is not None for x in scaffold):
                embeds = kwargs.get("inputs_embeds") if input_ids is None else None
                with torch.no_grad():
                    context = self._scaffold_context(input_ids, embeds, kwargs.get("attention_mask"), None, *scaffold,
                                                     None, 0, None)
        self._generating = ScaffoldGeneration(weight, context)
        try:
            output = super().generate(inputs, generation_config, **kwargs)
        finally:
            self._generating = outer
        if truncate_repeats is None:
            return output
        config = generation_config or self.generation_config
        pad_id = kwargs.get("pad_token_id", config.pad_token_id)
        pad_id = pad_id if pad_id is not None else kwargs.get("eos_token_id", config.eos_token_id)
        if isinstance(pad_id, (list, tuple)):
            pad_id = pad_id[0]
        if pad_id is None:
            raise ValueError("truncate_repeats needs a pad_token_id (or eos_token_id) to fill the cut continuations")
        prompt_length = input_ids.shape[1] if input_ids is not None else 0
        if isinstance(output, torch.Tensor):
            return truncate_repeated_ngrams(output, prompt_length, truncate_repeats, pad_id)
        output.sequences = truncate_repeated_ngrams(output.sequences, prompt_length, truncate_repeats, pad_id)
        return output


def truncate_repeated_ngrams(sequences, prompt_length, n, pad_id):
    """Cut each row's continuation (after `prompt_length`) before the first n-gram that already occurred in it."""
    sequences = sequences.clone()
    for row in sequences:
        continuation = row[prompt_length:].tolist()
        seen = set()
        for start in range(len(continuation) - n + 1):
            gram = tuple(continuation[start : start + n])
            if gram in seen:
                row[prompt_length + start :] = pad_id
                break
            seen.add(gram)
    return sequences


class ScaffoldTaskHead:
    """What GPT-2's task heads (gpt2_heads, mixed in after this) need over Scaffolded GPT-2: they are ScaffoldModels
    themselves (base_model_class None), so a ScaffoldForCausalLM checkpoint loads into them under the same names with
    only the head's layer new, and the scaffold's own arguments (scaffold_weight, scaffold_input_ids, ...) reach it."""

    passed_kwargs = ("scaffold_input_ids", "scaffold_attention_mask", "scaffold_states", "scaffold_weight")


class ScaffoldForSequenceClassification(ScaffoldTaskHead, SequenceClassificationHead, ScaffoldModel):
    """GPT2ForSequenceClassification's head on the fused final hidden states."""


class ScaffoldForTokenClassification(ScaffoldTaskHead, TokenClassificationHead, ScaffoldModel):
    """GPT2ForTokenClassification's head on the fused final hidden states."""


class ScaffoldForQuestionAnswering(ScaffoldTaskHead, QuestionAnsweringHead, ScaffoldModel):
    """GPT2ForQuestionAnswering's head on the fused final hidden states."""


__all__ = [
    "ScaffoldForCausalLM", "ScaffoldModel", "ScaffoldPreTrainedModel", "ScaffoldFuser", "ScaffoldForSequenceClassification",
    "ScaffoldForTokenClassification", "ScaffoldForQuestionAnswering",
]
