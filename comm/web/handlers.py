"""What the web demo's buttons do, without the browser: open an image, caption it, ground an expression, chat.

Each handler takes the page's values and returns (or yields, while the answer grows) the new values, the last
one a status line for the page. Bad input and a busy model become that status line; nothing here raises for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from comm.conversation import IMAGE_PLACEHOLDER
from comm.errors import one_line
from comm.images import load_image
from comm.pipeline import CommPipeline
from comm.visualize import draw_boxes
from comm.web.runner import BusyError, ModelRunner

Turns = list[list[str]]  # the chat so far: [question, answer] pairs (lists: how the page's state keeps them)
Messages = list[dict[str, str]]  # the chat as the page's chatbot shows it: {"role", "content"} dicts
BOX_COLOR = (255, 0, 0)
LABEL_CHARS = 40
# Errors that bad input or a busy model give; anything else is a bug and reaches the page as gradio's error.
EXPECTED_ERRORS = (ValueError, TypeError, OSError, BusyError)
NO_IMAGE = "upload an image or pick an example first"
# Smaller images are shown enlarged by a whole factor (pixels kept sharp), so that they and their box are legible.
DISPLAY_SIDE = 320


def error_status(error: BaseException) -> str:
    """The page's status line for an error: ``error: message`` on one line."""
    return f"error: {one_line(error)}"


def _check_text(text: str | None, what: str) -> str:
    """``text`` stripped, or a ValueError when it is empty or holds the image placeholder (the page places the
    image itself). Special-token text (``</s>``...) is refused by `CommPipeline` with a message naming it."""
    text = (text or "").strip()
    if not text:
        raise ValueError(f"the {what} is empty: type one first")
    if IMAGE_PLACEHOLDER in text:
        raise ValueError(f"the {what} holds {IMAGE_PLACEHOLDER}, which marks the image's place: remove it")
    return text


def for_display(image: Image.Image) -> tuple[Image.Image, int]:
    """``image`` as the page shows it, and the whole factor it was enlarged by to reach `DISPLAY_SIDE` (1 if not).

    >>> for_display(Image.new("RGB", (64, 32)))[0].size
    (320, 160)
    """
    factor = max(1, math.ceil(DISPLAY_SIDE / max(image.size)))
    if factor == 1:
        return image, 1
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST), factor


def chat_messages(turns: Turns) -> Messages:
    """The chat's turns as chatbot messages."""
    messages: Messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def box_text(answer: str, box: tuple[float, float, float, float] | None, size: tuple[int, int]) -> str:
    """What the page says about a grounding answer: the model's text and the box in pixels, or that it has none."""
    if box is None:
        return f"{answer}\nno box in this answer"
    pixels = ", ".join(f"{value:.1f}" for value in box)
    return f"{answer}\nbox ({pixels}) in pixels of the {size[0]}x{size[1]} image"


class WebHandlers:
    """The demo page's handlers on one `CommPipeline`, one model request at a time (`ModelRunner`)."""

    def __init__(self, pipe: CommPipeline, max_new_tokens: int | None = None):
        self.pipe = pipe
        self.runner = ModelRunner(pipe)
        self.generate_options: dict[str, Any] = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}

    def open_image(self, path: str | Path | None) -> tuple[Any, ...]:
        """A new image (uploaded or picked): (preview, image state, caption, ground text, ground picture, chat,
        turns, status). The earlier answers and chat are cleared: they were about another image."""
        cleared = ("", "", None, [], [])
        if path is None:
            return (None, None, *cleared, NO_IMAGE)
        try:
            image = load_image(path, Path(path).name)
        except EXPECTED_ERRORS as error:
            return (None, None, *cleared, error_status(error))
        return (for_display(image)[0], image, *cleared, f"image {image.width}x{image.height} ready")

    def caption(self, image: Image.Image | None) -> Iterator[tuple[str, str]]:
        """Caption the image: yields (caption so far, status)."""
        if image is None:
            yield "", NO_IMAGE
            return
        try:
            running = self.runner.start(lambda **stream: self.pipe.caption(image, **stream, **self.generate_options))
            for text in running:
                yield text, "captioning..."
            caption = running.result[0]
        except EXPECTED_ERRORS as error:
            yield "", error_status(error)
            return
        yield caption, "captioned"

    def ground(
        self, image: Image.Image | None, expression: str | None
    ) -> Iterator[tuple[str, Image.Image | None, str]]:
        """Ground ``expression``: yields (answer text so far, the image with the box drawn, status); the text gives
        the box in the image's own pixels, the picture is `for_display`'s."""
        if image is None:
            yield "", None, NO_IMAGE
            return
        try:
            expression = _check_text(expression, "expression")
            running = self.runner.start(
                lambda **stream: self.pipe.ground_detailed(image, [expression], **stream, **self.generate_options)
            )
            for text in running:
                yield text, None, "grounding..."
            (result,) = running.result
        except EXPECTED_ERRORS as error:
            yield "", None, error_status(error)
            return
        text = box_text(result.answer, result.box, result.image_size)
        shown, factor = for_display(image)
        if result.box is None:
            yield text, shown, "no box in the answer"
            return
        label = expression if len(expression) <= LABEL_CHARS else expression[: LABEL_CHARS - 3] + "..."
        box = tuple(value * factor for value in result.box)
        yield text, draw_boxes(shown, [(box, BOX_COLOR, label)]), "box drawn"

    def chat(
        self, image: Image.Image | None, message: str | None, turns: Turns | None
    ) -> Iterator[tuple[Messages, Turns, str, str]]:
        """One chat turn about the image: yields (chatbot messages, turns, message box, status); the earlier turns
        go to `CommPipeline.ask` as its history."""
        turns = [list(turn) for turn in turns or []]
        shown = chat_messages(turns)
        if image is None:
            yield shown, turns, message or "", NO_IMAGE
            return
        try:
            question = _check_text(message, "question")
            history = [(q, a) for q, a in turns]
            running = self.runner.start(
                lambda **stream: self.pipe.ask(image, question, history=history, **stream, **self.generate_options)
            )
            asked = [*shown, {"role": "user", "content": question}]
            for text in running:
                yield [*asked, {"role": "assistant", "content": text}], turns, message or "", "answering..."
            answer = running.result
        except EXPECTED_ERRORS as error:
            yield shown, turns, message or "", error_status(error)
            return
        turns.append([question, answer])
        yield chat_messages(turns), turns, "", "answered"

    def start_over(self) -> tuple[Messages, Turns, str, str]:
        """A new conversation about the same image: (chatbot messages, turns, message box, status)."""
        return [], [], "", "new conversation"
