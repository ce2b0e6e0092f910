"""The training mixture: data files given as ``path[:ratio]`` and the seeded draw of each file's samples."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_RATIO_SUFFIX = re.compile(r"^(?P<path>.+):(?P<ratio>\d*\.?\d+(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class DataSpec:
    """One training file and its sampling ratio (``1.0``: every sample once; ``0.5``: a seeded half; ``2``: twice)."""

    path: Path
    ratio: float = 1.0

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """Parse ``path`` or ``path:ratio``; a path that exists as given wins over a ratio suffix."""
        text = text.strip()
        if not text:
            raise ValueError("--data: empty data file name")
        match = _RATIO_SUFFIX.match(text)
        if match and not Path(text).exists():
            ratio = float(match.group("ratio"))
            if not ratio > 0:
                raise ValueError(f"--data {text}: the sampling ratio must be > 0, got {ratio}")
            return cls(Path(match.group("path")), ratio)
        return cls(Path(text))


def parse_data_specs(values: Sequence[str]) -> list[DataSpec]:
    """Parse ``--data`` values; each may be a comma-separated list of ``path[:ratio]``."""
    specs = [DataSpec.parse(part) for value in values for part in value.split(",") if part.strip()]
    if not specs:
        raise ValueError("--data: give at least one training file (LLaVA .json or .jsonl, REC .jsonl)")
    for spec in specs:
        if not spec.path.is_file():
            raise FileNotFoundError(f"--data: no such file: {spec.path}")
    return specs


def mixture_indices(sizes: Sequence[int], ratios: Sequence[float], seed: int) -> list[np.ndarray]:
    """Per source, the sample indices to train on: ``ratio * size`` of them, drawn deterministically from ``seed``.

    A ratio below 1 draws a subset without replacement; a ratio above 1 repeats the whole source ``floor(ratio)``
    times plus a random subset for the fraction. Indices come back sorted (the trainer's sampler shuffles).
    """
    if len(sizes) != len(ratios):
        raise ValueError(f"{len(sizes)} sources but {len(ratios)} ratios")
    rng = np.random.default_rng(seed)
    chosen = []
    for size, ratio in zip(sizes, ratios):
        if ratio <= 0:
            raise ValueError(f"sampling ratios must be > 0, got {ratio}")
        whole, fraction = divmod(ratio, 1.0)
        extra = int(round(fraction * size))
        subset = rng.choice(size, size=extra, replace=False) if extra else np.empty(0, dtype=np.int64)
        indices = np.concatenate([np.tile(np.arange(size), int(whole)), subset]).astype(np.int64)
        chosen.append(np.sort(indices))
    return chosen
