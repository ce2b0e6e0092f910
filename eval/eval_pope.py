#!/usr/bin/env python
"""Evaluate a COMM model on POPE (object hallucination, yes/no questions), or re-score answers files.

    python eval/eval_pope.py --model MODEL --image-dir data/coco/val2014 --output-dir results/pope \\
        --questions coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json
    python eval/eval_pope.py ... --answer-mode logits   # one forward pass a question: "Yes" vs "No" logits
    torchrun --nproc_per_node 8 eval/eval_pope.py ...   # same options, sharded over 8 processes
    python eval/eval_pope.py --score results/pope/answers_coco_pope_random.jsonl --questions coco_pope_random.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.errors import ArgumentParser
from comm.evaluation.pope import load_pope_answers, load_pope_questions, score_pope, summarize_pope_splits
from comm.evaluation.run_pope import ANSWER_MODES, POPE_MAX_NEW_TOKENS, evaluate_pope_splits
from comm.evaluation.scripts import add_run_arguments, print_json, run_evaluation, script_main


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the POPE evaluation."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--questions",
        type=Path,
        nargs="+",
        required=True,
        metavar="QUESTIONS.json",
        help="POPE question files (one JSON object a line); each file is a split named after it",
    )
    parser.add_argument(
        "--score",
        type=Path,
        nargs="+",
        metavar="ANSWERS.jsonl",
        help="re-score answers files (one per --questions file, same order), no model",
    )
    parser.add_argument("--image-dir", type=Path, default=None, help="folder the questions' image names are in")
    parser.add_argument(
        "--answer-mode",
        choices=ANSWER_MODES,
        default="generate",
        help="generate: free-form answers (default); logits: one forward pass, next-token 'Yes' vs 'No' logits",
    )
    parser.add_argument("--model-id", default=None, help="model_id written in the answers (default: the model folder)")
    add_run_arguments(parser, max_new_tokens=POPE_MAX_NEW_TOKENS)
    return parser


def split_names(paths: Sequence[Path]) -> list[str]:
    """Split names from question files (``coco_pope_random.json`` -> ``coco_pope_random``); they must differ."""
    names = [path.stem for path in paths]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ValueError(
                f"two question files make the same split name {name!r}: {paths[names.index(name)]} and {paths[index]}"
            )
    return names


def _score(args: argparse.Namespace) -> int:
    if len(args.score) != len(args.questions):
        raise ValueError(
            f"--score got {len(args.score)} answers file(s) but --questions {len(args.questions)}: give one each"
        )
    results: dict[str, Any] = {}
    for name, answers_path, questions_path in zip(split_names(args.questions), args.score, args.questions):
        questions = load_pope_questions(questions_path)
        answers = load_pope_answers(answers_path)
        try:
            results[name] = score_pope(answers, questions)
        except ValueError as error:
            raise ValueError(f"{answers_path} does not answer {questions_path}: {error}") from None
    print_json(next(iter(results.values())) if len(results) == 1 else summarize_pope_splits(results))
    return 0


def _run(args: argparse.Namespace) -> int:
    image_dir = args.image_dir if args.image_dir is not None else Path()

    def load_splits() -> dict[str, list[dict[str, Any]]]:
        names = split_names(args.questions)
        return {name: load_pope_questions(path) for name, path in zip(names, args.questions)}

    def evaluate(model: Any, processor: Any, splits: dict[str, list[dict[str, Any]]], **options: Any) -> dict[str, Any]:
        model_id = args.model_id or Path(args.model).name
        options.update(answer_mode=args.answer_mode, model_id=model_id)
        return evaluate_pope_splits(model, processor, splits, args.image_dir, args.output_dir, **options)

    return run_evaluation(
        args,
        load_splits,
        lambda splits: (image_dir / question["image"] for questions in splits.values() for question in questions),
        evaluate,
        f"POPE ({args.answer_mode})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the POPE evaluation (or ``--score`` answers files); returns the exit code."""
    return script_main(build_parser(), argv, _score, _run, scored="answers files")


if __name__ == "__main__":
    raise SystemExit(main())
