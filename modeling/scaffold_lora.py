"""LoRA on the scaffold GPT-2 through peft: attach, merge, detach for saving, and the separate adapter files.

A separately saved adapter is a standard peft LoRA adapter for the scaffold GPT-2 (adapter_config.json and
adapter_model.safetensors with `base_model.model.` keys), so `peft.PeftModel.from_pretrained(gpt2, folder)`
reads it as well. peft is imported only when an adapter is attached: a merged model loads without it.
"""

from contextlib import contextmanager
from pathlib import Path

ADAPTER_SUBFOLDER = "scaffold_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."


def lora_config(config):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
        bias="none",
    )


def lora_layers(module):
    """[(parent, child name, peft LoRA layer)] inside `module` (duck-typed, so peft is not imported)."""
    found = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if hasattr(child, "lora_A") and hasattr(child, "base_layer"):
                found.append((parent, name, child))
    return found


def attach_lora(scaffold, config):
    """Inject fresh LoRA adapters (B = 0, so the scaffold's output is unchanged) into `scaffold` in place."""
    from peft import inject_adapter_in_model

    if lora_layers(scaffold):
        raise ValueError("the scaffold already carries LoRA adapters")
    inject_adapter_in_model(lora_config(config), scaffold, adapter_name=_ADAPTER_NAME)


def merge_lora(scaffold):
    """Fold every adapter into its layer's weight (W + alpha/r * B A) and put the plain GPT-2 layer back."""
    layers = lora_layers(scaffold)
    if not layers:
        raise ValueError("the scaffold carries no LoRA adapters to merge")
    for parent, name, layer in layers:
        layer.merge()
        setattr(parent, name, layer.get_base_layer())
    scaffold.__dict__.pop("peft_config", None)


@contextmanager
def lora_detached(scaffold):
    """Temporarily swap every LoRA layer for its plain base layer (GPT-2 parameter names, unmerged weights)."""
    layers = lora_layers(scaffold)
    for parent, name, layer in layers:
        setattr(parent, name, layer.get_base_layer())
    try:
        yield
    finally:
        for parent, name, layer in layers:
            setattr(parent, name, layer)


def adapter_state_dict(scaffold):
    """The adapter weights under peft's saved names: base_model.model.<module>.lora_A.weight."""
    suffix = f".{_ADAPTER_NAME}.weight"
    state = {}
    for name, param in scaffold.named_parameters():
        if ".lora_" in name:
            if not name.endswith(suffix):
                raise ValueError(f"unexpected LoRA parameter {name!r}")
            state[_PEFT_PREFIX + name[: -len(suffix)] + ".weight"] = param.detach().contiguous().cpu()
    return state


def save_adapter(scaffold, config, folder):
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(scaffold), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    lora_config(config).save_pretrained(str(folder))  # adapter_config.json, as peft writes it


def load_adapter(scaffold, weights_file):
    """Copy a saved adapter into the scaffold's (attached) adapters; every key must match, shapes included."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(weights_file))
    current = adapter_state_dict(scaffold)
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    shapes = [k for k in set(current) & set(saved) if current[k].shape != saved[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"adapter {weights_file} does not fit the scaffold's LoRA layers: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {sorted(shapes)}"
        )
    params = dict(scaffold.named_parameters())
    suffix = f".{_ADAPTER_NAME}.weight"
    with torch.no_grad():
        for key, value in saved.items():
            target = params[key[len(_PEFT_PREFIX) : -len(".weight")] + suffix]
            target.copy_(value.to(target.dtype))
