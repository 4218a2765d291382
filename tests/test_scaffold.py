import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from testing_utils import run_without_graftlm, save_tiny_gpt2
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import graftlm  # noqa: F401  registers the architectures
from graftlm import cli
from graftlm.training import scaffold as ts
from graftlm.chat import chat
from graftlm.conversion.common import ConversionError, probe_batch
from graftlm.conversion.scaffold import convert_gpt2_to_scaffold, model_card
from graftlm.export import export_model
from graftlm.modeling.modeling_scaffold import ScaffoldForCausalLM, truncate_repeated_ngrams

# The base is a 2-layer, 32-wide GPT-2; the scaffold is either the same shape or wider and deeper.
SCAFFOLDS = {"same_width": dict(n_embd=32, n_layer=2), "wider_deeper": dict(n_embd=48, n_head=4, n_layer=3)}
PAIRS = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a in range(4) for b in range(3)]
FAST = dict(samples_per_epoch=0, gradient_accumulation_steps=1)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    base = save_tiny_gpt2(root / "base", seed=0)
    return base, {name: save_tiny_gpt2(root / name, seed=1, **cfg) for name, cfg in SCAFFOLDS.items()}


@pytest.fixture(scope="module")
def converted(stock):
    base, scaffolds = stock
    return convert_gpt2_to_scaffold(base, scaffolds["wider_deeper"], cross_attn_layers=[0, 1])


@pytest.fixture(scope="module")
def tokenizer(stock):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stock[0])


def fresh(converted):
    return copy.deepcopy(converted[0]).eval()


def left_padded_batch(seq=12):
    return probe_batch(50257, seq_len=seq, batch_size=3, seed=3)


