"""Assemble a COMM model and processor from separate tower and LLM checkpoints (hub names or folders)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    PreTrainedTokenizerBase,
)

from comm.boxes import SHIKRA_DECIMALS
from comm.conversation import ConversationTemplate
from comm.model.configuration import CommConfig
from comm.model.modeling import CommForConditionalGeneration
from comm.model.towers import truncated_tower_config
from comm.processing import (
    IMAGE_END_TOKEN,
    IMAGE_PATCH_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_TOKENS,
    CommProcessor,
    tower_image_processor,
)


def add_image_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add ``<im_patch>``, ``<im_start>``, ``<im_end>`` (and a pad token if missing); return the config ids."""
    tokenizer.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return {
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN),
        "image_start_token_index": tokenizer.convert_tokens_to_ids(IMAGE_START_TOKEN),
        "image_end_token_index": tokenizer.convert_tokens_to_ids(IMAGE_END_TOKEN),
    }


def resize_embeddings_with_mean(model: CommForConditionalGeneration, vocab_size: int) -> None:
    """Grow the LLM's vocabulary to ``vocab_size``; new rows of both embeddings are the mean of the old ones."""
    old_size = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old_size:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            if embedding is None or embedding.weight.shape[0] != vocab_size:
                continue
            weight = embedding.weight
            weight[old_size:] = weight[:old_size].mean(dim=0, keepdim=True)
    model.config.text_config.vocab_size = vocab_size
    model.language_model.config.vocab_size = vocab_size


def default_image_processor(kind: str, path: str | None, size: int):
    """The tower's own image processor from ``path`` when it ships one, else the standard constants."""
    base = None
    if path is not None:
        loader = CLIPImageProcessorPil if kind == "clip" else BitImageProcessorPil
        try:
            base = loader.from_pretrained(path)
        except OSError:
            base = None  # a bare config folder (tests, random towers): fall back to the standard constants
    return tower_image_processor(kind, size, base)


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    config: CommConfig,
    clip_path: str | None = None,
    dino_path: str | None = None,
    model_max_length: int | None = None,
    pad_color: tuple[int, int, int] = (255, 255, 255),
    pad_to_square: bool = True,
    template: ConversationTemplate | None = None,
    box_decimals: int = SHIKRA_DECIMALS,
) -> CommProcessor:
    """A processor for ``config``'s towers; ``tokenizer`` must already carry the image tokens.

    ``template`` (default Vicuna v1.1) and ``box_decimals`` (default 3) are saved with it (see `CommProcessor`).
    """
    return CommProcessor(
        tokenizer,
        default_image_processor("clip", clip_path, config.clip_config.image_size),
        default_image_processor("dino", dino_path, config.dino_image_size),
        num_image_tokens=config.num_image_tokens,
        pad_color=pad_color,
        model_max_length=model_max_length,
        pad_to_square=pad_to_square,
        template=template,
        box_decimals=box_decimals,
    )


def components_config_and_tokenizer(
    clip: str, dino: str, llm: str, tokenizer: str | PreTrainedTokenizerBase | None = None, **config_fields
) -> tuple[CommConfig, PreTrainedTokenizerBase]:
    """The `CommConfig` of tower and LLM checkpoints and their tokenizer with the image tokens: configs only, no
    weights are read. ``tokenizer`` defaults to the LLM's; ``config_fields`` set `CommConfig` fields."""
    clip_config = AutoConfig.from_pretrained(clip)
    if getattr(clip_config, "vision_config", None) is not None:  # a full CLIP checkpoint: keep its vision half
        clip_config = clip_config.vision_config
    config = CommConfig(
        clip_config=clip_config,
        dino_config=AutoConfig.from_pretrained(dino),
        text_config=AutoConfig.from_pretrained(llm),
        **config_fields,
    )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or llm)
    config.update(add_image_tokens(tokenizer))
    return config, tokenizer


def build_from_components(
    clip: str,
    dino: str,
    llm: str,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    model_max_length: int | None = None,
    template: ConversationTemplate | None = None,
    box_decimals: int = SHIKRA_DECIMALS,
    **config_fields,
) -> tuple[CommForConditionalGeneration, CommProcessor]:
    """Load pretrained towers and LLM (hub names or local folders) into a fresh COMM model and processor.

    The mergers, aligners and projection start from random init; the towers are frozen; the image tokens
    are added to the tokenizer and their embeddings start at the mean of the existing ones.
    ``template`` and ``box_decimals`` go to the processor (`build_processor`); ``config_fields`` set `CommConfig`
    fields (``clip_layers``, ``grid_size``, ``concat``...).
    """
    config, tokenizer = components_config_and_tokenizer(clip, dino, llm, tokenizer, **config_fields)
    config._attn_implementation = attn_implementation

    with torch.device("meta"):
        model = CommForConditionalGeneration(config)
    load = {"dtype": dtype, "attn_implementation": attn_implementation}
    # A vision config makes AutoModel load CLIPVisionModel, also from a full CLIP checkpoint (as LLaVA does).
    model.clip_tower.encoder = AutoModel.from_pretrained(
        clip, config=truncated_tower_config(config.clip_config, config.clip_layers), **load
    )
    model.dino_tower.encoder = AutoModel.from_pretrained(
        dino, config=truncated_tower_config(config.dino_config, config.dino_layers), **load
    )
    model.language_model = AutoModelForCausalLM.from_pretrained(llm, **load)
    model.config.text_config = model.language_model.config  # one config object, so resizing updates both
    for module in model.trainable_vision_modules().values():
        module.to_empty(device="cpu")
        module.to(dtype)
        module.apply(model._init_weights)
    model.freeze_towers()
    resize_embeddings_with_mean(model, len(tokenizer))
    processor = build_processor(
        tokenizer, config, clip, dino, model_max_length=model_max_length, template=template, box_decimals=box_decimals
    )
    return model, processor


def save_gguf_llm(gguf_file: str | Path, folder: str | Path) -> Path:
    """Write a GGUF causal LM (``llama.cpp``'s format; needs the ``gguf`` package) and its tokenizer, chat template
    included, as an ordinary transformers folder: what `build_from_components` and ``--llm`` take.

    transformers dequantizes the GGUF weights on loading but keeps the model marked as GGUF-quantized, which
    ``save_pretrained`` refuses, so the weights move into a plain model of the same class and config first.
    """
    gguf_file, folder = Path(gguf_file), Path(folder)
    source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    quantized = AutoModelForCausalLM.from_pretrained(**source)
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    with torch.device("meta"):
        model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
