"""``comm web`` used as a person would: the server started on a free local port with a tiny checkpoint, and a real
headless Chromium (Debian's, through selenium and chromedriver) that picks an example, uploads images, captions,
grounds, chats, and sends bad files and bad text.

The tiny checkpoint is trained here for a few seconds to give known answers about one image, so the page's text
and drawn box can be checked exactly. It is laid out as `comm demo` leaves its model (``OUT/stage2/final`` beside
``OUT/world``), so the page offers that image as the demo's example, and the README's screenshot code runs on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import single_torch_thread, write_huge_png
from PIL import Image, ImageDraw

from comm.conversation import CAPTION_PROMPT, rec_prompt, with_image
from comm.loading import load_model_and_processor
from comm.pipeline import CommPipeline
from comm.web.browser import DemoPage, browser_paths, headless_chromium, web_server
from comm.web.handlers import NO_IMAGE
from comm.web.screenshot import BOX_DRAWN, screenshot_after_grounding

EXPRESSION = "the red square"
CAPTION = "A red square on white."
BOX = "[0.10,0.25,0.60,0.75]"
BOX_PIXELS = "box (20.0, 0.0, 120.0, 100.0) in pixels of the 200x100 image"
CHAT = [("What colour is the square?", "Red."), ("And its shape?", "A square.")]
MAX_STEPS = 400
RED = (255, 0, 0)

if browser_paths() is None:
    if os.environ.get("CI"):  # CI installs them (.ci/run): a skip there would hide a broken browser test
        raise RuntimeError("chromium and chromedriver are missing in CI: apt-get install -y chromium chromium-driver")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)", True)


def red_square_photo() -> Image.Image:
    """The one image the test checkpoint knows: a red square (x 20..120) on a white 200x100 picture."""
    image = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(image).rectangle((30, 10, 110, 90), fill=(200, 30, 30))
    return image


def conversations() -> list[list[tuple[str, str]]]:
    """What the checkpoint is trained to answer: a caption, a box, and two chat turns."""
    return [
        [(CAPTION_PROMPT, CAPTION)],
        [(rec_prompt(EXPRESSION), BOX)],
        [(with_image(CHAT[0][0]), CHAT[0][1]), CHAT[1]],
    ]


def answers(pipe: CommPipeline, image: Image.Image) -> list[str]:
    """The checkpoint's greedy answers to what it is trained on (to compare with `conversations`)."""
    return [
        pipe.caption(image)[0],
        pipe.ground_detailed(image, EXPRESSION)[0].answer,
        pipe.ask(image, CHAT[0][0]),
        pipe.ask(image, CHAT[1][0], history=[CHAT[0]]),
    ]


