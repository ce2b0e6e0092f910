"""The web demo without a browser: its handlers on the tiny model, the one-at-a-time runner, the checkpoint and
examples it serves, and ``comm web``'s command line (missing extra, missing demo model, where it binds)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_huge_png
from PIL import Image
from test_optional_extras import run_blocked

from comm.cli import main
from comm.demo.run import DemoConfig
from comm.demo.world import WorldConfig, generate_world
from comm.inspection import format_summary, model_summary
from comm.web.checkpoint import DEFAULT_CHECKPOINT, demo_examples, model_facts, resolve_checkpoint
from comm.web.handlers import NO_IMAGE, WebHandlers
from comm.web.runner import BUSY_MESSAGE, BusyError, ModelRunner

TOKENS = 6
BOX_ANSWER = "[0.100,0.250,0.600,0.750]"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One CPU thread (a shared, busy machine makes OpenMP crawl)."""


@pytest.fixture
def handlers(pipe) -> WebHandlers:
    return WebHandlers(pipe, max_new_tokens=TOKENS)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    image = Image.new("RGB", (200, 100), (240, 240, 240))
    image.paste((30, 30, 200), (140, 20, 190, 80))
    return image


def last(generator) -> tuple:
    """The last value a handler yields (what the page shows when it is done)."""
    values = list(generator)
    assert values, "the handler yielded nothing"
    return values[-1]


def fake_answer(monkeypatch, answer: str) -> list[str]:
    """Make generation answer ``answer`` without the model; returns the questions it was asked."""
    asked: list[str] = []

    def generate_answers(model, processor, images, questions, batch_size=8, **kwargs):
        asked.extend(questions)
        return [answer] * len(questions)

    monkeypatch.setattr("comm.pipeline.generate_answers", generate_answers)
    return asked


def test_opening_an_image_and_refusing_what_is_not_one(handlers, photo, tmp_path):
    good = tmp_path / "photo.png"
    photo.save(good)
    preview, state, caption, ground_text, ground_image, chat, turns, status = handlers.open_image(str(good))
    assert state.size == (200, 100) and status == "image 200x100 ready"
    assert preview.size == (400, 200) and preview.getpixel((300, 60)) == photo.getpixel((150, 30))  # shown 2x
    assert (caption, ground_text, ground_image, chat, turns) == ("", "", None, [], [])

    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    *_, status = handlers.open_image(str(text))
    assert status.startswith("error: notes.png") and "not a readable image" in status and "\n" not in status
    for side in (100_000, 10_000):  # over twice PIL's limit (PIL refuses it), and just over it (comm.images does)
        bomb = write_huge_png(tmp_path / f"bomb_{side}.png", side, side)
        preview, state, *_, status = handlers.open_image(str(bomb))
        assert preview is None and state is None
        assert status.startswith(f"error: bomb_{side}.png") and "decompression bomb" in status
    assert handlers.open_image(None)[-1] == NO_IMAGE
    assert handlers.open_image(str(good))[-1] == "image 200x100 ready"  # and the next one works


def test_caption_streams_token_by_token_and_ends_with_the_pipeline_caption(handlers, pipe, photo):
    steps = list(handlers.caption(photo))
    (expected,) = pipe.caption(photo, max_new_tokens=TOKENS)
    assert steps[-1] == (expected, "captioned")
    streamed = [text for text, status in steps[:-1]]
    assert all(status == "captioning..." for _, status in steps[:-1])
    assert len(streamed) >= 2, "the caption did not arrive in pieces"
    assert all(expected.startswith(text.strip()) for text in streamed)  # each piece extends the caption so far
    assert streamed == sorted(streamed, key=len) and streamed[-1].strip() == expected.strip()
    assert not handlers.runner.busy


