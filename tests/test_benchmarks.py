"""Benchmark helpers and the figures a benchmark must reach on CPU (memory only: timings are never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_labelled_logits
from benchmarks.common import PeakTensorMemory


@pytest.fixture(autouse=True)
def _restore_threads():
    """Benchmarks set torch's thread count: give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_peak_tensor_memory_counts_new_tensors_not_views_or_older_ones():
    weight = torch.randn(1000, 1000, requires_grad=True)  # 4 MB made before: not counted
    with PeakTensorMemory() as memory:
        kept = torch.empty(250_000)  # 1 MB
        kept.view(500, 500).add_(1)  # a view and an in-place result: nothing new
        freed = torch.zeros(500_000)  # 2 MB, freed at once
        del freed
        (weight * 2).sum().backward()  # a 4 MB product freed after the forward, then the 4 MB gradient
    assert memory.current == 5_000_000  # kept + weight.grad
    assert memory.peak == 5_000_000 + 8  # the same while the scalar loss and its gradient lived


def test_labelled_logits_memory_bar_in_the_stage_scripts_setting(capsys):
    with torch.random.fork_rng():
        assert bench_labelled_logits.main(["--quick", "--settings", "bf16_checkpointing"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    setting = result["settings"]["bf16_checkpointing"]
    assert result["benchmark"] == "labelled_logits" and result["value"] == setting["loss_step_ratio"]
    assert result["bar_met"] and result["value"] >= 2
    assert setting["loss_relative_difference"] <= 1e-5
    assert setting["training_step_mb"]["labelled"] < setting["training_step_mb"]["full"]


def test_run_gpu_smoke_cpu_takes_every_run(tmp_path, capsys):
    """`python -m benchmarks.run_gpu --smoke-cpu`: every GPU run's code on tiny shapes, one JSON line each, a table."""
    from benchmarks import run_gpu

    output = tmp_path / "results_gpu.jsonl"
    assert run_gpu.main(["--smoke-cpu", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    results = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [r["run"] for r in results] == [run.name for run in run_gpu.RUNS]
    assert all(r["returncode"] == 0 and "error" not in r for r in results)
    by_name = {r["run"]: r for r in results}
    assert by_name["train_amp_flash_attn"]["skipped"]  # flash-attention needs CUDA
    for name, result in by_name.items():
        if name.startswith("train_") and name != "train_amp_flash_attn":
            assert result["smoke"] and result["finite"], name
    assert by_name["train_7b_lora_bf16"]["params"]["trainable"] < by_name["train_bf16"]["params"]["trainable"]
    assert by_name["train_amp_full_logits"]["loss"] == "full" and by_name["train_amp_compiled"]["compiled_layers"]
    generation = by_name["generation_7b"]
    assert set(generation["samples_per_s"]) == {"today", "fast"} and generation["profile"]["ops"]
    assert "| generation_7b |" in printed and "not judged (smoke check)" in printed
    assert len(output.read_text().splitlines()) == 1 + len(run_gpu.RUNS)  # the header, then one line per run


def test_run_gpu_judges_the_bars():
    from benchmarks.run_gpu import bars

    results = {
        "train_amp": {"llm": "1b", "mfu": 0.31, "value": 90.0},
        "train_bf16": {"llm": "1b", "mfu": 0.42, "value": 120.0},
        "train_7b_lora_bf16": {"llm": "7b", "mfu": 0.5, "value": 20.0},
        "generation_7b": {"samples_per_s": {"fast": {"32": 31.5}}, "ms_per_new_token": {"fast": {"1": 26.0}}},
        "data_loading": {"dataloader": {"workers_0": {"images_per_s": 50.0}}},
    }
    lines = bars(results)
    assert "best 42.0% (train_bf16): met" in lines[0]
    assert "31.5 (fast path): met" in lines[1] and "26 (fast path): NOT met" in lines[2]
    assert lines[3].endswith(">= 3 (one core each)")  # 120 samples/s at 50 images/s per worker
