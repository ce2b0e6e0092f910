"""`CommPipeline`: caption, ground (referring expression -> pixel box) and ask, on images of any size, batched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from comm.boxes import Box
from comm.conversation import CAPTION_PROMPT, IMAGE_PLACEHOLDER, ConversationTemplate, rec_prompt, with_image
from comm.generation import generate_answers
from comm.grounding import Grounding
from comm.images import ImageInput, load_image
from comm.loading import load_model_and_processor
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CommProcessor, special_token_texts

CAPTION_MAX_NEW_TOKENS = 64
GROUND_MAX_NEW_TOKENS = 64  # "[0.123,0.456,0.789,0.999]" is ~27 LLaMA tokens (digits are single tokens)
ASK_MAX_NEW_TOKENS = 256
DEFAULT_BATCH_SIZE = 8


def _is_single_image(images: Any) -> bool:
    return isinstance(images, (Image.Image, str, Path)) or (isinstance(images, np.ndarray) and images.ndim != 4)


def _image_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """The images as a list, and whether a single image was given (a 4-D array is a batch of images)."""
    if _is_single_image(images):
        return [images], True
    if isinstance(images, np.ndarray):
        image_list = list(images)
    elif isinstance(images, Sequence):
        image_list = list(images)
    else:
        raise TypeError(
            f"expected an image (PIL image, path or numpy array) or a list of images, got {type(images).__name__}"
        )
    if not image_list:
        raise ValueError("no images given: pass an image or a non-empty list of images")
    return image_list, False


def _text_list(texts: str | Sequence[str], kind: str) -> tuple[list[str], bool]:
    """The strings as a list, and whether a single string was given; each must be a non-empty string."""
    if isinstance(texts, str):
        text_list, single = [texts], True
    elif isinstance(texts, Sequence):
        text_list, single = list(texts), False
    else:
        raise TypeError(f"expected a {kind} string or a list of them, got {type(texts).__name__}")
    if not text_list:
        raise ValueError(f"no {kind}s given: pass a {kind} or a non-empty list of them")
    for i, text in enumerate(text_list):
        if not isinstance(text, str):
            raise TypeError(f"{kind} {i}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{kind} {i} is empty")
    return text_list, single


def load_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """Open and validate every image (path, PIL image or array) as RGB; errors name the image and its index.

    The pipeline hands these images on as they are: a path is decoded here only, an RGB PIL image is not copied.

    >>> load_images(["cat.jpg", "dog.png"])  # doctest: +SKIP
    [<PIL.Image.Image image mode=RGB size=640x480>, <PIL.Image.Image image mode=RGB size=500x375>]
    """
    image_list, _ = _image_list(images)
    return [load_image(image, f"image {i}") for i, image in enumerate(image_list)]


def _load_pairs(
    images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str], kind: str
) -> tuple[list[Image.Image], list[str], bool]:
    """Load the images and match them with texts: one of each, two lists of one length, or one side broadcast.

    Returns the loaded images, the texts (both of one length) and whether a single pair was given.
    """
    image_list, single_image = _image_list(images)
    text_list, single_text = _text_list(texts, kind)
    if not single_image and not single_text and len(image_list) != len(text_list):
        raise ValueError(f"got {len(image_list)} images but {len(text_list)} {kind}s: pass one {kind} per image")
    loaded = load_images(image_list)
    if single_image and not single_text:
        loaded = loaded * len(text_list)
    elif single_text and not single_image:
        text_list = text_list * len(loaded)
    return loaded, text_list, single_image and single_text


@dataclass(frozen=True)
class _Continuation:
    """A template bound to earlier turns: ``prompt(question)`` continues that conversation (the one method
    `generate_answers` calls on its template)."""

    template: ConversationTemplate
    history: tuple[tuple[str, str], ...]

    def prompt(self, question: str) -> str:
        return self.template.prompt(question, self.history)


def _single_conversation(count: int, what: str) -> None:
    """Raise ValueError saying ``what`` unless there is one image/question pair (``count``)."""
    if count != 1:
        raise ValueError(f"{what}, got {count} pairs")


def _check_history(history: Any) -> list[tuple[str, str]]:
    """``history`` as ``(question, answer)`` pairs, or a ValueError/TypeError naming the bad turn."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2:
            raise ValueError(f"history turn {i} must be a (question, answer) pair, got {turn!r}")
        question, answer = turn
        if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
            raise ValueError(f"history turn {i}: the question must be a non-empty string and the answer a string")
        turns.append((question, answer))
    return turns


