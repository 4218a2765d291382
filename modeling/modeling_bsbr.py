"""GPT2-BSBR: GPT-2 with causal block-sparse attention and block retrieval.

Each layer keeps GPT-2's parameters and names (c_attn, c_proj, ln_1, mlp, ...). With chunk size B, token t of chunk i
computes, per head,
    local_t     = softmax(q_t K_i[<=t]^T * scaling) V_i[<=t]          GPT-2's attention inside its own chunk only
    retrieved_t = phi(q_t) S_i / (phi(q_t) . u_i + eps)               S_i = sum_{j<i} P_ij F_j,  u_i = sum_{j<i} P_ij z_j
    out_t       = local_t + g * retrieved_t                           g: per-head gate, 0 at conversion
with, per completed chunk j, the state F_j = phi(K_j)^T V_j (state_dim x head_dim), the normaliser z_j = sum_t phi(k_t),
the chunk key H_j = meta_h_proj(mean of chunk j's layer inputs) and, for chunk i, the meta-query
R_i = meta_r_proj(mean of chunk i-1's layer inputs): P_i = softmax_{j<i}(R_i . H_j / sqrt(head_dim)).
phi(x) = elu(x) + 1 (linear attention, Katharopoulos et al. 2020, arXiv:2006.16236): positive, so the normaliser is
positive, and smooth with a non-zero gradient everywhere. With compression_factor c, keys and queries pass through
a learned head_dim -> head_dim / c projection before phi.

Chunks are counted over each row's real tokens (attention_mask == 1), so a left-padded row is chunked exactly like
the same row without padding; a row packing several sequences (position_ids that do not continue by one, without a
mask or a cache: transformers' padding-free layout) gives each sequence chunks of its own and retrieval from its own
chunks only, so each gets what it would get alone (TokenLayout). No n x n tensor is built: the local term is a
(batch, heads * n_chunks, B, B) SDPA, the retrieval term costs O((n/B)^2 * heads * state_dim * head_dim).

GPT-2's modules, initialisation, input checks and tied head come from gpt2_skeleton.py.

transformers internals imported here (beyond its top-level API and gpt2_skeleton's), on every release in hf_compat's
range: initialization, modeling_outputs.{BaseModelOutputWithPast, CausalLMOutputWithPast}, pytorch_utils.Conv1D,
utils.output_capturing.{OutputRecorder, capture_outputs}, and cache_utils (bsbr_cache.py). The cache's name differs
between releases: hf_compat.CACHE_NAME.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..configuration.configuration_bsbr import LAYER_TYPE, BSBRConfig
from .bsbr_cache import BSBRCache, prefill_state
from .gpt2_heads import QuestionAnsweringHead, SequenceClassificationHead, TokenClassificationHead
from .gpt2_skeleton import (
    GPT2SkeletonAttention, GPT2SkeletonBlock, GPT2SkeletonForCausalLM, GPT2SkeletonModel, GPT2SkeletonPreTrainedModel,
    cache_in_use, checked_position_ids, embedded_inputs, positions_after,
)
from .hf_compat import cache_kwargs, cache_of, output_flags, pick_cache, returned


class TokenLayout(NamedTuple):
    """Where the tokens of a forward sit in the chunked computation: each row's layout holds its real tokens first
    (left padding moved to the end), or, for packed rows, each sequence from the start of a chunk of its own. Blocks
    read their input through compact() and return it in input order through restore(); layer norms and MLPs act per
    token, so only the chunking sees the layout. Decoding with a filled cache keeps the input order (place None)."""

    slots: torch.Tensor  # (b, L) long: the input position of each layout slot (0 for a slot holding no token)
    valid: torch.Tensor  # (b, L) bool: the slot holds a real token
    holds: torch.Tensor  # (b, L) bool: the slot holds an input token (real or padding)
    place: torch.Tensor | None  # (b, n) long: the layout slot of each input token; None: the input order
    segments: torch.Tensor | None  # (b, L) long: the packed sequence of each slot; None: one sequence per row

    @classmethod
    def decoding(cls, real, past_length):
        """New tokens after a filled cache, in input order; real (b, T) bool."""
        slots = (past_length + torch.arange(real.shape[1], device=real.device)).expand(real.shape)
        return cls(slots, real, torch.ones_like(real), None, None)

    @classmethod
    def compacted(cls, real):
        """Each row's real tokens first, in order (real (b, n) bool). The same ops whatever the data (no branch on
        it), so torch.compile and torch.export trace it."""
        slots = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        return cls(slots, real.gather(1, slots), torch.ones_like(real), slots.argsort(1), None)

    @classmethod
    def packed(cls, position_ids, chunk):
        """Rows packing sequences: a sequence starts wherever position_ids do not continue by one (as transformers'
        masking_utils.find_packed_sequence_indices reads them), and each starts a chunk, the slots after its last
        token left empty. The layout's length depends on the data: one host synchronisation."""
        b, n = position_ids.shape
        index = torch.arange(n, device=position_ids.device).expand(b, n)
        starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
        first = torch.where(starts, index, 0).cummax(-1).values  # each token's sequence start
        ends = F.pad(starts[:, 1:], (0, 1), value=True)  # each sequence's last token
        empty = torch.where(ends, (first - index - 1) % chunk, 0)  # slots left empty after it
        place = index + empty.cumsum(-1) - empty
        length = int((n + empty.sum(-1)).max())
        slots = index.new_zeros(b, length).scatter_(1, place, index)
        holds = torch.zeros(b, length, dtype=torch.bool, device=index.device).scatter_(1, place, True)
        return cls(slots, holds, holds, place, starts.cumsum(-1).gather(1, slots))

    def compact(self, x):
        """(b, n, ...) in input order -> (b, L, ...) in the layout."""
        return x if self.place is None else x.gather(1, self.slots[..., None].expand(*self.slots.shape, x.shape[-1]))

    def restore(self, x):
        """(b, L, ...) in the layout -> (b, n, ...) in input order."""
        return x if self.place is None else x.gather(1, self.place[..., None].expand(*self.place.shape, x.shape[-1]))


