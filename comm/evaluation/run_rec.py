"""Temporary: the REC calls comm/demo and tests/test_pipeline.py still make, kept until they call
`comm.evaluation.runner` with a `comm.evaluation.rec.RecTask` (then this module goes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.evaluation.rec import REC_MAX_NEW_TOKENS, RecSample, RecTask
from comm.evaluation.records import METRICS_FILE, PREDICTIONS_FILE
from comm.evaluation.runner import DEFAULT_BATCH_SIZE, answer_batch, run_task
from comm.evaluation.task import Record
from comm.generation import generate_answers  # noqa: F401  (tests/test_pipeline.py patches this name)

__all__ = ["PREDICTIONS_FILE", "evaluate_rec", "predict_rec_batch"]


def predict_rec_batch(model: Any, processor: Any, samples: Sequence[RecSample], **generate_kwargs: Any) -> list[Record]:
    """`answer_batch` of a `RecTask`."""
    return answer_batch(RecTask(samples), model, processor, samples, **generate_kwargs)


def evaluate_rec(
    model: Any,
    processor: Any,
    samples: Sequence[RecSample],
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = REC_MAX_NEW_TOKENS,
    visualize: int = 0,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """`run_task` of a `RecTask` into ``out_dir``."""
    out_dir = Path(out_dir)
    return run_task(
        RecTask(samples, visualize=visualize),
        model,
        processor,
        out_dir / PREDICTIONS_FILE,
        out_dir / METRICS_FILE,
        batch_size=batch_size,
        progress=progress,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
