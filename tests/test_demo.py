"""A shortened `comm demo`: every stage runs, training lowers the loss, the same seed gives the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comm.demo.run import DemoConfig, format_report, run
from comm.pipeline import CommPipeline


def _short(out: Path) -> DemoConfig:
    return DemoConfig(
        out=out,
        steps=24,
        train_images=80,
        test_images=4,
        batch_size=8,
        eval_batch_size=16,
        visualize=2,
        captions_shown=2,
        learning_rate=3e-3,
    )


@pytest.mark.slow
def test_short_demo_runs_every_stage_and_is_deterministic(tmp_path):
    first = run(_short(tmp_path / "a"))
    out = tmp_path / "a"
    for path in (
        out / "world" / "train_rec.jsonl",
        out / "stage0" / "config.json",
        out / "stage1" / "final" / "model.safetensors",
        out / "stage2" / "final" / "processor_config.json",
        out / "eval_before" / "rec" / "predictions.jsonl",
        out / "eval_after" / "pope" / "answers.jsonl",
        out / "eval_after" / "caption" / "metrics.json",
        out / "loss_curves.png",
        out / "rec_examples.png",
    ):
        assert path.is_file(), path
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"] == str(out / "stage2" / "final")
    for key in ("rec", "pope", "caption", "before", "seconds", "captions"):
        assert key in report
    assert report["rec"]["n"] == report["before"]["rec"]["n"] > 0
    assert set(report["pope"]) >= {"accuracy", "f1", "n"}
    assert report["loss"]["stage1"]["last"] < report["loss"]["stage1"]["first"]
    assert report["loss"]["stage2"]["last"] < report["loss"]["stage1"]["first"]
    assert len(report["captions"]) == 2
    assert "COMM demo report" in format_report(first)
    assert CommPipeline.from_pretrained(report["checkpoint"]).caption(str(out / "world" / "images" / "test_00000.png"))

    second = run(_short(tmp_path / "b"))
    for task in ("rec", "pope", "caption"):
        assert second[task] == first[task], task
    assert second["loss"] == first["loss"]