def open_gates(model, gate=2.0, scale=20.0, seed=0):
    """Move the fusers away from their closed start, as training would: tanh(2) = 0.96, larger projections."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for fuser in model.fusers.values():
            fuser.gate.fill_(gate)
            for linear in (fuser.q_proj, fuser.k_proj, fuser.v_proj, fuser.o_proj):
                linear.weight.mul_(scale)
    return model


def train_lora(model, seed=0):
    """Attach LoRA and give its B matrices (zero at the start) values, as training would."""
    model.add_lora()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


# ----- conversion -----


@pytest.mark.parametrize("scaffold", list(SCAFFOLDS))
def test_converted_model_equals_stock_base(stock, scaffold):
    base, scaffolds = stock
    model, report = convert_gpt2_to_scaffold(base, scaffolds[scaffold], cross_attn_layers=[0, 1])
    reference = GPT2LMHeadModel.from_pretrained(base).eval()
    ids, mask = left_padded_batch()
    expected, real = logits(reference, ids, mask), mask.bool()
    assert report.max_abs_logit_delta <= 1e-5
    for weight in (1.0, 0.5, 0.0):  # the gates are closed: no scaffold_weight moves the base
        assert (logits(model, ids, mask, scaffold_weight=weight) - expected)[real].abs().max().item() <= 1e-5
    assert sorted(k for k in model.state_dict() if not k.startswith(("base.", "scaffold."))) == sorted(
        f"fusers.{i}.{p}" for i in (0, 1) for p in
        ("gate", "ln.weight", "ln.bias", *(f"{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias"))))
    assert model.fusers["0"].k_proj.in_features == SCAFFOLDS[scaffold]["n_embd"]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(cross_attn_layers=[0, 2]), "cross_attn_layers [2] out of range"),
        (dict(cross_attn_layers=[1, 1]), "duplicated"),
        (dict(cross_attn_layers=[]), "cross_attn_layers is empty"),
        (dict(cross_attn_layers=[0], influence=1.5), "influence must be in [0, 1]"),
        (dict(cross_attn_layers=[0], influence=-0.1), "influence must be in [0, 1]"),
        (dict(cross_attn_layers=[0], lora_target_modules=["c_attn", "q_proj"]), "lora_target_modules"),
    ],
)
def test_bad_options_raise_conversion_errors(stock, options, message):
    base, scaffolds = stock
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert_gpt2_to_scaffold(base, scaffolds["same_width"], **options)


def test_unknown_option_and_vocabulary_mismatch_are_errors(stock, tmp_path):
    base, scaffolds = stock
    with pytest.raises(TypeError, match="lora_rank"):
        convert_gpt2_to_scaffold(base, scaffolds["same_width"], cross_attn_layers=[0], lora_rank=4)
    other_vocab = save_tiny_gpt2(tmp_path / "small_vocab", vocab_size=1000)
    with pytest.raises(ConversionError, match="vocab_size"):
        convert_gpt2_to_scaffold(base, other_vocab, cross_attn_layers=[0])


def test_cli_convert_exports_and_refuses_bad_layers_without_writing(stock, tmp_path, capsys):
    base, scaffolds = stock
    common = ["convert", "scaffold", "--base", str(base), "--scaffold", str(scaffolds["wider_deeper"])]
    assert cli.main([*common, "--cross-attn-layers", "0,5", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []
    assert cli.main([*common, "--cross-attn-layers", "1", "--output-dir", str(tmp_path / "ok")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ok")
    assert isinstance(model, ScaffoldForCausalLM) and model.config.cross_attn_layers == [1]
    card = (tmp_path / "ok" / "README.md").read_text()
    assert "library_name: transformers" in card and "Not trained yet" in card and "$" not in card.split("```")[0]


# ----- forward, cache, generation -----


def test_model_is_causal_through_the_scaffold(converted):
    """The scaffold reads the whole input by default; base position i must still see tokens <= i only."""
    model = open_gates(fresh(converted))
    ids, mask = left_padded_batch()
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % 50257
    a, b = logits(model, ids, mask), logits(model, changed, mask)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_eager_and_sdpa_fusers_agree(converted):
    model = open_gates(fresh(converted))
    ids, mask = left_padded_batch()
    sdpa = logits(model, ids, mask)
    model.set_attn_implementation("eager")
    assert model.fusers["0"].config._attn_implementation == "eager"
    assert (logits(model, ids, mask) - sdpa)[mask.bool()].abs().max().item() <= 1e-5


def test_manual_cache_loop_reuses_the_prompt_scaffold_states(converted):
    model = open_gates(fresh(converted))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:9], attention_mask=mask[:, :9], past_key_values=prefill.past_key_values)
        full = model(input_ids=ids[:, :9], attention_mask=mask[:, :9], scaffold_input_ids=ids[:, :8],
                     scaffold_attention_mask=mask[:, :8], use_cache=False)
    assert (step.logits[:, -1] - full.logits[:, -1]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="already holds the scaffold states"):
        model(input_ids=ids[:, 9:10], attention_mask=mask[:, :10], past_key_values=step.past_key_values,
              scaffold_input_ids=ids[:, :3])


def generate(model, ids, mask, **kwargs):
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0,
              **kwargs}
    with torch.no_grad():
        return model.generate(**kwargs, return_dict_in_generate=True, output_logits=True)


def test_cached_generate_equals_uncached(converted):
    model = open_gates(fresh(converted))
    ids, mask = left_padded_batch()
    for extra in ({}, {"num_beams": 3}):
        cached, uncached = generate(model, ids, mask, **extra), generate(model, ids, mask, use_cache=False, **extra)
        assert torch.equal(cached.sequences, uncached.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(cached.logits, uncached.logits)) <= 1e-4


def test_scaffold_weight_reaches_generate_and_zero_gives_the_base(stock, converted):
    model = open_gates(fresh(converted))
    reference = GPT2LMHeadModel.from_pretrained(stock[0]).eval()
    ids, mask = left_padded_batch()
    full, half, off = (generate(model, ids, mask, scaffold_weight=w) for w in (1.0, 0.5, 0.0))
    base = generate(reference, ids, mask)
    assert torch.equal(off.sequences, base.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(off.logits, base.logits)) <= 1e-5
    assert (full.logits[0] - half.logits[0]).abs().max().item() > 1e-3  # float noise is ~1e-7
    assert (half.logits[0] - off.logits[0]).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="scaffold_weight"):
        model.generate(input_ids=ids, max_new_tokens=2, scaffold_weight=1.5)
    with pytest.raises(TypeError, match="scafold_weight"):
        model(input_ids=ids, scafold_weight=0.5)


def test_repetition_guard_truncates_and_no_repeat_ngram_passes_through(converted):
    rows = torch.tensor([[9, 9, 1, 2, 3, 1, 2, 3, 4], [9, 9, 5, 6, 7, 8, 5, 6, 8]])
    cut = truncate_repeated_ngrams(rows, prompt_length=2, n=3, pad_id=0)
    assert cut.tolist() == [[9, 9, 1, 2, 3, 0, 0, 0, 0], rows[1].tolist()]
    model = fresh(converted)
    ids, mask = left_padded_batch()
    plain = generate(model, ids, mask, max_new_tokens=24).sequences  # the random tiny base repeats itself
    guarded = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                             truncate_repeats=3)
    assert torch.equal(guarded, truncate_repeated_ngrams(plain, ids.shape[1], 3, 0)) and not torch.equal(guarded, plain)
    no_repeat = generate(model, ids, mask, max_new_tokens=12, no_repeat_ngram_size=2).sequences[:, ids.shape[1]:]
    for row in no_repeat.tolist():
        grams = list(zip(row, row[1:]))
        assert len(grams) == len(set(grams))


# ----- LoRA, save and load -----


def test_only_lora_and_fusers_train_and_the_base_stays_bit_identical(converted):
    model = fresh(converted).add_lora()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("fusers.") for n in trainable)
    assert any(n.startswith("fusers.") for n in trainable) and any("lora_A" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = left_padded_batch()
    model.train()
    for _ in range(2):  # the first step opens the gates, the second reaches LoRA through them
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(model.gate_values()[i] != 0 for i in (0, 1))
    assert any(params[n].abs().sum() > 0 for n in trainable if "lora_B" in n)
    seed_like = copy.deepcopy(converted[0])
    seed_like.config.train_fuser = False
    seed_like.add_lora()
    assert not any(p.requires_grad for n, p in seed_like.named_parameters() if n.startswith("fusers."))


def test_save_load_merged_and_separate(converted, tmp_path):
    model = train_lora(open_gates(fresh(converted)))
    ids, mask = left_padded_batch()
    expected = logits(model, ids, mask)

    model.save_pretrained(tmp_path / "separate")
    assert (tmp_path / "separate" / "scaffold_adapter" / "adapter_model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "separate" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # the main checkpoint keeps GPT-2's plain names
    separate = ScaffoldForCausalLM.from_pretrained(tmp_path / "separate").eval()
    assert separate.has_lora() and separate.config.scaffold_adapter == "scaffold_adapter"
    assert torch.equal(logits(separate, ids, mask), expected)
    assert all(p.requires_grad == (".lora_" in n or n.startswith("fusers.")) for n, p in separate.named_parameters())

    # The adapter is peft's own format: PeftModel puts it on the plain scaffold GPT-2 and computes what we compute.
    from peft import PeftModel

    from graftlm.modeling.scaffold_lora import lora_detached

    with lora_detached(model.scaffold):
        model.scaffold.save_pretrained(tmp_path / "scaffold_without_lora")
    peft_scaffold = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tmp_path / "scaffold_without_lora"), tmp_path / "separate" / "scaffold_adapter"
    ).eval()
    with torch.no_grad():
        via_peft = peft_scaffold(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert (via_peft - model.scaffold_states(ids)).abs().max().item() <= 1e-5

    merged = copy.deepcopy(model).merge_lora()
    assert not merged.has_lora() and merged.config.scaffold_adapter is None
    assert (logits(merged, ids, mask) - expected).abs().max().item() <= 1e-4
    merged.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "scaffold_adapter").exists()
    reloaded = ScaffoldForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not reloaded.has_lora()
    assert torch.equal(logits(reloaded, ids, mask), logits(merged, ids, mask))


def test_export_loads_through_trust_remote_code_without_graftlm(converted, tmp_path):
    model = train_lora(open_gates(fresh(converted)))
    ids, mask = left_padded_batch()
    card = model_card(converted[1], "user/scaffold")
    export_model(model, tmp_path / "separate", card=card)
    export_model(copy.deepcopy(model).merge_lora(), tmp_path / "merged", card=card)
    expected = {
        "logits": logits(model, ids, mask)[:, -1].tolist(),
        "tokens": generate(model, ids, mask, scaffold_weight=0.5).sequences.tolist(),
    }
    result = run_without_graftlm(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
        out = {{}}
        for name in ("separate", "merged"):
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True).eval()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
                tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                        pad_token_id=0, scaffold_weight=0.5)
            out[name] = {{"module": type(model).__module__, "lora": model.has_lora(), "logits": logits.tolist(),
                          "tokens": tokens.tolist()}}
        print(json.dumps(out))
        """,
        tmp_path,
    )
    for name, has_lora in (("separate", True), ("merged", False)):
        got = result[name]
        assert got["module"].startswith("transformers_modules.") and got["lora"] is has_lora
        assert (torch.tensor(got["logits"]) - torch.tensor(expected["logits"])).abs().max().item() <= 1e-4
        assert got["tokens"] == expected["tokens"]


