"""Input checks shared by the GPT-2-based models: GPT-2's learned position table has n_positions rows."""

import torch


def checked_position_ids(inputs_embeds, past_length, n_positions, attention_mask=None, position_ids=None):
    """Validate a forward's length and 2-D attention mask against GPT-2's position table; return position_ids.

    Without position_ids, positions continue from the cache (0, 1, 2, ... as in stock GPT-2); generate() passes
    positions derived from the attention mask for left-padded batches.
    """
    seq = inputs_embeds.shape[1]
    if past_length + seq > n_positions:
        raise ValueError(
            f"input of {past_length + seq} positions ({past_length} cached + {seq} new) is longer than "
            f"n_positions={n_positions}"
        )
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] != past_length + seq:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} positions, expected {past_length + seq} "
            f"({past_length} cached + {seq} new)"
        )
    if position_ids is None:
        return torch.arange(past_length, past_length + seq, device=inputs_embeds.device)[None, :]
    if position_ids.numel() and int(position_ids.max()) >= n_positions:
        raise ValueError(f"position_ids reach {int(position_ids.max())}, n_positions is {n_positions}")
    return position_ids
