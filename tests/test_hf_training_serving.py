"""Issue 6, part B: Trainer, gradient checkpointing, bf16, `accelerate launch` (2 CPU processes), pipeline and
evaluate, one test per cell for each of the four architectures, on exported folders loaded through their own code."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import MATRIX_ARCHS, is_remote_code, remote_code_only, run_without_graftlm
from testing_utils import load_remote as load

from graftlm import cli

TOL = 1e-5
LAUNCH_TOL = 1e-4  # 1 vs 2 processes: same batches, gradients averaged over gloo; measured <= 2e-6


def plain_copy(folder, dest):
    """A copy of an export without randomness in training: dropout 0, and the bridge's mutation scale ~1e-17."""
    shutil.copytree(folder, dest)

    def no_dropout(obj):
        if isinstance(obj, dict):
            return {k: 0.0 if "drop" in k and isinstance(v, float) else no_dropout(v) for k, v in obj.items()}
        return obj

    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(no_dropout(config), indent=2))
    weights = load_file(dest / "model.safetensors")
    sigma = [k for k in weights if k.startswith("bridge.") and "sigma" in k]
    for key in sigma:
        weights[key] = torch.full_like(weights[key], -40.0)  # softplus(-40) ~ 4e-18
    if sigma:
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def plain(matrix_exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {arch: plain_copy(folder, root / arch) for arch, folder in matrix_exports.items()}


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows(arch, n=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 50257, (length,), generator=g)
        ids = torch.randint(1000, 30000, (length,), generator=g) if arch == "bridge" else labels
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def batch(items):
    return {k: torch.stack([r[k] for r in items]) for k in items[0]}


def train(model, data, tmp_path, steps=4, **options):
    from transformers import Trainer, TrainingArguments

    rate = 1e-4 if model.config.is_encoder_decoder else 5e-3  # the bridge's pretrained BERT diverges at 5e-3
    options = dict(dict(learning_rate=rate, use_cpu=True), **options)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=len(data),
                             logging_steps=1, report_to="none", save_strategy="no", seed=0, **options)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(data))
    trainer.train()
    return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]


def manual_loss(model, data):
    model.train()
    return model(**batch(data), use_cache=False).loss.item()


# ----- 1. Trainer: the loss comes from the model's labels path, and training lowers it -----


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_trainer_loss(plain, arch, tmp_path):
    model, data = load(plain[arch], arch), rows(arch)
    expected = manual_loss(model, data)  # the same two rows make every step's batch: data order cannot matter
    _, losses = train(model, data, tmp_path)
    assert abs(losses[0] - expected) <= TOL * max(1.0, abs(expected))
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)


# ----- 2. gradient checkpointing: same loss and gradients, and the blocks really run twice -----


