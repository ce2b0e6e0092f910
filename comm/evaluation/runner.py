"""Shared evaluation machinery: model loading, sharding over ranks, resumable predictions, metrics tables."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from comm.evaluation.jsonl import append_jsonl

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 0
ERROR_EXIT_CODE = 2
INTERRUPTED_EXIT_CODE = 130
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the evaluation processes (rank 0 of 1 without a launcher)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that merges, scores and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def dist_info() -> DistInfo:
    """Rank, world size and local rank of this process (``0, 1, 0`` when no process group is up)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank))
    return DistInfo(0, 1, 0)


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun or deepspeed (``WORLD_SIZE`` > 1): nccl on GPU, gloo on CPU."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size > 1 and dist.is_available() and not dist.is_initialized():
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", rank)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
    return dist_info()


def finish_distributed() -> None:
    """Wait for every rank, then leave the process group (after a successful run; a failed one just exits)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (a no-op in a single process)."""
    if dist_info().world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: T) -> list[T]:
    """Every rank's ``value`` in rank order (on every rank; ``all_gather_object``)."""
    info = dist_info()
    if info.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


# Errors rank 0 hands to the other ranks keep their type when it is one of these (others become RuntimeError).
_SHARED_ERRORS: dict[str, type[Exception]] = {
    error.__name__: error for error in (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError)
}


def on_main(fn: Callable[[], R], share: bool = True) -> R | None:
    """Run ``fn`` on rank 0 only; its error is raised on every rank (so no rank waits forever).

    With ``share`` the result is sent to every rank; otherwise other ranks get None.
    """
    info = dist_info()
    result: Any = None
    error: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error = exc
    if info.world_size > 1:
        failure = None if error is None else (type(error).__name__, str(error))
        shared_result, failure = broadcast_from_main((result if share else None, failure))
        if not info.is_main:
            if failure is not None:
                name, message = failure
                raise _SHARED_ERRORS.get(name, RuntimeError)(f"rank 0 failed: {name}: {message}")
            return shared_result if share else None
    if error is not None:
        raise error
    return result


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (``transformers.set_seed``) so two runs give the same predictions."""
    from transformers import set_seed

    set_seed(seed)


def load_model(
    path: str | os.PathLike[str], device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` in eval mode with `comm.loading.load_model_and_processor`.

    The device defaults to this rank's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU; the
    dtype to bf16 on GPUs that support it and float32 on CPU (``"auto"`` means the default).
    """
    from comm.loading import load_model_and_processor

    if device is None and torch.cuda.is_available():
        device = f"cuda:{dist_info().local_rank % torch.cuda.device_count()}"
    if isinstance(dtype, str) and dtype.lower() == "auto":
        dtype = None
    return load_model_and_processor(path, device, dtype)