# ----- data and loss -----


def test_data_files_load_and_bad_data_is_a_clear_error(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:3]))
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("prompt,completion\nHi,there\n2 plus 2 is, 4\n")
    assert ts.load_pairs(jsonl) == PAIRS[:3]
    expected = [{"prompt": "Hi", "completion": "there"}, {"prompt": "2 plus 2 is", "completion": " 4"}]
    assert ts.load_pairs(csv_file) == expected
    bad = {
        "no_completion.jsonl": ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
                                "record 1 has no 'completion'"),
        "no_prompt.csv": ("question,completion\nx,y\n", "record 0 has no 'prompt'"),
        "empty.jsonl": ("\n", "holds no prompt/completion pairs"),
        "broken.jsonl": ('{"prompt": "a", \n', "line 1: not valid JSON"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            ts.load_pairs(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        ts.load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds no prompt/completion pairs"):
        ts.load_pairs([])
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        ts.TrainingOptions(epochs=0)


def test_loss_counts_completion_tokens_only(converted, tokenizer):
    model = open_gates(fresh(converted))
    examples = [ts.encode_pair(tokenizer, p["prompt"], p["completion"] * (1 + i), 32) for i, p in enumerate(PAIRS[:2])]
    batch = ts.collate_pairs(examples, pad_id=50256)
    for row, (prompt, completion) in enumerate(examples):
        labels = batch["labels"][row]
        assert (labels[: len(prompt)] == -100).all() and (labels[len(prompt) + len(completion) :] == -100).all()
        assert labels[len(prompt) : len(prompt) + len(completion)].tolist() == completion
    with torch.no_grad():
        loss = model(**batch).loss
        repadded = ts.collate_pairs(examples, pad_id=123)  # other padding tokens: same loss
        assert torch.allclose(model(**repadded).loss, loss, atol=1e-6)
        sums, counts = ts.completion_loss_terms(model, batch)
        assert torch.allclose(sums.sum() / counts.sum(), loss, atol=1e-5)
        # Token by token: each completion token scored alone, in a batch of one with no padding.
        singles = [ts.completion_loss_terms(model, ts.collate_pairs([e], 50256)) for e in examples]
    assert torch.allclose(sum(s for s, _ in singles).sum() / sum(c for _, c in singles).sum(), loss, atol=1e-5)


# ----- training -----


def test_short_training_lowers_validation_loss_and_weight_zero_stays_the_base(stock, converted, tokenizer):
    model = fresh(converted)
    session = ts.ScaffoldSession(model, tokenizer)  # the seed's shape: run_training_cycle(train, valid, ...)
    result = session.run_training_cycle(PAIRS, None, epochs=2, batch_size=2, learning_rate=1e-2,
                                        samples_per_epoch=1, gradient_accumulation_steps=1)
    assert result.best_valid_loss < result.initial_valid_loss - 0.05
    assert len(result.history) == 2 and result.history[0]["samples"][0]["answer"] is not None
    assert "rss_mib" in result.history[0]["memory"] or "cuda_allocated_mib" in result.history[0]["memory"]
    reference = GPT2LMHeadModel.from_pretrained(stock[0]).eval()
    # At weight 0 the trained session generates what the base GPT-2 generates (greedy, repeats cut as the seed did).
    prompt = tokenizer("2 plus 2 is", return_tensors="pt").input_ids
    with torch.no_grad():
        base_tokens = reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=50256)
    base_tokens = truncate_repeated_ngrams(base_tokens, prompt.shape[1], 3, 50256)[0, prompt.shape[1]:]
    base_text = tokenizer.decode(base_tokens, skip_special_tokens=True)
    assert session.generate("2 plus 2 is", max_new_tokens=4, scaffold_weight=0.0) == base_text
    ids, mask = left_padded_batch()
    real = mask.bool()
    assert (logits(model, ids, mask, scaffold_weight=0.0) - logits(reference, ids, mask))[real].abs().max() <= 1e-5
    assert (logits(model, ids, mask) - logits(reference, ids, mask))[real].abs().max() > 1e-4
    stock_state = reference.state_dict()
    base_state = {k[len("base."):]: v for k, v in model.state_dict().items() if k.startswith("base.")}
    assert base_state.keys() == stock_state.keys()
    assert all(torch.equal(v, stock_state[k]) for k, v in base_state.items())


def test_early_stopping_fires_when_validation_stops_improving(converted, tokenizer):
    # The validation set contradicts the training set: once training has learnt what the two share, it can only
    # make validation worse.
    train_pairs = [{"prompt": f"Item {i} colour:", "completion": " red"} for i in range(8)]
    valid_pairs = [{"prompt": f"Item {i} colour:", "completion": " blue green purple"} for i in range(8, 11)]
    options = ts.TrainingOptions(epochs=12, batch_size=2, learning_rate=1e-2, patience=2, **FAST)
    model = fresh(converted)
    result = ts.train(model, tokenizer, train_pairs, valid_pairs, options)
    losses = [r["valid_loss"] for r in result.history]
    best_epoch = losses.index(min(losses))
    assert result.stopped_early and result.epochs_run == best_epoch + 1 + options.patience < options.epochs
    assert result.best_valid_loss == losses[best_epoch]
    # The model comes back with its best epoch's weights.
    batch = ts.collate_pairs([ts.encode_pair(tokenizer, p["prompt"], p["completion"], 128) for p in valid_pairs], 50256)
    with torch.no_grad():
        sums, counts = ts.completion_loss_terms(model, batch)
    assert abs((sums.sum() / counts.sum()).item() - result.best_valid_loss) <= 1e-4


def test_resume_from_checkpoint_matches_an_uninterrupted_run(converted, tokenizer, tmp_path, monkeypatch):
    start = fresh(converted)
    train_pairs, valid_pairs = ts.split_pairs(PAIRS, 0.25, seed=0)
    options = dict(epochs=2, batch_size=2, learning_rate=1e-2, patience=5, **FAST)
    straight = copy.deepcopy(start)
    ts.train(straight, tokenizer, train_pairs, valid_pairs, ts.TrainingOptions(**options))

    class Crash(Exception):
        pass

    save = ts._save_checkpoint

    def save_then_crash(folder, *args):
        save(folder, *args)
        if folder.name == "checkpoint-epoch-1":
            raise Crash  # the run dies right after writing its first checkpoint

    monkeypatch.setattr(ts, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        ts.train(copy.deepcopy(start), tokenizer, train_pairs, valid_pairs,
                 ts.TrainingOptions(**options, checkpoint_dir=str(tmp_path)))
    monkeypatch.setattr(ts, "_save_checkpoint", save)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-epoch-1"]
    resumed = copy.deepcopy(start)
    result = ts.train(resumed, tokenizer, train_pairs, valid_pairs,
                      ts.TrainingOptions(**options, checkpoint_dir=str(tmp_path), resume_from_checkpoint="latest"))
    assert result.epochs_run == 2 and [r["epoch"] for r in result.history] == [1, 2]
    expected = dict(straight.named_parameters())
    assert all(torch.allclose(p, expected[n], atol=1e-6) for n, p in resumed.named_parameters() if p.requires_grad)


def test_cli_train_under_accelerate_launch_with_two_processes(converted, tokenizer, tmp_path, capsys):
    source = tmp_path / "converted"
    export_model(fresh(converted), source, tokenizers={"": tokenizer})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n')
    out = tmp_path / "out"
    assert cli.main(["train", "scaffold", str(source), "--data", str(bad), "--output-dir", str(out)]) == 2
    assert "has no 'completion'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "converted"]  # nothing written

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # two CPU processes over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "graftlm.cli"]
    args = ["train", "scaffold", str(source), "--data", str(data), "--output-dir", str(out), "--epochs", "1",
            "--batch-size", "2", "--learning-rate", "1e-2", "--samples-per-epoch", "0", "--adapter", "separate"]
    result = subprocess.run(launch + args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("exported to") == 1  # the main process alone exports
    assert (out / "scaffold_adapter" / "adapter_config.json").is_file()
    state = json.loads((tmp_path / "out-checkpoints" / "checkpoint-epoch-1" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and all(g != 0 for g in state["history"][0]["gates"].values())  # it trained
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.has_lora() and "validation loss" in (out / "README.md").read_text()


# ----- chat -----


def test_chat_loop_answers_trains_and_quits(converted, tokenizer):
    model = fresh(converted)
    written = []
    lines = iter(["2 plus 2 is\n", "\n", "train\n", "exit\n", "never read\n"])
    chat(model, tokenizer, lines, written.append, train_pairs=PAIRS[:6],
         train_options=ts.TrainingOptions(epochs=1, batch_size=4, **FAST),
         generate_kwargs={"max_new_tokens": 4})
    assert len(written) == 2 and written[1].startswith("trained 1 epoch(s)")
    assert next(lines) == "never read\n" and model.has_lora()


def test_chat_driven_through_a_pipe(converted, tokenizer, tmp_path):
    folder = export_model(fresh(converted), tmp_path / "model", tokenizers={"": tokenizer})
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "graftlm.cli", "chat", str(folder), "--max-new-tokens", "5"],
        input="Hello\ntrain\nquit\n", capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].strip() and "no training data configured" in lines[1]
