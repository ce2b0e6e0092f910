"""Tests of `comm.pipeline.CommPipeline` (on the tiny random model) and of the drawing helpers in `comm.visualize`."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import write_huge_png
from PIL import Image, ImageDraw
from transformers import TextIteratorStreamer

import comm.processing
from comm.boxes import format_box, normalize_box, parse_box
from comm.data.samples import rec_turns
from comm.evaluation.rec import RecSample, RecTask
from comm.evaluation.runner import answer_batch
from comm.loading import check_model_folder
from comm.model.modeling import CommForConditionalGeneration
from comm.pipeline import CommPipeline, Grounding
from comm.processing import CommProcessor, tower_image_processor
from comm.visualize import GT_COLOR, PRED_COLOR, draw_boxes, image_grid, save_rec_grid

TOKENS = 8  # new tokens per answer: enough to tell answers apart, short enough for a fast suite


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls gain nothing from more threads


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    """Five non-square/square images of different sizes, as a PIL image, a path, an array, PIL, path."""
    folder = tmp_path_factory.mktemp("images")
    sizes = [(200, 100), (64, 96), (120, 120), (90, 40), (33, 77)]
    pils = [noise_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    paths = []
    for i, image in enumerate(pils):
        path = folder / f"image_{i}.png"
        image.save(path)
        paths.append(str(path))
    return [pils[0], paths[1], np.asarray(pils[2]), pils[3], paths[4]]


@pytest.fixture
def no_generation(monkeypatch):
    """Make any call of the model's generate fail the test; returns the mock to check it was never called."""
    spy = mock.Mock(side_effect=AssertionError("model.generate must not run for bad input"))
    monkeypatch.setattr(CommForConditionalGeneration, "generate", spy)
    return spy


# ---------------------------------------------------------------- loading


def test_from_pretrained_picks_cpu_float32_eval_mode(pipe):
    assert pipe.device.type == "cpu"
    assert pipe.dtype == torch.float32
    assert not pipe.model.training
    assert isinstance(pipe.processor, CommProcessor)


def test_from_pretrained_honours_dtype(tiny_model_dir):
    bf16 = CommPipeline.from_pretrained(tiny_model_dir, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    assert next(bf16.model.language_model.parameters()).dtype == torch.bfloat16


def test_unavailable_cuda_fails_before_loading(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with mock.patch.object(CommForConditionalGeneration, "from_pretrained") as load_model:
        with pytest.raises(ValueError, match="CUDA is not available"):
            CommPipeline.from_pretrained(tiny_model_dir, device="cuda")
    load_model.assert_not_called()


def test_constructor_wraps_loaded_model(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).train()
    pipe = CommPipeline(model, CommProcessor.from_pretrained(tiny_model_dir))
    assert pipe.model is model and not model.training


def _linked_copy(source: Path, target: Path) -> Path:
    """A copy of the model folder made of symlinks (deleting a link leaves the fixture intact)."""
    shutil.copytree(source, target, copy_function=os.symlink)
    return target


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("processor_config.json", "processor_config.json"),
        ("config.json", "config.json"),
        ("model.safetensors", "the weights"),
    ],
)
def test_incomplete_model_folder_fails_before_loading_weights(tiny_model_dir, tmp_path, missing, expected):
    folder = _linked_copy(tiny_model_dir, tmp_path / "model")
    (folder / missing).unlink()
    with (
        mock.patch.object(CommForConditionalGeneration, "from_pretrained") as load_model,
        mock.patch.object(CommProcessor, "from_pretrained") as load_processor,
    ):
        with pytest.raises(FileNotFoundError) as error:
            CommPipeline.from_pretrained(folder)
    assert str(folder) in str(error.value) and expected in str(error.value)
    load_model.assert_not_called()
    load_processor.assert_not_called()


