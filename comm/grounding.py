"""A grounding answer read back: the first box it names, mapped from the towers' square to original-image pixels."""

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
    def from_answer(cls, answer: str, image_size: tuple[int, int], pad_to_square: bool = True) -> Grounding:
        """Read the answer's first ``[x0,y0,x1,y1]`` box in pixels of the image.

        The box is normalised to the square the towers saw: the padded square, or the centre crop when the
        processor does not pad (``pad_to_square=False``; see `comm.boxes.visible_square`).

        >>> Grounding.from_answer("It is at [0.0,0.25,0.5,0.75].", (200, 100)).box
        (0.0, 0.0, 100.0, 100.0)
        >>> Grounding.from_answer("It is at [0.0,0.25,0.5,0.75].", (200, 100), pad_to_square=False).box
        (50.0, 25.0, 100.0, 75.0)
        """
        width, height = image_size
        normalized = parse_box(answer)
        box = denormalize_box(normalized, width, height, pad_to_square) if normalized is not None else None
        return cls(box=box, answer=answer, image_size=(width, height))