def train_to_answer(model_dir: Path, out: Path, image: Image.Image) -> None:
    """Fit the tiny model to `conversations` about ``image`` (the answers only carry the loss), save it to ``out``."""
    torch.manual_seed(0)
    model, processor = load_model_and_processor(model_dir, "cpu")
    template = processor.template
    batches = []
    for turns in conversations():
        for end in range(1, len(turns) + 1):
            prompt = processor(text=[template.prompt(turns[end - 1][0], turns[: end - 1])], images=[image])
            batch = processor(text=[template.render(turns[:end]).text], images=[image])
            labels = batch["input_ids"].clone()
            labels[:, : prompt["input_ids"].shape[1]] = -100
            batch["labels"] = labels
            batches.append(batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    pipe = CommPipeline(model, processor)
    expected = [CAPTION, BOX, CHAT[0][1], CHAT[1][1]]
    extra_steps = None  # a few more steps once greedy is right, so the answers do not hang on a tiny margin
    for step in range(MAX_STEPS):
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if extra_steps is None and step % 10 == 9:
            model.eval()
            if answers(pipe, image) == expected:
                extra_steps = 20
        elif extra_steps is not None:
            extra_steps -= 1
            if extra_steps == 0:
                break
    model.eval()
    assert answers(pipe, image) == expected, f"the test model did not learn its answers in {MAX_STEPS} steps"
    model.save_pretrained(out)
    processor.save_pretrained(out)


@pytest.fixture(scope="module")
def demo_layout(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, its example image): the trained tiny model at OUT/stage2/final, the image in OUT/world."""
    out = tmp_path_factory.mktemp("web-demo")
    photo = out / "world" / "images" / "test_00000.png"
    photo.parent.mkdir(parents=True)
    red_square_photo().save(photo)
    record = {"id": "0", "image": "images/test_00000.png", "expression": EXPRESSION, "bbox": [30, 10, 80, 80]}
    (out / "world" / "test_rec.jsonl").write_text(json.dumps(record) + "\n")
    checkpoint = out / "stage2" / "final"
    with single_torch_thread():
        train_to_answer(tiny_model_dir, checkpoint, red_square_photo())
    return checkpoint, photo


def check_drawn_box(page: DemoPage, photo: Image.Image) -> None:
    """The page's picture is the photo shown 2x with the red box at (40, 0, 240, 200), 3 px wide, inside untouched."""
    drawn = page.ground_picture()
    assert drawn is not None and drawn.size == (2 * photo.width, 2 * photo.height)
    for x, y in ((41, 120), (239, 120), (140, 198)):  # left, right and bottom edges (the label sits at the top)
        assert drawn.getpixel((x, y)) == RED, (x, y)
    assert drawn.getpixel((140, 100)) == photo.getpixel((70, 50)) and drawn.getpixel((20, 100)) == (255, 255, 255)


def test_the_page_as_a_person_uses_it(demo_layout, tmp_path):
    checkpoint, example = demo_layout
    photo = red_square_photo()
    upload = tmp_path / "my photo.png"
    photo.save(upload)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    bomb = write_huge_png(tmp_path / "bomb.png")

    with web_server(checkpoint) as url, headless_chromium() as driver:
        assert url.startswith("http://127.0.0.1:")
        page = DemoPage(driver, url).open()
        facts = page.model_facts()
        assert str(checkpoint) in facts and "merged layers" in facts and "LLN-Layerscale weights" in facts

        # The README's screenshot, on the page's own example: caption and box of the held-out image.
        shot, status = screenshot_after_grounding(page, tmp_path / "page.png")
        assert status == BOX_DRAWN
        with Image.open(shot) as picture:
            assert picture.format == "PNG" and picture.width == 1280 and picture.height > 1000
        assert page._value("#caption") == CAPTION and page._value("#expression") == EXPRESSION
        assert page._value("#ground-answer") == f"{BOX}\n{BOX_PIXELS}"
        check_drawn_box(page, photo)

        # An upload, then caption, box and a chat of two turns (the second answer needs the first as history).
        assert page.upload(upload) == "image 200x100 ready"
        assert page._value("#caption") == "" and page.ground_picture() is None  # the last image's answers go
        assert page.caption() == (CAPTION, "captioned")
        assert page.ground(EXPRESSION) == (f"{BOX}\n{BOX_PIXELS}", BOX_DRAWN)
        check_drawn_box(page, photo)
        assert page.ask(CHAT[0][0]) == (CHAT[0][1], "answered")
        assert page.ask(CHAT[1][0]) == (CHAT[1][1], "answered")
        assert page.chat_answers() == [CHAT[0][1], CHAT[1][1]]
        assert page.start_over() == "new conversation" and page.chat_answers() == []

        # Bad text: a message on the page, and the next request works.
        assert page.send("   ") == "error: the question is empty: type one first"
        status = page.send("What is </s> this?")
        assert status.startswith("error: question 0 holds the text '</s>'"), status
        assert page.ask(CHAT[0][0]) == (CHAT[0][1], "answered")

        # Bad files: a message on the page, nothing to answer about, and the next request works.
        status = page.upload(not_an_image)
        assert status.startswith("error: notes.png") and "not a readable image" in status, status
        assert page.caption() == ("", NO_IMAGE)
        status = page.upload(bomb)
        assert status.startswith("error: bomb.png") and "decompression bomb" in status, status
        assert page.upload(upload) == "image 200x100 ready"
        assert page.ground(EXPRESSION) == (f"{BOX}\n{BOX_PIXELS}", BOX_DRAWN)
        check_drawn_box(page, photo)

        # Nothing on the page came from anywhere but this server.
        outside = [address for address in page.resources() if not address.startswith((url, "data:", "blob:"))]
        assert outside == []
