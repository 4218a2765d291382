"""Issue 14, scale-out: learned scalars are (1,) parameters and checkpoints that stored them 0-D still load; FSDP1,
FSDP2 (and DeepSpeed ZeRO-2 when installed) train every architecture's export, loaded through its own code in
processes where graftlm cannot be imported, to the unsharded per-step losses on 2 CPU processes over gloo
(bench/scale_out.py, a few steps here; the whole matrix is the script's); the train commands
refuse an `accelerate launch --use_fsdp / --use_deepspeed` that accelerate does not run (CPU)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testing_utils import load_remote

from graftlm import cli

SCALARS = {"dfa": ["transformer.entropy_balance.log_weight"], "bridge": ["bridge.alpha_logit", "bridge.sigma_raw"]}
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "scale_out.py"


def logits_of(model, arch):
    ids = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids[:, :6]} if arch == "bridge" else {}
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits


def with_scalars_reshaped(folder, dest, arch, shape):
    """A copy of an export whose learned scalars are stored with `shape` (() as before they were (1,))."""
    shutil.copytree(folder, dest)
    weights = load_file(dest / "model.safetensors")
    for key in SCALARS[arch]:
        assert weights[key].shape == (1,), (key, weights[key].shape)
        weights[key] = weights[key].reshape(()) if shape == () else weights[key].expand(shape).clone()
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("arch", sorted(SCALARS))
def test_checkpoints_with_0d_scalars_load_to_the_same_logits(matrix_exports, arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if arch == "bridge" else AutoModelForCausalLM
    current = auto.from_pretrained(matrix_exports[arch], dtype=torch.float32)
    expected = logits_of(current, arch)
    old = with_scalars_reshaped(matrix_exports[arch], tmp_path / "old", arch, ())
    for model in (auto.from_pretrained(old, dtype=torch.float32), load_remote(old, arch)):  # graftlm's, the folder's
        params = dict(model.named_parameters())
        assert all(params[key].shape == (1,) and params[key].requires_grad for key in SCALARS[arch])
        assert torch.equal(logits_of(model, arch), expected)

    # load_state_dict (a Trainer resuming, accelerate) of a state dict with 0-D scalars
    fresh = type(current)(current.config)
    state = {k: v.reshape(()) if k in SCALARS[arch] else v for k, v in current.state_dict().items()}
    fresh.load_state_dict(state)
    assert torch.equal(logits_of(fresh, arch), expected)

    # any other shape is still an error, not a silent re-initialisation
    wrong = with_scalars_reshaped(matrix_exports[arch], tmp_path / "wrong", arch, (2,))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        auto.from_pretrained(wrong, dtype=torch.float32)


def deepspeed_installed():
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory):
    """bench/scale_out.py for 3 steps, all four architectures, FSDP1, FSDP2 and (when installed) ZeRO-2: one pair of
    processes runs them all. -> (report, the script's stdout)."""
    strategies = ["fsdp1", "fsdp2"] + (["zero2"] if deepspeed_installed() else [])
    folder = tmp_path_factory.mktemp("scale_out")
    result = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--strategies", *strategies,
                             "--json", str(folder / "scale_out.json")], capture_output=True, text=True, timeout=600,
                            cwd=folder)
    report = json.loads((folder / "scale_out.json").read_text())
    assert sorted(report["runs"]) == ["bridge", "bsbr", "dfa", "scaffold"]
    return report, result


def assert_equals_unsharded(report, strategy):
    for arch, runs in report["runs"].items():
        unsharded = runs["unsharded_run"]
        assert unsharded["class"].startswith("transformers_modules."), unsharded  # the export's code trained
        assert unsharded["moved"] > 1e-4, unsharded  # the run trained something: equal losses mean something
        run = runs[strategy]
        assert "losses" in run, (arch, strategy, run.get("traceback"))
        assert len(run["losses"]) == len(runs["unsharded"]) == 3
        assert run["max_abs_diff"] <= 1e-4, (arch, strategy, run["losses"], runs["unsharded"])


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fsdp_training_equals_unsharded(scale_out, strategy):
    assert_equals_unsharded(scale_out[0], strategy)


@pytest.mark.skipif(not deepspeed_installed(), reason="DeepSpeed not installed: pip install -e '.[deepspeed]'")
def test_deepspeed_zero2_training_equals_unsharded(scale_out):
    assert_equals_unsharded(scale_out[0], "zero2")
    assert scale_out[1].returncode == 0, scale_out[1].stdout[-2000:]  # every run within --tolerance


