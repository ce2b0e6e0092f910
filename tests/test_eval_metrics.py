"""Tests of the model-free evaluation: REC/POPE/caption readers and metrics, and the safe REFER unpickler."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from comm.boxes import box_iou
from comm.evaluation.caption import CaptionSample, load_caption_file
from comm.evaluation.caption_metrics import score_captions
from comm.evaluation.pope import (
    load_pope_answers,
    load_pope_questions,
    pope_answer_is_yes,
    score_pope,
    summarize_pope_splits,
)
from comm.evaluation.rec import (
    RecSample,
    load_rec_jsonl,
    load_refer,
    rescore_predictions_file,
    score_rec,
)
from comm.io import append_jsonl, read_jsonl, write_json


def write_lines(path: Path, lines: list[str]) -> Path:
    """Write raw text lines (so tests can plant blank and broken lines)."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- jsonl


def test_jsonl_round_trip_and_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "records.jsonl"
    append_jsonl(path, [{"a": 1}, {"b": "é"}])
    append_jsonl(path, [{"c": None}])
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}, {"c": None}]

    write_json(tmp_path / "out" / "metrics.json", {"x": 0.5})
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"x": 0.5}

    broken = write_lines(tmp_path / "broken.jsonl", ['{"a": 1}', "", "{not json"])
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 3: not valid JSON"):
        read_jsonl(broken)
    not_object = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl, line 1: expected a JSON object"):
        read_jsonl(not_object)


# ------------------------------------------------------------------------------------------------- REC

GT = [0.0, 0.0, 10.0, 10.0]  # area 100


def test_score_rec_hand_computed() -> None:
    records = [
        {"pred_box": [0, 0, 10, 10], "gt_box": GT},  # exact match: IoU 1 -> correct
        {"pred_box": None, "gt_box": GT},  # no box -> wrong, counted in no_box
        {"pred_box": [10, 0, 0, 10], "gt_box": GT},  # x1 < x0: IoU 0 -> wrong
        {"pred_box": [0, 0, 10, 5.1], "gt_box": GT},  # 51 / 100 = 0.51 -> correct
        {"pred_box": [0, 0, 10, 4.9], "gt_box": GT},  # 49 / 100 = 0.49 -> wrong
        {"pred_box": [0, 0, 10, 5], "gt_box": GT},  # 50 / 100 = 0.5 exactly -> correct (>= 0.5)
        {"pred_box": [5, 5, 15, 15], "gt_box": GT},  # 25 / 175 -> wrong
    ]
    # The IoUs the comments claim, worked out by hand.
    expected_ious = [1.0, 0.0, 0.0, 0.51, 0.49, 0.5, 25 / 175]
    for record, expected in zip(records, expected_ious):
        assert box_iou(record["pred_box"], record["gt_box"]) == pytest.approx(expected)

    result = score_rec(records)
    assert result == {"accuracy": pytest.approx(3 / 7), "n": 7, "no_box": 1}

    with pytest.raises(ValueError, match="no REC records"):
        score_rec([])
    with pytest.raises(ValueError, match="record #0: 'pred_box' must be 4 numbers"):
        score_rec([{"pred_box": [1, 2, 3], "gt_box": GT}])


