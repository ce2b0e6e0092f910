"""Generation: what decode steps run after the prefill."""

from __future__ import annotations

import pytest
from PIL import Image

from comm import CommForConditionalGeneration, CommProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["<image>\nWhat is this?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> tuple[CommForConditionalGeneration, CommProcessor]:
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, CommProcessor.from_pretrained(tiny_model_dir)


def images() -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 30, 200), (20, 200, 20), (240, 240, 240), (10, 10, 10)]
    return [Image.new("RGB", (60 + 10 * i, 50), colour) for i, colour in enumerate(colours)]


def test_a_generated_image_token_is_just_a_token(tiny):
    """Decode steps embed the new tokens without the prefill's placeholder check (which would reject it)."""
    model, processor = tiny
    inputs = processor(text=[QUESTIONS[0]], images=images()[:1], padding_side="left")
    image_token = model.config.image_token_index
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False, sequence_bias={(image_token,): 100.0})
    assert output[0, inputs["input_ids"].shape[1] :].tolist() == [image_token] * 3