def feature_map(x, name):
    """phi: a positive feature map, so phi(q) . z > 0."""
    return F.elu(x) + 1 if name == "elu+1" else F.softplus(x)


def block_average(head_dim, factor):
    """(head_dim / factor, head_dim) weight averaging each run of `factor` consecutive dimensions."""
    weight = torch.zeros(head_dim // factor, head_dim)
    for row in range(head_dim // factor):
        weight[row, row * factor : (row + 1) * factor] = 1.0 / factor
    return weight


class KeyCompression(nn.Module):
    """head_dim -> head_dim / c projection of keys and queries before phi, initialised to average each run of c
    consecutive dimensions (block_average). Not an nn.Linear, so quantizers (which replace nn.Linear layers) leave it
    as it is: the retrieval path reads its weight in float32."""

    def __init__(self, head_dim, factor):
        super().__init__()
        self.in_features, self.out_features = head_dim, head_dim // factor
        self.weight = nn.Parameter(block_average(head_dim, factor))

    def forward(self, x):
        return F.linear(x, self.weight)


class RetrievalGate(nn.Module):
    """Per-head gate g of the retrieval term; forward() -> g, (n_head,), 0 at conversion. A module that attention
    calls, so that peft's modules_to_save can train it (it swaps in the adapter's copy of a module)."""

    def __init__(self, n_head):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_head))

    def forward(self):
        return self.weight


def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The local term's explicit math, in transformers' attention-interface convention: query/key/value
    (b, heads, tokens, d), attention_mask bool (True: may read) or None for causal -> (out (b, tokens, heads, d),
    weights). `scaling` is the module's own (BSBRAttention.scaling)."""
    weights = module._weights(query, key, attention_mask)
    out = F.dropout(weights, p=dropout, training=module.training) @ value
    return out.transpose(1, 2), weights


