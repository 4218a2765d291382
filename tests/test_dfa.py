import json
import math

import pytest
import torch
from testing_utils import gpt2_tokenizer, one_torch_thread, save_tiny_gpt2
from transformers import GPT2LMHeadModel

import graftlm  # noqa: F401  registers the architectures
from graftlm.cli import main as cli_main
from graftlm.configuration.configuration_dfa import DFAConfig
from graftlm.conversion.common import ConversionError, probe_batch
from graftlm.conversion.dfa import convert_gpt2_to_dfa
from graftlm.modeling.modeling_dfa import DFAForCausalLM

# Two tiny GPT-2s: one with a head count that is not a power of two.
GPT2_CONFIGS = {"4heads": dict(n_head=4, n_embd=32), "3heads": dict(n_head=3, n_embd=48, n_layer=3)}


@pytest.fixture(scope="module", params=list(GPT2_CONFIGS))
def converted(request, tmp_path_factory):
    base = save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), seed=1, **GPT2_CONFIGS[request.param])
    model, report = convert_gpt2_to_dfa(base)
    return base, model, report


def left_padded_batch(vocab=50257, seq=12):
    return probe_batch(vocab, seq_len=seq, batch_size=3, seed=3)


def positions(mask):
    """Position ids for a left-padded batch, as generate() builds them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def perturb(model, seed=0, scale=1.0):
    """Move every DFA parameter away from the identity, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "c_gate" in name or ".dim_masks." in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_dfa_reproduces_stock_gpt2_logits(converted, attn_implementation):
    base, _, report = converted
    stock = GPT2LMHeadModel.from_pretrained(base, attn_implementation=attn_implementation).eval()
    model, _ = convert_gpt2_to_dfa(base)
    model.set_attn_implementation(attn_implementation)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4
    assert report.max_abs_logit_delta <= 1e-4


def test_greedy_generate_equals_stock(converted):
    """(With and without the cache: test_contract.py's test_generate_with_the_cache_equals_without.)"""
    base, model, _ = converted
    stock = GPT2LMHeadModel.from_pretrained(base).eval()
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kwargs)
        reference = stock.generate(**kwargs)
    assert torch.equal(cached, reference)


def test_sampling_runs_and_is_reproducible(converted):
    _, model, _ = converted
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    first = model.generate(**kwargs)
    torch.manual_seed(0)
    second = model.generate(**kwargs, use_cache=False)
    assert first.shape == (3, ids.shape[1] + 8)
    assert torch.equal(first, second)


def test_sequence_gates_come_from_the_first_real_token(tiny_gpt2_dir):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, gate_mode="sequence")
    perturb(model, scale=3.0)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        gates = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), output_gates=True).gates
        # Row 2 alone, without its padding, must get the same gates.
        first = int(mask[1].argmax())
        alone = model(input_ids=ids[1:2, first:], output_gates=True).gates
    for layer_gates, layer_alone in zip(gates, alone):
        assert layer_gates.shape[1] == 1
        torch.testing.assert_close(layer_gates[1], layer_alone[0])


def test_padding_changes_nothing_for_real_tokens(tiny_gpt2_dir):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir)
    perturb(model)
    ids, mask = left_padded_batch()
    first = int(mask[1].argmax())
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[1, first:]
        alone = model(input_ids=ids[1:2, first:]).logits[0]
    assert (padded - alone).abs().max().item() <= 1e-4


def test_outputs_carry_each_loss_part(tiny_gpt2_dir):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, mask_sparsity_weight=0.01, target_entropy_ratio=0.9)
    ids, _ = left_padded_batch()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    n_head = model.config.n_head
    assert out.gate_entropy.item() == pytest.approx(math.log(n_head), abs=1e-5)  # uniform gates at conversion
    assert out.entropy_weight.item() == pytest.approx(0.01)
    assert out.active_dim_fraction.item() == 1.0
    expected_aux = -0.01 * math.log(n_head) + 0.01 * (math.log(n_head) - 0.9 * math.log(n_head)) + 0.01 * 1.0
    assert out.aux_loss.item() == pytest.approx(expected_aux, rel=1e-5)