def first_block(model, arch):
    return {"dfa": lambda: model.transformer.h[0], "bsbr": lambda: model.transformer.h[0],
            "bridge": lambda: model.decoder.transformer.h[0], "scaffold": lambda: model.base.transformer.h[0]}[arch]()


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_gradient_checkpointing(plain, arch, tmp_path):
    model, data = load(plain[arch], arch), rows(arch)
    calls = []
    # transformers checkpoints a block's forward inside its hooks, so count a layer inside the block
    first_block(model, arch).ln_1.register_forward_hook(lambda *_: calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        model.train()
        loss = model(**batch(data), use_cache=False).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    assert len(calls) == 1 and grads
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    loss_gc, grads_gc = loss_and_grads()
    assert len(calls) == 2  # recomputed in the backward pass
    assert abs(loss - loss_gc) <= TOL and grads.keys() == grads_gc.keys()
    assert max((grads[n] - grads_gc[n]).abs().max().item() for n in grads) <= TOL

    fresh = load(plain[arch], arch)  # through TrainingArguments(activation_checkpointing=True)
    _, losses = train(fresh, data, tmp_path, steps=1, activation_checkpointing=True)
    assert fresh.is_activation_checkpointing and abs(losses[0] - loss) <= TOL * max(1.0, abs(loss))


# ----- 3. bf16 -----


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_bf16_trainer(plain, arch, tmp_path):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a CPU without bfloat16 autocast fails here, not silently
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    model, data = load(plain[arch], arch), rows(arch)
    _, losses = train(model, data, tmp_path, steps=5, bf16=True)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert next(model.parameters()).dtype == torch.float32  # autocast, master weights stay float32


# ----- 4. accelerate launch --num_processes 2 gives the loss of one process -----

DIGITS = [" ".join(str((i * 7 + j) % 10) for j in range(4)) for i in range(10)]


def command(arch, folder, data_dir, out, per_device):
    if arch in ("dfa", "bsbr"):
        text = data_dir / "text.txt"
        text.write_text(" ".join(f"word{i % 37} is number {i}." for i in range(300)))
        return ["train", arch, "--model", str(folder), "--text", str(text), "--seq-len", "16", "--max-steps", "3",
                "--batch-size", str(per_device), "--logging-steps", "1", "--warmup-steps", "0",
                "--eval-fraction", "0", "--output-dir", str(out)]
    pairs = data_dir / "pairs.jsonl"
    if arch == "bridge":
        pairs.write_text("".join(json.dumps({"src": d, "tgt": d[::-1]}) + "\n" for d in DIGITS))
        return ["train", "bridge", "--model", str(folder), "--data", str(pairs), "--max-steps", "3",
                "--batch-size", str(per_device), "--logging-steps", "1", "--warmup-steps", "0",
                "--learning-rate", "1e-3", "--output-dir", str(out)]
    pairs.write_text("".join(json.dumps({"prompt": d, "completion": " " + d[::-1]}) + "\n" for d in DIGITS))
    return ["train", "scaffold", str(folder), "--data", str(pairs), "--epochs", "1", "--batch-size", str(per_device),
            "--gradient-accumulation-steps", "1", "--samples-per-epoch", "0", "--learning-rate", "1e-2",
            "--output-dir", str(out)]


def losses_of(arch, out):
    if arch == "scaffold":
        state = json.loads((out.parent / f"{out.name}-checkpoints" / "checkpoint-epoch-1" / "trainer_state.json")
                           .read_text())
        return [state["initial_valid_loss"], state["history"][0]["train_loss"], state["history"][0]["valid_loss"]]
    name = "healing_metrics.json" if arch == "bsbr" else "training_metrics.json"
    return [entry["loss"] for entry in json.loads((out / name).read_text())["loss_history"]]


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_accelerate_launch_two_processes(plain, arch, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert cli.main(command(arch, plain[arch], tmp_path, tmp_path / "one", per_device=2)) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # two CPU processes over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "graftlm.cli"]
    result = subprocess.run(launch + command(arch, plain[arch], tmp_path, tmp_path / "two", per_device=1),
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("exported to") == 1  # the main process alone exports
    one, two = losses_of(arch, tmp_path / "one"), losses_of(arch, tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) <= LAUNCH_TOL, (one, two)


# ----- 5. pipeline -----


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_pipeline(matrix_exports, arch, tmp_path):
    from transformers import AutoTokenizer, pipeline

    folder = str(matrix_exports[arch])
    prompts = ["The quick brown fox", "Hello"]
    task = "text2text-generation" if arch == "bridge" else "text-generation"
    with remote_code_only():
        pipe = pipeline(task, model=folder, trust_remote_code=True)
        assert is_remote_code(pipe.model)
        got = [out[0]["generated_text"] for out in pipe(prompts, max_new_tokens=6, do_sample=False)]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source_tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="encoder_tokenizer") if arch == "bridge" else tokenizer
    expected = []
    for prompt in prompts:
        ids = pipe.model.generate(**source_tokenizer(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.eos_token_id)
        if arch != "bridge":
            ids = ids[:, len(tokenizer(prompt).input_ids):]
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        expected.append(text if arch == "bridge" else prompt + text)
    assert got == expected and all(len(t) > len(p) or arch == "bridge" for t, p in zip(got, prompts))
    if arch == "bridge":  # a user without graftlm, in a fresh process
        fresh = run_without_graftlm(f"""
            import json
            from transformers import pipeline
            pipe = pipeline("text2text-generation", model={folder!r}, trust_remote_code=True)
            out = pipe({prompts!r}, max_new_tokens=6, do_sample=False)
            print(json.dumps([o[0]["generated_text"] for o in out]))
        """, tmp_path)
        assert fresh == expected


def test_text2text_pipeline_rejects_non_text(matrix_exports):
    from transformers import pipeline

    with remote_code_only():
        pipe = pipeline("text2text-generation", model=str(matrix_exports["bridge"]), trust_remote_code=True)
    with pytest.raises(TypeError, match="takes a string"):
        pipe(123)


# ----- 6. evaluate: local metric modules, offline, used by graftlm eval -----

TEXTS = ["The cat sat on the mat and looked at the door.", "Numbers: one, two, three, four, five."]
PAIRS = [("the cat sat", "le chat"), ("a red door opens", "une porte rouge s'ouvre")]


def manual_nll(model, arch, folder):
    """exp(mean NLL) by hand: one forward per text (or pair), the shifted cross-entropy of its tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        if arch == "bridge":
            source_tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="encoder_tokenizer")
            for source, target in PAIRS:
                labels = torch.tensor([tokenizer(target).input_ids + [tokenizer.eos_token_id]])
                logits = model(**source_tokenizer(source, return_tensors="pt"), labels=labels).logits
                total += torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum").item()
                count += labels.shape[1]
        else:
            for text in TEXTS:  # every token, the first predicted from eos (lm-eval's prefix token)
                ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text).input_ids])
                logits = model(input_ids=ids, use_cache=False).logits
                total += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
    return math.exp(total / count)


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_evaluate_metric_module(matrix_exports, arch, tmp_path, monkeypatch, capsys):
    import evaluate

    from graftlm.evaluation import causal_perplexity, metric_path, seq2seq_perplexity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = str(matrix_exports[arch])
    if arch == "bridge":
        metric = evaluate.load(metric_path("seq2seq_perplexity"))
        sources, targets = map(list, zip(*PAIRS))
        result = metric.compute(sources=sources, targets=targets, model_id=folder, trust_remote_code=True)
        direct = seq2seq_perplexity(folder, sources, targets)
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in PAIRS))
        eval_args = ["--pairs", str(tmp_path / "pairs.jsonl")]
    else:
        metric = evaluate.load(metric_path("perplexity"))
        result = metric.compute(predictions=TEXTS, model_id=folder, trust_remote_code=True)
        direct = causal_perplexity(folder, TEXTS)
        eval_args = ["--text", str(tmp_path / "text.txt")]
        (tmp_path / "text.txt").write_text(TEXTS[0])
    with remote_code_only():
        manual = manual_nll(load(folder, arch), arch, folder)
    assert len(result["perplexities"]) == 2
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(manual, rel=1e-5)

    capsys.readouterr()
    assert cli.main(["eval", folder, *eval_args]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = direct["perplexity"] if arch == "bridge" else causal_perplexity(folder, TEXTS[:1])["perplexity"]
    assert printed["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_eval_rejects_mismatched_inputs(matrix_exports, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello there")
    assert cli.main(["eval", str(matrix_exports["bridge"]), "--text", str(tmp_path / "t.txt")]) == 2
    assert "seq2seq model is scored on --pairs" in capsys.readouterr().err
    (tmp_path / "s.txt").write_text("a\nb\n")
    (tmp_path / "u.txt").write_text("a\n")
    args = ["eval", str(matrix_exports["bridge"]), "--sources", str(tmp_path / "s.txt"), "--targets", str(tmp_path / "u.txt")]
    assert cli.main(args) == 2 and "has 2 lines but" in capsys.readouterr().err
    assert cli.main(["eval", str(matrix_exports["dfa"]), "--pairs", str(tmp_path / "s.txt")]) == 2
    assert "causal LM is scored on --text" in capsys.readouterr().err