def test_processor_config_without_an_image_processor_fails_before_loading_weights(tiny_model_dir, tmp_path):
    folder = _linked_copy(tiny_model_dir, tmp_path / "model")
    settings = json.loads((folder / "processor_config.json").read_text())
    del settings["clip_image_processor"]
    (folder / "processor_config.json").unlink()
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with mock.patch.object(CommForConditionalGeneration, "from_pretrained") as load_model:
        with pytest.raises(FileNotFoundError, match="missing clip_image_processor in processor_config.json"):
            CommPipeline.from_pretrained(folder)
    load_model.assert_not_called()


def test_missing_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nowhere"):
        CommPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="model folder not found: .*runs/stage2/final"):
        CommPipeline.from_pretrained("runs/stage2/final")  # not a hub id (two slashes), not a folder here
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        CommPipeline.from_pretrained(tmp_path / "file.bin")


def test_hub_id_that_cannot_be_fetched_names_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # "someone/comm-7b" is then surely no local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="someone/comm-7b.*Hugging Face Hub"):
        CommPipeline.from_pretrained("someone/comm-7b")


def test_foreign_config_is_refused(tiny_model_dir, tmp_path):
    folder = _linked_copy(tiny_model_dir, tmp_path / "model")
    (folder / "config.json").unlink()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type 'llama', expected 'comm'"):
        check_model_folder(folder)


# ---------------------------------------------------------------- batched == one at a time, order kept


def test_caption_batched_equals_one_at_a_time(pipe, images):
    batched = pipe.caption(images, batch_size=len(images), max_new_tokens=TOKENS)
    single = [pipe.caption(image, batch_size=1, max_new_tokens=TOKENS)[0] for image in images]
    assert batched == single
    assert len(set(batched)) == len(images), "captions must differ for the comparison to mean anything"


def test_ask_batched_equals_one_at_a_time_with_left_padding(pipe, images):
    # Questions of different lengths: the batch is left-padded, the single runs are not.
    questions = [
        "What is this?",
        "Describe the colours you see in this picture in as much detail as you can.",
        "Is there a dog?",
        "<image>\nWhere was this photo taken, and at what time of the day?",
        "Why?",
    ]
    batched = pipe.ask(images, questions, batch_size=len(images), max_new_tokens=TOKENS)
    single = [pipe.ask(image, question, max_new_tokens=TOKENS) for image, question in zip(images, questions)]
    assert isinstance(batched, list) and all(isinstance(s, str) for s in single)
    assert batched == single
    assert len(set(batched)) == len(images)


def test_ground_batched_equals_one_at_a_time(pipe, images):
    expressions = [
        "the cat",
        "the tall man in a blue shirt on the left",
        "a tree",
        "the second car from the right",
        "it",
    ]
    batched = pipe.ground_detailed(images, expressions, batch_size=len(images), max_new_tokens=TOKENS)
    single = [pipe.ground_detailed(image, e, max_new_tokens=TOKENS)[0] for image, e in zip(images, expressions)]
    assert batched == single
    assert len({result.answer for result in batched}) >= 3  # distinct enough for the comparison to mean something
    assert pipe.ground(images, expressions, batch_size=2, max_new_tokens=TOKENS) == [r.box for r in batched]


def test_ask_continues_a_conversation_from_its_history(pipe):
    image = noise_image(40, 30, 5)
    history = [("What is in the picture?", "Noise."), ("Is it loud?", "No.")]
    answer = pipe.ask(image, "What colour is it?", history=history, max_new_tokens=TOKENS)
    # the prompt is the multi-turn training text so far: the image in front of the first question
    prompt = pipe.processor.template.prompt(
        "What colour is it?", [("<image>\nWhat is in the picture?", "Noise."), ("Is it loud?", "No.")]
    )
    assert (
        pipe.processor.apply_chat_template(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
                {"role": "assistant", "content": "Noise."},
                {"role": "user", "content": "Is it loud?"},
                {"role": "assistant", "content": "No."},
                {"role": "user", "content": "What colour is it?"},
            ],
            add_generation_prompt=True,
        )
        == prompt
    )
    inputs = pipe.processor(text=[prompt], images=[image], padding_side="left")
    output = pipe.model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    assert answer == pipe.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer != pipe.ask(image, "What colour is it?", max_new_tokens=TOKENS)  # the history changes the answer
    # the image placeholder may sit in a turn of the history instead
    moved = [("What is in the picture? <image>", "Noise."), ("Is it loud?", "No.")]
    assert isinstance(pipe.ask(image, "What colour is it?", history=moved, max_new_tokens=TOKENS), str)