def test_ground_draws_the_box_and_says_where_it_is(handlers, photo, monkeypatch):
    asked = fake_answer(monkeypatch, BOX_ANSWER)
    text, drawn, status = last(handlers.ground(photo, "  the blue square "))
    assert "the blue square" in asked[0]
    # 200x100 image: square side 200, 50 px top padding -> (0.1*200, 0.25*200-50, 0.6*200, 0.75*200-50).
    assert status == "box drawn"
    assert text == f"{BOX_ANSWER}\nbox (20.0, 0.0, 120.0, 100.0) in pixels of the 200x100 image"
    assert drawn.size == (400, 200)  # shown enlarged 2x: the box at (40, 0, 240, 200), 3 px wide
    for x, y in ((40, 120), (42, 120), (238, 120), (240, 120), (140, 199)):
        assert drawn.getpixel((x, y)) == (255, 0, 0), (x, y)
    assert drawn.getpixel((43, 120)) == photo.getpixel((21, 60)) and drawn.getpixel((300, 60)) == (30, 30, 200)
    assert photo.getpixel((20, 60)) != (255, 0, 0)  # the page's image is not drawn on

    fake_answer(monkeypatch, "I cannot see it.")
    text, shown, status = last(handlers.ground(photo, "the dog"))
    assert status == "no box in the answer" and text == "I cannot see it.\nno box in this answer"
    assert shown.size == (400, 200) and shown.getpixel((300, 60)) == (30, 30, 200)


def test_bad_text_gets_a_message_and_no_model_call(handlers, photo, monkeypatch):
    asked = fake_answer(monkeypatch, BOX_ANSWER)
    assert last(handlers.ground(photo, "   ")) == ("", None, "error: the expression is empty: type one first")
    assert last(handlers.ground(None, "the cat")) == ("", None, NO_IMAGE)
    *_, status = last(handlers.chat(photo, "", []))
    assert status == "error: the question is empty: type one first"
    *_, status = last(handlers.chat(photo, "where is <image> here?", []))
    assert "holds <image>" in status
    assert asked == []
    for special in ("</s>", "<s>", "<im_patch>"):
        *_, status = last(handlers.chat(photo, f"what is {special} this", []))
        assert status.startswith("error: question 0 holds the text") and special in status
        text, _, status = last(handlers.ground(photo, f"the {special} square"))
        assert special in status and text == ""
    assert asked == []  # refused before generation
    assert last(handlers.caption(None)) == ("", NO_IMAGE)
    assert not handlers.runner.busy