def test_train_refuses_fsdp_that_accelerate_drops(matrix_exports, tmp_path, monkeypatch, capsys):
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP, but on CPU accelerate 1.15 then trains unsharded:
    the command stops with one clear error before training and writes nothing."""
    from accelerate.state import AcceleratorState

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 37} is number {i}." for i in range(200)))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        code = cli.main(["train", "dfa", "--model", str(matrix_exports["dfa"]), "--text", str(text), "--seq-len", "16",
                         "--max-steps", "1", "--batch-size", "2", "--output-dir", str(tmp_path / "out")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert code == 2
    error = capsys.readouterr().err
    assert "ACCELERATE_USE_FSDP" in error and "train unsharded" in error, error
    assert not (tmp_path / "out").exists()


def test_check_launch(monkeypatch):
    """What accelerate 1.15 gave on this CPU machine under `accelerate launch --num_processes 2`: with --use_fsdp
    (Trainer, use_cpu) plain data parallel; with --use_deepspeed, DeepSpeed in each process alone."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from graftlm.training.common import check_launch

    def state(kind, processes):
        return SimpleNamespace(distributed_type=kind, num_processes=processes, device=torch.device("cpu"))

    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    check_launch(state(DistributedType.NO, 1))  # nothing asked: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(state(DistributedType.MULTI_CPU, 2))  # --multi_gpu on CPU: data parallel over gloo, as asked
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="asked for FSDP .* accelerate runs MULTI_CPU"):
        check_launch(state(DistributedType.MULTI_CPU, 2))
    check_launch(state(DistributedType.FSDP, 2))  # on GPUs
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="2 processes were launched .* joined 1"):
        check_launch(state(DistributedType.DEEPSPEED, 1))
    check_launch(state(DistributedType.DEEPSPEED, 2))


def test_train_commands_export_the_gathered_model_of_a_sharded_run(matrix_exports):
    """Under FSDP or DeepSpeed the trained module holds one process's shards: the train commands export (and read
    their figures from) the full state that accelerate gathers from every process (whole_model). accelerate gathers
    only on GPUs (see above), so its gather is stood in for here by a recorded full state."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from graftlm.training.common import whole_model

    sharded = AutoModelForCausalLM.from_pretrained(matrix_exports["dfa"], dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(matrix_exports["dfa"], dtype=torch.float32)
    with torch.no_grad():
        for param in full.parameters():
            param.add_(0.01)
    calls = []

    def trainer(kind, main_process, state):
        def get_state_dict(wrapped):
            calls.append(wrapped)
            return state
        accelerator = SimpleNamespace(distributed_type=kind, get_state_dict=get_state_dict)
        return SimpleNamespace(accelerator=accelerator, model_wrapped="wrapped", is_world_process_zero=lambda: main_process)

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        whole = whole_model(trainer(kind, True, full.state_dict()), sharded)
        assert whole is not sharded and torch.equal(logits_of(whole, "dfa"), logits_of(full, "dfa"))
        assert whole.transformer.entropy_balance() == full.transformer.entropy_balance()
        assert whole_model(trainer(kind, False, {}), sharded) is None  # the others join the gather, export nothing
    assert calls == ["wrapped"] * 4
    partial = {k: v for k, v in full.state_dict().items() if "c_gate" not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        whole_model(trainer(DistributedType.FSDP, True, partial), sharded)
    assert whole_model(trainer(DistributedType.MULTI_CPU, True, None), sharded) is sharded  # data parallel: whole
    assert whole_model(trainer(DistributedType.NO, False, None), sharded) is None


def test_train_scaffold_refuses_launches_that_shard_its_parameters():
    """`graftlm train scaffold`'s own loop reads and exports the model's parameters: under FSDP or ZeRO-3 (sharded
    parameters) it stops with an error naming the launch to use; ZeRO-2 and data parallel keep parameters whole."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from graftlm.training.scaffold import check_parameters_whole

    def accelerator(kind, stage=None):
        plugin = SimpleNamespace(zero_stage=stage) if stage else None
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    for refused, name in ((accelerator(DistributedType.FSDP), "FSDP"),
                          (accelerator(DistributedType.DEEPSPEED, 3), "DeepSpeed ZeRO-3")):
        with pytest.raises(RuntimeError, match=f"cannot run under {name}: .* --multi_gpu .* ZeRO-2"):
            check_parameters_whole(refused)
    for allowed in (accelerator(DistributedType.DEEPSPEED, 2), accelerator(DistributedType.MULTI_GPU),
                    accelerator(DistributedType.NO)):
        check_parameters_whole(allowed)
