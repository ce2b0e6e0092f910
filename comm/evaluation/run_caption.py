"""Temporary: the caption call comm/demo still makes, kept until it calls `comm.evaluation.runner` with a
`comm.evaluation.caption.CaptionTask` (then this module goes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.evaluation.caption import CAPTION_MAX_NEW_TOKENS, CaptionSample, CaptionTask
from comm.evaluation.records import METRICS_FILE, PREDICTIONS_FILE
from comm.evaluation.runner import DEFAULT_BATCH_SIZE, run_task


def evaluate_captions(
    model: Any,
    processor: Any,
    samples: Sequence[CaptionSample],
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = CAPTION_MAX_NEW_TOKENS,
    spice: bool = False,
    tokenizer: str = "ptb",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """`run_task` of a `CaptionTask` into ``out_dir``."""
    out_dir = Path(out_dir)
    return run_task(
        CaptionTask(samples, spice=spice, tokenizer=tokenizer),
        model,
        processor,
        out_dir / PREDICTIONS_FILE,
        out_dir / METRICS_FILE,
        batch_size=batch_size,
        progress=progress,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
