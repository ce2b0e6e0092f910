"""image_positions='shared': one LLM position per image, the same in training, the cached generate and left padding."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from comm import CommForConditionalGeneration, CommProcessor, build_from_components
from comm.demo.tiny import tiny_config
from comm.inspection import model_parts
from comm.model.positions import grid_position_codes, image_position_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_image_run_shares_its_first_position():
    placeholders = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert image_position_ids(placeholders).tolist() == [[0, 1, 2, 2, 2, 3, 4, 4, 5]]
    left_padded = torch.tensor([[0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert image_position_ids(left_padded, mask).tolist() == [[1, 1, 0, 1, 1, 2]]


def test_the_config_checks_the_setting():
    assert tiny_config().image_positions == "sequential"
    assert tiny_config(image_positions="shared").image_positions == "shared"
    with pytest.raises(ValueError, match="image_positions"):
        tiny_config(image_positions="2d")


@pytest.fixture(scope="module")
def shared(tiny_model_dir) -> tuple[CommForConditionalGeneration, CommProcessor]:
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir, image_positions="shared").eval()
    return model, CommProcessor.from_pretrained(tiny_model_dir)


def _inputs(processor: CommProcessor, texts: list[str], colours: list[tuple[int, int, int]]):
    images = [Image.new("RGB", (40, 30), colour) for colour in colours]
    return processor(text=texts, images=images, padding_side="left")


def test_shared_positions_change_the_output(tiny_model_dir, shared):
    model, processor = shared
    sequential = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = _inputs(processor, ["<image>\nWhat is it?"], [(200, 30, 30)])
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, sequential(**inputs).logits)
        explicit = image_position_ids(inputs["input_ids"] == model.config.image_token_index, inputs["attention_mask"])
        by_hand = sequential.__class__.forward(model, **inputs, position_ids=explicit).logits
    torch.testing.assert_close(model(**inputs).logits, by_hand)


def test_cached_generation_equals_recomputing_every_step(shared):
    """Decode steps continue from the image-compressed positions: greedy with the KV cache equals a greedy loop of
    full forwards (each computing its own shared positions), for a left-padded batch."""
    model, processor = shared
    texts = ["<image>\nWhat is it?", "Where is the red dog? <image> Answer."]
    inputs = _inputs(processor, texts, [(200, 30, 30), (9, 9, 200)])
    steps = 8
    settings = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    with torch.no_grad():
        cached = model.generate(**inputs, **settings, output_logits=True, return_dict_in_generate=True)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pixels = {k: v for k, v in inputs.items() if k.startswith("pixel_values")}
        for step in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, **pixels).logits[:, -1]
            torch.testing.assert_close(cached.logits[step], logits, rtol=1e-4, atol=1e-4)
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], -1), torch.cat([mask, torch.ones_like(token)], -1)
    assert torch.equal(cached.sequences, ids)


def test_a_left_padded_row_answers_as_alone(shared):
    model, processor = shared
    texts, colours = ["<image>\nhi", "Where is the small red dog on the left? <image>"], [(200, 30, 30), (9, 9, 200)]
    settings = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    settings |= {"output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        batch = model.generate(**_inputs(processor, texts, colours), **settings)
        for row, (text, colour) in enumerate(zip(texts, colours)):
            alone = model.generate(**_inputs(processor, [text], [colour]), **settings)
            assert torch.equal(batch.sequences[row, -6:], alone.sequences[0, -6:])
            for step in range(6):
                torch.testing.assert_close(batch.logits[step][row], alone.logits[step][0], rtol=1e-4, atol=1e-4)


def test_continuing_a_cache_by_hand_needs_position_ids(shared):
    model, processor = shared
    inputs = _inputs(processor, ["<image>\nWhat is it?"], [(200, 30, 30)])
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        with pytest.raises(ValueError, match="position_ids"):
            model(input_ids=inputs["input_ids"][:, -1:], cache=cache)


def test_grid_codes_tell_every_cell_apart():
    codes = grid_position_codes(8)
    assert codes.shape == (64, 16)
    assert torch.cdist(codes, codes).add(torch.eye(64) * 9).min() > 0.1  # no two cells share a code
    assert grid_position_codes(14).shape == (196, 20)


def test_the_grid_embedding_is_added_to_each_cell_and_is_saved(tiny_components, llama_tokenizer, tmp_path):
    model, processor = build_from_components(
        tiny_components["clip"],
        tiny_components["dino"],
        tiny_components["llm"],
        tokenizer=llama_tokenizer,
        image_position_embedding=True,
        image_positions="shared",
        **tiny_config().tower_reading_fields(),
    )
    assert "image_position_embedding" in model.trainable_vision_modules()
    assert {row["part"] for row in model_parts(model)} >= {"image_position_embedding", "projector"}
    pixels = processor.preprocess_images([Image.new("RGB", (40, 30), (200, 30, 30))])
    with torch.no_grad():
        tokens = model.get_image_features(**pixels).pooler_output
        plain = model.projector(model.get_image_features(**pixels).last_hidden_state)
        cells = model.image_position_embedding.projection(grid_position_codes(model.config.grid_size))
    torch.testing.assert_close(tokens[0], plain[0] + cells)
    model.save_pretrained(tmp_path)
    loaded = CommForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.image_position_embedding and loaded.config.image_positions == "shared"
    torch.testing.assert_close(
        loaded.image_position_embedding.projection.weight, model.image_position_embedding.projection.weight
    )
    assert CommForConditionalGeneration(tiny_config()).image_position_embedding is None
