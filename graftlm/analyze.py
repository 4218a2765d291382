"""`graftlm analyze`: how a GPT2-DFA model uses its heads and head dimensions (the seed's research directions
1 and 2): gate entropy per layer, the tokens that draw the most and the fewest heads, active dimensions per head,
and estimated attention FLOPs against stock GPT-2. Writes analysis.json and PNG plots."""

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .inputs import read_text


def attention_flops_per_token(config, seq_len, layer_shapes=None):
    """Multiply-adds x 2 of one token's attention block at context `seq_len`, summed over layers.

    layer_shapes: [(heads, qk_dims, v_dims)] per layer; None means stock GPT-2 (n_head heads of n_embd/n_head).
    Counts the q/k/v and output projections, q.k scores and the weighted sum of values (and the gate projection
    when layer_shapes is given). LayerNorms and softmax are left out (small next to these).
    """
    d = config.n_embd
    total = 0
    for layer in range(config.n_layer):
        heads, qk, v = layer_shapes[layer] if layer_shapes else (config.n_head, d // config.n_head, d // config.n_head)
        total += 2 * d * heads * (2 * qk + v)  # c_attn
        total += 2 * heads * v * d  # c_proj
        total += 2 * seq_len * heads * (qk + v)  # scores and weighted values
        if layer_shapes:
            total += 2 * d * config.n_head  # c_gate
    return total


@torch.no_grad()
def collect(model, tokenizer, text, max_length):
    """Gate statistics over `text` in windows of `max_length` tokens."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ValueError("the text file holds no tokens")
    n_layers, n_head = model.config.n_layer, model.config.n_head
    entropy_sum = torch.zeros(n_layers)
    head_sum = [torch.zeros(len(block.attn.kept_heads)) for block in model.transformer.h]
    per_token = defaultdict(list)
    rows = 0
    for start in tqdm(range(0, ids.numel(), max_length), desc="analyzing"):
        window = ids[start : start + max_length][None]
        gates = model(input_ids=window, output_gates=True, use_cache=False).gates
        effective = torch.zeros(window.shape[1])
        for layer, g in enumerate(gates):
            g = g[0].expand(window.shape[1], -1)  # (tokens, heads kept); sequence mode repeats its one row
            p = g / n_head
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
            entropy_sum[layer] += entropy.sum()
            head_sum[layer] += g.sum(0)
            effective += entropy.exp()  # perplexity of the gate distribution = effective number of heads
        rows += window.shape[1]
        for token, value in zip(window[0].tolist(), (effective / n_layers).tolist()):
            per_token[token].append(value)
    return ids.numel(), entropy_sum / rows, [h / rows for h in head_sum], per_token


def analyze(model_dir, text_file, output_dir, max_length=None, top=12, overwrite=False):
    """Write analysis.json and the PNG plots into `output_dir` (refused when not empty, unless `overwrite`; written
    whole or not at all, like an export); returns their paths. Windows of `max_length` tokens, at most the model's
    n_positions (default: 256, or n_positions if smaller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .export import check_output_dir, staged_folder
    from .inference import load_model_and_tokenizer

    check_output_dir(output_dir, overwrite, {"model": model_dir, "text": text_file})
    text = read_text(text_file)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    if model.config.model_type != "gpt2_dfa":
        raise ValueError(f"{model_dir} is a {model.config.model_type!r} model; analyze needs GPT2-DFA (gpt2_dfa)")
    max_length = min(256, model.config.n_positions) if max_length is None else max_length
    if not 1 <= max_length <= model.config.n_positions:
        raise ValueError(f"max_length must be in [1, n_positions={model.config.n_positions}] of {model_dir}, "
                         f"got {max_length}")
    n_tokens, entropy, head_usage, per_token = collect(model, tokenizer, text, max_length)
    config, n_head = model.config, model.config.n_head

    threshold = config.mask_threshold
    active_qk, active_v, shapes_now, shapes_active = [], [], [], []
    for block in model.transformer.h:
        q, k, v = block.attn.dim_masks()
        qk_open, v_open = ((q * k) >= threshold).sum(1), (v >= threshold).sum(1)
        active_qk.append(qk_open.tolist())
        active_v.append(v_open.tolist())
        shapes_now.append((block.attn.num_heads, block.attn.qk_dim, block.attn.v_dim))
        shapes_active.append((block.attn.num_heads, int(qk_open.max()), int(v_open.max())))

    counted = {t: sum(v) / len(v) for t, v in per_token.items() if len(v) >= 2}
    ranked = sorted(counted.items(), key=lambda item: item[1])
    def decode(token_id):
        return tokenizer.decode([token_id])

    fewest = [{"token": decode(t), "effective_heads": v} for t, v in ranked[:top]]
    most = [{"token": decode(t), "effective_heads": v} for t, v in ranked[::-1][:top]]
    lengths = [64, 128, 256, 512, 1024]
    flops = {
        str(n): {
            "stock_gpt2": attention_flops_per_token(config, n),
            "dfa_current_shapes": attention_flops_per_token(config, n, shapes_now),
            "dfa_after_pruning_closed_dims": attention_flops_per_token(config, n, shapes_active),
        }
        for n in lengths
    }
    result = {
        "model": str(model_dir),
        "text": str(text_file),
        "tokens": n_tokens,
        "gate_mode": config.gate_mode,
        "gate_entropy_per_layer_normalised": (entropy / math.log(n_head)).tolist() if n_head > 1 else None,
        "mean_gate_per_head": [h.tolist() for h in head_usage],
        "active_qk_dims_per_head": active_qk,
        "active_v_dims_per_head": active_v,
        "head_dim": config.head_dim,
        "tokens_with_most_heads": most,
        "tokens_with_fewest_heads": fewest,
        "attention_flops_per_token": flops,
    }
    with staged_folder(output_dir, overwrite) as folder:  # nothing is written unless all of it is
        paths = ["analysis.json"]
        (folder / paths[0]).write_text(json.dumps(result, indent=2), encoding="utf-8")

        layers = range(config.n_layer)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        axes[0].bar(layers, result["gate_entropy_per_layer_normalised"] or [0] * config.n_layer)
        axes[0].set(xlabel="layer", ylabel="gate entropy / ln(H)", title="Head-usage entropy per layer", ylim=(0, 1.05))
        usage = torch.full((config.n_layer, n_head), float("nan"))
        for layer, block in enumerate(model.transformer.h):
            usage[layer, block.attn.kept_heads] = head_usage[layer]
        image = axes[1].imshow(usage.numpy(), aspect="auto", cmap="viridis")
        axes[1].set(xlabel="head", ylabel="layer", title="Mean gate per head (1 = uniform)")
        fig.colorbar(image, ax=axes[1])
        paths.append(_save(fig, folder / "head_usage.png"))

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, dims, name in ((axes[0], active_qk, "q.k"), (axes[1], active_v, "v")):
            grid = torch.full((config.n_layer, n_head), float("nan"))
            for layer, block in enumerate(model.transformer.h):
                grid[layer, block.attn.kept_heads] = torch.tensor(dims[layer], dtype=torch.float)
            image = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=config.head_dim)
            ax.set(xlabel="head", ylabel="layer", title=f"Active {name} dimensions per head (of {config.head_dim})")
            fig.colorbar(image, ax=ax)
        paths.append(_save(fig, folder / "active_dims.png"))

        fig, ax = plt.subplots(figsize=(8, 0.35 * (len(most) + len(fewest)) + 1.5))
        entries = fewest + most[::-1]
        ax.barh(range(len(entries)), [e["effective_heads"] for e in entries],
                color=["tab:blue"] * len(fewest) + ["tab:orange"] * len(most))
        ax.set_yticks(range(len(entries)), [repr(e["token"]) for e in entries])
        ax.set(xlabel="effective number of heads (exp of gate entropy), mean over layers",
               title="Tokens drawing the fewest (blue) and most (orange) heads")
        paths.append(_save(fig, folder / "token_heads.png"))

        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("stock_gpt2", "stock GPT-2"), ("dfa_current_shapes", "GPT2-DFA (current shapes)"),
                           ("dfa_after_pruning_closed_dims", "GPT2-DFA after prune()")):
            ax.plot(lengths, [flops[str(n)][key] / 1e6 for n in lengths], marker="o", label=label)
        ax.set(xscale="log", xlabel="context length", ylabel="attention MFLOPs per token", title="Estimated attention FLOPs")
        ax.legend()
        paths.append(_save(fig, folder / "attention_flops.png"))
    return [Path(output_dir).resolve() / name for name in paths]


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
