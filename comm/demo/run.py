"""`comm demo`: generate a shapes world, train a tiny COMM model in two stages, evaluate, caption, report."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from transformers import TrainerCallback

from comm.conversation import template_for_tokenizer
from comm.demo.analysis import rec_error_analysis, scenes_by_image
from comm.demo.config import DemoConfig
from comm.demo.curve import HeldOutCurve, box_answer_tokens, mean_box_accuracy, plot_learning_curves
from comm.demo.report import (
    caption_examples,
    first_and_last_loss,
    format_report,
    learned_layer_weights,
    plot_loss_curves,
)
from comm.demo.tiny import tiny_config
from comm.demo.tokenizer import train_demo_tokenizer
from comm.demo.world import WorldConfig, WorldFiles, all_texts, generate_world
from comm.evaluation.caption import CaptionTask, load_caption_file
from comm.evaluation.pope import PopeTask, load_pope_questions
from comm.evaluation.rec import RecTask, load_rec_jsonl
from comm.evaluation.records import METRICS_FILE, PREDICTIONS_FILE
from comm.evaluation.runner import run_task
from comm.io import read_jsonl
from comm.loading import load_model_and_processor
from comm.training.arguments import CommTrainingArguments, DataArguments, ModelArguments
from comm.training.train import TrainResult, train

REPORT_FILE = "report.json"
LOSS_CURVES = "loss_curves.png"
REC_GRID = "rec_examples.png"
LAYER_WEIGHTS = "layer_weights.png"
LEARNING_CURVES = "learning_curves.png"
UNTRAINED_CAPTION_TOKENS = 32  # the world's longest caption (three objects) is under 30 tokens
# The training files of the world that a stage's mixture draws from, by short name.
MIXTURE_FILES = {
    "rec": "train_rec",
    "pope": "train_pope",
    "attributes": "train_attributes",
    "captions": "train_captions",
}
# The tiny CLIP and DINOv2 towers pretrained on generated shapes (`comm.demo.pretrain_towers` made them).
SHIPPED_TOWERS = Path(__file__).parent / "towers"


def mixture(world: WorldFiles, ratios: dict[str, float], loss_weights: dict[str, float]) -> list[str]:
    """``--data`` specs (``FILE:RATIO:WEIGHT``) for the world's training files named in ``ratios`` (keys of
    `MIXTURE_FILES`; a ratio of 0 leaves a file out), each with its loss weight (1 unless given)."""
    unknown = sorted((set(ratios) | set(loss_weights)) - set(MIXTURE_FILES))
    if unknown:
        raise ValueError(f"unknown mixture keys {unknown}; expected some of {sorted(MIXTURE_FILES)}")
    return [
        f"{getattr(world, MIXTURE_FILES[key])}:{ratio}:{loss_weights.get(key, 1.0)}"
        for key, ratio in ratios.items()
        if ratio > 0
    ]


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

    from comm.build import build_from_components
    from comm.demo.tiny import save_random_components

    folder = config.out / "stage0"
    template = config.template
    if config.llm:
        tokenizer = AutoTokenizer.from_pretrained(config.llm)
        template = template_for_tokenizer(tokenizer, config.template)  # a chat LLM keeps its own turn format
    else:
        tokenizer = train_demo_tokenizer(all_texts(world), template=config.template)
    tiny = tiny_config(vocab_size=len(tokenizer), **config.model_overrides)
    set_seed(config.seed)  # the random towers, LLM and new modules are all drawn from the seed
    components = save_random_components(config.out / "components", tiny)
    towers = components if config.random_towers else {name: str(SHIPPED_TOWERS / name) for name in ("clip", "dino")}
    model, processor = build_from_components(
        config.clip or towers["clip"],
        config.dino or towers["dino"],
        config.llm or components["llm"],
        tokenizer=tokenizer,
        model_max_length=512,
        template=template,
        box_decimals=config.box_decimals,
        image_positions=tiny.image_positions,
        image_position_embedding=tiny.image_position_embedding,
        **{} if config.clip or config.dino else tiny.tower_reading_fields(),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def train_stage(
    config: DemoConfig,
    stage: int,
    model_dir: Path,
    data: list[str],
    steps: int,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run one training stage through the real entry point (`comm.training.train.train`)."""
    model_args = ModelArguments(
        model_name_or_path=str(model_dir),
        loss_weighting="sample",  # a one-word answer counts as much as a 21-token box (README, findings)
    )
    training_args = CommTrainingArguments(
        output_dir=str(config.out / f"stage{stage}"),
        stage=stage,
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_ratio=0.03,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, steps // 60),
        save_strategy="no",
        seed=config.seed,
        dataloader_num_workers=0,
        report_to="none",
    )  # no group_by_length: the tasks differ in length, and batches of one task train worse
    data_args = DataArguments(data=list(data), model_max_length=512)
    return train(model_args, data_args, training_args, callbacks=callbacks)


