"""Temporary: the POPE calls comm/demo and benchmarks/bench_pope_scoring.py still make, kept until they call
`comm.evaluation.runner` with a `comm.evaluation.pope.PopeTask` and import from `comm.evaluation.yes_no`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from comm.evaluation.pope import POPE_MAX_NEW_TOKENS, PopeQuestion, PopeTask
from comm.evaluation.runner import DEFAULT_BATCH_SIZE, answer_batch, run_task
from comm.evaluation.task import Record
from comm.evaluation.yes_no import NO_ANSWER, YES_ANSWER, yes_no_logits, yes_no_token_ids

__all__ = [
    "NO_ANSWER",
    "POPE_MAX_NEW_TOKENS",
    "YES_ANSWER",
    "evaluate_pope",
    "predict_pope_batch",
    "yes_no_logits",
    "yes_no_token_ids",
]


def _in_folder(questions: Sequence[PopeQuestion], image_dir: str | os.PathLike[str] | None) -> list[PopeQuestion]:
    root = Path(image_dir) if image_dir is not None else Path()
    return [replace(question, image=str(root / question.image)) for question in questions]


def predict_pope_batch(
    model: Any,
    processor: Any,
    questions: Sequence[PopeQuestion],
    image_dir: str | os.PathLike[str] | None,
    model_id: str,
    answer_mode: str = "generate",
    **generate_kwargs: Any,
) -> list[Record]:
    """`answer_batch` of a `PopeTask` whose images are in ``image_dir``."""
    task = PopeTask(_in_folder(questions, image_dir), answer_mode=answer_mode, model_id=model_id)
    return answer_batch(task, model, processor, task.items, **generate_kwargs)


def evaluate_pope(
    model: Any,
    processor: Any,
    questions: Sequence[PopeQuestion],
    image_dir: str | os.PathLike[str] | None,
    answers_path: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    answer_mode: str = "generate",
    max_new_tokens: int = POPE_MAX_NEW_TOKENS,
    model_id: str = "comm",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """`run_task` of a `PopeTask` whose images are in ``image_dir`` into ``answers_path``."""
    task = PopeTask(_in_folder(questions, image_dir), answer_mode=answer_mode, model_id=model_id)
    return run_task(
        task,
        model,
        processor,
        answers_path,
        batch_size=batch_size,
        progress=progress,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
