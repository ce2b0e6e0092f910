"""Batch collation for training: ids right-padded by the tokenizer, labels with -100, both towers' pixels stacked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from comm.data.tokenization import IGNORE_INDEX
from comm.model.modeling import PIXEL_INPUTS, PIXEL_VALUES_CLIP
from comm.processing import CommProcessor, tower_input_size


@dataclass
class CommDataCollator:
    """Pad ``input_ids`` (``tokenizer.pad``, with its pad token) and ``labels`` (with -100) on the right; stack the
    images.

    Samples without an image contribute no pixel values. A batch with no image at all gets ``blank_image`` with
    its placeholder tokens appended to the shortest row as masked padding (attention 0, labels -100): the model
    then runs its vision modules on every batch, as ZeRO-3 (parameters gathered collectively, in module order)
    and DDP (a gradient for every trained parameter) need across ranks, while the loss is unchanged.
    """

    tokenizer: PreTrainedTokenizerBase
    blank_image: dict[str, torch.Tensor] | None = None
    blank_image_ids: Sequence[int] = ()

    @classmethod
    def for_processor(cls, processor: CommProcessor) -> CommDataCollator:
        """A collator with the processor's tokenizer and a blank (pad-colour) image for image-less batches."""
        side = max(tower_input_size(processor.clip_image_processor), tower_input_size(processor.dino_image_processor))
        blank = processor.preprocess_images([Image.new("RGB", (side, side), processor.pad_color)])
        return cls(processor.tokenizer, blank, processor.image_block_ids)

    def __call__(self, features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Collate dataset items into a training batch."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        sequences = [f["input_ids"].tolist() for f in features]
        with_images = [f for f in features if PIXEL_VALUES_CLIP in f]
        blank_row = None
        if not with_images and self.blank_image is not None:
            blank_row = min(range(len(sequences)), key=lambda row: len(sequences[row]))
            sequences[blank_row] = sequences[blank_row] + list(self.blank_image_ids)
        padded = self.tokenizer.pad(
            {"input_ids": sequences}, padding_side="right", return_attention_mask=True, return_tensors="pt"
        )
        batch = dict(padded)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, feature in enumerate(features):
            labels[row, : len(feature["labels"])] = feature["labels"]
        batch["labels"] = labels
        if "loss_weight" in features[0]:
            batch["loss_weight"] = torch.stack([f["loss_weight"] for f in features])
        if blank_row is not None:
            batch["attention_mask"][blank_row, len(features[blank_row]["input_ids"]) :] = 0
            batch.update({key: self.blank_image[key] for key in PIXEL_INPUTS})
        elif with_images:
            for key in PIXEL_INPUTS:
                batch[key] = torch.cat([f[key] for f in with_images], dim=0)
        return batch
