"""The bridges between BERT and GPT-2 (the decoding controls that read their output: bridge_decoding.py).

Every bridge first maps encoder states h (B, L, D_enc) to z = LayerNorm(W h + b) (B, L, D_dec), then:
- LinearBridge: out = z.
- GABridge (seed 000): z = [z1, z2] split in halves; cross = alpha * z1 + (1 - alpha) * z2 ("self-crossover");
  out = [z1, cross + sigma * eps] ("mutation", eps ~ N(0, 1)); optionally out = z + gate * (out - z).
- PopulationBridge (seed 001): N virtual candidates c_n = z + s_n * eps_n in one (B, N, L, D) tensor, blended
  as out = sum_n w_n c_n, with w = softmax(learned logits) ("learned") or, per token, w = softmax(-loss_proxy(c_n))
  from a small scorer ("fitness").
Noise is drawn only in training mode (or with config.noise_in_eval), scaled by the sigma schedule.
"""

import math

import torch
from torch import nn
from transformers import initialization as init

from .scalar_params import scalar_parameter


def _inverse_softplus(y):
    return math.log(math.expm1(y))


def _tiny_mlp(dim, hidden, out=1):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class LinearBridge(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.encoder.hidden_size, config.decoder.n_embd)
        self.ln = nn.LayerNorm(config.decoder.n_embd, eps=config.decoder.layer_norm_epsilon)
        # Training forward passes seen so far: the clock of the sigma schedule (saved, so training can resume).
        self.register_buffer("noise_step", torch.zeros((), dtype=torch.long))

    def reset_parameters(self):
        """Values of the bridge's own parameters at conversion (proj and ln get the model's standard init)."""
        init.zeros_(self.noise_step)

    def project(self, encoder_states):
        return self.ln(self.proj(encoder_states))  # (B, L, D_dec)

    def sample_noise(self):
        return self.training or self.config.noise_in_eval

    def schedule(self):
        """Multiplier of sigma at the current step: 1 -> 0 over sigma_schedule_steps for "linear" and "cosine"."""
        progress = min(self.noise_step.item() / self.config.sigma_schedule_steps, 1.0)
        if self.config.sigma_schedule == "linear":
            return 1.0 - progress
        if self.config.sigma_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    def tick(self):
        if self.training:
            self.noise_step += 1

    def forward(self, encoder_states):
        return self.project(encoder_states)


class GABridge(LinearBridge):
    def __init__(self, config):
        super().__init__(config)
        dim = config.decoder.n_embd
        if config.token_wise:
            self.alpha_mlp = _tiny_mlp(dim, config.mlp_dim)  # alpha_t = sigmoid(MLP(z_t))
            self.sigma_mlp = _tiny_mlp(dim, config.mlp_dim)  # sigma_t = softplus(MLP(z_t))
        else:
            # (1,) each, which FSDP and DeepSpeed can shard; 0-D in checkpoints of before, which still load
            self.alpha_logit = scalar_parameter(self, 0.0)  # alpha = sigmoid(alpha_logit)
            self.sigma_raw = scalar_parameter(self, 0.0)  # sigma = softplus(sigma_raw)
        if config.gated_residual:
            self.gate = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self):
        """alpha = alpha_init and sigma = sigma_init everywhere; the residual gate (if any) at 0."""
        super().reset_parameters()
        alpha0 = math.log(self.config.alpha_init / (1 - self.config.alpha_init))
        sigma0 = _inverse_softplus(self.config.sigma_init)
        if self.config.token_wise:
            for mlp, bias in ((self.alpha_mlp, alpha0), (self.sigma_mlp, sigma0)):
                init.zeros_(mlp[-1].weight)
                init.constant_(mlp[-1].bias, bias)
        else:
            init.constant_(self.alpha_logit, alpha0)
            init.constant_(self.sigma_raw, sigma0)
        if self.config.gated_residual:
            init.zeros_(self.gate)

    def alpha_sigma(self, z):
        if self.config.token_wise:
            return torch.sigmoid(self.alpha_mlp(z)), nn.functional.softplus(self.sigma_mlp(z))  # (B, L, 1) each
        return torch.sigmoid(self.alpha_logit).reshape(()), nn.functional.softplus(self.sigma_raw).reshape(())

    def forward(self, encoder_states):
        z = self.project(encoder_states)
        z1, z2 = z.chunk(2, dim=-1)  # (B, L, D/2) each
        alpha, sigma = self.alpha_sigma(z)
        cross = alpha * z1 + (1 - alpha) * z2
        if self.sample_noise():
            cross = cross + torch.randn_like(cross) * sigma * self.schedule()
            self.tick()
        out = torch.cat([z1, cross], dim=-1)
        if self.config.gated_residual:
            out = z + self.gate * (out - z)
        return out


class PopulationBridge(LinearBridge):
    def __init__(self, config):
        super().__init__(config)
        self.mutation_raw = nn.Parameter(torch.zeros(config.pop_size))  # s_n = softplus(mutation_raw[n])
        if config.selection == "learned":
            self.selection_logits = nn.Parameter(torch.zeros(config.pop_size))
        else:
            self.fitness = _tiny_mlp(config.decoder.n_embd, config.mlp_dim)  # loss proxy of one candidate token

    def reset_parameters(self):
        super().reset_parameters()
        init.constant_(self.mutation_raw, _inverse_softplus(self.config.sigma_init))
        if self.config.selection == "learned":
            init.zeros_(self.selection_logits)

    def forward(self, encoder_states):
        z = self.project(encoder_states)
        population = z.unsqueeze(1).expand(-1, self.config.pop_size, -1, -1)  # (B, N, L, D)
        if self.sample_noise():
            scale = nn.functional.softplus(self.mutation_raw).view(1, -1, 1, 1) * self.schedule()
            population = population + torch.randn_like(population) * scale
            self.tick()
        if self.config.selection == "learned":
            weights = torch.softmax(self.selection_logits, dim=0).view(1, -1, 1, 1)  # (1, N, 1, 1)
        else:
            weights = torch.softmax(-self.fitness(population), dim=1)  # (B, N, L, 1): low loss proxy, high weight
        return (weights * population).sum(dim=1)  # (B, L, D)


BRIDGES = {"linear": LinearBridge, "ga": GABridge, "population": PopulationBridge}


__all__ = ["BRIDGES", "GABridge", "LinearBridge", "PopulationBridge"]
