"""Configuration of GPT2-BSBR: GPT-2 with causal block-sparse attention and block retrieval."""

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config

FEATURE_MAPS = ("elu+1", "softplus")
LAYER_TYPE = "bsbr_chunk_retrieval"  # the cache layer type of every BSBR layer (modeling/bsbr_cache.py registers it)


@strict
class BSBRConfig(GPT2Config):
    """GPT2Config plus the BSBR options. Every GPT-2 field keeps its meaning.

    chunk_size: B, the number of tokens per chunk. A token attends with softmax to the earlier tokens of its own chunk
        and reads the completed earlier chunks through their states.
    compression_factor: None (or 1) keeps each chunk state F_j = phi(K_j)^T V_j at head_dim x head_dim; c > 1 maps keys
        and queries to head_dim / c features with a learned projection first, so F_j is (head_dim / c) x head_dim
        and its normaliser z_j has head_dim / c entries: exactly 1/c of the uncompressed state.
    feature_map: phi, the positive feature map of the retrieval term: "elu+1" (elu(x) + 1, Katharopoulos et al. 2020,
        arXiv:2006.16236) or "softplus". Positive features keep the normaliser phi(q) . z strictly positive.
    retrieval_eps: added to the normaliser of the retrieval term (chunk 0 reads nothing and returns 0 / eps = 0).
    """

    model_type = "gpt2_bsbr"

    chunk_size: int = 128
    compression_factor: int | None = None
    feature_map: str = "elu+1"
    retrieval_eps: float = 1e-6

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def layer_types(self):
        """Every layer is a BSBR layer: transformers' DynamicCache(config=...) and StaticCache(config=...) build the
        model's cache layers from this (modeling/bsbr_cache.py registers the type)."""
        return [LAYER_TYPE] * self.n_layer

    def validate_layer_type(self):
        """transformers checks layer_types against its own attention types; BSBR's are derived above (one type, its
        own, which its modeling file registers with transformers' cache layers), so there is nothing to check."""

    @property
    def state_dim(self):
        """Feature dimension of the chunk states (rows of F_j, entries of z_j)."""
        return self.head_dim // (self.compression_factor or 1)

    def validate_architecture(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        factor = self.compression_factor
        if factor is not None:
            if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
                raise ValueError(f"compression_factor must be None or a positive integer, got {factor!r}")
            if self.head_dim % factor:
                raise ValueError(
                    f"compression_factor ({factor}) must divide the state dimension head_dim = n_embd / n_head "
                    f"= {self.head_dim}"
                )
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if not self.retrieval_eps > 0:
            raise ValueError(f"retrieval_eps must be > 0, got {self.retrieval_eps}")


__all__ = ["BSBRConfig", "LAYER_TYPE"]
