"""`graftlm bench`'s shapes and targets, the models it compares, and how it measures time and memory (also used by
bench/bench_bsbr.py and bench/bench_compile.py)."""

import copy
import ctypes
import logging
import re
import statistics
import time
from pathlib import Path

import torch

from .. import registry

logger = logging.getLogger(__name__)

ARCHS = tuple(registry.names())
LABELS = {"gpt2": "GPT-2", **{arch.name: arch.label for arch in registry.all_architectures()}}
# Model shapes. "tiny" shrinks the vocabulary with the width, so that the LM head's share of the work stays close to
# GPT-2-small's (head / blocks = 38.6M / 85M parameters there, 2.1M / 3.1M here).
SIZES = {
    "quick": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, cross_attn_layers=[0, 1], chunk_size=16),
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, cross_attn_layers=[1, 2], chunk_size=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, cross_attn_layers=[5, 7], chunk_size=128),
}
DECODE_TARGETS = {arch.name: arch.decode_target for arch in registry.all_architectures()}  # tokens/s ratio, at least
# step time ratio, at most; the others are reported
TRAIN_TIME_TARGETS = {arch.name: arch.train_time_target for arch in registry.all_architectures()
                      if arch.train_time_target is not None}
PRUNED_DECODE_TARGET = 1.3  # pruned / unpruned tokens/s, at least
CONVERSION_TARGET_S = 15.0  # seconds, at most
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


# ----- measuring (also used by bench/bench_bsbr.py) -----


