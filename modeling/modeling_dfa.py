"""GPT2-DFA: GPT-2 with differentiable fuzzy attention.

Each attention layer keeps GPT-2's math and parameter names (c_attn, c_proj, ln_1, mlp, ...) and adds
- per-token soft gates over heads, g_t = H * softmax(W_g h_t + b) (c_gate; zero at conversion, so g = 1),
- learned per-head masks on the q, k and v dimensions, mask = 2 * sigmoid(logit) (logit 0 at conversion, so mask = 1),
- a gate-entropy regulariser whose weight lambda = exp(entropy_balance.log_weight) is tuned by dual ascent toward a
  target entropy, as Soft Actor-Critic tunes its temperature (Haarnoja et al. 2018, arXiv:1812.05905, eq. 18):
  aux = -sg(lambda) * H + lambda * (sg(H) - H_target), plus mask_sparsity_weight * mean(mask).
A converted model therefore computes exactly what the stock GPT-2 computed; training moves it away.
The masks and lambda live in small modules (HeadDimMasks, EntropyBalance) that are called, so peft's modules_to_save
can train them (it swaps in the adapter's copy of a module; a bare nn.Parameter would stay frozen).

GPT-2's modules, initialisation, input checks and tied head come from gpt2_skeleton.py.

transformers internals imported here (beyond its top-level API and gpt2_skeleton's), on every release in hf_compat's
range: cache_utils.DynamicCache, initialization, masking_utils.create_causal_mask,
modeling_outputs.{BaseModelOutputWithPast, CausalLMOutputWithPast}, models.gpt2.modeling_gpt2.eager_attention_forward,
pytorch_utils.Conv1D, utils.output_capturing.{OutputRecorder, capture_outputs}.
The cache's name differs between releases: hf_compat.CACHE_NAME.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward
from transformers.pytorch_utils import Conv1D
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..configuration.configuration_dfa import DFAConfig
from .gpt2_heads import QuestionAnsweringHead, SequenceClassificationHead, TokenClassificationHead
from .gpt2_skeleton import (
    GPT2SkeletonAttention, GPT2SkeletonBlock, GPT2SkeletonForCausalLM, GPT2SkeletonModel, GPT2SkeletonPreTrainedModel,
    cache_in_use, embedded_inputs, positions_after,
)
from .hf_compat import cache_kwargs, cache_of, output_flags, pick_cache, returned
from .scalar_params import LegacyScalarsMixin, scalar_parameter


@dataclass
class DFAModelOutput(BaseModelOutputWithPast):
    gate_entropy: torch.FloatTensor | None = None  # mean entropy of the head-gate distribution (nats)
    mask_mean: torch.FloatTensor | None = None  # mean value of all head-dimension masks
    active_dim_fraction: torch.FloatTensor | None = None  # share of head dimensions still open (no gradient)
    gates: tuple | None = None  # per layer (batch, seq or 1, heads kept): g = H * softmax(...), when output_gates


@dataclass
class DFACausalLMOutput(CausalLMOutputWithPast):
    ce_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    gate_entropy: torch.FloatTensor | None = None
    entropy_weight: torch.FloatTensor | None = None
    active_dim_fraction: torch.FloatTensor | None = None
    gates: tuple | None = None


class HeadDimMasks(nn.Module):
    """Mask logits of one layer's q, k and v head dimensions; forward() -> (q, k, v) masks 2 * sigmoid(logit) in
    (0, 2), each (heads, dims): 1 at conversion (logit 0)."""

    def __init__(self, num_heads, qk_dim, v_dim):
        super().__init__()
        self.q = nn.Parameter(torch.zeros(num_heads, qk_dim))
        self.k = nn.Parameter(torch.zeros(num_heads, qk_dim))
        self.v = nn.Parameter(torch.zeros(num_heads, v_dim))

    def forward(self):
        return tuple(2 * torch.sigmoid(m) for m in (self.q, self.k, self.v))


class EntropyBalance(nn.Module):
    """The gate-entropy weight, stored as its log so that it stays positive; forward() -> lambda = exp(log_weight), 0-D.
    log_weight has shape (1,), which FSDP and DeepSpeed can shard; checkpoints that stored it 0-D still load
    (scalar_params)."""

    def __init__(self, weight):
        super().__init__()
        self.log_weight = scalar_parameter(self, math.log(weight))

    def forward(self):
        return self.log_weight.exp().reshape(())


class HeadGate(nn.Module):
    """Head-gate logits W_g h + b over all original heads; zero-initialised, so g = H * softmax(0) = 1 at conversion.
    Not an nn.Linear, so quantizers (which replace nn.Linear layers) leave it as it is: float32 under bitsandbytes too."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, hidden_states):
        return F.linear(hidden_states, self.weight, self.bias)


