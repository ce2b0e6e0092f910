"""Predict every item once across the launched processes (accelerate): split, append as it goes, gather, merge.

One process or many (``torchrun``, the DeepSpeed launcher) run the same code: `accelerate.PartialState` joins the
process group the launcher set up (nccl on GPUs, gloo on CPUs), ``split_between_processes`` gives each process its
share of the pending items, and ``gather_object`` brings every process's records to all of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from comm.errors import UserError
from comm.evaluation.resume import load_done_records, part_files, part_path
from comm.io import append_jsonl, write_jsonl

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BATCH_SIZE = 8

# Errors the main process hands to the others keep their type when it is one of these (others become RuntimeError).
_SHARED_ERRORS: dict[str, type[Exception]] = {
    error.__name__: error for error in (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError, UserError)
}


def process_state() -> PartialState:
    """This process among the evaluation processes; joins the launcher's process group on first use.

    Without a launcher it is process 0 of 1. Without CUDA the processes talk over gloo on the CPU.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def on_main(fn: Callable[[], R], share: bool = True) -> R | None:
    """Run ``fn`` on the main process only; its error is raised on every process (so none waits forever).

    With ``share`` the result is sent to every process; otherwise the others get None.
    """
    state = process_state()
    result: Any = None
    error: BaseException | None = None
    if state.is_main_process:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every process
            error = exc
    if state.num_processes > 1:
        failure = None if error is None else (type(error).__name__, str(error))
        shared = [(result if share else None, failure)]
        broadcast_object_list(shared, from_process=0)
        shared_result, failure = shared[0]
        if not state.is_main_process:
            if failure is not None:
                name, message = failure
                raise _SHARED_ERRORS.get(name, RuntimeError)(f"rank 0 failed: {name}: {message}")
            return shared_result if share else None
    if error is not None:
        raise error
    return result


def _check_ids(ids: Sequence[str]) -> None:
    if not ids:
        raise ValueError("nothing to evaluate: no items")
    seen: set[str] = set()
    for item_key in ids:
        if item_key in seen:
            raise ValueError(f"the items hold the same id twice: {item_key!r}")
        seen.add(item_key)


def run_sharded(
    items: Sequence[T],
    item_id: Callable[[T], Any],
    predict: Callable[[list[T]], list[dict[str, Any]]],
    out_path: str | os.PathLike[str],
    key: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    description: str = "evaluating",
) -> list[dict[str, Any]] | None:
    """Predict every item once, resumably and split over processes; return all records in input order on rank 0.

    Items whose id (``str(item_id(item))``) already has a record in ``out_path`` or in a part file an earlier
    run left are skipped. The rest are split over the processes (each takes a contiguous share) and predicted
    ``batch_size`` at a time; each batch's records (``predict(batch)``, one per item, ``record[key]`` = the
    item's id) are appended at once, to ``out_path`` itself in a single process or to
    ``predictions.rank{r}.jsonl`` beside it with several, so an interruption loses at most one batch. Rank 0
    then gathers the records and writes ONE file in input order (part files are removed). Other ranks get None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = process_state()
    out_path = Path(out_path)
    ids = [str(item_id(item)) for item in items]
    _check_ids(ids)

    done: dict[str, dict[str, Any]] = {}

    def load() -> list[str]:
        done.update(load_done_records(out_path, key, ids))
        return sorted(done)

    done_ids = set(on_main(load) or ())
    pending = [item for item, item_key in zip(items, ids) if item_key not in done_ids]
    if state.is_main_process and done_ids:
        print(
            f"resuming: {len(done_ids)} of {len(ids)} predictions already in {out_path} (or its part files), "
            f"{len(pending)} to go",
            file=sys.stderr,
        )
    target = out_path if state.num_processes == 1 else part_path(out_path, state.process_index)
    new_records: list[dict[str, Any]] = []
    with state.split_between_processes(pending) as mine:
        bar = tqdm(total=len(mine), desc=description, unit="item", disable=not (progress and state.is_main_process))
        for start in range(0, len(mine), batch_size):
            batch = list(mine[start : start + batch_size])
            records = predict(batch)
            expected = [str(item_id(item)) for item in batch]
            got = [str(record.get(key)) for record in records]
            if got != expected:
                raise RuntimeError(
                    f"the predict function returned records for ids {got[:4]}... instead of {expected[:4]}..."
                )
            append_jsonl(target, records)
            new_records.extend(records)
            bar.update(len(batch))
        bar.close()

    gathered = gather_object(new_records)  # every process's records, one flat list

    def merge() -> list[dict[str, Any]]:
        merged = dict(done)
        for record in gathered:
            merged.setdefault(str(record[key]), record)
        missing = [i for i in ids if i not in merged]
        if missing:
            raise RuntimeError(f"{len(missing)} item(s) have no prediction after the run (first: {missing[0]!r})")
        ordered = [merged[i] for i in ids]
        write_jsonl(out_path, ordered)
        for part in part_files(out_path):
            part.unlink(missing_ok=True)
        return ordered

    return on_main(merge, share=False)


def predict_and_score(
    items: Sequence[T],
    item_id: Callable[[T], Any],
    predict: Callable[[list[T]], list[dict[str, Any]]],
    out_path: str | os.PathLike[str],
    key: str,
    score: Callable[[list[dict[str, Any]]], R],
    what: tuple[str, str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    description: str = "evaluating",
) -> R:
    """`run_sharded` the items, then ``score`` all records on rank 0; its result comes back on every rank.

    ``what`` names the records and the metrics in the errors (``("captions", "caption")``).
    """
    records_name, metrics_name = what
    records = run_sharded(
        items, item_id, predict, out_path, key, batch_size=batch_size, progress=progress, description=description
    )

    def finish() -> R:
        if records is None:
            raise RuntimeError(f"rank 0 holds no {records_name} after the run")
        return score(records)

    metrics = on_main(finish)
    if metrics is None:
        raise RuntimeError(f"no {metrics_name} metrics came back from rank 0")
    return metrics