class BSBRAttention(GPT2SkeletonAttention):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.head_dim, self.chunk = config.n_head, config.head_dim, config.chunk_size
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.meta_r_proj = Conv1D(config.n_embd, config.n_embd)  # chunk meta-queries R
        self.meta_h_proj = Conv1D(config.n_embd, config.n_embd)  # chunk keys H
        self.retrieval_gate = RetrievalGate(config.n_head)  # g, one per head
        factor = config.compression_factor or 1
        self.compress_proj = KeyCompression(self.head_dim, factor) if factor > 1 else None
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _heads(self, x):
        """(..., n_embd) -> (..., heads, head_dim), heads moved before the token/chunk axis: (b, h, ..., d)."""
        x = x.view(*x.shape[:-1], self.n_head, self.head_dim)
        return x.movedim(-2, 1)

    def _features(self, x):
        """phi(compress(x)) in float32: (..., head_dim) -> (..., state_dim)."""
        x = x.float()
        if self.compress_proj is not None:
            x = F.linear(x, self.compress_proj.weight.float())
        return feature_map(x, self.config.feature_map)

    def _meta(self, summary, dtype):
        """Chunk summaries (b, ..., n_embd) -> meta-queries R and chunk keys H, each (b, h, ..., head_dim), float32.
        The projections run as modules on inputs of the activations' `dtype`, so they also work quantized."""
        summary = summary.to(dtype)
        return self._heads(self.meta_r_proj(summary).float()), self._heads(self.meta_h_proj(summary).float())

    def _attend(self, q, k, v, mask=None, need_weights=False):
        """Softmax attention of q over k/v (b, heads, tokens, d), causal where `mask` (True: may read) is None:
        (out, weights or None), by the config's attn_implementation (eager_attention_forward, or transformers'
        "sdpa"), or explicit math whenever the weights are wanted (output_attentions)."""
        attend = eager_attention_forward
        if not need_weights:
            attend = self.attention_interface(eager_attention_forward, unset="sdpa")
        dropout = self.attn_dropout.p if self.training else 0.0
        out, weights = attend(self, q, k, v, mask, dropout=dropout, scaling=self.scaling, is_causal=mask is None)
        return out.transpose(1, 2), weights

    def _weights(self, q, k, mask=None):
        """Explicit softmax weights of q over k (causal where `mask`, True: may read, is None)."""
        if mask is None:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-1, -2)) * self.scaling
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)

    def forward(self, hidden_states, layout, layer_state=None, output_attentions=False):
        """hidden_states (b, T, n_embd) in the TokenLayout `layout`: without a filled cache, the chunked layout; with
        one, the new tokens in input order, decoded one by one. layout.slots (b, T): each token's position among all
        input slots (cached ones included), where output_attentions places the local weights: (out, weights
        (b, heads, input tokens, slots so far) or None)."""
        valid, slots = layout.valid, layout.slots
        q, k, v = (self._heads(t) for t in self.c_attn(hidden_states).split(self.config.n_embd, dim=2))
        if layer_state is not None and layer_state.initialized:
            static = layer_state.is_compileable  # a static layer: weights span its slots, as GPT-2's do
            length = layer_state.max_cache_len if static else layer_state.seen + hidden_states.shape[1]
            steps = []
            for t in range(hidden_states.shape[1]):
                layer_state.record_step()
                steps.append(self._decode_step(hidden_states[:, t], q[:, :, t], k[:, :, t], v[:, :, t], valid[:, t],
                                               slots[:, t], layer_state, output_attentions, length))
            out = torch.stack([o for o, _ in steps], dim=2)  # (b, h, T, d)
            weights = torch.stack([w for _, w in steps], dim=2) if output_attentions else None
        else:
            out, weights = self._chunked(hidden_states, q, k, v, layout, layer_state, output_attentions)
        if layer_state is not None:
            layer_state.seen += hidden_states.shape[1]
        out = self.c_proj(out.transpose(1, 2).contiguous().view(hidden_states.shape))  # Conv1D views its input
        return self.resid_dropout(out), weights

    def _chunked(self, x, q, k, v, layout, layer_state, output_attentions):
        """All chunks at once, in the chunked layout: each row's real tokens first (valid is a prefix of each row) or,
        packed, each sequence from a chunk's start."""
        b, h, n, d = q.shape
        chunk = self.chunk
        n_chunks = -(-n // chunk) + (1 if layer_state is not None and n % chunk == 0 else 0)  # room for the open chunk
        pad = n_chunks * chunk - n
        valid, slots, holds, segments = layout.valid, layout.slots, layout.holds, layout.segments
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            x, valid, slots, holds = (F.pad(x, (0, 0, 0, pad)), F.pad(valid, (0, pad)), F.pad(slots, (0, pad)),
                                      F.pad(holds, (0, pad)))
            segments = None if segments is None else F.pad(segments, (0, pad), value=-1)
        n_tokens = layout.place.shape[1]  # input tokens

        # Local term: causal softmax attention inside each chunk, chunks folded into the head axis.
        fold = (b, h * n_chunks, chunk, d)
        weights = None
        if output_attentions:  # explicit math, reading real queries' weights back from the returned tensor (_placed)
            weights, chunk_weights = self._placed(self._weights(q.reshape(fold), k.reshape(fold)), valid, slots,
                                                  holds, n_tokens)
            local = self.attn_dropout(chunk_weights) @ v.reshape(fold)
        else:
            local, _ = self._attend(q.reshape(fold), k.reshape(fold), v.reshape(fold))
        local = local.reshape(b, h, n_chunks, chunk, d)

        # Retrieval term, float32. Padded slots get zero features, so they enter no state or normaliser.
        mask = valid.view(b, 1, n_chunks, chunk, 1).float()
        kf = self._features(k).view(b, h, n_chunks, chunk, -1) * mask  # (b, h, C, B, s)
        vf = v.float().view(b, h, n_chunks, chunk, d)
        states = kf.transpose(-1, -2) @ vf  # F_j: (b, h, C, s, d)
        norms = kf.sum(-2)  # z_j: (b, h, C, s)
        x_sums = (x.float() * valid[..., None]).view(b, n_chunks, chunk, -1).sum(2)  # (b, C, n_embd)
        counts = valid.view(b, n_chunks, chunk).sum(-1, keepdim=True).clamp_min(1)
        meta_r, meta_h = self._meta(x_sums / counts, x.dtype)  # (b, h, C, d): R from chunk a serves chunk a + 1
        scores = meta_r @ meta_h.transpose(-1, -2) / math.sqrt(d)  # (b, h, C, C): row a scores chunks j <= a
        future = torch.ones(n_chunks, n_chunks, dtype=torch.bool, device=q.device).triu(1)
        if segments is None:
            probs = scores.masked_fill(future, torch.finfo(scores.dtype).min).softmax(-1)  # row a = P_{a+1}
        else:  # packed: chunk a + 1 reads the earlier chunks of its own sequence only (a sequence's first, none)
            seg = segments.view(b, n_chunks, chunk)[..., 0]  # each chunk's sequence (a chunk never spans two)
            readable = ~future & (seg[:, None, :] == F.pad(seg[:, 1:], (0, 1), value=-1)[:, :, None])
            readable = readable[:, None]  # (b, 1, C, C)
            probs = scores.masked_fill(~readable, torch.finfo(scores.dtype).min).softmax(-1) * readable
        s_next = (probs @ states.flatten(-2)).view_as(states)  # S_{a+1}
        u_next = probs @ norms
        s_all = F.pad(s_next, (0, 0, 0, 0, 1, 0))[:, :, :n_chunks]  # S_i: chunk 0 reads nothing
        u_all = F.pad(u_next, (0, 0, 1, 0))[:, :, :n_chunks]
        qf = self._features(q).view(b, h, n_chunks, chunk, -1)
        numer = qf @ s_all  # (b, h, C, B, d)
        denom = (qf @ u_all[..., None]) + self.config.retrieval_eps  # (b, h, C, B, 1)
        retrieved = numer / denom

        gate = self.retrieval_gate().view(1, h, 1, 1, 1)
        # reshape, not view: on CUDA, SDPA's output can be laid out so that chunks and slots do not merge into a view
        out = (local + gate.to(local.dtype) * retrieved.to(local.dtype)).reshape(b, h, n_chunks * chunk, d)[:, :, :n]

        if layer_state is not None:
            record = dict(kf=kf, vf=vf, kc=k.view(b, h, n_chunks, chunk, d), vc=v.view(b, h, n_chunks, chunk, d),
                          xc=x.float().view(b, n_chunks, chunk, -1), pc=slots.view(b, n_chunks, chunk), states=states,
                          norms=norms, meta_h=meta_h, s_all=s_all, u_all=u_all)
            static = layer_state.is_compileable  # a static layer
            layer_state.set(**prefill_state(record, valid.sum(1), layer_state.capacity(chunk) if static else None))
            if static:
                layer_state.seen = layer_state.seen.to(q.device)
            if layer_state.record_past:  # crop() may roll back into this prefill
                layer_state.prefill = dict(record, valid=valid)
        return out, weights

    @staticmethod
    def _placed(weights, valid, slots, holds, n):
        """Chunk-local weights (b, h * C, B, B) of the layout's slots -> (placed, used): placed (b, h, n, n) in input
        order, zero outside each query's chunk, and the chunk-local weights to compute with, in which every real
        query's row is read back from `placed` (the same values), so that the returned weights are part of the
        output's graph as GPT-2's are (a gradient reaches them: retain_grad). slots (b, C * B): each slot's input
        position; holds (b, C * B): which slots hold an input token (the rows of the others are dropped); valid
        (b, C * B): which hold a real token."""
        b, folded, chunk, _ = weights.shape
        n_chunks = slots.shape[1] // chunk
        h = folded // n_chunks
        weights = weights.view(b, h, n_chunks, chunk, chunk)
        keys = slots.view(b, 1, n_chunks, 1, chunk).expand_as(weights)
        by_key = weights.new_zeros(b, h, n_chunks, chunk, n).scatter_add_(4, keys, weights).flatten(2, 3)
        by_key = by_key * holds[:, None, :, None]  # drop the rows of slots holding no token
        queries = slots[:, None, :, None].expand_as(by_key)
        placed = weights.new_zeros(b, h, n, n).scatter_add_(2, queries, by_key)
        rows = placed.gather(2, slots.clamp_max(n - 1)[:, None, :, None].expand(b, h, n_chunks * chunk, n))
        back = rows.gather(3, keys.reshape(b, h, n_chunks * chunk, chunk))
        back = back * holds.view(b, 1, n_chunks, 1, chunk).expand_as(weights).reshape(back.shape)  # empty keys: 0
        used = torch.where(valid[:, None, :, None], back, weights.flatten(2, 3))
        return placed, used.view(b, folded, chunk, chunk)

    def _decode_step(self, x, q, k, v, real, slot, st, output_attentions, length):
        """One token per row: x (b, n_embd), q/k/v (b, h, d), real (b,) bool, slot (b,) its input position. Updates
        the layer state: the key/value buffers in place (only the slot past the valid ones), every other tensor
        through BSBRLayer.advance. Returns (out (b, h, d), weights (b, h, length) over input slots or None)."""
        b, h, d = q.shape
        chunk = self.chunk
        fill_bound = None if st.is_compileable else st.fill_bound  # before this token (advance() replaces it)
        slot_index = st.fill.view(b, 1, 1, 1).expand(b, h, 1, d)
        st.k_buf.scatter_(2, slot_index, k[:, :, None])  # in place: the cache owns its buffers (no copy per step)
        st.v_buf.scatter_(2, slot_index, v[:, :, None])
        st.p_buf.scatter_(1, st.fill[:, None], slot[:, None])
        filled = torch.arange(chunk, device=q.device) <= st.fill[:, None]  # (b, B): slots up to this token's
        local, weights = self._attend(q[:, :, None], st.k_buf, st.v_buf, filled[:, None, None, :], output_attentions)
        local = local[:, :, 0]  # (b, h, d)
        if weights is not None:  # (b, h, 1, B) over the open chunk's slots -> (b, h, length) over input slots
            keys = st.p_buf.clamp_max(length - 1)[:, None, :].expand(b, h, chunk)
            weights = weights.new_zeros(b, h, length).scatter_add_(2, keys, weights[:, :, 0])

        qf = self._features(q)  # (b, h, s)
        denom = (qf * st.u_cur).sum(-1, keepdim=True) + self.config.retrieval_eps
        retrieved = (qf[:, :, None] @ st.s_cur)[:, :, 0] / denom
        out = local + self.retrieval_gate().view(1, h, 1).to(local.dtype) * retrieved.to(local.dtype)

        keep = real.float()
        kf = self._features(k) * keep.view(b, 1, 1)
        st.advance(f_run=st.f_run + kf[..., None] * v.float()[:, :, None, :], z_run=st.z_run + kf,
                   x_run=st.x_run + x.float() * keep[:, None], fill=st.fill + real.long())
        completed = st.fill == chunk
        if st.is_compileable:  # a static layer
            self._close_chunks_static(st, completed, x.dtype)
        elif fill_bound is not None and fill_bound + 1 < chunk:  # no row can have completed a chunk: no host sync
            st.fill_bound = fill_bound + 1
        else:  # a chunk may have completed: one host synchronisation (once per chunk_size steps when all are real)
            closing, needed, fill_max = torch.stack((completed.any().long(), (st.chunks + completed.long()).max(),
                                                     torch.where(completed, 0, st.fill).max())).tolist()
            if closing:
                self._close_chunks(st, completed, x.dtype, needed)
            st.fill_bound = fill_max
        return out, weights

    def _retrieval_state(self, f_store, z_store, h_store, meta_r, chunks):
        """(S, u) of the chunk after `chunks` completed ones: P = softmax over the stored chunk keys of R . H_j."""
        slots = torch.arange(f_store.shape[2], device=chunks.device)
        scores = (h_store @ meta_r[..., None])[..., 0] / math.sqrt(self.head_dim)  # (b, h, capacity)
        readable = (slots[None, :] < chunks[:, None])[:, None, :]
        probs = scores.masked_fill(~readable, torch.finfo(scores.dtype).min).softmax(-1) * readable
        s_new = (probs[:, :, None, :] @ f_store.flatten(-2))[:, :, 0].view(*f_store.shape[:2], *f_store.shape[3:])
        return s_new, (probs[:, :, None, :] @ z_store)[:, :, 0]

    @staticmethod
    def _open_next_chunk(st, completed, s_new, u_new, chunks):
        """Rows that completed a chunk start the next one: its retrieval state, empty running sums."""
        sel = completed.view(-1, 1, 1)
        st.advance(
            s_cur=torch.where(sel[..., None], s_new, st.s_cur), u_cur=torch.where(sel, u_new, st.u_cur),
            f_run=torch.where(sel[..., None], 0.0, st.f_run), z_run=torch.where(sel, 0.0, st.z_run),
            x_run=torch.where(completed[:, None], 0.0, st.x_run), fill=torch.where(completed, 0, st.fill),
            chunks=chunks,
        )

    def _close_chunks_static(self, st, completed, dtype):
        """_close_chunks for a static layer, run at every step without a host synchronisation: each row writes its
        completed chunk into its store slot (itself again where none completed) in place, a constant cost; the
        retrieval refresh, linear in the stored chunks, runs only at steps where a chunk completes (torch.cond when
        compiled)."""
        b = completed.shape[0]
        meta_r, meta_h = self._meta(st.x_run / self.chunk, dtype)  # (b, h, d)
        slot = st.chunks.clamp_max(st.f_store.shape[2] - 1)
        for store, new in ((st.f_store, st.f_run), (st.z_store, st.z_run), (st.h_store, meta_h)):
            trailing = [1] * (store.ndim - 3)
            index = slot.view(b, 1, 1, *trailing).expand(b, store.shape[1], 1, *store.shape[3:])
            keep = store.gather(2, index)
            store.scatter_(2, index, torch.where(completed.view(b, 1, 1, *trailing), new[:, :, None], keep))
        chunks = st.chunks + completed.long()
        operands = (st.f_store, st.z_store, st.h_store, meta_r, chunks, st.s_cur, st.u_cur)
        refresh = lambda f, z, h, r, c, s, u: self._retrieval_state(f, z, h, r, c)  # noqa: E731
        unchanged = lambda f, z, h, r, c, s, u: (s.clone(), u.clone())  # noqa: E731
        if torch.compiler.is_compiling():  # no branch on the data in the graph; the state updates in place (advance)
            s_new, u_new = torch.cond(completed.any(), refresh, unchanged, operands)
        else:
            s_new, u_new = (refresh if bool(completed.any()) else unchanged)(*operands)
        self._open_next_chunk(st, completed, s_new, u_new, chunks)

    def _close_chunks(self, st, completed, dtype, needed):
        """Store the state of every row's just-completed chunk and refresh the retrieval state for its next chunk;
        `needed`: the most chunks a row holds after this step (the stores grow to it)."""
        capacity = st.f_store.shape[2]
        if needed > capacity:
            grow = needed - capacity
            st.f_store = F.pad(st.f_store, (0, 0, 0, 0, 0, grow))
            st.z_store = F.pad(st.z_store, (0, 0, 0, grow))
            st.h_store = F.pad(st.h_store, (0, 0, 0, grow))
            capacity = needed
        meta_r, meta_h = self._meta(st.x_run / self.chunk, dtype)  # (b, h, d)
        slots = torch.arange(capacity, device=completed.device)
        write = (slots[None, :] == st.chunks[:, None]) & completed[:, None]  # (b, capacity)
        st.f_store = torch.where(write[:, None, :, None, None], st.f_run[:, :, None], st.f_store)
        st.z_store = torch.where(write[:, None, :, None], st.z_run[:, :, None], st.z_store)
        st.h_store = torch.where(write[:, None, :, None], meta_h[:, :, None], st.h_store)
        chunks = st.chunks + completed.long()

        s_new, u_new = self._retrieval_state(st.f_store, st.z_store, st.h_store, meta_r, chunks)

        self._open_next_chunk(st, completed, s_new, u_new, chunks)
        # The next chunk's tokens go into copies: a recorded earlier state keeps this chunk's keys and values.
        st.k_buf, st.v_buf, st.p_buf = st.k_buf.clone(), st.v_buf.clone(), st.p_buf.clone()


class BSBRBlock(GPT2SkeletonBlock):
    attention_class = BSBRAttention

    def forward(self, hidden_states, layout, layer_state=None, output_attentions=False, **kwargs):
        """hidden_states (b, n, n_embd) in input order, computed in the TokenLayout `layout` and returned in input
        order (what capture_outputs records)."""
        hidden_states = layout.compact(hidden_states)
        attn_out, weights = self.attn(self.ln_1(hidden_states), layout, layer_state, output_attentions)
        hidden_states = hidden_states + attn_out
        return layout.restore(hidden_states + self.mlp(self.ln_2(hidden_states))), weights


class BSBRPreTrainedModel(GPT2SkeletonPreTrainedModel):
    config: BSBRConfig
    config_class = BSBRConfig
    _no_split_modules = ["BSBRBlock"]
    # Declared as stock GPT-2 declares them (GPT2SkeletonPreTrainedModel). The local term runs through
    # ALL_ATTENTION_FUNCTIONS (eager, sdpa, or a registered function taking a boolean mask); packed rows
    # (position_ids restarting, no mask, no cache) are split into their sequences (TokenLayout). StaticCache holds
    # BSBRStaticLayer layers (bsbr_cache.py), whose decode step compiles to one graph; chunks are counted over a 2-D
    # attention_mask, so no custom 4-D masks (model card).
    # What capture_outputs records in BSBRModel.forward: each block's output, in input order (the first hidden state
    # is the first block's input; the last is replaced by ln_f's output), and each attention's local weights
    # (BSBRAttention returns (output, weights)).
    _can_record_outputs = {"hidden_states": BSBRBlock, "attentions": OutputRecorder(BSBRAttention, index=1)}
    # Small modules read as raw weights by the float32 retrieval path: float32 under fp16 and bf16 (and no quantizer
    # converts them: neither is an nn.Linear). compress_proj exists only with compression_factor > 1 (__init__).
    _keep_in_fp32_modules_strict = ["retrieval_gate"]
    # The modules this architecture adds beyond those float32 lists (graftlm's converter counts both as new), and the
    # parameters that start them as the identity, which tests and bench open with noise. graftlm's registry reads
    # these two and the float32 lists; peft's modules_to_save is the strict float32 list.
    _new_modules_in_model_dtype = ["meta_r_proj", "meta_h_proj"]
    _identity_parameters = r"retrieval_gate"

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if (config.compression_factor or 1) > 1:
            self._keep_in_fp32_modules_strict = [*self._keep_in_fp32_modules_strict, "compress_proj"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # GPT-2's, with the residual projections scaled
        # transformers calls this only for modules that hold parameters themselves: each new module is initialised
        # under its own class.
        if isinstance(module, RetrievalGate):
            init.zeros_(module.weight)  # identity at conversion: out = local
        if isinstance(module, KeyCompression):
            init.copy_(module.weight, block_average(module.in_features, module.in_features // module.out_features))


class BSBRModel(GPT2SkeletonModel, BSBRPreTrainedModel):
    block_class = BSBRBlock

    def __init__(self, config):
        super().__init__(config)
        self.post_init()

    @capture_outputs
    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, cache=None, **kwargs):
        """The cache comes as `cache` (transformers >= 5.24) or `past_key_values` (before).

        hidden_states and attentions are recorded by transformers' capture_outputs, as for stock GPT-2: from the call's
        output_hidden_states (True, or the indices of the states to keep) and output_attentions, else from the
        config; it also turns the output into a tuple under return_dict=False. output_attentions is read here too:
        the local weights are computed only when asked for."""
        cache = pick_cache(cache, past_key_values)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        inputs_embeds = embedded_inputs(self.wte, input_ids, inputs_embeds)
        if cache is not None and (len(cache.layers) != self.config.n_layer
                                  or any(getattr(layer, "_layer_type", None) != LAYER_TYPE for layer in cache.layers)):
            raise TypeError(
                f"GPT2-BSBR caches chunk states, not keys and values: pass a BSBRCache(config), "
                f"DynamicCache(config=config) or StaticCache(config=config, max_cache_len=...) built from the model's "
                f"config, got a {type(cache).__name__} with layers {[type(layer).__name__ for layer in cache.layers]}"
            )
        batch, seq = inputs_embeds.shape[:2]
        cache = cache_in_use(self.config, self.training, cache, use_cache, lambda: BSBRCache(self.config))
        packed = position_ids is not None and attention_mask is None and cache is None  # possibly packed rows
        # By layer type, not class: every export registers its own copy of the layer classes with transformers (the
        # last one imported builds the caches), and they are interchangeable.
        static = cache is not None and cache.layers[0].is_compileable  # BSBRStaticLayer
        if static:  # a tensor, counted in place, read without synchronising (decode steps compile to one graph)
            past_length, prefilled = cache.layers[0].seen, cache.layers[0].initialized
            position_ids, real = self._static_inputs(cache.layers[0], inputs_embeds, attention_mask, position_ids)
        else:
            past_length, position_ids = positions_after(
                cache, inputs_embeds, self.config.n_positions, attention_mask, position_ids
            )
            prefilled = past_length != 0
            real = self._real_tokens(attention_mask, batch, seq, past_length, inputs_embeds.device)
        hidden_states = self.embedded_positions(inputs_embeds, position_ids)

        # Where each token sits in the chunked computation (TokenLayout): without a filled cache, each row's real
        # tokens first, so that its chunks start at its first real token (always, not only when padding is present:
        # no branch on the data, so torch.compile and torch.export trace it), or, for packed rows (position_ids
        # without a mask or a cache, as create_causal_mask detects them for stock GPT-2), each sequence on chunks of
        # its own.
        if prefilled:
            layout = TokenLayout.decoding(real, past_length)
        elif packed:
            layout = TokenLayout.packed(position_ids.expand(batch, seq), self.config.chunk_size)
        else:
            layout = TokenLayout.compacted(real)

        for i, block in enumerate(self.h):
            layer_state = cache.layers[i] if cache is not None else None
            hidden_states, _ = block(hidden_states, layout, layer_state, output_attentions)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), **cache_kwargs(cache))

    def _static_inputs(self, layer, inputs_embeds, attention_mask, position_ids):
        """(position_ids, real (b, seq) bool) of new tokens going into a static cache, from a 2-D attention_mask that
        covers the cache's max_cache_len slots (as generate() passes it: create_masks_for_generate) or the cached +
        new positions, without synchronising with the host once compiled (eager calls check the lengths)."""
        batch, seq = inputs_embeds.shape[:2]
        if layer.max_cache_len > self.config.n_positions:
            raise ValueError(f"the static cache holds {layer.max_cache_len} positions, n_positions is "
                             f"{self.config.n_positions}")
        new = layer.seen.to(inputs_embeds.device) + torch.arange(seq, device=inputs_embeds.device)  # (seq,) slots
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(f"GPT2-BSBR takes a 2-D (batch, seq) attention_mask, got {attention_mask.ndim}-D")
        if not torch.compiler.is_compiling():  # eager: the checks that need the host
            end = int(new[-1]) + 1
            if end > layer.max_cache_len:
                raise ValueError(f"input reaches slot {end - 1}, the static cache holds {layer.max_cache_len}")
            if attention_mask is not None and attention_mask.shape not in ((batch, layer.max_cache_len), (batch, end)):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {end}) (cached + new "
                    f"positions) or ({batch}, {layer.max_cache_len}) (the static cache's slots)"
                )
            checked_position_ids(inputs_embeds, 0, self.config.n_positions, None, position_ids)
        if attention_mask is None:
            real = torch.ones(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        elif attention_mask.shape[1] == layer.max_cache_len:
            real = attention_mask.gather(1, new.expand(batch, seq)).bool()
        else:  # cached + new positions: the new tokens are the last columns
            real = attention_mask[:, -seq:].bool()
        return (new[None, :] if position_ids is None else position_ids), real

    @staticmethod
    def _real_tokens(attention_mask, batch, seq, past_length, device):
        """(batch, seq) bool: which of the new tokens are real."""
        if attention_mask is None:
            return torch.ones(batch, seq, dtype=torch.bool, device=device)
        if attention_mask.ndim != 2:
            raise ValueError(f"GPT2-BSBR takes a 2-D (batch, seq) attention_mask, got {attention_mask.ndim}-D")
        if attention_mask.shape != (batch, past_length + seq):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {past_length + seq}) "
                f"({past_length} cached + {seq} new positions)"
            )
        return attention_mask[:, past_length:].bool()