def check_files_exist(paths: Iterable[str | os.PathLike[str]], what: str = "image") -> None:
    """Raise FileNotFoundError saying how many of ``paths`` are missing and which first (before any model work)."""
    missing = sorted({str(path) for path in paths if not Path(path).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} file(s) not found (first: {missing[0]})")


def part_path(path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` appends its predictions: ``predictions.jsonl`` -> ``predictions.rank{rank}.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def part_files(path: str | os.PathLike[str]) -> list[Path]:
    """The per-rank part files of ``path`` left in its folder (by any number of ranks), by rank."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}$")
    found = [(int(match.group(1)), child) for child in path.parent.iterdir() if (match := pattern.match(child.name))]
    return [child for _, child in sorted(found)]


def write_jsonl_atomic(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` as JSON lines to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_predictions_for_resume(path: str | os.PathLike[str], key: str) -> list[dict[str, Any]]:
    """Read a predictions file an interrupted run left, repairing it in place when its last line was cut off.

    A last line without its newline that is not a JSON object (a write cut short) is dropped from the file;
    any other bad line, or a record without ``key``, raises ValueError naming the file and the line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = text.endswith("\n") or not text
    records: list[dict[str, Any]] = []
    repaired = False
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        line_number = index + 1
        last = index == len(lines) - 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if last and not complete:
                repaired = True  # the run stopped while writing this line: regenerate it
                continue
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}")
        if key not in record:
            raise ValueError(f"{path}, line {line_number}: the record has no {key!r}")
        records.append(record)
    if repaired or not complete:
        write_jsonl_atomic(path, records)
    return records


def _load_done(path: Path, key: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Records already written for ``ids`` in ``path`` and its part files (rank 0 only); foreign ids are an error."""
    known = set(ids)
    done: dict[str, dict[str, Any]] = {}
    sources = ([path] if path.is_file() else []) + part_files(path)
    for source in sources:
        records = read_predictions_for_resume(source, key)
        foreign = [str(record[key]) for record in records if str(record[key]) not in known]
        if foreign:
            raise ValueError(
                f"{source} holds {len(foreign)} prediction(s) for ids that are not in the data being evaluated "
                f"(first: {foreign[0]!r}): it is from another run; use another output folder or delete it"
            )
        for record in records:
            done.setdefault(str(record[key]), record)
    return done


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
    """Predict every item once, resumably and sharded over ranks; return all records in input order on rank 0.

    Items whose id (``str(item_id(item))``) already has a record in ``out_path`` or in a part file an earlier
    run left are skipped. The rest are split over ranks (rank r takes pending items r::world) and predicted
    ``batch_size`` at a time; each batch's records (``predict(batch)``, one per item, ``record[key]`` = the
    item's id) are appended at once, to ``out_path`` itself in a single process or to
    ``predictions.rank{r}.jsonl`` beside it with several, so an interruption loses at most one batch. Rank 0
    then gathers the records and writes ONE file in input order (part files are removed). Other ranks get None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = dist_info()
    out_path = Path(out_path)
    ids = [str(item_id(item)) for item in items]
    seen: set[str] = set()
    for item_key in ids:
        if item_key in seen:
            raise ValueError(f"the items hold the same id twice: {item_key!r}")
        seen.add(item_key)
    if not ids:
        raise ValueError("nothing to evaluate: no items")

    done: dict[str, dict[str, Any]] = {}

    def load() -> list[str]:
        done.update(_load_done(out_path, key, ids))
        return sorted(done)

    done_ids = set(on_main(load) or ())
    pending = [item for item, item_key in zip(items, ids) if item_key not in done_ids]
    mine = pending[info.rank :: info.world_size]
    if info.is_main and done_ids:
        print(
            f"resuming: {len(done_ids)} of {len(ids)} predictions already in {out_path} (or its part files), "
            f"{len(pending)} to go",
            file=sys.stderr,
        )
    target = out_path if info.world_size == 1 else part_path(out_path, info.rank)
    new_records: list[dict[str, Any]] = []
    bar = tqdm(total=len(mine), desc=description, unit="item", disable=not (progress and info.is_main))
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

    gathered = gather_to_main(new_records)

    def merge() -> list[dict[str, Any]]:
        merged = dict(done)
        for rank_records in gathered:
            for record in rank_records:
                merged.setdefault(str(record[key]), record)
        missing = [i for i in ids if i not in merged]
        if missing:
            raise RuntimeError(f"{len(missing)} item(s) have no prediction after the run (first: {missing[0]!r})")
        ordered = [merged[i] for i in ids]
        write_jsonl_atomic(out_path, ordered)
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


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with a header rule; floats get 4 decimals."""
    cells = [[str(h) for h in header]] + [[_format_value(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


POPE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")


def format_metrics(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Metrics as a small table: one row a metric, or one row a split for several POPE splits (with the means)."""
    if "splits" in metrics and isinstance(metrics["splits"], Mapping):
        rows: list[list[Any]] = [
            [split] + [split_metrics.get(column, "") for column in POPE_COLUMNS]
            for split, split_metrics in metrics["splits"].items()
        ]
        rows.append(["mean", metrics.get("mean_accuracy", ""), "", "", metrics.get("mean_f1", ""), "", ""])
        table = format_table(("split",) + POPE_COLUMNS, rows)
    else:
        table = format_table(("metric", "value"), [[name, value] for name, value in metrics.items()])
    return f"{title}\n{table}" if title else table


def print_metrics(
    metrics: Mapping[str, Any], title: str | None = None, path: str | os.PathLike[str] | None = None
) -> None:
    """Print the metrics table (and where the JSON was written) on rank 0."""
    if not dist_info().is_main:
        return
    print(format_metrics(metrics, title))
    if path is not None:
        print(f"metrics written to {path}")


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on rank 0 (what ``--score`` prints)."""
    if dist_info().is_main:
        print(json.dumps(obj, indent=2, ensure_ascii=False))


def add_run_arguments(
    parser: argparse.ArgumentParser, max_new_tokens: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> None:
    """The options every evaluation script shares: model, output folder, batching, decoding, seed, device."""
    group = parser.add_argument_group("running a model")
    group.add_argument("--model", help="COMM model folder (config, weights and processor files)")
    group.add_argument("--output-dir", type=Path, help="folder for the predictions and metrics.json")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"prompts a batch (default {batch_size})")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"tokens generated at most (default {max_new_tokens})",
    )
    group.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 (the default) decodes greedily"
    )
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (with --temperature > 0)")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    group.add_argument(
        "--dtype", default="auto", help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16 or fp16"
    )
    group.add_argument("--device", default=None, help="torch device (default: this rank's GPU, else the CPU)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The deepspeed launcher passes --local_rank=N (torchrun sets LOCAL_RANK instead).
    group.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error naming the argument when a run option is missing or out of range."""
    if not args.model:
        parser.error("--model is required (or --score to re-score a predictions file)")
    if args.output_dir is None:
        parser.error("--output-dir is required")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """``model.generate`` options from the parsed run arguments (greedy unless ``--temperature`` > 0)."""
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        options["temperature"] = args.temperature
        if args.top_p is not None:
            options["top_p"] = args.top_p
    return options


def cli_main(run: Callable[[], int]) -> int:
    """Run a script's body: data and file errors print ``error: ...`` and give exit code 2, no traceback."""
    try:
        return run()
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        rank = dist_info().rank
        prefix = "error" if rank == 0 else f"error (rank {rank})"
        print(f"{prefix}: {error}", file=sys.stderr)
        return ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the predictions written", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


def run_evaluation(
    args: argparse.Namespace,
    load_data: Callable[[], T],
    images: Callable[[T], Iterable[str | os.PathLike[str]]],
    evaluate: Callable[..., Mapping[str, Any]],
    title: str,
) -> int:
    """A script's model run: join the ranks, seed, load the data, check its images, load the model, evaluate, print.

    ``evaluate(model, processor, data, batch_size=..., progress=..., **generation_options(args))`` returns the
    metrics, printed under ``title`` on rank 0; returns 0.
    """
    init_distributed()
    seed_everything(args.seed)
    data = load_data()
    check_files_exist(images(data), "image")  # before the (slow) model load
    model, processor = load_model(args.model, args.device, args.dtype)
    metrics = evaluate(
        model, processor, data, batch_size=args.batch_size, progress=not args.no_progress, **generation_options(args)
    )
    print_metrics(metrics, title, args.output_dir / METRICS_FILE)
    finish_distributed()
    return 0


def script_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    score: Callable[[argparse.Namespace], int],
    run: Callable[[argparse.Namespace], int],
    scored: str = "a predictions file",
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
) -> int:
    """Parse ``argv``, then `cli_main` ``score`` (with ``--score``, no model) or ``run`` (after the argument checks)."""
    args = parser.parse_args(argv)
    if args.score is not None:
        if args.model:
            parser.error(f"--score re-scores {scored} without a model: drop --model")
        return cli_main(lambda: score(args))
    check_run_arguments(parser, args)
    if check is not None:
        check(parser, args)
    return cli_main(lambda: run(args))
