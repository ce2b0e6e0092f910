"""`comm demo`: generate a shapes world, train a tiny COMM model in two stages, evaluate, caption, report."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from comm.conversation import ConversationTemplate
from comm.demo.tokenizer import train_demo_tokenizer
from comm.demo.world import WorldConfig, WorldFiles, all_texts, generate_world

REPORT_FILE = "report.json"
LOSS_CURVES = "loss_curves.png"
REC_GRID = "rec_examples.png"
LAYER_WEIGHTS = "layer_weights.png"
# The tiny CLIP and DINOv2 towers pretrained on generated shapes (`comm.demo.pretrain_towers` made them).
SHIPPED_TOWERS = Path(__file__).parent / "towers"


@dataclass
class DemoConfig:
    """Everything the demo run depends on; the defaults finish in under 10 minutes on a 2-core CPU."""

    out: Path = Path("comm-demo")
    seed: int = 0
    steps: int = 1600  # optimizer steps over both stages
    stage1_fraction: float = 0.1  # share of the steps spent in stage 1
    batch_size: int = 32
    learning_rate: float = 2e-3
    train_images: int = 4000
    test_images: int = 100
    pope_pairs_per_image: int = 2
    eval_batch_size: int = 64
    visualize: int = 8
    captions_shown: int = 4
    threads: int = 2  # torch threads (results differ in the last bits between thread counts); 0: torch's default
    random_towers: bool = False  # random-init towers instead of the shipped pretrained tiny ones
    clip: str | None = None
    dino: str | None = None
    llm: str | None = None
    # Box text with 2 decimals (LLaVA-1.5's): 2 digits per coordinate instead of 3, and the model grounds about
    # three times better at the same step (README, findings). No system prompt: shorter sequences, cheaper steps.
    box_decimals: int = 2
    template: ConversationTemplate = field(default_factory=lambda: ConversationTemplate(system=""))
    # The demo's tiny model: 8x8 visual tokens per tower (a 4x4 grid grounds ~3x worse), a 4-layer 128-wide
    # Llama. Its LLM starts at the 1/sqrt(width) init: transformers' 0.02 default is tuned for widths in the
    # thousands and, at width 128, leaves attention nearly uniform, so the model takes far longer to learn where
    # to look. The tower fields apply to random towers; shipped or given towers bring their own configs.
    model_overrides: dict[str, Any] = field(
        default_factory=lambda: {
            "grid_size": 8,
            "clip_config": {"hidden_size": 64, "intermediate_size": 128},
            "dino_config": {"hidden_size": 64},
            "text_config": {
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "initializer_range": 128**-0.5,
            },
        }
    )

    @property
    def stage_steps(self) -> tuple[int, int]:
        """Optimizer steps of stage 1 and stage 2."""
        first = max(1, round(self.steps * self.stage1_fraction))
        return first, max(1, self.steps - first)


def parse_args(argv: list[str] | None) -> DemoConfig:
    """Read the command line into a `DemoConfig`."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(prog="comm demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=defaults.out, help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps over both stages")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train-images", type=int, default=defaults.train_images)
    parser.add_argument("--test-images", type=int, default=defaults.test_images)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch threads (default 2; 0 keeps torch's default)"
    )
    parser.add_argument(
        "--random-towers", action="store_true", help="random-init tiny towers instead of the shipped pretrained ones"
    )
    parser.add_argument("--clip", help="a real CLIP checkpoint (name or folder) instead of the tiny random tower")
    parser.add_argument("--dino", help="a real DINOv2 checkpoint instead of the tiny random tower")
    parser.add_argument("--llm", help="a real causal LM checkpoint (and its tokenizer) instead of the tiny one")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one per stage)")
    if args.train_images < 10 or args.test_images < 2:
        parser.error("--train-images must be >= 10 and --test-images >= 2")
    if args.random_towers and (args.clip or args.dino):
        parser.error("--random-towers and --clip/--dino exclude each other")
    return DemoConfig(
        out=args.out,
        seed=args.seed,
        steps=args.steps,
        train_images=args.train_images,
        test_images=args.test_images,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        threads=args.threads,
        random_towers=args.random_towers,
        clip=args.clip,
        dino=args.dino,
        llm=args.llm,
    )


def prepare_world(config: DemoConfig) -> WorldFiles:
    """Generate the shapes world (train and held-out test images with their annotation files)."""
    world = WorldConfig(
        seed=config.seed,
        num_train_images=config.train_images,
        num_test_images=config.test_images,
        pope_pairs_per_image=config.pope_pairs_per_image,
    )
    return generate_world(config.out / "world", world)


