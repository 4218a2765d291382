"""Generation cache of GPT2-BSBR: per layer, the current chunk's keys and values, the running state of that chunk,
and, per completed chunk j, its state F_j, normaliser z_j and key H_j. Its size grows with n / chunk_size, not n."""

from transformers.cache_utils import Cache

# (name, batch dim first) of every tensor one layer keeps; all are indexed by the batch row first.
_TENSORS = (
    "k_buf",  # (batch, heads, B, head_dim): keys of the current chunk, slots [0, fill) valid
    "v_buf",  # (batch, heads, B, head_dim)
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


class BSBRLayerState:
    """The cached state of one BSBR layer. `seen` counts input slots (padding included), as generate() expects."""

    def __init__(self):
        self.seen = 0
        for name in _TENSORS:
            setattr(self, name, None)

    @property
    def initialized(self):
        return self.fill is not None

    def set(self, **tensors):
        unknown = set(tensors) - set(_TENSORS)
        if unknown:
            raise KeyError(f"unknown BSBR cache tensors: {sorted(unknown)}")
        for name, value in tensors.items():
            setattr(self, name, value)

    def _map(self, fn):
        for name in _TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in _TENSORS) if t is not None)


class BSBRCache(Cache):
    """One BSBRLayerState per layer. Not croppable (chunk states cannot be un-summed) and not compileable."""

    def __init__(self, num_layers):
        super().__init__(layers=[BSBRLayerState() for _ in range(num_layers)])

    def get_seq_length(self, layer_idx=0):
        return self.layers[layer_idx].seen

    @property
    def is_compileable(self):
        return False

    @property
    def is_croppable(self):
        return False

    def crop(self, max_length):
        raise NotImplementedError("a BSBR cache cannot be cropped: completed chunks are kept only as summed states")

    def reset(self):
        self.layers = [BSBRLayerState() for _ in self.layers]

    def nbytes(self):
        """Bytes held by all layers' tensors (what the cache costs in memory)."""
        return sum(layer.nbytes() for layer in self.layers)


__all__ = ["BSBRCache", "BSBRLayerState"]
