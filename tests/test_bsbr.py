"""GPT2-BSBR: parity with GPT-2, causality, padding, chunk retrieval and its cache, errors, training (what every
architecture must do, cache == no cache and save/export/remote code among it, is in test_contract.py)."""

import contextlib
import copy
import functools
import json

import pytest
import torch
from testers import step_batch as padded_batch
from testing_utils import minilm_dir, save_tiny_gpt2
from transformers import AutoModelForCausalLM, DynamicCache, GPT2LMHeadModel

import graftlm  # noqa: F401  registers the architectures
from graftlm.cli import main as cli_main
from graftlm.configuration.configuration_bsbr import BSBRConfig
from graftlm.conversion.bsbr import TransformerToBSBRConverter, convert_gpt2_to_bsbr, convert_to_bsbr
from graftlm.conversion.common import ConversionError
from graftlm.modeling.modeling_bsbr import BSBRForCausalLM

CHUNK = 8  # tiny chunks, so short inputs cross several chunk boundaries
VOCAB = 50257
# Two tiny GPT-2s: 4 heads of 8 dims, and 3 heads of 16 dims with 3 layers.
GPT2_CONFIGS = {"4heads": dict(n_head=4, n_embd=32), "3heads": dict(n_head=3, n_embd=48, n_layer=3)}


@pytest.fixture(scope="module", params=list(GPT2_CONFIGS))
def base(request, tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), seed=1, **GPT2_CONFIGS[request.param])


