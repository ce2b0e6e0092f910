"""The POPE task (object hallucination, yes/no questions): questions read a split a file, answered by generation or
by the yes/no logits, LLaVA-style answers files, and the official yes/no metrics with their mean over splits."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from comm.conversation import with_image
from comm.evaluation.processes import on_main
from comm.evaluation.records import METRICS_FILE, check_ids, read_unique_records
from comm.evaluation.runner import DEFAULT_BATCH_SIZE, run_task
from comm.evaluation.task import EvaluationTask, Record
from comm.evaluation.unanswerable import UNANSWERABLE
from comm.evaluation.yes_no import NO_ANSWER, YES_ANSWER, yes_no_logits, yes_no_token_ids
from comm.io import write_json

if TYPE_CHECKING:
    from comm.model.modeling import CommForConditionalGeneration
    from comm.processing import CommProcessor

POPE_LABELS = ("yes", "no")
QUESTION_KEYS = ("question_id", "image", "text", "label")
POPE_MAX_NEW_TOKENS = 32  # the official rule reads the first sentence only
ANSWER_MODES = ("generate", "logits")


@dataclass(frozen=True)
class PopeQuestion:
    """One yes/no question about an image (its path) with its label, ``"yes"`` or ``"no"``."""

    question_id: int | str
    image: str
    text: str
    label: str


def load_pope_questions(
    path: str | os.PathLike[str], image_dir: str | os.PathLike[str] | None = None
) -> list[PopeQuestion]:
    """Read POPE questions, one ``{"question_id", "image", "text", "label": "yes"|"no"}`` object a line; the image
    names are in ``image_dir`` (default: as written)."""

    def check(record: dict[str, Any]) -> str | None:
        if record["label"] not in POPE_LABELS:
            return f"label must be 'yes' or 'no', got {record['label']!r}"
        if not isinstance(record["text"], str) or not isinstance(record["image"], str):
            return "'text' and 'image' must be strings"
        return None

    path = Path(path)
    root = Path(image_dir) if image_dir is not None else Path()
    questions = [
        PopeQuestion(record["question_id"], str(root / record["image"]), record["text"], record["label"])
        for record in read_unique_records(path, QUESTION_KEYS, "question_id", check)
    ]
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def split_names(paths: Sequence[Path]) -> list[str]:
    """Split names from question files (``coco_pope_random.json`` -> ``coco_pope_random``); they must differ."""
    names = [path.stem for path in paths]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ValueError(
                f"two question files make the same split name {name!r}: {paths[names.index(name)]} and {paths[index]}"
            )
    return names


def load_pope_splits(
    paths: Sequence[Path], image_dir: str | os.PathLike[str] | None = None
) -> dict[str, list[PopeQuestion]]:
    """The questions of each file, by split name (`split_names`)."""
    return {name: load_pope_questions(path, image_dir) for name, path in zip(split_names(paths), paths, strict=True)}


def pope_answers(records: Iterable[Mapping[str, Any]]) -> dict[Any, str | None]:
    """``{question_id: text}`` of answers-file records; None for a record marked unanswerable (unusable image)."""
    return {record["question_id"]: None if record.get(UNANSWERABLE) else record["text"] for record in records}


def load_pope_answers(path: str | os.PathLike[str]) -> dict[Any, str | None]:
    """Read LLaVA-style answers (``{"question_id", "text", ...}`` a line) into `pope_answers`."""

    def check(record: dict[str, Any]) -> str | None:
        if not isinstance(record["text"], str):
            return f"'text' must be a string, got {type(record['text']).__name__}"
        return None

    return pope_answers(read_unique_records(path, ("question_id", "text"), "question_id", check))


def pope_answer_is_yes(text: str) -> bool:
    """Official POPE / LLaVA ``eval_pope.py`` rule: first sentence, no commas, "no" if No/not/no is a word."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0


