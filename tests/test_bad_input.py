"""Bad input and faults (issue 16): every case is one clear error, exit code 2, one line that names the input and
what is wrong, no traceback, and no file changed (every folder involved is hashed before and after). Faults: a full
disk, a real write failure, and SIGKILL during conversion, export and training checkpoints, then a rerun or resume.

The models are tiny exports shared by the whole module; damaged copies are made per case."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import gpt2_tokenizer, minilm_dir, save_tiny_gpt2

from graftlm.cli import main

PAIRS = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(8)]
ONE_STEP_EPOCHS = ["--batch-size", "8", "--gradient-accumulation-steps", "1", "--samples-per-epoch", "0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_gpt2_dir):
    """Tiny exports of DFA, Bridged (from a tiny BERT) and Scaffolded, a stock GPT-2 and BERT, a text, pairs."""
    from transformers import BertConfig, BertModel

    from graftlm.offline import offline_text

    root = tmp_path_factory.mktemp("bad_input")
    bert = root / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    shutil.copy(minilm_dir() / "tokenizer.json", bert)
    shutil.copy(minilm_dir() / "tokenizer_config.json", bert)
    w = SimpleNamespace(root=root, gpt2=Path(tiny_gpt2_dir), bert=bert, dfa=root / "dfa", bridge=root / "bridge",
                        scaffold=root / "scaffold", text=root / "text.txt", pairs=root / "pairs.jsonl")
    for argv in (["convert", "dfa", "--base", w.gpt2, "--output-dir", w.dfa],
                 ["convert", "bridge", "--encoder", bert, "--decoder", w.gpt2, "--bridge", "linear",
                  "--output-dir", w.bridge],
                 ["convert", "scaffold", "--base", w.gpt2, "--scaffold", w.gpt2, "--cross-attn-layers", "0,1",
                  "--output-dir", w.scaffold]):
        assert main([str(a) for a in argv]) == 0
    w.text.write_text(offline_text()[:1500], encoding="utf-8")
    w.pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    return w


_digests = {}


def tree_hash(*folders):
    """{path: sha256 of its bytes (or "dir")} of everything under `folders` (hashes memoised per inode, size and
    mtime, so that unchanged multi-megabyte weights are read once per module)."""
    state = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_dir():
                state[str(path)] = "dir"
                continue
            stat = path.stat()
            key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if key not in _digests:
                _digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path)] = _digests[key]
    return state


def run_cli(argv, capsys):
    """(exit code, stderr) of graftlm.cli.main, argparse's exits included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def error_line(err):
    """The one error line of a failed command (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("graftlm") and "error:" in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def copy(source, target):
    return Path(shutil.copytree(source, target))


def truncate(path, size=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def overwrite_bytes(path):
    path.write_bytes(b"\xff" * path.stat().st_size)


def edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


def poisoned_gpt2(w, t, value):
    base = copy(w.gpt2, t / "base")
    weights = load_file(base / "model.safetensors")
    weights["transformer.h.1.mlp.c_fc.weight"][0, 0] = value
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    return base


def poisoned_conversion(w, t, arch, value):
    argv = ["convert", arch, "--base", poisoned_gpt2(w, t, value), "--output-dir", t / "out"]
    return argv, [str(t / "base"), "NaN or infinite weights", "transformer.h.1.mlp.c_fc.weight"]


def damaged_base(damage):
    def case(w, t):
        base = copy(w.gpt2, t / "base")
        damage(base / "model.safetensors")
        return ["convert", "dfa", "--base", base, "--output-dir", t / "out"], [str(base / "model.safetensors"), "damaged"]
    return case


def damaged_export(damage, *expected):
    def case(w, t):
        folder = copy(w.dfa, t / "dfa")
        damage(folder)
        return ["generate", folder, "--prompt", "Hello"], [str(folder), *expected]
    return case


def no_tokenizer(w, t):
    base = copy(w.gpt2, t / "base")
    for path in base.glob("tokenizer*"):
        path.unlink()
    return ["convert", "dfa", "--base", base, "--output-dir", t / "out"], [str(base), "no vocabulary"]


def small_vocabulary(w, t):
    base = save_tiny_gpt2(t / "base", vocab_size=1000)
    return (["convert", "dfa", "--base", base, "--output-dir", t / "out"],
            [str(base), "50257 tokens but the model's vocabulary has 1000"])


def export_with_small_vocabulary(w, t):
    """An export made without the check (a model saved by hand with a larger tokenizer): generate refuses it."""
    from graftlm.conversion.dfa import convert_gpt2_to_dfa

    model, _ = convert_gpt2_to_dfa(save_tiny_gpt2(t / "base", vocab_size=1000))
    model.save_pretrained(t / "dfa")
    gpt2_tokenizer().save_pretrained(t / "dfa")
    return ["generate", t / "dfa", "--prompt", "Hello"], [str(t / "dfa"), "50257 tokens but the model's vocabulary has 1000"]


def written(name, text):
    def make(t):
        (t / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return t / name
    return make


def eval_pairs(text, *expected):
    def case(w, t):
        pairs = written("pairs.jsonl", text)(t)
        return ["eval", w.bridge, "--pairs", pairs], [str(pairs), *expected]
    return case


def eval_text(text, *expected):
    def case(w, t):
        path = written("text.txt", text)(t)
        return ["eval", w.dfa, "--text", path], [str(path), *expected]
    return case


def train_dfa(*flags, expected):
    def case(w, t):
        return ["train", "dfa", "--model", w.dfa, "--text", w.text, "--output-dir", t / "out", "--seq-len", "16",
                *flags], expected
    return case


def non_empty_target(command):
    def case(w, t):
        (t / "out").mkdir()
        (t / "out" / "keep.txt").write_text("user data")
        argv = {"convert": ["convert", "dfa", "--base", w.gpt2],
                "analyze": ["analyze", w.dfa, "--text", w.text],
                "train": ["train", "dfa", "--model", w.dfa, "--text", w.text, "--max-steps", "1"]}[command]
        return [*argv, "--output-dir", t / "out"], [str(t / "out"), "not empty", "--overwrite"]
    return case


def self_overwrite(command):
    def case(w, t):
        model = copy(w.gpt2 if command == "convert" else w.dfa, t / "model")
        argv = {"convert": ["convert", "dfa", "--base", model],
                "train": ["train", "dfa", "--model", model, "--text", w.text, "--max-steps", "1"]}[command]
        return [*argv, "--output-dir", model, "--overwrite"], [str(model), "holds the input", "another output folder"]
    return case


def train_bridge_data(text, *expected):
    def case(w, t):
        data = written("pairs.jsonl", text)(t)
        return ["train", "bridge", "--model", w.bridge, "--data", data, "--output-dir", t / "out"], [str(data), *expected]
    return case


def generate(flag, value, *expected, model="dfa"):
    def case(w, t):
        return ["generate", getattr(w, model), "--prompt", "Hi", "--do-sample", flag, value], [flag, *expected]
    return case


CASES = {
    # convert: the loader checks the checkpoint's files, its weights and its tokenizer
    "convert-corrupt-weights": damaged_base(overwrite_bytes),
    "convert-truncated-weights": damaged_base(truncate),
    "convert-empty-weights": damaged_base(lambda path: truncate(path, 0)),
    "convert-nan-weights": lambda w, t: poisoned_conversion(w, t, "dfa", float("nan")),
    "convert-inf-weights": lambda w, t: poisoned_conversion(w, t, "bsbr", float("inf")),
    "convert-without-tokenizer": no_tokenizer,
    "convert-vocabulary-smaller-than-tokenizer": small_vocabulary,
    "convert-missing-base": lambda w, t: (["convert", "dfa", "--base", t / "nothing", "--output-dir", t / "out"],
                                          [str(t / "nothing"), "does not exist"]),
    "convert-masked-lm-base": lambda w, t: (["convert", "dfa", "--base", w.bert, "--output-dir", t / "out"],
                                            [str(w.bert), "'bert' checkpoint", "GPT-2"]),
    "convert-option-out-of-range": lambda w, t: (["convert", "dfa", "--base", w.gpt2, "--output-dir", t / "out",
                                                  "--target-entropy-ratio", "2"], ["target_entropy_ratio", "(0, 1]"]),
    "convert-layer-out-of-range": lambda w, t: (["convert", "scaffold", "--base", w.gpt2, "--scaffold", w.gpt2,
                                                 "--cross-attn-layers", "0,9", "--output-dir", t / "out"],
                                                ["cross_attn_layers [9] out of range"]),
    "convert-non-empty-target": non_empty_target("convert"),
    "convert-onto-its-base": self_overwrite("convert"),
    "convert-over-the-folder-holding-its-base": lambda w, t: (
        ["convert", "dfa", "--base", copy(w.gpt2, t / "models" / "gpt2"), "--output-dir", t / "models", "--overwrite"],
        [str(t / "models"), "holds the input", "another output folder"]),
    # generate: the loader checks the export's files, the flags their ranges
    "generate-truncated-weights": damaged_export(lambda f: truncate(f / "model.safetensors"), "model.safetensors",
                                                 "damaged"),
    "generate-unknown-dtype": damaged_export(lambda f: edit_config(f, dtype="float128"), "config.json", "float128",
                                             "not a torch dtype"),
    "generate-config-not-json": damaged_export(lambda f: truncate(f / "config.json"), "config.json", "not valid JSON"),
    "generate-vocabulary-smaller-than-tokenizer": export_with_small_vocabulary,
    "generate-missing-model": lambda w, t: (["generate", t / "nothing", "--prompt", "Hi"], [str(t / "nothing"),
                                                                                          "does not exist"]),
    "generate-masked-lm": lambda w, t: (["generate", w.bert, "--prompt", "Hi"], [str(w.bert), "masked language model"]),
    "generate-top-p-2": generate("--top-p", "2", "must be in (0, 1], got 2"),
    "generate-top-p-0": generate("--top-p", "0", "must be in (0, 1], got 0"),
    "generate-temperature-0": generate("--temperature", "0", "must be > 0, got 0"),
    "generate-top-k-0": generate("--top-k", "0", "must be >= 1, got 0"),
    "generate-max-new-tokens-0": lambda w, t: (["generate", w.dfa, "--prompt", "Hi", "--max-new-tokens", "0"],
                                               ["--max-new-tokens", "must be >= 1, got 0"]),
    "generate-scaffold-weight-1.5": generate("--scaffold-weight", "1.5", "must be in [0, 1], got 1.5",
                                             model="scaffold"),
    "generate-bridge-empty-prompt": lambda w, t: (["generate", w.bridge, "--prompt", ""], ["--prompt", "is empty"]),
    "generate-blank-prompt": lambda w, t: (["generate", w.dfa, "--prompt", "Hi", "--prompt", "  "],
                                           ["--prompt", "is empty"]),
    # eval: ranges of the flags, the pairs and texts it reads, and what a perplexity is defined for
    "eval-max-length-0": lambda w, t: (["eval", w.dfa, "--text", w.text, "--max-length", "0"],
                                       ["--max-length", "must be >= 2, got 0"]),
    "eval-stride-0": lambda w, t: (["eval", w.dfa, "--text", w.text, "--stride", "0"], ["--stride", "must be >= 1"]),
    "eval-max-length-beyond-positions": lambda w, t: (["eval", w.dfa, "--text", w.text, "--max-length", "4096"],
                                                      [str(w.dfa), "max_length=4096", "n_positions=128"]),
    "eval-unknown-dtype": lambda w, t: (["eval", edit_config(copy(w.dfa, t / "dfa"), torch_dtype="float128"), "--text",
                                         w.text], [str(t / "dfa" / "config.json"), "torch_dtype 'float128'"]),
    "eval-masked-lm": lambda w, t: (["eval", w.bert, "--text", w.text], [str(w.bert), "masked language model"]),
    "eval-pairs-empty-file": eval_pairs("", "is empty"),
    "eval-pairs-blank-lines": eval_pairs("\n  \n", "is empty"),
    "eval-pairs-empty-strings": eval_pairs('{"src": "", "tgt": ""}\n', "line 1", "'src'", "empty"),
    "eval-pairs-empty-target": eval_pairs('{"src": "a cat", "tgt": "le chat"}\n{"src": "a dog", "tgt": " "}\n',
                                          "line 2", "'tgt'", "empty"),
    "eval-pairs-missing-field": eval_pairs('{"source": "a", "target": "b"}\n', "line 1", "'src'", "missing"),
    "eval-pairs-not-json": eval_pairs('{"src": "a", "tgt": "b"}\n{"src": \n', "line 2", "not valid JSON"),
    "eval-sources-targets-differ": lambda w, t: (
        ["eval", w.bridge, "--sources", written("s.txt", "a\nb\n")(t), "--targets", written("t.txt", "a\n")(t)],
        ["s.txt has 2 lines", "t.txt has 1"]),
    "eval-text-empty": eval_text("", "is empty"),
    "eval-text-not-utf8": eval_text(b"caf\xe9 au lait", "not UTF-8"),
    "eval-text-missing": lambda w, t: (["eval", w.dfa, "--text", t / "none.txt"], [str(t / "none.txt"), "does not exist"]),
    # train: the flags' ranges, the data, the target folder
    "train-dfa-max-steps-0": train_dfa("--max-steps", "0", expected=["--max-steps", "must be >= 1, got 0"]),
    "train-dfa-max-steps-negative": train_dfa("--max-steps", "-1", expected=["--max-steps", "must be >= 1, got -1"]),
    "train-dfa-learning-rate-0": train_dfa("--learning-rate", "0", expected=["--learning-rate", "must be > 0"]),
    "train-dfa-eval-fraction-1": train_dfa("--eval-fraction", "1", expected=["--eval-fraction", "in [0, 1)"]),
    "train-dfa-seq-len-1": train_dfa("--seq-len", "1", expected=["--seq-len", "must be >= 2, got 1"]),
    "train-dfa-jsonl-bad-line": lambda w, t: (
        ["train", "dfa", "--model", w.dfa, "--text", written("c.jsonl", '{"text": "a"}\n{"text": \n')(t),
         "--output-dir", t / "out"], [str(t / "c.jsonl"), "line 2", "not valid JSON"]),
    "train-dfa-non-empty-target": non_empty_target("train"),
    "train-dfa-onto-its-model": self_overwrite("train"),
    "train-bridge-empty-jsonl": train_bridge_data("", "is empty", "no pairs"),
    "train-bridge-max-steps-0": lambda w, t: (["train", "bridge", "--model", w.bridge, "--data", w.pairs,
                                               "--output-dir", t / "out", "--max-steps", "0"], ["--max-steps", ">= 1"]),
    "train-scaffold-epochs-0": lambda w, t: (["train", "scaffold", w.scaffold, "--data", w.pairs, "--output-dir",
                                              t / "out", "--epochs", "0"], ["epochs must be a positive integer"]),
    "train-scaffold-resume-without-checkpoint": lambda w, t: (
        ["train", "scaffold", w.scaffold, "--data", w.pairs, "--output-dir", t / "out", "--checkpoint-dir", t,
         "--resume-from-checkpoint", "latest"], [str(t), "no checkpoint-epoch-*"]),
    "train-scaffold-earlier-checkpoints": lambda w, t: (
        ["train", "scaffold", w.scaffold, "--data", w.pairs, "--output-dir", t / "out", "--checkpoint-dir",
         copy(w.dfa, t / "checkpoints" / "checkpoint-epoch-3").parent], [str(t / "checkpoints"), "earlier run",
                                                                         "checkpoint-epoch-3", "--overwrite"]),
    # analyze: the same target rules as every other command, and the model's positions
    "analyze-non-empty-target": non_empty_target("analyze"),
    "analyze-max-length-beyond-positions": lambda w, t: (
        ["analyze", w.dfa, "--text", w.text, "--output-dir", t / "out", "--max-length", "4096"],
        [str(w.dfa), "max_length", "n_positions=128", "4096"]),
    "analyze-max-length-0": lambda w, t: (["analyze", w.dfa, "--text", w.text, "--output-dir", t / "out",
                                           "--max-length", "0"], ["--max-length", "must be >= 1"]),
    "analyze-non-dfa-model": lambda w, t: (["analyze", w.gpt2, "--text", w.text, "--output-dir", t / "out"],
                                           [str(w.gpt2), "needs GPT2-DFA"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error_and_changes_nothing(name, world, tmp_path, capsys):
    argv, expected = CASES[name](world, tmp_path)
    capsys.readouterr()
    before = tree_hash(world.root, world.gpt2, tmp_path)
    code, err = run_cli(argv, capsys)
    line = error_line(err)
    assert code == 2, err[-3000:]
    for fragment in expected:
        assert fragment in line, (fragment, line)
    assert tree_hash(world.root, world.gpt2, tmp_path) == before


# ----- a full disk -----------------------------------------------------------------------------------------------


def fill_disk(monkeypatch, exception):
    """Every save_pretrained writes a part of model.safetensors, then fails as a full disk does."""
    from transformers import PreTrainedModel

    def save(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise exception

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-target", "overwrite"])
def test_convert_onto_a_full_disk_keeps_the_previous_export(overwrite, world, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    out = copy(world.dfa, tmp_path / "out") if overwrite else tmp_path / "out"
    before = tree_hash(world.root, tmp_path)
    fill_disk(monkeypatch, SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    code, err = run_cli(["convert", "dfa", "--base", world.gpt2, "--output-dir", out] + ["--overwrite"] * overwrite,
                        capsys)
    line = error_line(err)
    assert code == 2 and "No space left on device" in line and str(out) in line
    assert ("the previous" in line and "is unchanged" in line) if overwrite else "nothing was written" in line
    assert tree_hash(world.root, tmp_path) == before
    monkeypatch.undo()
    if overwrite:  # and it still loads
        assert main(["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0


def test_export_model_on_a_full_disk_raises_and_keeps_the_old_folder(world, tmp_path, monkeypatch):
    from graftlm.export import ExportError, export_model
    from graftlm.inference import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(world.dfa)
    folder = copy(world.dfa, tmp_path / "export")
    before = tree_hash(tmp_path)
    fill_disk(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors"))
    with pytest.raises(ExportError, match=r"No space left on device.*the previous .* is unchanged"):
        export_model(model, folder, tokenizers={"": tokenizer}, overwrite=True)
    assert tree_hash(tmp_path) == before


def subprocess_env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", **extra)


def test_a_real_write_failure_leaves_the_previous_export(world, tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: files may not grow past 1 MiB), with no monkeypatching."""
    import resource

    out = copy(world.dfa, tmp_path / "out")
    before = tree_hash(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "graftlm.cli", "convert", "dfa", "--base", str(world.gpt2), "--output-dir", str(out),
         "--overwrite"], capture_output=True, text=True, timeout=300, env=subprocess_env(),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)))
    line = error_line(result.stderr)
    assert result.returncode == 2 and "File too large" in line and "is unchanged" in line
    assert tree_hash(tmp_path) == before


