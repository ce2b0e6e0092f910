"""The text made from a demo scene: its caption, referring expressions, POPE and attribute questions."""

from __future__ import annotations

import random
from collections.abc import Sequence

from comm.conversation import CAPTION_PROMPT, IMAGE_PLACEHOLDER
from comm.demo.scenes import RELATIONS, Scene, WorldConfig, WorldObject

CAPTION_QUESTIONS: tuple[str, ...] = (
    f"{IMAGE_PLACEHOLDER}\nDescribe the image briefly.",
    f"{IMAGE_PLACEHOLDER}\nWhat is in this picture?",
    f"{IMAGE_PLACEHOLDER}\nGive a short caption for the image.",
    f"{IMAGE_PLACEHOLDER}\nList the objects in the image from left to right.",
    CAPTION_PROMPT,
)
POPE_QUESTION = "Is there a {colour} {shape} in the image?"
COLOUR_QUESTION = "What colour is the {shape}?"
SHAPE_QUESTION = "What shape is the {colour} object?"

# Attribute sets an expression may name, shortest first; ("size", "colour", "shape") is always unique.
_DESCRIPTION_LEVELS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)


def caption(scene: Scene) -> str:
    """A caption naming every object with size, colour and shape, left to right."""
    phrases = [f"a {obj.describe(('size', 'colour', 'shape'))}" for obj in scene.objects]
    if not phrases:
        raise ValueError(f"scene {scene.image} has no objects")
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def _matching(objects: Sequence[WorldObject], reference: WorldObject, attributes: Sequence[str]) -> list[int]:
    """Indices of the objects that agree with ``reference`` on every attribute in ``attributes``."""
    return [
        i for i, obj in enumerate(objects) if all(getattr(obj, name) == getattr(reference, name) for name in attributes)
    ]


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
    pool = [
        f"the {referent.describe(attributes)}"
        for attributes in _DESCRIPTION_LEVELS
        if _matching(objects, referent, attributes) == [index]
    ]
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


def attribute_questions(scene: Scene, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Up to ``count`` ``(question, answer)`` pairs asking one attribute of an object named by the other.

    "What colour is the circle?" -> "Red" where the circle is the only circle, "What shape is the red object?"
    -> "Circle" where it is the only red object. Unlike POPE's yes/no, the answer is a word the object's own
    tokens carry, so the model first learns to read colours and shapes off the image and then to find the
    object the question names; without them the demo's POPE stays at 0.50 (README, findings).
    """
    pairs = []
    for obj in scene.objects:
        if sum(other.shape == obj.shape for other in scene.objects) == 1:
            pairs.append((COLOUR_QUESTION.format(shape=obj.shape), obj.colour.capitalize()))
        if sum(other.colour == obj.colour for other in scene.objects) == 1:
            pairs.append((SHAPE_QUESTION.format(colour=obj.colour), obj.shape.capitalize()))
    return rng.sample(pairs, min(count, len(pairs)))
