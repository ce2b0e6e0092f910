"""CommProcessor: square padding, per-tower normalisation, placeholder expansion, truncation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessorPil, CLIPImageProcessorPil

from comm import CommProcessor
from comm.processing import IMAGE_END_TOKEN, IMAGE_START_TOKEN, expand_to_square, load_image, tower_image_processor


@pytest.fixture
def processor(tiny_model_dir) -> CommProcessor:
    return CommProcessor.from_pretrained(tiny_model_dir)


def test_expand_to_square_centres_on_white():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (255, 255, 255))
    assert square.size == (40, 40)
    assert square.getpixel((20, 5)) == (255, 255, 255)  # top band is padding
    assert square.getpixel((20, 20)) == (255, 0, 0)
    assert square.getpixel((20, 34)) == (255, 255, 255)


def test_each_tower_gets_its_own_normalisation(processor):
    image = Image.new("RGB", (30, 50), (128, 128, 128))
    pixels = processor.preprocess_images([image])
    assert pixels["pixel_values_clip"].shape == (1, 3, 64, 64)
    assert pixels["pixel_values_dino"].shape == (1, 3, 64, 64)
    centre = 128 / 255
    clip_red = (centre - 0.48145466) / 0.26862954
    dino_red = (centre - 0.485) / 0.229
    assert pixels["pixel_values_clip"][0, 0, 32, 32].item() == pytest.approx(clip_red, abs=1e-3)
    assert pixels["pixel_values_dino"][0, 0, 32, 32].item() == pytest.approx(dino_red, abs=1e-3)
    white = (1.0 - 0.485) / 0.229  # the padding band on the left is white in the DINOv2 view too
    assert pixels["pixel_values_dino"][0, 0, 32, 1].item() == pytest.approx(white, abs=1e-3)


def test_placeholder_expands_to_image_token_block(processor):
    batch = processor(text="Look: <image> now", images=Image.new("RGB", (10, 10)))
    ids = batch["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    start = tokenizer.convert_tokens_to_ids(IMAGE_START_TOKEN)
    end = tokenizer.convert_tokens_to_ids(IMAGE_END_TOKEN)
    i = ids.index(start)
    assert ids[i + 1 : i + 1 + processor.num_image_tokens] == [processor.image_token_id] * processor.num_image_tokens
    assert ids[i + 1 + processor.num_image_tokens] == end
    assert ids.count(processor.image_token_id) == 16


def test_left_padding_for_generation(processor):
    batch = processor(
        text=["<image> a", "<image> a much longer question here"],
        images=[Image.new("RGB", (8, 8))] * 2,
        padding_side="left",
    )
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == processor.pad_token_id
    assert batch["pixel_values_clip"].shape[0] == 2


def test_more_placeholders_than_images_is_an_error(processor):
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        processor(text="<image> and <image>", images=[Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="0 <image> placeholders but 1 images"):
        processor(text="no placeholder", images=[Image.new("RGB", (8, 8))])


def test_long_text_is_truncated_never_image_tokens(processor):
    long_text = "<image> " + "word " * 400 + "ASSISTANT:"
    with pytest.warns(UserWarning, match="dropping"):
        batch = processor(text=long_text, images=Image.new("RGB", (8, 8)), max_length=64)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 64
    assert ids.count(processor.image_token_id) == processor.num_image_tokens
    assert processor.tokenizer.decode(ids[-4:]).endswith("ASSISTANT:")  # a prompt keeps its end
    with pytest.raises(ValueError, match="image tokens alone exceed"):
        processor(text=long_text, images=Image.new("RGB", (8, 8)), max_length=10)


def test_transformers_processing_keywords_flat_or_per_modality(processor):
    images, texts = [Image.new("RGB", (8, 8))] * 2, ["<image> a", "<image> a much longer question here"]
    flat = processor(text=texts, images=images, padding_side="left")
    nested = processor(text=texts, images=images, text_kwargs={"padding_side": "left"})
    assert torch.equal(flat["input_ids"], nested["input_ids"]) and flat["input_ids"][0, 0] == processor.pad_token_id
    lists = processor(text=texts, images=images, return_tensors=None)
    assert isinstance(lists["input_ids"], list) and len(lists["input_ids"][0]) == len(lists["input_ids"][1])
    unpadded = processor(text=texts, images=images, padding=False, return_tensors=None)
    assert len(unpadded["input_ids"][0]) < len(unpadded["input_ids"][1])
    fixed = processor(text=texts, images=images, padding="max_length", max_length=40)
    assert fixed["input_ids"].shape == (2, 40)
    raw = processor(text=texts, images=images, images_kwargs={"do_normalize": False})
    for tower in ("pixel_values_clip", "pixel_values_dino"):  # black pixels, not normalised, in both towers
        assert raw[tower][0, :, 32, 32].tolist() == [0.0, 0.0, 0.0]


def test_no_truncation_keeps_long_text_and_offsets_pad_with_zero_spans(processor):
    long_text = "<image> " + "word " * 400
    whole = processor(text=long_text, images=Image.new("RGB", (8, 8)), max_length=64, truncation=False)
    assert whole["input_ids"].shape[1] > 400
    batch = processor(
        text=["<image> hi", "<image> a longer text"], images=[Image.new("RGB", (8, 8))] * 2, return_offsets_mapping=True
    )
    assert batch["offset_mapping"].shape == (*batch["input_ids"].shape, 2)
    padding = batch["attention_mask"][0] == 0
    assert padding.any() and batch["offset_mapping"][0][padding].eq(0).all()


def test_video_or_audio_input_is_an_error(processor):
    with pytest.raises(ValueError, match="no videos or audio"):
        processor(text="hello", videos=[np.zeros((2, 8, 8, 3))])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode, processor):
    image = Image.new(mode, (12, 9))
    assert load_image(image).mode == "RGB"
    assert processor.preprocess_images([image])["pixel_values_clip"].shape == (1, 3, 64, 64)


def test_transparent_pixels_become_background():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(image).getpixel((1, 1)) == (255, 255, 255)


def test_bad_images_are_named(tmp_path, processor):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        processor(text="<image>", images=[str(not_an_image)])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="too small"):
        load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(ValueError, match="too small"):
        load_image(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="expected a PIL image"):
        load_image(42)


def test_numpy_and_path_inputs_match_pil(tmp_path, processor):
    array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    from_array = processor.preprocess_images([array])["pixel_values_clip"]
    from_path = processor.preprocess_images([path])["pixel_values_clip"]
    torch.testing.assert_close(from_array, from_path)


def test_processor_roundtrip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = CommProcessor.from_pretrained(tmp_path)
    assert again.num_image_tokens == processor.num_image_tokens
    assert again.pad_color == processor.pad_color
    assert again.tokenizer("hello <im_patch>")["input_ids"] == processor.tokenizer("hello <im_patch>")["input_ids"]
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        CommProcessor.from_pretrained(tmp_path / "nowhere")


def test_without_pad_to_square_the_towers_preprocess_as_openai_clip_does(processor, tmp_path):
    # ViT-L/14-336 and DINOv2 input sizes; a 640x480 photo-like image (smooth gradients and noise).
    openai = CommProcessor(
        processor.tokenizer,
        tower_image_processor("clip", 336),
        tower_image_processor("dino", 224),
        processor.num_image_tokens,
        pad_to_square=False,
    )
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 640)[None, :, None] + np.linspace(0, 50, 480)[:, None, None]
    photo = Image.fromarray(np.clip(ramp + rng.normal(0, 20, (480, 640, 3)), 0, 255).astype(np.uint8))
    pixels = openai.preprocess_images([photo])
    clip_reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert torch.equal(pixels["pixel_values_clip"], clip_reference(images=[photo], return_tensors="pt")["pixel_values"])
    dino_reference = BitImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    assert torch.equal(pixels["pixel_values_dino"], dino_reference(images=[photo], return_tensors="pt")["pixel_values"])
    # the default pads first: not the same pixels
    padded = CommProcessor(
        processor.tokenizer, tower_image_processor("clip", 336), tower_image_processor("dino", 224), 16
    ).preprocess_images([photo])
    assert not torch.equal(padded["pixel_values_clip"], pixels["pixel_values_clip"])

    # saved with the processor; an override at load sets the towers up for the mode
    openai.save_pretrained(tmp_path / "openai")
    again = CommProcessor.from_pretrained(tmp_path / "openai")
    assert again.pad_to_square is False
    assert torch.equal(again.preprocess_images([photo])["pixel_values_clip"], pixels["pixel_values_clip"])
    back = CommProcessor.from_pretrained(tmp_path / "openai", pad_to_square=True)
    assert torch.equal(back.preprocess_images([photo])["pixel_values_clip"], padded["pixel_values_clip"])
    assert CommProcessor.from_pretrained(processor_folder(processor, tmp_path)).pad_to_square is True


def processor_folder(processor: CommProcessor, tmp_path) -> str:
    """``processor`` saved the way exports made before ``pad_to_square`` existed (no such key)."""
    folder = tmp_path / "old"
    processor.save_pretrained(folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config.pop("pad_to_square")
    (folder / "processor_config.json").write_text(json.dumps(config))
    return str(folder)


# ---------------------------------------------------------------- transformers' Auto classes and saved settings


def legacy_folder(processor: CommProcessor, folder) -> str:
    """``processor`` saved exactly as `CommProcessor.save_pretrained` wrote it before it was a ProcessorMixin:
    the tokenizer, the two image processors in subfolders and five settings, no template and no chat template."""
    processor.tokenizer.save_pretrained(folder)
    processor.clip_image_processor.save_pretrained(folder / "image_processor_clip")
    processor.dino_image_processor.save_pretrained(folder / "image_processor_dino")
    settings = {
        "processor_class": "CommProcessor",
        "num_image_tokens": processor.num_image_tokens,
        "pad_color": [0, 0, 0],
        "model_max_length": 77,
        "pad_to_square": False,
    }
    (folder / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return str(folder)


def test_auto_classes_load_a_comm_folder(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

    from comm import CommForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(processor, CommProcessor) and isinstance(processor, ProcessorMixin)
    assert isinstance(processor.clip_image_processor, CLIPImageProcessorPil)
    assert isinstance(processor.dino_image_processor, BitImageProcessorPil)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), CommForConditionalGeneration)
    image = Image.new("RGB", (20, 10), (10, 200, 30))
    direct = CommProcessor.from_pretrained(tiny_model_dir)(text="<image> hi", images=image)
    auto = processor(text="<image> hi", images=image)
    assert auto.keys() == direct.keys() == set(processor.model_input_names)
    for key in direct:
        assert torch.equal(auto[key], direct[key])


def test_apply_chat_template_gives_the_training_prompt(processor):
    from comm.conversation import VICUNA_V1, with_image

    question = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    messages = [{"role": "user", "content": question}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == VICUNA_V1.prompt(
        with_image("What is it?")
    )
    history = [*messages, {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Where?"}]
    assert processor.apply_chat_template(history, add_generation_prompt=True) == VICUNA_V1.prompt(
        "Where?", [(with_image("What is it?"), "A cat.")]
    )
    finished = [*history, {"role": "assistant", "content": [{"type": "text", "text": "[0.1,0.2,0.3,0.4]"}]}]
    turns = [(with_image("What is it?"), "A cat."), ("Where?", "[0.1,0.2,0.3,0.4]")]
    assert processor.apply_chat_template(finished) == VICUNA_V1.render(turns).text
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert processor.apply_chat_template(own_system, add_generation_prompt=True) == "Be brief. USER: Hi? ASSISTANT:"
    with pytest.raises(Exception, match="roles must alternate"):
        processor.apply_chat_template([{"role": "assistant", "content": "Hello."}])


def test_apply_chat_template_tokenizes_with_the_images_as_transformers_users_call_it(processor):
    image = Image.new("RGB", (30, 20), (40, 90, 200))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = processor(text=prompt, images=[image])
    assert inputs.keys() == expected.keys()
    for key in expected:
        assert torch.equal(inputs[key], expected[key])
    with pytest.raises(ValueError, match="images and text only"):
        processor(text="hi", videos=[np.zeros((2, 8, 8, 3), dtype=np.uint8)])


def test_template_and_box_decimals_are_saved_with_the_processor(processor, tmp_path):
    from comm.conversation import ConversationTemplate

    template = ConversationTemplate(system="", user_role="Human", assistant_role="Bot", end_of_turn="<|end|>")
    custom = CommProcessor(
        processor.tokenizer,
        processor.clip_image_processor,
        processor.dino_image_processor,
        processor.num_image_tokens,
        template=template,
        box_decimals=2,
    )
    custom.save_pretrained(tmp_path / "custom")
    assert (tmp_path / "custom" / "chat_template.jinja").read_text() == template.chat_template()
    again = CommProcessor.from_pretrained(tmp_path / "custom")
    assert again.template == template and again.box_decimals == 2
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert again.apply_chat_template(messages, add_generation_prompt=True) == "Human: q1 Bot: a1<|end|>Human: q2 Bot:"
    assert CommProcessor.from_pretrained(tmp_path / "custom", box_decimals=3).box_decimals == 3

    (tmp_path / "custom" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with pytest.warns(UserWarning, match="chat_template.jinja.*using the fields'.*'template' in processor_config.json"):
        edited = CommProcessor.from_pretrained(tmp_path / "custom")
    assert edited.chat_template == template.chat_template()
    overridden = CommProcessor.from_pretrained(tmp_path / "custom", template=template)  # a new template, a new text
    assert overridden.chat_template == template.chat_template()
    with pytest.raises(ValueError, match="box_decimals must be a whole number from 1 to 6, got 0"):
        CommProcessor(
            processor.tokenizer, processor.clip_image_processor, processor.dino_image_processor, 16, box_decimals=0
        )
    with pytest.raises(ValueError, match=r"unknown conversation template field\(s\) \['roles'\]"):
        CommProcessor(
            processor.tokenizer,
            processor.clip_image_processor,
            processor.dino_image_processor,
            16,
            template={"roles": "x"},
        )


def test_a_folder_saved_before_the_processor_was_a_processor_mixin_still_loads(processor, tmp_path):
    from transformers import AutoProcessor

    from comm.conversation import VICUNA_V1

    folder = legacy_folder(processor, tmp_path / "legacy")
    for loaded in (CommProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
        assert isinstance(loaded, CommProcessor)
        assert (loaded.pad_color, loaded.model_max_length, loaded.pad_to_square) == ((0, 0, 0), 77, False)
        assert loaded.template == VICUNA_V1 and loaded.box_decimals == 3
        assert loaded.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True) == (
            VICUNA_V1.prompt("Hi?")
        )
        image = Image.new("RGB", (30, 20), (1, 2, 3))
        assert torch.equal(loaded.preprocess_images([image])["pixel_values_clip"], again_cropping(processor, image))


def test_the_model_folder_check_and_the_processor_know_the_same_older_layout(processor, tiny_model_dir, tmp_path):
    import shutil

    from comm.loading import check_model_folder
    from comm.processor_folder import missing_image_processors

    folder = legacy_folder(processor, tmp_path / "legacy")
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "legacy" / "config.json")
    assert missing_image_processors(folder, {}) == []
    assert check_model_folder(folder, require_weights=False) == tmp_path / "legacy"
    shutil.rmtree(tmp_path / "legacy" / "image_processor_dino")
    assert missing_image_processors(folder, {}) == ["dino_image_processor"]
    with pytest.raises(FileNotFoundError, match="missing dino_image_processor in processor_config.json"):
        check_model_folder(folder, require_weights=False)
    with pytest.raises(ValueError, match="processor_config.json has no dino_image_processor settings"):
        CommProcessor.from_pretrained(folder)


def again_cropping(processor: CommProcessor, image: Image.Image) -> torch.Tensor:
    """CLIP pixels of ``image`` from ``processor``'s towers in centre-crop mode (what the legacy folder says)."""
    cropping = CommProcessor(
        processor.tokenizer,
        tower_image_processor("clip", 64),
        tower_image_processor("dino", 64),
        processor.num_image_tokens,
        pad_to_square=False,
    )
    return cropping.preprocess_images([image])["pixel_values_clip"]