def score_pope(answers: Mapping[Any, str | None], questions: Sequence[PopeQuestion]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (positive = "yes") and yes-ratio of ``answers`` on ``questions``.

    A None answer (unanswerable: the image was not usable) counts as wrong, a false negative for a "yes" question
    and a false positive for a "no" one, and the number of them is given as ``unanswerable``.
    """
    if not questions:
        raise ValueError("no POPE questions to score")
    check_ids(answers.keys(), (question.question_id for question in questions))
    by_key = {str(question_id): text for question_id, text in answers.items()}
    tp = fp = tn = fn = unanswerable = 0
    for question in questions:
        if question.label not in POPE_LABELS:
            raise ValueError(f"question {question.question_id!r}: label must be 'yes' or 'no', got {question.label!r}")
        text = by_key[str(question.question_id)]
        label_yes = question.label == "yes"
        unanswerable += text is None
        predicted_yes = not label_yes if text is None else pope_answer_is_yes(text)
        if predicted_yes and label_yes:
            tp += 1
        elif predicted_yes:
            fp += 1
        elif label_yes:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    metrics = {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
    if unanswerable:
        metrics[UNANSWERABLE] = unanswerable
    return metrics


def summarize_pope_splits(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-split metrics, each split's n, ``mean_f1`` (LLaVA's figure) and ``mean_accuracy`` (COMM's)."""
    if not results:
        raise ValueError("no POPE splits to summarize")
    for split, metrics in results.items():
        missing = [key for key in ("accuracy", "f1", "n") if key not in metrics]
        if missing:
            raise ValueError(f"POPE split {split!r}: metrics lack {', '.join(missing)}")
    return {
        "splits": {split: dict(metrics) for split, metrics in results.items()},
        "n": {split: int(metrics["n"]) for split, metrics in results.items()},
        "mean_f1": sum(float(m["f1"]) for m in results.values()) / len(results),
        "mean_accuracy": sum(float(m["accuracy"]) for m in results.values()) / len(results),
    }


def rescore_pope_files(answers_paths: Sequence[Path], questions_paths: Sequence[Path]) -> dict[str, Any]:
    """`score_pope` of each answers file against the question file in the same place (no model): one split's
    metrics, or `summarize_pope_splits` of several."""
    results: dict[str, Any] = {}
    names = split_names(questions_paths)
    for name, answers_path, questions_path in zip(names, answers_paths, questions_paths, strict=True):
        questions = load_pope_questions(questions_path)
        answers = load_pope_answers(answers_path)
        try:
            results[name] = score_pope(answers, questions)
        except ValueError as error:
            raise ValueError(f"{answers_path} does not answer {questions_path}: {error}") from None
    return next(iter(results.values())) if len(results) == 1 else summarize_pope_splits(results)


def pope_record(question: PopeQuestion, text: str, model_id: str, metadata: dict[str, Any]) -> Record:
    """An answers-file line in LLaVA's format (``question_id``, ``prompt``, ``text``, ``model_id``, ``metadata``)."""
    return {
        "question_id": question.question_id,
        "prompt": question.text,
        "text": text,
        "model_id": model_id,
        "metadata": metadata,
    }


@dataclass(frozen=True)
class PopeTask(EvaluationTask[PopeQuestion]):
    """Answer one split's yes/no questions: by generation (``answer_mode="generate"``) or by comparing the next-token
    logits of " Yes" and " No" after the prompt (``"logits"``, one forward pass); score with the official rule."""

    items: Sequence[PopeQuestion]
    answer_mode: str = "generate"
    model_id: str = "comm"
    split: str | None = None
    name: ClassVar[str] = "POPE"
    item_name: ClassVar[str] = "POPE question"
    id_key: ClassVar[str] = "question_id"
    max_new_tokens: ClassVar[int] = POPE_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {self.answer_mode!r}")

    @property
    def description(self) -> str:
        """``POPE`` and the split's name."""
        return f"{self.name} {self.split}" if self.split else self.name

    def item_id(self, item: PopeQuestion) -> str:
        """The question id as a string."""
        return str(item.question_id)

    def image_path(self, item: PopeQuestion) -> str:
        """The question's image."""
        return item.image

    def prompt(self, item: PopeQuestion) -> str:
        """The question as written, about the image."""
        return with_image(item.text)

    def parse(self, item: PopeQuestion, answer: str, image_size: tuple[int, int], processor: CommProcessor) -> Record:
        """The generated answer as an answers-file line (the official rule reads it when scoring)."""
        return pope_record(item, answer, self.model_id, {"answer_mode": "generate"})

    def unanswered_record(self, item: PopeQuestion) -> Record:
        """The empty answer."""
        return pope_record(item, "", self.model_id, {"answer_mode": self.answer_mode})

    def score(self, records: Sequence[Record]) -> dict[str, Any]:
        """`score_pope` of the records against the questions' labels."""
        return score_pope(pope_answers(records), self.items)

    def answer(
        self,
        model: CommForConditionalGeneration,
        processor: CommProcessor,
        items: Sequence[PopeQuestion],
        images: Sequence[Image.Image],
        **generate_kwargs: Any,
    ) -> list[Record]:
        """Generated answers, or in ``logits`` mode "Yes" or "No" by the larger logit (both logits recorded)."""
        if self.answer_mode == "generate":
            return super().answer(model, processor, items, images, **generate_kwargs)
        token_ids = yes_no_token_ids(processor.tokenizer, processor.template)
        records = []
        for question, (yes, no) in zip(
            items, yes_no_logits(model, processor, images, [self.prompt(q) for q in items], token_ids), strict=True
        ):
            metadata = {"answer_mode": "logits", "yes_logit": yes, "no_logit": no}
            records.append(pope_record(question, YES_ANSWER if yes > no else NO_ANSWER, self.model_id, metadata))
        return records


def answers_file(out_dir: str | os.PathLike[str], split: str) -> Path:
    """Where the answers of ``split`` go: ``{out_dir}/answers_{split}.jsonl``."""
    return Path(out_dir) / f"answers_{split}.jsonl"


def evaluate_pope_splits(
    tasks: Sequence[PopeTask],
    model: CommForConditionalGeneration,
    processor: CommProcessor,
    out_dir: str | os.PathLike[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Run each split's task into ``answers_{split}.jsonl`` and write ``metrics.json``.

    Returns one split's `score_pope` metrics, or `summarize_pope_splits` of all (mean F1 and accuracy) for several.
    """
    if not tasks:
        raise ValueError("no POPE splits to evaluate")
    results = {}
    for task in tasks:
        if task.split is None or task.split in results:
            raise ValueError(f"each POPE split's task needs a split name of its own, got {task.split!r}")
        results[task.split] = run_task(
            task,
            model,
            processor,
            answers_file(out_dir, task.split),
            batch_size=batch_size,
            progress=progress,
            **generate_kwargs,
        )
    metrics = next(iter(results.values())) if len(results) == 1 else summarize_pope_splits(results)
    on_main(write_json, Path(out_dir) / METRICS_FILE, metrics, share=False)
    return metrics
