"""Configuration of Scaffolded GPT-2: a frozen base GPT-2 fused with a LoRA-adapted scaffold GPT-2."""

import math

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config, PreTrainedConfig

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # GPT-2's Conv1D layers (attention and MLP)


@strict
class ScaffoldConfig(PreTrainedConfig):
    """Two GPT-2 configs and the fusion options.

    base_config: the frozen base GPT-2 (its depth bounds cross_attn_layers; its vocabulary is the model's).
    scaffold_config: the scaffold GPT-2 that reads the prompt; any width and depth, same vocabulary.
    cross_attn_layers: base layers followed by a fuser (cross-attention from base to scaffold states).
    influence: fixed weight in [0, 1] on every fuser's output (the seed's influence_weight).
    fuser_heads: heads of each fuser's cross-attention (default: the base's n_head).
    lora_r, lora_alpha, lora_dropout, lora_target_modules: the scaffold's LoRA adapters (peft).
    train_fuser: the fusers train with the adapters (True) or stay frozen at their initialisation (False, the seed).
    scaffold_adapter: subfolder holding a separately saved LoRA adapter; set by save_pretrained, None when the
        scaffold's weights are plain GPT-2 weights (converted, or LoRA merged).
    base_name_or_path, scaffold_name_or_path: where the two GPT-2s came from (model card provenance).
    """

    model_type = "gpt2_scaffold"
    sub_configs_defaults = {"base_config": GPT2Config, "scaffold_config": GPT2Config}

    base_config: dict | PreTrainedConfig | None = None
    scaffold_config: dict | PreTrainedConfig | None = None
    cross_attn_layers: list | None = None
    influence: float | int = 1.0
    fuser_heads: int | None = None
    lora_r: int = 8
    lora_alpha: float | int = 16.0
    lora_dropout: float | int = 0.1
    lora_target_modules: list | None = None
    train_fuser: bool = True
    scaffold_adapter: str | None = None
    base_name_or_path: str | None = None
    scaffold_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.cross_attn_layers is None:
            self.cross_attn_layers = [5, 7]  # the seed's choice for a 12-layer GPT-2
        if self.lora_target_modules is None:
            self.lora_target_modules = list(LORA_TARGETS)
        if self.fuser_heads is None:
            self.fuser_heads = self.base_config.n_head

    def get_text_config(self, decoder=None, encoder=None):
        # The base GPT-2 produces the tokens: generation, caches and token ids all follow its config.
        return self.base_config

    # transformers' standard top-level fields, read from the base GPT-2's config (the one place each is stored):
    # the base produces the tokens, so its width, heads, vocabulary and position table are the model's.
    @property
    def num_hidden_layers(self):
        return self.base_config.n_layer

    @property
    def hidden_size(self):
        return self.base_config.n_embd

    @property
    def num_attention_heads(self):
        return self.base_config.n_head

    @property
    def vocab_size(self):
        return self.base_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value):  # both GPT-2s read the same token ids
        self.base_config.vocab_size = self.scaffold_config.vocab_size = value

    @property
    def pad_token_id(self):  # the task heads pool on the last token that is not the base's pad token
        return self.base_config.pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, value):
        self.base_config.pad_token_id = value

    @property
    def max_position_embeddings(self):
        return self.base_config.n_positions

    @max_position_embeddings.setter
    def max_position_embeddings(self, value):  # the scaffold reads the base's input
        self.base_config.n_positions = self.scaffold_config.n_positions = value

    @property
    def use_cache(self):
        return self.base_config.use_cache

    @use_cache.setter
    def use_cache(self, value):
        self.base_config.use_cache = value

    @property
    def n_positions(self):  # the longest input the base reads (graftlm eval windows, length checks)
        return self.base_config.n_positions

    def validate_architecture(self):
        check_scaffold_config(self)


def check_scaffold_config(config):
    """Raise ValueError/TypeError naming the first field of `config` that is out of range."""
    base, scaffold = config.base_config, config.scaffold_config
    for name, sub in (("base_config", base), ("scaffold_config", scaffold)):
        if getattr(sub, "model_type", None) != "gpt2":
            raise TypeError(f"{name} must be a GPT-2 config, got {getattr(sub, 'model_type', type(sub).__name__)!r}")
    if base.vocab_size != scaffold.vocab_size:
        raise ValueError(
            f"base_config.vocab_size ({base.vocab_size}) != scaffold_config.vocab_size ({scaffold.vocab_size}): "
            "the scaffold reads the base's token ids, so both need the same vocabulary"
        )
    layers = config.cross_attn_layers
    if not layers:
        raise ValueError("cross_attn_layers is empty: name at least one base layer to fuse the scaffold into")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"cross_attn_layers must be integers, got {layers}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"cross_attn_layers has duplicated layers: {layers}")
    out_of_range = [i for i in layers if not 0 <= i < base.n_layer]
    if out_of_range:
        raise ValueError(
            f"cross_attn_layers {out_of_range} out of range: the base GPT-2 has {base.n_layer} layers "
            f"(0-{base.n_layer - 1})"
        )
    if not (isinstance(config.influence, (int, float)) and 0.0 <= config.influence <= 1.0):
        raise ValueError(f"influence must be in [0, 1], got {config.influence}")
    if config.fuser_heads < 1 or base.n_embd % config.fuser_heads:
        raise ValueError(
            f"fuser_heads ({config.fuser_heads}) must be >= 1 and divide the base's n_embd ({base.n_embd})"
        )
    if config.lora_r < 1:
        raise ValueError(f"lora_r must be >= 1, got {config.lora_r}")
    if not (config.lora_alpha > 0 and math.isfinite(config.lora_alpha)):
        raise ValueError(f"lora_alpha must be > 0, got {config.lora_alpha}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    targets = config.lora_target_modules
    if not targets or not set(targets) <= set(LORA_TARGETS):
        raise ValueError(f"lora_target_modules must be a non-empty subset of {list(LORA_TARGETS)}, got {targets}")


__all__ = ["ScaffoldConfig"]
