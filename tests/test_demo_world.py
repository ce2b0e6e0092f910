"""Tests of the demo's generated grounding world and its in-process tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from comm.conversation import CAPTION_PROMPT, VICUNA_V1, rec_prompt
from comm.demo.scenes import COLOURS, Scene, WorldConfig, WorldObject
from comm.demo.tokenizer import train_demo_tokenizer
from comm.demo.world import WorldFiles, all_texts, generate_world
from comm.io import read_jsonl

SMALL = WorldConfig(seed=7, num_train_images=60, num_test_images=24, image_size=64)
VICUNA_EXAMPLE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nIs there a red circle in the image? "
    "ASSISTANT: Yes</s>"
)
REC_EXAMPLE = "Can you point out the red circle in the image <image> and provide the coordinates of its location?"
SIZE_WORDS = {"small", "large"}
SHAPE_WORDS = {"circle", "square", "triangle", "diamond"}
RELATION_WORDS = ("left of", "right of", "above", "below")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldFiles:
    return generate_world(tmp_path_factory.mktemp("world"), SMALL)


@pytest.fixture(scope="module")
def scenes(world: WorldFiles) -> dict[str, Scene]:
    return {scene.image: scene for scene in world.read_scenes()}


@pytest.fixture(scope="module")
def tokenizer(world: WorldFiles):
    return train_demo_tokenizer(all_texts(world), extra_texts=[VICUNA_EXAMPLE, REC_EXAMPLE])


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _matches(description: str, objects) -> list[int]:
    """Objects whose size/colour/shape agree with every word of ``description``."""
    words = description.split()
    assert words and all(w in SIZE_WORDS | SHAPE_WORDS | set(COLOURS) for w in words), description
    return [i for i, obj in enumerate(objects) if all(w in (obj.size, obj.colour, obj.shape) for w in words)]


def _is_related(obj: WorldObject, landmark: WorldObject, relation: str, strict: bool) -> bool:
    """``obj`` lies ``relation`` ``landmark``: box-wise without overlap (strict) or by centres (loose)."""
    axis = 0 if relation in ("left of", "right of") else 1
    before = relation in ("left of", "above")
    if strict:
        return obj.box[axis + 2] <= landmark.box[axis] if before else obj.box[axis] >= landmark.box[axis + 2]
    return obj.centre[axis] < landmark.centre[axis] if before else obj.centre[axis] > landmark.centre[axis]


def _resolve(expression: str, objects) -> list[int]:
    """Objects ``expression`` can mean, re-derived independently of the generator."""
    assert expression.startswith("the "), expression
    body = expression[len("the ") :]
    for relation in RELATION_WORDS:
        marker = f" {relation} the "
        if marker in body:
            target, landmark_text = body.split(marker)
            landmarks = _matches(landmark_text, objects)
            assert len(landmarks) == 1, expression
            landmark = objects[landmarks[0]]
            candidates = _matches(target, objects)
            assert len(candidates) >= 2, f"relational expression without need: {expression}"
            by_box = [i for i in candidates if _is_related(objects[i], landmark, relation, strict=True)]
            by_centre = [i for i in candidates if _is_related(objects[i], landmark, relation, strict=False)]
            assert by_box == by_centre, expression
            return by_box
    return _matches(body, objects)


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    config = WorldConfig(seed=11, num_train_images=12, num_test_images=5)
    first = _file_digests(generate_world(tmp_path / "a", config).root)
    second = _file_digests(generate_world(tmp_path / "b", config).root)
    assert first == second
    assert sum(name.endswith(".png") for name in first) == 17
    other = _file_digests(
        generate_world(tmp_path / "c", WorldConfig(seed=12, num_train_images=12, num_test_images=5)).root
    )
    assert other.keys() == first.keys()
    assert other["train_captions.json"] != first["train_captions.json"]
    assert sum(other[name] != first[name] for name in first if name.endswith(".png")) >= 15


def test_regenerating_smaller_world_removes_stale_images(tmp_path: Path) -> None:
    generate_world(tmp_path, WorldConfig(seed=1, num_train_images=6, num_test_images=3))
    files = generate_world(tmp_path, WorldConfig(seed=1, num_train_images=4, num_test_images=2))
    names = sorted(p.name for p in files.images_dir.iterdir())
    assert names == [f"test_{i:05d}.png" for i in range(2)] + [f"train_{i:05d}.png" for i in range(4)]


def test_bad_config_raises(tmp_path: Path) -> None:
    bad = [
        WorldConfig(num_train_images=0),
        WorldConfig(image_size=8),
        WorldConfig(min_objects=3, max_objects=2),
        WorldConfig(shapes=("hexagon",)),
        WorldConfig(colours=("red",), shapes=("circle",)),
        WorldConfig(small_fraction=(0.2, 0.32)),
        WorldConfig(hard_negative_fraction=1.5),
    ]
    for config in bad:
        with pytest.raises(ValueError):
            generate_world(tmp_path, config)
    with pytest.raises(ValueError, match="unknown WorldConfig keys"):
        WorldConfig.from_json({"seed": 1, "colour_count": 3})
    assert WorldConfig.from_json(SMALL.to_json()) == SMALL


def test_summary_and_train_test_disjoint(world: WorldFiles, scenes) -> None:
    summary = json.loads(world.summary.read_text())
    assert summary["counts"]["train_images"] == SMALL.num_train_images
    assert summary["counts"]["test_images"] == SMALL.num_test_images
    assert WorldConfig.from_json(summary["config"]) == SMALL
    train_images = {r["image"] for r in json.loads(world.train_captions.read_text())}
    train_images |= {r["image"] for r in json.loads(world.train_pope.read_text())}
    train_images |= {r["image"] for r in read_jsonl(world.train_rec)}
    test_images = {r["image"] for r in read_jsonl(world.test_rec)} | {r["image"] for r in read_jsonl(world.test_pope)}
    assert all(name.startswith("images/train_") for name in train_images)
    assert all(name.startswith("images/test_") for name in test_images)
    assert len(train_images) == SMALL.num_train_images and len(test_images) == SMALL.num_test_images
    pixels = {name: hashlib.sha1(np.asarray(Image.open(world.root / name)).tobytes()).hexdigest() for name in scenes}
    train_pixels = {pixels[name] for name in train_images}
    assert not train_pixels & {pixels[name] for name in test_images}


def test_scenes_match_drawn_pixels(world: WorldFiles, scenes) -> None:
    counts = set()
    for name, scene in scenes.items():
        image = np.asarray(Image.open(world.root / name).convert("RGB"))
        assert image.shape == (SMALL.image_size, SMALL.image_size, 3)
        counts.add(len(scene.objects))
        assert [o.centre[0] for o in scene.objects] == sorted(o.centre[0] for o in scene.objects)
        triples = [(o.size, o.colour, o.shape) for o in scene.objects]
        assert len(set(triples)) == len(triples)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= SMALL.image_size and 0 <= y0 < y1 <= SMALL.image_size
            colour = np.array(COLOURS[obj.colour], dtype=np.uint8)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert (image[cy, cx] == colour).all(), (name, obj)
            # The tight box: pixels of the object's colour around the box lie exactly inside it.
            ex0, ey0 = max(x0 - 1, 0), max(y0 - 1, 0)
            ex1, ey1 = min(x1 + 1, SMALL.image_size), min(y1 + 1, SMALL.image_size)
            mask = (image[ey0:ey1, ex0:ex1] == colour).all(axis=-1)
            ys, xs = np.nonzero(mask)
            assert (xs.min() + ex0, ys.min() + ey0, xs.max() + ex0 + 1, ys.max() + ey0 + 1) == obj.box, (name, obj)
            size_range = SMALL.small_fraction if obj.size == "small" else SMALL.large_fraction
            assert size_range[0] * SMALL.image_size - 1 <= obj.side <= size_range[1] * SMALL.image_size + 1
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1], (
                    name
                )
    assert counts == {1, 2, 3}


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_expression_resolves_to_its_object(world: WorldFiles, scenes, split: str) -> None:
    records = read_jsonl(world.train_rec if split == "train" else world.test_rec)
    referred = set()
    for record in records:
        assert set(record) == {"id", "image", "expression", "bbox"}
        scene = scenes[record["image"]]
        x, y, w, h = record["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= scene.image_size and y + h <= scene.image_size
        resolved = _resolve(record["expression"], scene.objects)
        assert len(resolved) == 1, record
        assert scene.objects[resolved[0]].xywh() == record["bbox"], record
        referred.add((record["image"], resolved[0]))
    # Every object of every scene of the split is referred to at least once.
    expected = {(name, i) for name, scene in scenes.items() if scene.split == split for i in range(len(scene.objects))}
    assert referred == expected
    assert len({r["id"] for r in records}) == len(records)


def test_expressions_cover_all_kinds(world: WorldFiles) -> None:
    expressions = [r["expression"] for r in read_jsonl(world.train_rec)]
    assert any(len(e.split()) == 2 for e in expressions)  # "the circle"
    assert any(len(e.split()) == 3 and e.split()[1] in COLOURS for e in expressions)  # "the red circle"
    assert any(e.split()[1] in SIZE_WORDS for e in expressions)  # "the small ..."
    assert any(f" {rel} the " in e for e in expressions for rel in RELATION_WORDS)


def test_captions_list_objects_left_to_right(world: WorldFiles, scenes) -> None:
    train = json.loads(world.train_captions.read_text())
    assert len(train) == SMALL.num_train_images
    prompts = set()
    for record in train:
        assert set(record) == {"id", "image", "conversations"}
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].count("<image>") == 1
        prompts.add(human["value"])
        phrases = [f"a {o.size} {o.colour} {o.shape}" for o in scenes[record["image"]].objects]
        expected = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        assert gpt["value"] == expected[0].upper() + expected[1:] + "."
    assert len(prompts) >= 3 and CAPTION_PROMPT in prompts
    karpathy = json.loads(world.test_captions.read_text())
    assert len(karpathy["images"]) == SMALL.num_test_images
    for image_id, entry in enumerate(karpathy["images"]):
        assert entry["split"] == "test" and entry["imgid"] == image_id and entry["filepath"] == "images"
        scene = scenes[f"images/{entry['filename']}"]
        assert scene.split == "test"
        (sentence,) = entry["sentences"]
        assert sentence["raw"].startswith("A ") and sentence["raw"].endswith(".")
        assert sentence["raw"].count(" a ") + 1 == len(scene.objects)
        assert (world.root / entry["filepath"] / entry["filename"]).is_file()


def test_pope_is_balanced_and_true(world: WorldFiles, scenes) -> None:
    train = json.loads(world.train_pope.read_text())
    test = read_jsonl(world.test_pope)
    rows = [
        (r["image"], r["conversations"][0]["value"].removeprefix("<image>\n"), r["conversations"][1]["value"])
        for r in train
    ]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in train)
    assert {answer for _, _, answer in rows} == {"Yes", "No"}
    for r in test:
        assert set(r) == {"question_id", "image", "text", "label"} and r["label"] in {"yes", "no"}
    assert [r["question_id"] for r in test] == list(range(len(test)))
    rows += [(r["image"], r["text"], r["label"].capitalize()) for r in test]
    hard = 0
    for answers in ([a for _, _, a in rows[: len(train)]], [a for _, _, a in rows[len(train) :]]):
        assert abs(answers.count("Yes") / len(answers) - 0.5) <= 0.02
    for image, question, answer in rows:
        words = question.split()
        assert words[:3] == ["Is", "there", "a"] and question.endswith(" in the image?"), question
        colour, shape = words[3], words[4]
        objects = scenes[image].objects
        present = any(o.colour == colour and o.shape == shape for o in objects)
        assert present == (answer == "Yes"), (image, question, answer)
        if not present and any(o.colour == colour or o.shape == shape for o in objects):
            hard += 1
    assert hard >= len(rows) // 8


def test_attribute_questions_are_true_and_name_a_unique_object(world: WorldFiles, scenes) -> None:
    rows = json.loads(world.train_attributes.read_text())
    assert rows and len({row["id"] for row in rows}) == len(rows)
    per_image: dict[str, int] = {}
    for row in rows:
        question, answer = (turn["value"] for turn in row["conversations"])
        assert question.startswith("<image>\n"), question
        objects = scenes[row["image"]].objects
        words = question.removeprefix("<image>\n").rstrip("?").split()
        if words[:3] == ["What", "colour", "is"]:  # What colour is the SHAPE
            named = [o for o in objects if o.shape == words[-1]]
            assert len(named) == 1 and answer == named[0].colour.capitalize(), (row, objects)
        else:  # What shape is the COLOUR object
            assert words[:3] == ["What", "shape", "is"], question
            named = [o for o in objects if o.colour == words[-2]]
            assert len(named) == 1 and answer == named[0].shape.capitalize(), (row, objects)
        per_image[row["image"]] = per_image.get(row["image"], 0) + 1
    assert max(per_image.values()) <= SMALL.attribute_questions_per_image
    assert len(per_image) >= 0.9 * SMALL.num_train_images  # only scenes of identical objects have none


def test_all_texts_covers_train_files(world: WorldFiles) -> None:
    texts = all_texts(world)
    n_conversations = SMALL.num_train_images + len(json.loads(world.train_pope.read_text()))
    n_conversations += len(json.loads(world.train_attributes.read_text()))
    assert len(texts) == 2 * n_conversations + len(read_jsonl(world.train_rec))
    assert "Yes" in texts and "No" in texts and any(t.startswith("<image>\n") for t in texts)


def test_tokenizer_round_trips(world: WorldFiles, tokenizer) -> None:
    assert 100 < len(tokenizer) <= 600
    texts = [
        *all_texts(world),
        VICUNA_EXAMPLE,
        REC_EXAMPLE,
        "zebra",
        "  two  spaces \n\n and\ttabs ",
        "the 3 diamonds [0.000,1.000,0.5,0.25]",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text, text
    assert tokenizer.convert_ids_to_tokens(tokenizer("<image>\nIs")["input_ids"])[1] == "<image>"


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert tokenizer.padding_side == "right"
    ids = tokenizer(VICUNA_EXAMPLE)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id  # the "</s>" in the text, nothing appended
    assert ids[1:] == tokenizer(VICUNA_EXAMPLE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == VICUNA_EXAMPLE.removesuffix("</s>")
    batch = tokenizer(["a red circle", "a"], padding=True)
    assert batch["input_ids"][1][-1] == tokenizer.pad_token_id and batch["attention_mask"][1][-1] == 0


def test_tokenizer_splits_digits_and_punctuation(tokenizer) -> None:
    tokens = tokenizer.tokenize("[0.123,0.456,0.789,0.900]")
    assert tokens == [
        "[",
        "0",
        ".",
        "1",
        "2",
        "3",
        ",",
        "0",
        ".",
        "4",
        "5",
        "6",
        ",",
        "0",
        ".",
        "7",
        "8",
        "9",
        ",",
        "0",
        ".",
        "9",
        "0",
        "0",
        "]",
    ]
    assert tokenizer.tokenize("What? Yes: 12.") == ["What", "?", "▁Yes", ":", "▁", "1", "2", "."]
    assert tokenizer.tokenize("zebra") and "<unk>" not in tokenizer.tokenize("zebra")


def test_tokenizer_offsets_align_with_conversation_spans(tokenizer) -> None:
    rendered = VICUNA_V1.render(
        [
            ("<image>\nIs there a red circle in the image?", "Yes"),
            (rec_prompt("the small red circle"), "[0.123,0.456,0.789,0.900]"),
            ("Describe the image briefly.", "A large red circle and a small blue square."),
        ]
    )
    encoded = tokenizer(rendered.text, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "<s>" and offsets[0] == (0, 0)
    for start, end in rendered.target_spans:
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and start <= a and b <= end]
        for a, b in offsets:
            assert b <= start or a >= end or (start <= a and b <= end), ((a, b), (start, end))
        assert "".join(rendered.text[offsets[i][0] : offsets[i][1]] for i in inside) == rendered.text[start:end]
        assert tokens[inside[-1]] == "</s>"
    assert tokens[tokens.index("▁ASSISTANT") + 2] == "▁Yes"


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in (VICUNA_EXAMPLE, REC_EXAMPLE, "zebra [0.5,0.25,1.0,0.75]"):
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 3)
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_training_is_deterministic_and_checks_arguments(world: WorldFiles, tokenizer) -> None:
    again = train_demo_tokenizer(all_texts(world), extra_texts=[VICUNA_EXAMPLE, REC_EXAMPLE])
    assert again.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError):
        train_demo_tokenizer(["a"], vocab_size=10)
    with pytest.raises(TypeError):
        train_demo_tokenizer(["a"], extra_texts=[3])  # type: ignore[list-item]
