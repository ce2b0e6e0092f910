"""The demo world on disk: its images and annotation files written from a WorldConfig, and the texts they hold."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comm.conversation import IMAGE_PLACEHOLDER
from comm.demo.annotations import CAPTION_QUESTIONS, attribute_questions, caption, expression_pool, pope_questions
from comm.demo.scenes import BACKGROUND, COLOURS, Scene, WorldConfig, render_scene, sample_scene
from comm.io import read_jsonl, write_atomically, write_jsonl

__all__ = ["WorldConfig", "WorldFiles", "all_texts", "generate_world"]

Records = list[dict[str, Any]]


@dataclass(frozen=True)
class WorldFiles:
    """Paths of a generated world (train files in LLaVA/JSONL form, test files in benchmark form)."""

    root: Path
    images_dir: Path = field(init=False)
    train_captions: Path = field(init=False)
    train_rec: Path = field(init=False)
    train_pope: Path = field(init=False)
    train_attributes: Path = field(init=False)
    test_captions: Path = field(init=False)
    test_rec: Path = field(init=False)
    test_pope: Path = field(init=False)
    scenes: Path = field(init=False)
    summary: Path = field(init=False)

    def __post_init__(self) -> None:
        root = Path(self.root)
        object.__setattr__(self, "root", root)
        names = {
            "images_dir": "images",
            "train_captions": "train_captions.json",
            "train_rec": "train_rec.jsonl",
            "train_pope": "train_pope.json",
            "train_attributes": "train_attributes.json",
            "test_captions": "test_captions.json",
            "test_rec": "test_rec.jsonl",
            "test_pope": "test_pope.json",
            "scenes": "scenes.jsonl",
            "summary": "world.json",
        }
        for attribute, name in names.items():
            object.__setattr__(self, attribute, root / name)

    def all_files(self) -> list[Path]:
        """Every annotation file (not the images)."""
        return [
            self.train_captions,
            self.train_rec,
            self.train_pope,
            self.train_attributes,
            self.test_captions,
            self.test_rec,
            self.test_pope,
            self.scenes,
            self.summary,
        ]

    def read_scenes(self) -> list[Scene]:
        """The scenes `generate_world` wrote to ``scenes.jsonl`` (read strictly: a bad line names the file and line)."""
        return [Scene.from_json(record) for record in read_jsonl(self.scenes)]


def generate_world(out_dir: Path | str, config: WorldConfig | None = None) -> WorldFiles:
    """Write the images and annotation files of a world under ``out_dir``, deterministically from the seed.

    Train and test images come from separate random streams, and an image whose pixels repeat an earlier
    one is redrawn, so no test image appears among the train images. Stale ``train_*.png`` / ``test_*.png``
    files left in ``out_dir/images`` by a bigger earlier world are removed.
    """
    config = config if config is not None else WorldConfig()
    config.validate()
    files = WorldFiles(Path(out_dir))
    files.images_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_images(files.images_dir, config)
    scenes = _draw_scenes(files.images_dir, config)
    train_captions, train_rec, train_pope = _train_records(scenes["train"], config)
    train_attributes = _attribute_records(scenes["train"], config)
    test_captions, test_rec, test_pope = _test_records(scenes["test"], config, files.images_dir.name)

    _write_json(files.train_captions, train_captions)
    write_jsonl(files.train_rec, train_rec)
    _write_json(files.train_pope, train_pope)
    _write_json(files.train_attributes, train_attributes)
    _write_json(files.test_captions, {"images": test_captions, "dataset": "comm-demo-world"})
    write_jsonl(files.test_rec, test_rec)
    write_jsonl(files.test_pope, test_pope)
    write_jsonl(files.scenes, (scene.to_json() for split in ("train", "test") for scene in scenes[split]))
    _write_json(
        files.summary,
        {
            "config": config.to_json(),
            "counts": {
                "train_images": len(scenes["train"]),
                "test_images": len(scenes["test"]),
                "train_captions": len(train_captions),
                "train_rec": len(train_rec),
                "train_pope": len(train_pope),
                "train_attributes": len(train_attributes),
                "test_captions": len(test_captions),
                "test_rec": len(test_rec),
                "test_pope": len(test_pope),
                "objects": sum(len(scene.objects) for split in scenes.values() for scene in split),
            },
            "colours": {name: list(COLOURS[name]) for name in config.colours},
            "background": list(BACKGROUND),
        },
    )
    return files


def _remove_stale_images(images_dir: Path, config: WorldConfig) -> None:
    """Delete the ``train_*.png`` / ``test_*.png`` files in ``images_dir`` that ``config`` does not draw."""
    expected = {f"train_{i:05d}.png" for i in range(config.num_train_images)}
    expected |= {f"test_{i:05d}.png" for i in range(config.num_test_images)}
    for stale in sorted(images_dir.glob("*.png")):
        if stale.name.startswith(("train_", "test_")) and stale.name not in expected:
            stale.unlink()


def _draw_scenes(images_dir: Path, config: WorldConfig) -> dict[str, list[Scene]]:
    """Sample, draw and save every image, redrawing any whose pixels repeat an earlier one; the scenes by split."""
    seen: set[bytes] = set()
    scenes: dict[str, list[Scene]] = {"train": [], "test": []}
    for split, count in (("train", config.num_train_images), ("test", config.num_test_images)):
        scene_rng = random.Random(f"comm-demo-world:{config.seed}:{split}:scenes")
        for index in range(count):
            name = f"{split}_{index:05d}.png"
            while True:
                scene = sample_scene(scene_rng, config, f"{images_dir.name}/{name}", split)
                image = render_scene(scene)
                digest = hashlib.sha1(image.tobytes()).digest()
                if digest not in seen:
                    break
            seen.add(digest)
            image.save(images_dir / name, format="PNG")
            scenes[split].append(scene)
    return scenes


def _train_records(scenes: list[Scene], config: WorldConfig) -> tuple[Records, Records, Records]:
    """The train caption conversations, REC rows and POPE conversations (LLaVA / JSONL form) of ``scenes``."""
    text_rng = random.Random(f"comm-demo-world:{config.seed}:train:texts")
    captions: Records = []
    rec: Records = []
    pope: Records = []
    for scene in scenes:
        stem = Path(scene.image).stem
        captions.append(
            _conversation(f"{stem}_caption", scene.image, text_rng.choice(CAPTION_QUESTIONS), caption(scene))
        )
        for obj_index, obj in enumerate(scene.objects):
            pool = expression_pool(scene, obj_index, text_rng, config.relational_expressions)
            extra = min(config.train_expressions_per_object - 1, len(pool) - 1)
            for expression in [pool[0], *text_rng.sample(pool[1:], extra)]:
                rec.append(
                    {
                        "id": f"{stem}_rec_{len(rec):06d}",
                        "image": scene.image,
                        "expression": expression,
                        "bbox": obj.xywh(),
                    }
                )
        for question, answer in pope_questions(scene, text_rng, config):
            pope.append(
                _conversation(
                    f"{stem}_pope_{len(pope):06d}",
                    scene.image,
                    f"{IMAGE_PLACEHOLDER}\n{question}",
                    "Yes" if answer else "No",
                )
            )
    return captions, rec, pope


def _attribute_records(scenes: list[Scene], config: WorldConfig) -> Records:
    """The train attribute-question conversations (LLaVA form), from their own random stream: adding them
    leaves every other file of a world as it was."""
    rng = random.Random(f"comm-demo-world:{config.seed}:train:attributes")
    records: Records = []
    for scene in scenes:
        stem = Path(scene.image).stem
        for question, answer in attribute_questions(scene, rng, config.attribute_questions_per_image):
            question_id = f"{stem}_attribute_{len(records):06d}"
            records.append(_conversation(question_id, scene.image, f"{IMAGE_PLACEHOLDER}\n{question}", answer))
    return records


def _test_records(scenes: list[Scene], config: WorldConfig, filepath: str) -> tuple[Records, Records, Records]:
    """The test Karpathy-style caption entries, REC rows and POPE questions (benchmark form) of ``scenes``."""
    text_rng = random.Random(f"comm-demo-world:{config.seed}:test:texts")
    captions: Records = []
    rec: Records = []
    pope: Records = []
    for image_id, scene in enumerate(scenes):
        stem = Path(scene.image).stem
        sentence = caption(scene)
        captions.append(
            {
                "filepath": filepath,
                "filename": Path(scene.image).name,
                "imgid": image_id,
                "split": "test",
                "sentids": [image_id],
                "sentences": [
                    {
                        "raw": sentence,
                        "tokens": sentence.lower().replace(",", "").rstrip(".").split(),
                        "imgid": image_id,
                        "sentid": image_id,
                    }
                ],
            }
        )
        for obj_index, obj in enumerate(scene.objects):
            pool = expression_pool(scene, obj_index, text_rng, config.relational_expressions)
            rec.append(
                {
                    "id": f"{stem}_rec_{len(rec):06d}",
                    "image": scene.image,
                    "expression": text_rng.choice(pool),
                    "bbox": obj.xywh(),
                }
            )
        for question, answer in pope_questions(scene, text_rng, config):
            pope.append(
                {"question_id": len(pope), "image": scene.image, "text": question, "label": "yes" if answer else "no"}
            )
    return captions, rec, pope


def _conversation(conv_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    """One single-turn LLaVA conversation record."""
    return {
        "id": conv_id,
        "image": image,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON indented by one space with a final newline, atomically.

    Not the shared ``write_json``: that one indents by two, which would change the bytes of every world file.
    The JSON lines do go through the shared ``write_jsonl``: every world string is ASCII, so its
    ``ensure_ascii=False`` writes the same bytes.
    """
    write_atomically(path, json.dumps(data, indent=1) + "\n")


def all_texts(files: WorldFiles) -> list[str]:
    """Every text of the train files (questions, answers, expressions), in file order, for tokenizer training."""
    texts: list[str] = []
    for path in (files.train_captions, files.train_pope, files.train_attributes):
        for record in json.loads(path.read_text(encoding="utf-8")):
            texts.extend(turn["value"] for turn in record["conversations"])
    with open(files.train_rec, encoding="utf-8") as handle:
        texts.extend(json.loads(line)["expression"] for line in handle if line.strip())
    return texts