def test_regularizers_are_computed_for_training_and_on_request_only(tiny_gpt2_dir):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir)
    ids, _ = left_padded_batch()
    with torch.no_grad():
        plain = model(input_ids=ids)
        asked = model(input_ids=ids, output_regularizers=True)
    assert plain.aux_loss is None and plain.gate_entropy is None
    assert asked.aux_loss is not None and asked.active_dim_fraction.item() == 1.0
    torch.testing.assert_close(plain.logits, asked.logits)
    model.train()
    assert model(input_ids=ids).aux_loss is not None


def test_one_optimisation_step_moves_gates_masks_and_lambda(tiny_gpt2_dir):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, mask_sparsity_weight=0.01)
    model.train()
    tracked = {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if "c_gate" in name or ".dim_masks." in name or "entropy_balance" in name
    }
    # No weight decay: with AdamW's default 0.01, decay alone moves log(lambda) (it pulls it up toward 0), so every
    # move below comes from the loss's gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = {name for name, before in tracked.items() if not torch.equal(before, dict(model.named_parameters())[name])}
    assert any("c_gate" in name for name in moved)
    assert any(name.endswith("dim_masks.q") for name in moved) and any(name.endswith("dim_masks.v") for name in moved)
    # Uniform gates at conversion: the entropy is at its maximum, above the target, so lambda falls.
    log_weight = model.transformer.entropy_balance.log_weight
    assert log_weight.item() < tracked["transformer.entropy_balance.log_weight"].item()


@pytest.mark.parametrize("direction", ["below_target", "above_target"])
def test_entropy_weight_rises_below_target_and_falls_above(tiny_gpt2_dir, direction):
    if direction == "below_target":
        # Peaked gates (low entropy) and the highest possible target: lambda must rise.
        model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, target_entropy_ratio=1.0)
        perturb(model, scale=5.0)
    else:
        # Uniform gates (maximal entropy) and a low target: lambda must fall.
        model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, target_entropy_ratio=0.2)
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    log_weight = model.transformer.entropy_balance.log_weight
    optimizer = torch.optim.SGD([log_weight], lr=10.0)
    before = log_weight.item()
    out = model(input_ids=ids, labels=ids)
    below = out.gate_entropy.item() < model.target_entropy()
    assert below == (direction == "below_target")
    out.loss.backward()
    optimizer.step()
    after = log_weight.item()
    assert (after > before) if below else (after < before)


