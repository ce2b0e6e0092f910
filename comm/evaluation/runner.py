"""Run any evaluation task: every item predicted once, in batches, sharded over the processes, resumable; then scored.

One process or many (``torchrun``, the DeepSpeed launcher) run the same code: `accelerate.PartialState` joins the
process group the launcher set up, ``split_between_processes`` gives each process its share of the pending items,
and ``gather_object`` brings every process's records to the main one, which writes one predictions file in item
order, scores it and writes the metrics; the metrics come back on every process.

Adding a task means adding one module with an `EvaluationTask` dataclass, e.g. a RefCOCO-style grounded caption
(describe a boxed region; scored against the region's referring expressions)::

    @dataclass(frozen=True)
    class RegionSample:
        id: str
        image: str
        box: tuple[float, float, float, float]  # normalised to the model's square, as boxes are written
        references: list[str]  # the region's referring expressions

    @dataclass(frozen=True)
    class GroundedCaptionTask(EvaluationTask[RegionSample]):
        items: Sequence[RegionSample]
        name: ClassVar[str] = "grounded captions"
        item_name: ClassVar[str] = "region"
        max_new_tokens: ClassVar[int] = 32

        def item_id(self, item): return item.id
        def image_path(self, item): return item.image
        def prompt(self, item): return with_image(f"Describe the region {format_box(item.box)}.")
        def parse(self, item, answer, image_size, processor): return {"id": item.id, "caption": answer}
        def unanswered_record(self, item): return {"id": item.id, "caption": ""}
        def score(self, records): return score_caption_records(records, self.items, tokenizer="python")

and running it: ``run_task(GroundedCaptionTask(samples), model, processor, out / "predictions.jsonl",
out / "metrics.json")``. A command for it is an `EvalCommand` in `comm.evaluation.commands`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from comm.evaluation.processes import on_main, process_state
from comm.evaluation.records import check_files_exist
from comm.evaluation.resume import load_done_records, part_files, part_path
from comm.evaluation.task import EvaluationTask, Record
from comm.evaluation.unanswerable import UNANSWERABLE, load_usable_image
from comm.io import append_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    from comm.model.modeling import CommForConditionalGeneration
    from comm.processing import CommProcessor

DEFAULT_BATCH_SIZE = 8


def run_task(
    task: EvaluationTask[Any],
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    predictions_path: str | os.PathLike[str],
    metrics_path: str | os.PathLike[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Predict every item of ``task`` into ``predictions_path`` (`predict_all`) and return its metrics on every rank.

    The main process scores the records (`EvaluationTask.score`), writes the metrics to ``metrics_path`` when one
    is given and the task's extras beside the predictions. ``generate_kwargs`` go to generation; the answer's
    ``max_new_tokens`` defaults to the task's.
    """
    check_files_exist((task.image_path(item) for item in task.items), "image")
    generate_kwargs.setdefault("max_new_tokens", task.max_new_tokens)
    predictions_path = Path(predictions_path)
    records = predict_all(task, model, processor, predictions_path, batch_size, progress, **generate_kwargs)
    metrics = on_main(_score_and_save, task, records, metrics_path, predictions_path.parent)
    if metrics is None:
        raise RuntimeError(f"no {task.description} metrics came back from rank 0")
    return metrics


def _score_and_save(
    task: EvaluationTask[Any],
    records: list[Record] | None,
    metrics_path: str | os.PathLike[str] | None,
    folder: Path,
) -> dict[str, Any]:
    if records is None:
        raise RuntimeError(f"rank 0 holds no {task.description} records after the run")
    metrics = task.score(records)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    task.save_extras(records, folder)
    return metrics


