"""A run killed at any moment resumes: faults injected inside checkpoint writes (SIGKILL, SIGTERM, SIGINT, a full
disk, rotation), each followed by a resume whose losses and final weights equal an uninterrupted run's.

The save is made to misbehave at a chosen point by the test hook ``$COMM_TEST_SAVE_FAULT`` (comm/training/
checkpoints.py). A SIGKILL needs its own process: those runs are `train/train.py` subprocesses; the rest run in
this process through `comm.training.train.main`. The 2-process DeepSpeed case is in tests/test_training.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_training
import torch
from conftest import single_torch_thread
from test_training import REPO, StopAtStep, losses, weights
from transformers import TrainerCallback

from comm.training.arguments import parse_arguments
from comm.training.checkpoints import COMPLETE, FAULT_ENV, checkpoint_problem
from comm.training.stopping import continue_command
from comm.training.train import main, train

STEPS = 6  # 8 samples, batch 2: the run crosses an epoch boundary after step 4
SAVE_EVERY = 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread_per_module():
    """One torch thread, as the subprocess runs have (OMP_NUM_THREADS=1): the same arithmetic, the same losses."""
    with single_torch_thread():
        yield


training_world = test_training.world  # the fixture, used here under this name


@pytest.fixture(scope="module")
def world(training_world) -> dict:
    """tests/test_training.py's tiny components and 8 samples (its `world` fixture)."""
    return training_world


def run_args(world: dict, out: Path, *extra: str) -> list[str]:
    """The arguments of every run here: ``STEPS`` steps of batch 2, a checkpoint every ``SAVE_EVERY`` steps."""
    return [
        *world["from_components"], *world["common"], "--per_device_train_batch_size", "2",
        "--max_steps", str(STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_EVERY),
        "--output_dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> dict:
    """The uninterrupted run: its per-step losses and exported weights."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(*parse_arguments(run_args(world, out)))
    return {"losses": losses(result.log_history), "weights": weights(result.export_dir)}


def assert_equals_reference(out: Path, reference: dict) -> None:
    """The finished run in ``out`` logged the reference's losses at every step and exported its weights."""
    history = json.loads((out / "log_history.json").read_text())
    got = losses(history)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    for step, loss in reference["losses"].items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), (step, got, reference["losses"])
    exported = weights(out / "final")
    assert exported.keys() == reference["weights"].keys()
    for key, value in reference["weights"].items():
        torch.testing.assert_close(exported[key], value, rtol=1e-6, atol=1e-7, msg=key)