def test_train_dfa_defaults_raise_lambda_within_150_steps_when_gate_entropy_is_below_target(tiny_gpt2_dir, tmp_path):
    """`graftlm train dfa` with its default learning rates, from peaked gates (entropy 0.12, target 1.25 at ratio 0.9):
    lambda at least doubles within 150 steps (measured: 0.01 -> 0.53; at the common learning rate, 1e-4, it moved by
    1%). One window of 8 tokens per step and one thread keep it fast (about 15 s); Adam's step sizes, and so the dual
    ascent's pace, do not depend on the batch."""
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, target_entropy_ratio=0.9)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_gate.bias[0] = 5.0  # every token sends almost all of its weight to head 0
        out = model(input_ids=left_padded_batch()[0], output_regularizers=True)
    assert out.gate_entropy.item() < 0.5 * model.target_entropy()
    lambda_before = out.entropy_weight.item()
    model.save_pretrained(tmp_path / "peaked")
    gpt2_tokenizer().save_pretrained(tmp_path / "peaked")
    from graftlm.offline import offline_text

    (tmp_path / "text.txt").write_text(offline_text()[:20000], encoding="utf-8")
    with one_torch_thread():
        assert cli_main(["train", "dfa", "--model", str(tmp_path / "peaked"), "--text", str(tmp_path / "text.txt"),
                         "--output-dir", str(tmp_path / "tuned"), "--max-steps", "150", "--batch-size", "1",
                         "--seq-len", "8"]) == 0
    metrics = json.loads((tmp_path / "tuned" / "training_metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 150
    assert metrics["entropy_weight"] >= 2 * lambda_before, metrics["entropy_weight"]


def test_peft_modules_to_save_trains_masks_and_entropy_balance(tiny_gpt2_dir):
    """Under PEFT the mask logits and lambda train through modules_to_save: the adapter's copies move after one step,
    the base modules stay, and the model reads the copies (the adapter's lambda and closed masks show in the outputs,
    the base ones with the adapter disabled)."""
    from peft import LoraConfig, get_peft_model

    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir, mask_sparsity_weight=0.01)
    base = {name: param.detach().clone() for name, param in model.named_parameters()
            if ".dim_masks." in name or "entropy_balance" in name}
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                                  modules_to_save=["c_gate", "dim_masks", "entropy_balance"]))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    peft_model.eval()
    balance = model.transformer.entropy_balance
    masks = [block.attn.dim_masks for block in model.transformer.h]
    for i, wrapper in enumerate(masks):
        for part in "qkv":
            key = f"transformer.h.{i}.attn.dim_masks.{part}"
            assert not torch.equal(getattr(wrapper.modules_to_save["default"], part), base[key]), key
            assert torch.equal(getattr(wrapper.original_module, part), base[key]), key
    trained_log_weight = balance.modules_to_save["default"].log_weight
    assert trained_log_weight != base["transformer.entropy_balance.log_weight"]
    assert torch.equal(balance.original_module.log_weight, base["transformer.entropy_balance.log_weight"])

    with torch.no_grad():
        for wrapper in masks:
            wrapper.modules_to_save["default"].v.fill_(-30.0)  # close every v dimension in the adapter's copy
        adapted = peft_model(input_ids=ids, output_regularizers=True)
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, output_regularizers=True)
    assert adapted.entropy_weight == trained_log_weight.exp() and adapted.active_dim_fraction < 0.6
    assert plain.entropy_weight.item() == pytest.approx(0.01) and plain.active_dim_fraction == 1.0


def close_half_the_dimensions(model):
    with torch.no_grad():
        for block in model.transformer.h:
            for mask in (block.attn.dim_masks.q, block.attn.dim_masks.k, block.attn.dim_masks.v):
                half = mask.shape[1] // 2
                for head in range(mask.shape[0]):  # a different half in every head
                    closed = torch.randperm(mask.shape[1], generator=torch.Generator().manual_seed(head))[:half]
                    mask[head, closed] = -30.0  # 2 * sigmoid(-30) ~ 2e-13
    return model


def test_prune_keeps_logits_and_removes_the_expected_parameters(tiny_gpt2_dir, tmp_path):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir)
    close_half_the_dimensions(model)
    perturb_gates_only = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_gate.weight.add_(torch.randn(block.attn.c_gate.weight.shape, generator=perturb_gates_only))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    removed = model.prune()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (after[real] - before[real]).abs().max().item() <= 1e-5

    config = model.config
    half = config.n_embd // 2  # half of every head's dimensions, summed over heads
    per_layer = (
        3 * half * config.n_embd + 3 * half  # c_attn weight columns and bias
        + half * config.n_embd  # c_proj weight rows
        + 3 * half  # q, k, v mask entries
    )
    assert removed == per_layer * config.n_layer
    assert config.layer_qk_dims == [config.head_dim // 2] * config.n_layer
    assert config.layer_v_dims == [config.head_dim // 2] * config.n_layer

    model.save_pretrained(tmp_path / "pruned")
    reloaded = DFAForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, after)
        cached = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        uncached = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                     pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_prune_removes_heads_whose_gates_stay_low(tiny_gpt2_dir):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir)
    with torch.no_grad():
        model.transformer.h[0].attn.c_gate.bias[1] = -40.0  # head 1 of layer 0 is never used
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    model.prune(head_threshold=1e-6, calibration_input_ids=ids, calibration_attention_mask=mask)
    assert model.config.layer_heads[0] == [0, 2, 3]
    assert model.config.layer_heads[1] == [0, 1, 2, 3]
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (after[real] - before[real]).abs().max().item() <= 1e-5


