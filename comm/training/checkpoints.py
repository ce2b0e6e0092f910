"""Checkpoints that are complete or invisible: staged, renamed into place, checked before a resume, rotated safely.

A checkpoint is written into ``OUTPUT_DIR/.partial/checkpoint-N``; once every process has written its part, the
main process records what was written (`COMPLETE`, last), flushes it all to disk and renames the folder to
``OUTPUT_DIR/checkpoint-N`` in one step. A run killed at any moment therefore leaves either the whole checkpoint or
none under that name; what an interrupted save left in ``.partial`` is removed by the next save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from comm.errors import UserError

PARTIAL_DIR = ".partial"
COMPLETE = "checkpoint_complete.json"
# Test hook, read in `fault_point` only: "POINT:STEP:ACTION[:RANK]" makes a save misbehave at one point.
FAULT_ENV = "COMM_TEST_SAVE_FAULT"
FAULT_POINTS = ("start", "weights", "optimizer", "files", "published", "rotating")
WEIGHT_FILES = (
    "trainable.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save reports a failed write without its errno ("unexpected pos ...", "iostream error"): a save error on a
# filesystem with less than this left counts as a full disk.
NEARLY_FULL_BYTES = 16 * 2**20


def checkpoint_step(path: str | Path) -> int | None:
    """The step N of a ``checkpoint-N`` folder name, else None."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def staging_root(run_dir: str | Path) -> Path:
    """The folder where checkpoints are written before they are renamed into ``run_dir``."""
    return Path(run_dir) / PARTIAL_DIR


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(folder: Path, step: int) -> None:
    """Write `COMPLETE` into ``folder``: every file it holds with its size, after flushing them all to disk."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            _fsync(path)  # the data reach the disk before the rename that makes the checkpoint visible does
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
        _fsync(Path(root))
    record = folder / COMPLETE
    with open(record, "w") as handle:
        json.dump({"step": step, "files": dict(sorted(files.items()))}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def publish(staging: Path, final: Path) -> None:
    """Rename the written ``staging`` folder to ``final`` in one step (an older ``final`` is moved aside first)."""
    replaced = None
    if final.exists():
        replaced = staging.parent / f"replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _remove_if_empty(staging.parent)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def clear_staging(run_dir: str | Path) -> None:
    """Remove what interrupted saves left in ``run_dir/.partial`` (never a complete checkpoint)."""
    shutil.rmtree(staging_root(run_dir), ignore_errors=True)


def checkpoint_problem(folder: str | Path) -> str | None:
    """What makes ``folder`` an incomplete checkpoint (what is missing or cut short), or None when it is complete.

    A folder with the `COMPLETE` record must hold every file listed there at its recorded size. A folder without one
    (written before these records existed, or by transformers itself) counts as complete when it has the trainer
    state, which the Trainer writes last, and model weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    record = folder / COMPLETE
    if record.is_file():
        try:
            files = json.loads(record.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"its {COMPLETE} is unreadable"
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            return f"missing {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}"
        for name, size in files.items():
            if (folder / name).stat().st_size != size:
                return f"{name} is {(folder / name).stat().st_size} bytes, {size} were written"
        return None
    if not any(folder.iterdir()):
        return "it is empty (missing trainer_state.json and the model weights)"
    missing = []
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        missing.append(TRAINER_STATE_NAME)
    else:
        try:
            json.loads(state.read_text())
        except ValueError:
            return f"{TRAINER_STATE_NAME} is cut short"
    latest = folder / "latest"
    if latest.is_file():  # a DeepSpeed checkpoint: 'latest' names the folder of its shards
        tag = latest.read_text().strip()
        if not (folder / tag).is_dir():
            missing.append(f"{tag}/ (named by 'latest')")
    elif not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"the model weights ({WEIGHT_FILES[0]})")
    return f"missing {', '.join(missing)}" if missing else None


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``run_dir``, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [path for path in run_dir.iterdir() if checkpoint_step(path) is not None and path.is_dir()]
    return sorted(found, key=checkpoint_step)


def newest_complete(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of ``run_dir`` (or None) and the incomplete folders newer than it, with why.

    Folders an interrupted save left in ``.partial`` are listed among the incomplete ones.
    """
    passed_over = []
    staging = staging_root(run_dir)
    if staging.is_dir():
        passed_over += [(path, "an interrupted save") for path in sorted(staging.iterdir())]
    for path in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, passed_over
        passed_over.append((path, problem))
    return None, passed_over


def rotate(run_dir: str | Path, limit: int | None, protected: set[Path]) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (never one in ``protected``, never an incomplete one).

    Each one is first moved into ``.partial`` so that a run killed while deleting it leaves no torn ``checkpoint-N``.
    """
    if not limit or limit <= 0:
        return
    complete = [path for path in checkpoints(run_dir) if checkpoint_problem(path) is None]
    keep = set(complete[-limit:]) | {Path(path) for path in protected}
    for path in complete:
        if path in keep:
            continue
        doomed = staging_root(run_dir) / f"deleting-{path.name}"
        doomed.parent.mkdir(exist_ok=True)
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        fault_point("rotating", checkpoint_step(path) or 0, 0)
        shutil.rmtree(doomed, ignore_errors=True)
        _remove_if_empty(doomed.parent)


def fault_point(point: str, step: int, rank: int) -> None:
    """Test hook: misbehave here when ``$COMM_TEST_SAVE_FAULT`` is ``POINT:STEP:ACTION[:RANK]`` for this point.

    ACTION ``kill`` sends this process SIGKILL, ``term``/``int`` SIGTERM/SIGINT, ``term2`` SIGTERM twice, ``full``
    raises the error of a full disk. RANK (default: every process) picks one process of a distributed run. For
    ``rotating``, STEP is the step of the checkpoint being deleted.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in FAULT_POINTS:
        raise ValueError(f"${FAULT_ENV}={spec}: expected POINT:STEP:ACTION[:RANK] with POINT one of {FAULT_POINTS}")
    if parts[0] != point or int(parts[1]) != step or (len(parts) == 4 and int(parts[3]) != rank):
        return
    action = parts[2]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "int", "term2"):
        signum = signal.SIGINT if action == "int" else signal.SIGTERM
        for _ in range(2 if action == "term2" else 1):
            os.kill(os.getpid(), signum)
    elif action == "full":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        raise ValueError(f"${FAULT_ENV}={spec}: unknown action {action!r}")


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, comes from a full disk (or an exceeded quota)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < NEARLY_FULL_BYTES


def save_failure(error: Exception, final: Path, staging: Path, run_dir: Path) -> Exception:
    """The error to raise when writing checkpoint ``final`` failed: one line naming it for a full disk, else ``error``.

    On a full disk the partial folder is removed (its space is what the user needs back).
    """
    if not is_disk_full(error, staging):
        return error
    shutil.rmtree(staging, ignore_errors=True)
    previous, _ = newest_complete(run_dir)
    kept = f"{previous} is intact" if previous is not None else "there is no earlier checkpoint"
    return UserError(
        f"no space left on the device while writing checkpoint {final} (nothing of it was kept; {kept}): free some "
        "space, then continue with --resume_from_checkpoint auto"
    )