@pytest.fixture(scope="module")
def base4(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2_4heads"), seed=2, **GPT2_CONFIGS["4heads"])


@functools.cache
def _converted(base, compression_factor):
    return convert_gpt2_to_bsbr(base, chunk_size=CHUNK, compression_factor=compression_factor)


def converted(base, compression_factor=None):
    """(model, report) of the conversion with chunk_size CHUNK: a fresh copy of one conversion per option set."""
    return copy.deepcopy(_converted(base, compression_factor))


def trained(base, seed=0, compression_factor=None):
    """A converted model moved away from its conversion point, as healing would: non-zero gates and perturbed
    meta/compression projections, so the retrieval term contributes to every output."""
    model, _ = converted(base, compression_factor)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("retrieval_gate.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif "meta_" in name or "compress_proj" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def block_diagonal_reference(stock, ids, chunk, position_ids=None):
    """Stock GPT-2 whose attention is restricted, by a 4-D additive mask, to causal attention inside each chunk."""
    pos = torch.arange(ids.shape[1])
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // chunk == pos[:, None] // chunk)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return stock(input_ids=ids, attention_mask=mask[None, None], position_ids=position_ids).logits


@pytest.mark.parametrize("compression_factor", [None, 2])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_equals_stock_gpt2_on_inputs_no_longer_than_a_chunk(base, compression_factor, attn_implementation):
    stock = GPT2LMHeadModel.from_pretrained(base, attn_implementation=attn_implementation).eval()
    model, report = converted(base, compression_factor)
    ids, mask, _ = padded_batch(CHUNK, pads=(0, 3))
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= 1e-4
    assert report.chunk_delta <= 1e-4 and report.block_delta <= 1e-4


@pytest.mark.parametrize("length", [CHUNK + 1, 5 * CHUNK + 3, 128])
def test_gate_zero_equals_block_diagonal_gpt2_at_any_length(base, length):
    stock = GPT2LMHeadModel.from_pretrained(base, attn_implementation="eager").eval()
    model, _ = converted(base, compression_factor=2)
    ids, _, _ = padded_batch(length, pads=(0, 0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        reference = block_diagonal_reference(stock, ids, CHUNK)
        full = stock(input_ids=ids).logits
    assert (got - reference).abs().max().item() <= 1e-4
    # The restriction is real: after the first chunk the converted model is no longer full GPT-2.
    assert (got[:, :CHUNK] - full[:, :CHUNK]).abs().max().item() <= 1e-4
    assert (got[:, CHUNK:] - full[:, CHUNK:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("compression_factor", [None, 2])
def test_changing_a_token_changes_no_earlier_output(base, compression_factor):
    model = trained(base, compression_factor=compression_factor)
    ids, _, _ = padded_batch(4 * CHUNK + 2, pads=(0,))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for t in (1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1234) % VOCAB
            after = model(input_ids=changed).logits
            assert (after[:, :t] - before[:, :t]).abs().max().item() == 0.0, f"token {t} changed an earlier output"
            assert (after[:, t:] - before[:, t:]).abs().max().item() > 1e-4


def test_retrieval_carries_earlier_chunks_only_when_the_gate_is_open(base4):
    model = trained(base4)
    ids, _, _ = padded_batch(3 * CHUNK, pads=(0,))
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % VOCAB  # a token of chunk 0
    with torch.no_grad():
        later = slice(2 * CHUNK, 3 * CHUNK)  # chunk 2 reads chunk 0 only through retrieval
        assert (model(input_ids=changed).logits[:, later] - model(input_ids=ids).logits[:, later]).abs().max() > 1e-4
        for block in model.transformer.h:
            block.attn.retrieval_gate.weight.zero_()
        assert torch.equal(model(input_ids=changed).logits[:, later], model(input_ids=ids).logits[:, later])


def test_padding_changes_nothing_for_real_tokens(base4):
    model = trained(base4, compression_factor=2)
    ids, mask, positions = padded_batch(4 * CHUNK + 1)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        other_pad_ids = ids.masked_fill(~mask.bool(), 777)
        repadded = model(input_ids=other_pad_ids, attention_mask=mask, position_ids=positions).logits
        for row in range(ids.shape[0]):
            first = int(mask[row].argmax())
            alone = model(input_ids=ids[row : row + 1, first:]).logits[0]
            assert (padded[row, first:] - alone).abs().max().item() <= 1e-4
            assert (repadded[row, first:] - alone).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_sequences_each_get_what_they_get_alone(base4, attn_implementation):
    """Rows packing sequences, position_ids restarting at 0 (DataCollatorWithFlattening's layout), without a cache:
    each sequence is chunked from its own start and retrieves from its own chunks only, so its logits, hidden states
    (capture_outputs, in input order) and local attention weights are those of the sequence alone; no weight crosses
    a sequence boundary. Lengths 5, 13 and 16 end inside a chunk and on its boundary."""
    model = trained(base4, compression_factor=2)
    model.set_attn_implementation(attn_implementation)
    lengths = (5, 13, 16)
    ids, _, _ = padded_batch(sum(lengths), pads=(0, 0))  # two packed rows, the second its own sequences reversed
    positions = torch.stack([torch.cat([torch.arange(n) for n in order]) for order in (lengths, lengths[::-1])])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False, output_hidden_states=True,
                       output_attentions=attn_implementation == "eager")
        for row, order in enumerate((lengths, lengths[::-1])):
            start = 0
            for n in order:
                span = slice(start, start + n)
                alone = model(input_ids=ids[row : row + 1, span], use_cache=False, output_hidden_states=True,
                              output_attentions=attn_implementation == "eager")
                torch.testing.assert_close(packed.logits[row, span], alone.logits[0], rtol=0, atol=1e-5)
                for got, want in zip(packed.hidden_states, alone.hidden_states, strict=True):
                    torch.testing.assert_close(got[row, span], want[0], rtol=0, atol=1e-5)
                for got, want in zip(packed.attentions or (), alone.attentions or (), strict=True):
                    torch.testing.assert_close(got[row, :, span, span], want[0], rtol=0, atol=1e-6)
                    assert got[row, :, span].sum(-1).sub(1).abs().max() < 1e-5  # nothing outside the sequence
                start += n


def test_generate_gives_each_row_what_it_gets_alone(base4):
    """(Cached == uncached, beams and sampling: test_contract.py's test_generate_with_the_cache_equals_without.)"""
    model = trained(base4)
    ids, mask, _ = padded_batch(CHUNK + 4, pads=(0, 5))
    kwargs = dict(max_new_tokens=3 * CHUNK, pad_token_id=0)  # crosses three chunk boundaries
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
        for row in range(2):
            first = int(mask[row].argmax())
            alone = model.generate(input_ids=ids[row : row + 1, first:], do_sample=False, **kwargs)
            assert torch.equal(greedy[row, first:], alone[0])


@contextlib.contextmanager
def host_reads(log):
    """Appends to `log` every read of a tensor's value by the host (what synchronises with a GPU) inside the block."""
    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counted(name):
        def read(self, *args, **kwargs):
            log.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    for name in names:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_decode_step_reads_nothing_on_the_host_except_where_a_chunk_completes(base4):
    """A dynamic-cache decode step reads a tensor on the host (a GPU sync) only at a step where some row completes a
    chunk, once per layer; the other steps run without any."""
    model = trained(base4)
    ids, mask, _ = padded_batch(CHUNK + 4, pads=(0, 5))  # rows of 12 and 7 real tokens: different chunk phases
    fill = mask.sum(1) % CHUNK
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for step in range(3 * CHUNK):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            reads = []
            with host_reads(reads):
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            fill = (fill + 1) % CHUNK
            completes = bool((fill == 0).any())
            assert len(reads) == (model.config.n_layer if completes else 0), (step, reads)


def test_cache_grows_by_one_state_per_completed_chunk(base4):
    model = trained(base4, compression_factor=2)
    config = model.config
    sizes = {}
    with torch.no_grad():
        for n in (2 * CHUNK, 6 * CHUNK, 14 * CHUNK):
            ids, _, _ = padded_batch(n, pads=(0, 0))
            cache = model(input_ids=ids, use_cache=True).past_key_values
            sizes[n] = cache.nbytes()
            assert all(layer.k_buf.shape[2] == CHUNK for layer in cache.layers)  # keys kept for one chunk only
    d, s = config.head_dim, config.state_dim
    per_chunk = config.n_layer * 2 * config.n_head * (s * d + s + d) * 4  # F_j, z_j, H_j in float32, batch of 2
    assert sizes[6 * CHUNK] - sizes[2 * CHUNK] == 4 * per_chunk
    assert sizes[14 * CHUNK] - sizes[6 * CHUNK] == 8 * per_chunk


def test_new_modules_start_from_gpt2_weights(base4):
    model = convert_to_bsbr(str(base4), chunk_size=CHUNK, compression_factor=2)
    stock = GPT2LMHeadModel.from_pretrained(base4)
    n = model.config.n_embd
    for block, stock_block in zip(model.transformer.h, stock.transformer.h):
        w_q, w_k, w_v = stock_block.attn.c_attn.weight.split(n, dim=1)
        torch.testing.assert_close(block.attn.meta_r_proj.weight, (w_q + w_k) / 2)
        torch.testing.assert_close(block.attn.meta_h_proj.weight, (w_k + w_v) / 2)
        assert torch.equal(block.attn.retrieval_gate.weight, torch.zeros(model.config.n_head))
        # compression: each state feature averages two consecutive key dimensions
        x = torch.randn(3, model.config.head_dim)
        torch.testing.assert_close(block.attn.compress_proj(x), x.view(3, -1, 2).mean(-1))


def test_seed_api_shape(base4):
    converter = TransformerToBSBRConverter(chunk_size=CHUNK, compression_factor=2)
    model = converter.convert_pretrained_model(str(base4))
    assert isinstance(model, BSBRForCausalLM) and (converter.chunk_size, converter.compression_factor) == (CHUNK, 2)
    assert converter.report.chunk_delta <= 1e-4
    assert model.config.model_type == "gpt2_bsbr" and model.config.compression_factor == 2


def test_raised_n_positions_tiles_the_learned_table_and_runs_longer_inputs(base4):
    model, report = convert_gpt2_to_bsbr(base4, chunk_size=CHUNK, n_positions=300)
    stock = GPT2LMHeadModel.from_pretrained(base4, attn_implementation="eager").eval()
    old = stock.transformer.wpe.weight
    new = model.transformer.wpe.weight
    assert new.shape[0] == 300 and report.n_positions == 300
    assert torch.equal(new[:128], old) and torch.equal(new[128:256], old) and torch.equal(new[256:], old[:44])
    ids, _, _ = padded_batch(290, pads=(0,))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        # The gate is 0: chunk-local GPT-2 at every length, position p reading the learned row p mod 128.
        expected = block_diagonal_reference(stock, ids, CHUNK, position_ids=torch.arange(290)[None] % 128)
    assert (got - expected).abs().max().item() <= 1e-4


def test_gradients_reach_the_gate_at_conversion_and_the_projections_once_it_opens(base4):
    model, _ = converted(base4)
    ids, _, _ = padded_batch(3 * CHUNK, pads=(0, 0))
    model(input_ids=ids, labels=ids).loss.backward()
    attn = model.transformer.h[0].attn
    assert attn.retrieval_gate.weight.grad.abs().min() > 0
    assert attn.meta_h_proj.weight.grad.abs().max() == 0  # the gate is 0: retrieval does not reach the loss yet
    model.zero_grad()
    with torch.no_grad():
        attn.retrieval_gate.weight.fill_(0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    assert attn.meta_h_proj.weight.grad.abs().max() > 0 and attn.meta_r_proj.weight.grad.abs().max() > 0


def test_peft_modules_to_save_learns_the_retrieval_gate_from_zero(base4):
    """A freshly converted model (gate 0, so LoRA on the retrieval projections gets no gradient) learns its gates
    through modules_to_save: the adapter's copy opens after one step, the base gate stays 0, and the model reads the
    copy (chunk 2 then depends on chunk 0; with the adapter disabled it does not)."""
    from peft import LoraConfig, get_peft_model

    model, _ = converted(base4)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "meta_r_proj", "meta_h_proj"],
                                                  modules_to_save=["retrieval_gate"], task_type="CAUSAL_LM"))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    ids, _, _ = padded_batch(3 * CHUNK, pads=(0, 0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    peft_model.eval()
    for block in model.transformer.h:
        wrapper = block.attn.retrieval_gate
        assert wrapper.modules_to_save["default"].weight.abs().min() > 0
        assert torch.equal(wrapper.original_module.weight, torch.zeros(model.config.n_head))
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % VOCAB  # a token of chunk 0
    later = slice(2 * CHUNK, 3 * CHUNK)
    with torch.no_grad():
        assert (peft_model(input_ids=changed).logits[:, later] - peft_model(input_ids=ids).logits[:, later]).abs().max() > 1e-4
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(input_ids=changed).logits[:, later], peft_model(input_ids=ids).logits[:, later])


def test_cli_convert_then_train_heals_and_exports(base4, tmp_path):
    text = tmp_path / "text.txt"
    from graftlm.offline import offline_text

    text.write_text(offline_text()[:40000], encoding="utf-8")
    converted, healed = tmp_path / "converted", tmp_path / "healed"
    assert cli_main(["convert", "bsbr", "--base", str(base4), "--output-dir", str(converted), "--chunk-size", "16",
                     "--compression-factor", "2", "--n-positions", "256"]) == 0
    config = json.loads((converted / "config.json").read_text())
    assert (config["chunk_size"], config["compression_factor"], config["n_positions"]) == (16, 2, 256)
    assert cli_main(["train", "bsbr", "--model", str(converted), "--text", str(text), "--output-dir", str(healed),
                     "--max-steps", "4", "--batch-size", "2", "--seq-len", "64", "--learning-rate", "1e-2"]) == 0
    metrics = json.loads((healed / "healing_metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["seq_len"] == 64 and metrics["mean_abs_retrieval_gate"] > 0
    model = AutoModelForCausalLM.from_pretrained(healed)
    assert isinstance(model, BSBRForCausalLM)
    assert model.transformer.h[0].attn.retrieval_gate.weight.abs().max() > 0


# ---- bad input: each a clear error naming the problem ----


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_non_positive_chunk_size_is_refused(base4, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        convert_gpt2_to_bsbr(base4, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        TransformerToBSBRConverter(chunk_size=chunk_size)
    with pytest.raises(Exception, match="chunk_size must be a positive integer"):
        BSBRConfig(n_embd=32, n_head=4, chunk_size=chunk_size)


def test_compression_factor_that_does_not_divide_the_state_is_refused(base4):
    with pytest.raises(ValueError, match=r"compression_factor \(3\) must divide .* head_dim .* = 8"):
        convert_gpt2_to_bsbr(base4, chunk_size=CHUNK, compression_factor=3)
    assert cli_main(["convert", "bsbr", "--base", str(base4), "--output-dir", "/nonexistent/never",
                     "--compression-factor", "3"]) == 2


def test_non_gpt2_checkpoint_is_refused():
    with pytest.raises(ConversionError, match="'bert' checkpoint"):
        convert_to_bsbr(str(minilm_dir()), chunk_size=CHUNK)


def test_other_bad_options_and_inputs_are_refused(base4):
    with pytest.raises(TypeError, match="unknown BSBR option"):
        convert_gpt2_to_bsbr(base4, chunk_sise=8)
    with pytest.raises(ValueError, match="n_positions"):
        convert_gpt2_to_bsbr(base4, n_positions=64)
    with pytest.raises(ValueError, match="feature_map"):
        convert_gpt2_to_bsbr(base4, feature_map="relu")
    model, _ = converted(base4)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="BSBRCache"):
        model(input_ids=ids, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 5, dtype=torch.long))

