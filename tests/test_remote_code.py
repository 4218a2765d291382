"""Exported folders on the transformers a user has: each architecture's export loads through its own remote code in a
process where graftlm cannot be imported, computes what graftlm computes and what the stock model computes, decodes
the same with and without its cache, and warns of nothing of our making; the supported range is one fact, recorded
in every export and checked when the code is loaded.

CI runs this module in the README's pinned environment (the floor of the range) and again in one with the newest
releases pip resolves, there with GRAFTLM_OTHER_PYTHON set to the pinned environment's python: an export made on
one end of the range then loads and generates identically on the other, both ways.
"""

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from testing_utils import MATRIX_ARCHS, build_matrix_export, run_without_graftlm

from graftlm.conversion.common import probe_batch
from graftlm.modeling.hf_compat import (
    CACHE_NAME,
    SUPPORTED_TRANSFORMERS,
    TRANSFORMERS_BELOW,
    TRANSFORMERS_FLOOR,
    cache_of,
)

ROOT = Path(__file__).resolve().parent.parent
OTHER_PYTHON = os.environ.get("GRAFTLM_OTHER_PYTHON")
needs_other_release = pytest.mark.skipif(
    not OTHER_PYTHON, reason="GRAFTLM_OTHER_PYTHON (a python with another transformers release) is not set; CI sets it"
)
AUTO_CLASS = {"dfa": "AutoModelForCausalLM", "bsbr": "AutoModelForCausalLM", "scaffold": "AutoModelForCausalLM",
              "bridge": "AutoModelForSeq2SeqLM"}
BERT_VOCAB = 30522  # the packaged MiniLM's


def probe_inputs(arch):
    """{"forward", "stock", "generate": kwargs; "real": bool mask of the stock logits' real positions}.
    Causal inputs are 6 tokens, left-padded, shorter than BSBR's chunk of 8, so the converted models equal stock."""
    ids, mask = probe_batch(50257, seq_len=6, batch_size=2, seed=3)
    if arch != "bridge":
        causal = dict(input_ids=ids, attention_mask=mask)
        return dict(forward=causal, stock=causal, generate=dict(causal, pad_token_id=0), real=mask.bool())
    source, source_mask = probe_batch(BERT_VOCAB, seq_len=6, batch_size=2, seed=3)
    encoder = dict(input_ids=source, attention_mask=source_mask)
    return dict(forward=dict(encoder, decoder_input_ids=ids), stock=dict(input_ids=ids), generate=encoder,
                real=torch.ones_like(ids, dtype=torch.bool))


@torch.no_grad()
def make_exports(arch, root):
    """root/identity/export (as converted: computes what root/identity/base computes), root/opened/export (new
    modules opened), root/probe.pt, and root/reference.pt: what graftlm's own classes compute on the opened export
    under this transformers. Runs in the test process, or in GRAFTLM_OTHER_PYTHON's."""
    import graftlm  # noqa: F401  (registers the classes, so the Auto classes load graftlm's own code)

    root = Path(root)
    build_matrix_export(arch, root / "identity", open_modules=False)
    folder = build_matrix_export(arch, root / "opened")
    probe = probe_inputs(arch)
    torch.save(probe, root / "probe.pt")
    model = getattr(transformers, AUTO_CLASS[arch]).from_pretrained(folder).eval()
    assert not type(model).__module__.startswith("transformers_modules."), "the reference must be graftlm's code"
    reference = dict(tokens=model.generate(**probe["generate"], max_new_tokens=6, do_sample=False),
                     logits=model(**probe["forward"]).logits, version=transformers.__version__)
    torch.save(reference, root / "reference.pt")
    return root


