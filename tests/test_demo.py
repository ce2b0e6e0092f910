"""A shortened `comm demo`: every stage runs, training lowers the loss, the same seed gives the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comm.demo.run import DemoConfig, format_report, run
from comm.pipeline import CommPipeline


def _short(out: Path) -> DemoConfig:
    return DemoConfig(
        out=out,
        steps=24,
        stage1_fraction=0.35,  # 8 steps: enough for the stage-1 loss to fall
        train_images=80,
        test_images=4,
        batch_size=8,
        eval_batch_size=16,
        visualize=2,
        captions_shown=2,
        learning_rate=3e-3,
        curve_every=5,
        curve_items=6,
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
        out / "layer_weights.png",
        out / "learning_curves.png",
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
    for tower, layers in (("clip", [1, 2, 3, 4]), ("dino", [3, 4])):
        merged = report["layer_weights"][tower]
        assert [layer for layer, _ in merged["weights"]] == layers
        assert merged["gained"] == [layer for layer, weight in merged["weights"] if weight > merged["initial"]]
    steps1, steps2 = report["steps"]["stage1"], report["steps"]["stage2"]
    expected = [("start", 0)]
    for stage, steps in (("stage 1", steps1), ("stage 2", steps2)):
        expected += [(stage, step) for step in range(1, steps + 1) if step % 5 == 0 or step == steps]
    assert [(point["stage"], point["step"]) for point in report["curve"]] == expected
    assert report["curve"][-1]["samples"] == 8 * (steps1 + steps2)
    assert 0 <= report["baselines"]["rec"] < 0.5 and report["baselines"]["pope"] == 0.5
    processor = CommPipeline.from_pretrained(report["checkpoint"]).processor
    assert (processor.template.system, processor.box_decimals) == ("", 2)  # the demo's settings are saved
    assert "COMM demo report" in format_report(first)
    assert CommPipeline.from_pretrained(report["checkpoint"]).caption(str(out / "world" / "images" / "test_00000.png"))

    second = run(_short(tmp_path / "b"))
    for task in ("rec", "pope", "caption"):
        assert second[task] == first[task], task
    assert second["loss"] == first["loss"]


def test_shipped_towers_are_what_pretrain_towers_makes(tmp_path):
    """A short pretraining writes towers with the shipped ones' configs and fixed sin-cos positions; the shipped
    ones load as the demo loads them."""
    from transformers import AutoConfig, AutoModel

    from comm.demo.pretrain_towers import HELD_OUT, PretrainConfig, pretrain_towers, sincos_position_table
    from comm.demo.run import SHIPPED_TOWERS

    config = PretrainConfig(out=tmp_path, images=HELD_OUT + 16, clip_steps=4, dino_steps=4, batch=4)
    paths = pretrain_towers(config)
    table = sincos_position_table(8, 64, config.position_norm)
    for name, path in paths.items():
        made, shipped = (AutoConfig.from_pretrained(folder).to_diff_dict() for folder in (path, SHIPPED_TOWERS / name))
        ignored = {"transformers_version", "_name_or_path"}
        assert {k: v for k, v in made.items() if k not in ignored} == {
            k: v for k, v in shipped.items() if k not in ignored
        }
        for folder in (path, SHIPPED_TOWERS / name):
            embeddings = AutoModel.from_pretrained(folder).embeddings
            positions = embeddings.position_embedding.weight if name == "clip" else embeddings.position_embeddings[0]
            assert torch.allclose(positions[1:], table, atol=1e-6), (name, folder)
    with pytest.raises(ValueError, match="images must exceed"):
        pretrain_towers(PretrainConfig(out=tmp_path, images=HELD_OUT))
