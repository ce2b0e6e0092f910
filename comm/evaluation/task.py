"""What an evaluation task is: its items, and for each how the prompt is made, how the answer parses into a record
and how the records score. `comm.evaluation.runner` runs any task; REC, POPE and captioning are one module each."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from PIL import Image

from comm.generation import generate_answers

if TYPE_CHECKING:
    from comm.model.modeling import CommForConditionalGeneration
    from comm.processing import CommProcessor

ItemT = TypeVar("ItemT")
# One line of a predictions file: the item's id under the task's `EvaluationTask.id_key`, the answer, its parse.
Record = dict[str, Any]


class EvaluationTask(ABC, Generic[ItemT]):
    """A benchmark's items and how each is asked, answered, recorded and scored; subclasses are dataclasses.

    The runner calls, for every item: `image_path` (opened once, or recorded unanswerable), `answer` on a batch
    (by default `prompt` each item, generate, `parse` each answer), `unanswered_record` for an unusable image; then
    `score` on all the records and `save_extras` beside the predictions.
    """

    items: Sequence[ItemT]
    name: ClassVar[str]  # the benchmark ("REC")
    item_name: ClassVar[str]  # what an item is called in messages ("REC sample")
    id_key: ClassVar[str] = "id"  # the record key that holds the item's id
    max_new_tokens: ClassVar[int]  # the answer's token budget unless the run sets one

    @property
    def description(self) -> str:
        """What this run is called on its progress bar and in errors (the benchmark's name)."""
        return self.name

    @abstractmethod
    def item_id(self, item: ItemT) -> str:
        """The item's id as a string (records carry it under `id_key`, maybe as a number)."""

    @abstractmethod
    def image_path(self, item: ItemT) -> str | os.PathLike[str]:
        """The image file the item asks about."""

    @abstractmethod
    def prompt(self, item: ItemT) -> str:
        """The question about the item's image, with its ``<image>`` placeholder (the template renders it)."""

    @abstractmethod
    def parse(self, item: ItemT, answer: str, image_size: tuple[int, int], processor: CommProcessor) -> Record:
        """The item's record from the model's ``answer`` about an image of ``image_size`` (width, height)."""

    @abstractmethod
    def unanswered_record(self, item: ItemT) -> Record:
        """The record of an item whose image is not usable (the runner marks it unanswerable): scored as wrong."""

    @abstractmethod
    def score(self, records: Sequence[Record]) -> dict[str, Any]:
        """The metrics of all the items' records (in item order)."""

    def answer(
        self,
        model: CommForConditionalGeneration,
        processor: CommProcessor,
        items: Sequence[ItemT],
        images: Sequence[Image.Image],
        **generate_kwargs: Any,
    ) -> list[Record]:
        """The records of one batch (``images[i]`` is ``items[i]``'s): one generate call, each answer parsed."""
        prompts = [self.prompt(item) for item in items]
        answers = generate_answers(model, processor, images, prompts, batch_size=len(prompts), **generate_kwargs)
        return [
            self.parse(item, answer, image.size, processor)
            for item, image, answer in zip(items, images, answers, strict=True)
        ]

    def save_extras(self, records: Sequence[Record], folder: Path) -> None:
        """Write what the task adds to its predictions and metrics in ``folder`` (nothing unless overridden)."""