@pytest.mark.parametrize(
    ("images_and_question", "history", "error", "message"),
    [
        ("two images", [("Hi?", "Hello.")], ValueError, "a history continues one conversation"),
        ("one image", [("Hi?",)], ValueError, "history turn 0 must be a .question, answer. pair"),
        ("one image", [("", "Hello.")], ValueError, "history turn 0: the question must be a non-empty string"),
        ("one image", "Hi?", TypeError, "history must be a list of .question, answer. pairs"),
        ("one image", [("<image> Hi?", "Hello."), ("<image> And?", "Yes.")], ValueError, "holds 2 <image>"),
    ],
)
def test_a_bad_history_is_named(pipe, images_and_question, history, error, message):
    image = noise_image(20, 20, 1)
    images = [image, image] if images_and_question == "two images" else image
    with pytest.raises(error, match=message):
        pipe.ask(images, "What now?", history=history, max_new_tokens=TOKENS)


def test_outputs_follow_shuffled_inputs(pipe, images):
    questions = ["What is this?", "Is it day or night?", "How many objects?", "What colour dominates?", "Why?"]
    reference = pipe.ask(images, questions, batch_size=len(images), max_new_tokens=TOKENS)
    order = list(range(len(images)))
    random.Random(3).shuffle(order)
    assert order != sorted(order)
    shuffled = pipe.ask([images[i] for i in order], [questions[i] for i in order], batch_size=2, max_new_tokens=TOKENS)
    assert shuffled == [reference[i] for i in order]

    captions = pipe.caption(images, batch_size=3, max_new_tokens=TOKENS)
    assert pipe.caption([images[i] for i in order], batch_size=2, max_new_tokens=TOKENS) == [captions[i] for i in order]


def test_four_dimensional_array_is_a_batch(pipe):
    stack = np.stack([np.asarray(noise_image(48, 32, seed)) for seed in (10, 11)])
    captions = pipe.caption(stack, max_new_tokens=TOKENS)
    assert captions == [
        pipe.caption(stack[0], max_new_tokens=TOKENS)[0],
        pipe.caption(stack[1], max_new_tokens=TOKENS)[0],
    ]


# ---------------------------------------------------------------- boxes in original pixels


@pytest.fixture
def scripted_answers(monkeypatch):
    """Replace generation with answers picked by image size; records what generation was given."""
    answers = {
        (200, 100): "[0.100,0.250,0.600,0.750]",
        (100, 200): "It is here: [0.300,0.100,0.700,0.900].",
        (120, 60): "[0.000,0.000,1.000,1.000]",
        (50, 50): "I cannot see it.",
    }
    calls = []

    def fake_generate_answers(model, processor, images, questions, batch_size=8, **kwargs):
        calls.append({"sizes": [image.size for image in images], "questions": list(questions)})
        return [answers[image.size] for image in images]

    monkeypatch.setattr("comm.pipeline.generate_answers", fake_generate_answers)
    return calls