class DFAAttention(GPT2SkeletonAttention):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.n_head = config.n_head
        heads = config.heads_of(layer_idx)
        self.num_heads = len(heads)
        self.qk_dim, self.v_dim = config.dims_of(layer_idx)
        self.split_sizes = (self.num_heads * self.qk_dim,) * 2 + (self.num_heads * self.v_dim,)
        # Scores keep GPT-2's scale 1/sqrt(n_embd / n_head) whatever prune() leaves of the head dimension.
        self.scaling = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)

        self.c_attn = Conv1D(sum(self.split_sizes), config.n_embd)
        self.c_proj = Conv1D(config.n_embd, self.num_heads * self.v_dim)
        self.c_gate = HeadGate(config.n_embd, config.n_head)  # logits over all original heads
        self.dim_masks = HeadDimMasks(self.num_heads, self.qk_dim, self.v_dim)
        self.kept_heads = heads  # original indices of the heads this layer keeps (all of them until prune())
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def gate_probs(self, hidden_states, first_token_index, cache):
        """Softmax over heads: (batch, seq, n_head) per token, or (batch, 1, n_head) per sequence.

        first_token_index: (batch,) the first real token of each row, or (batch, seq) each token's first token when
        rows pack several sequences."""
        # c_gate stays in float32 under quantization or half-precision loading (_keep_in_fp32_modules).
        hidden_states = hidden_states.to(self.c_gate.weight.dtype)
        if self.config.gate_mode == "token":
            return torch.softmax(self.c_gate(hidden_states).float(), dim=-1)
        if first_token_index.ndim == 2:  # packed rows: each token takes the gates of its own sequence's first token
            firsts = hidden_states.gather(1, first_token_index[..., None].expand(-1, -1, hidden_states.shape[-1]))
            return torch.softmax(self.c_gate(firsts).float(), dim=-1)
        stored = getattr(cache, "dfa_sequence_gates", {}) if cache is not None else {}
        if self.layer_idx in stored:
            return stored[self.layer_idx]
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        probs = torch.softmax(self.c_gate(hidden_states[rows, first_token_index]).float(), dim=-1)[:, None, :]
        if cache is not None:
            if not hasattr(cache, "dfa_sequence_gates"):
                cache.dfa_sequence_gates = {}
            cache.dfa_sequence_gates[self.layer_idx] = probs
        return probs

    def masked_qkv(self, hidden_states, masks):
        """c_attn with every q/k/v dimension scaled by its mask: (batch, seq, 3 parts) split as [q | k | v].

        (x W + b) * m == x (W * m) + b * m. Scaling W's columns costs n_embd x 3d, scaling the output tokens x 3d, so a
        plain Conv1D takes the masks into its weights when there are more tokens than input features (training, the
        prefill). A c_attn that is quantized, adapter-wrapped or hooked (bitsandbytes, PEFT, accelerate) runs as a
        module and its output is scaled."""
        mask = torch.cat([m.flatten() for m in masks])  # (3d,) in c_attn's column order
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        c_attn = self.c_attn
        if type(c_attn) is Conv1D and not hasattr(c_attn, "_hf_hook") and x.shape[0] > x.shape[1]:
            weight, bias = c_attn.weight, c_attn.bias
            qkv = torch.addmm(bias * mask.to(bias.dtype), x, weight * mask.to(weight.dtype))
        else:
            qkv = c_attn(x)
            qkv = qkv * mask.to(qkv.dtype)
        return qkv.view(*hidden_states.shape[:-1], -1).split(self.split_sizes, dim=-1)

    def forward(self, hidden_states, attention_mask, cache=None, first_token_index=None, **kwargs):
        batch, seq, _ = hidden_states.shape
        # The masks are returned too: the regulariser reads them from here, as FSDP holds a block's parameters
        # whole only during its forward.
        masks = self.dim_masks()  # (q, k, v), each (heads, dims)
        q, k, v = self.masked_qkv(hidden_states, masks)
        # (batch, heads, seq, dims)
        q = q.view(batch, seq, self.num_heads, self.qk_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_heads, self.qk_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_heads, self.v_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        out, weights = self.attention_interface(eager_attention_forward)(
            self, q, k, v, attention_mask, dropout=self.attn_dropout.p if self.training else 0.0, scaling=self.scaling
        )  # out: (batch, seq, heads, v_dim)

        probs = self.gate_probs(hidden_states, first_token_index, cache)
        kept = probs if self.num_heads == self.n_head else probs[..., self.kept_heads]
        gates = self.n_head * kept  # (batch, seq or 1, heads kept); entropy below uses all heads' probs
        out = out * gates[..., None].to(out.dtype)
        out = self.c_proj(out.reshape(batch, seq, self.num_heads * self.v_dim))
        return self.resid_dropout(out), weights, probs, gates, masks


class DFABlock(GPT2SkeletonBlock):
    attention_class = DFAAttention

    def forward(self, hidden_states, attention_mask=None, cache=None, first_token_index=None, **kwargs):
        attn_out, weights, probs, gates, masks = self.attn(
            self.ln_1(hidden_states), attention_mask, cache, first_token_index
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, weights, probs, gates, masks


class DFAPreTrainedModel(LegacyScalarsMixin, GPT2SkeletonPreTrainedModel):
    config: DFAConfig
    config_class = DFAConfig
    _no_split_modules = ["DFABlock"]
    # As stock GPT-2 declares them (GPT2SkeletonPreTrainedModel): any registered attention function (eager, sdpa, ...)
    # through ALL_ATTENTION_FUNCTIONS, masks from create_causal_mask (custom 4-D masks, packed rows restarting
    # position_ids), and a decode step that torch.compile traces as one graph with a static cache. Not flash
    # attention: prune() can leave q/k and v head dimensions of different sizes, and it is untested here (no GPU in CI).
    # What capture_outputs records in DFAModel.forward: each block's output (the first hidden state is the first
    # block's input; the last is replaced by ln_f's output) and each attention's weights (DFAAttention returns
    # (output, weights, gate probs, gates, masks)).
    _can_record_outputs = {"hidden_states": DFABlock, "attentions": OutputRecorder(DFAAttention, index=1)}
    # The head gates, the q/k/v mask logits and the entropy weight's log are tiny and scale whole heads or, through
    # exp(), the regulariser: they stay float32 under fp16 and bf16 (and no quantizer converts them: none is an
    # nn.Linear).
    _keep_in_fp32_modules_strict = ["c_gate", "dim_masks", "entropy_balance"]
    # The modules this architecture adds beyond those float32 lists (graftlm's converter counts both as new), and the
    # parameters that start them as the identity, which tests and bench open with noise. graftlm's registry reads
    # these two and the float32 lists; peft's modules_to_save is the strict float32 list.
    _new_modules_in_model_dtype = []
    _identity_parameters = r"attn\.(c_gate|dim_masks)\."

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # GPT-2's, with the residual projections scaled
        # Identity at conversion: uniform gates (g = 1) and masks of exactly 1. (transformers calls this only for
        # modules that hold parameters themselves, so each new module is initialised under its own class.)
        if isinstance(module, HeadGate):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, HeadDimMasks):
            for mask in (module.q, module.k, module.v):
                init.zeros_(mask)
        if isinstance(module, EntropyBalance):
            init.constant_(module.log_weight, math.log(self.config.entropy_weight_init))


class DFAModel(GPT2SkeletonModel, DFAPreTrainedModel):
    block_class = DFABlock

    def __init__(self, config):
        super().__init__(config)
        self.entropy_balance = EntropyBalance(config.entropy_weight_init)
        self.post_init()

    @capture_outputs
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, output_gates=None,
                output_regularizers=True, cache=None, **kwargs):
        """The cache comes as `cache` (transformers >= 5.24) or `past_key_values` (before).

        hidden_states and attentions are recorded by transformers' capture_outputs, as for stock GPT-2: from the call's
        output_hidden_states (True, or the indices of the states to keep) and output_attentions, else from the
        config; it also turns the output into a tuple under return_dict=False."""
        cache = pick_cache(cache, past_key_values)
        # Rows packing several sequences, position_ids restarting at each (create_causal_mask keeps them apart where
        # there is neither a mask nor a cache, for stock GPT-2 too).
        packed = position_ids is not None and attention_mask is None
        inputs_embeds = embedded_inputs(self.wte, input_ids, inputs_embeds)
        batch, seq = inputs_embeds.shape[:2]
        cache = cache_in_use(self.config, self.training, cache, use_cache, lambda: DynamicCache(config=self.config))
        past_length, position_ids = positions_after(
            cache, inputs_embeds, self.config.n_positions, attention_mask, position_ids
        )
        mask_2d = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        if mask_2d is not None:
            first_token_index = mask_2d.long().argmax(dim=1)
        elif packed and cache is None:  # each token's first token: its index less its position
            tokens = torch.arange(seq, device=inputs_embeds.device)
            first_token_index = (tokens - position_ids).clamp_min(0).expand(batch, seq)
        else:
            first_token_index = torch.zeros(batch, dtype=torch.long, device=inputs_embeds.device)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwargs(cache),
        )
        hidden_states = self.embedded_positions(inputs_embeds, position_ids)

        all_gates, entropies, all_masks = [], [], []
        for block in self.h:
            hidden_states, _, probs, gates, masks = block(hidden_states, causal_mask, cache, first_token_index, **kwargs)
            if output_regularizers:
                entropies.append(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1))  # (batch, seq or 1)
                all_masks.append(masks)
            all_gates.append(gates)
        hidden_states = self.ln_f(hidden_states)

        gate_entropy = mask_mean = active = None
        if output_regularizers:
            entropy = torch.stack(entropies)  # (layers, batch, seq or 1)
            if mask_2d is not None and entropy.shape[-1] == seq:
                real = mask_2d[:, -seq:].to(entropy.dtype)
                gate_entropy = (entropy * real).sum() / (real.sum() * len(self.h)).clamp_min(1)
            else:
                gate_entropy = entropy.mean()
            mask_mean = torch.cat([m.flatten() for masks in all_masks for m in masks]).mean()
            active = self.active_dim_fraction(all_masks)
        return DFAModelOutput(
            last_hidden_state=hidden_states,
            gate_entropy=gate_entropy,
            mask_mean=mask_mean,
            active_dim_fraction=active,
            gates=tuple(all_gates) if output_gates else None,
            **cache_kwargs(cache),
        )

    @torch.no_grad()
    def active_dim_fraction(self, masks=None):
        """Share of GPT-2's q.k and v head dimensions still open (mask product or mask >= mask_threshold); `masks`:
        each layer's (q, k, v) masks as its forward returned them (default: computed from the modules)."""
        threshold = self.config.mask_threshold
        masks = masks if masks is not None else [b.attn.dim_masks() for b in self.h]
        counts = [((q * k) >= threshold).sum() + (v >= threshold).sum() for q, k, v in masks]
        # summed on the masks' device: a training step waits for no per-layer count to reach the host
        return torch.stack(counts).sum() / (2 * self.config.n_layer * self.config.n_embd)


