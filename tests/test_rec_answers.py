"""REC answers as the eval scores them: several boxes, boxes in the wrong order, no box."""

from __future__ import annotations

import pytest

from comm.evaluation.rec import RecSample, rec_record, score_rec

# A 200x100 image: its padded square has side 200 and the image sits 50 px down, so the pixel box
# (20, 10, 120, 60) is [0.100,0.300,0.600,0.550] on the square.
SAMPLE = RecSample(id="r1", image="img.png", expression="the red car", bbox_xyxy=(20.0, 10.0, 120.0, 60.0))


@pytest.mark.parametrize(
    ("answer", "pred_box", "iou"),
    [
        ("It is at [0.100,0.300,0.600,0.550].", [20.0, 10.0, 120.0, 60.0], 1.0),
        ("[0.100,0.300,0.600,0.550] and also [0.700,0.700,0.900,0.900]", [20.0, 10.0, 120.0, 60.0], 1.0),
        ("[0.700,0.700,0.900,0.900] then [0.100,0.300,0.600,0.550]", [140.0, 90.0, 180.0, 100.0], 0.0),
        ("[0.600,0.300,0.100,0.550]", [120.0, 10.0, 20.0, 60.0], 0.0),  # x1 < x0 scores 0
        ("I cannot see it.", None, 0.0),
    ],
)
def test_first_box_is_mapped_to_original_pixels(answer, pred_box, iou):
    record = rec_record(SAMPLE, answer, 200, 100)
    if pred_box is None:
        assert record["pred_box"] is None
    else:
        assert record["pred_box"] == pytest.approx(pred_box)
    assert record["iou"] == pytest.approx(iou)


def test_scores_of_mixed_answers():
    answers = [
        "[0.100,0.300,0.600,0.550]",  # right
        "[0.105,0.290,0.610,0.560] and [0.1,0.1,0.2,0.2]",  # right (first box, IoU ~0.93)
        "[0.600,0.300,0.100,0.550]",  # wrong order
        "no box",  # no box: wrong, and counted
    ]
    metrics = score_rec([rec_record(SAMPLE, answer, 200, 100) for answer in answers])
    assert metrics == {"accuracy": 0.5, "n": 4, "no_box": 1}