def train_stages(
    config: DemoConfig, world: WorldFiles, stage0: Path, curve: HeldOutCurve | None
) -> tuple[TrainResult, TrainResult]:
    """Stage 1 from the untrained model, then stage 2 from stage 1's export, both on the world's mixture; the
    held-out curve, if any, measured along."""
    steps1, steps2 = config.stage_steps
    data = mixture(world, config.mixture_ratios, config.loss_weights)
    callbacks = [curve] if curve else []
    if curve:
        curve.start_stage("stage 1")
    stage1 = train_stage(config, 1, stage0, data, steps1, callbacks)
    if curve:
        curve.start_stage("stage 2")
    stage2 = train_stage(config, 2, stage1.export_dir, data, steps2, callbacks)
    return stage1, stage2


def start_curve(config: DemoConfig, model_dir: Path, world: WorldFiles) -> HeldOutCurve | None:
    """The held-out learning curve (its first point measured on the untrained model), or None without one."""
    if not config.curve_every:
        return None
    model, processor = load_model_and_processor(model_dir)
    rec = load_rec_jsonl(world.test_rec, image_root=world.root)[: config.curve_items]
    pope = load_pope_questions(world.test_pope, world.root)[: config.curve_items]
    curve = HeldOutCurve(processor, rec, pope, config.curve_every, config.eval_batch_size)
    curve.start_stage("start")
    curve.points.append({"stage": "start", "step": 0, "samples": 0, **curve.measure(model)})
    return curve


