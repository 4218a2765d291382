"""Configuration of GPT2-DFA: GPT-2 with differentiable fuzzy attention."""

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config


@strict
class DFAConfig(GPT2Config):
    """GPT2Config plus the DFA options. Every GPT-2 field keeps its meaning.

    gate_mode: "token" computes soft head gates per token (the seed's theory); "sequence" computes them once per
        sequence from its first real token (the seed's code) and reuses them at every position.
    target_entropy_ratio: target of the mean gate entropy, as a fraction of its maximum ln(n_head). The entropy
        weight lambda = exp(entropy_balance.log_weight) is tuned toward it by dual ascent; lambda falls to ~0 while the
        entropy is above it, so it is a floor against collapse onto few heads. Default 0.5 (at least ~sqrt(n_head)
        effective heads): on the demo's 4-layer GPT-2, 200 steps of `graftlm train dfa` settled at 0.55 of the
        maximum with token-specific gates (token/head mutual information up to 0.76 nats per layer) where 0.9 held
        the gates near uniform (at most 0.10), at the same held-out cross-entropy.
    entropy_weight_init: lambda at conversion.
    mask_sparsity_weight: weight of mean(mask) in the auxiliary loss (L1 on the head-dimension masks). Default 0.1:
        on the same model, 600 training steps closed 27% of the head dimensions for 0.01 nats of held-out
        cross-entropy against the same run at 0, which closes none (prune() then changed the cross-entropy by
        1e-4). mean(mask) averages over every mask entry, so the pull on each entry shrinks as the model grows.
    mask_threshold: a mask value below this counts as a closed dimension (active_dim_fraction, prune()).
    layer_heads, layer_qk_dims, layer_v_dims: shapes left by prune(), one entry per layer (None: unpruned).
        layer_heads[i] lists the original indices of the heads layer i keeps.
    """

    model_type = "gpt2_dfa"

    gate_mode: str = "token"
    target_entropy_ratio: float = 0.5
    entropy_weight_init: float = 0.01
    mask_sparsity_weight: float = 0.1
    mask_threshold: float = 0.1
    layer_heads: list | None = None
    layer_qk_dims: list | None = None
    layer_v_dims: list | None = None

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def heads_of(self, layer_idx):
        return list(range(self.n_head)) if self.layer_heads is None else list(self.layer_heads[layer_idx])

    def dims_of(self, layer_idx):
        qk = self.head_dim if self.layer_qk_dims is None else self.layer_qk_dims[layer_idx]
        v = self.head_dim if self.layer_v_dims is None else self.layer_v_dims[layer_idx]
        return qk, v

    def validate_architecture(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.gate_mode not in ("token", "sequence"):
            raise ValueError(f"gate_mode must be 'token' or 'sequence', got {self.gate_mode!r}")
        if not 0.0 < self.target_entropy_ratio <= 1.0:
            raise ValueError(f"target_entropy_ratio must be in (0, 1], got {self.target_entropy_ratio}")
        if self.entropy_weight_init <= 0:
            raise ValueError(f"entropy_weight_init must be > 0, got {self.entropy_weight_init}")
        if self.mask_sparsity_weight < 0:
            raise ValueError(f"mask_sparsity_weight must be >= 0, got {self.mask_sparsity_weight}")
        if not 0.0 <= self.mask_threshold < 2.0:
            raise ValueError(f"mask_threshold must be in [0, 2), got {self.mask_threshold}")
        for name in ("layer_heads", "layer_qk_dims", "layer_v_dims"):
            value = getattr(self, name)
            if value is not None and len(value) != self.n_layer:
                raise ValueError(f"{name} needs one entry per layer ({self.n_layer}), got {len(value)}")
        for name in ("layer_qk_dims", "layer_v_dims"):
            for dims in getattr(self, name) or []:
                if not 1 <= dims <= self.head_dim:
                    raise ValueError(f"{name} entries must be in [1, {self.head_dim}], got {dims}")
        for heads in self.layer_heads or []:
            if not heads or len(set(heads)) != len(heads) or not all(0 <= h < self.n_head for h in heads):
                raise ValueError(f"layer_heads entries must be distinct head indices in [0, {self.n_head}), got {heads}")


__all__ = ["DFAConfig"]