def predict_all(
    task: EvaluationTask[Any],
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    predictions_path: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[Record] | None:
    """Predict every item once, resumably and split over processes; return all records in item order on rank 0.

    Items whose id already has a record in ``predictions_path`` or in a part file an earlier run left are skipped.
    The rest are split over the processes (each takes a contiguous share) and answered ``batch_size`` at a time
    (`answer_batch`); each batch's records are appended at once, to ``predictions_path`` itself in a single process
    or to ``predictions.rank{r}.jsonl`` beside it with several, so an interruption loses at most one batch. Rank 0
    then gathers the records and writes ONE file in item order (part files are removed). Other ranks get None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = process_state()
    predictions_path = Path(predictions_path)
    ids = [task.item_id(item) for item in task.items]
    _check_distinct(ids)
    done = on_main(load_done_records, predictions_path, task.id_key, ids, share=False) or {}  # on rank 0 only
    done_ids = set(on_main(sorted, done) or ())  # every rank learns which ids rank 0 found done
    pending = [item for item, item_id in zip(task.items, ids, strict=True) if item_id not in done_ids]
    if state.is_main_process and done_ids:
        print(
            f"resuming: {len(done_ids)} of {len(ids)} predictions already in {predictions_path} (or its part files), "
            f"{len(pending)} to go",
            file=sys.stderr,
        )
    target = predictions_path if state.num_processes == 1 else part_path(predictions_path, state.process_index)
    with state.split_between_processes(pending) as mine:
        new_records = _predict_share(
            task, model, processor, mine, target, batch_size, progress and state.is_main_process, generate_kwargs
        )
    gathered = gather_object(new_records)  # every process's records, one flat list
    return on_main(_merge, task, ids, done, gathered, predictions_path, share=False)


def _check_distinct(ids: Sequence[str]) -> None:
    if not ids:
        raise ValueError("nothing to evaluate: no items")
    seen: set[str] = set()
    for item_id in ids:
        if item_id in seen:
            raise ValueError(f"the items hold the same id twice: {item_id!r}")
        seen.add(item_id)


def _predict_share(
    task: EvaluationTask[Any],
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    items: Sequence[Any],
    target: Path,
    batch_size: int,
    progress: bool,
    generate_kwargs: dict[str, Any],
) -> list[Record]:
    """This process's ``items`` answered a batch at a time, each batch's records appended to ``target``."""
    records: list[Record] = []
    with tqdm(total=len(items), desc=task.description, unit="item", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = list(items[start : start + batch_size])
            batch_records = answer_batch(task, model, processor, batch, **generate_kwargs)
            expected = [task.item_id(item) for item in batch]
            got = [str(record.get(task.id_key)) for record in batch_records]
            if got != expected:
                raise RuntimeError(
                    f"the {task.description} task answered with records for ids {got[:4]}... "
                    f"instead of {expected[:4]}..."
                )
            append_jsonl(target, batch_records)
            records.extend(batch_records)
            bar.update(len(batch))
    return records


def answer_batch(
    task: EvaluationTask[Any],
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    items: Sequence[Any],
    **generate_kwargs: Any,
) -> list[Record]:
    """The records of one batch of ``items`` in order, each image opened once.

    The task answers the items whose image loads (`EvaluationTask.answer`: one generate call or forward pass); an
    item whose image is not usable gets its `EvaluationTask.unanswered_record` marked `UNANSWERABLE` with the reason.
    """
    loaded = [
        load_usable_image(task.image_path(item), f"image of {task.item_name} {task.item_id(item)}") for item in items
    ]
    usable = [index for index, (image, _) in enumerate(loaded) if image is not None]
    answered: list[Record] = []
    if usable:
        images = [loaded[index][0] for index in usable]
        answered = task.answer(model, processor, [items[index] for index in usable], images, **generate_kwargs)
    records = dict(zip(usable, answered, strict=True))
    return [
        records[index] if reason is None else {**task.unanswered_record(item), UNANSWERABLE: reason}
        for index, (item, (_, reason)) in enumerate(zip(items, loaded, strict=True))
    ]


def _merge(
    task: EvaluationTask[Any],
    ids: Sequence[str],
    done: dict[str, Record],
    gathered: Sequence[Record],
    predictions_path: Path,
) -> list[Record]:
    """The records done before and made now, in item order, written as one file (the part files go)."""
    merged = dict(done)
    for record in gathered:
        merged.setdefault(str(record[task.id_key]), record)
    missing = [item_id for item_id in ids if item_id not in merged]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) have no prediction after the run (first: {missing[0]!r})")
    ordered = [merged[item_id] for item_id in ids]
    write_jsonl(predictions_path, ordered)
    for part in part_files(predictions_path):
        part.unlink(missing_ok=True)
    return ordered
