"""Bridged's decoding controls, beside the bridges (bridge_layers.py) whose output they read: the heads predicting each
example's temperature and top-k (DecodingControls), the per-row logits processor generate() applies them with
(adaptive decoding), and the objectives that train them."""

import math

import torch
from torch import nn
from transformers import LogitsProcessor
from transformers import initialization as init


class DecodingControls(nn.Module):
    """Per-example decoding temperature in (0, max_temperature) and top-k in [1, max_top_k] (seed 001).

    Both read the mean of the bridged states over the real encoder tokens:
    temperature = T_max * sigmoid(w_T . m + b_T), top_k = 1 + (K_max - 1) * sigmoid(w_k . m + b_k).
    At conversion w = 0, temperature = 1 and top_k = 20 (the seed's prior), whatever the input.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.temperature_head = nn.Linear(config.decoder.n_embd, 1)
        self.top_k_head = nn.Linear(config.decoder.n_embd, 1)

    def reset_parameters(self):
        def logit(p):
            return math.log(p / (1 - p))

        for head in (self.temperature_head, self.top_k_head):
            init.zeros_(head.weight)
        init.constant_(self.temperature_head.bias, logit(min(1.0 / self.config.max_temperature, 0.999)))
        k_max = self.config.max_top_k
        init.constant_(self.top_k_head.bias, logit(min(max((20 - 1) / max(k_max - 1, 1), 0.001), 0.999)))

    def forward(self, bridged, attention_mask=None):
        """(temperature, top_k), each (B,) float; top_k is continuous (round it for hard decoding)."""
        if attention_mask is None:
            pooled = bridged.mean(dim=1)
        else:
            real = attention_mask.to(bridged.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (bridged * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)
        temperature = self.config.max_temperature * torch.sigmoid(self.temperature_head(pooled).squeeze(-1))
        top_k = 1 + (self.config.max_top_k - 1) * torch.sigmoid(self.top_k_head(pooled).squeeze(-1))
        return temperature, top_k


class AdaptiveLogitsProcessor(LogitsProcessor):
    """Divide each row's scores by its own temperature and keep only its own top-k tokens (others -> -inf).

    temperature, top_k: (rows,) tensors, rows = batch * expansion (generate repeats each example
    `max(num_beams, num_return_sequences)` times, consecutively; see `expand_controls`).
    Ties with the k-th score are kept, as transformers' TopKLogitsWarper does.
    """

    def __init__(self, temperature, top_k):
        if temperature.ndim != 1 or top_k.shape != temperature.shape:
            raise ValueError(f"temperature and top_k must both be (rows,), got {tuple(temperature.shape)} and "
                             f"{tuple(top_k.shape)}")
        if bool((temperature <= 0).any()):
            raise ValueError("every temperature must be > 0")
        self.temperature = temperature.float()
        self.top_k = top_k.round().long().clamp_min(1)

    def __call__(self, input_ids, scores):
        if scores.shape[0] != self.temperature.shape[0]:
            raise ValueError(
                f"adaptive decoding has controls for {self.temperature.shape[0]} rows but generate scores "
                f"{scores.shape[0]} rows"
            )
        temperature = self.temperature.to(scores.device)
        top_k = self.top_k.to(scores.device).clamp_max(scores.shape[-1])
        scores = scores / temperature[:, None].to(scores.dtype)
        sorted_scores = scores.topk(int(top_k.max()), dim=-1).values  # (rows, k_max), descending
        kth = sorted_scores.gather(1, (top_k - 1)[:, None])  # (rows, 1): each row's own k-th largest score
        return scores.masked_fill(scores < kth, float("-inf"))


def expand_controls(temperature, top_k, expansion):
    """Repeat per-example controls as generate repeats the examples: (B,) -> (B * expansion,)."""
    return temperature.repeat_interleave(expansion, dim=0), top_k.repeat_interleave(expansion, dim=0)


def soft_top_k_log_probs(logits, temperature, top_k, softness):
    """log q(token) for q proportional to exp(z / T) * sigmoid((z - tau(k)) / softness).

    A differentiable relaxation of "temperature T, then keep the top k": tau(k) is the threshold between the
    k-th and (k+1)-th largest logits, interpolated linearly for a fractional k, so d tau / d k is defined, and the
    sigmoid replaces the hard in/out cut (hard top-k is the limit softness -> 0).
    logits: (B, T, V); temperature, top_k: (B,). Returns (B, T, V) in float32.
    """
    logits = logits.float()
    k_max = max(int(top_k.detach().ceil().max().item()), 2)
    top = logits.topk(k_max + 1, dim=-1).values  # (B, T, k_max + 1), descending
    midpoints = 0.5 * (top[..., :-1] + top[..., 1:])  # midpoints[j - 1]: between the j-th and (j+1)-th logits
    k = top_k.float().clamp(1.0, float(k_max))[:, None, None]  # (B, 1, 1)
    low = k.detach().floor().long().clamp(1, k_max - 1)
    high = low + 1
    frac = k - low.float()
    tau_low = midpoints.gather(-1, (low - 1).expand(*midpoints.shape[:2], 1))
    tau_high = midpoints.gather(-1, (high - 1).expand(*midpoints.shape[:2], 1))
    tau = tau_low + frac * (tau_high - tau_low)  # (B, T, 1)
    scores = logits / temperature.float()[:, None, None] + torch.nn.functional.logsigmoid((logits - tau) / softness)
    return scores - scores.logsumexp(dim=-1, keepdim=True)


def likelihood_control_loss(logits, labels, temperature, top_k, softness):
    """Mean NLL of the labelled tokens under the soft temperature/top-k distribution (labels -100 are skipped)."""
    log_q = soft_top_k_log_probs(logits, temperature, top_k, softness)
    real = labels != -100
    nll = -log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (nll * real).sum() / real.sum().clamp_min(1)


def prior_control_loss(temperature, top_k):
    """Seed 001's regulariser: |temperature - 1| + |top_k - 20| / 20, averaged over the batch."""
    return ((temperature - 1.0).abs() + (top_k - 20.0).abs() / 20.0).mean()


__all__ = [
    "AdaptiveLogitsProcessor",
    "DecodingControls",
    "expand_controls",
    "likelihood_control_loss",
    "prior_control_loss",
    "soft_top_k_log_probs",
]
