"""The training mixture: data files given as ``path[:ratio[:loss_weight]]`` and the seeded draw of each file's
samples."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NUMBER = r"\d*\.?\d+(?:[eE][-+]?\d+)?"
_SUFFIXES = (
    re.compile(rf"^(?P<path>.+):(?P<ratio>{_NUMBER}):(?P<weight>{_NUMBER})$"),
    re.compile(rf"^(?P<path>.+):(?P<ratio>{_NUMBER})$"),
)


@dataclass(frozen=True)
class DataSpec:
    """One training file, its sampling ratio (``1.0``: every sample once; ``0.5``: a seeded half; ``2``: twice) and
    its loss weight (each of its samples' loss is multiplied by it; 1.0 by default)."""

    path: Path
    ratio: float = 1.0
    loss_weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """Parse ``path``, ``path:ratio`` or ``path:ratio:loss_weight``; a path that exists as given wins."""
        text = text.strip()
        if not text:
            raise ValueError("--data: empty data file name")
        if Path(text).exists():
            return cls(Path(text))
        for suffix in _SUFFIXES:
            match = suffix.match(text)
            if match:
                ratio, weight = float(match.group("ratio")), float(match.groupdict().get("weight") or 1.0)
                if not ratio > 0:
                    raise ValueError(f"--data {text}: the sampling ratio must be > 0, got {ratio}")
                if not weight > 0:
                    raise ValueError(f"--data {text}: the loss weight must be > 0, got {weight}")
                return cls(Path(match.group("path")), ratio, weight)
        return cls(Path(text))


def parse_data_specs(values: Sequence[str]) -> list[DataSpec]:
    """Parse ``--data`` values; each may be a comma-separated list of ``path[:ratio[:loss_weight]]``."""
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
