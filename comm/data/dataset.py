"""The training dataset: files loaded, validated, drawn by ratio and tokenized once, images decoded on access.

`build_dataset` finds bad input before training starts: records are parsed (the file and line of each kept),
images are checked (existence, header), conversations are validated and rendered with the processor's template,
and every sample that will be used is tokenized once; the token ids and lengths are kept (lengths feed
length-grouped batching) and only the images are decoded during training (once per image with ``cache_images``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from comm.data.issues import IssueKind, IssueLog, Rejected
from comm.data.mixture import DataSpec, mixture_indices
from comm.data.samples import ImageChecker, Sample, load_samples
from comm.data.tokenization import EncodedSample, SampleEncoder
from comm.processing import CommProcessor


class ImageDecodeError(ValueError):
    """A training image whose header passed the data check but whose pixels fail to decode during training; the
    one-line message names its file and line (a plain ValueError subclass: a DataLoader worker can re-raise it)."""


class SupervisedDataset(Dataset):
    """Tokenized samples (ids and label ranges kept in memory) whose images are decoded in ``__getitem__``.

    ``order`` maps dataset positions to unique samples (a sample repeats when its source's ratio is above 1);
    ``lengths`` are the token lengths in dataset order, for length-grouped batching. Items carry ``loss_weight``
    (their file's, `DataSpec.loss_weight`) when a file's weight is not 1. With ``cache_images`` each
    image's pixel values are kept after their first preprocessing (per worker process): nothing augments the images,
    so an epoch over a small set then decodes and resizes each image once instead of once per sample using it.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        encoded: Sequence[EncodedSample],
        processor: CommProcessor,
        order: Sequence[int] | None = None,
        cache_images: bool = False,
        loss_weights: Sequence[float] | None = None,
    ):
        if len(samples) != len(encoded):
            raise ValueError(f"{len(samples)} samples but {len(encoded)} encodings")
        self.samples = list(samples)
        self.processor = processor
        # One flat buffer instead of one array per sample keeps the memory of ~1M samples small.
        dtype = encoded[0].input_ids.dtype if encoded else np.int32
        self._ids = np.concatenate([e.input_ids for e in encoded]) if encoded else np.empty(0, dtype=dtype)
        self._starts = np.cumsum([0] + [len(e.input_ids) for e in encoded]).astype(np.int64)
        self._ranges = [e.target_ranges for e in encoded]
        self.order = np.arange(len(self.samples)) if order is None else np.asarray(order, dtype=np.int64)
        unique_lengths = np.diff(self._starts)
        self.lengths: list[int] = unique_lengths[self.order].tolist()
        self.pixel_cache: dict[str, dict[str, torch.Tensor]] | None = {} if cache_images else None
        # Per unique sample, its file's loss weight; items carry it only when some weight is not 1.
        weights = np.ones(len(self.samples), dtype=np.float32) if loss_weights is None else np.asarray(loss_weights)
        if len(weights) != len(self.samples):
            raise ValueError(f"{len(self.samples)} samples but {len(weights)} loss weights")
        self.loss_weights = weights.astype(np.float32)
        self.weighted = bool((self.loss_weights != 1.0).any())

    def __len__(self) -> int:
        return len(self.order)

    def encoded(self, position: int) -> EncodedSample:
        """The token ids and target ranges of the sample at ``position``."""
        unique = int(self.order[position])
        ids = self._ids[self._starts[unique] : self._starts[unique + 1]]
        return EncodedSample(ids, self._ranges[unique])

    def sample(self, position: int) -> Sample:
        """The `Sample` at ``position`` (its file, line, turns and image)."""
        return self.samples[int(self.order[position])]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        encoded = self.encoded(position)
        item = {
            "input_ids": torch.from_numpy(encoded.input_ids.astype(np.int64)),
            "labels": torch.from_numpy(encoded.labels()),
        }
        if self.weighted:
            item["loss_weight"] = torch.tensor(self.loss_weights[int(self.order[position])])
        sample = self.sample(position)
        if sample.image is not None:
            item.update(self.pixels(sample))
        return item

    def pixels(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Both towers' pixel values of ``sample``'s image (from the cache when it is on and holds them)."""
        key = str(sample.image)
        if self.pixel_cache is not None and key in self.pixel_cache:
            return self.pixel_cache[key]
        try:
            pixels = dict(self.processor.preprocess_images([sample.image]))
        except (OSError, ValueError) as error:
            issue = sample.issue(IssueKind.UNREADABLE_IMAGE, f"decoding {sample.image} failed: {error}")
            raise ImageDecodeError(
                f"{issue} (its header was fine when the data was checked: pass --verify_images to decode every "
                "image before training and skip the broken ones)"
            ) from error
        if self.pixel_cache is not None:
            self.pixel_cache[key] = pixels
        return pixels


def build_dataset(
    specs: Sequence[DataSpec],
    processor: CommProcessor,
    issues: IssueLog,
    seed: int = 0,
    image_folder: str | Path | None = None,
    model_max_length: int | None = None,
    verify_images: bool = False,
    progress: bool = False,
    chunk_size: int = 512,
    cache_images: bool = False,
) -> SupervisedDataset:
    """Load, validate, sample (ratios) and tokenize the training files into one `SupervisedDataset`
    (``cache_images``: keep each image's pixel values after their first use, see `SupervisedDataset`)."""
    images = ImageChecker(verify=verify_images)
    sources = [
        load_samples(spec, issues, image_folder, images, processor.pad_to_square, processor.box_decimals)
        for spec in specs
    ]
    chosen = mixture_indices([len(s) for s in sources], [spec.ratio for spec in specs], seed)
    encoder = SampleEncoder(processor, model_max_length)

    unique_samples: list[Sample] = []
    unique_encoded: list[EncodedSample] = []
    unique_weights: list[float] = []
    order: list[int] = []
    total = sum(len(np.unique(indices)) for indices in chosen)
    bar = tqdm(total=total, desc="tokenizing", disable=not progress, unit="sample")
    for spec, samples, indices in zip(specs, sources, chosen):
        file = str(spec.path)
        unique = np.unique(indices)
        position_of: dict[int, int] = {}
        for begin in range(0, len(unique), chunk_size):
            batch = [samples[i] for i in unique[begin : begin + chunk_size]]
            for index, sample, result in zip(unique[begin : begin + chunk_size], batch, encoder.encode_many(batch)):
                if isinstance(result, Rejected):
                    issues.kept[file] -= 1
                    issues.report(sample.issue(result.kind, result.message))
                    continue
                position_of[int(index)] = len(unique_samples)
                unique_samples.append(sample)
                unique_encoded.append(result)
                unique_weights.append(spec.loss_weight)
            bar.update(len(batch))
        used = [position_of[int(i)] for i in indices if int(i) in position_of]
        issues.used[file] += len(used)
        order.extend(used)
    bar.close()
    return SupervisedDataset(
        unique_samples, unique_encoded, processor, order, cache_images=cache_images, loss_weights=unique_weights
    )
