"""The demo's REC error analysis: misses sorted by cause, accuracy by objects, size and expression kind."""

from __future__ import annotations

from comm.demo.analysis import classify_miss, expression_kind, format_error_analysis, rec_error_analysis
from comm.demo.scenes import Scene, WorldObject


def test_expression_kinds():
    assert expression_kind("the circle") == "1 attribute"
    assert expression_kind("the small red circle") == "3 attributes"
    assert expression_kind("the circle left of the blue square") == "relational"


def test_a_miss_is_sorted_by_what_the_box_covers():
    target, other = [0, 0, 10, 10], [30, 30, 40, 40]
    assert classify_miss([29, 29, 41, 41], target, [other]) == "another object"
    assert classify_miss([0, 0, 30, 30], target, [other]) == "right object, loose box"
    assert classify_miss([50, 0, 60, 10], target, [other]) == "empty space"
    assert classify_miss(None, target, [other]) == "no box"


def test_the_analysis_counts_each_record_once():
    big = WorldObject("square", "red", "large", 24, (0, 0, 24, 24))
    small = WorldObject("circle", "blue", "small", 12, (40, 40, 52, 52))
    scenes = {
        "test_00000": Scene("images/test_00000.png", "test", 64, (big, small)),
        "test_00001": Scene("images/test_00001.png", "test", 64, (small,)),
    }
    records = [
        {"id": "test_00000_rec_000000", "expression": "the square", "pred_box": [0, 0, 24, 24],
         "gt_box": [0, 0, 24, 24]},
        {"id": "test_00000_rec_000001", "expression": "the blue circle", "pred_box": [1, 1, 23, 23],
         "gt_box": [40, 40, 52, 52]},
        {"id": "test_00001_rec_000002", "expression": "the circle", "pred_box": None, "gt_box": [40, 40, 52, 52]},
    ]  # fmt: skip
    analysis = rec_error_analysis(records, scenes)
    assert analysis["by_objects"] == {"1 object": {"accuracy": 0.0, "n": 1}, "2 objects": {"accuracy": 0.5, "n": 2}}
    assert analysis["by_object_size"] == {
        "small (<16 px)": {"accuracy": 0.0, "n": 2},
        "large (>=22 px)": {"accuracy": 1.0, "n": 1},
    }
    assert analysis["by_expression"]["1 attribute"] == {"accuracy": 0.5, "n": 2}
    assert analysis["iou_histogram"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert analysis["misses"] == {"another object": 1, "right object, loose box": 0, "empty space": 0, "no box": 1}
    lines = format_error_analysis(analysis)
    assert lines[0] == "REC by objects in the image: 1 object 0.00 (1), 2 objects 0.50 (2)"
    assert lines[-1] == "REC misses (2): another object 1, right object, loose box 0, empty space 0, no box 1"
