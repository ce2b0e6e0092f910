"""A generated grounding world: coloured shapes on grey with captions, referring expressions and POPE."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from comm.conversation import CAPTION_PROMPT, IMAGE_PLACEHOLDER

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

CAPTION_QUESTIONS: tuple[str, ...] = (
    f"{IMAGE_PLACEHOLDER}\nDescribe the image briefly.",
    f"{IMAGE_PLACEHOLDER}\nWhat is in this picture?",
    f"{IMAGE_PLACEHOLDER}\nGive a short caption for the image.",
    f"{IMAGE_PLACEHOLDER}\nList the objects in the image from left to right.",
    CAPTION_PROMPT,
)
POPE_QUESTION = "Is there a {colour} {shape} in the image?"

# Attribute sets an expression may name, shortest first; ("size", "colour", "shape") is always unique.
_DESCRIPTION_LEVELS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)
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
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "side": self.side,
                "box": list(self.box)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldObject:
        """Inverse of :meth:`to_json`."""
        box = tuple(int(v) for v in data["box"])
        if len(box) != 4:
            raise ValueError(f"an object box needs 4 numbers, got {data['box']!r}")
        return cls(shape=str(data["shape"]), colour=str(data["colour"]), size=str(data["size"]),
                   side=int(data["side"]), box=box)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scene:
    """One image's objects, sorted left to right (by centre x, then centre y)."""

    image: str
    split: str
    image_size: int
    objects: tuple[WorldObject, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"image": self.image, "split": self.split, "width": self.image_size, "height": self.image_size,
                "objects": [obj.to_json() for obj in self.objects]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_json`."""
        return cls(image=str(data["image"]), split=str(data["split"]), image_size=int(data["width"]),
                   objects=tuple(WorldObject.from_json(obj) for obj in data["objects"]))


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
            raise ValueError("need num_train_images >= 1 and num_test_images >= 0, got "
                             f"{self.num_train_images} and {self.num_test_images}")
        if self.image_size < 24:
            raise ValueError(f"image_size must be at least 24 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 5:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 5, got {self.min_objects}, {self.max_objects}")
        unknown_shapes = [s for s in self.shapes if s not in SHAPES]
        unknown_colours = [c for c in self.colours if c not in COLOURS]
        if unknown_shapes or unknown_colours or not self.shapes or not self.colours:
            raise ValueError(f"shapes must come from {SHAPES} and colours from {tuple(COLOURS)}; "
                             f"got shapes={self.shapes}, colours={self.colours}")
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


@dataclass(frozen=True)
class WorldFiles:
    """Paths of a generated world (train files in LLaVA/JSONL form, test files in benchmark form)."""

    root: Path
    images_dir: Path = field(init=False)
    train_captions: Path = field(init=False)
    train_rec: Path = field(init=False)
    train_pope: Path = field(init=False)
    test_captions: Path = field(init=False)
    test_rec: Path = field(init=False)
    test_pope: Path = field(init=False)
    scenes: Path = field(init=False)
    summary: Path = field(init=False)

    def __post_init__(self) -> None:
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        names = {
            "images_dir": "images",
            "train_captions": "train_captions.json",
            "train_rec": "train_rec.jsonl",
            "train_pope": "train_pope.json",
            "test_captions": "test_captions.json",
            "test_rec": "test_rec.jsonl",
            "test_pope": "test_pope.json",
            "scenes": "scenes.jsonl",
            "summary": "world.json",
        }
        for attribute, name in names.items():
            object.__setattr__(self, attribute, root / name)

    def all_files(self) -> list[Path]:
        """Every annotation file (not the images)."""
        return [self.train_captions, self.train_rec, self.train_pope, self.test_captions, self.test_rec,
                self.test_pope, self.scenes, self.summary]


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


def caption(scene: Scene) -> str:
    """A caption naming every object with size, colour and shape, left to right."""
    phrases = [f"a {obj.describe(('size', 'colour', 'shape'))}" for obj in scene.objects]
    if not phrases:
        raise ValueError(f"scene {scene.image} has no objects")
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def _matching(objects: Sequence[WorldObject], reference: WorldObject, attributes: Sequence[str]) -> list[int]:
    """Indices of the objects that agree with ``reference`` on every attribute in ``attributes``."""
    return [i for i, obj in enumerate(objects)
            if all(getattr(obj, name) == getattr(reference, name) for name in attributes)]


def _relation_holds(a: WorldObject, b: WorldObject, relation: str) -> bool:
    """``a`` lies strictly (box-wise, no overlap in that axis) ``relation`` ``b``."""
    if relation == "left of":
        return a.box[2] <= b.box[0]
    if relation == "right of":
        return a.box[0] >= b.box[2]
    if relation == "above":
        return a.box[3] <= b.box[1]
    if relation == "below":
        return a.box[1] >= b.box[3]
    raise ValueError(f"unknown relation {relation!r}")


def _centre_relation_holds(a: WorldObject, b: WorldObject, relation: str) -> bool:
    """``a``'s centre lies ``relation`` ``b``'s centre (the loose reading of a relation)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def _minimal_description(objects: Sequence[WorldObject], index: int) -> tuple[str, ...]:
    """The shortest attribute set that picks out ``objects[index]`` alone."""
    for attributes in _DESCRIPTION_LEVELS:
        if _matching(objects, objects[index], attributes) == [index]:
            return attributes
    raise ValueError("two objects share size, colour and shape; no description separates them")


def expression_pool(scene: Scene, index: int, rng: random.Random, relational: bool = True) -> list[str]:
    """Referring expressions that pick out ``scene.objects[index]`` alone; the shortest comes first.

    Attribute expressions ("the circle", "the red circle", "the small circle", "the small red circle") are
    kept when exactly one object matches. With ``relational``, at most one relational expression is added,
    for an attribute set that is NOT unique ("the circle left of the blue square"): the referent lies
    strictly on that side of the landmark box-wise, and every other matching object lies on the other side
    by centre, so both readings of the relation agree.
    """
    objects = scene.objects
    referent = objects[index]
    pool = [f"the {referent.describe(attributes)}" for attributes in _DESCRIPTION_LEVELS
            if _matching(objects, referent, attributes) == [index]]
    if not pool:
        raise ValueError(f"object {index} of {scene.image} has no unique description")
    if relational:
        options = []
        for attributes in _DESCRIPTION_LEVELS:
            candidates = _matching(objects, referent, attributes)
            if len(candidates) < 2:
                continue
            for landmark_index, landmark in enumerate(objects):
                if landmark_index in candidates:
                    continue
                landmark_text = landmark.describe(_minimal_description(objects, landmark_index))
                for relation in RELATIONS:
                    if not _relation_holds(referent, landmark, relation):
                        continue
                    others = [objects[i] for i in candidates if i != index]
                    if any(_centre_relation_holds(other, landmark, relation) for other in others):
                        continue
                    options.append(f"the {referent.describe(attributes)} {relation} the {landmark_text}")
        if options:
            pool.append(rng.choice(options))
    return pool


def pope_questions(scene: Scene, rng: random.Random, config: WorldConfig) -> list[tuple[str, bool]]:
    """Balanced ``(question, answer)`` pairs: as many present as absent colour-shape combinations.

    A share ``hard_negative_fraction`` of the absent ones shares a colour or a shape with a present object.
    """
    present = sorted({(obj.colour, obj.shape) for obj in scene.objects})
    absent = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in present]
    count = min(config.pope_pairs_per_image, len(present), len(absent))
    positives = rng.sample(present, count)
    present_colours = {c for c, _ in present}
    present_shapes = {s for _, s in present}
    hard = [(c, s) for c, s in absent if c in present_colours or s in present_shapes]
    negatives: list[tuple[str, str]] = []
    for _ in range(count):
        source = hard if hard and rng.random() < config.hard_negative_fraction else absent
        pick = rng.choice(source)
        negatives.append(pick)
        absent.remove(pick)
        if pick in hard:
            hard.remove(pick)
    pairs = [(POPE_QUESTION.format(colour=c, shape=s), True) for c, s in positives]
    pairs += [(POPE_QUESTION.format(colour=c, shape=s), False) for c, s in negatives]
    rng.shuffle(pairs)
    return pairs


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON with a final newline."""
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object a line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _conversation(conv_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    """One single-turn LLaVA conversation record."""
    return {"id": conv_id, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def generate_world(out_dir: Path | str, config: WorldConfig | None = None) -> WorldFiles:
    """Write the images and annotation files of a world under ``out_dir``, deterministically from the seed.

    Train and test images come from separate random streams, and an image whose pixels repeat an earlier
    one is redrawn, so no test image appears among the train images. Stale ``train_*.png`` / ``test_*.png``
    files left in ``out_dir/images`` by a bigger earlier world are removed.
    """
    config = config if config is not None else WorldConfig()
    config.validate()
    files = WorldFiles(Path(out_dir))
    files.images_dir.mkdir(parents=True, exist_ok=True)
    expected = {f"train_{i:05d}.png" for i in range(config.num_train_images)}
    expected |= {f"test_{i:05d}.png" for i in range(config.num_test_images)}
    for stale in sorted(files.images_dir.glob("*.png")):
        if stale.name.startswith(("train_", "test_")) and stale.name not in expected:
            stale.unlink()

    seen: set[bytes] = set()
    scenes: dict[str, list[Scene]] = {"train": [], "test": []}
    for split, count in (("train", config.num_train_images), ("test", config.num_test_images)):
        scene_rng = random.Random(f"comm-demo-world:{config.seed}:{split}:scenes")
        for index in range(count):
            name = f"{split}_{index:05d}.png"
            while True:
                scene = sample_scene(scene_rng, config, f"{files.images_dir.name}/{name}", split)
                image = render_scene(scene)
                digest = hashlib.sha1(image.tobytes()).digest()
                if digest not in seen:
                    break
            seen.add(digest)
            image.save(files.images_dir / name, format="PNG")
            scenes[split].append(scene)

    text_rng = random.Random(f"comm-demo-world:{config.seed}:train:texts")
    train_captions, train_rec, train_pope = [], [], []
    for scene in scenes["train"]:
        stem = Path(scene.image).stem
        train_captions.append(_conversation(f"{stem}_caption", scene.image,
                                            text_rng.choice(CAPTION_QUESTIONS), caption(scene)))
        for obj_index, obj in enumerate(scene.objects):
            pool = expression_pool(scene, obj_index, text_rng, config.relational_expressions)
            extra = min(config.train_expressions_per_object - 1, len(pool) - 1)
            for expression in [pool[0], *text_rng.sample(pool[1:], extra)]:
                train_rec.append({"id": f"{stem}_rec_{len(train_rec):06d}", "image": scene.image,
                                  "expression": expression, "bbox": obj.xywh()})
        for question, answer in pope_questions(scene, text_rng, config):
            train_pope.append(_conversation(f"{stem}_pope_{len(train_pope):06d}", scene.image,
                                            f"{IMAGE_PLACEHOLDER}\n{question}", "Yes" if answer else "No"))

    text_rng = random.Random(f"comm-demo-world:{config.seed}:test:texts")
    test_captions, test_rec, test_pope = [], [], []
    for image_id, scene in enumerate(scenes["test"]):
        stem = Path(scene.image).stem
        sentence = caption(scene)
        test_captions.append({
            "filepath": files.images_dir.name, "filename": Path(scene.image).name, "imgid": image_id,
            "split": "test", "sentids": [image_id],
            "sentences": [{"raw": sentence, "tokens": sentence.lower().replace(",", "").rstrip(".").split(),
                           "imgid": image_id, "sentid": image_id}],
        })
        for obj_index, obj in enumerate(scene.objects):
            pool = expression_pool(scene, obj_index, text_rng, config.relational_expressions)
            test_rec.append({"id": f"{stem}_rec_{len(test_rec):06d}", "image": scene.image,
                             "expression": text_rng.choice(pool), "bbox": obj.xywh()})
        for question, answer in pope_questions(scene, text_rng, config):
            test_pope.append({"question_id": len(test_pope), "image": scene.image, "text": question,
                              "label": "yes" if answer else "no"})

    _write_json(files.train_captions, train_captions)
    _write_jsonl(files.train_rec, train_rec)
    _write_json(files.train_pope, train_pope)
    _write_json(files.test_captions, {"images": test_captions, "dataset": "comm-demo-world"})
    _write_jsonl(files.test_rec, test_rec)
    _write_jsonl(files.test_pope, test_pope)
    _write_jsonl(files.scenes, (scene.to_json() for split in ("train", "test") for scene in scenes[split]))
    _write_json(files.summary, {
        "config": config.to_json(),
        "counts": {
            "train_images": len(scenes["train"]), "test_images": len(scenes["test"]),
            "train_captions": len(train_captions), "train_rec": len(train_rec), "train_pope": len(train_pope),
            "test_captions": len(test_captions), "test_rec": len(test_rec), "test_pope": len(test_pope),
            "objects": sum(len(scene.objects) for split in scenes.values() for scene in split),
        },
        "colours": {name: list(COLOURS[name]) for name in config.colours},
        "background": list(BACKGROUND),
    })
    return files


def load_scenes(path: Path | str) -> list[Scene]:
    """Read the scenes written to ``scenes.jsonl``."""
    with open(path, encoding="utf-8") as handle:
        return [Scene.from_json(json.loads(line)) for line in handle if line.strip()]


def all_texts(files: WorldFiles) -> list[str]:
    """Every text of the train files (questions, answers, expressions), in file order, for tokenizer training."""
    texts: list[str] = []
    for path in (files.train_captions, files.train_pope):
        for record in json.loads(path.read_text(encoding="utf-8")):
            texts.extend(turn["value"] for turn in record["conversations"])
    with open(files.train_rec, encoding="utf-8") as handle:
        texts.extend(json.loads(line)["expression"] for line in handle if line.strip())
    return texts