def test_ground_maps_padded_square_boxes_to_original_pixels(pipe, scripted_answers):
    # 200x100: the padded square has side 200 and the image sits 50 px down (top = (200 - 100) // 2).
    #   x: 0.1 * 200 - 0 = 20, 0.6 * 200 = 120; y: 0.25 * 200 - 50 = 0, 0.75 * 200 - 50 = 100.
    assert pipe.ground(noise_image(200, 100, 0), "the thing") == pytest.approx((20.0, 0.0, 120.0, 100.0))
    # 100x200: side 200, the image sits 50 px right (left = 50).
    #   x: 0.3 * 200 - 50 = 10, 0.7 * 200 - 50 = 90; y: 0.1 * 200 = 20, 0.9 * 200 = 180.
    assert pipe.ground(noise_image(100, 200, 1), "the thing") == pytest.approx((10.0, 20.0, 90.0, 180.0))
    # 120x60: side 120, top 30; the full square [0, 1] covers the padding too and is clipped to the image:
    #   y: 0 - 30 = -30 -> 0, 120 - 30 = 90 -> 60.
    assert pipe.ground(noise_image(120, 60, 2), "everything") == pytest.approx((0.0, 0.0, 120.0, 60.0))
    assert pipe.ground(noise_image(50, 50, 3), "the unicorn") is None


def test_ground_lists_and_broadcasting(pipe, scripted_answers):
    wide, tall, square = noise_image(200, 100, 0), noise_image(100, 200, 1), noise_image(50, 50, 3)
    boxes = pipe.ground([tall, square, wide], ["a", "b", "c"])
    assert boxes[0] == pytest.approx((10.0, 20.0, 90.0, 180.0))
    assert boxes[1] is None
    assert boxes[2] == pytest.approx((20.0, 0.0, 120.0, 100.0))
    # One image, several expressions: one result per expression, each question naming its expression.
    results = pipe.ground_detailed(wide, ["the left dog", "the right dog"])
    assert [r.image_size for r in results] == [(200, 100), (200, 100)]
    assert "the left dog" in scripted_answers[-1]["questions"][0]
    assert "the right dog" in scripted_answers[-1]["questions"][1]
    assert isinstance(results[0], Grounding) and results[0].answer == "[0.100,0.250,0.600,0.750]"
    assert results[1].box == pytest.approx((20.0, 0.0, 120.0, 100.0))
    # Generation saw the original (unpadded) images: padding to a square is the processor's job.
    assert scripted_answers[0]["sizes"] == [(100, 200), (50, 50), (200, 100)]


@pytest.mark.parametrize("pad_to_square", [True, False])
def test_a_known_box_maps_back_within_one_pixel_in_both_image_modes(pipe, monkeypatch, tmp_path, pad_to_square):
    # A red box drawn on a 300x200 photo, edges chosen to fall on pixel edges of the 336 px CLIP input in both
    # modes (scale 1.12 padded, 1.68 cropped). Where the tower sees it, written as the model's answer, must come
    # back to the drawn box through the pipeline and the REC evaluation, and be what training teaches.
    width, height, drawn = 300, 200, (75, 50, 175, 150)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    ImageDraw.Draw(image).rectangle([drawn[0], drawn[1], drawn[2] - 1, drawn[3] - 1], fill=(255, 0, 0))
    image.save(tmp_path / "photo.png")
    processor = CommProcessor(
        pipe.processor.tokenizer,
        tower_image_processor("clip", 336),
        tower_image_processor("dino", 224),
        pipe.processor.num_image_tokens,
        pad_to_square=pad_to_square,
    )
    green = processor.preprocess_images([image])["pixel_values_clip"][0, 1] * 0.26130258 + 0.4578275
    rows, columns = np.nonzero((green < 0.25).numpy())  # red: 0, grey: 0.5, white padding: 1
    seen = (columns.min() / 336, rows.min() / 336, (columns.max() + 1) / 336, (rows.max() + 1) / 336)
    other_mode = normalize_box(drawn, width, height, not pad_to_square)
    assert max(abs(a - b) for a, b in zip(seen, other_mode)) > 0.05  # the two modes put the box elsewhere
    answer = f"It is at {format_box(seen)}."

    monkeypatch.setattr("comm.pipeline.generate_answers", lambda *args, **kwargs: [answer])
    assert CommPipeline(pipe.model, processor).ground(image, "the red box") == pytest.approx(drawn, abs=1.0)

    monkeypatch.setattr("comm.evaluation.task.generate_answers", lambda *args, **kwargs: [answer])
    sample = RecSample("1", str(tmp_path / "photo.png"), "the red box", tuple(float(v) for v in drawn))
    (record,) = answer_batch(RecTask([sample]), pipe.model, processor, [sample])
    assert record["pred_box"] == pytest.approx(drawn, abs=1.0) and record["iou"] > 0.97

    bbox = [drawn[0], drawn[1], drawn[2] - drawn[0], drawn[3] - drawn[1]]
    ((_, target),) = rec_turns({"expression": "the red box", "bbox": bbox}, (width, height), pad_to_square)
    assert parse_box(target) == pytest.approx(seen, abs=1e-3)