# ----- SIGKILL, then rerun or resume ------------------------------------------------------------------------------

# Prepended to the command a child process runs: `kill_at` names the moment it kills itself with SIGKILL.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[1] == "weights":  # half of model.safetensors is on disk
        from transformers import PreTrainedModel
        save = PreTrainedModel.save_pretrained
        def save_pretrained(self, folder, **kwargs):
            save(self, folder, **kwargs)
            weights = Path(folder) / "model.safetensors"
            os.truncate(weights, weights.stat().st_size // 2)
            die()
        PreTrainedModel.save_pretrained = save_pretrained
    elif sys.argv[1] == "rename":  # every file is written, the folder is not in place yet
        import graftlm.export
        graftlm.export._replace_dir = lambda *args: die()
    elif sys.argv[1] == "checkpoint":  # the second epoch's optimizer state is half written
        import torch
        save = torch.save
        def killing_save(obj, path, *args, **kwargs):
            save(obj, path, *args, **kwargs)
            if "checkpoint-epoch-2" in str(path) and str(path).endswith("optimizer.pt"):
                os.truncate(path, Path(path).stat().st_size // 2)
                die()
        torch.save = killing_save
    from graftlm.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def run_killed(kill_at, argv, cwd):
    result = subprocess.run([sys.executable, "-c", KILLER, kill_at, *map(str, argv)], capture_output=True, text=True,
                            timeout=300, env=subprocess_env(), cwd=cwd)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]  # it died where it was told to


def loads(folder):
    from graftlm.inference import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(folder)
    return model(**tokenizer("Hello", return_tensors="pt")).logits.isfinite().all().item()


@pytest.mark.parametrize("kill_at", ["weights", "rename"])
def test_sigkill_during_convert_keeps_the_previous_export_and_a_rerun_succeeds(kill_at, world, tmp_path, capsys):
    out = copy(world.dfa, tmp_path / "out")
    before = tree_hash(out)
    run_killed(kill_at, ["convert", "bsbr", "--base", world.gpt2, "--output-dir", out, "--overwrite"], tmp_path)
    assert tree_hash(out) == before and loads(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert [p.name.startswith(".out.partial-") for p in leftovers] == [True]  # hidden, beside the target
    if kill_at == "weights":  # a half-written folder does not load as a model
        with pytest.raises(ValueError, match="model.safetensors is damaged"):
            loads(leftovers[0])
    assert main(["convert", "bsbr", "--base", str(world.gpt2), "--output-dir", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2_bsbr" and loads(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the rerun removed the killed run's staging folder


def test_sigkill_during_a_training_checkpoint_then_resume(world, tmp_path, capsys):
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "out"
    argv = ["train", "scaffold", world.scaffold, "--data", world.pairs, "--output-dir", out, "--epochs", "2",
            *ONE_STEP_EPOCHS, "--checkpoint-dir", checkpoints]
    run_killed("checkpoint", argv, tmp_path)
    assert not out.exists()
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["checkpoint-epoch-1"]
    assert main([str(a) for a in argv] + ["--resume-from-checkpoint", "latest"]) == 0
    state = json.loads((checkpoints / "checkpoint-epoch-2" / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-epoch-1", "checkpoint-epoch-2"]
    assert loads(out)


@pytest.fixture(scope="module")
def two_checkpoints(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scaffold_run")
    assert main(["train", "scaffold", str(world.scaffold), "--data", str(world.pairs), "--output-dir",
                 str(folder / "out"), "--epochs", "2", *ONE_STEP_EPOCHS,
                 "--checkpoint-dir", str(folder / "checkpoints")]) == 0
    return folder / "checkpoints"


@pytest.mark.parametrize("damage", ["trainable.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_from_a_damaged_checkpoint_names_it_and_offers_the_previous(damage, world, two_checkpoints, tmp_path,
                                                                           capsys):
    checkpoints = copy(two_checkpoints, tmp_path / "checkpoints")
    truncate(checkpoints / "checkpoint-epoch-2" / damage)
    before = tree_hash(world.root, tmp_path)
    code, err = run_cli(["train", "scaffold", world.scaffold, "--data", world.pairs, "--output-dir", tmp_path / "out",
                         "--epochs", "3", "--samples-per-epoch", "0", "--checkpoint-dir", checkpoints,
                         "--resume-from-checkpoint", "latest"], capsys)
    line = error_line(err)
    assert code == 2
    assert f"checkpoint {checkpoints / 'checkpoint-epoch-2'} is damaged" in line
    assert f"--resume-from-checkpoint {checkpoints / 'checkpoint-epoch-1'}" in line
    assert tree_hash(world.root, tmp_path) == before


# ----- the Python API raises what the CLI reports ----------------------------------------------------------------


def test_api_conversion_refuses_non_finite_weights(world, tmp_path):
    from graftlm.conversion.common import ConversionError
    from graftlm.conversion.dfa import convert_gpt2_to_dfa

    with pytest.raises(ConversionError, match="NaN or infinite weights in transformer.h.1.mlp.c_fc.weight"):
        convert_gpt2_to_dfa(poisoned_gpt2(world, tmp_path, float("nan")))


def test_api_load_tokenizer_refuses_a_folder_without_one(world, tmp_path):
    from graftlm.conversion.common import ConversionError, load_tokenizer

    no_tokenizer(world, tmp_path)
    with pytest.raises(ConversionError, match="no vocabulary"):
        load_tokenizer(tmp_path / "base")
    assert load_tokenizer(tmp_path / "base", required=False) is None


def test_api_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path):
    from graftlm.conversion.dfa import convert_gpt2_to_dfa
    from graftlm.export import export_model

    model, _ = convert_gpt2_to_dfa(save_tiny_gpt2(tmp_path / "base", vocab_size=1000))
    with pytest.raises(ValueError, match="50257 tokens but the model's vocabulary has 1000"):
        export_model(model, tmp_path / "out", tokenizers={"": gpt2_tokenizer()})
    assert not (tmp_path / "out").exists()


def test_api_perplexity_takes_zero_as_zero_not_as_the_default(world):
    from graftlm.evaluation import causal_perplexity

    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        causal_perplexity(world.dfa, ["Hello world, again and again."], max_length=0)
    with pytest.raises(ValueError, match=r"stride must be in \[1, max_length=16\], got 0"):
        causal_perplexity(world.dfa, ["Hello world, again and again."], max_length=16, stride=0)
    with pytest.raises(ValueError, match="no texts"):
        causal_perplexity(world.dfa, [])


def test_api_masked_lm_is_not_a_causal_lm(world):
    from graftlm.inference import load_model_and_tokenizer

    with pytest.raises(ValueError, match="masked language model"):
        load_model_and_tokenizer(world.bert)


def test_api_output_folder_may_not_hold_an_input(tmp_path):
    from graftlm.export import ExportError, check_output_dir

    (tmp_path / "data").mkdir()
    with pytest.raises(ExportError, match="holds the input text"):
        check_output_dir(tmp_path, overwrite=True, inputs={"text": tmp_path / "data" / "a.txt"})
    check_output_dir(tmp_path / "elsewhere", overwrite=True, inputs={"text": tmp_path / "data" / "a.txt"})


def test_api_checkpoint_loader_names_the_damaged_checkpoint(two_checkpoints, tmp_path):
    from graftlm.training.scaffold import load_checkpoint

    checkpoints = copy(two_checkpoints, tmp_path / "checkpoints")
    assert load_checkpoint(checkpoints / "checkpoint-epoch-2")["state"]["epoch"] == 2
    (checkpoints / "checkpoint-epoch-1" / "rng.pt").unlink()
    with pytest.raises(ValueError, match="checkpoint-epoch-1 is damaged.*no earlier checkpoint"):
        load_checkpoint(checkpoints / "checkpoint-epoch-1")


def test_api_read_pairs_names_the_empty_record(tmp_path):
    from graftlm.evaluation import read_pairs

    sources, targets = written("s.txt", "a cat\n\n")(tmp_path), written("t.txt", "le chat\nun chien\n")(tmp_path)
    with pytest.raises(ValueError, match=r"line 2 of .*s.txt / .*t.txt: the source is missing, empty"):
        read_pairs(sources_file=sources, targets_file=targets)


# ----- the traceback: only on request ----------------------------------------------------------------------------


def test_unexpected_errors_are_one_line_too(monkeypatch, world, capsys):
    import graftlm.inference

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(graftlm.inference, "generate_text", broken)
    code, err = run_cli(["generate", world.dfa, "--prompt", "Hi"], capsys)
    line = error_line(err)
    assert code == 1 and "internal error" in line and "KeyError" in line and "--debug" in line


def test_debug_shows_the_traceback(world, tmp_path, monkeypatch):
    folder = copy(world.dfa, tmp_path / "dfa")
    truncate(folder / "model.safetensors")
    argv = ["generate", str(folder), "--prompt", "Hi"]
    result = subprocess.run([sys.executable, "-m", "graftlm.cli", "--debug", *argv], capture_output=True, text=True,
                            timeout=300, env=subprocess_env())
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "ValueError" in result.stderr and "model.safetensors is damaged" in result.stderr
    monkeypatch.setenv("GRAFTLM_DEBUG", "1")  # the variable does the same (in this process: the exception escapes)
    with pytest.raises(ValueError, match="model.safetensors is damaged"):
        main(argv)
    monkeypatch.setenv("GRAFTLM_DEBUG", "0")
    assert main(argv) == 2