def test_4bit_loading_runs_and_stays_close_to_float32(tmp_path):
    from transformers import BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 input features: use a width of 128.
    model, _ = convert_gpt2_to_dfa(save_tiny_gpt2(tmp_path / "gpt2", n_embd=128, n_head=4))
    tolerance = 0.2
    open_for_low_precision(model, tolerance, scale=0.2)  # c_gate logits of std ~2 at this width
    model.save_pretrained(tmp_path / "dfa")
    quantized = DFAForCausalLM.from_pretrained(
        tmp_path / "dfa", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ).eval()
    # The gate projection is kept out of quantization (_keep_in_fp32_modules): its weights load unchanged.
    assert type(quantized.transformer.h[0].attn.c_gate).__name__ == "HeadGate"
    assert torch.equal(quantized.transformer.h[0].attn.c_gate.weight, model.transformer.h[0].attn.c_gate.weight)
    check_low_precision(model, quantized, tolerance)


def open_for_low_precision(model, tolerance, scale):
    """Open the gates and masks (trained-like values) and check that they matter: the opened model's logits differ
    from the identity-initialised ones by more than twice `tolerance`, so a low-precision model that lost them fails
    check_low_precision."""
    ids, mask = left_padded_batch()
    with torch.no_grad():
        identity = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        perturb(model, seed=2, scale=scale)
        opened = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert ((opened - identity).norm() / opened.norm()).item() > 2 * tolerance


def check_low_precision(model, low, tolerance):
    """Against the float32 model: relative logits error under `tolerance`; head gates off by a quarter of their
    distance from 1 (the identity) at most, in every layer; and every greedily generated token among the float
    model's top 3 at its position (measured: top 2 under 4-bit, the top one in half precision)."""
    ids, mask = left_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_gates=True)
        got = low(input_ids=ids, attention_mask=mask, output_gates=True)
        new = 4
        out = low.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], new - 1, dtype=mask.dtype)], dim=1)
        scores = model(input_ids=out[:, :-1], attention_mask=full_mask, position_ids=positions(full_mask)).logits
    error = (got.logits.float()[real] - reference.logits[real]).norm() / reference.logits[real].norm()
    assert error.item() < tolerance
    for gates, expected in zip(got.gates, reference.gates):
        gate_error = (gates.float()[real] - expected[real]).abs().mean()
        assert gate_error < 0.25 * (expected[real] - 1).abs().mean()
    scores = scores[:, -new:]
    ranks = (scores > scores.gather(-1, out[:, -new:, None])).sum(-1)  # 0: the float model's argmax
    assert ranks.max().item() <= 2, ranks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_generates(tiny_gpt2_dir, tmp_path, dtype):
    model, _ = convert_gpt2_to_dfa(tiny_gpt2_dir)
    tolerance = 0.05
    open_for_low_precision(model, tolerance, scale=0.5)
    model.save_pretrained(tmp_path / "dfa")
    half = DFAForCausalLM.from_pretrained(tmp_path / "dfa", dtype=dtype).eval()
    assert half.transformer.wte.weight.dtype == dtype
    # _keep_in_fp32_modules_strict: the gates, mask logits and entropy weight stay float32 under both half dtypes
    assert half.transformer.h[0].attn.c_gate.weight.dtype == torch.float32
    assert half.transformer.h[0].attn.dim_masks.q.dtype == half.transformer.entropy_balance.log_weight.dtype == torch.float32
    check_low_precision(model, half, tolerance)


def test_bert_checkpoint_is_refused():
    from testing_utils import minilm_dir

    with pytest.raises(ConversionError, match="'bert' checkpoint"):
        convert_gpt2_to_dfa(minilm_dir())


def test_unknown_option_is_refused(tiny_gpt2_dir):
    with pytest.raises(TypeError, match="gate_mod"):
        convert_gpt2_to_dfa(tiny_gpt2_dir, gate_mod="token")


def test_invalid_config_values_name_the_field():
    with pytest.raises(Exception, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        DFAConfig(n_embd=30, n_head=4)
    with pytest.raises(Exception, match="gate_mode"):
        DFAConfig(gate_mode="per-head")


def test_checkpoint_with_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = save_tiny_gpt2(tmp_path / "broken")
    state = load_file(base / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing: transformer\.h\.1\.mlp\.c_fc\.weight"):
        convert_gpt2_to_dfa(base)