def _status_kb(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_memory_mb(fn, device):
    """Run fn() once; return (its result, peak memory above the level before the call, in MiB).

    CUDA: torch.cuda.max_memory_allocated. CPU: the peak resident set size (Linux VmHWM, reset through
    /proc/self/clear_refs); call follow_live_tensors() first, so that the resident size follows the live tensors."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    before = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before) / 2**10


def follow_live_tensors():
    """Make glibc return freed tensors (>= 64 KiB) to the system, as MALLOC_MMAP_THRESHOLD_=65536 would, so that the
    resident size measured by peak_memory_mb does not keep earlier runs' memory. Returns False off glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536))
    except (OSError, AttributeError):
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, device, repeats):
    """Wall times of `repeats` runs of fn() after one warm-up run, synchronising CUDA around each."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def timed(fn, device, repeats):
    """Best wall time of fn() over `repeats` runs after one warm-up (the minimum is the least disturbed by other
    processes sharing the machine, as timeit recommends)."""
    return min(time_runs(fn, device, repeats))


def _stats(times):
    return {"best_s": min(times), "median_s": statistics.median(times)}


# ----- models -----


def stock_config(shape, n_positions):
    from transformers import GPT2Config

    return GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                      vocab_size=shape["vocab_size"], n_positions=n_positions,
                      bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1)


def save_checkpoints(shape, n_positions, folder, tokenizers=False):
    """Random stock GPT-2 and BERT checkpoints of one shape (BERT as wide and deep as GPT-2), as Hub folders; with
    `tokenizers`, also the real tokenizers, with the vocabularies their ids need."""
    from transformers import BertConfig, BertModel, GPT2LMHeadModel

    folder = Path(folder)
    torch.manual_seed(0)
    gpt2_vocab = 50257 if tokenizers else shape["vocab_size"]  # GPT-2's tokenizer: each of its ids needs an embedding
    GPT2LMHeadModel(stock_config({**shape, "vocab_size": gpt2_vocab}, n_positions)).save_pretrained(folder / "gpt2")
    bert_vocab = 30522 if tokenizers else shape["vocab_size"]  # the packaged BERT tokenizer's vocabulary
    bert = BertConfig(vocab_size=bert_vocab, hidden_size=shape["n_embd"], num_hidden_layers=shape["n_layer"],
                      num_attention_heads=shape["n_head"], intermediate_size=4 * shape["n_embd"],
                      max_position_embeddings=max(512, n_positions))
    BertModel(bert).save_pretrained(folder / "bert")
    if tokenizers:
        from ..conversion.common import load_tokenizer
        from ..offline import packaged_bert, write_gpt2_tokenizer_files

        write_gpt2_tokenizer_files(folder / "gpt2")
        load_tokenizer(packaged_bert()).save_pretrained(folder / "bert")
    return folder / "gpt2", folder / "bert"


def convert_arguments(arch, gpt2_dir, bert_dir, shape):
    """`graftlm convert <arch>` arguments for the bench's checkpoints (the scaffold reads the same GPT-2 twice; the
    bridge goes without its optional decoding controls)."""
    from ..convert import example_arguments

    return example_arguments(arch, gpt2_dir, gpt2_dir, bert_dir, {**shape, "controls": False})


@torch.no_grad()
def open_identity_parameters(model, scale=0.5, seed=0):
    """Add seeded noise to the parameters that start the new modules as the identity (the model class's
    _identity_parameters), as training would open them; returns their names."""
    pattern = type(model)._identity_parameters
    generator = torch.Generator().manual_seed(seed)
    opened = [name for name, _ in model.named_parameters() if re.search(pattern, name)]
    if not opened:
        raise ValueError(f"no parameter of {type(model).__name__} matches _identity_parameters {pattern!r}")
    params = dict(model.named_parameters())
    for name in opened:
        params[name].add_(scale * torch.randn(params[name].shape, generator=generator))
    return opened


def convert(arch, gpt2_dir, bert_dir, shape):
    """The converted model (eval mode) with its identity-initialised parameters opened with noise, as training would
    open them, so that every branch runs."""
    from ..convert import converted_model

    model, _ = converted_model(arch, convert_arguments(arch, gpt2_dir, bert_dir, shape))
    open_identity_parameters(model)
    return model.eval()


def prune_half(dfa):
    """A copy of GPT2-DFA whose masks close half of every head's q/k/v dimensions, then pruned away."""
    pruned = copy.deepcopy(dfa)
    with torch.no_grad():
        for block in pruned.transformer.h:
            for mask in (block.attn.dim_masks.q, block.attn.dim_masks.k, block.attn.dim_masks.v):
                mask[:, mask.shape[1] // 2:] = -10.0  # 2 * sigmoid(-10) ~ 1e-4 < mask_threshold
    pruned.prune()
    return pruned


# ----- measurements -----


def forward_kwargs(model, ids, labels=False):
    """One full forward over `ids`: an encoder-decoder's encoder and decoder both read them."""
    kwargs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    if labels:
        kwargs["labels"] = ids
    return kwargs


class StepClock:
    """A stopping criterion that never stops: it timestamps every token generate() produces (after a CUDA sync)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_rate(model, ids, new_tokens, device, repeats):
    """Greedy cached decoding of exactly `new_tokens` tokens through generate(), timed per token. The bridge's encoder
    reads the prompt and its decoder starts from decoder_start_token_id; every other model continues the prompt.

    prefill: from the call to the first token (the scaffold's and the encoder's one read of the prompt included);
    tokens/s: of the new_tokens - 1 cached steps after it, in the best of `repeats` runs after a warm-up."""
    from transformers import StoppingCriteriaList

    runs = []
    for _ in range(repeats + 1):
        clock = StepClock(device)
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([clock]))
        if len(clock.stamps) != new_tokens:
            raise RuntimeError(f"generate produced {len(clock.stamps)} tokens instead of {new_tokens}")
        runs.append((clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0]))
    prefill, steps = [r[0] for r in runs[1:]], [r[1] for r in runs[1:]]
    return {"tokens_per_s": ids.shape[0] * (new_tokens - 1) / min(steps), "decode_s": _stats(steps),
            "prefill_s": _stats(prefill)}


def train_step_fn(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(**forward_kwargs(model, ids, labels=True)).loss.backward()

    return step


def verdict(value, target, at_least):
    if target is None:
        return "report"
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


