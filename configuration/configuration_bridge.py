"""Configuration of the bridged BERT -> GPT-2 encoder-decoder (GA, virtual-population and linear bridges)."""

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, GPT2Config, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

BRIDGE_TYPES = ("linear", "ga", "population")
SELECTIONS = ("learned", "fitness")
SIGMA_SCHEDULES = ("constant", "linear", "cosine")
CONTROL_OBJECTIVES = ("likelihood", "prior")


@strict
class BridgeConfig(PreTrainedConfig):
    """A BERT encoder (`encoder`, a BertConfig), a bridge, and a GPT-2 decoder with cross-attention (`decoder`,
    a GPT2Config with add_cross_attention=True). Every bridge starts with z = LayerNorm(W h + b), which maps the
    encoder width to the decoder width.

    bridge_type: "linear" (z only), "ga" (seed 000: self-crossover of z's halves with a learned alpha and mutation
        noise with a learned sigma) or "population" (seed 001: pop_size noisy candidates of z blended by softmax
        selection weights).
    pop_size: number of virtual candidates of the "population" bridge (>= 1).
    selection: "learned" (one softmax weight per candidate) or "fitness" (per-token weights from a scorer of each
        candidate: softmax of minus a learned loss proxy). Population bridge only.
    gated_residual: "ga" only: out = z + gate * (bridged - z), gate per channel and zero at conversion.
    token_wise: "ga" only: alpha and sigma per token from tiny MLPs (hidden width `mlp_dim`) instead of scalars.
    mlp_dim: hidden width of the tiny MLPs (token-wise alpha/sigma, fitness scorer).
    alpha_init, sigma_init: crossover weight in (0, 1) and mutation scale > 0 at conversion.
    sigma_schedule: multiplier of sigma over training forward passes: "constant" (1), "linear" (1 -> 0) or
        "cosine" (1 -> 0), reaching 0 after `sigma_schedule_steps` passes.
    noise_in_eval: sample mutation noise in eval mode too. Off by default: noise is a training-time regulariser,
        so eval mode (and generate) is deterministic.
    controls: add heads that predict a decoding temperature in (0, max_temperature) and a top-k in [1, max_top_k]
        per example from the bridged states (seed 001), used by generate(..., adaptive_decoding=True).
    control_objective: "likelihood" (NLL of the targets under the temperature-scaled, softly top-k-truncated
        distribution) or "prior" (seed 001's |temp - 1| + |top_k - 20| / 20).
    control_loss_weight: lambda of the control loss in loss = ce_loss + lambda * control_loss.
    control_softness: width, in logit units, of the sigmoid that relaxes the top-k cut in the likelihood objective.
    """

    model_type = "bert_gpt2_bridge"
    sub_configs_defaults = {
        "encoder": BertConfig,
        "decoder": SubConfigSpec(config_class=GPT2Config, init_kwargs={"add_cross_attention": True}),
    }

    encoder: PreTrainedConfig | dict | None = None
    decoder: PreTrainedConfig | dict | None = None
    bridge_type: str = "ga"
    pop_size: int = 4
    selection: str = "learned"
    gated_residual: bool = False
    token_wise: bool = False
    mlp_dim: int = 32
    alpha_init: float = 0.5
    sigma_init: float = 0.05
    sigma_schedule: str = "constant"
    sigma_schedule_steps: int = 1000
    noise_in_eval: bool = False
    controls: bool = False
    control_objective: str = "likelihood"
    control_loss_weight: float = 0.1
    control_softness: float = 1.0
    max_temperature: float = 2.0
    max_top_k: int = 50
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    is_encoder_decoder: bool = True

    # transformers' standard top-level fields, read from the GPT-2 decoder's config (the one place each is stored): the
    # decoder produces the tokens, so its width, heads, vocabulary and position table are the generating model's.
    @property
    def hidden_size(self):
        return self.decoder.n_embd

    @property
    def num_attention_heads(self):
        return self.decoder.n_head

    @property
    def num_hidden_layers(self):
        return self.decoder.n_layer

    @property
    def vocab_size(self):
        return self.decoder.vocab_size

    @vocab_size.setter
    def vocab_size(self, value):
        self.decoder.vocab_size = value

    @property
    def max_position_embeddings(self):
        return self.decoder.n_positions

    @max_position_embeddings.setter
    def max_position_embeddings(self, value):
        self.decoder.n_positions = value

    def validate_architecture(self):
        if not isinstance(self.encoder, BertConfig):
            raise ValueError(f"encoder must be a BERT config (model_type 'bert'), got {type(self.encoder).__name__}")
        if not isinstance(self.decoder, GPT2Config):
            raise ValueError(f"decoder must be a GPT-2 config (model_type 'gpt2'), got {type(self.decoder).__name__}")
        if not self.decoder.add_cross_attention:
            raise ValueError("decoder.add_cross_attention must be True: the decoder reads the bridge by cross-attention")
        if self.bridge_type not in BRIDGE_TYPES:
            raise ValueError(f"bridge_type must be one of {BRIDGE_TYPES}, got {self.bridge_type!r}")
        if self.bridge_type == "ga" and self.decoder.n_embd % 2:
            raise ValueError(
                f"bridge_type 'ga' splits the decoder width into two halves; decoder.n_embd={self.decoder.n_embd} is odd"
            )
        if isinstance(self.pop_size, bool) or not isinstance(self.pop_size, int) or self.pop_size < 1:
            raise ValueError(f"pop_size must be an integer >= 1, got {self.pop_size!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection != "learned" and self.bridge_type != "population":
            raise ValueError(f"selection={self.selection!r} needs bridge_type 'population', got {self.bridge_type!r}")
        for name in ("gated_residual", "token_wise"):
            if getattr(self, name) and self.bridge_type != "ga":
                raise ValueError(f"{name}=True needs bridge_type 'ga', got {self.bridge_type!r}")
        if self.mlp_dim < 1:
            raise ValueError(f"mlp_dim must be >= 1, got {self.mlp_dim}")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init}")
        if self.sigma_init <= 0:
            raise ValueError(f"sigma_init must be > 0, got {self.sigma_init}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}")
        if self.sigma_schedule_steps < 1:
            raise ValueError(f"sigma_schedule_steps must be >= 1, got {self.sigma_schedule_steps}")
        if self.control_objective not in CONTROL_OBJECTIVES:
            raise ValueError(f"control_objective must be one of {CONTROL_OBJECTIVES}, got {self.control_objective!r}")
        if self.control_loss_weight < 0:
            raise ValueError(f"control_loss_weight must be >= 0, got {self.control_loss_weight}")
        if self.control_softness <= 0:
            raise ValueError(f"control_softness must be > 0, got {self.control_softness}")
        if self.max_temperature <= 0:
            raise ValueError(f"max_temperature must be > 0, got {self.max_temperature}")
        if not 1 <= self.max_top_k < self.decoder.vocab_size:
            raise ValueError(f"max_top_k must be in [1, decoder.vocab_size), got {self.max_top_k}")


__all__ = ["BridgeConfig"]
