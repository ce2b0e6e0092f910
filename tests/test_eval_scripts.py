"""The evaluation scripts end to end on the tiny model: REC, POPE, captions; re-scoring, determinism, resume, ranks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import single_torch_thread, write_huge_png
from PIL import Image

from comm import CommForConditionalGeneration, CommProcessor
from comm.boxes import format_box, normalize_box
from comm.conversation import VICUNA_V1, with_image
from comm.evaluation import yes_no
from comm.evaluation.pope import ANSWER_MODES, PopeQuestion, PopeTask, load_pope_questions
from comm.evaluation.rec import PREDICTION_KEYS, RecTask, load_refer
from comm.evaluation.records import METRICS_FILE, PREDICTIONS_FILE
from comm.evaluation.resume import part_path
from comm.evaluation.runner import answer_batch, predict_all, run_task
from comm.evaluation.tables import format_metrics
from comm.evaluation.task import EvaluationTask
from comm.generation import generate_answers
from comm.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = "6"
IMAGE_SIZES = {"a.png": (80, 60), "b.png": (50, 90), "c.png": (64, 64)}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_script_{name}", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_rec = _load_script("eval_rec")
eval_pope = _load_script("eval_pope")
eval_caption = _load_script("eval_caption")


def image_file(folder: Path) -> str:
    """A small PNG in ``folder``: every item of `UpperCaseTask` asks about it."""
    path = folder / "item.png"
    Image.new("RGB", (8, 8)).save(path)
    return str(path)


@dataclasses.dataclass(frozen=True)
class UpperCaseTask(EvaluationTask[str]):
    """No model: an item's record holds it upper-cased under ``key``; each batch is logged in ``calls``."""

    items: list[str]
    image: str
    key: str
    calls: list[list[str]] = dataclasses.field(default_factory=list)
    name: ClassVar[str] = "upper case"
    item_name: ClassVar[str] = "item"
    max_new_tokens: ClassVar[int] = 1

    def item_id(self, item):
        return item

    def image_path(self, item):
        return self.image

    def prompt(self, item):
        return item

    def parse(self, item, answer, image_size, processor):
        return {"id": item, self.key: answer}

    def unanswered_record(self, item):
        return {"id": item, self.key: ""}

    def score(self, records):
        return {"n": len(records)}

    def answer(self, model, processor, items, images, **generate_kwargs):
        self.calls.append(list(items))
        return [self.parse(item, item.upper(), image.size, processor) for item, image in zip(items, images)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the tiny model's ops are too small to share, and a busy 2-core machine stalls two threads."""
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three PNGs, a REFER-layout refcoco (protocol-2 pickle + instances.json), two POPE splits, a Karpathy file."""
    root = tmp_path_factory.mktemp("eval_data")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height) in IMAGE_SIZES.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / name)

    refcoco = root / "refer" / "refcoco"
    refcoco.mkdir(parents=True)
    instances = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 80, "height": 60},
            {"id": 2, "file_name": "b.png", "width": 50, "height": 90},
            {"id": 3, "file_name": "c.png", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [10, 5, 30, 20]},
            {"id": 11, "image_id": 2, "bbox": [5, 40, 20, 30]},
            {"id": 12, "image_id": 1, "bbox": [40, 30, 30, 25]},
            {"id": 13, "image_id": 3, "bbox": [0, 0, 32, 64]},
        ],
    }
    refs = [
        {
            "ref_id": 100,
            "ann_id": 10,
            "image_id": 1,
            "split": "val",
            "sentences": [{"sent": "left thing"}, {"sent": "top"}],
        },
        {"ref_id": 101, "ann_id": 11, "image_id": 2, "split": "val", "sentences": [{"sent": "bottom object"}]},
        {"ref_id": 102, "ann_id": 12, "image_id": 1, "split": "val", "sentences": [{"sent": "right one"}]},
        {
            "ref_id": 103,
            "ann_id": 13,
            "image_id": 3,
            "split": "val",
            "sentences": [{"sent": "left half"}, {"sent": "the half"}],
        },
        {"ref_id": 104, "ann_id": 13, "image_id": 3, "split": "testA", "sentences": [{"sent": "not in val"}]},
    ]
    (refcoco / "instances.json").write_text(json.dumps(instances))
    with (refcoco / "refs(unc).p").open("wb") as handle:
        pickle.dump(refs, handle, protocol=2)

    words = ["dog", "cat", "car", "person", "chair", "cup"]
    questions = [
        {
            "question_id": i,
            "image": list(IMAGE_SIZES)[i % 3],
            "text": f"Is there a {word} in the image?",
            "label": "yes" if i % 2 else "no",
        }
        for i, word in enumerate(words)
    ]
    (root / "pope_random.json").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (root / "pope_popular.json").write_text("".join(json.dumps(q) + "\n" for q in questions[:4]))

    karpathy = {
        "images": [
            {
                "filename": name,
                "split": "test",
                "cocoid": 500 + i,
                "sentences": [{"raw": "A picture of coloured noise."}, {"raw": "Random pixels in a square."}],
            }
            for i, name in enumerate(IMAGE_SIZES)
        ]
        + [{"filename": "a.png", "split": "train", "cocoid": 9, "sentences": [{"raw": "not in the test split"}]}]
    }
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    return root


def _rec_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--refer-root", str(data / "refer"), "--dataset", "refcoco", "--split", "val",
        "--image-dir", str(data / "images"), "--output-dir", str(out), "--batch-size", "2",
        "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def rec_run(data, tiny_model_dir, tmp_path_factory):
    """One single-process REC run with the tiny model (and --visualize 2): its output folder."""
    out = tmp_path_factory.mktemp("rec_single")
    assert eval_rec.main(_rec_args(data, tiny_model_dir, out, "--visualize", "2")) == 0
    return out


def test_rec_run_writes_predictions_metrics_and_grid(rec_run, data):
    lines = read_jsonl(rec_run / "predictions.jsonl")
    samples = load_refer(data / "refer", "refcoco", None, "val", data / "images")
    assert (
        [line["id"] for line in lines]
        == [s.id for s in samples]
        == ["100_0", "100_1", "101_0", "102_0", "103_0", "103_1"]
    )
    for line, sample in zip(lines, samples):
        assert tuple(line) == PREDICTION_KEYS
        assert line["expression"] == sample.expression
        assert line["gt_box"] == list(sample.bbox_xyxy)
        assert isinstance(line["answer"], str)
        assert line["pred_box"] is None or len(line["pred_box"]) == 4
    metrics = json.loads((rec_run / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "n", "no_box"} and metrics["n"] == 6
    assert metrics["no_box"] == sum(line["pred_box"] is None for line in lines)
    with Image.open(rec_run / "visualization.png") as grid:
        assert grid.format == "PNG" and grid.width == 2 * 256  # two cells side by side
    assert not list(rec_run.glob("*.rank*.jsonl"))


def test_rec_score_reprints_the_run_metrics(rec_run, data, tiny_model_dir, tmp_path, capsys):
    code = eval_rec.main(_rec_args(data, tiny_model_dir, rec_run))  # everything done: only re-scored and printed
    printed = capsys.readouterr().out
    assert code == 0
    metrics = json.loads((rec_run / "metrics.json").read_text())
    assert format_metrics(metrics, "REC refcoco val") in printed
    assert eval_rec.main(["--score", str(rec_run / "predictions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out) == metrics


def test_rec_score_bad_file_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "predictions.jsonl"
    bad.write_text(json.dumps({"id": "1", "answer": "x", "pred_box": None, "gt_box": [0, 0, 1, 1]}) + "\n")
    assert eval_rec.main(["--score", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 1" in err and "Traceback" not in err


def test_rec_boxes_mapped_to_pixels_and_scored(data, tmp_path, monkeypatch):
    samples = load_refer(data / "refer", "refcoco", None, "val", data / "images")
    answers = {}
    for index, sample in enumerate(samples):
        width, height = IMAGE_SIZES[Path(sample.image).name]
        box = list(sample.bbox_xyxy)
        if index == 2:
            box = [box[0], box[1], box[0] + 2, box[1] + 2]  # a tiny box: IoU < 0.5
        answers[sample.expression] = (
            "nothing here" if index == 4 else f"It is at {format_box(normalize_box(box, width, height))}."
        )

    def fake_generate(model, processor, images, questions, batch_size, **kwargs):
        assert len(images) == len(questions) <= 4
        return [answers[question.split("point out ")[1].split(" in the image")[0]] for question in questions]

    monkeypatch.setattr("comm.evaluation.task.generate_answers", fake_generate)
    processor = types.SimpleNamespace(pad_to_square=True, template=VICUNA_V1)  # what the REC task reads of it
    metrics = run_task(
        RecTask(samples), None, processor, tmp_path / PREDICTIONS_FILE, tmp_path / METRICS_FILE, batch_size=4,
        progress=False,
    )  # fmt: skip
    assert metrics == {"accuracy": 4 / 6, "n": 6, "no_box": 1}
    lines = read_jsonl(tmp_path / "predictions.jsonl")
    assert lines[4]["pred_box"] is None and lines[4]["iou"] == 0.0
    for index in (0, 1, 3, 5):  # boxes survive the 3-decimal text round trip on the padded square
        np.testing.assert_allclose(lines[index]["pred_box"], lines[index]["gt_box"], atol=0.06)
        assert lines[index]["iou"] > 0.98
    assert 0 < lines[2]["iou"] < 0.5


def test_rec_deterministic_and_resumes_without_regenerating(
    rec_run, data, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    reference = (rec_run / "predictions.jsonl").read_text()
    again = tmp_path / "again"
    assert eval_rec.main(_rec_args(data, tiny_model_dir, again)) == 0
    assert (again / "predictions.jsonl").read_text() == reference  # same seed, same predictions
    printed = capsys.readouterr().out
    assert eval_rec.main(["--score", str(again / "predictions.jsonl")]) == 0
    assert format_metrics(json.loads(capsys.readouterr().out), "REC refcoco val") in printed

    generated: list[str] = []

    def counting_generate(model, processor, images, questions, **kwargs):
        generated.extend(questions)
        return generate_answers(model, processor, images, questions, **kwargs)

    monkeypatch.setattr("comm.evaluation.task.generate_answers", counting_generate)
    lines = reference.splitlines(keepends=True)
    k = 3
    # Interrupted: k lines written, then a line cut short mid-write.
    (again / "predictions.jsonl").write_text("".join(lines[:k]) + lines[k][:20])
    (again / "metrics.json").unlink()
    assert eval_rec.main(_rec_args(data, tiny_model_dir, again)) == 0
    assert len(generated) == len(lines) - k  # the k finished lines were not regenerated, the cut one was
    assert not any("left thing" in q or "bottom object" in q for q in generated)
    assert (again / "predictions.jsonl").read_text() == reference
    assert (again / "metrics.json").read_text() == (rec_run / "metrics.json").read_text()


def test_resume_merges_part_files_left_by_ranks(tmp_path):
    items = [f"item{i}" for i in range(7)]
    out = tmp_path / "predictions.jsonl"
    # A 2-rank run stopped early: rank 0 wrote item0, item2; rank 1 wrote item1 and half a line.
    part_path(out, 0).write_text("".join(json.dumps({"id": i, "value": i.upper()}) + "\n" for i in ("item0", "item2")))
    part_path(out, 1).write_text(json.dumps({"id": "item1", "value": "ITEM1"}) + "\n" + '{"id": "item3", "va')
    task = UpperCaseTask(items, image_file(tmp_path), "value")

    records = predict_all(task, None, None, out, batch_size=2, progress=False)
    assert task.calls == [["item3", "item4"], ["item5", "item6"]]
    assert records == [{"id": i, "value": i.upper()} for i in items]
    assert read_jsonl(out) == records
    assert not list(tmp_path.glob("*.rank*.jsonl"))

    out.write_text(json.dumps({"id": "other", "value": "X"}) + "\n")
    with pytest.raises(ValueError, match="not in the data being evaluated"):
        predict_all(task, None, None, out, progress=False)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("jsonl_not_utf8", "rec.jsonl, line 2: not UTF-8 text"),
        ("refs_sentences_not_a_list", "refs(unc).p: ref #0: 'sentences' must be a list"),
        ("refs_ann_id_a_list", "refs(unc).p: ref #0: ref_id, ann_id and image_id must be numbers or strings"),
        ("instances_not_utf8", "instances.json: not UTF-8 text"),
        ("karpathy_sentences_not_a_list", "karpathy.json: images[0]: 'sentences' must be a list"),
        ("pope_answer_id_an_object", "answers.jsonl, line 1: question_id must be a number or a string"),
    ],
)
def test_malformed_data_is_one_error_line_naming_the_file(case, expected, tiny_model_dir, tmp_path, capsys):
    record = {"id": "1", "expression": "x", "answer": "", "pred_box": None, "gt_box": [0, 0, 1, 1], "iou": 0.0}
    (tmp_path / "rec.jsonl").write_bytes(json.dumps(record).encode() + b"\n" + b'{"id": "\xff"}\n')
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent": "it"}]}]
    refs[0].update(
        {"refs_sentences_not_a_list": {"sentences": 5}, "refs_ann_id_a_list": {"ann_id": [10]}}.get(case, {})
    )
    folder = tmp_path / "refer" / "refcoco"
    folder.mkdir(parents=True)
    with (folder / "refs(unc).p").open("wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    instances = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [0, 0, 1, 1]}],
    }
    (folder / "instances.json").write_bytes(b"\xff" if case == "instances_not_utf8" else json.dumps(instances).encode())
    image = {"filename": "a.png", "split": "test", "cocoid": 1, "sentences": 5}
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": [image]}))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"id": "1", "caption": "x"}) + "\n")
    (tmp_path / "questions.jsonl").write_text(
        json.dumps({"question_id": 1, "image": "a.png", "text": "x", "label": "no"}) + "\n"
    )
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": {"id": 1}, "text": "No"}) + "\n")
    refer = ["--refer-root", str(tmp_path / "refer"), "--dataset", "refcoco", "--split", "val", "--image-dir",
             str(tmp_path), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out")]  # fmt: skip
    script, argv = {
        "jsonl_not_utf8": (eval_rec, ["--score", str(tmp_path / "rec.jsonl")]),
        "refs_sentences_not_a_list": (eval_rec, refer),
        "refs_ann_id_a_list": (eval_rec, refer),
        "instances_not_utf8": (eval_rec, refer),
        "karpathy_sentences_not_a_list": (
            eval_caption,
            ["--annotations", str(tmp_path / "karpathy.json"), "--score", str(tmp_path / "captions.jsonl")],
        ),
        "pope_answer_id_an_object": (
            eval_pope,
            ["--questions", str(tmp_path / "questions.jsonl"), "--score", str(tmp_path / "answers.jsonl")],
        ),
    }[case]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def test_unusable_images_are_unanswerable_and_the_run_goes_on(data, tiny_model_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(data / "images" / name, images / name)
    write_huge_png(images / "bomb.png")  # PIL refuses it itself
    write_huge_png(images / "big.png", 10_000, 10_000)  # PIL only warns
    write_huge_png(images / "cut.png", 20, 20)  # a fine header, no pixel data
    names = ["a.png", "bomb.png", "c.png", "big.png", "cut.png"]
    unusable = {"bomb.png": "image_too_large", "big.png": "image_too_large", "cut.png": "unreadable_image"}
    rec = [
        {"id": f"r{i}", "image": name, "expression": "the thing", "bbox": [1, 1, 10, 10]}
        for i, name in enumerate(names)
    ]
    (tmp_path / "rec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    out = tmp_path / "rec"
    args = ["--model", str(tiny_model_dir), "--jsonl", str(tmp_path / "rec.jsonl"), "--image-root", str(images),
            "--output-dir", str(out), "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress",
            "--visualize", "5"]  # fmt: skip
    assert eval_rec.main(args) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(name in err for name in unusable)
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in records] == [r["id"] for r in rec]
    for record, name in zip(records, names):
        if name in unusable:
            assert record["unanswerable"].startswith(unusable[name]) and record["pred_box"] is None
        else:
            assert "unanswerable" not in record
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["unanswerable"] == 3 and metrics["accuracy"] <= 2 / 5
    assert (out / "visualization.png").is_file()
    assert eval_rec.main(["--score", str(out / "predictions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out) == metrics

    questions = [
        {"question_id": i, "image": name, "text": "Is there a dog?", "label": "yes"} for i, name in enumerate(names)
    ]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    pope = ["--model", str(tiny_model_dir), "--questions", str(tmp_path / "pope.jsonl"), "--image-dir", str(images),
            "--output-dir", str(tmp_path / "pope"), "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress"]  # fmt: skip
    assert eval_pope.main(pope) == 0
    metrics = json.loads((tmp_path / "pope" / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["unanswerable"] == 3 and metrics["fn"] >= 3  # "yes" questions left unanswered
    score = ["--score", str(tmp_path / "pope" / "answers_pope.jsonl"), "--questions", str(tmp_path / "pope.jsonl")]
    capsys.readouterr()
    assert eval_pope.main(score) == 0
    assert json.loads(capsys.readouterr().out) == metrics

    karpathy = {"images": [{"filename": name, "split": "test", "cocoid": i, "sentences": [{"raw": "Noise."}]}
                           for i, name in enumerate(names)]}  # fmt: skip
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    caption = ["--model", str(tiny_model_dir), "--annotations", str(tmp_path / "karpathy.json"), "--image-root",
               str(images), "--output-dir", str(tmp_path / "caption"), "--max-new-tokens", MAX_NEW_TOKENS,
               "--no-progress", "--tokenizer", "python"]  # fmt: skip
    assert eval_caption.main(caption) == 0
    metrics = json.loads((tmp_path / "caption" / "metrics.json").read_text())
    assert metrics["unanswerable"] == 3
    captions = {r["image"].split("/")[-1]: r for r in read_jsonl(tmp_path / "caption" / "predictions.jsonl")}
    assert all(captions[name]["caption"] == "" and captions[name]["unanswerable"] for name in unusable)


def test_resume_drops_a_last_line_cut_inside_a_utf8_character(tmp_path, capsys):
    items = ["café", "crème", "brûlée", "thé"]
    out = tmp_path / "predictions.jsonl"
    done = "".join(json.dumps({"id": i, "answer": i.upper()}, ensure_ascii=False) + "\n" for i in items[:2])
    torn = json.dumps({"id": items[2], "answer": items[2].upper()}, ensure_ascii=False).encode()
    cut = torn.index("Û".encode()) + 1  # between the two bytes of "Û"
    out.write_bytes(done.encode() + torn[:cut])
    task = UpperCaseTask(items, image_file(tmp_path), "answer")

    records = predict_all(task, None, None, out, batch_size=4, progress=False)
    assert task.calls == [items[2:]]  # the two whole lines were kept, the cut one predicted again
    assert records == [{"id": i, "answer": i.upper()} for i in items] and read_jsonl(out) == records
    err = capsys.readouterr().err
    assert f"{out}: dropped its last line" in err and "kept 2 record(s)" in err

    # a bad byte on a line that ended is not an interruption: an error naming the file and the line
    out.write_bytes(done.encode() + b'{"id": "th\xc3"}\n')
    with pytest.raises(ValueError, match=rf"{out}, line 3: not UTF-8"):
        predict_all(task, None, None, out, progress=False)


@pytest.mark.slow
def test_rec_torchrun_two_processes_match_single_process(rec_run, data, tiny_model_dir, tmp_path):
    out = tmp_path / "two_ranks"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "eval" / "eval_rec.py"), *_rec_args(data, tiny_model_dir, out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "predictions.jsonl").read_text() == (rec_run / "predictions.jsonl").read_text()
    assert json.loads((out / "metrics.json").read_text()) == json.loads((rec_run / "metrics.json").read_text())
    assert not list(out.glob("*.rank*.jsonl"))
    assert result.stdout.count("REC refcoco val") == 1  # only rank 0 prints


def _pope_args(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--questions", str(data / "pope_random.json"), str(data / "pope_popular.json"),
        "--image-dir", str(data / "images"), "--output-dir", str(out), "--batch-size", "4",
        "--max-new-tokens", MAX_NEW_TOKENS, "--no-progress", *extra,
    ]  # fmt: skip


def test_pope_run_and_rescore(data, tiny_model_dir, tmp_path, capsys):
    assert eval_pope.main(_pope_args(data, tiny_model_dir, tmp_path)) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert format_metrics(metrics, "POPE (generate)") in printed
    assert metrics["n"] == {"pope_random": 6, "pope_popular": 4}
    assert metrics["mean_f1"] == pytest.approx((metrics["splits"]["pope_random"]["f1"] +
                                                metrics["splits"]["pope_popular"]["f1"]) / 2)  # fmt: skip
    answers = read_jsonl(tmp_path / "answers_pope_random.jsonl")
    assert [a["question_id"] for a in answers] == list(range(6))
    assert all({"question_id", "prompt", "text", "model_id"} <= set(a) for a in answers)
    assert answers[0]["prompt"] == "Is there a dog in the image?" and answers[0]["model_id"] == tiny_model_dir.name

    one = ["--score", str(tmp_path / "answers_pope_random.jsonl"), "--questions", str(data / "pope_random.json")]
    assert eval_pope.main(one) == 0
    assert json.loads(capsys.readouterr().out) == metrics["splits"]["pope_random"]
    both = ["--score", str(tmp_path / "answers_pope_random.jsonl"), str(tmp_path / "answers_pope_popular.jsonl"),
            "--questions", str(data / "pope_random.json"), str(data / "pope_popular.json")]  # fmt: skip
    assert eval_pope.main(both) == 0
    assert json.loads(capsys.readouterr().out) == metrics

    lines = (tmp_path / "answers_pope_random.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "incomplete.jsonl").write_text("".join(lines[:2] + lines[3:]))
    code = eval_pope.main(
        ["--score", str(tmp_path / "incomplete.jsonl"), "--questions", str(data / "pope_random.json")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "1 id(s) missing" in err and "'2'" in err


def test_answer_tokens_are_the_sentencepiece_word_pieces(tiny_model_dir):
    tokenizer = CommProcessor.from_pretrained(tiny_model_dir).tokenizer
    yes_id, no_id = yes_no.yes_no_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens([yes_id, no_id]) == ["\u2581Yes", "\u2581No"]  # "▁Yes", not "Yes" or "▁"


def test_pope_logits_mode_matches_generation_restricted_to_yes_no(data, tiny_model_dir, tmp_path):
    from transformers import LogitsProcessor, LogitsProcessorList

    # A random tiny model hardly ever writes "Yes" or "No", and its yes/no logit gap barely moves with the input.
    # Give the two answer rows of the output layer weights +-d with d orthogonal to the mean last hidden state of
    # these prompts, so the choice follows how each input differs from the others.
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = CommProcessor.from_pretrained(tiny_model_dir)
    yes_id, no_id = yes_no.yes_no_token_ids(processor.tokenizer)
    questions = load_pope_questions(data / "pope_random.json", data / "images")
    images = [q.image for q in questions]
    prompts = [with_image(q.text) for q in questions]
    captured = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0][:, -1].detach()))
    yes_no.yes_no_logits(model, processor, images, prompts, (yes_id, no_id))
    hook.remove()
    mean = captured[0].mean(0)
    torch.manual_seed(3)
    direction = torch.randn_like(mean)
    direction -= (direction @ mean) / (mean @ mean) * mean
    with torch.no_grad():
        head.weight[yes_id] = direction
        head.weight[no_id] = -direction
    tweaked = tmp_path / "model"
    model.save_pretrained(tweaked)
    processor.save_pretrained(tweaked)

    args = _pope_args(data, tweaked, tmp_path / "out", "--answer-mode", "logits")
    args.remove(str(data / "pope_popular.json"))  # one split is enough here
    assert eval_pope.main(args) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 6
    answers = read_jsonl(tmp_path / "out" / "answers_pope_random.jsonl")
    texts = [a["text"] for a in answers]
    assert set(texts) == {"Yes", "No"}  # both answers occur, so the comparison below can fail

    class OnlyYesNo(LogitsProcessor):
        def __call__(self, input_ids, scores):
            allowed = torch.full_like(scores, float("-inf"))
            allowed[:, [yes_id, no_id]] = 0
            return scores + allowed

    restricted = generate_answers(model, processor, images, prompts, batch_size=4, max_new_tokens=1,
                                  logits_processor=LogitsProcessorList([OnlyYesNo()]))  # fmt: skip
    assert texts == restricted
    for answer, image, prompt in zip(answers, images, prompts):  # batched, left-padded logits = one at a time
        ((yes, no),) = yes_no.yes_no_logits(model, processor, [image], [prompt], (yes_id, no_id))
        assert answer["metadata"]["yes_logit"] == pytest.approx(yes, abs=1e-4)
        assert answer["metadata"]["no_logit"] == pytest.approx(no, abs=1e-4)


@pytest.mark.skipif(shutil.which("java") is None, reason="the caption metrics need Java")
def test_caption_run_and_rescore(data, tiny_model_dir, tmp_path, capsys):
    args = [
        "--model",
        str(tiny_model_dir),
        "--annotations",
        str(data / "karpathy.json"),
        "--image-root",
        str(data / "images"),
        "--output-dir",
        str(tmp_path),
        "--max-new-tokens",
        MAX_NEW_TOKENS,
        "--no-progress",
    ]
    assert eval_caption.main(args) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert format_metrics(metrics, "captions karpathy.json test") in printed
    lines = read_jsonl(tmp_path / "predictions.jsonl")
    assert [line["id"] for line in lines] == ["500", "501", "502"]
    assert all(set(line) == {"id", "image", "caption"} and isinstance(line["caption"], str) for line in lines)
    assert eval_caption.main(["--score", str(tmp_path / "predictions.jsonl"), "--annotations",
                              str(data / "karpathy.json")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == metrics


def test_every_evaluation_renders_prompts_with_the_processor_template(data, tiny_model_dir):
    from unittest import mock

    from comm.conversation import CAPTION_PROMPT, ConversationTemplate, rec_prompt
    from comm.evaluation.caption import CaptionSample, CaptionTask
    from comm.evaluation.rec import RecSample

    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    template = ConversationTemplate(system="", user_role="Human", assistant_role="Bot")
    processor = CommProcessor.from_pretrained(tiny_model_dir, template=template)
    image = str(data / "images" / "a.png")
    question = PopeQuestion(1, str(data / "images" / "a.png"), "Is there a cat?", "no")
    rec_sample, caption_sample = RecSample("r", image, "the cat", (0, 0, 9, 9)), CaptionSample("c", image, ["A cat."])
    rendered = []
    original = CommProcessor.__call__

    def spy(self, *args, text=None, **kwargs):
        rendered.extend([text] if isinstance(text, str) else text)
        return original(self, *args, text=text, **kwargs)

    with mock.patch.object(CommProcessor, "__call__", spy):
        answer_batch(RecTask([rec_sample]), model, processor, [rec_sample], max_new_tokens=1)
        answer_batch(CaptionTask([caption_sample]), model, processor, [caption_sample], max_new_tokens=1)
        for mode in ANSWER_MODES:
            task = PopeTask([question], answer_mode=mode, model_id="m")
            answer_batch(task, model, processor, [question], max_new_tokens=1)
    questions = [rec_prompt("the cat"), CAPTION_PROMPT, with_image("Is there a cat?"), with_image("Is there a cat?")]
    assert rendered == [template.prompt(q) for q in questions]
    assert all(text.startswith("Human: ") for text in rendered)