class BSBRForCausalLM(GPT2SkeletonForCausalLM, BSBRPreTrainedModel, GenerationMixin):
    base_model_class = BSBRModel

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values=None, cache=None,
                                  **kwargs):
        """generate() asks this for the mask of a compileable (static) cache, instead of transformers' 4-D causal
        mask (its hook for models with their own masks): the 2-D mask, padded to the cache's max_cache_len slots, so
        that every decode step has the same shapes (one compiled graph); BSBR counts chunks over it. The cache comes
        as `cache` (transformers >= 5.24) or `past_key_values` (before)."""
        if attention_mask is None:
            return None
        slots = pick_cache(cache, past_key_values).get_max_length()
        return F.pad(attention_mask, (0, slots - attention_mask.shape[-1]))

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, logits_to_keep=0,
                cache=None, return_dict=None, **kwargs):
        """The cache comes as `cache` (transformers >= 5.24) or `past_key_values` (before) and is returned under the
        running release's name. Output flags left None come from the config; return_dict=False returns a tuple."""
        output_attentions, output_hidden_states, return_dict = output_flags(
            self.config, output_attentions, output_hidden_states, return_dict
        )
        out = self.base_outputs(
            input_ids, pick_cache(cache, past_key_values), attention_mask, position_ids, inputs_embeds, use_cache,
            output_attentions, output_hidden_states,
        )
        logits = self.lm_logits(out.last_hidden_state, logits_to_keep)
        loss = self.lm_loss(logits, labels, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            **cache_kwargs(cache_of(out)),
        )
        return returned(output, return_dict)


class BSBRForSequenceClassification(SequenceClassificationHead, BSBRPreTrainedModel):
    base_model_class = BSBRModel


class BSBRForTokenClassification(TokenClassificationHead, BSBRPreTrainedModel):
    base_model_class = BSBRModel


class BSBRForQuestionAnswering(QuestionAnsweringHead, BSBRPreTrainedModel):
    base_model_class = BSBRModel


__all__ = [
    "BSBRForCausalLM",
    "BSBRForQuestionAnswering",
    "BSBRForSequenceClassification",
    "BSBRForTokenClassification",
    "BSBRModel",
    "BSBRPreTrainedModel",
]
