"""Generation cache of GPT2-BSBR: per layer, the current chunk's keys and values, the running state of that chunk,
and, per completed chunk j, its state F_j, normaliser z_j and key H_j. Its size grows with n / chunk_size, not n.

The layers are transformers cache layers of their own type (LAYER_TYPE, which BSBRConfig.layer_types names for every
layer), registered through CacheLayerMixin._layer_type: transformers' own DynamicCache(config=...) and
StaticCache(config=..., max_cache_len=...) build them, so generate() prepares, reorders, crops and continues them as
it does any cache, and `cache_implementation="static"` gives the compileable BSBRStaticLayer (fixed capacity).
transformers internals imported here: cache_utils.{CacheLayerMixin, DynamicCache, StaticLayer} and their
`_layer_type` registration (every release in hf_compat's range).
"""

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin, DynamicCache, StaticLayer

from ..configuration.configuration_bsbr import LAYER_TYPE

# (name, batch dim first) of every tensor one layer keeps; all are indexed by the batch row first.
_TENSORS = (
    "k_buf",  # (batch, heads, B, head_dim): keys of the current chunk, slots [0, fill) valid
    "v_buf",  # (batch, heads, B, head_dim)
    "p_buf",  # (batch, B) long: input position of each slot's token (where output_attentions places its weight)
    "f_run",  # (batch, heads, state_dim, head_dim) float32: phi(K)^T V of the current chunk so far
    "z_run",  # (batch, heads, state_dim) float32: sum of phi(k) of the current chunk so far
    "x_run",  # (batch, n_embd) float32: sum of the layer inputs of the current chunk so far (for its summary)
    "fill",  # (batch,) long: real tokens in the current chunk
    "chunks",  # (batch,) long: completed chunks
    "f_store",  # (batch, heads, capacity, state_dim, head_dim) float32: F_j, valid for j < chunks
    "z_store",  # (batch, heads, capacity, state_dim) float32: z_j
    "h_store",  # (batch, heads, capacity, head_dim) float32: chunk keys H_j
    "s_cur",  # (batch, heads, state_dim, head_dim) float32: sum_j P_ij F_j for the current chunk i
    "u_cur",  # (batch, heads, state_dim) float32: sum_j P_ij z_j for the current chunk i
)


def prefill_state(record, lengths, capacity=None):
    """The layer tensors after each row's first `lengths` real tokens of a prefill. record: what the prefill computed
    per chunk (C chunks of B slots, real tokens first): features kf (b, h, C, B, s) and float values vf, keys kc and
    values vc (b, h, C, B, d), float layer inputs xc (b, C, B, n_embd), input positions pc (b, C, B), chunk states
    and normalisers, chunk keys meta_h (b, h, C, d) and each chunk's retrieval state s_all, u_all."""
    chunk = record["kc"].shape[3]
    open_chunk, fill = lengths // chunk, lengths % chunk  # per row: the chunk still being filled, its real tokens
    rows = torch.arange(len(lengths), device=lengths.device)
    keep = (torch.arange(chunk, device=lengths.device) < fill[:, None]).float()  # (b, B)
    kf_open = record["kf"][rows, :, open_chunk] * keep[:, None, :, None]  # (b, h, B, s)
    done, fill_bound = torch.stack((open_chunk.max(), fill.max())).tolist()  # one host synchronisation
    stores = (record["states"][:, :, :done], record["norms"][:, :, :done], record["meta_h"][:, :, :done])
    if capacity is not None:  # a static layer's stores hold `capacity` chunks from the start
        if done > capacity:
            raise ValueError(f"the prompt completes {done} chunks, the static cache holds {capacity}")
        stores = [F.pad(t, (0, 0) * (t.ndim - 3) + (0, capacity - done)) for t in stores]
    return dict(
        k_buf=record["kc"][rows, :, open_chunk], v_buf=record["vc"][rows, :, open_chunk],
        p_buf=record["pc"][rows, open_chunk], f_run=kf_open.transpose(-1, -2) @ record["vf"][rows, :, open_chunk],
        z_run=kf_open.sum(-2), x_run=(record["xc"][rows, open_chunk] * keep[..., None]).sum(1), fill=fill,
        chunks=open_chunk, f_store=stores[0].clone(), z_store=stores[1].clone(), h_store=stores[2].clone(),
        s_cur=record["s_all"][rows, :, open_chunk],
        u_cur=record["u_all"][rows, :, open_chunk], fill_bound=fill_bound,
    )