def prepare_initial_model(config: DemoConfig, world: WorldFiles) -> Path:
    """Assemble the untrained COMM model from tower/LLM checkpoints and save it as ``stage0`` (model + processor).

    The towers are the shipped pretrained tiny ones unless ``--clip``/``--dino`` or ``--random-towers`` say
    otherwise. Without ``--llm``, a tiny random LLM is written first and a tokenizer is trained on the world's text;
    the model is then assembled through the same `build_from_components` path as real checkpoints.
    """
    from transformers import AutoTokenizer, set_seed

    from comm.build import build_from_components, save_random_components
    from comm.model.configuration import CommConfig

    folder = config.out / "stage0"
    if config.llm:
        tokenizer = AutoTokenizer.from_pretrained(config.llm)
    else:
        tokenizer = train_demo_tokenizer(all_texts(world), template=config.template)
    tiny = CommConfig.tiny(vocab_size=len(tokenizer), **config.model_overrides)
    set_seed(config.seed)  # the random towers, LLM and new modules are all drawn from the seed
    components = save_random_components(config.out / "components", tiny)
    towers = components if config.random_towers else {name: str(SHIPPED_TOWERS / name) for name in ("clip", "dino")}
    model, processor = build_from_components(
        config.clip or towers["clip"],
        config.dino or towers["dino"],
        config.llm or components["llm"],
        tokenizer=tokenizer,
        model_max_length=512,
        template=config.template,
        box_decimals=config.box_decimals,
        **{} if config.clip or config.dino else tiny.tower_reading_fields(),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def train_stage(config: DemoConfig, stage: int, model_dir: Path, data: list[str], steps: int):
    """Run one training stage through the real entry point (`comm.training.train.main`)."""
    from comm.training.train import train as train_main

    output_dir = config.out / f"stage{stage}"
    argv = [
        "--stage", str(stage),
        "--model_name_or_path", str(model_dir),
        "--data", *data,
        "--output_dir", str(output_dir),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", str(config.batch_size),
        "--learning_rate", str(config.learning_rate),
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--weight_decay", "0.0",
        "--max_grad_norm", "1.0",
        "--logging_steps", str(max(1, steps // 60)),
        "--save_strategy", "no",
        "--seed", str(config.seed),
        "--model_max_length", "512",
        "--dataloader_num_workers", "0",
        "--report_to", "none",
    ]  # fmt: skip  # no --group_by_length: the tasks differ in length, and batches of one task train worse
    return train_main(argv)


def evaluate(config: DemoConfig, model_dir: Path, world: WorldFiles, out_dir: Path) -> dict[str, Any]:
    """Run the REC, POPE and caption evaluations on the held-out images through the eval code."""
    from comm.evaluation.caption import load_caption_file
    from comm.evaluation.pope import load_pope_questions
    from comm.evaluation.rec import load_rec_jsonl
    from comm.evaluation.run_caption import evaluate_captions
    from comm.evaluation.run_pope import evaluate_pope
    from comm.evaluation.run_rec import evaluate_rec
    from comm.loading import load_model_and_processor

    model, processor = load_model_and_processor(model_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a fresh evaluation, not a resumed one
    batch = config.eval_batch_size
    rec = evaluate_rec(
        model,
        processor,
        load_rec_jsonl(world.test_rec, image_root=world.root),
        out_dir / "rec",
        batch_size=batch,
        visualize=config.visualize,
    )
    pope = evaluate_pope(
        model,
        processor,
        load_pope_questions(world.test_pope),
        world.root,
        out_dir / "pope" / "answers.jsonl",
        batch_size=batch,
    )
    captions = evaluate_captions(
        model,
        processor,
        load_caption_file(world.test_captions, split="test", image_root=world.root),
        out_dir / "caption",
        batch_size=batch,
        tokenizer="python",  # no Java needed: METEOR is reported as skipped
    )
    return {"rec": rec, "pope": pope, "caption": captions}


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


def run(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo and return the report (also written as ``report.json`` in ``config.out``)."""
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    config.out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(config)
    stage0 = prepare_initial_model(config, world)
    before = evaluate(config, stage0, world, config.out / "eval_before")

    steps1, steps2 = config.stage_steps
    # Stage 1 aligns image and text on captions, attribute and yes/no questions; stage 2 adds grounding. A ratio
    # is the share of a file that is sampled: with the default world, stage 2 sees about 16k REC, 13k POPE, 8k
    # attribute questions and 1k captions per epoch (captions learn fast; REC is the slow task).
    stage1_data = [str(world.train_captions), str(world.train_attributes), str(world.train_pope)]
    stage1 = train_stage(config, 1, stage0, stage1_data, steps1)
    stage2_data = [
        str(world.train_rec),
        str(world.train_pope),
        str(world.train_attributes),
        f"{world.train_captions}:0.25",
    ]
    stage2 = train_stage(config, 2, stage1.export_dir, stage2_data, steps2)
    after = evaluate(config, stage2.export_dir, world, config.out / "eval_after")
    captions = caption_examples(stage2.export_dir, world, config.captions_shown)

    loss_png = plot_loss_curves(
        {"stage 1": stage1.log_history, "stage 2": stage2.log_history}, config.out / LOSS_CURVES
    )
    rec_png = config.out / REC_GRID
    shutil.copyfile(config.out / "eval_after" / "rec" / "visualization.png", rec_png)
    weights_png = config.out / LAYER_WEIGHTS
    merged_layers = learned_layer_weights(stage2.export_dir, weights_png)
    report = {
        **after,
        "before": before,
        "captions": captions,
        "layer_weights": merged_layers,
        "loss": {
            "stage1": first_and_last_loss(stage1.log_history),
            "stage2": first_and_last_loss(stage2.log_history),
        },
        "steps": {"stage1": steps1, "stage2": steps2},
        "test_images": config.test_images,
        "seed": config.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "checkpoint": str(stage2.export_dir),
        "pictures": {"loss_curves": str(loss_png), "rec_examples": str(rec_png), "layer_weights": str(weights_png)},
        "report": str(config.out / REPORT_FILE),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    (config.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def first_and_last_loss(history: list[dict]) -> dict[str, float | None]:
    """The first and last logged training loss of a stage (None when nothing was logged)."""
    from comm.training.plots import loss_points

    _, losses = loss_points(history)
    return {"first": losses[0] if losses else None, "last": losses[-1] if losses else None}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``comm demo``: run the demo and print its report."""
    os.environ.setdefault(
        "HF_HUB_OFFLINE", "0" if any(x in (argv or []) for x in ("--clip", "--dino", "--llm")) else "1"
    )
    report = run(parse_args(argv))
    print(format_report(report))
    return 0
