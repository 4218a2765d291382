"""The performance suite (`graftlm bench`) in its --quick mode: the structure and arithmetic of its outputs, and that
its measurements see a model made slower on purpose.

No timing thresholds on real models: on toy shapes the numbers are noise; what must hold is that every architecture
and measurement is there, each ratio is the quotient of the raw figures beside it, and each verdict follows from its
target. The slowed model adds a fixed delay many times a tiny model's forward time, so its ratios are far from 1.
"""

import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from testing_utils import one_torch_thread, tiny_gpt2_config
from transformers import GPT2LMHeadModel

from graftlm.bench.measure import (ARCHS, CONVERSION_TARGET_S, DECODE_TARGETS, PRUNED_DECODE_TARGET, SIZES,
                                   TRAIN_TIME_TARGETS)
from graftlm.bench.suite import bench_decoding, bench_training
from graftlm.cli import main

PROMPTS, BATCHES, NEW_TOKENS = [16, 32], [1, 2], 4  # what --quick sets


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--long-context", "--device", "cpu", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text(encoding="utf-8"))


def close(a, b):
    return a == pytest.approx(b, rel=1e-9)


def test_run_records_the_machine_and_settings(quick_run):
    _, results = quick_run
    machine = results["machine"]
    for key in ("date", "device", "cpu", "torch_threads", "torch", "transformers", "graftlm", "python"):
        assert machine[key] not in (None, ""), key
    assert machine["device"] == "cpu" and machine["gpu"] is None
    assert results["settings"]["shape"] == SIZES["quick"]
    assert results["settings"]["prompts"] == PROMPTS and results["settings"]["new_tokens"] == NEW_TOKENS


def test_decoding_covers_every_architecture_and_point_with_consistent_ratios(quick_run):
    _, results = quick_run
    rows = results["decoding"]
    assert {(r["arch"], r["prompt"], r["batch"]) for r in rows} == {
        (a, p, b) for a in ARCHS for p in PROMPTS for b in BATCHES
    }
    assert len(rows) == len(ARCHS) * len(PROMPTS) * len(BATCHES)
    for r in rows:
        for side in (r["stock"], r["model"]):
            steps = r["batch"] * (NEW_TOKENS - 1)
            assert close(side["tokens_per_s"], steps / side["decode_s"]["best_s"])
            assert side["decode_s"]["best_s"] <= side["decode_s"]["median_s"]
            assert side["prefill_s"]["best_s"] > 0
        assert close(r["ratio"], r["model"]["tokens_per_s"] / r["stock"]["tokens_per_s"])
        assert r["target"] == DECODE_TARGETS[r["arch"]]
        assert r["verdict"] == ("PASS" if r["ratio"] >= r["target"] else "MISS")
    # every architecture is compared with the same stock measurement at a given point
    for p in PROMPTS:
        for b in BATCHES:
            stock = {json.dumps(r["stock"], sort_keys=True) for r in rows if (r["prompt"], r["batch"]) == (p, b)}
            assert len(stock) == 1


def test_training_step_ratios_and_the_dfa_target(quick_run):
    _, results = quick_run
    rows = {r["arch"]: r for r in results["training"]}
    assert set(rows) == set(ARCHS)
    for arch, r in rows.items():
        assert close(r["time_ratio"], r["model"]["best_s"] / r["stock"]["best_s"])
        if r["stock"]["peak_mb"] > 0:
            assert close(r["memory_ratio"], r["model"]["peak_mb"] / r["stock"]["peak_mb"])
        else:
            assert r["memory_ratio"] is None
        assert r["target"] == TRAIN_TIME_TARGETS.get(arch)
        expected = "report" if r["target"] is None else ("PASS" if r["time_ratio"] <= r["target"] else "MISS")
        assert r["verdict"] == expected
        assert r["model"]["trainable_parameters"] > 0
    # the scaffold trains LoRA and fusers only; the stock model trains everything
    assert rows["scaffold"]["model"]["trainable_parameters"] < rows["scaffold"]["stock"]["trainable_parameters"]


def test_pruning_halves_the_head_dimensions_and_reports_speedups(quick_run):
    _, results = quick_run
    pruning = results["pruning"]
    attention = pruning["attention"]
    half = SIZES["quick"]["n_embd"] // SIZES["quick"]["n_head"] // 2
    assert attention["qk_dims"] == [half] * SIZES["quick"]["n_layer"]
    assert attention["v_dims"] == [half] * SIZES["quick"]["n_layer"]
    assert close(attention["speedup"], attention["unpruned"]["best_s"] / attention["pruned"]["best_s"])
    assert {(r["prompt"], r["batch"]) for r in pruning["decoding"]} == {(p, b) for p in PROMPTS for b in BATCHES}
    for r in pruning["decoding"]:
        assert close(r["ratio"], r["model"]["tokens_per_s"] / r["stock"]["tokens_per_s"])
        assert r["verdict"] == ("PASS" if r["ratio"] >= PRUNED_DECODE_TARGET else "MISS")
    # the unpruned reference is the same DFA measurement the decoding table compares with stock GPT-2
    dfa = {(r["prompt"], r["batch"]): r["model"] for r in results["decoding"] if r["arch"] == "dfa"}
    assert all(r["stock"] == dfa[(r["prompt"], r["batch"])] for r in pruning["decoding"])