def test_chat_passes_the_earlier_turns_as_history_and_starts_over(handlers, pipe, photo, monkeypatch):
    calls = []
    ask = pipe.ask

    def spy(image, question, **kwargs):
        calls.append((question, kwargs.get("history")))
        return ask(image, question, **kwargs)

    monkeypatch.setattr(pipe, "ask", spy)
    messages, turns, box, status = last(handlers.chat(photo, "What is this?", []))
    first = ask(photo, "What is this?", max_new_tokens=TOKENS)
    assert calls == [("What is this?", [])]
    assert status == "answered" and box == "" and turns == [["What is this?", first]]
    assert messages == [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": first}]

    messages, turns, _, status = last(handlers.chat(photo, "And the colour?", turns))
    second = ask(photo, "And the colour?", history=[("What is this?", first)], max_new_tokens=TOKENS)
    assert calls[1] == ("And the colour?", [("What is this?", first)])
    assert turns == [["What is this?", first], ["And the colour?", second]] and len(messages) == 4
    assert handlers.start_over() == ([], [], "", "new conversation")

    *_, status = last(handlers.chat(photo, "x " * 400, turns))  # past the tiny model's 256 tokens
    assert status.startswith("error: question 0 makes a prompt of") and "shorten it" in status


def test_a_request_while_another_runs_is_told_the_model_is_busy(handlers, photo):
    release = threading.Event()
    running = handlers.runner.start(lambda **stream: release.wait(60))
    assert handlers.runner.busy
    assert last(handlers.caption(photo)) == ("", f"error: {BUSY_MESSAGE}")
    messages, turns, box, status = last(handlers.chat(photo, "What is this?", [["Hi?", "Hello."]]))
    assert status == f"error: {BUSY_MESSAGE}" and turns == [["Hi?", "Hello."]] and box == "What is this?"
    with pytest.raises(BusyError):
        handlers.runner.start(lambda **stream: None)
    release.set()
    assert list(running) == [] and running.result is True
    assert last(handlers.caption(photo))[1] == "captioned"  # the next request works


def test_a_failed_call_reports_its_error_and_frees_the_model(pipe):
    runner = ModelRunner(pipe)

    def fail(**stream):
        raise ValueError("bad input")

    running = runner.start(fail)
    assert list(running) == []
    with pytest.raises(ValueError, match="bad input"):
        _ = running.result
    assert not runner.busy


def test_leaving_a_stream_early_stops_generation(pipe):
    runner = ModelRunner(pipe)
    steps = []

    def endless(streamer, stopping_criteria):
        for step in range(10_000):
            streamer.on_finalized_text(f"word{step} ")
            steps.append(step)
            if stopping_criteria(torch.zeros((1, 1), dtype=torch.long), None).all():
                return "stopped"
            time.sleep(0.005)
        return "ran out"

    running = runner.start(endless)
    pieces = iter(running)
    assert next(pieces) == "word0 "
    pieces.close()  # the page went away
    assert running.result == "stopped" and len(steps) < 10_000
    deadline = time.monotonic() + 10
    while runner.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not runner.busy


def test_model_facts_are_what_comm_inspect_prints(pipe, tiny_model_dir):
    facts = model_facts(tiny_model_dir, pipe)
    assert facts.startswith(f"COMM checkpoint {tiny_model_dir}\nrunning on cpu, float32\n")
    assert facts.endswith(format_summary(model_summary(pipe.model)))
    assert "merged layers" in facts and "LLN-Layerscale weights per merged layer" in facts


def test_the_default_checkpoint_is_the_demo_model(tmp_path, monkeypatch, capsys):
    assert DemoConfig().out / "stage2" / "final" == DEFAULT_CHECKPOINT
    monkeypatch.chdir(tmp_path)
    assert main(["web"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "run `comm demo` first or pass a checkpoint" in error
    (tmp_path / DEFAULT_CHECKPOINT).mkdir(parents=True)
    assert resolve_checkpoint(None) == DEFAULT_CHECKPOINT
    assert resolve_checkpoint("elsewhere") == Path("elsewhere")


def test_a_demo_checkpoint_offers_its_held_out_images(tmp_path):
    out = tmp_path / "my-demo"
    world = generate_world(out / "world", WorldConfig(num_train_images=2, num_test_images=3))
    checkpoint = out / "stage2" / "final"
    checkpoint.mkdir(parents=True)
    examples = demo_examples(checkpoint)
    assert [example.image.name for example in examples] == ["test_00000.png", "test_00001.png", "test_00002.png"]
    assert all(example.image.parent == world.images_dir and example.expression for example in examples)
    assert len(demo_examples(checkpoint, limit=2)) == 2
    other = tmp_path / "runs" / "final"
    other.mkdir(parents=True)
    assert demo_examples(other) == []


def test_comm_web_binds_to_this_machine_and_shares_nothing_by_default(tiny_model_dir, monkeypatch, capsys):
    gradio = pytest.importorskip("gradio")
    launched = {}

    def launch(self, **kwargs):
        launched.update(kwargs)
        return None, f"http://{kwargs['server_name']}:{kwargs['server_port']}/", None

    monkeypatch.setattr(gradio.Blocks, "launch", launch)
    monkeypatch.setattr(gradio.Blocks, "block_thread", lambda self: None)
    assert main(["web", str(tiny_model_dir), "--device", "cpu", "--port", "7999"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999 and launched["share"] is False
    assert f"serving {tiny_model_dir} at http://127.0.0.1:7999/" in capsys.readouterr().out
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_comm_web_without_gradio_is_one_line_naming_the_extra(tiny_model_dir):
    result = run_blocked(
        """
        import sys
        from comm.cli import main
        sys.exit(main(["web", sys.argv[1]]))
        """,
        str(tiny_model_dir),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and "pip install 'comm[web]'" in result.stderr, result.stderr
