import json
import re

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from testing_utils import minilm_dir, run_without_graftlm, save_tiny_gpt2
from transformers import AutoModelForSeq2SeqLM, BertConfig, GPT2Config, GPT2LMHeadModel

import graftlm  # noqa: F401  registers the architectures
from graftlm import cli
from graftlm.configuration.configuration_bridge import BridgeConfig
from graftlm.conversion.bridge import convert_bert_gpt2_to_bridge
from graftlm.conversion.common import ConversionError, load_stock_bert, load_tokenizer
from graftlm.modeling.bridge_decoding import AdaptiveLogitsProcessor, soft_top_k_log_probs
from graftlm.modeling.bridge_layers import GABridge, PopulationBridge
from graftlm.modeling.modeling_bridge import BridgeForConditionalGeneration, shift_tokens_right
from graftlm.training.bridge import BridgeCollator, load_bridge, load_pairs, tokenize_pairs

EOS = 50256
# (bridge options, description): every bridge kind and the seeds' options.
BRIDGES = {
    "linear": dict(bridge_type="linear"),
    "ga": dict(bridge_type="ga", controls=True),
    "ga_token_gated": dict(bridge_type="ga", token_wise=True, gated_residual=True, sigma_schedule="linear"),
    "population": dict(bridge_type="population", pop_size=3, selection="fitness", controls=True),
}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), seed=1)


@pytest.fixture(scope="module")
def stock(gpt2_dir):
    return load_stock_bert(minilm_dir()), GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


@pytest.fixture(scope="module")
def converted(gpt2_dir):
    """One converted model per bridge kind (MiniLM encoder, tiny GPT-2 decoder)."""
    return {name: convert_bert_gpt2_to_bridge(minilm_dir(), gpt2_dir, **opts) for name, opts in BRIDGES.items()}


@pytest.fixture(scope="module")
def tokenizers(gpt2_dir):
    return load_tokenizer(minilm_dir()), load_tokenizer(gpt2_dir)


def source_batch(tokenizer, texts=("the cat sat on the mat", "hello")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def trained_like(model, seed=0):
    """A copy whose cross-attention output is no longer zero, as after training, so the encoder side matters."""
    model = BridgeForConditionalGeneration(model.config).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for block in model.decoder.transformer.h:
        block.crossattention.c_proj.weight.copy_(torch.randn(block.crossattention.c_proj.weight.shape,
                                                             generator=generator) * 0.5)
    return model


def tiny_config(**options):
    encoder = BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         vocab_size=100)
    decoder = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=120, n_positions=32, add_cross_attention=True)
    return BridgeConfig(encoder=encoder, decoder=decoder, pad_token_id=0, decoder_start_token_id=1, **options)


# ---------------------------------------------------------------- parity with the stock models


def test_encoder_returns_stock_bert_states(converted, stock, tokenizers):
    bert, _ = stock
    batch = source_batch(tokenizers[0])
    assert batch["attention_mask"][1].eq(0).any()  # the second row is padded
    with torch.no_grad():
        expected = bert(**batch).last_hidden_state
        for name, (model, report) in converted.items():
            got = model.encoder(**batch).last_hidden_state
            real = batch["attention_mask"].bool()
            assert (got[real] - expected[real]).abs().max().item() <= 1e-5, name
            assert report.encoder_max_abs_delta <= 1e-5


@pytest.mark.parametrize("name", list(BRIDGES))
def test_decoder_equals_stock_gpt2_whatever_the_encoder_input(converted, stock, tokenizers, name):
    """Cross-attention's output projection starts at zero: the converted decoder is GPT-2 for any source."""
    model, report = converted[name]
    _, gpt2 = stock
    decoder_ids = torch.tensor([[EOS, 464, 3797, 3332, 319], [EOS, 15496, 995, 13, 13]])
    with torch.no_grad():
        expected = gpt2(input_ids=decoder_ids).logits
        for texts in (("a first source", "and a second"), ("something else entirely", "x")):
            got = model(**source_batch(tokenizers[0], texts), decoder_input_ids=decoder_ids).logits
            assert (got - expected).abs().max().item() <= 1e-5
    assert report.decoder_max_abs_logit_delta <= 1e-5
    # ...and the cross-attention is live: once its projection moves, the source changes the logits.
    moved = trained_like(model)
    with torch.no_grad():
        a = moved(**source_batch(tokenizers[0], ("a first source", "and a second")), decoder_input_ids=decoder_ids)
        b = moved(**source_batch(tokenizers[0], ("something else entirely", "x")), decoder_input_ids=decoder_ids)
    assert (a.logits - b.logits).abs().max().item() > 1e-3