def test_rescore_predictions_file(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    base = {"expression": "the dog", "answer": "[0.1,0.1,0.5,0.5]", "iou": 0.0}
    append_jsonl(
        path,
        [
            {**base, "id": "1_0", "pred_box": [0, 0, 10, 10], "gt_box": GT},
            {**base, "id": "1_1", "pred_box": None, "gt_box": GT},
            # The stored iou is wrong on purpose: the score must come from recomputed IoUs.
            {**base, "id": "2_0", "pred_box": [0, 0, 10, 4.9], "gt_box": GT, "iou": 0.9},
            {**base, "id": "2_1", "pred_box": [0, 0, 10, 6], "gt_box": GT},
        ],
    )
    assert rescore_predictions_file(path) == {"accuracy": 0.5, "n": 4, "no_box": 1}

    bad = write_lines(
        tmp_path / "bad.jsonl",
        [
            json.dumps({**base, "id": "1_0", "pred_box": None, "gt_box": GT}),
            "",
            json.dumps({"id": "1_1", "expression": "x", "answer": "", "pred_box": None, "iou": 0.0}),
        ],
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: missing key\(s\) gt_box"):
        rescore_predictions_file(bad)


def test_load_rec_jsonl_and_errors(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "rec.jsonl",
        [
            json.dumps({"image": "a.jpg", "expression": "left cat", "bbox": [10, 20, 30, 40]}),
            "",
            json.dumps({"id": "custom", "image": "b.jpg", "expression": "man", "bbox": [0.5, 1, 2, 3]}),
        ],
    )
    samples = load_rec_jsonl(path, image_root=tmp_path / "images")
    assert samples == [
        RecSample(
            id="1",
            image=str(tmp_path / "images" / "a.jpg"),
            expression="left cat",
            bbox_xyxy=(10.0, 20.0, 40.0, 60.0),
        ),
        RecSample(
            id="custom",
            image=str(tmp_path / "images" / "b.jpg"),
            expression="man",
            bbox_xyxy=(0.5, 1.0, 2.5, 4.0),
        ),
    ]
    assert load_rec_jsonl(path)[0].image == "a.jpg"

    cases = [
        ({"image": "a.jpg", "bbox": [0, 0, 1, 1]}, r"line 2: missing key\(s\) expression"),
        ({"image": "a.jpg", "expression": "x", "bbox": [0, 0, 1]}, r"line 2: 'bbox' must be 4 numbers"),
        ({"image": "a.jpg", "expression": "x", "bbox": [0, 0, "1", 1]}, r"line 2: 'bbox' must be 4 numbers"),
        ({"image": "a.jpg", "expression": "x", "bbox": [0, 0, 0, 5]}, r"line 2: 'bbox' width and height"),
        ({"image": "a.jpg", "expression": "x", "bbox": [0, 0, 5, -1]}, r"line 2: 'bbox' width and height"),
    ]
    good = json.dumps({"image": "a.jpg", "expression": "x", "bbox": [0, 0, 1, 1]})
    for number, (record, message) in enumerate(cases):
        bad = write_lines(tmp_path / f"bad{number}.jsonl", [good, json.dumps(record)])
        with pytest.raises(ValueError, match=rf"bad{number}\.jsonl, {message}"):
            load_rec_jsonl(bad)
    broken = write_lines(tmp_path / "broken.jsonl", [good, good[:-3]])
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_rec_jsonl(broken)
    duplicate = write_lines(tmp_path / "dup.jsonl", [good.replace("{", '{"id": 7, ', 1)] * 2)
    with pytest.raises(ValueError, match=r"dup\.jsonl, line 2: duplicate id '7'"):
        load_rec_jsonl(duplicate)


def make_refer(root: Path, refs: object) -> Path:
    """A tiny REFER layout: ``{root}/refcoco/refs(unc).p`` (protocol 2) and ``instances.json``."""
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "refs(unc).p").open("wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    instances = {
        "images": [
            {"id": 100, "file_name": "COCO_train2014_000000000100.jpg", "width": 640, "height": 480},
            {"id": 200, "file_name": "COCO_train2014_000000000200.jpg", "width": 320, "height": 240},
        ],
        "annotations": [
            {"id": 11, "image_id": 100, "bbox": [10.0, 20.0, 100.0, 50.0], "category_id": 1},
            {"id": 22, "image_id": 200, "bbox": [0, 0, 32, 24], "category_id": 18},
        ],
    }
    (folder / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    return folder / "refs(unc).p"


REFS = [
    {
        "ref_id": 5,
        "ann_id": 11,
        "image_id": 100,
        "split": "val",
        "category_id": 1,
        "file_name": "COCO_train2014_000000000100_11.jpg",
        "sentences": [
            {"sent": "man on left", "raw": "Man on left.", "sent_id": 1},
            {"sent": "guy in red", "raw": "guy in red", "sent_id": 2},
        ],
    },
    {
        "ref_id": 6,
        "ann_id": 22,
        "image_id": 200,
        "split": "testA",
        "category_id": 18,
        "file_name": "COCO_train2014_000000000200_22.jpg",
        "sentences": [{"sent": "dog", "raw": "dog", "sent_id": 3}],
    },
]


def test_load_refer_with_restricted_unpickler(tmp_path: Path) -> None:
    make_refer(tmp_path, REFS)
    image_dir = tmp_path / "train2014"
    samples = load_refer(tmp_path, "refcoco", "unc", "val", image_dir)
    image = str(image_dir / "COCO_train2014_000000000100.jpg")
    assert samples == [
        RecSample(id="5_0", image=image, expression="man on left", bbox_xyxy=(10.0, 20.0, 110.0, 70.0)),
        RecSample(id="5_1", image=image, expression="guy in red", bbox_xyxy=(10.0, 20.0, 110.0, 70.0)),
    ]
    test_a = load_refer(tmp_path, "refcoco", "unc", "testA", image_dir)
    assert [(s.id, s.expression, s.bbox_xyxy) for s in test_a] == [("6_0", "dog", (0.0, 0.0, 32.0, 24.0))]

    with pytest.raises(ValueError, match=r"unknown split 'test'.*valid splits: train, val, testA, testB"):
        load_refer(tmp_path, "refcoco", "unc", "test", image_dir)
    with pytest.raises(ValueError, match=r"unknown REFER dataset 'refclef'"):
        load_refer(tmp_path, "refclef", "unc", "val", image_dir)
    with pytest.raises(FileNotFoundError, match=r"refcocog/refs\(umd\)\.p"):
        load_refer(tmp_path, "refcocog", "umd", "val", image_dir)


class RunsShell:
    """Unpickling this calls ``os.system``, as a malicious REFER file would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned.txt"
    refs_path = make_refer(tmp_path, [{"ref_id": 1, "evil": RunsShell(f"echo pwned > {marker}")}])

    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p: refusing to load global \w+\.system"):
        load_refer(tmp_path, "refcoco", "unc", "val", tmp_path)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out

    # Control: the same file through the plain unpickler does run the command, so the check above means it.
    with refs_path.open("rb") as handle:
        pickle.load(handle)
    assert marker.read_text().strip() == "pwned"


# ------------------------------------------------------------------------------------------------ POPE


@pytest.mark.parametrize(
    ("text", "is_yes"),
    [
        ("No, there is not.", False),
        ("Yes. No other objects.", True),  # only the first sentence counts
        ("Yes, there is a dog.", True),
        ("There is not a dog.", False),
        ("no", False),
        ("I do not know", False),  # "not" is a word
        ("Yes", True),
        ("NO", True),  # the official rule is case-sensitive: only No, not, no
        ("Not at all", True),  # "Not" is not in the list
        ("Yes, no doubt", False),  # commas are removed before splitting
        ("There is nothing.", True),
        ("no.", False),
        ("", True),
    ],
)
def test_pope_answer_parsing(text: str, is_yes: bool) -> None:
    assert pope_answer_is_yes(text) is is_yes


def pope_questions(tmp_path: Path) -> Path:
    """Ten POPE questions: 1-5 labelled yes, 6-10 labelled no."""
    path = tmp_path / "coco_pope_random.json"
    append_jsonl(
        path,
        [
            {
                "question_id": i,
                "image": f"{i}.jpg",
                "text": "Is there a cat in the image?",
                "label": "yes" if i <= 5 else "no",
            }
            for i in range(1, 11)
        ],
    )
    return path


def test_pope_metrics_hand_computed(tmp_path: Path) -> None:
    questions = load_pope_questions(pope_questions(tmp_path))
    answers_path = tmp_path / "answers.jsonl"
    texts = {
        1: "Yes",  # label yes -> TP
        2: "Yes, there is.",  # TP
        3: "Yes.",  # TP
        4: "No, there is not.",  # FN
        5: "There is no cat.",  # FN
        6: "No",  # label no -> TN
        7: "I do not see one.",  # TN
        8: "Yes, there is a cat.",  # FP
        9: "Not sure",  # FP ("Not" is not a no-word)
        10: "Yes",  # FP
    }
    append_jsonl(answers_path, [{"question_id": qid, "prompt": "p", "text": t} for qid, t in texts.items()])
    answers = load_pope_answers(answers_path)
    result = score_pope(answers, questions)
    # TP 3, FN 2, TN 2, FP 3: accuracy 5/10, precision 3/6, recall 3/5, f1 2*.5*.6/1.1, yes 6/10.
    assert (result["tp"], result["fn"], result["tn"], result["fp"]) == (3, 2, 2, 3)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(0.6)
    assert result["f1"] == pytest.approx(0.6 / 1.1)
    assert result["yes_ratio"] == pytest.approx(0.6)
    assert result["n"] == 10

    # Always "no": no predicted positives, so precision, recall and f1 are 0.0 rather than a division error.
    all_no = score_pope({i: "No." for i in range(1, 11)}, questions)
    assert (all_no["precision"], all_no["recall"], all_no["f1"]) == (0.0, 0.0, 0.0)
    assert all_no["accuracy"] == pytest.approx(0.5)
    assert all_no["yes_ratio"] == 0.0

    # String ids in the answers match integer ids in the questions.
    assert score_pope({str(i): t for i, t in texts.items()}, questions)["f1"] == pytest.approx(0.6 / 1.1)


def test_pope_id_errors(tmp_path: Path) -> None:
    questions = load_pope_questions(pope_questions(tmp_path))
    answers = {i: "Yes" for i in range(1, 11) if i not in (3, 8)}
    with pytest.raises(ValueError, match=r"2 id\(s\) missing from the answers \(first: '3'\)"):
        score_pope(answers, questions)
    answers.update({3: "Yes", 8: "No", 99: "No", 100: "Yes"})
    with pytest.raises(ValueError, match=r"2 unknown id\(s\) in the answers \(first: '99'\)"):
        score_pope(answers, questions)

    duplicate = write_lines(
        tmp_path / "dup.jsonl",
        [json.dumps({"question_id": 1, "image": "a.jpg", "text": "q", "label": "yes"})] * 2,
    )
    with pytest.raises(ValueError, match=r"dup\.jsonl, line 2: duplicate question_id 1 \(first on line 1\)"):
        load_pope_questions(duplicate)
    bad_label = write_lines(
        tmp_path / "label.jsonl",
        [json.dumps({"question_id": 1, "image": "a.jpg", "text": "q", "label": "Yes"})],
    )
    with pytest.raises(ValueError, match=r"label\.jsonl, line 1: label must be 'yes' or 'no'"):
        load_pope_questions(bad_label)
    no_text = write_lines(tmp_path / "answers.jsonl", [json.dumps({"question_id": 1, "answer": "yes"})])
    with pytest.raises(ValueError, match=r"answers\.jsonl, line 1: missing key\(s\) text"):
        load_pope_answers(no_text)


def test_summarize_pope_splits() -> None:
    summary = summarize_pope_splits(
        {
            "random": {"accuracy": 0.9, "f1": 0.7, "n": 2910},
            "popular": {"accuracy": 0.8, "f1": 0.5, "n": 3000},
        }
    )
    assert summary["mean_f1"] == pytest.approx(0.6)
    assert summary["mean_accuracy"] == pytest.approx(0.85)
    assert summary["n"] == {"random": 2910, "popular": 3000}
    assert summary["splits"]["random"]["f1"] == 0.7
    with pytest.raises(ValueError, match="lack f1"):
        summarize_pope_splits({"random": {"accuracy": 0.9, "n": 3000}})


# --------------------------------------------------------------------------------------------- captions


def test_karpathy_and_coco_caption_readers(tmp_path: Path) -> None:
    coco = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_1.jpg",
                "split": "test",
                "imgid": 0,
                "cocoid": 1,
                "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}, {"raw": "A kitten sits."}],
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_2.jpg",
                "split": "train",
                "imgid": 1,
                "cocoid": 2,
                "sentences": [{"raw": "A dog."}],
            },
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_3.jpg",
                "split": "restval",
                "imgid": 2,
                "cocoid": 3,
                "sentences": [{"raw": "A bird."}],
            },
        ],
        "dataset": "coco",
    }
    write_json(tmp_path / "dataset_coco.json", coco)
    samples = load_caption_file(tmp_path / "dataset_coco.json", "test", image_root=tmp_path / "coco")
    assert samples == [
        CaptionSample("1", str(tmp_path / "coco" / "val2014" / "COCO_val2014_1.jpg"), ["A cat.", "A kitten sits."])
    ]
    assert [s.id for s in load_caption_file(tmp_path / "dataset_coco.json", "restval")] == ["3"]
    with pytest.raises(ValueError, match=r"no images in split 'val' \(splits present: restval, test, train\)"):
        load_caption_file(tmp_path / "dataset_coco.json", "val")
    with pytest.raises(ValueError, match=r"unknown Karpathy split 'testing'"):
        load_caption_file(tmp_path / "dataset_coco.json", "testing")

    flickr = {
        "images": [
            {"filename": "1000.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": "Two men."}]},
            {"filename": "1001.jpg", "split": "val", "imgid": 8, "sentences": [{"raw": "A boat."}]},
        ],
        "dataset": "flickr30k",
    }
    write_json(tmp_path / "dataset_flickr30k.json", flickr)
    assert load_caption_file(tmp_path / "dataset_flickr30k.json", "test", tmp_path / "f30k") == [
        CaptionSample("7", str(tmp_path / "f30k" / "1000.jpg"), ["Two men."])
    ]

    coco_captions = {
        "images": [{"id": 42, "file_name": "a.jpg"}, {"id": 43, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "A red bus."},
            {"image_id": 42, "id": 2, "caption": "A bus on a street."},
        ],
    }
    write_json(tmp_path / "captions_val2014.json", coco_captions)
    assert load_caption_file(tmp_path / "captions_val2014.json", image_root=tmp_path / "val2014") == [
        CaptionSample("42", str(tmp_path / "val2014" / "a.jpg"), ["A red bus.", "A bus on a street."])
    ]
    write_json(tmp_path / "other.json", {"items": []})
    with pytest.raises(ValueError, match=r"other\.json: neither a Karpathy file"):
        load_caption_file(tmp_path / "other.json")


def test_score_captions() -> None:
    references = {
        1: ["A man riding a horse on a beach.", "A person rides a horse near the sea."],
        2: ["Two dogs play with a red ball in the grass.", "Dogs playing in a field."],
        3: ["A plate of food with broccoli and rice.", "A dinner plate with vegetables."],
    }
    exact = {image_id: captions[0] for image_id, captions in references.items()}
    nonsense = {1: "purple monkey dishwasher", 2: "quantum tax forms", 3: "seven blue violins"}

    good = score_captions(exact, references)
    bad = score_captions(nonsense, references)
    assert set(good) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert good["BLEU-4"] > 0.9
    assert good["METEOR"] > 0.9 and good["ROUGE-L"] > 0.9
    for metric in good:
        assert bad[metric] < good[metric], metric

    with pytest.raises(ValueError, match=r"1 id\(s\) missing from the predictions \(first: '3'\)"):
        score_captions({1: "a", 2: "b"}, references)
    with pytest.raises(ValueError, match=r"1 unknown id\(s\) in the predictions \(first: '4'\)"):
        score_captions({**exact, 4: "extra"}, references)


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    """The temporary file behind an atomic write is 0600; the result must carry the usual umask-based mode."""
    from comm.io import write_json, write_jsonl

    write_json(tmp_path / "a.json", {"x": 1})
    write_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
    (tmp_path / "plain.txt").write_text("x")
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for name in ("a.json", "b.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected
