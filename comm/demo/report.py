"""The demo's report: the text printed at the end, its pictures, the learned layer weights and example captions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from comm.demo.analysis import format_error_analysis
from comm.demo.world import WorldFiles


def plot_loss_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Draw the training loss of each stage, one after the other on a shared step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from comm.training.plots import loss_points

    figure, axis = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, history in histories.items():
        steps, losses = loss_points(history)
        axis.plot([offset + s for s in steps], losses, marker=".", label=name)
        offset += max(steps, default=0)
    axis.set_xlabel("optimizer step (both stages)")
    axis.set_ylabel("training loss")
    axis.set_title("COMM demo: training loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def learned_layer_weights(model_dir: Path, path: Path) -> dict[str, Any]:
    """Each tower's learned LLN-Layerscale weight per merged layer, the layers that gained weight, and the picture."""
    from comm.inspection import initial_layer_weight, layer_weights, load_for_inspection, save_layer_weights_plot

    model = load_for_inspection(model_dir)
    save_layer_weights_plot(model, path, title="COMM demo: learned LLN-Layerscale weights")
    report = {}
    for tower, weights in layer_weights(model).items():
        initial = initial_layer_weight(model, tower)
        report[tower] = {
            "initial": initial,
            "weights": [[layer, round(weight, 4)] for layer, weight in weights],
            "gained": [layer for layer, weight in weights if weight > initial],
        }
    return report


def caption_examples(model_dir: Path, world: WorldFiles, count: int) -> list[dict[str, str]]:
    """Caption a few held-out images through the Python inference API."""
    from comm.pipeline import CommPipeline

    pipe = CommPipeline.from_pretrained(model_dir)
    references = json.loads(world.test_captions.read_text())["images"][:count]
    images = [world.root / item["filepath"] / item["filename"] for item in references]
    captions = pipe.caption(images)
    return [
        {"image": str(image), "caption": caption, "reference": item["sentences"][0]["raw"]}
        for image, caption, item in zip(images, captions, references)
    ]


def format_report(report: dict[str, Any]) -> str:
    """The short text report printed at the end of the demo."""
    before, after = report["before"], report
    rows = [
        ("REC Acc@0.5", before["rec"]["accuracy"], after["rec"]["accuracy"]),
        ("REC answers with no box", before["rec"]["no_box"], after["rec"]["no_box"]),
        ("POPE accuracy", before["pope"]["accuracy"], after["pope"]["accuracy"]),
        ("POPE F1", before["pope"]["f1"], after["pope"]["f1"]),
        ("caption BLEU-4", before["caption"]["BLEU-4"], after["caption"]["BLEU-4"]),
        ("caption CIDEr", before["caption"]["CIDEr"], after["caption"]["CIDEr"]),
    ]
    lines = ["", "COMM demo report", f"{'metric':<26}{'before':>10}{'after':>10}"]
    for name, old, new in rows:
        lines.append(
            f"{name:<26}{old:>10.3f}{new:>10.3f}" if isinstance(old, float) else f"{name:<26}{old:>10}{new:>10}"
        )
    lines.append(
        f"held-out: {after['rec']['n']} expressions, {after['pope']['n']} POPE questions, "
        f"{report['test_images']} images"
    )
    baselines = report["baselines"]
    lines.append(
        f"trivial answers: REC {baselines['rec']:.3f} (always the mean training box), "
        f"POPE {baselines['pope']:.3f} (always one answer)"
    )
    if report.get("rec_analysis"):
        lines += format_error_analysis(report["rec_analysis"])
    if report["curve"]:
        points = ", ".join(f"{p['samples']}: {p['rec']:.2f}/{p['pope']:.2f}" for p in report["curve"])
        lines.append(f"REC/POPE on {report['config']['curve_items']} held-out items by samples seen: {points}")
    for tower, name in (("clip", "CLIP"), ("dino", "DINOv2")):
        merged = report["layer_weights"][tower]
        weights = ", ".join(f"{layer}: {weight:.3f}" for layer, weight in merged["weights"])
        gained = ", ".join(map(str, merged["gained"])) or "none"
        lines.append(f"{name} layers that gained weight: {gained}  (from {merged['initial']:.3f}; {weights})")
    lines.append("captions of held-out images (Python API):")
    for example in report["captions"]:
        lines.append(f"  {Path(example['image']).name}: {example['caption']!r}  (reference: {example['reference']!r})")
    lines.append(f"time: {report['seconds']:.0f} s")
    lines.append(f"checkpoint: {report['checkpoint']}  (CommPipeline.from_pretrained loads it)")
    lines.append(f"pictures: {', '.join(report['pictures'].values())}")
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


def first_and_last_loss(history: list[dict]) -> dict[str, float | None]:
    """The first and last logged training loss of a stage (None when nothing was logged)."""
    from comm.training.plots import loss_points

    _, losses = loss_points(history)
    return {"first": losses[0] if losses else None, "last": losses[-1] if losses else None}