def evaluate(
    config: DemoConfig, model_dir: Path, world: WorldFiles, out_dir: Path, untrained: bool = False
) -> dict[str, Any]:
    """Run the REC, POPE and caption evaluation tasks on the held-out images through the evaluation runner.

    An ``untrained`` model rarely ends an answer, so its answers are capped at what a right one needs (a box, a
    word, a caption's length) instead of the evaluations' usual 64 tokens: the same scores, a fraction of the time.
    """
    model, processor = load_model_and_processor(model_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # a fresh evaluation, not a resumed one
    batch = config.eval_batch_size
    rec = run_task(
        RecTask(load_rec_jsonl(world.test_rec, image_root=world.root), visualize=config.visualize),
        model,
        processor,
        out_dir / "rec" / PREDICTIONS_FILE,
        out_dir / "rec" / METRICS_FILE,
        batch,
        **({"max_new_tokens": box_answer_tokens(processor.box_decimals)} if untrained else {}),
    )
    pope = run_task(
        PopeTask(load_pope_questions(world.test_pope, world.root)),
        model,
        processor,
        out_dir / "pope" / "answers.jsonl",  # LLaVA's answers file; the metrics go to the report only
        None,
        batch,
        **({"max_new_tokens": 3} if untrained else {}),
    )
    captions = run_task(
        CaptionTask(
            load_caption_file(world.test_captions, split="test", image_root=world.root),
            tokenizer="python",  # no Java needed: METEOR is reported as skipped
        ),
        model,
        processor,
        out_dir / "caption" / PREDICTIONS_FILE,
        out_dir / "caption" / METRICS_FILE,
        batch,
        **({"max_new_tokens": UNTRAINED_CAPTION_TOKENS} if untrained else {}),
    )
    return {"rec": rec, "pope": pope, "caption": captions}


def examine_trained_model(config: DemoConfig, world: WorldFiles, model_dir: Path) -> dict[str, Any]:
    """The error analysis of the evaluated REC answers, captions of a few held-out images and the learned layer
    weights (also drawn, `LAYER_WEIGHTS`)."""
    rec_records = read_jsonl(config.out / "eval_after" / "rec" / PREDICTIONS_FILE)
    scenes = scenes_by_image(world.read_scenes())
    return {
        "rec_analysis": rec_error_analysis(rec_records, scenes),
        "captions": caption_examples(model_dir, world, config.captions_shown),
        "layer_weights": learned_layer_weights(model_dir, config.out / LAYER_WEIGHTS),
    }


def trivial_baselines(world: WorldFiles) -> dict[str, float]:
    """What answers that ignore the image score: REC always the mean training box, POPE always one answer."""
    return {
        "rec": mean_box_accuracy(load_rec_jsonl(world.train_rec), load_rec_jsonl(world.test_rec)),
        "pope": 0.5,  # the questions are balanced yes/no
    }


def draw_pictures(
    config: DemoConfig,
    stages: tuple[TrainResult, TrainResult],
    curve: HeldOutCurve | None,
    baselines: dict[str, float],
) -> dict[str, str]:
    """The loss curves, the REC examples, the learning curves (with a curve) and the layer weights (drawn by
    `examine_trained_model`): their files by name."""
    loss_png = plot_loss_curves(
        {"stage 1": stages[0].log_history, "stage 2": stages[1].log_history}, config.out / LOSS_CURVES
    )
    rec_png = config.out / REC_GRID
    shutil.copyfile(config.out / "eval_after" / "rec" / "visualization.png", rec_png)
    pictures = {
        "loss_curves": str(loss_png),
        "rec_examples": str(rec_png),
        "layer_weights": str(config.out / LAYER_WEIGHTS),
    }
    if curve:
        pictures["learning_curves"] = str(plot_learning_curves(curve.points, baselines, config.out / LEARNING_CURVES))
    return pictures


def run(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo and return the report (also written as ``report.json`` in ``config.out``)."""
    config.validate()
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    config.out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(config)
    stage0 = prepare_initial_model(config, world)
    before = evaluate(config, stage0, world, config.out / "eval_before", untrained=True)
    curve = start_curve(config, stage0, world)
    stage1, stage2 = train_stages(config, world, stage0, curve)
    after = evaluate(config, stage2.export_dir, world, config.out / "eval_after")
    examined = examine_trained_model(config, world, stage2.export_dir)
    baselines = trivial_baselines(world)
    pictures = draw_pictures(config, (stage1, stage2), curve, baselines)
    report = {
        **after,
        "before": before,
        **examined,
        "baselines": baselines,
        "curve": curve.points if curve else [],
        "loss": {
            "stage1": first_and_last_loss(stage1.log_history),
            "stage2": first_and_last_loss(stage2.log_history),
        },
        "steps": {"stage1": config.stage_steps[0], "stage2": config.stage_steps[1]},
        "test_images": config.test_images,
        "seed": config.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "checkpoint": str(stage2.export_dir),
        "pictures": pictures,
        "report": str(config.out / REPORT_FILE),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    (config.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def set_hub_access(config: DemoConfig) -> None:
    """The demo's one environment setting: the Hugging Face Hub offline (``HF_HUB_OFFLINE=1``) unless a component
    checkpoint is given (``--clip``, ``--dino``, ``--llm``: it may be a Hub name to download); a value already set in
    the environment wins."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    offline = not (config.clip or config.dino or config.llm)
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"  # for the processes the demo starts
    # huggingface_hub read the variable when comm imported transformers; its calls ask this constant since.
    huggingface_hub.constants.HF_HUB_OFFLINE = offline


def main(config: DemoConfig) -> int:
    """``comm demo``: set the demo's environment, run the demo and print its report."""
    set_hub_access(config)
    print(format_report(run(config)))
    return 0