def test_conversion_scaling_and_long_context_sections(quick_run):
    _, results = quick_run
    conversion = {r["arch"]: r for r in results["conversion"]}
    assert set(conversion) == set(ARCHS)
    for r in conversion.values():
        assert r["seconds"] > 0 and r["weights_mb"] > 0 and r["target_s"] == CONVERSION_TARGET_S
        assert r["verdict"] == ("PASS" if r["seconds"] <= CONVERSION_TARGET_S else "MISS")
    scaling = results["scaling"]
    for sweep in ("seq", "batch"):
        assert set(scaling[sweep]["seconds"]) == {"gpt2", *ARCHS}
        assert all(len(s) == len(scaling[sweep]["x"]) and min(s) > 0 for s in scaling[sweep]["seconds"].values())
    long_context = results["long_context"]
    assert [r["n"] for r in long_context["runs"]] == [256, 512]
    assert set(long_context["targets"]) == {"forward_time", "peak_memory", "cache_size", "decode_flatness"}


def test_markdown_table_and_plots_are_written(quick_run):
    out, results = quick_run
    table = (out / "bench.md").read_text(encoding="utf-8")
    for label in ("GPT2-DFA", "GPT2-BSBR", "Bridged", "Scaffolded"):
        assert table.count(f"| {label} |") >= 4  # decoding rows, training, conversion, scaling
    for r in results["decoding"]:
        assert f"| {r['ratio']:.2f}x | >= {r['target']}x | {r['verdict']} |" in table
    assert results["machine"]["date"] in table and results["machine"]["cpu"] in table
    for name in ("decoding.png", "training.png", "dfa_pruning.png", "scaling.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_bench_rejects_bad_options_with_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--quick", "--new-tokens", "1", "--output-dir", str(tmp_path)]) == 2
    assert "--new-tokens must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sizes", "small"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "bench.json").exists()


class SlowedGPT2(GPT2LMHeadModel):
    """Stock GPT-2 that sleeps before every forward pass."""

    delay_s = 0.2

    def forward(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().forward(*args, **kwargs)


def test_a_slowed_model_measures_as_slower():
    """The same weights, one copy sleeping 200 ms per forward pass (a tiny model's takes a few ms, tens on a busy
    machine): the decoding ratio (tokens/s, model / stock) must fall below 1/1.5 and the training-step ratio (time)
    rise above 1.5, which holds while the stock step takes under 400 ms. Swapped or shared measurements give >= 1 or
    about 1 and fail."""
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=512, bos_token_id=511, eos_token_id=511)).eval()
    slowed = SlowedGPT2(stock.config).eval()
    slowed.load_state_dict(stock.state_dict())
    models = {"gpt2": stock, "dfa": slowed}  # the bench's labels: "dfa" is the model compared with stock GPT-2
    args = Namespace(prompts=[8], batches=[1], new_tokens=4, repeats=2, train_batch=1, train_seq=8,
                     shape={"vocab_size": 512})
    device = torch.device("cpu")
    with one_torch_thread():
        (decoding,) = bench_decoding(models, args, device, torch.Generator().manual_seed(0))
        (training,) = bench_training(models, args, device, torch.Generator().manual_seed(0))
    assert decoding["ratio"] < 1 / 1.5 and decoding["verdict"] == "MISS", decoding
    assert training["time_ratio"] > 1.5, training


def test_bsbr_decode_only_run_measures_decoding_and_profiles_it(tmp_path):
    """bench/bench_bsbr.py --decode-only (what experiments/on_gpu.sh runs on a GPU): decoding figures only, the
    cache's growth between the two lengths smaller for BSBR than for GPT-2, and a profile table per model."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_bsbr.py"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # what the script would re-execute itself with
    subprocess.run([sys.executable, str(script), "--quick", "--chunk-size", "64", "--device", "cpu", "--threads", "1",
                    "--decode-only", "--profile", "--output-dir", str(tmp_path)], check=True, env=env)
    results = json.loads((tmp_path / "bsbr_bench.json").read_text(encoding="utf-8"))
    short, long = results["runs"]
    for row in (short, long):
        assert not any("forward" in key or "peak" in key for key in row)
        assert row["bsbr_decode_ms"] > 0 and row["gpt2_sdpa_decode_ms"] > 0
        assert "bsbr_decode_syncs_per_token" not in row  # counted on CUDA only
    assert long["bsbr_cache_mb"] - short["bsbr_cache_mb"] < long["gpt2_sdpa_cache_mb"] - short["gpt2_sdpa_cache_mb"]
    assert set(results["targets"]) == {"cache_size", "decode_flatness"}
    for name in ("gpt2_sdpa", "bsbr"):
        assert "aten::" in (tmp_path / f"decode_profile_{name}.txt").read_text(encoding="utf-8")