def _conversation_turns(questions: list[str], history: Any | None) -> tuple[list[str], list[tuple[str, str]]]:
    """The questions to answer and the earlier turns they follow: without a ``history`` each question gets the image
    in front (`with_image`); a history (one question only) gets it in front of its first question unless a turn
    holds it."""
    if history is None or not (turns := _check_history(history)):
        return [with_image(question) for question in questions], []
    _single_conversation(len(questions), "a history continues one conversation: give one image and one question")
    if not any(IMAGE_PLACEHOLDER in question for question, _ in turns):
        turns[0] = (with_image(turns[0][0]), turns[0][1])
    return questions, turns


class CommPipeline:
    """Inference with a COMM model: captions, grounding boxes in pixels, and free-form answers.

    Every call takes one image or a list (PIL images, paths or HxW(xC) uint8 arrays), validates all of
    them and the texts before any model work, batches them with left padding and returns results in input order.
    Each prompt is tokenized once, for generation; one over the model's limit is refused then, before its batch
    generates.

    >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
    >>> pipe.caption("street.jpg")  # doctest: +SKIP
    ['A man riding a bike down a city street.']
    """

    def __init__(self, model: CommForConditionalGeneration, processor: CommProcessor):
        """Wrap a loaded model and its processor (``model`` is put in eval mode); prompts follow the processor's
        conversation template (``processor.template``).

        >>> pipe = CommPipeline(model, processor)  # doctest: +SKIP
        """
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **model_kwargs: Any,
    ) -> CommPipeline:
        """Load model and processor from one folder (a training export or a hub-style folder, or a hub id).

        See `comm.loading.load_model_and_processor`: the folder is checked for ``config.json``,
        ``processor_config.json``, the image processors and the weights before anything is loaded; the device
        defaults to CUDA when available, else CPU; the dtype to bf16 on GPUs that support it (fp16 on older GPUs)
        and float32 on CPU. ``model_kwargs`` go to `CommForConditionalGeneration.from_pretrained`
        (``attn_implementation``...).

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final", device="cpu", dtype="bf16")  # doctest: +SKIP
        """
        return cls(*load_model_and_processor(path_or_name, device, dtype, **model_kwargs))

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return self.model.dtype

    @property
    def template(self) -> ConversationTemplate:
        """How prompts are rendered: the processor's conversation template."""
        return self.processor.template

    def _check_questions(self, questions: Sequence[str], history: Sequence[tuple[str, str]] = ()) -> None:
        """No text holds a special token's text, and each prompt holds one image placeholder (history included).

        Whether a prompt fits the model's context is checked on the processor's tokens as they are made for
        generation (`comm.generation.encode_batch` with ``truncate=False``): each prompt is tokenized once.
        """
        earlier = sum(question.count(IMAGE_PLACEHOLDER) for question, _ in history)
        special = special_token_texts(self.processor.tokenizer)
        texts = [(f"question {i}", q) for i, q in enumerate(questions)]
        texts += [(f"history turn {i}", text) for i, turn in enumerate(history) for text in turn]
        for name, text in texts:
            found = [token for token in special if token in text]
            if found:
                raise ValueError(
                    f"{name} holds the text {found[0]!r}, which the tokenizer reads as its special token, not as "
                    "text: remove it"
                )
        for i, question in enumerate(questions):
            count = earlier + question.count(IMAGE_PLACEHOLDER)
            if count != 1:
                raise ValueError(f"question {i} holds {count} {IMAGE_PLACEHOLDER} placeholders, expected 1")

    def _generate(
        self,
        images: list[Image.Image],
        questions: list[str],
        batch_size: int,
        history: Sequence[tuple[str, str]] = (),
        **generate_kwargs: Any,
    ) -> list[str]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_questions(questions, history)
        template = _Continuation(self.template, tuple(history)) if history else self.template
        return generate_answers(
            self.model,
            self.processor,
            images,
            questions,
            batch_size=batch_size,
            template=template,
            truncate=False,
            **generate_kwargs,
        )

    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompt: str | None = None,
        max_new_tokens: int = CAPTION_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Caption each image (a list, in input order, also for one image); greedy unless sampling is asked.

        ``prompt`` defaults to the training caption prompt; ``generate_kwargs`` go to ``model.generate``
        (``do_sample=True, temperature=0.7``, ``num_beams``...), ``progress=True`` shows a progress bar.

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe.caption(["kitchen.jpg", "beach.png"], batch_size=16)  # doctest: +SKIP
        ['A kitchen with a stove and a sink.', 'People walking on a sandy beach.']
        """
        loaded = load_images(images)
        question = with_image(prompt if prompt is not None else CAPTION_PROMPT)
        questions = [question] * len(loaded)
        return self._generate(loaded, questions, batch_size, max_new_tokens=max_new_tokens, **generate_kwargs)

    def _ground(
        self,
        images: ImageInput | Sequence[ImageInput],
        expressions: str | Sequence[str],
        batch_size: int,
        **generate_kwargs: Any,
    ) -> tuple[list[Grounding], bool]:
        loaded, expression_list, single = _load_pairs(images, expressions, "expression")
        questions = [rec_prompt(expression) for expression in expression_list]
        answers = self._generate(loaded, questions, batch_size, **generate_kwargs)
        pad_to_square = self.processor.pad_to_square  # the square the answers' boxes are normalised to
        results = [Grounding.from_answer(answer, image.size, pad_to_square) for image, answer in zip(loaded, answers)]
        return results, single

    def ground_detailed(
        self,
        images: ImageInput | Sequence[ImageInput],
        expressions: str | Sequence[str],
        max_new_tokens: int = GROUND_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **generate_kwargs: Any,
    ) -> list[Grounding]:
        """Like `ground`, always as a list of `Grounding` (pixel box or None, the raw answer, the image size).

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe.ground_detailed("dogs.jpg", "the dog on the left")  # doctest: +SKIP
        [Grounding(box=(12.0, 0.0, 310.0, 330.0), answer='[0.019,0.125,0.484,0.641]', image_size=(640, 480))]
        """
        results, _ = self._ground(images, expressions, batch_size, max_new_tokens=max_new_tokens, **generate_kwargs)
        return results

    def ground(
        self,
        images: ImageInput | Sequence[ImageInput],
        expressions: str | Sequence[str],
        max_new_tokens: int = GROUND_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **generate_kwargs: Any,
    ) -> Box | None | list[Box | None]:
        """The box ``(x0, y0, x1, y1)`` in original-image pixels of each referring expression, None if no box.

        One image and one expression give one box; lists give a list (same length, in order); one image with
        a list of expressions (or one expression with a list of images) is broadcast.

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe.ground("dogs.jpg", "the dog on the left")  # doctest: +SKIP
        (12.0, 0.0, 310.0, 330.0)
        >>> pipe.ground(["a.jpg", "b.jpg"], ["the red car", "a man in a hat"])  # doctest: +SKIP
        [(40.5, 22.0, 200.1, 150.0), None]
        """
        results, single = self._ground(
            images, expressions, batch_size, max_new_tokens=max_new_tokens, **generate_kwargs
        )
        boxes = [result.box for result in results]
        return boxes[0] if single else boxes

    def ask(
        self,
        images: ImageInput | Sequence[ImageInput],
        questions: str | Sequence[str],
        streamer: Any | None = None,
        max_new_tokens: int = ASK_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        history: Sequence[tuple[str, str]] | None = None,
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """Answer a question about an image (a string), or questions about images (a list, in input order).

        Questions without ``<image>`` get it in front; one image with a list of questions (or the reverse)
        is broadcast. ``history`` continues a conversation about one image: the earlier ``(question, answer)``
        turns, in order (the image's ``<image>`` goes in front of the first question unless a turn holds it); the
        new question then follows them, as in multi-turn training data. ``streamer`` (a transformers
        ``TextStreamer`` or ``TextIteratorStreamer``) receives the tokens as they are generated; streaming works
        for a single image and question only. When the call fails (bad input included) the streamer is ended, so
        a consumer in another thread stops waiting.

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe.ask("street.jpg", "How many people are crossing?")  # doctest: +SKIP
        'Three people are crossing the street.'
        >>> pipe.ask("street.jpg", "And which way?", history=[("How many people are crossing?", "Three.")])
        ... # doctest: +SKIP
        'From left to right.'
        >>> from threading import Thread  # doctest: +SKIP
        >>> from transformers import TextIteratorStreamer  # doctest: +SKIP
        >>> streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        ... # doctest: +SKIP
        >>> Thread(target=pipe.ask, args=("street.jpg", "What is going on?"), kwargs={"streamer": streamer}).start()
        ... # doctest: +SKIP
        >>> for piece in streamer: print(piece, end="", flush=True)  # doctest: +SKIP
        """
        try:
            loaded, question_list, single = _load_pairs(images, questions, "question")
            if streamer is not None:
                _single_conversation(len(question_list), "streaming needs a single image and a single question")
                generate_kwargs["streamer"] = streamer
            prompts, turns = _conversation_turns(question_list, history)
            answers = self._generate(
                loaded, prompts, batch_size, history=turns, max_new_tokens=max_new_tokens, **generate_kwargs
            )
        except BaseException:
            if streamer is not None and hasattr(streamer, "end"):
                streamer.end()  # release a consumer iterating a TextIteratorStreamer in another thread
            raise
        return answers[0] if single else answers
