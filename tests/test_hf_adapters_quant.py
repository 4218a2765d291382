"""Issue 6, part A: PEFT/LoRA, QLoRA, bitsandbytes 4/8-bit, accelerate device_map and fp16/bf16, one test per cell
(integration x architecture). Every model is the exported folder loaded with trust_remote_code, as a user without
graftlm loads it; the new modules are opened with noise (conftest `matrix_exports`), so they take part everywhere.

Tolerances are relative: max |logits - float32 logits| / max |float32 logits| (README states them with the errors
measured on these models). Generated tokens are ranked by the float32 model (MAX_RANK)."""

import re

import pytest
import torch
import transformers
from accelerate import infer_auto_device_map
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from testing_utils import MATRIX_ARCHS, is_remote_code, remote_code_only
from transformers import BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from graftlm import registry
from graftlm.conversion.common import modules_to_save

# Documented LoRA targets (GPT-2's Conv1D names, peft sets fan_in_fan_out=True for them); the model cards carry the
# same lists. Scaffold: LoRA on the scaffold GPT-2 only (the base stays frozen). BSBR's new projections are Conv1D
# layers that LoRA adapts (also 4-bit). The new modules train whole through modules_to_save, as
# graftlm.conversion.common.modules_to_save derives it from the model class (README: DFA c_gate, dim_masks,
# entropy_balance; BSBR retrieval_gate; Bridged bridge, controls; Scaffolded one entry per fused layer): DFA's mask
# logits and entropy weight and BSBR's retrieval gate are small modules called in forward(), so peft trains them.
SCAFFOLD_LORA = r"scaffold\.transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
LORA_TARGETS = {
    "dfa": ["c_attn", "c_proj", "c_fc"],
    "bsbr": ["c_attn", "c_proj", "c_fc", "meta_r_proj", "meta_h_proj"],
    "bridge": ["c_attn", "q_attn", "c_proj", "c_fc"],
    "scaffold": SCAFFOLD_LORA,
}
# What modules_to_save comes to on the matrix's exports (the scaffold fuses layers 0 and 1; the bridge has controls).
MODULES_TO_SAVE = {"dfa": ["c_gate", "dim_masks", "entropy_balance"], "bsbr": ["retrieval_gate"],
                   "bridge": ["bridge", "controls"], "scaffold": ["fusers.0", "fusers.1"]}
# Parameters that must stay float32 (and their modules unquantized) under fp16, bf16 and bitsandbytes.
KEEP_FP32 = {
    "dfa": r"\.(c_gate|dim_masks|entropy_balance)\.",
    "bsbr": r"\.retrieval_gate\.|compress_proj",
    "bridge": r"^(bridge|controls)\.",
    "scaffold": r"^fusers\.",
}
BLOCKS = {"dfa": {"DFABlock"}, "bsbr": {"BSBRBlock"}, "bridge": {"BertLayer", "GPT2Block"},
          "scaffold": {"GPT2Block", "ScaffoldFuser"}}
# Stated tolerances (relative logits error, see module docstring).
TOLERANCE = {"fp16": 0.01, "bf16": 0.05, "8bit": 0.1, "4bit": 0.4}
# Highest float32 rank (0: the argmax) of a token generated in each precision (see check_generate); measured at most
# 0 (float16), 1 (bfloat16, 8-bit) and 2 (4-bit nf4) on these models.
MAX_RANK = {"fp16": 1, "bf16": 3, "8bit": 3, "4bit": 5}
SEQ = 32  # BSBR chunk 8: four chunks, so chunk retrieval (meta projections, gates) shapes the logits


def load(arch, folder, **kwargs):
    auto = getattr(transformers, registry.by_name(arch).generation_auto_class)
    with remote_code_only():
        model = auto.from_pretrained(folder, trust_remote_code=True, **kwargs)
    assert is_remote_code(model)
    return model.eval()