def load_in_fresh_process(arch, root, python=None):
    """Load root's exports through trust_remote_code where graftlm cannot be imported; generate with and without the
    cache, compare the identity export with the stock base, save the opened export's logits; collect every warning
    and log line that names a cache argument or our range."""
    return run_without_graftlm(
        f"""
        import io, json, logging, warnings
        from pathlib import Path
        import torch, transformers
        from transformers import GPT2LMHeadModel
        root = Path({str(root)!r})
        log = io.StringIO()
        logging.getLogger().addHandler(logging.StreamHandler(log))
        logging.getLogger("transformers").addHandler(logging.StreamHandler(log))
        auto = getattr(transformers, {AUTO_CLASS[arch]!r})
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            probe = torch.load(root / "probe.pt")
            model = auto.from_pretrained(root / "opened" / "export", trust_remote_code=True).eval()
            identity = auto.from_pretrained(root / "identity" / "export", trust_remote_code=True).eval()
            stock = GPT2LMHeadModel.from_pretrained(root / "identity" / "base").eval()
            cached = model.generate(**probe["generate"], max_new_tokens=6, do_sample=False)
            uncached = model.generate(**probe["generate"], max_new_tokens=6, do_sample=False, use_cache=False)
            step = model(**probe["forward"], use_cache=True)
            torch.save(step.logits, root / "logits-loaded.pt")
            delta = identity(**probe["forward"]).logits - stock(**probe["stock"]).logits
        lines = [str(w.message) for w in caught] + log.getvalue().splitlines()
        print(json.dumps({{
            "module": type(model).__module__, "version": transformers.__version__,
            "cached": cached.tolist(), "uncached": uncached.tolist(),
            "returned_cache": type(step.cache if "cache" in step else step.past_key_values).__name__,
            "stock_delta": delta[probe["real"]].abs().max().item(),
            "cache_warnings": [m for m in lines if "past_key_values" in m or "`cache`" in m],
            "range_warnings": [m for m in lines if "GraftLM model's code supports" in m],
        }}))
        """,
        root,
        python=python,
    )


