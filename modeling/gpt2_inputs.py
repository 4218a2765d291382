"""Input checks shared by the GPT-2-based models: GPT-2's learned position table has n_positions rows.

None of them waits for the device (no host sync), so a decode step stays one graph under torch.compile: lengths are
checked on the host from shapes, and what only the device knows (explicit position_ids, the fill of a static cache
without an attention mask) with torch._assert_async, which raises at once on the CPU and as a device-side assert on
an accelerator.
"""

import torch


def checked_position_ids(inputs_embeds, past_length, n_positions, attention_mask=None, position_ids=None):
    """Validate a forward's length and 2-D attention mask against GPT-2's position table; return position_ids.

    past_length: the cache's get_seq_length(), an int (DynamicCache) or a 0-d tensor (StaticCache counts on the
    device; then the 2-D mask, which spans cached + new tokens, gives the length on the host).
    Without position_ids, positions continue from the cache (0, 1, 2, ... as in stock GPT-2); generate() passes
    positions derived from the attention mask for left-padded batches, and packed (padding-free) rows restart them.
    The input's length must fit the table, except for packed rows, which only their positions bound.
    """
    seq = inputs_embeds.shape[1]
    mask_2d = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    if not isinstance(past_length, torch.Tensor):
        total = past_length + seq
        # Packed rows (position_ids with no mask and nothing cached, as DataCollatorWithFlattening lays them out) may
        # be longer than the table as long as each row's positions fit it.
        packed = position_ids is not None and attention_mask is None and past_length == 0
        if total > n_positions and not packed:
            raise ValueError(
                f"input of {total} positions ({past_length} cached + {seq} new) is longer than n_positions={n_positions}"
            )
        if mask_2d is not None and mask_2d.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {mask_2d.shape[1]} positions, expected {total} ({past_length} cached + {seq} new)"
            )
    elif mask_2d is not None:
        if mask_2d.shape[1] > n_positions:
            raise ValueError(
                f"attention_mask covers {mask_2d.shape[1]} positions (cached + new), longer than n_positions={n_positions}"
            )
    else:
        torch._assert_async(past_length + seq <= n_positions, f"input is longer than n_positions={n_positions}")
    if position_ids is None:
        return torch.arange(seq, device=inputs_embeds.device)[None, :] + past_length
    if position_ids.numel():
        torch._assert_async((position_ids < n_positions).all(), f"position_ids reach n_positions={n_positions}")
    return position_ids