def inputs(arch, labels=False):
    """A fixed batch: causal LMs read 32 GPT-2 ids; Bridged reads 10 BERT ids and decodes 16 GPT-2 ids."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (2, SEQ), generator=generator)
    if arch == "bridge":
        batch = dict(input_ids=torch.randint(1000, 30000, (2, 10), generator=generator), decoder_input_ids=ids[:, :16])
        return dict(batch, labels=ids[:, 1:17]) if labels else batch
    return dict(input_ids=ids, labels=ids) if labels else dict(input_ids=ids)


def logits(model, arch):
    batch = {k: v.to(model.device) for k, v in inputs(arch).items()}
    with torch.no_grad():
        return model(**batch).logits.float().cpu()


@pytest.fixture(scope="module")
def float_model(matrix_exports):
    """{arch: the exported model in float32} (loaded once per architecture)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load(arch, matrix_exports[arch])
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def reference(float_model):
    """{arch: float32 logits of the exported model} (computed once per architecture)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = logits(float_model(arch), arch)
        return cache[arch]

    return get


def relative_error(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def check_generate(model, arch, float32_model, max_rank):
    """Greedy generate with the KV cache in low precision, then score the result with the float32 model in one
    uncached forward: every generated token must rank within the float32 model's top `max_rank` + 1 at its position
    (rank 0: its argmax). Low precision may reorder near-ties of these flat tiny random models; it must not pick a
    token the float32 model ranks far down (a rank out of a 50257-token vocabulary)."""
    batch = {k: v.to(model.device) for k, v in inputs(arch).items()}
    eos = model.generation_config.eos_token_id
    new = 6
    if arch == "bridge":
        out = model.generate(input_ids=batch["input_ids"], max_new_tokens=new, min_new_tokens=new, do_sample=False)
        scoring = dict(input_ids=batch["input_ids"].cpu(), decoder_input_ids=out[:, :-1].cpu())
    else:
        prompt = batch["input_ids"][:, :16]
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=eos)
        scoring = dict(input_ids=out[:, :-1].cpu(), use_cache=False)
        if arch == "scaffold":
            scoring["scaffold_input_ids"] = prompt.cpu()
    assert out.shape == (2, (1 if arch == "bridge" else 16) + new)
    with torch.no_grad():
        scores = float32_model(**scoring).logits[:, -new:].float()
    if eos is not None:  # min_new_tokens masks eos during generate
        scores[..., eos] = -torch.inf
    chosen = scores.gather(-1, out[:, -new:, None].cpu())
    ranks = (scores > chosen).sum(-1)
    assert ranks.max().item() <= max_rank, ranks


def check_fp32_params(model, arch, low_dtypes):
    """Parameters named by KEEP_FP32 are float32 in unquantized modules; every other float parameter is low_dtypes."""
    pattern = re.compile(KEEP_FP32[arch])
    kept = []
    for name, param in model.named_parameters():
        if pattern.search(name):
            kept.append(name)
            assert param.dtype == torch.float32, name
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            assert "bitsandbytes" not in type(owner).__module__, f"{name} was quantized"
        elif param.is_floating_point():
            assert param.dtype in low_dtypes, (name, param.dtype)
    assert kept, f"no parameter matches {KEEP_FP32[arch]}"


# --- PEFT / LoRA --------------------------------------------------------------------------------------------------


def lora_config(arch, model):
    to_save = modules_to_save(model)
    assert to_save == MODULES_TO_SAVE[arch]
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], modules_to_save=to_save, task_type=task)


def train_steps(model, arch, steps, lr):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(**inputs(arch, labels=True)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_peft_lora(arch, matrix_exports, reference, tmp_path):
    model = load(arch, matrix_exports[arch])
    peft_model = get_peft_model(model, lora_config(arch, model))
    lora = [m for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert lora and all(isinstance(m.get_base_layer(), Conv1D) and m.fan_in_fan_out for m in lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable), trainable
    for wrapped in MODULES_TO_SAVE[arch]:  # every modules_to_save entry trains
        assert any(re.search(rf"(^|\.){re.escape(wrapped)}\.modules_to_save\.", n) for n in trainable), wrapped
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".modules_to_save." in n
              or ".original_module." in n}

    train_steps(peft_model, arch, steps=3, lr=1e-2)
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in lora)  # the adapter is not the zero update
    after = {n: p.detach().clone() for n, p in peft_model.named_parameters() if n in before}
    for wrapped in MODULES_TO_SAVE[arch]:  # the adapter's copy of every modules_to_save entry moved, the base module did not
        entry = re.compile(rf"(^|\.){re.escape(wrapped)}\.")
        copies = [n for n in before if entry.search(n) and ".modules_to_save." in n]
        assert any(not torch.equal(before[n], after[n]) for n in copies), f"{wrapped}: its copy did not train"
        assert all(torch.equal(before[n], after[n]) for n in before if entry.search(n) and ".original_module." in n)
    trained = logits(peft_model, arch)
    assert relative_error(trained, reference(arch)) > 1e-3
    peft_model.merge_adapter()  # W + scale * (B A)^T for Conv1D's (in, out) weights: wrong fan_in_fan_out differs
    torch.testing.assert_close(logits(peft_model, arch), trained, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(arch, matrix_exports[arch]), tmp_path / "adapter").eval()
    restored = dict(reloaded.named_parameters())
    assert all(torch.equal(restored[n], after[n]) for n in after if ".modules_to_save." in n)  # trained copies reload
    assert (logits(reloaded, arch) - trained).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_qlora(arch, matrix_exports):
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = prepare_model_for_kbit_training(
        load(arch, matrix_exports[arch], quantization_config=nf4), gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert model.is_activation_checkpointing
    peft_model = get_peft_model(model, lora_config(arch, model))
    assert any("Linear4bit" in type(m.get_base_layer()).__name__ for m in peft_model.modules() if hasattr(m, "lora_A"))

    def loss():
        # In eval mode (no dropout) but with autograd on: bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16
        # CPU inference on a no-grad eval forward, after which a training forward fails (in-place bias add).
        return peft_model(**inputs(arch, labels=True)).loss.item()

    before = loss()
    train_steps(peft_model, arch, steps=1, lr=1e-2)
    assert loss() < before


# --- bitsandbytes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_bnb_4bit(arch, matrix_exports, reference, float_model):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    check_bnb(arch, matrix_exports, reference, float_model, config, "Linear4bit", "4bit")


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_bnb_8bit(arch, matrix_exports, reference, float_model):
    config = BitsAndBytesConfig(load_in_8bit=True)
    check_bnb(arch, matrix_exports, reference, float_model, config, "Linear8bitLt", "8bit")


def check_bnb(arch, matrix_exports, reference, float_model, config, layer_class, precision):
    model = load(arch, matrix_exports[arch], quantization_config=config)
    assert any(type(m).__name__ == layer_class for m in model.modules())
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # tied to the embedding: never quantized
    check_fp32_params(model, arch, low_dtypes={torch.float32})
    assert relative_error(logits(model, arch), reference(arch)) <= TOLERANCE[precision]
    check_generate(model, arch, float_model(arch), MAX_RANK[precision])


# --- accelerate device_map -----------------------------------------------------------------------------------------


def device_of(device_map, name):
    """The device a parameter or module lands on: the entry of its longest enclosing prefix."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)]


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_device_map_auto(arch, matrix_exports, reference, tmp_path):
    model = load(arch, matrix_exports[arch], device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # no accelerator here: all of it on the CPU
    assert torch.equal(logits(model, arch), reference(arch))

    no_split = set(model._no_split_modules)
    assert BLOCKS[arch] <= no_split <= {type(m).__name__ for m in model.modules()}
    # What "auto" does on a machine whose memory lacks room for one block: the last modules go to disk.
    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    block = min(size(m) for m in model.modules() if type(m).__name__ in no_split)
    budget = {"cpu": size(model) - block}
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=list(no_split))
    assert {"cpu", "disk"} <= set(device_map.values())
    for name, module in model.named_modules():
        if type(module).__name__ in no_split:  # whole on one device: no entry inside it
            assert not any(key.startswith(name + ".") for key in device_map), name
    for source, target in model.all_tied_weights_keys.items():
        assert device_of(device_map, source) == device_of(device_map, target), (source, target)

    offloaded = load(arch, matrix_exports[arch], device_map=device_map, offload_folder=tmp_path / "offload")
    assert "disk" in offloaded.hf_device_map.values()
    torch.testing.assert_close(logits(offloaded, arch), reference(arch), atol=1e-6, rtol=0)


# --- dtypes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_fp16(arch, matrix_exports, reference, float_model):
    check_dtype(arch, matrix_exports, reference, float_model, torch.float16, "fp16")


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_bf16(arch, matrix_exports, reference, float_model):
    check_dtype(arch, matrix_exports, reference, float_model, torch.bfloat16, "bf16")


def check_dtype(arch, matrix_exports, reference, float_model, dtype, precision):
    model = load(arch, matrix_exports[arch], dtype=dtype)
    check_fp32_params(model, arch, low_dtypes={dtype})
    out = model(**inputs(arch)).logits
    assert out.dtype == dtype
    assert relative_error(out.detach().float(), reference(arch)) <= TOLERANCE[precision]
    check_generate(model, arch, float_model(arch), MAX_RANK[precision])
