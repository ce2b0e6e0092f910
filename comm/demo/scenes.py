"""The demo world's scenes: coloured shapes on grey, sampled without overlap and drawn without antialiasing."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw

# Pure, far-apart colours; drawn without antialiasing, so every object pixel has exactly its colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 205, 0),
    "purple": (150, 40, 190),
}
BACKGROUND: tuple[int, int, int] = (210, 210, 210)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

_PLACEMENT_ROUNDS = 40  # full-layout attempts before dropping an object
_POSITION_TRIES = 30  # positions tried for one object within a layout attempt


@dataclass(frozen=True)
class WorldObject:
    """One drawn shape; ``box`` is its tight pixel box ``(x0, y0, x1, y1)`` with exclusive ends."""

    shape: str
    colour: str
    size: str
    side: int
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the tight box, in pixels."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def xywh(self) -> list[int]:
        """The tight box in COCO ``[x, y, w, h]`` pixels."""
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]

    def describe(self, attributes: Sequence[str]) -> str:
        """The words for ``attributes`` (a subset of size, colour, shape, in that order), e.g. "small red circle"."""
        return " ".join(getattr(self, name) for name in attributes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "side": self.side, "box": list(self.box)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldObject:
        """Inverse of :meth:`to_json`."""
        box = tuple(int(v) for v in data["box"])
        if len(box) != 4:
            raise ValueError(f"an object box needs 4 numbers, got {data['box']!r}")
        return cls(
            shape=str(data["shape"]),
            colour=str(data["colour"]),
            size=str(data["size"]),
            side=int(data["side"]),
            box=box,
        )  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scene:
    """One image's objects, sorted left to right (by centre x, then centre y)."""

    image: str
    split: str
    image_size: int
    objects: tuple[WorldObject, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "image": self.image,
            "split": self.split,
            "width": self.image_size,
            "height": self.image_size,
            "objects": [obj.to_json() for obj in self.objects],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_json`."""
        return cls(
            image=str(data["image"]),
            split=str(data["split"]),
            image_size=int(data["width"]),
            objects=tuple(WorldObject.from_json(obj) for obj in data["objects"]),
        )


@dataclass
class WorldConfig:
    """Everything that decides a generated world; the same config always writes the same bytes."""

    seed: int = 0
    num_train_images: int = 2000
    num_test_images: int = 200
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    small_fraction: tuple[float, float] = (0.18, 0.24)  # object side as a fraction of the image side
    large_fraction: tuple[float, float] = (0.30, 0.38)
    min_gap: int = 2  # pixels between the boxes of two objects
    train_expressions_per_object: int = 2
    pope_pairs_per_image: int = 1  # yes/no question pairs per image (train and test)
    attribute_questions_per_image: int = 2  # "What colour is the circle?" questions per train image (0: none)
    hard_negative_fraction: float = 0.5  # share of "no" objects sharing a colour or shape with the image
    relational_expressions: bool = True

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        self.colours = tuple(self.colours)
        self.small_fraction = tuple(self.small_fraction)  # type: ignore[assignment]
        self.large_fraction = tuple(self.large_fraction)  # type: ignore[assignment]

    def validate(self) -> None:
        """Raise ValueError when the config cannot make a sensible world."""
        if self.num_train_images < 1 or self.num_test_images < 0:
            raise ValueError(
                "need num_train_images >= 1 and num_test_images >= 0, got "
                f"{self.num_train_images} and {self.num_test_images}"
            )
        if self.image_size < 24:
            raise ValueError(f"image_size must be at least 24 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 5:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 5, got {self.min_objects}, {self.max_objects}")
        unknown_shapes = [s for s in self.shapes if s not in SHAPES]
        unknown_colours = [c for c in self.colours if c not in COLOURS]
        if unknown_shapes or unknown_colours or not self.shapes or not self.colours:
            raise ValueError(
                f"shapes must come from {SHAPES} and colours from {tuple(COLOURS)}; "
                f"got shapes={self.shapes}, colours={self.colours}"
            )
        if len(set(self.shapes)) != len(self.shapes) or len(set(self.colours)) != len(self.colours):
            raise ValueError("shapes and colours must not repeat")
        if len(self.shapes) * len(self.colours) <= self.max_objects:
            raise ValueError("need more colour-shape combinations than max_objects (POPE needs absent ones)")
        for name in ("small_fraction", "large_fraction"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high < 0.5:
                raise ValueError(f"{name} must satisfy 0 < low <= high < 0.5, got {(low, high)}")
        if self.small_fraction[1] >= self.large_fraction[0]:
            raise ValueError("small_fraction must lie entirely below large_fraction")
        if self.min_gap < 0:
            raise ValueError(f"min_gap must be >= 0, got {self.min_gap}")
        if self.train_expressions_per_object < 1 or self.pope_pairs_per_image < 1:
            raise ValueError("train_expressions_per_object and pope_pairs_per_image must be >= 1")
        if self.attribute_questions_per_image < 0:
            raise ValueError(f"attribute_questions_per_image must be >= 0, got {self.attribute_questions_per_image}")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise ValueError(f"hard_negative_fraction must lie in [0, 1], got {self.hard_negative_fraction}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldConfig:
        """Inverse of :meth:`to_json`; unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig keys: {unknown}")
        return cls(**data)


@lru_cache(maxsize=512)
def _shape_mask(shape: str, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A binary mask of ``shape`` drawn in a ``side x side`` square, and its tight box inside that square."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    last = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    elif shape == "triangle":
        draw.polygon([(0, last), (last, last), (last // 2, 0), ((last + 1) // 2, 0)], fill=255)
    elif shape == "diamond":
        middle = last / 2.0
        draw.polygon([(middle, 0), (last, middle), (middle, last), (0, middle)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    bbox = mask.getbbox()
    if bbox is None:
        raise ValueError(f"a {shape} of side {side} draws no pixels")
    return mask, bbox


def _separated(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    """True when boxes ``a`` and ``b`` are at least ``gap`` pixels apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(rng: random.Random, sides: Sequence[int], image_size: int, gap: int) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of ``sides`` that keep ``gap`` pixels apart, or None if none were found."""
    for _ in range(_PLACEMENT_ROUNDS):
        corners: list[tuple[int, int]] = []
        boxes: list[tuple[int, int, int, int]] = []
        for side in sides:
            for _ in range(_POSITION_TRIES):
                x0 = rng.randint(0, image_size - side)
                y0 = rng.randint(0, image_size - side)
                candidate = (x0, y0, x0 + side, y0 + side)
                if all(_separated(candidate, other, gap) for other in boxes):
                    corners.append((x0, y0))
                    boxes.append(candidate)
                    break
            else:
                break
        if len(corners) == len(sides):
            return corners
    return None


def sample_scene(rng: random.Random, config: WorldConfig, image: str, split: str) -> Scene:
    """Draw the objects of one image (1 to ``max_objects``, distinct size-colour-shape triples, no overlap)."""
    count = rng.randint(config.min_objects, config.max_objects)
    triples = [(size, colour, shape) for size in SIZES for colour in config.colours for shape in config.shapes]
    chosen = rng.sample(triples, count)
    sides = []
    for size, _, _ in chosen:
        low, high = config.small_fraction if size == "small" else config.large_fraction
        sides.append(max(3, round(rng.uniform(low, high) * config.image_size)))
    # Largest first packs best; the order is fixed by the sample, so this stays deterministic.
    order = sorted(range(count), key=lambda i: -sides[i])
    chosen = [chosen[i] for i in order]
    sides = [sides[i] for i in order]
    corners = _place(rng, sides, config.image_size, config.min_gap)
    while corners is None:  # too crowded: drop the smallest object and retry
        chosen, sides = chosen[:-1], sides[:-1]
        corners = _place(rng, sides, config.image_size, config.min_gap)
    objects = []
    for (size, colour, shape), side, (x0, y0) in zip(chosen, sides, corners):
        _, (bx0, by0, bx1, by1) = _shape_mask(shape, side)
        box = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
        objects.append(WorldObject(shape=shape, colour=colour, size=size, side=side, box=box))
    objects.sort(key=lambda obj: (obj.centre[0], obj.centre[1]))
    return Scene(image=image, split=split, image_size=config.image_size, objects=tuple(objects))


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image: flat-coloured shapes on a light-grey background, no antialiasing."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    for obj in scene.objects:
        mask, (bx0, by0, _, _) = _shape_mask(obj.shape, obj.side)
        image.paste(COLOURS[obj.colour], (obj.box[0] - bx0, obj.box[1] - by0), mask)
    return image