class DFAForCausalLM(GPT2SkeletonForCausalLM, DFAPreTrainedModel, GenerationMixin):
    base_model_class = DFAModel

    def target_entropy(self):
        return self.config.target_entropy_ratio * math.log(self.config.n_head)

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, output_gates=None,
                output_regularizers=None, logits_to_keep=0, cache=None, return_dict=None, **kwargs):
        """output_regularizers: compute the aux loss and its parts (default: when labels are given or in training;
        generate() skips them, so decoding pays nothing for the regulariser). The cache comes as `cache`
        (transformers >= 5.24) or `past_key_values` (before) and is returned under the running release's name.
        Output flags left None come from the config; return_dict=False returns a tuple."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        if output_regularizers is None:
            output_regularizers = labels is not None or self.training
        out = self.base_outputs(
            input_ids, pick_cache(cache, past_key_values), attention_mask, position_ids, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, output_gates=output_gates, output_regularizers=output_regularizers,
        )
        logits = self.lm_logits(out.last_hidden_state, logits_to_keep)

        aux_loss = entropy = weight = active = ce_loss = loss = None
        if output_regularizers:
            # Dual ascent on log(lambda): d aux / d log(lambda) = lambda * (H - H_target), so lambda rises while the
            # entropy is below target and falls while above; the model itself sees only -lambda * H.
            weight = self.transformer.entropy_balance()
            entropy = out.gate_entropy
            aux_loss = -weight.detach() * entropy + weight * (entropy.detach() - self.target_entropy())
            aux_loss = aux_loss + self.config.mask_sparsity_weight * out.mask_mean
            entropy, weight, active = entropy.detach(), weight.detach(), out.active_dim_fraction
        if labels is not None:
            ce_loss = loss = self.lm_loss(logits, labels, **kwargs)
            if aux_loss is not None:
                # Trainer passes num_items_in_batch (shifted labels of the accumulated batch on all processes) and
                # then averages neither over accumulation steps nor over processes, as ce_loss is already scaled:
                # weight the regulariser by this micro-batch's share of those labels.
                share = 1.0
                if kwargs.get("num_items_in_batch") is not None:
                    tokens = (labels[..., 1:] != -100).sum()
                    share = tokens / torch.as_tensor(kwargs["num_items_in_batch"], device=tokens.device).clamp_min(1)
                loss = ce_loss + aux_loss * share
        output = DFACausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            ce_loss=ce_loss,
            aux_loss=aux_loss,
            gate_entropy=entropy,
            entropy_weight=weight,
            active_dim_fraction=active,
            gates=out.gates,
            **cache_kwargs(cache_of(out)),
        )
        return returned(output, return_dict)

    @torch.no_grad()
    def prune(self, threshold=None, head_threshold=None, calibration_input_ids=None, calibration_attention_mask=None):
        """Remove closed head dimensions (and, with `head_threshold`, heads whose gates stay low), shrinking c_attn,
        c_proj and the masks. The new shapes go into the config, so the pruned model saves and loads.

        A q/k dimension is closed when its q mask * k mask < threshold in every head that drops it, a v dimension when
        its v mask < threshold. Heads are batched, so each layer keeps the same number of dimensions in every head:
        the largest number any head needs, each head keeping its highest-mask dimensions.
        A head is removed when its gate stays below `head_threshold` on every real token of the calibration batch;
        the gate softmax still runs over all original heads, so the remaining heads' gates are unchanged.
        Returns the number of parameters removed.
        """
        threshold = self.config.mask_threshold if threshold is None else threshold
        if head_threshold is not None and calibration_input_ids is None:
            raise ValueError("pruning heads needs calibration_input_ids to measure the gates on")
        keep_heads = [None] * self.config.n_layer
        if head_threshold is not None:
            out = self(
                input_ids=calibration_input_ids,
                attention_mask=calibration_attention_mask,
                output_gates=True,
                use_cache=False,
            )
            for i, gates in enumerate(out.gates):
                if calibration_attention_mask is not None and gates.shape[1] > 1:
                    gates = gates[calibration_attention_mask.bool()]
                peak = gates.reshape(-1, gates.shape[-1]).max(dim=0).values
                keep = (peak >= head_threshold).nonzero().flatten()
                keep_heads[i] = keep if len(keep) else peak.argmax().view(1)

        before = self.num_parameters()
        layer_heads, layer_qk, layer_v = [], [], []
        for i, block in enumerate(self.transformer.h):
            heads, qk, v = _prune_attention(block.attn, threshold, keep_heads[i])
            layer_heads.append(heads)
            layer_qk.append(qk)
            layer_v.append(v)
        self.config.layer_heads, self.config.layer_qk_dims, self.config.layer_v_dims = layer_heads, layer_qk, layer_v
        return before - self.num_parameters()


def _prune_attention(attn, threshold, keep_heads=None):
    """Shrink one DFAAttention in place; return (kept original head indices, qk dims, v dims)."""
    q_mask, k_mask, v_mask = attn.dim_masks()
    heads = torch.arange(attn.num_heads) if keep_heads is None else keep_heads.sort().values
    qk_score, v_score = (q_mask * k_mask)[heads], v_mask[heads]
    n_qk = max(1, int((qk_score >= threshold).sum(dim=1).max()))
    n_v = max(1, int((v_score >= threshold).sum(dim=1).max()))
    qk_idx = qk_score.topk(n_qk, dim=1).indices.sort(dim=1).values  # (heads kept, n_qk)
    v_idx = v_score.topk(n_v, dim=1).indices.sort(dim=1).values

    # Columns of c_attn (Conv1D weight is (in, out)) laid out as [q heads | k heads | v heads].
    q_cols = (heads[:, None] * attn.qk_dim + qk_idx).flatten()
    k_cols = q_cols + attn.num_heads * attn.qk_dim
    v_cols = (heads[:, None] * attn.v_dim + v_idx).flatten() + 2 * attn.num_heads * attn.qk_dim
    cols = torch.cat([q_cols, k_cols, v_cols])
    proj_rows = (heads[:, None] * attn.v_dim + v_idx).flatten()

    c_attn = Conv1D(len(cols), attn.c_attn.weight.shape[0]).to(attn.c_attn.weight)
    c_attn.weight.copy_(attn.c_attn.weight[:, cols])
    c_attn.bias.copy_(attn.c_attn.bias[cols])
    c_proj = Conv1D(attn.c_proj.weight.shape[1], len(proj_rows)).to(attn.c_proj.weight)
    c_proj.weight.copy_(attn.c_proj.weight[proj_rows])
    c_proj.bias.copy_(attn.c_proj.bias)
    attn.c_attn, attn.c_proj = c_attn, c_proj
    logits = attn.dim_masks
    attn.dim_masks = HeadDimMasks(len(heads), n_qk, n_v).to(logits.q)
    attn.dim_masks.q.copy_(logits.q[heads[:, None], qk_idx])
    attn.dim_masks.k.copy_(logits.k[heads[:, None], qk_idx])
    attn.dim_masks.v.copy_(logits.v[heads[:, None], v_idx])
    attn.kept_heads = [attn.kept_heads[h] for h in heads.tolist()]
    attn.num_heads, attn.qk_dim, attn.v_dim = len(heads), n_qk, n_v
    attn.split_sizes = (len(heads) * n_qk,) * 2 + (len(heads) * n_v,)
    return list(attn.kept_heads), n_qk, n_v


class DFATaskHead:
    """GPT-2's task heads on DFAModel, trained by the task loss alone: no gate-entropy or mask regulariser terms, so
    the entropy weight lambda takes no part and is frozen."""

    base_model_class = DFAModel
    encode_kwargs = {"output_regularizers": False}
    frozen_parameters = ("transformer.entropy_balance.",)


class DFAForSequenceClassification(DFATaskHead, SequenceClassificationHead, DFAPreTrainedModel):
    pass


class DFAForTokenClassification(DFATaskHead, TokenClassificationHead, DFAPreTrainedModel):
    pass


class DFAForQuestionAnswering(DFATaskHead, QuestionAnsweringHead, DFAPreTrainedModel):
    pass


__all__ = [
    "DFAForCausalLM",
    "DFAForQuestionAnswering",
    "DFAForSequenceClassification",
    "DFAForTokenClassification",
    "DFAModel",
    "DFAPreTrainedModel",
]