# ---------------------------------------------------------------- validation before any model work


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad")
    text_png = folder / "notes.png"
    text_png.write_text("this is text, not an image")
    bomb = write_huge_png(folder / "bomb.png")
    return {"text_png": str(text_png), "missing": str(folder / "missing.png"), "bomb": str(bomb)}


@pytest.mark.parametrize("method", ["caption", "ground", "ask"])
@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("missing", FileNotFoundError, r"image 2: no such image file: .*missing\.png"),
        ("text_png", ValueError, r"image 2: .*notes\.png is not a readable image"),
        ("bomb", ValueError, r"image 2: .*bomb\.png: image too large, refused unread as a possible decompression bomb"),
        ("tiny", ValueError, r"image 2: image of size 1x1 is too small"),
        ("empty_array", ValueError, r"image 2: image of size 0x0 is too small"),
        ("empty_list", ValueError, r"no images given"),
    ],
)
def test_bad_images_raise_before_generation(pipe, images, bad_files, no_generation, method, case, error, message):
    bad = {
        "missing": bad_files["missing"],
        "text_png": bad_files["text_png"],
        "bomb": bad_files["bomb"],
        "tiny": Image.new("RGB", (1, 1)),
        "empty_array": np.zeros((0, 0, 3), dtype=np.uint8),
    }
    # Two good images first: a pipeline that generated batch by batch before validating would call generate.
    batch = [] if case == "empty_list" else [images[0], images[1], bad[case]]
    texts = ["x"] * len(batch) if batch else ["x"]
    with pytest.raises(error, match=message):
        if method == "caption":
            pipe.caption(batch, batch_size=1)
        elif method == "ground":
            pipe.ground(batch, texts, batch_size=1)
        else:
            pipe.ask(batch, texts, batch_size=1)
    no_generation.assert_not_called()


