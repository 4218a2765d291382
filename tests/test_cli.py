"""The `graftlm` command line, driven as a user would (in-process through main(), and once as a real process)."""

import json
import subprocess
import sys

import pytest

from graftlm import registry
from graftlm.cli import build_parser, main


def subcommands():
    commands = [["convert", name] for name in registry.names()] + [["generate"], ["eval"], ["analyze"], ["demo"]]
    commands += [["train", arch.name] for arch in registry.all_architectures() if arch.trainer]
    return commands + [["chat"], ["bench"]]


@pytest.mark.parametrize("command", subcommands(), ids=" ".join)
def test_every_subcommand_documents_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: graftlm" in out and "--" in out


def required_arguments(command):
    """Placeholder values for every required argument of a subcommand, so that only the unknown flag is wrong."""
    import argparse

    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    args = []
    for action in parser._actions:
        value = str(action.choices[0]) if action.choices else "x"
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            args.append(value)
        elif action.required:
            args += [action.option_strings[0], value]
    return args


@pytest.mark.parametrize("command", subcommands(), ids=" ".join)
def test_every_subcommand_rejects_unknown_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *required_arguments(command), "--no-such-flag", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_shortened_flags_are_not_guessed(tiny_gpt2_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "dfa", "--base", str(tiny_gpt2_dir), "--output-dir", str(tmp_path / "o"), "--gate-mod", "token"])
    assert "--gate-mod" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_export(tiny_gpt2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "dfa"
    assert main(["convert", "dfa", "--base", str(tiny_gpt2_dir), "--output-dir", str(folder), "--gate-mode", "token"]) == 0
    return folder


def test_license_option_sets_the_card_licence(tiny_gpt2_dir, tmp_path):
    folder = tmp_path / "dfa"
    assert main(["convert", "dfa", "--base", str(tiny_gpt2_dir), "--output-dir", str(folder),
                 "--license", "apache-2.0"]) == 0
    header = (folder / "README.md").read_text().split("---")[1]
    assert "license: apache-2.0" in header and "license: mit" not in header


def test_convert_refuses_an_existing_output_folder_and_leaves_it_untouched(cli_export, tiny_gpt2_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in cli_export.iterdir()}
    assert main(["convert", "dfa", "--base", str(tiny_gpt2_dir), "--output-dir", str(cli_export)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in cli_export.iterdir()} == before


def test_convert_refuses_a_bert_checkpoint_and_writes_nothing(tmp_path, capsys):
    from testing_utils import minilm_dir

    assert main(["convert", "dfa", "--base", str(minilm_dir()), "--output-dir", str(tmp_path / "out")]) == 2
    assert "'bert' checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_seed_makes_the_drawn_weights_reproducible(tiny_gpt2_dir, tmp_path):
    """Scaffolded's fusers are drawn at conversion: the same --seed writes the same weights whatever torch's generator
    held before (torch seeds every new process differently), another seed writes other fusers and nothing else, and
    the caller's generator is left as it was."""
    import torch
    from safetensors.torch import load_file

    def export(seed, name):
        torch.seed()  # a generator state of its own, as a new process would have
        before = torch.get_rng_state()
        folder = tmp_path / name
        assert main(["convert", "scaffold", "--base", str(tiny_gpt2_dir), "--scaffold", str(tiny_gpt2_dir),
                     "--cross-attn-layers", "0,1", "--output-dir", str(folder), "--seed", str(seed)]) == 0
        assert torch.equal(torch.get_rng_state(), before)
        return load_file(folder / "model.safetensors")

    first, again, other = export(0, "a"), export(0, "b"), export(1, "c")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    drawn = {k for k in first if not torch.equal(first[k], other[k])}
    assert drawn and all(k.startswith("fusers.") for k in drawn), sorted(drawn)


def test_push_to_hub_failure_is_reported_and_the_export_is_complete(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    class OfflineApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    folder = tmp_path / "out"
    code = main(["convert", "dfa", "--base", str(tiny_gpt2_dir), "--output-dir", str(folder), "--push-to-hub", "me/x"])
    assert code == 2
    assert "the local export at" in capsys.readouterr().err
    assert (folder / "model.safetensors").is_file()


def test_generate_prints_a_continuation(cli_export, tiny_gpt2_dir, capsys):
    """The printed text is the prompt and the model's greedy continuation (a converted DFA computes what its stock
    GPT-2 computes, so stock GPT-2 gives the expected tokens)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    assert main(["generate", str(cli_export), "--prompt", "Hello world", "--max-new-tokens", "5"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    ids = tokenizer("Hello world", return_tensors="pt").input_ids
    stock = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    new = stock.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    assert len(new) == 5
    assert capsys.readouterr().out == "Hello world" + tokenizer.decode(new, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0.7"], "--temperature only apply to sampling"),
    (["--scaffold-weight", "0.5"], "scaffold_weight"),  # a DFA export: transformers names the unused option
])
def test_generate_refuses_options_that_would_be_ignored(cli_export, capsys, flags, message):
    assert main(["generate", str(cli_export), "--prompt", "Hi", "--max-new-tokens", "2", *flags]) == 2
    assert message in capsys.readouterr().err


def test_eval_gives_the_stock_perplexity_for_a_converted_model(cli_export, tiny_gpt2_dir, tmp_path, capsys):
    from graftlm.offline import offline_text

    text = tmp_path / "text.txt"
    text.write_text(offline_text()[:3000])
    results = []
    for model in (tiny_gpt2_dir, cli_export):
        assert main(["eval", str(model), "--text", str(text), "--max-length", "64", "--stride", "32"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    stock, ours = results
    assert stock["tokens_scored"] == ours["tokens_scored"] > 500
    assert ours["perplexity"] == pytest.approx(stock["perplexity"], rel=1e-4)


def test_analyze_writes_json_and_plots(cli_export, tmp_path, capsys):
    from graftlm.offline import offline_text

    text = tmp_path / "text.txt"
    text.write_text(offline_text()[:2000])
    assert main(["analyze", str(cli_export), "--text", str(text), "--output-dir", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert report["gate_entropy_per_layer_normalised"] == pytest.approx([1.0, 1.0], abs=1e-5)  # uniform at conversion
    assert report["active_v_dims_per_head"] == [[8, 8, 8, 8]] * 2
    flops = report["attention_flops_per_token"]["1024"]
    assert flops["dfa_current_shapes"] > flops["stock_gpt2"]  # the gate projection adds a little
    for name in ("head_usage.png", "active_dims.png", "token_heads.png", "attention_flops.png"):
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_refuses_a_non_dfa_model(tiny_gpt2_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["analyze", str(tiny_gpt2_dir), "--text", str(text), "--output-dir", str(tmp_path / "a")]) == 2
    assert "needs GPT2-DFA" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "graftlm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout
