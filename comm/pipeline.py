"""`CommPipeline`: caption, ground (referring expression -> pixel box) and ask, on images of any size, batched."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from comm.boxes import Box, denormalize_box, parse_box
from comm.conversation import CAPTION_PROMPT, IMAGE_PLACEHOLDER, VICUNA_V1, ConversationTemplate, rec_prompt, with_image
from comm.generation import generate_answers
from comm.model.modeling import CommForConditionalGeneration
from comm.processing import CLIP_SUBFOLDER, DINO_SUBFOLDER, PROCESSOR_CONFIG, CommProcessor, ImageInput, load_image

CAPTION_MAX_NEW_TOKENS = 64
GROUND_MAX_NEW_TOKENS = 64  # "[0.123,0.456,0.789,0.999]" is ~27 LLaMA tokens (digits are single tokens)
ASK_MAX_NEW_TOKENS = 256
DEFAULT_BATCH_SIZE = 8

MODEL_CONFIG = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class Grounding:
    """One grounding result: the box in original-image pixels (None when the answer has no box) and the answer."""

    box: Box | None
    answer: str
    image_size: tuple[int, int]


def default_device() -> torch.device:
    """CUDA when available, else CPU.

    >>> default_device()  # on a machine without a GPU
    device(type='cpu')
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``dtype`` as a torch dtype; by default bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    >>> resolve_dtype("bf16", torch.device("cpu"))
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}")
        return _DTYPES[key]
    if dtype is not None:
        raise TypeError(f"dtype must be a torch.dtype, a string or None, got {type(dtype).__name__}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_model_folder(folder: str | Path, require_weights: bool = True) -> Path:
    """Raise a clear error naming ``folder`` and what it lacks unless it holds a complete COMM model + processor.

    Only small files are read: nothing here loads weights.

    >>> check_model_folder("runs/stage2/final")  # doctest: +SKIP
    PosixPath('runs/stage2/final')
    """
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a model folder")
    required = [
        MODEL_CONFIG,
        PROCESSOR_CONFIG,
        f"{CLIP_SUBFOLDER}/{IMAGE_PROCESSOR_CONFIG}",
        f"{DINO_SUBFOLDER}/{IMAGE_PROCESSOR_CONFIG}",
    ]
    missing = [name for name in required if not (path / name).is_file()]
    if require_weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[:2]) + " (the weights)")
    if missing:
        hint = ""
        if PROCESSOR_CONFIG in missing and MODEL_CONFIG not in missing:
            hint = " (save the processor next to the model: processor.save_pretrained(folder))"
        raise FileNotFoundError(f"{path} is not a complete COMM model folder: missing {', '.join(missing)}{hint}")
    try:
        model_type = json.loads((path / MODEL_CONFIG).read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{path / MODEL_CONFIG} is not a valid model config ({error})") from None
    if model_type != "comm":
        raise ValueError(f"{path / MODEL_CONFIG} has model_type {model_type!r}, expected 'comm'")
    return path


def resolve_model_folder(path_or_name: str | Path) -> Path:
    """A local folder as is; a Hugging Face Hub id (``owner/name``, not a local path) downloaded to the cache.

    The hub repo's small files are fetched and checked before its weights are downloaded.

    >>> resolve_model_folder("runs/stage2/final")  # doctest: +SKIP
    PosixPath('runs/stage2/final')
    """
    path = Path(path_or_name)
    name = str(path_or_name)
    if path.exists() or not _REPO_ID.match(name):
        return check_model_folder(path)
    from huggingface_hub import snapshot_download

    def download(**kwargs: Any) -> Path:
        try:
            return Path(snapshot_download(name, **kwargs))
        except Exception as error:  # network, auth, offline mode, unknown repo: one clear message
            raise FileNotFoundError(
                f"model folder not found: {name} (no such local folder, and fetching it from the Hugging Face Hub "
                f"failed: {type(error).__name__}: {error})"
            ) from None

    check_model_folder(download(allow_patterns=["*.json", "*.model", "*.txt"]), require_weights=False)
    return check_model_folder(download())


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
    loaded = [load_image(image, f"image {i}") for i, image in enumerate(image_list)]
    if single_image and not single_text:
        loaded = loaded * len(text_list)
    elif single_text and not single_image:
        text_list = text_list * len(loaded)
    return loaded, text_list, single_image and single_text


class CommPipeline:
    """Inference with a COMM model: captions, grounding boxes in pixels, and free-form answers.

    Every call takes one image or a list (PIL images, paths or HxW(xC) uint8 arrays), validates all of
    them before any model work, batches them with left padding and returns results in input order.

    >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
    >>> pipe.caption("street.jpg")  # doctest: +SKIP
    ['A man riding a bike down a city street.']
    """

    def __init__(
        self,
        model: CommForConditionalGeneration,
        processor: CommProcessor,
        template: ConversationTemplate = VICUNA_V1,
    ):
        """Wrap a loaded model and its processor (``model`` is put in eval mode).

        >>> pipe = CommPipeline(model, processor)  # doctest: +SKIP
        """
        self.model = model.eval()
        self.processor = processor
        self.template = template

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **model_kwargs: Any,
    ) -> CommPipeline:
        """Load model and processor from one folder (a training export or a hub-style folder, or a hub id).

        The device defaults to CUDA when available, else CPU; the dtype to bf16 on GPUs that support it
        (fp16 on older GPUs) and float32 on CPU. The folder is checked for ``config.json``,
        ``processor_config.json``, the image processors and the weights before anything is loaded.
        ``model_kwargs`` go to `CommForConditionalGeneration.from_pretrained` (``attn_implementation``...).

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final", device="cpu", dtype="bf16")  # doctest: +SKIP
        """
        folder = resolve_model_folder(path_or_name)
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for, but CUDA is not available here (use device='cpu')")
        torch_dtype = resolve_dtype(dtype, device)
        processor = CommProcessor.from_pretrained(folder)
        model = CommForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype, **model_kwargs)
        return cls(model.to(device), processor)

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return self.model.dtype

    def _check_questions(self, questions: Sequence[str]) -> None:
        """Each question holds one image placeholder and its prompt fits the model's context."""
        limit = self.processor.model_max_length
        for i, question in enumerate(questions):
            count = question.count(IMAGE_PLACEHOLDER)
            if count != 1:
                raise ValueError(f"question {i} holds {count} {IMAGE_PLACEHOLDER} placeholders, expected 1")
            if limit is None:
                continue
            prompt = self.processor.expand_image_placeholders(self.template.prompt(question))
            length = len(self.processor.tokenizer(prompt)["input_ids"])
            if length > limit:
                raise ValueError(
                    f"question {i} makes a prompt of {length} tokens (image included), over the model's limit "
                    f"of {limit}: shorten it"
                )

    def _generate(
        self, images: list[Image.Image], questions: list[str], batch_size: int, **generate_kwargs: Any
    ) -> list[str]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_questions(questions)
        return generate_answers(
            self.model,
            self.processor,
            images,
            questions,
            batch_size=batch_size,
            template=self.template,
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
        results = []
        for image, answer in zip(loaded, answers):
            width, height = image.size
            normalized = parse_box(answer)
            box = denormalize_box(normalized, width, height) if normalized is not None else None
            results.append(Grounding(box=box, answer=answer, image_size=(width, height)))
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
        **generate_kwargs: Any,
    ) -> str | list[str]:
        """Answer a question about an image (a string), or questions about images (a list, in input order).

        Questions without ``<image>`` get it in front; one image with a list of questions (or the reverse)
        is broadcast. ``streamer`` (a transformers ``TextStreamer`` or ``TextIteratorStreamer``) receives the
        tokens as they are generated; streaming works for a single image and question only. When the call
        fails (bad input included) the streamer is ended, so a consumer in another thread stops waiting.

        >>> pipe = CommPipeline.from_pretrained("runs/stage2/final")  # doctest: +SKIP
        >>> pipe.ask("street.jpg", "How many people are crossing?")  # doctest: +SKIP
        'Three people are crossing the street.'
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
                if len(question_list) != 1:
                    raise ValueError(
                        f"streaming needs a single image and a single question, got {len(question_list)} pairs"
                    )
                generate_kwargs["streamer"] = streamer
            answers = self._generate(
                loaded,
                [with_image(q) for q in question_list],
                batch_size,
                max_new_tokens=max_new_tokens,
                **generate_kwargs,
            )
        except BaseException:
            if streamer is not None and hasattr(streamer, "end"):
                streamer.end()  # release a consumer iterating a TextIteratorStreamer in another thread
            raise
        return answers[0] if single else answers