def test_bad_texts_raise_before_generation(pipe, images, no_generation):
    with pytest.raises(ValueError, match="got 2 images but 3 expressions"):
        pipe.ground(images[:2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="got 3 images but 2 questions"):
        pipe.ask(images[:3], ["a", "b"])
    with pytest.raises(ValueError, match="no expressions given"):
        pipe.ground(images[0], [])
    with pytest.raises(ValueError, match="expression 1 is empty"):
        pipe.ground(images[0], ["the cat", "  "])
    with pytest.raises(TypeError, match="question 0: expected a string"):
        pipe.ask(images[0], [3])
    with pytest.raises(ValueError, match="question 0 holds 2 <image> placeholders"):
        pipe.ask(images[0], "<image> and <image>?")
    with pytest.raises(ValueError, match="over the model's limit of 256"):
        pipe.ask(images[:2], ["Fine?", "word " * 300])
    streamer = mock.Mock()
    with pytest.raises(ValueError, match="streaming needs a single image and a single question"):
        pipe.ask(images[:2], ["a", "b"], streamer=streamer)
    streamer.end.assert_called_once()  # a consumer thread waiting on the streamer is released
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipe.caption(images[0], batch_size=0)
    # Literal special-token text is refused, not read as the token (an end of sequence in mid-question).
    with pytest.raises(ValueError, match="question 1 holds the text '</s>', which the tokenizer reads as its special"):
        pipe.ask(images[:2], ["Fine?", "What is </s> here?"])
    with pytest.raises(ValueError, match="question 0 holds the text '<s>'"):
        pipe.ground(images[0], "the <s> cat")
    with pytest.raises(ValueError, match="history turn 0 holds the text '</s>'"):
        pipe.ask(images[0], "And now?", history=[("<image>\nWhat is it?", "A cat</s>")])
    no_generation.assert_not_called()


def test_a_long_question_in_a_later_batch_is_named_by_its_place(pipe, images):
    with pytest.raises(ValueError, match="question 2 makes a prompt of .* over the model's limit of 256: shorten it"):
        pipe.ask(images[:3], ["Fine?", "Good?", "word " * 300], batch_size=2, max_new_tokens=1)


def test_each_image_is_decoded_once_and_each_prompt_tokenized_once(pipe, images, monkeypatch):
    """A path is opened and decoded once (by `load_images`), an RGB PIL image reaches the processor as it is (no
    copy), and the prompt is tokenized once: the processor's tokens serve both the length check and generation."""
    opened, squared, tokenized = [], [], []
    open_image = Image.open
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(args[0]) or open_image(*args, **kwargs))
    expand = comm.processing.expand_to_square
    monkeypatch.setattr(
        comm.processing, "expand_to_square", lambda image, color: squared.append(image) or expand(image, color)
    )
    tokenizer_class = type(pipe.processor.tokenizer)
    tokenize = tokenizer_class.__call__
    monkeypatch.setattr(
        tokenizer_class,
        "__call__",
        lambda self, text, **kwargs: tokenized.append(text) or tokenize(self, text, **kwargs),
    )

    pil, path = images[0], images[1]
    assert pipe.ask([pil, path], ["What is this?", "And this?"], max_new_tokens=1)
    assert opened == [Path(path)]
    assert squared[0] is pil and squared[1].size == (64, 96)  # the path's image, decoded by load_images
    assert len(tokenized) == 1 and len(tokenized[0]) == 2  # one call, both prompts


# ---------------------------------------------------------------- streaming and generation options


def test_streaming_yields_the_answer(pipe, images):
    expected = pipe.ask(images[0], "What is this?", max_new_tokens=TOKENS)
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}

    def run():
        result["answer"] = pipe.ask(images[0], "What is this?", streamer=streamer, max_new_tokens=TOKENS)

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert len(pieces) > 1  # it really streamed, piece by piece
    assert "".join(pieces).strip() == expected == result["answer"]
    # A list of one pair streams too and gives a list back.
    assert pipe.ask([images[0]], ["What is this?"], streamer=mock.Mock(), max_new_tokens=TOKENS) == [expected]


def test_greedy_by_default_and_sampling_passes_through(pipe, images, monkeypatch):
    calls = []
    original = CommForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CommForConditionalGeneration, "generate", spy)
    pipe.caption(images[0], max_new_tokens=3)
    assert calls[-1]["do_sample"] is False and calls[-1]["max_new_tokens"] == 3
    torch.manual_seed(0)
    pipe.ask(images[0], "What?", max_new_tokens=3, do_sample=True, temperature=0.7, top_k=5)
    assert calls[-1]["do_sample"] is True and calls[-1]["temperature"] == 0.7 and calls[-1]["top_k"] == 5


# ---------------------------------------------------------------- comm.visualize


