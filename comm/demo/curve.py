"""The demo's learning curve: held-out REC and POPE accuracy against training samples seen, with trivial baselines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from comm.evaluation.pope import PopeQuestion, PopeTask
from comm.evaluation.rec import RecSample, RecTask, score_rec
from comm.evaluation.runner import answer_batch

if TYPE_CHECKING:
    from comm.model.modeling import CommForConditionalGeneration
    from comm.processing import CommProcessor


def box_answer_tokens(box_decimals: int) -> int:
    """New tokens enough for a box answer ("[0.12,0.34,0.56,0.78]": one token per character with single digits, a
    space before it and the end of turn): what an untrained model's REC answers are capped at."""
    return 4 * (box_decimals + 2) + 8


def mean_box_accuracy(train: Sequence[RecSample], test: Sequence[RecSample]) -> float:
    """REC Acc@0.5 of always answering the mean training box: what a model scores that ignores the image and the
    expression (the demo's images all have one size, so the mean is taken in pixels)."""
    mean = [sum(sample.bbox_xyxy[i] for sample in train) / len(train) for i in range(4)]
    return score_rec([{"pred_box": mean, "gt_box": list(sample.bbox_xyxy)} for sample in test])["accuracy"]


class HeldOutCurve(TrainerCallback):
    """Every ``every`` optimizer steps (and at a stage's last), the model's REC Acc@0.5 and POPE accuracy on the
    given held-out items, appended to ``points`` with the samples seen so far over all stages."""

    def __init__(
        self,
        processor: CommProcessor,
        rec: Sequence[RecSample],
        pope: Sequence[PopeQuestion],
        every: int,
        batch_size: int = 64,
    ):
        self.processor, self.rec, self.pope = processor, RecTask(list(rec)), PopeTask(list(pope), model_id="demo")
        self.every, self.batch_size = every, batch_size
        self.points: list[dict[str, Any]] = []
        self.stage, self.samples_before = "", 0

    def start_stage(self, name: str) -> None:
        """Points from now on belong to stage ``name``; samples keep counting from the previous stages."""
        self.stage = name
        self.samples_before = self.points[-1]["samples"] if self.points else 0

    def measure(self, model: CommForConditionalGeneration) -> dict[str, float]:
        """REC Acc@0.5 and POPE accuracy of ``model`` on the held-out items (greedy answers, eval mode)."""
        was_training = model.training
        model.eval()
        box_tokens = box_answer_tokens(self.processor.box_decimals)
        rec, pope = self.rec.items, self.pope.items
        rec_records, pope_records = [], []
        for start in range(0, max(len(rec), len(pope)), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            if rec[chunk]:
                rec_records += answer_batch(self.rec, model, self.processor, rec[chunk], max_new_tokens=box_tokens)
            if pope[chunk]:
                pope_records += answer_batch(self.pope, model, self.processor, pope[chunk], max_new_tokens=3)
        model.train(was_training)
        return {"rec": self.rec.score(rec_records)["accuracy"], "pope": self.pope.score(pope_records)["accuracy"]}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Measure at every ``every``-th step and at the stage's last step."""
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        samples = self.samples_before + state.global_step * args.per_device_train_batch_size * args.world_size
        point = {"stage": self.stage, "step": state.global_step, "samples": samples, **self.measure(model)}
        self.points.append(point)


def plot_learning_curves(points: list[dict[str, Any]], baselines: dict[str, float], path: Path) -> Path:
    """Draw REC Acc@0.5 and POPE accuracy against samples seen, with each metric's trivial baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    samples = [point["samples"] for point in points]
    for key, label, colour in (("rec", "REC Acc@0.5", "tab:red"), ("pope", "POPE accuracy", "tab:blue")):
        axis.plot(samples, [point[key] for point in points], marker=".", color=colour, label=label)
        if key in baselines:
            axis.axhline(baselines[key], color=colour, linestyle="--", linewidth=1, label=f"{label}: trivial answer")
    for before, after in zip(points, points[1:]):
        if after["stage"] != before["stage"]:  # a stage boundary
            axis.axvline(before["samples"], color="grey", linewidth=0.8)
    axis.set_xlabel("training samples seen (both stages)")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, 1)
    axis.set_title("COMM demo: held-out accuracy while training")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