class BSBRLayer(CacheLayerMixin):
    """The cached state of one BSBR layer. `seen` counts input slots (padding included), as generate() expects.

    The decode step replaces the running tensors instead of updating them in place (the key/value buffers excepted:
    it writes only the slot past the valid ones, and a closing chunk moves them to fresh copies), so that, with past
    recording on (activate_past_recording(), as generate() does for assisted decoding), the state before each step is
    kept by reference at no copying cost and crop(-n) rolls the last n steps back exactly: the tokens of the open chunk
    and, where a crop reaches back past a chunk boundary, that chunk's stored state and the retrieval state built on it.
    """

    _layer_type = LAYER_TYPE  # registers the class in transformers' DYNAMIC_LAYER_TYPE_MAPPING
    is_compileable = False  # grows by one state per completed chunk
    supports_early_init = False  # its tensors come from the prefill (like transformers' linear-attention layers)

    def __init__(self, **kwargs):
        self.seen = 0
        # On the host: no row's fill exceeds it (None: not known). A decode step synchronises with the host only
        # where the token it adds may complete a chunk (BSBRAttention._decode_step).
        self.fill_bound = None
        self.record_past = False
        self.history = []  # while recording: the tensors before each decode step since the last crop
        self.prefill = None  # while recording: what the prefill computed, to crop back into it (prefill_state)
        for name in _TENSORS:
            setattr(self, name, None)

    @property
    def initialized(self):
        return self.fill is not None

    is_initialized = initialized  # transformers' name

    @property
    def is_croppable(self):
        return self.record_past  # crop() rolls back what was recorded (activate_past_recording, as generate() does)

    @property
    def keys(self):
        """(batch, heads, tokens, head_dim): the keys of the open chunk (earlier chunks live on as states only)."""
        return None if self.k_buf is None else self.k_buf[:, :, : int(self.fill.max())]

    @property
    def values(self):
        """(batch, heads, tokens, head_dim): the values of the open chunk."""
        return None if self.v_buf is None else self.v_buf[:, :, : int(self.fill.max())]

    def set(self, fill_bound=None, **tensors):
        """Replace tensors; a new `fill` comes with its host-side bound (fill_bound, None where not known)."""
        unknown = set(tensors) - set(_TENSORS)
        if unknown:
            raise KeyError(f"unknown BSBR cache tensors: {sorted(unknown)}")
        for name, value in tensors.items():
            setattr(self, name, value)
        if "fill" in tensors:
            self.fill_bound = fill_bound

    def advance(self, **tensors):
        """A decode step's new tensors: they replace the old ones (kept by reference while recording the past)."""
        self.set(**tensors)

    def record_step(self):
        """Called before each decode step: keep the current tensors (by reference) while recording the past."""
        if self.record_past:
            self.history.append({name: getattr(self, name) for name in _TENSORS})

    def activate_past_recording(self):
        self.record_past = True

    def crop(self, tokens_to_remove):
        """Remove the last -tokens_to_remove tokens (transformers' convention: a negative count); any crop also
        drops the recorded steps, as transformers' fixed-size layers restrict themselves back to their working size."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        steps = -tokens_to_remove
        recorded = len(self.history) + (self.prefill["valid"].shape[1] if self.prefill is not None else 0)
        if steps > recorded:
            raise RuntimeError(
                f"cannot crop {steps} tokens from a BSBR cache that recorded {recorded}: call "
                "activate_past_recording() before the tokens to remove are processed (generate() does)"
            )
        if 0 < steps <= len(self.history):
            self.set(**self.history[-steps])
        elif steps:  # back into the prefill (it started from an empty cache, so its slots are input positions)
            kept = (self.prefill["pc"].flatten(1) < self.seen - steps) & self.prefill["valid"]
            self.set(**prefill_state(self.prefill, kept.sum(1)))
        self.seen -= steps
        self.history, self.prefill = [], None

    def _map(self, fn):
        for name in _TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        self.history = [{name: fn(t) if t is not None else None for name, t in step.items()} for step in self.history]
        if self.prefill is not None:  # every tensor of the record is indexed by the batch row first
            self.prefill = {name: fn(t) for name, t in self.prefill.items()}

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])

    def reset(self):
        self.__init__()

    def get_seq_length(self):
        return self.seen

    def get_max_length(self):
        return -1  # grows with the input, one state per completed chunk

    def get_mask_sizes(self, query_length):
        return self.get_seq_length() + query_length, 0  # (kv_length, kv_offset): every input slot, as a 2-D mask

    def lazy_initialization(self, key_states, value_states):
        raise NotImplementedError("a BSBR layer is filled by BSBRAttention's prefill, not from keys and values")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a BSBR layer is filled by BSBRAttention, not by Cache.update(keys, values)")

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in _TENSORS) if t is not None)


class BSBRStaticLayer(BSBRLayer, StaticLayer):
    """BSBRLayer with a fixed capacity, for StaticCache (generate's `cache_implementation="static"`) and
    torch.compile: room for max_cache_len // chunk_size completed chunks from the prefill on, `seen` a tensor counted
    in place (no recompilation per step), and the decode step without host synchronisation or data-dependent Python
    branches (BSBRAttention._decode_step). Not croppable, as transformers' static layers."""

    _layer_type = LAYER_TYPE  # registers the class in transformers' STATIC_LAYER_TYPE_MAPPING
    is_compileable = True
    is_croppable = False

    def __init__(self, max_cache_len, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.seen = torch.tensor(0, dtype=torch.long)

    @property
    def keys(self):
        """(batch, heads, chunk_size, head_dim): the open chunk's slots, a fixed shape (slots past fill are stale)."""
        return self.k_buf

    @property
    def values(self):
        return self.v_buf

    def advance(self, **tensors):
        """A decode step's new tensors, copied into the layer's own (fixed addresses: what a compiled step mutates;
        torch 2.13's dynamo drops attribute assignments that follow a torch.cond, in-place writes it keeps)."""
        for name, value in tensors.items():
            getattr(self, name).copy_(value)

    def capacity(self, chunk):
        """Completed chunks the stores hold."""
        return max(1, self.max_cache_len // chunk)

    def reset(self):
        self.__init__(self.max_cache_len)

    def get_seq_length(self):
        return self.seen

    def get_max_length(self):
        return self.max_cache_len

    def get_mask_sizes(self, query_length):
        return self.max_cache_len, 0

    def activate_past_recording(self):
        raise NotImplementedError("a static BSBR layer keeps no past to crop back to; use the dynamic cache")


class BSBRCache(DynamicCache):
    """transformers' DynamicCache of BSBR layers (what DynamicCache(config=config) builds for a BSBRConfig), plus
    nbytes(): what the model's forward creates under use_cache=True when given no cache. generate() creates its cache
    itself (DynamicCache or, with cache_implementation="static", StaticCache): both hold BSBR layers."""

    def __init__(self, config):
        super().__init__(config=config)

    def nbytes(self):
        """Bytes held by all layers' tensors (what the cache costs in memory)."""
        return sum(layer.nbytes() for layer in self.layers)


__all__ = ["BSBRCache", "BSBRLayer", "BSBRStaticLayer", "LAYER_TYPE", "prefill_state"]