def test_padded_encoder_input_gives_the_unpadded_outputs(converted, tokenizers):
    """The encoder attention mask reaches cross-attention (GPT-2 once dropped it; transformers PR #47946)."""
    model = trained_like(converted["ga"][0])
    tokenizer = tokenizers[0]
    alone = tokenizer(["hello there"], return_tensors="pt")
    padded = tokenizer(["hello there", "a much longer sentence to force padding"], return_tensors="pt", padding=True)
    assert padded["attention_mask"][0].eq(0).sum() >= 3
    decoder_ids = torch.tensor([[EOS, 464, 3797]])
    with torch.no_grad():
        want = model(**alone, decoder_input_ids=decoder_ids)
        got = model(**padded, decoder_input_ids=decoder_ids.expand(2, -1))
        unmasked = model(input_ids=padded["input_ids"], decoder_input_ids=decoder_ids.expand(2, -1))
    assert (got.logits[0] - want.logits[0]).abs().max().item() <= 1e-5
    assert (got.temperature[0] - want.temperature[0]).abs().item() <= 1e-6
    assert (got.top_k[0] - want.top_k[0]).abs().item() <= 1e-5
    # Without the mask the padding is attended to and the outputs change: the check above can fail.
    assert (unmasked.logits[0] - want.logits[0]).abs().max().item() > 1e-3


# ---------------------------------------------------------------- noise: deterministic in eval, random in training


@pytest.mark.parametrize("bridge_cls,options", [
    (GABridge, dict(bridge_type="ga")),
    (GABridge, dict(bridge_type="ga", token_wise=True, gated_residual=True)),
    (PopulationBridge, dict(bridge_type="population", pop_size=4)),
    (PopulationBridge, dict(bridge_type="population", pop_size=4, selection="fitness")),
])
def test_eval_is_deterministic_and_training_noise_varies(bridge_cls, options):
    torch.manual_seed(0)
    config = tiny_config(**options)
    model = BridgeForConditionalGeneration(config)
    bridge = model.bridge
    assert isinstance(bridge, bridge_cls)
    if options.get("gated_residual"):
        with torch.no_grad():
            bridge.gate.fill_(1.0)  # at conversion the gate is 0 and the GA branch (noise included) is off
    h = torch.randn(2, 5, config.encoder.hidden_size)
    bridge.eval()
    assert torch.equal(bridge(h), bridge(h))
    assert torch.allclose(bridge(h), bridge.project(h), atol=1e-6) == (bridge_cls is PopulationBridge)
    bridge.train()
    first, second = bridge(h), bridge(h)
    assert (first - second).abs().max().item() > 1e-4
    assert bridge.noise_step.item() == 2
    config.noise_in_eval = True  # the flag that asks for sampling in eval mode
    bridge.eval()
    assert (bridge(h) - bridge(h)).abs().max().item() > 1e-4


