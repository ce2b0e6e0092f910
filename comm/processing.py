"""`CommProcessor`: images and text to model inputs (padded square, per-tower resize/normalise, tokens), a
transformers `ProcessorMixin` that `AutoProcessor` loads once ``comm`` is imported."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    BatchFeature,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.processing_utils import ProcessingKwargs
from transformers.utils import PaddingStrategy
from typing_extensions import Unpack

from comm.boxes import SHIKRA_DECIMALS, check_box_decimals, square_padding
from comm.conversation import IMAGE_PLACEHOLDER, VICUNA_V1, ConversationTemplate
from comm.images import ImageInput, load_image
from comm.model.configuration import CommConfig
from comm.model.modeling import PIXEL_VALUES_CLIP, PIXEL_VALUES_DINO
from comm.processor_folder import HUB_ID, IMAGE_PROCESSOR_ATTRIBUTES, PROCESSOR_CONFIG, load_image_processors

IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
IMAGE_TOKENS = (IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# from_pretrained's options that say where and how to read files (used up by the sub-processors' loading).
LOADING_OPTIONS = frozenset(
    {"cache_dir", "force_download", "local_files_only", "revision", "token", "subfolder", "proxies"}
    | {"return_unused_kwargs", "trust_remote_code"}
)
# The default config's visual tokens per image (its 14 x 14 grid, the towers concatenated along channels).
DEFAULT_NUM_IMAGE_TOKENS = CommConfig.grid_size**2
# Outputs left as Python objects when the batch becomes tensors (per-text lists of dicts).
SKIP_CONVERSION = ["text_replacement_offsets"]

# OpenAI CLIP and ImageNet (DINOv2) normalisation constants.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts a tokenizer reads as special tokens wherever they appear (``</s>``, ``<s>``, the image tokens...).

    Such a text inside a question or reply is not read as text: ``</s>`` in a reply becomes an end of sequence.
    """
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted(special | set(tokenizer.all_special_tokens))


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square, centred, with ``color`` (Shikra/LLaVA ``expand2square``)."""
    width, height = image.size
    side, left, top = square_padding(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, (left, top))
    return canvas


def set_tower_resize(image_processor: Any, size: int, pad_to_square: bool = True) -> None:
    """Make a tower's image processor output ``size`` x ``size`` pixels for the processor's image mode.

    With ``pad_to_square`` the (already padded) square is resized straight to ``size``: a crop would cut off the
    borders that boxes are measured against. Without, the shortest edge is resized to ``size`` and the centre
    ``size`` x ``size`` cropped (OpenAI's CLIP preprocessing); both towers then see the same centre square.
    """
    image_processor.crop_size = {"height": size, "width": size}
    if pad_to_square:
        image_processor.size = {"height": size, "width": size}
        image_processor.do_center_crop = False
    else:
        image_processor.size = {"shortest_edge": size}
        image_processor.do_center_crop = True


def tower_input_size(image_processor: Any) -> int:
    """The side of the square a tower's image processor outputs (its crop size in both modes)."""
    return int(image_processor.crop_size["height"])


def tower_image_processor(kind: str, size: int, base: Any | None = None, pad_to_square: bool = True) -> Any:
    """A CLIP/DINOv2 image processor (``base``, or one with the standard constants) set up by `set_tower_resize`."""
    if base is not None:
        processor = base
    elif kind == "clip":
        processor = CLIPImageProcessorPil(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    elif kind == "dino":
        processor = BitImageProcessorPil(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    else:
        raise ValueError(f"unknown image processor kind {kind!r}")
    set_tower_resize(processor, size, pad_to_square)
    return processor


class CommProcessor(ProcessorMixin):
    """Turn PIL images and text into COMM inputs: ``input_ids``, ``attention_mask``, ``pixel_values_clip``,
    ``pixel_values_dino``.

    Each ``<image>`` in the text becomes ``<im_start>`` + ``num_image_tokens`` x ``<im_patch>`` + ``<im_end>``;
    images are padded to a square with ``pad_color`` and then resized and normalised by each tower's processor
    (the Shikra/COMM recipe). With ``pad_to_square=False`` each tower resizes the shortest edge and crops the
    centre instead, as OpenAI's CLIP and LLaVA-1.5's ``--image_aspect_ratio`` none do; boxes then refer to that
    centre square (`comm.boxes.visible_square`). The tower processors are set up for the mode (`set_tower_resize`).

    ``template`` (a `ConversationTemplate`, default Vicuna v1.1) is how conversations are rendered for training,
    generation and evaluation; it is saved with the processor, also as the Jinja ``chat_template`` that
    ``apply_chat_template`` renders. ``box_decimals`` is how many decimals training targets write per box
    coordinate (3: Shikra's ``[0.123,...]``, 2: LLaVA-1.5's ``[0.12,...]``).
    """

    # Defaults of the processing keywords (transformers' ``_merge_kwargs`` reads them): pad to the longest text,
    # return PyTorch tensors.
    text_kwargs = {"padding": True, "return_tensors": "pt"}
    image_token = IMAGE_PLACEHOLDER  # the placeholder transformers' text expansion looks for (`replace_image_token`)

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        clip_image_processor: Any,
        dino_image_processor: Any,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        pad_color: Sequence[int] = (255, 255, 255),
        model_max_length: int | None = None,
        pad_to_square: bool = True,
        template: ConversationTemplate | Mapping[str, str] | None = None,
        box_decimals: int = SHIKRA_DECIMALS,
        chat_template: str | None = None,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.pad_color = tuple(int(c) for c in pad_color)
        self.model_max_length = model_max_length
        if not isinstance(pad_to_square, bool):
            raise TypeError(f"pad_to_square must be True or False, got {pad_to_square!r}")
        self.pad_to_square = pad_to_square
        if template is None:
            template = VICUNA_V1
        elif not isinstance(template, ConversationTemplate):
            template = ConversationTemplate.from_dict(template)
        self.template = template
        self.box_decimals = check_box_decimals(box_decimals)
        # The template's fields are the one source: the Jinja text is written from them for transformers users (a
        # saved text that differs, edited by hand or written by another version of this code, is written anew).
        if chat_template is not None and chat_template != template.chat_template():
            warnings.warn(
                f"the saved chat template ({CHAT_TEMPLATE_FILE}) is not the one the processor's template fields give: "
                f"using the fields' (training and generation render with them; change 'template' in {PROCESSOR_CONFIG}"
                " to change the chat format)",
                stacklevel=2,
            )
        super().__init__(tokenizer, clip_image_processor, dino_image_processor, chat_template=template.chat_template())
        for image_processor in (clip_image_processor, dino_image_processor):
            set_tower_resize(image_processor, tower_input_size(image_processor), pad_to_square)
        missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks the image tokens {missing}: call comm.add_image_tokens first")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)

    @property
    def image_block_tokens(self) -> list[str]:
        """The tokens one image becomes: ``<im_start>``, ``num_image_tokens`` x ``<im_patch>``, ``<im_end>``."""
        return [IMAGE_START_TOKEN, *[IMAGE_PATCH_TOKEN] * self.num_image_tokens, IMAGE_END_TOKEN]

    @property
    def image_placeholder_text(self) -> str:
        """What one ``<image>`` placeholder expands to before tokenization."""
        return "".join(self.image_block_tokens)

    @property
    def image_block_ids(self) -> list[int]:
        """The token ids of one image's block (`image_block_tokens`)."""
        return self.tokenizer.convert_tokens_to_ids(self.image_block_tokens)

    def expand_image_placeholders(self, text: str) -> str:
        """Replace each ``<image>`` with the image's token block."""
        return text.replace(IMAGE_PLACEHOLDER, self.image_placeholder_text)

    def preprocess_images(self, images: Sequence[ImageInput], **options: Any) -> dict[str, torch.Tensor]:
        """Pixel values of both towers for a list of images (paths, arrays or PIL images); ``options`` (image
        processor keywords such as ``do_normalize``) go to both towers' image processors."""
        views = [load_image(image, f"image {i}") for i, image in enumerate(images)]
        if self.pad_to_square:
            views = [expand_to_square(view, self.pad_color) for view in views]
        options = {**options, "return_tensors": "pt"}  # the processor converts once, at the end
        clip = self.clip_image_processor(images=views, **options)["pixel_values"]
        dino = self.dino_image_processor(images=views, **options)["pixel_values"]
        return {PIXEL_VALUES_CLIP: clip, PIXEL_VALUES_DINO: dino}

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """What the ``image_idx``-th ``<image>`` becomes (transformers' placeholder hook): the image token block."""
        return self.image_placeholder_text

    def kept_token_positions(self, ids: Sequence[int], limit: int | None) -> list[int] | None:
        """The positions of ``ids`` kept under ``limit`` tokens (None: nothing to cut; a falsy limit never cuts).

        Truncation drops the earliest text tokens after the first one (BOS or the system prompt's start), so a
        prompt keeps its end ("... ASSISTANT:") and the image tokens: a prompt that the image tokens alone
        overflow raises ValueError.
        """
        if not limit or len(ids) <= limit:
            return None
        image_ids = set(self.tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS)))
        num_image = sum(1 for i in ids if i in image_ids)
        if num_image + 1 > limit:
            raise ValueError(f"the prompt's {num_image} image tokens alone exceed the model's limit of {limit} tokens")
        excess = len(ids) - limit
        message = f"text is {len(ids)} tokens, over the limit of {limit}: dropping its {excess} earliest text tokens"
        warnings.warn(message, stacklevel=3)
        kept = [0]
        for position, token in enumerate(ids[1:], start=1):
            if excess and token not in image_ids:
                excess -= 1
                continue
            kept.append(position)
        return kept

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Tokenize ``text`` (one string or a batch) and preprocess ``images`` in placeholder order: a flat list, or
        one list per text (what ``apply_chat_template(..., tokenize=True)`` passes).

        Options are transformers' processing keywords, flat or per modality (``text_kwargs={...}``,
        ``images_kwargs={...}``). The text ones go to the tokenizer, its ``pad`` pads (to the longest by default);
        ``images_kwargs`` reach both towers' image processors; ``return_tensors`` defaults to ``"pt"`` (``None``
        gives lists). Truncation never cuts an image block: a text over ``max_length`` (or ``model_max_length``)
        loses its earliest text tokens, with a warning (`kept_token_positions`); ``truncation=False`` keeps it whole.
        There are no video or audio inputs (a ``videos``/``audio`` keyword must be None).
        """
        if kwargs.get("videos") is not None or kwargs.get("audio") is not None:
            raise ValueError("COMM takes images and text only: no videos or audio")
        if text is None:
            raise ValueError("CommProcessor needs text: images alone are preprocessed by preprocess_images")
        options = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        if options.get("return_mm_token_type_ids"):
            raise ValueError(
                "CommProcessor does not return mm_token_type_ids: image tokens are input_ids == image_token_id"
            )
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            image_list: list[ImageInput] = []
        elif isinstance(images, (Image.Image, str, Path, np.ndarray)):
            image_list = [images]
        else:
            image_list = [one for item in images for one in (item if isinstance(item, (list, tuple)) else [item])]
        num_placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        if num_placeholders != len(image_list):
            raise ValueError(
                f"the number of {IMAGE_PLACEHOLDER} tokens in the prompts should be the same as the number of images: "
                f"the text has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(image_list)} images were "
                "given (each image needs exactly one placeholder)"
            )
        pixels = self.preprocess_images(image_list, **options["images_kwargs"]) if image_list else {}
        replacements = [self.replace_image_token(pixels, i) for i in range(len(image_list))]
        texts, replacement_offsets = self.get_text_with_replacements(texts, replacements)
        text_options = dict(options["text_kwargs"])
        for processor_option in ("return_mm_token_type_ids", "return_text_replacement_offsets"):  # not the tokenizer's
            text_options.pop(processor_option, None)
        return_tensors = text_options.pop("return_tensors", None)
        encoded = self.encode(texts, **text_options)
        if options.get("return_text_replacement_offsets"):
            encoded["text_replacement_offsets"] = replacement_offsets
        return BatchFeature({**encoded, **pixels}, tensor_type=return_tensors, skip_tensor_conversion=SKIP_CONVERSION)

    def encode(
        self,
        texts: list[str],
        padding: bool | str | PaddingStrategy = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        **tokenizer_options: Any,
    ) -> dict[str, list]:
        """Tokenize texts whose placeholders are already expanded, cut each to fit (`kept_token_positions`) unless
        ``truncation`` is False, and pad them with the tokenizer's ``pad`` (offsets get ``(0, 0)`` there)."""
        encoded = self.tokenizer(texts, **tokenizer_options)
        limit = None if truncation is False else (self.model_max_length if max_length is None else max_length)
        for row, ids in enumerate(encoded["input_ids"]):
            kept = self.kept_token_positions(ids, limit)
            if kept is not None:
                for values in encoded.values():
                    if isinstance(values[row], (list, tuple)):  # per-token values (not return_length's count)
                        values[row] = [values[row][position] for position in kept]
        offsets = encoded.pop("offset_mapping", None)
        padded = self.tokenizer.pad(
            encoded,
            padding=padding,
            max_length=max_length if padding in ("max_length", PaddingStrategy.MAX_LENGTH) else None,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
        )
        padded = dict(padded)
        if offsets is not None:
            side = padding_side or self.tokenizer.padding_side
            padded["offset_mapping"] = [
                pad_list(list(row), len(ids), (0, 0), side) for row, ids in zip(offsets, padded["input_ids"])
            ]
        return padded

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id (set by `add_image_tokens` when the tokenizer had none)."""
        return self.tokenizer.pad_token_id

    @property
    def model_input_names(self) -> list[str]:
        """The inputs `__call__` returns (the model's names for the two towers' pixels)."""
        return ["input_ids", "attention_mask", PIXEL_VALUES_CLIP, PIXEL_VALUES_DINO]

    def to_dict(self) -> dict[str, Any]:
        """The settings saved in ``processor_config.json`` (the template as its fields)."""
        output = super().to_dict()
        output["template"] = self.template.to_dict()
        return output

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs) -> list:
        """The tokenizer and both image processors (`comm.processor_folder.load_image_processors`: the PIL backends,
        from ``processor_config.json`` or an older folder's subfolders)."""
        processor_dict = processor_dict or {}
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, subfolder, **kwargs)
        return [tokenizer, *load_image_processors(pretrained_model_name_or_path, processor_dict, subfolder)]

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs) -> tuple[dict, dict]:
        """transformers 5.25's hook for the sub-processors (5.24 calls `_get_arguments_from_pretrained`): the same
        tokenizer and PIL image processors, also from an older folder's subfolders; the loading options end here,
        the settings go on to ``from_dict``."""
        tokenizer, clip, dino = cls._get_arguments_from_pretrained(
            pretrained_model_name_or_path, processor_dict, **dict(kwargs)
        )
        loaded = dict(zip(("tokenizer", *IMAGE_PROCESSOR_ATTRIBUTES), (tokenizer, clip, dino)))
        settings = {key: value for key, value in kwargs.items() if key not in LOADING_OPTIONS}
        return {**processor_dict, **loaded}, settings

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> CommProcessor:
        """Load a processor written by ``save_pretrained`` (a model folder, a training export or a hub id).

        Keyword arguments that name a setting (``model_max_length``, ``pad_to_square``, ``template``,
        ``box_decimals``...) replace the saved one; a folder saved without ``template``/``box_decimals`` (before
        they existed) gets Vicuna v1.1 and 3.
        """
        path = Path(pretrained_model_name_or_path)
        if (path.exists() or not HUB_ID.match(str(pretrained_model_name_or_path))) and not (
            path / PROCESSOR_CONFIG
        ).is_file():
            raise FileNotFoundError(f"{path} has no {PROCESSOR_CONFIG}: not a COMM processor/model folder")
        if "template" in kwargs:
            kwargs["chat_template"] = None  # the saved chat template is the saved template's: written anew
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


AutoProcessor.register(CommConfig, CommProcessor, exist_ok=True)


def pad_list(values: list, length: int, fill: Any, side: str) -> list:
    """``values`` padded with ``fill`` to ``length`` on ``side`` (``"left"`` or ``"right"``)."""
    padding = [fill] * (length - len(values))
    return padding + values if side == "left" else values + padding
