"""Box format/parse/normalisation round-trips and the conversation templates (Vicuna v1.1, ChatML)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from comm.boxes import (
    box_iou,
    denormalize_box,
    format_box,
    normalize_box,
    parse_box,
    parse_boxes,
    validate_pixel_box,
    xywh_to_xyxy,
)
from comm.conversation import VICUNA_V1, ConversationTemplate, chatml, rec_prompt, template_for_tokenizer, with_image


def test_format_has_three_decimals_and_clips():
    assert format_box((0.1, 0.25, 0.6666, 1.2)) == "[0.100,0.250,0.667,1.000]"


def test_format_with_other_precisions():
    assert format_box((0.1, 0.25, 0.6666, 1.2), decimals=2) == "[0.10,0.25,0.67,1.00]"  # LLaVA-1.5's precision
    assert parse_box(format_box((0.1, 0.25, 0.6666, 1.0), decimals=2)) == pytest.approx((0.1, 0.25, 0.67, 1.0))
    assert parse_box("[0.24, 0.13, 0.61, 0.98]") == pytest.approx((0.24, 0.13, 0.61, 0.98))  # LLaVA-665K's text
    for bad in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match="box_decimals must be a whole number from 1 to 6"):
            format_box((0, 0, 1, 1), decimals=bad)


def test_format_parse_roundtrip():
    box = (0.123, 0.456, 0.789, 0.9)
    assert parse_box(format_box(box)) == pytest.approx(box)


def test_parse_is_tolerant():
    text = "Sure! It is at [ 0.1 , 0.2,0.3 ,0.4 ] and also [0.5,0.6,0.7,0.8]. junk [1,2] [a,b,c,d]"
    assert parse_boxes(text) == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)]
    assert parse_box(text) == (0.1, 0.2, 0.3, 0.4)


@pytest.mark.parametrize("text", ["", "no box here", "[0.1,0.2,0.3]", "[0.1,0.2,,0.3,0.4]", "[.,.,.,.]", None])
def test_malformed_text_has_no_box(text):
    assert parse_box(text) is None


def test_normalise_against_padded_square_and_back():
    # 200x100 image: padded square side 200, the image sits 50 px down.
    box = (20, 10, 120, 60)
    normalised = normalize_box(box, 200, 100)
    assert normalised == pytest.approx((0.1, 0.3, 0.6, 0.55))
    assert denormalize_box(normalised, 200, 100) == pytest.approx(box)
    # A box reaching into the padding is clipped to the image.
    assert denormalize_box((0.0, 0.0, 1.0, 1.0), 200, 100) == pytest.approx((0, 0, 200, 100))


def test_normalise_against_the_centre_crop_and_back():
    # 200x100 image without padding: the towers see the centre 100x100 square, from x = 50.
    box = (60, 10, 120, 60)
    normalised = normalize_box(box, 200, 100, pad_to_square=False)
    assert normalised == pytest.approx((0.1, 0.1, 0.7, 0.6))
    assert denormalize_box(normalised, 200, 100, pad_to_square=False) == pytest.approx(box)
    assert denormalize_box((0.0, 0.0, 1.0, 1.0), 200, 100, pad_to_square=False) == pytest.approx((50, 0, 150, 100))
    # beyond the crop: outside [0, 1]
    assert normalize_box((0, 0, 40, 100), 200, 100, pad_to_square=False)[0] == pytest.approx(-0.5)


def test_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((10, 0, 0, 10), (0, 0, 10, 10)) == 0.0  # x1 < x0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
    assert xywh_to_xyxy([1, 2, 3, 4]) == (1, 2, 4, 6)


def test_validate_pixel_box():
    assert validate_pixel_box([0, 0, 10, 10], 10, 10) == (0, 0, 10, 10)
    with pytest.raises(ValueError, match="x1 < x0"):
        validate_pixel_box([5, 0, 1, 4], 10, 10)
    with pytest.raises(ValueError, match="outside"):
        validate_pixel_box([0, 0, 30, 4], 10, 10)


def test_vicuna_template_and_target_spans():
    rendered = VICUNA_V1.render([("<image>\nWhat is it?", "A cat."), ("Where?", "[0.1,0.2,0.3,0.4]")])
    assert rendered.text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
        "USER: Where? ASSISTANT: [0.1,0.2,0.3,0.4]</s>"
    )
    assert rendered.targets() == [" A cat.</s>", " [0.1,0.2,0.3,0.4]</s>"]
    assert VICUNA_V1.prompt("Hi?").endswith("questions. USER: Hi? ASSISTANT:")


def test_a_template_without_system_prompt_starts_at_the_user():
    template = ConversationTemplate(system="")
    rendered = template.render([("<image>\nWhat is it?", "A cat."), ("Where?", "Here.")])
    assert rendered.text == "USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Where? ASSISTANT: Here.</s>"
    assert rendered.targets() == [" A cat.</s>", " Here.</s>"]
    assert template.prompt("Hi?") == "USER: Hi? ASSISTANT:"
    assert template.prompt("And?", [("Hi?", "Hello.")]) == "USER: Hi? ASSISTANT: Hello.</s>USER: And? ASSISTANT:"
    assert ConversationTemplate.from_dict(template.to_dict()) == template
    assert ConversationTemplate.from_dict({"system": ""}) == template
    with pytest.raises(ValueError, match=r"field\(s\) \['sep'\] must be strings"):
        ConversationTemplate.from_dict({"sep": 1})


def test_prompts():
    assert rec_prompt("the red circle") == (
        "Can you point out the red circle in the image <image> and provide the coordinates of its location?"
    )
    assert with_image("Hi") == "<image>\nHi"
    assert with_image("<image> Hi") == "<image> Hi"


def test_the_chatml_template_renders_chatml_and_its_jinja_says_the_same():
    from jinja2 import Environment

    template = chatml()
    rendered = template.render([("<image>\nWhat is it?", "A cat."), ("Where?", "[0.1,0.2,0.3,0.4]")])
    assert rendered.text == (
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n[0.1,0.2,0.3,0.4]<|im_end|>\n"
    )
    assert rendered.targets() == ["A cat.<|im_end|>", "[0.1,0.2,0.3,0.4]<|im_end|>"]  # not the newline after
    assert template.reply_prefix == "" and VICUNA_V1.reply_prefix == " "
    with_system = chatml("Be brief.")
    assert with_system.prompt("Hi?") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ConversationTemplate.from_dict(with_system.to_dict()) == with_system
    with pytest.raises(ValueError, match="unknown conversation template style"):
        ConversationTemplate(style="three")
    history = [("What is it?", "A cat.")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Where?"},
    ]
    for each in (template, with_system, VICUNA_V1):
        jinja = Environment().from_string(each.chat_template())
        expected = each.prompt("Where?", [("<image>\nWhat is it?", "A cat.")])
        assert jinja.render(messages=messages, add_generation_prompt=True) == expected
        finished = [*messages, {"role": "assistant", "content": "Here."}]
        assert (
            jinja.render(messages=finished)
            == each.render([(f"<image>\n{history[0][0]}", "A cat."), ("Where?", "Here.")]).text
        )


def test_a_chatml_tokenizer_keeps_its_own_turn_format():
    vicuna = ConversationTemplate(system="")
    smol = SimpleNamespace(chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% endfor %}")
    assert template_for_tokenizer(smol, vicuna) == chatml()
    assert template_for_tokenizer(SimpleNamespace(chat_template=None), vicuna) is vicuna
    assert template_for_tokenizer(object(), vicuna) is vicuna
