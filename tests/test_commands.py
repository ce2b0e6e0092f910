"""Every command, run as a subprocess: exit status 0 on success; on a user error status 2, one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONVERSATION = {
    "image": "img.png",
    "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}],
}
TRAIN_OPTIONS = ["--max_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]


def console_scripts() -> dict[str, str]:
    """The installed package's console scripts (pyproject's ``[project.scripts]``): name -> ``module:function``."""
    return {
        entry.name: entry.value
        for entry in metadata.distribution("comm").entry_points
        if entry.group == "console_scripts"
    }


def command(name: str) -> list[str]:
    """How to run a console script: the installed wrapper, else what the wrapper runs (``sys.exit(function())``)."""
    installed = Path(sys.executable).with_name(name)
    if installed.is_file():
        return [str(installed)]
    module, function = console_scripts()[name].split(":")
    return [
        sys.executable,
        "-c",
        f"import sys; from {module} import {function} as f; sys.argv[0] = {name!r}; sys.exit(f())",
    ]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` offline with one thread and quiet libraries."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Training data (good and with a bad line), and a predictions/answers file for each evaluation's --score."""
    folder = tmp_path_factory.mktemp("commands")
    Image.new("RGB", (64, 48), (200, 20, 20)).save(folder / "img.png")
    (folder / "good.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    (folder / "bad.jsonl").write_text(json.dumps(CONVERSATION) + "\n{oops\n")
    rec = {"id": "1", "expression": "it", "answer": "[0,0,1,1]", "pred_box": [0, 0, 9, 9], "gt_box": [0, 0, 9, 9]}
    (folder / "rec.jsonl").write_text(json.dumps({**rec, "iou": 1.0}) + "\n")
    question = {"question_id": 1, "image": "img.png", "text": "Is there a cat?", "label": "no"}
    (folder / "questions.jsonl").write_text(json.dumps(question) + "\n")
    (folder / "answers.jsonl").write_text(json.dumps({"question_id": 1, "text": "No."}) + "\n")
    karpathy = {"images": [{"filename": "img.png", "split": "test", "cocoid": 1, "sentences": [{"raw": "Red."}]}]}
    (folder / "karpathy.json").write_text(json.dumps(karpathy))
    (folder / "captions.jsonl").write_text(json.dumps({"id": "1", "image": "img.png", "caption": "Red."}) + "\n")
    return folder


def cases(model: Path, folder: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """Per command: (a successful run, a run with a user error, what the error line must hold)."""
    python = sys.executable
    train_model = ["--model_name_or_path", str(model), "--model_max_length", "256", *TRAIN_OPTIONS]
    return {
        "comm": (
            [*command("comm"), "caption", "img.png", "--model", str(model), "--max-new-tokens", "2"],
            [*command("comm"), "caption", "missing.png", "--model", str(model)],
            "no such image file: missing.png",
        ),
        "comm-train": (
            [*command("comm-train"), *train_model, "--data", "good.jsonl", "--output_dir", "run1"],
            [*command("comm-train"), *train_model, "--data", "bad.jsonl", "--strict", "--output_dir", "run2"],
            "bad.jsonl:2 (sample 1): bad_json",
        ),
        "train/train.py": (
            [python, str(REPO / "train/train.py"), *train_model, "--data", "good.jsonl", "--output_dir", "run3"],
            [python, str(REPO / "train/train.py"), *train_model, "--data", "nowhere.jsonl", "--output_dir", "run4"],
            "--data: no such file: nowhere.jsonl",
        ),
        "eval/eval_rec.py": (
            [python, str(REPO / "eval/eval_rec.py"), "--score", "rec.jsonl"],
            [python, str(REPO / "eval/eval_rec.py"), "--score", "nowhere.jsonl"],
            "nowhere.jsonl",
        ),
        "eval/eval_pope.py": (
            [python, str(REPO / "eval/eval_pope.py"), "--questions", "questions.jsonl", "--score", "answers.jsonl"],
            [python, str(REPO / "eval/eval_pope.py"), "--questions", "questions.jsonl", "--score", "rec.jsonl"],
            "rec.jsonl, line 1: missing key(s) question_id, text",
        ),
        "eval/eval_caption.py": (
            [python, str(REPO / "eval/eval_caption.py"), "--annotations", "karpathy.json", "--score", "captions.jsonl",
             "--tokenizer", "python"],
            [python, str(REPO / "eval/eval_caption.py"), "--annotations", "karpathy.json", "--score", "rec.jsonl",
             "--tokenizer", "python"],
            "rec.jsonl, line 1: missing key(s) caption",
        ),
        # The one front door runs the same commands: comm eval X = eval/eval_X.py, comm train = comm-train.
        "comm eval rec": (
            [*command("comm"), "eval", "rec", "--score", "rec.jsonl"],
            [*command("comm"), "eval", "rec", "--score", "nowhere.jsonl"],
            "nowhere.jsonl",
        ),
        "comm eval pope": (
            [*command("comm"), "eval", "pope", "--questions", "questions.jsonl", "--score", "answers.jsonl"],
            [*command("comm"), "eval", "pope", "--questions", "questions.jsonl", "--score", "rec.jsonl"],
            "rec.jsonl, line 1: missing key(s) question_id, text",
        ),
        "comm eval caption": (
            [*command("comm"), "eval", "caption", "--annotations", "karpathy.json", "--score", "captions.jsonl",
             "--tokenizer", "python"],
            [*command("comm"), "eval", "caption", "--annotations", "karpathy.json", "--score", "rec.jsonl",
             "--tokenizer", "python"],
            "rec.jsonl, line 1: missing key(s) caption",
        ),
        "comm train": (
            [*command("comm"), "train", *train_model, "--data", "good.jsonl", "--output_dir", "run5"],
            [*command("comm"), "train", *train_model, "--data", "nowhere.jsonl", "--output_dir", "run6"],
            "--data: no such file: nowhere.jsonl",
        ),
    }  # fmt: skip


def test_every_console_script_is_covered(tmp_path):
    assert set(console_scripts()) <= set(cases(tmp_path, tmp_path))


@pytest.mark.parametrize(
    "name",
    [
        "comm",
        "comm-train",
        "train/train.py",
        "eval/eval_rec.py",
        "eval/eval_pope.py",
        "eval/eval_caption.py",
        "comm eval rec",
        "comm eval pope",
        "comm eval caption",
        "comm train",
    ],
)
def test_exit_status_0_on_success_and_2_with_one_line_on_a_user_error(name, tiny_model_dir, inputs):
    success, failure, expected = cases(tiny_model_dir, inputs)[name]
    done = run(success, inputs)
    assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    assert "TrainResult" not in done.stderr + done.stdout

    failed = run(failure, inputs)
    assert failed.returncode == 2, f"{name} gave {failed.returncode}:\n{failed.stderr[-3000:]}"
    assert "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], failed.stderr[-3000:]


def test_an_error_from_a_data_loader_worker_is_still_one_line():
    from torch._utils import ExceptionWrapper

    from comm.errors import UserError, one_line

    try:
        raise UserError("data.jsonl:3 (sample 2): unreadable_image: decoding cut.png failed")
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
    with pytest.raises(UserError) as raised:
        wrapped.reraise()
    assert "Traceback" in str(raised.value)
    assert one_line(raised.value) == "data.jsonl:3 (sample 2): unreadable_image: decoding cut.png failed"
    assert one_line(ValueError("first\n  second\n")) == "first; second"
