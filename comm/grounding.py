"""A grounding answer read back: the first box it names, mapped from the padded square to original-image pixels."""

from __future__ import annotations

from dataclasses import dataclass

from comm.boxes import Box, denormalize_box, parse_box


@dataclass(frozen=True)
class Grounding:
    """One grounding result: the box in original-image pixels (None when the answer has no box) and the answer."""

    box: Box | None
    answer: str
    image_size: tuple[int, int]

    @classmethod
    def from_answer(cls, answer: str, image_size: tuple[int, int]) -> Grounding:
        """Read the answer's first ``[x0,y0,x1,y1]`` box (normalised to the padded square) in pixels of the image.

        >>> Grounding.from_answer("It is at [0.0,0.25,0.5,0.75].", (200, 100)).box
        (0.0, 0.0, 100.0, 100.0)
        """
        width, height = image_size
        normalized = parse_box(answer)
        box = denormalize_box(normalized, width, height) if normalized is not None else None
        return cls(box=box, answer=answer, image_size=(width, height))