def run_script(args: list[str], fault: str) -> subprocess.CompletedProcess:
    """``python train/train.py ARGS`` with the save fault ``fault``, in its own process."""
    env = {
        **os.environ, FAULT_ENV: fault, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
    }  # fmt: skip
    return subprocess.run(
        [sys.executable, "train/train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def resume(world: dict, out: Path, capfd, *extra: str) -> str:
    """Run the same command again with ``--resume_from_checkpoint auto`` to the end; return what it printed."""
    capfd.readouterr()
    assert main(run_args(world, out, *extra, "--resume_from_checkpoint", "auto")) == 0
    return capfd.readouterr().err


def complete(folder: Path) -> bool:
    """Whether ``folder`` is a complete checkpoint (with the record of what its save wrote)."""
    return checkpoint_problem(folder) is None and (folder / COMPLETE).is_file()


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL inside a save
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    [
        "start",  # the staging folder made, nothing written
        "weights",  # between files: the trained weights and config written, not the optimizer
        "files",  # after every file, before the record and the rename
    ],
)
def test_sigkill_inside_a_save_leaves_no_checkpoint_and_the_run_resumes_exactly(
    world, reference, point, tmp_path, capfd
):
    out = tmp_path / "run"
    killed = run_script(run_args(world, out), f"{point}:4:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "checkpoint-4").exists()  # invisible, not torn
    assert complete(out / "checkpoint-2")
    assert (out / ".partial" / "checkpoint-4").is_dir()
    printed = resume(world, out, capfd)
    line = next(line for line in printed.splitlines() if line.startswith("--resume_from_checkpoint auto"))
    assert f"resuming from {out / 'checkpoint-2'}" in line and str(out / ".partial" / "checkpoint-4") in line
    assert_equals_reference(out, reference)
    assert complete(out / "checkpoint-4") and complete(out / "checkpoint-6")
    assert not (out / ".partial").exists()  # the resumed run's saves cleared what the killed one left


@pytest.mark.parametrize(
    ("point", "left"),
    [
        ("published", {"checkpoint-2", "checkpoint-4"}),  # checkpoint-4 renamed into place, checkpoint-2 not rotated
        ("rotating", {"checkpoint-4"}),  # checkpoint-2 being deleted: moved into .partial first
    ],
)
def test_sigkill_during_rotation_never_loses_the_last_complete_checkpoint(
    world, reference, point, left, tmp_path, capfd
):
    out = tmp_path / "run"
    limit = ["--save_total_limit", "1"]
    step = 4 if point == "published" else 2  # rotating: the step of the checkpoint being deleted
    killed = run_script(run_args(world, out, *limit), f"{point}:{step}:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert {path.name for path in out.glob("checkpoint-*")} == left
    assert all(complete(out / name) for name in left)
    printed = resume(world, out, capfd, *limit)
    assert f"resuming from {out / 'checkpoint-4'}" in printed
    assert_equals_reference(out, reference)
    assert {path.name for path in out.glob("checkpoint-*")} == {"checkpoint-6"}
    assert not (out / ".partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM and SIGINT: finish the step, save, exit 143 / 130
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("point", "action", "status"), [("weights", "term", 143), ("start", "int", 130)])
def test_a_signal_during_a_save_finishes_it_and_stops(world, reference, point, action, status, tmp_path, capfd):
    out = tmp_path / "run"
    os.environ[FAULT_ENV] = f"{point}:4:{action}"
    try:
        assert main(run_args(world, out)) == status
    finally:
        del os.environ[FAULT_ENV]
    err = capfd.readouterr().err
    name = "SIGTERM" if action == "term" else "SIGINT"
    assert f"{name} received: finishing this step and saving a checkpoint; {name} again stops at once" in err
    stop = next(line for line in err.splitlines() if line.startswith("stopped by"))
    assert stop.startswith(f"stopped by {name} after step 4 of {STEPS}: checkpoint {out / 'checkpoint-4'}; ")
    assert stop.endswith("--resume_from_checkpoint auto") and f"--output_dir {out}" in stop
    assert complete(out / "checkpoint-4") and not (out / "checkpoint-6").exists() and not (out / "final").exists()
    printed = resume(world, out, capfd)
    assert f"resuming from {out / 'checkpoint-4'}" in printed and "passed over" not in printed
    assert_equals_reference(out, reference)


class SendSignal(TrainerCallback):
    """Sends this process ``signum`` as optimizer step ``step`` begins (in the middle of a run, not of a save)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_between_saves_writes_a_checkpoint_of_the_step_in_progress(world, reference, tmp_path, capfd):
    out = tmp_path / "run"
    result = train(*parse_arguments(run_args(world, out)), callbacks=[SendSignal(signal.SIGTERM, 3)])
    assert result.stopped_by == signal.SIGTERM and result.checkpoint == out / "checkpoint-3"
    assert sorted(losses(result.log_history)) == [1, 2, 3]  # step 3 finished, step 4 never began
    assert complete(out / "checkpoint-3") and not (out / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    resume(world, out, capfd)
    assert_equals_reference(out, reference)


def test_a_signal_during_the_last_save_lets_the_run_finish_with_status_0(world, reference, tmp_path, capfd):
    out = tmp_path / "run"
    os.environ[FAULT_ENV] = f"weights:{STEPS}:term"
    try:
        assert main(run_args(world, out)) == 0
    finally:
        del os.environ[FAULT_ENV]
    assert "stopped by" not in capfd.readouterr().err
    assert_equals_reference(out, reference)


def test_a_second_sigterm_stops_at_once_and_the_run_resumes(world, reference, tmp_path, capfd):
    out = tmp_path / "run"
    killed = run_script(run_args(world, out), "start:4:term2")
    assert killed.returncode == -signal.SIGTERM, killed.stderr[-3000:]
    assert "SIGTERM received" in killed.stderr and "stopped by" not in killed.stderr
    assert not (out / "checkpoint-4").exists() and complete(out / "checkpoint-2")
    resume(world, out, capfd)
    assert_equals_reference(out, reference)


# ---------------------------------------------------------------------------------------------------------------
# A full disk; torn folders from elsewhere
# ---------------------------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_stays(world, reference, tmp_path, capfd):
    out = tmp_path / "run"
    os.environ[FAULT_ENV] = "optimizer:4:full"
    try:
        assert main(run_args(world, out)) == 2
    finally:
        del os.environ[FAULT_ENV]
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: no space left on the device while writing checkpoint {out / 'checkpoint-4'} (nothing of it was "
        f"kept; {out / 'checkpoint-2'} is intact): free some space, then continue with --resume_from_checkpoint auto"
    )
    assert not (out / "checkpoint-4").exists() and not (out / ".partial" / "checkpoint-4").exists()
    assert complete(out / "checkpoint-2")
    resume(world, out, capfd)
    assert_equals_reference(out, reference)


def test_a_real_full_disk_during_a_save(world, reference, tmp_path, capfd):
    # A 8 MB filesystem: checkpoint-2 (5.3 MB) fits, checkpoint-4 runs out of space inside torch.save, which reports
    # it without an errno; after "freeing space" (a larger size) the run resumes.
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    ).returncode == 0  # fmt: skip
    if not mounted:
        pytest.skip("mounting a small tmpfs needs root (the simulated full disk above runs everywhere)")
    try:
        out = disk / "run"
        assert main(run_args(world, out)) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert err[-1].startswith(
            f"error: no space left on the device while writing checkpoint {out / 'checkpoint-4'} (nothing of it was "
            f"kept; {out / 'checkpoint-2'} is intact)"
        ), err[-3:]
        assert not (out / "checkpoint-4").exists() and not (out / ".partial" / "checkpoint-4").exists()
        assert complete(out / "checkpoint-2")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resume(world, out, capfd)
        assert_equals_reference(out, reference)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_torn_folders_are_passed_over_by_auto_and_named_when_given(world, reference, tmp_path, capfd):
    # What transformers' own saving leaves when killed: an empty checkpoint-N, or one without trainer_state.json.
    out = tmp_path / "run"
    train(*parse_arguments(run_args(world, out)), callbacks=[StopAtStep(4)])
    shutil.rmtree(out / "checkpoint-4")
    (out / "checkpoint-4").mkdir()
    shutil.copytree(
        out / "checkpoint-2", out / "checkpoint-3", ignore=shutil.ignore_patterns("trainer_state.json", COMPLETE)
    )

    for folder, missing in [("checkpoint-4", "it is empty"), ("checkpoint-3", "missing trainer_state.json")]:
        assert main(run_args(world, out, "--resume_from_checkpoint", str(out / folder))) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert re.fullmatch(
            rf"error: --resume_from_checkpoint {re.escape(str(out / folder))} is not a complete checkpoint: "
            rf"{missing}.* \(an interrupted save\?\); give an earlier one, or 'auto' for the newest complete one",
            err[-1],
        ), err
    cut = tmp_path / "cut"  # a file cut short after the save: its size differs from the record
    shutil.copytree(out / "checkpoint-2", cut)
    size = (cut / "trainable.safetensors").stat().st_size
    os.truncate(cut / "trainable.safetensors", size - 10)
    assert checkpoint_problem(cut) == f"trainable.safetensors is {size - 10} bytes, {size} were written"

    printed = resume(world, out, capfd)
    line = next(line for line in printed.splitlines() if line.startswith("--resume_from_checkpoint auto"))
    assert line.startswith(f"--resume_from_checkpoint auto: resuming from {out / 'checkpoint-2'}; passed over the ")
    assert (
        f"{out / 'checkpoint-4'} (it is empty" in line
        and f"{out / 'checkpoint-3'} (missing trainer_state.json)" in line
    )
    assert_equals_reference(out, reference)
    assert complete(out / "checkpoint-4")  # the new save of step 4 replaced the torn folder
    assert (out / "checkpoint-3").is_dir()  # left for the user to remove


def test_continue_command_keeps_the_arguments_and_the_launcher(monkeypatch):
    argv = ["--local_rank=1", "--stage", "1", "--resume_from_checkpoint", "out/checkpoint-2", "--output_dir", "o x"]
    monkeypatch.setattr(sys, "argv", ["train/train.py", *argv])
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    expected = "--stage 1 --output_dir 'o x' --resume_from_checkpoint auto"
    assert continue_command(argv) == f"python train/train.py {expected}"
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("CROSS_SIZE", "1")
    assert continue_command(argv) == f"deepspeed --num_gpus 2 train/train.py {expected}"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/comm-train"])
    monkeypatch.delenv("LOCAL_SIZE")
    assert continue_command(argv) == f"comm-train {expected}"
