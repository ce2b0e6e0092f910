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
