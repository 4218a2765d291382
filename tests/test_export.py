"""The shared export routine: folder contents, atomicity, refusal of non-empty folders, Hub upload."""

import json
import re
from pathlib import Path

import pytest
import yaml
from testing_utils import gpt2_tokenizer, run_without_graftlm
from transformers.dynamic_module_utils import get_relative_imports

from graftlm.conversion.dfa import convert_gpt2_to_dfa, model_card
from graftlm.export import ExportError, collect_sources, export_model, push_to_hub


@pytest.fixture(scope="module")
def dfa(tiny_gpt2_dir):
    return convert_gpt2_to_dfa(tiny_gpt2_dir)


def export(dfa, folder, **kwargs):
    model, report = dfa
    kwargs.setdefault("tokenizers", {"": gpt2_tokenizer()})
    kwargs.setdefault("card", model_card(report, str(folder)))
    return export_model(model, folder, **kwargs)


def test_export_folder_is_hub_ready(dfa, tmp_path):
    folder = export(dfa, tmp_path / "export")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json",
            "configuration_dfa.py", "modeling_dfa.py"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dfa.DFAConfig",
        "AutoModel": "modeling_dfa.DFAModel",
        "AutoModelForCausalLM": "modeling_dfa.DFAForCausalLM",
        "AutoModelForSequenceClassification": "modeling_dfa.DFAForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_dfa.DFAForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_dfa.DFAForQuestionAnswering",
    }
    for source in folder.glob("*.py"):
        text = source.read_text()
        assert not re.search(r"^\s*from\s+\.\.", text, re.MULTILINE), f"{source.name} keeps a two-level import"
        assert "graftlm" not in re.findall(r"^\s*(?:from|import)\s+(\w+)", text, re.MULTILINE)
        for module in get_relative_imports(source):
            assert (folder / f"{module}.py").is_file(), f"{source.name} imports .{module}, which is not exported"
    # The exported model's own config object is left as it was.
    assert getattr(dfa[0].config, "auto_map", None) is None


def test_model_card_has_metadata_fidelity_and_a_snippet_that_runs(dfa, tmp_path):
    folder = export(dfa, tmp_path / "export")
    card = (folder / "README.md").read_text()
    header, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    metadata = yaml.safe_load(header)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert "base_model" not in metadata  # converted from a local folder: named in the body by its name alone
    assert f"Converted from: `{Path(dfa[1].base).name}`" in body and str(dfa[1].base) not in card
    assert "custom_code" in metadata["tags"] and metadata["license"]
    assert f"**{dfa[1].max_abs_logit_delta:.3g}**" in body
    assert "transformer.h.*.attn.c_gate" in body
    snippet = re.search(r"```python\n(.*?)```", body, re.DOTALL).group(1)
    assert "trust_remote_code=True" in snippet
    result = run_without_graftlm(
        snippet.replace("print(tokenizer.decode(output[0]))", "")
        + "\nimport json\nprint(json.dumps({'length': output.shape[1] - inputs['input_ids'].shape[1]}))",
        tmp_path,
    )
    assert result["length"] == 20


def test_non_empty_output_folder_is_refused_and_left_untouched(dfa, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        export(dfa, folder)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_the_folder(dfa, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "stale.bin").write_text("old")
    export(dfa, folder, overwrite=True)
    assert not (folder / "stale.bin").exists()
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]  # no staging or backup folder left beside it


def test_interrupted_export_leaves_nothing_behind(dfa, tmp_path, monkeypatch):
    tokenizer = gpt2_tokenizer()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(dfa, tmp_path / "export", tokenizers={"": tokenizer})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_previous_export(dfa, tmp_path, monkeypatch):
    folder = export(dfa, tmp_path / "export")
    before = sorted(p.name for p in folder.iterdir())
    tokenizer = gpt2_tokenizer()
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(ExportError, match="disk full.*the previous .* is unchanged"):
        export(dfa, folder, tokenizers={"": tokenizer}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_sources_importing_graftlm_absolutely_are_refused(tmp_path):
    import importlib.util

    bad = tmp_path / "modeling_bad.py"
    bad.write_text("from graftlm.modeling.modeling_dfa import DFAModel\n")
    spec = importlib.util.spec_from_file_location("modeling_bad", bad)
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ExportError, match="imports graftlm absolutely"):
        collect_sources(module)


class FakeHfApi:
    calls = []
    fail_with = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if self.fail_with:
            raise self.fail_with
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs, self.token))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        return "commit-info"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_creates_the_repo_and_uploads_in_one_commit(dfa, tmp_path, fake_hub):
    folder = export(dfa, tmp_path / "export")
    assert push_to_hub(folder, "user/tiny-dfa", private=True, token="hf_x", commit_message="first") == "commit-info"
    create, upload = fake_hub.calls
    assert create == ("create_repo", "user/tiny-dfa", {"private": True, "exist_ok": True, "repo_type": "model"}, "hf_x")
    assert upload[1]["folder_path"] == str(folder) and upload[1]["repo_id"] == "user/tiny-dfa"
    assert upload[1]["commit_message"] == "first"


def test_push_to_hub_without_network_fails_clearly_and_keeps_the_export(dfa, tmp_path, fake_hub):
    folder = export(dfa, tmp_path / "export")
    fake_hub.fail_with = ConnectionError("Failed to resolve 'huggingface.co'")
    with pytest.raises(ExportError, match=r"upload of .* to the Hub repo 'user/tiny-dfa' failed .*ConnectionError"):
        push_to_hub(folder, "user/tiny-dfa")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