def check_loaded(result, root):
    reference = torch.load(Path(root) / "reference.pt")
    assert result["module"].startswith("transformers_modules."), result["module"]
    assert result["cached"] == result["uncached"] == reference["tokens"].tolist()
    assert result["stock_delta"] <= 1e-5  # the converted model computes what stock GPT-2 computes
    assert result["returned_cache"] not in ("NoneType", "tuple")
    assert result["cache_warnings"] == [] and result["range_warnings"] == []
    torch.testing.assert_close(torch.load(Path(root) / "logits-loaded.pt"), reference["logits"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return {arch: make_exports(arch, tmp_path_factory.mktemp(f"remote_{arch}")) for arch in MATRIX_ARCHS}


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_export_runs_without_graftlm_as_graftlm_and_stock_do(arch, exports):
    check_loaded(load_in_fresh_process(arch, exports[arch]), exports[arch])


@needs_other_release
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_export_made_here_runs_on_the_other_release(arch, exports):
    result = load_in_fresh_process(arch, exports[arch], python=OTHER_PYTHON)
    assert result["version"] != transformers.__version__, "GRAFTLM_OTHER_PYTHON runs this same release"
    check_loaded(result, exports[arch])


@needs_other_release
@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_export_made_on_the_other_release_runs_here(arch, tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_remote_code as t; " \
           f"t.make_exports({arch!r}, {str(tmp_path)!r})"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    made = subprocess.run([OTHER_PYTHON, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    exported_with = json.loads((tmp_path / "opened" / "export" / "config.json").read_text())["transformers_version"]
    assert exported_with == torch.load(tmp_path / "reference.pt")["version"] != transformers.__version__
    check_loaded(load_in_fresh_process(arch, tmp_path), tmp_path)


def test_the_supported_range_is_declared_once_and_pinned_at_its_floor():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in dependencies
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert Version(pins["transformers"]) == Version(TRANSFORMERS_FLOOR)  # the README's set-up tests the floor


def test_export_records_the_supported_range(exports, tmp_path):
    from graftlm.cli import main

    config = json.loads((exports["dfa"] / "opened" / "export" / "config.json").read_text())
    assert config["graftlm_supported_transformers"] == SUPPORTED_TRANSFORMERS
    main(["convert", "dfa", "--base", str(exports["dfa"] / "identity" / "base"), "--output-dir", str(tmp_path / "x")])
    card = (tmp_path / "x" / "README.md").read_text()
    assert f"supports transformers {SUPPORTED_TRANSFORMERS}" in card and transformers.__version__ in card


def test_loading_under_a_release_outside_the_range_warns_once_naming_both(exports, tmp_path):
    # Mark the running release as outside the range: copies of two exports whose code names a floor above it.
    running = Version(transformers.__version__)
    marked = f">={running.major}.{running.minor + 1},<{TRANSFORMERS_BELOW}"
    for export in ("opened", "identity"):
        shutil.copytree(exports["dfa"] / export / "export", tmp_path / export)
        code = tmp_path / export / "hf_compat.py"
        code.write_text(code.read_text().replace(f'TRANSFORMERS_FLOOR = "{TRANSFORMERS_FLOOR}"',
                                                 f'TRANSFORMERS_FLOOR = "{running.major}.{running.minor + 1}"'))
    result = run_without_graftlm(
        f"""
        import io, json, logging
        from transformers import AutoModelForCausalLM
        log = io.StringIO()
        logging.getLogger().addHandler(logging.StreamHandler(log))  # where the graftlm.* loggers propagate
        for export in ("opened", "identity"):  # two exports, two copies of the code: still one warning
            AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + export, trust_remote_code=True)
        print(json.dumps([line for line in log.getvalue().splitlines() if "GraftLM" in line]))
        """,
        tmp_path,
    )
    assert len(result) == 1, result
    assert marked in result[0] and f"transformers {transformers.__version__} is installed" in result[0]


@pytest.mark.parametrize("arch", MATRIX_ARCHS)
def test_forward_takes_the_cache_under_either_name_and_returns_it_under_the_running_one(arch, exports):
    import graftlm  # noqa: F401

    model = getattr(transformers, AUTO_CLASS[arch]).from_pretrained(exports[arch] / "opened" / "export").eval()
    probe = probe_inputs(arch)
    step = dict(probe["forward"])
    key = "decoder_input_ids" if arch == "bridge" else "input_ids"
    step[key] = torch.tensor([[11], [12]])
    if arch != "bridge":
        step["attention_mask"] = torch.cat([probe["forward"]["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    logits = {}
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            prefill = model(**probe["forward"], use_cache=True)
            assert CACHE_NAME in prefill and cache_of(prefill) is not None
            logits[name] = model(**step, use_cache=True, **{name: cache_of(prefill)}).logits
        torch.testing.assert_close(logits["cache"], logits["past_key_values"], rtol=0, atol=0)
        with pytest.raises(ValueError, match="not both"):
            model(**step, cache=cache_of(prefill), past_key_values=cache_of(prefill))


HEADS = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering")


@pytest.mark.parametrize("arch", ["dfa", "bsbr", "scaffold"])
def test_task_heads_load_without_graftlm_and_compute_what_graftlms_classes_do(arch, exports, tmp_path):
    """The export's auto_map names GPT-2's three task heads (modeling/gpt2_heads.py travels with the code): loaded
    where graftlm cannot be imported they are the export's classes, and with the same head weights they give the
    outputs of graftlm's own classes."""
    import graftlm  # noqa: F401

    folder = exports[arch] / "opened" / "export"
    result = run_without_graftlm(
        f"""
        import json
        import torch, transformers
        probe = torch.load({str(exports[arch] / "probe.pt")!r})["forward"]
        names = {{}}
        for auto in {HEADS!r}:
            model = getattr(transformers, auto).from_pretrained({str(folder)!r}, trust_remote_code=True, num_labels=3,
                                                                pad_token_id=0).eval()
            with torch.no_grad():
                out = model(**probe)
            tensors = [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]  # not the cache
            torch.save({{"state": model.state_dict(), "out": tensors}}, {str(tmp_path)!r} + f"/{{auto}}.pt")
            names[auto] = [type(model).__module__, type(model).__name__]
        print(json.dumps(names))
        """,
        tmp_path,
    )
    for auto in HEADS:
        module, name = result[auto]
        assert module.startswith("transformers_modules.") and name.endswith(auto.removeprefix("AutoModel"))
        saved = torch.load(tmp_path / f"{auto}.pt")
        ours = getattr(transformers, auto).from_pretrained(folder, num_labels=3, pad_token_id=0).eval()
        assert not type(ours).__module__.startswith("transformers_modules.")
        ours.load_state_dict(saved["state"])
        with torch.no_grad():
            expected = [t for t in ours(**probe_inputs(arch)["forward"]).to_tuple() if isinstance(t, torch.Tensor)]
        assert len(expected) == (2 if auto.endswith("QuestionAnswering") else 1)
        for got, want in zip(saved["out"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