def test_draw_boxes_outlines_and_labels_on_a_copy():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    out = draw_boxes(image, [((20, 40, 120, 90), (255, 0, 0), "the cat"), (None, "green", "missing")])
    assert image.getpixel((20, 50)) == (255, 255, 255)  # the input is untouched
    assert out.getpixel((20, 50)) == (255, 0, 0)  # left edge
    assert out.getpixel((120, 50)) == (255, 0, 0)  # right edge
    assert out.getpixel((70, 60)) == (255, 255, 255)  # inside stays
    # The label: a red filled rectangle just above the box, with white text in it.
    assert out.getpixel((20, 38)) == (255, 0, 0)
    band = [out.getpixel((x, y)) for x in range(21, 45) for y in range(33, 39)]
    assert (255, 0, 0) in band and any(green > 100 for _, green, _ in band)  # antialiased white text
    assert out.getpixel((70, 20)) == (255, 255, 255)  # nothing far above
    with pytest.raises(ValueError, match="box 0: expected"):
        draw_boxes(image, [((1, 2, 3), "red", None)])


def test_draw_boxes_width_scales_with_the_image():
    big = draw_boxes(Image.new("RGB", (1200, 900), (255, 255, 255)), [((100, 100, 600, 600), "red", None)])
    assert [big.getpixel((100 + dx, 300)) for dx in range(8)] == [(255, 0, 0)] * 8
    small = draw_boxes(Image.new("RGB", (150, 100), (255, 255, 255)), [((10, 10, 100, 90), "red", None)])
    assert small.getpixel((11, 50)) == (255, 255, 255)


def test_image_grid_layout():
    tiles = [Image.new("RGB", (64, 32), color) for color in ("red", "green", "blue")]
    grid = image_grid(tiles, columns=2, cell_size=100)
    assert grid.size == (200, 200)
    assert grid.getpixel((50, 50)) == (255, 0, 0)
    assert grid.getpixel((150, 50)) == (0, 128, 0)
    assert grid.getpixel((50, 150)) == (0, 0, 255)
    assert grid.getpixel((150, 150)) == (255, 255, 255)  # empty cell
    assert grid.getpixel((50, 10)) == (255, 255, 255)  # letterbox above the 2:1 tile


def test_save_rec_grid_draws_gt_green_and_prediction_red(tmp_path):
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (200, 100), (255, 255, 255)).save(image_path)
    samples = [
        {"image": str(image_path), "gt_box": (20, 20, 100, 80), "pred_box": (110, 30, 180, 90), "caption": "ok"},
        {"image": Image.new("RGB", (100, 200), (255, 255, 255)), "gt_box": None, "pred_box": None, "caption": "x"},
    ]
    out = tmp_path / "sub" / "grid.png"
    grid = save_rec_grid(samples, out, columns=2, cell_size=100)
    saved = Image.open(out).convert("RGB")
    assert saved.size == grid.size and saved.width == 200
    # Cell 0: the 200x100 image is scaled by 0.5 -> gt left edge at x=10, prediction left edge at x=55.
    # The scaled image is 100x50, centred 25 px down: gt spans y 35..65, the prediction y 40..70.
    assert saved.getpixel((10, 60)) == GT_COLOR
    assert saved.getpixel((55, 65)) == PRED_COLOR
    assert saved.getpixel((30, 60)) == (255, 255, 255)
    with pytest.raises(ValueError, match="needs at least one sample"):
        save_rec_grid([], tmp_path / "empty.png")


def test_processor_and_model_take_several_images_in_one_text(pipe):
    # Training and CommPipeline stay at one image per conversation; the processor and the model already read
    # several <image> placeholders in order.
    first, second = noise_image(30, 20, 1), noise_image(20, 30, 2)
    text = pipe.template.prompt("<image> or <image>: which is taller?")

    def logits(images):
        inputs = pipe.processor(text=text, images=images)
        with torch.no_grad():
            return pipe.model(**inputs).logits[0, -1]

    both = logits([first, second])
    assert not torch.allclose(both, logits([second, first]))
    assert not torch.allclose(both, logits([first, first]))
    torch.testing.assert_close(both, logits([first, second]))