def test_sigma_schedule_reaches_zero_noise():
    config = tiny_config(bridge_type="ga", sigma_schedule="cosine", sigma_schedule_steps=3)
    bridge = BridgeForConditionalGeneration(config).bridge.train()
    h = torch.randn(2, 4, config.encoder.hidden_size)
    factors = []
    for _ in range(4):
        factors.append(bridge.schedule())
        bridge(h)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert torch.equal(bridge(h), bridge(h))  # sigma * 0: no noise left, although in training mode


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["ga", "population"])
def test_greedy_generate_with_cache_equals_without(converted, tokenizers, name):
    model = trained_like(converted[name][0], seed=2)
    batch = source_batch(tokenizers[0])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(**batch, use_cache=True, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.sequences[:, 0].eq(EOS).all()  # decoder_start_token_id
    assert (cached.logits[0] - cached.logits[-1]).abs().max().item() > 1e-3  # the steps differ: a real comparison
    for a, b in zip(cached.logits, uncached.logits):
        assert (a - b).abs().max().item() <= 1e-4


def test_adaptive_decoding_uses_each_rows_temperature_and_top_k(converted, tokenizers):
    model = trained_like(converted["ga"][0], seed=3)
    batch = source_batch(tokenizers[0])
    encoder_outputs = model.encode(batch["input_ids"], batch["attention_mask"])
    encoder_outputs.temperature = torch.tensor([0.5, 1.7])  # forced per row
    encoder_outputs.top_k = torch.tensor([3.0, 11.0])
    common = dict(encoder_outputs=encoder_outputs, adaptive_decoding=True, max_new_tokens=6, min_new_tokens=6,
                  output_scores=True, output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    out = model.generate(**batch, num_return_sequences=2, **common)
    rows_k, rows_t = torch.tensor([3, 3, 11, 11]), torch.tensor([0.5, 0.5, 1.7, 1.7])  # batch * expansion rows
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        finite = torch.isfinite(scores)
        assert torch.equal(finite.sum(-1), rows_k)  # every other token is -inf, not 0
        assert torch.allclose(scores[finite], (logits / rows_t[:, None])[finite])
        top = logits.topk(11, dim=-1).indices
        for row in range(4):
            token = out.sequences[row, step + 1].item()
            assert token in top[row, : rows_k[row]].tolist()
            assert set(finite[row].nonzero().flatten().tolist()) == set(top[row, : rows_k[row]].tolist())
    # Beams: rows = batch * num_beams, each with its own example's top-k.
    beams = model.generate(**batch, num_beams=3, num_return_sequences=2, **common)
    assert beams.sequences.shape[0] == 4
    for scores in beams.scores:
        assert torch.equal(torch.isfinite(scores).sum(-1), torch.tensor([3, 3, 3, 11, 11, 11]))


def test_adaptive_decoding_uses_the_predicted_controls(converted, tokenizers):
    model = trained_like(converted["ga"][0], seed=4)
    batch = source_batch(tokenizers[0])
    pooled = model.encode(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    pooled = (pooled * batch["attention_mask"][..., None]).sum(1) / batch["attention_mask"].sum(1, keepdim=True)
    head, gap = model.controls.top_k_head, pooled[0] - pooled[1]
    with torch.no_grad():  # input-dependent controls, as after training: top-k logits b0 + 1 and b0 - 1
        head.weight.copy_(2 * gap / gap.pow(2).sum())
        head.bias.sub_(head.weight[0] @ (pooled[0] + pooled[1]) / 2)
    predicted = model.encode(batch["input_ids"], batch["attention_mask"])
    assert predicted.top_k[0].round() - predicted.top_k[1].round() >= 10
    out = model.generate(**batch, adaptive_decoding=True, max_new_tokens=3, output_scores=True,
                         return_dict_in_generate=True)
    assert torch.equal(torch.isfinite(out.scores[0]).sum(-1), predicted.top_k.round().long())


def test_adaptive_logits_processor_masks_with_minus_inf_per_row():
    scores = torch.randn(3, 40)
    processor = AdaptiveLogitsProcessor(torch.tensor([1.0, 0.25, 2.0]), torch.tensor([1.0, 5.0, 40.0]))
    out = processor(None, scores.clone())
    for row, k in enumerate((1, 5, 40)):
        kept = torch.isfinite(out[row])
        assert kept.sum().item() == k
        assert set(kept.nonzero().flatten().tolist()) == set(scores[row].topk(k).indices.tolist())
        assert out[row][~kept].eq(float("-inf")).all()
    with pytest.raises(ValueError, match="controls for 3 rows but generate scores 6 rows"):
        processor(None, torch.randn(6, 40))


def test_adaptive_decoding_errors(converted, tokenizers):
    batch = source_batch(tokenizers[0])
    with pytest.raises(ValueError, match="needs a model converted with controls"):
        converted["linear"][0].generate(**batch, adaptive_decoding=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="do not pass \\['temperature'\\]"):
        converted["ga"][0].generate(**batch, adaptive_decoding=True, temperature=0.7, max_new_tokens=2)


# ---------------------------------------------------------------- labels and training


def test_labels_are_shifted_with_pad_and_minus_100(converted, tokenizers):
    model = trained_like(converted["ga"][0], seed=5)
    batch = source_batch(tokenizers[0])
    labels = torch.tensor([[464, 3797, 3332, EOS], [15496, EOS, -100, -100]])
    decoder_ids = shift_tokens_right(labels, EOS, EOS)
    assert decoder_ids.tolist() == [[EOS, 464, 3797, 3332], [EOS, 15496, EOS, EOS]]
    with torch.no_grad():
        out = model(**batch, labels=labels)
        explicit = model(**batch, decoder_input_ids=decoder_ids).logits
    real = labels != -100  # the rest differs: the decoder mask built from the labels hides the -100 positions
    assert torch.allclose(out.logits[real], explicit[real], atol=1e-5)
    expected = torch.nn.functional.cross_entropy(explicit[real], labels[real])
    assert out.ce_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.ce_loss.item() + 0.1 * out.control_loss.item(), rel=1e-5)
    assert out.temperature.shape == out.top_k.shape == (2,)


def test_a_few_steps_on_a_copy_task_lower_the_loss(converted, tokenizers):
    source_tokenizer, target_tokenizer = tokenizers
    model = BridgeForConditionalGeneration(converted["population"][0].config)
    model.load_state_dict(converted["population"][0].state_dict())
    model.encoder.requires_grad_(False)  # bridge, controls and decoder learn; keeps the test fast on CPU
    words = ["red", "blue", "green", "black", "white", "pink"]
    texts = [" ".join(words[i:] + words[:i]) for i in range(4)]
    source = source_tokenizer(texts, return_tensors="pt", padding=True)
    labels = torch.tensor([target_tokenizer(t)["input_ids"] + [EOS] for t in texts])

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**source, labels=labels).ce_loss.item()

    before = eval_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(10):
        model.train()
        model(**source, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = eval_loss()
    assert after < before - 2.0, (before, after)
    assert model.bridge.noise_step.item() == 10


@pytest.mark.parametrize("objective", ["likelihood", "prior"])
def test_control_loss_gradient_reaches_the_control_heads(objective):
    torch.manual_seed(0)
    config = tiny_config(bridge_type="ga", controls=True, control_objective=objective, max_top_k=30)
    model = BridgeForConditionalGeneration(config)
    with torch.no_grad():
        model.controls.top_k_head.weight.normal_()  # off the prior's optimum, so the prior has a gradient too
        model.controls.temperature_head.weight.normal_()
    ids = torch.randint(2, 100, (3, 6))
    labels = torch.randint(2, 120, (3, 5))
    out = model(input_ids=ids, labels=labels)
    out.control_loss.backward()
    for head in (model.controls.temperature_head, model.controls.top_k_head):
        assert head.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    assert model.decoder.lm_head.weight.grad is None  # the logits are detached: the LM is left to ce_loss


def test_soft_top_k_relaxation_tends_to_hard_top_k_and_has_a_top_k_gradient():
    torch.manual_seed(0)
    logits = torch.stack([torch.randperm(30).float() * 0.5 for _ in range(6)]).view(2, 3, 30)  # gaps >= 0.5
    temperature, top_k = torch.tensor([0.7, 1.3]), torch.tensor([4.0, 9.0], requires_grad=True)
    log_q = soft_top_k_log_probs(logits, temperature, top_k, softness=1e-3)
    for row, k in enumerate((4, 9)):
        hard = torch.full_like(logits[row], float("-inf"))
        top = logits[row].topk(k, dim=-1).indices
        hard.scatter_(-1, top, logits[row].gather(-1, top) / temperature[row])
        assert torch.allclose(log_q[row].exp(), hard.softmax(-1), atol=1e-5)
    soft = soft_top_k_log_probs(logits, temperature, top_k, softness=0.5)
    soft[..., 0].sum().backward()
    assert top_k.grad.abs().min() > 0


# ---------------------------------------------------------------- data and the trainer


def test_collator_pads_sources_and_masks_target_padding(tmp_path, tokenizers):
    data_file = tmp_path / "pairs.csv"
    data_file.write_text("src,tgt\nthe cat,le chat\na much longer source sentence,un\n", encoding="utf-8")
    pairs = tokenize_pairs(load_pairs(str(data_file)), *tokenizers, max_target_length=3)
    batch = BridgeCollator(tokenizers[0].pad_token_id)([pairs[0], pairs[1]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist().count(0) == batch["input_ids"][0].tolist().count(0) > 0
    assert batch["labels"][:, -1].eq(EOS).any() and batch["labels"][1].tolist()[-1] == -100
    assert all(row[row != -100][-1].item() == EOS for row in batch["labels"])  # eos closes every target
    assert batch["labels"].shape[1] <= 3


def test_train_cli_runs_and_exports(converted, tmp_path):
    folder = tmp_path / "converted"
    source_tokenizer, target_tokenizer = load_tokenizer(minilm_dir()), load_tokenizer(converted["linear"][1].decoder)
    target_tokenizer.pad_token = target_tokenizer.eos_token
    from graftlm.export import export_model

    export_model(converted["linear"][0], folder,
                 tokenizers={"": target_tokenizer, "encoder_tokenizer": source_tokenizer})
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("\n".join(json.dumps({"src": f"say {w}", "tgt": w}) for w in ["yes", "no", "maybe", "so"]))
    out = tmp_path / "trained"
    code = cli.main(["train", "bridge", "--model", str(folder), "--data", str(data_file), "--eval-data",
                     str(data_file), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
                     "--learning-rate", "1e-3", "--logging-steps", "1"])
    assert code == 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["steps"] == 3 and [entry["step"] for entry in metrics["loss_history"]] == [1, 2, 3]
    reloaded, source_tokenizer, target_tokenizer = load_bridge(out)  # the encoder tokenizer is exported too
    assert isinstance(reloaded, BridgeForConditionalGeneration)
    start = converted["linear"][0].state_dict()
    assert any(not torch.equal(value, start[name]) for name, value in reloaded.state_dict().items())  # it trained
    # The export is the model that was evaluated: its loss on the eval pairs (batches of 2, in order) is eval_loss.
    pairs = tokenize_pairs(load_pairs(str(data_file)), source_tokenizer, target_tokenizer)
    collate = BridgeCollator(source_tokenizer.pad_token_id)
    with torch.no_grad():
        losses = [reloaded.eval()(**collate([pairs[i], pairs[i + 1]])).loss for i in (0, 2)]
    assert torch.stack(losses).mean().item() == pytest.approx(metrics["eval_loss"], rel=1e-5)


# ---------------------------------------------------------------- save, export, fresh process


def test_save_and_load_give_the_same_logits(converted, tokenizers, tmp_path):
    model = trained_like(converted["ga_token_gated"][0], seed=6)
    model.bridge.noise_step.fill_(7)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BridgeForConditionalGeneration and loaded.config.token_wise
    assert loaded.bridge.noise_step.item() == 7
    batch = source_batch(tokenizers[0])
    decoder_ids = torch.tensor([[EOS, 464, 3797], [EOS, 11, 12]])
    with torch.no_grad():
        assert torch.equal(model(**batch, decoder_input_ids=decoder_ids).logits,
                           loaded(**batch, decoder_input_ids=decoder_ids).logits)
    assert loaded.decoder.lm_head.weight.data_ptr() == loaded.decoder.transformer.wte.weight.data_ptr()


def test_convert_cli_export_loads_in_a_fresh_process_with_remote_code(gpt2_dir, tmp_path):
    out = tmp_path / "export"
    code = cli.main(["convert", "bridge", "--encoder", str(minilm_dir()), "--decoder", str(gpt2_dir), "--bridge",
                     "population", "--pop-size", "3", "--controls", "--output-dir", str(out)])
    assert code == 0
    card = (out / "README.md").read_text()
    for key in ("library_name: transformers", "pipeline_tag: text2text-generation", "license:", "tags:"):
        assert key in card
    assert "base_model:" not in card and "site-packages" not in card  # both sources are local folders
    assert "license: other" in card and "license_name: encoder-and-decoder-licences" in card  # two sources' licences
    assert "license_link: README.md#licence" in card and "\n## Licence\n" in card
    assert "crossattention.c_proj" in card and "bridge" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    source_tokenizer = load_tokenizer(minilm_dir())
    with torch.no_grad():
        model.decoder.transformer.h[0].crossattention.c_proj.weight.normal_(0, 0.5)  # a source-dependent decoder
    model.save_pretrained(out)  # keeps the exported remote code and tokenizers beside it
    inputs = source_tokenizer(["what is the capital of france?"], return_tensors="pt", padding=True)
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)

    result = run_without_graftlm(snippet + """
import json, torch
assert "graftlm" not in type(model).__module__
with torch.no_grad():
    logits = model(**inputs, decoder_input_ids=output).logits
torch.manual_seed(0)
adaptive = model.generate(**inputs, adaptive_decoding=True, max_new_tokens=4, num_return_sequences=2)
print(json.dumps({"output": output.tolist(), "text": target_tokenizer.batch_decode(output)[0],
                  "logit": logits[0, -1, :5].tolist(), "adaptive": adaptive.tolist(),
                  "pad": target_tokenizer.pad_token_id}))
""", tmp_path)
    assert result["output"][0][: expected.shape[1]] == expected[0].tolist()[: len(result["output"][0])]
    assert result["pad"] == EOS
    # Adaptive decoding (each row's own temperature and top-k) through the exported code samples what ours samples.
    torch.manual_seed(0)
    adaptive = model.generate(**inputs, adaptive_decoding=True, max_new_tokens=4, num_return_sequences=2)
    assert adaptive.shape[0] == 2 and result["adaptive"] == adaptive.tolist()
    with torch.no_grad():
        ours = model(**inputs, decoder_input_ids=torch.tensor(result["output"])).logits[0, -1, :5]
    assert torch.allclose(ours, torch.tensor(result["logit"]), atol=1e-5)


# ---------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(gpt2_dir, tmp_path):
    encoder = minilm_dir()
    odd = save_tiny_gpt2(tmp_path / "odd", n_embd=33, n_head=3)
    with pytest.raises(ConversionError, match="decoder.n_embd=33 is odd"):
        convert_bert_gpt2_to_bridge(encoder, odd, bridge_type="ga")
    with pytest.raises(ConversionError, match="pop_size must be an integer >= 1, got 0"):
        convert_bert_gpt2_to_bridge(encoder, gpt2_dir, bridge_type="population", pop_size=0)
    with pytest.raises(ConversionError, match="'gpt2' checkpoint; a BERT-family encoder"):
        convert_bert_gpt2_to_bridge(gpt2_dir, gpt2_dir)
    with pytest.raises(ConversionError, match="'bert' checkpoint; a GPT-2"):
        convert_bert_gpt2_to_bridge(encoder, encoder)
    with pytest.raises(ConversionError, match="unknown bridge type 'genetic'"):
        convert_bert_gpt2_to_bridge(encoder, gpt2_dir, bridge_type="genetic")
    with pytest.raises(TypeError, match="unknown bridge option\\(s\\): popsize"):
        convert_bert_gpt2_to_bridge(encoder, gpt2_dir, popsize=4)
    with pytest.raises(ConversionError, match="pop_size do not apply to bridge_type='ga'"):
        convert_bert_gpt2_to_bridge(encoder, gpt2_dir, bridge_type="ga", pop_size=8)
    with pytest.raises(ConversionError, match="control_loss_weight do not apply .* without controls"):
        convert_bert_gpt2_to_bridge(encoder, gpt2_dir, control_loss_weight=0.5)
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    with pytest.raises(ValueError, match="has no column\\(s\\) 'src', 'tgt'"):
        load_pairs(str(data_file))
    # The config refuses by itself too (a strict dataclass error naming the field).
    with pytest.raises(StrictDataclassError, match="decoder.n_embd=15 is odd"):
        BridgeConfig(decoder=GPT2Config(n_embd=15, n_head=3, add_cross_attention=True), bridge_type="ga")
    with pytest.raises(StrictDataclassError, match="encoder must be a BERT config"):
        BridgeConfig(encoder=GPT2Config(), bridge_type="linear")
    # And the CLI reports an inapplicable flag instead of ignoring it.
    code = cli.main(["convert", "bridge", "--encoder", str(encoder), "--decoder", str(gpt2_dir), "--bridge", "ga",
                     "--selection", "fitness", "--output-dir", str(tmp_path / "never")])
    assert code == 2 and not (tmp_path / "never").exists()
