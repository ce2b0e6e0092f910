"""``comm data refer``, ``comm data check`` and ``comm inspect`` on generated data, and the README's lines of them."""

from __future__ import annotations

import json
import math
import pickle
import re
import shlex
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import safetensors
import torch
from conftest import single_torch_thread
from PIL import Image

from comm import CommForConditionalGeneration, CommProcessor
from comm.boxes import format_box, normalize_box, xywh_to_xyxy
from comm.cli import main
from comm.data import DataSpec, IssueLog, build_dataset
from comm.demo.tiny import tiny_config
from comm.inspection import LAYER_WEIGHTS_PLOT, layer_weights, load_for_inspection, save_layer_weights_plot

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES = {  # file name: (width, height)
    "COCO_train2014_000000000001.jpg": (80, 60),
    "COCO_train2014_000000000002.jpg": (50, 90),
    "COCO_train2014_000000000003.jpg": (64, 64),
}
REFS = [  # train: 4 expressions; val: 1
    {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "left dog"}, {"sent": "dog"}]},
    {"ref_id": 2, "ann_id": 11, "image_id": 2, "split": "train", "sentences": [{"sent": "tall thing"}]},
    {"ref_id": 3, "ann_id": 12, "image_id": 3, "split": "train", "sentences": [{"sent": "the left half"}]},
    {"ref_id": 4, "ann_id": 12, "image_id": 3, "split": "val", "sentences": [{"sent": "not in train"}]},
]
ANNOTATIONS = [
    {"id": 10, "image_id": 1, "bbox": [10, 5, 30, 20]},
    {"id": 11, "image_id": 2, "bbox": [5, 40, 20, 30.5]},
    {"id": 12, "image_id": 3, "bbox": [0, 0, 32, 64]},
]
# The hub names in the README's command lines, and the tiny stand-ins the tests give them.
HUB_NAMES = {
    "openai/clip-vit-large-patch14-336": "clip",
    "facebook/dinov2-large": "dino",
    "lmsys/vicuna-7b-v1.5": "llm",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_torch_thread():
        yield


def message(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_refer(root: Path) -> None:
    """REFER's layout for refcoco: a protocol-2 pickle of refs and a COCO instances.json."""
    folder = root / "refcoco"
    folder.mkdir(parents=True)
    images = [
        {"id": i, "file_name": name, "width": size[0], "height": size[1]}
        for i, (name, size) in enumerate(COCO_IMAGES.items(), start=1)
    ]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": ANNOTATIONS}))
    with (folder / "refs(unc).p").open("wb") as handle:
        pickle.dump(REFS, handle, protocol=2)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, tiny_components, _llama_tokenizer_cached) -> Path:
    """The README's layout (data/, checkpoints/) with small generated data, and tiny stand-ins for the hub names."""
    root = tmp_path_factory.mktemp("project")
    data = root / "data"
    write_refer(data / "refer")
    for seed, (name, size) in enumerate(COCO_IMAGES.items()):
        write_image(data / "coco" / "train2014" / name, size, seed)

    pretrain = []
    for i in range(3):
        write_image(data / "stage1" / "00000" / f"00000000{i}.jpg", (40 + 8 * i, 32), i)
        pretrain.append(
            {
                "id": f"00000000{i}",
                "image": f"00000/00000000{i}.jpg",
                "conversations": [
                    message("human", "Render a clear and concise summary of the photo.\n<image>"),
                    message("gpt", f"noise number {i}"),
                ],
            }
        )
    (data / "stage1" / "llava_pretrain.json").write_text(json.dumps(pretrain, indent=1))

    write_image(data / "stage2" / "000000033471.jpg", (64, 48), 7)
    instruct = [
        {
            "id": "000000033471",
            "image": "000000033471.jpg",
            "conversations": [
                message("human", "<image>\nWhat is in the photo?"),
                message("gpt", "Coloured noise."),
                message("human", "Is it a cat?"),
                message("gpt", "No."),
            ],
        },
        {"id": "gone", "image": "000000099999.jpg", "conversations": [message("human", "Hi?"), message("gpt", "Hi.")]},
        {"id": "order", "image": "000000033471.jpg", "conversations": [message("gpt", "Hi."), message("human", "?")]},
        {"id": "text", "conversations": [message("human", "Say yes."), message("gpt", "Yes.")]},
    ]
    (data / "stage2" / "llava_instruct_150k.json").write_text(json.dumps(instruct, indent=1))
    dialogues = [
        {
            "id": "rd1",
            "image": "000000033471.jpg",
            "boxes": [[4, 4, 30, 40], [0, 0, 64, 48]],
            "conversations": [message("human", "<image>\nWhat is at <box>?"), message("gpt", "Noise at <box>.")],
        },
        {
            "id": "rd2",
            "image": "000000033471.jpg",
            "boxes": [[4, 4, 300, 40]],
            "conversations": [message("human", "<image>\nWhat is at <box>?"), message("gpt", "Nothing.")],
        },
    ]
    (data / "stage2" / "shikra_rd.json").write_text(json.dumps(dialogues, indent=1))

    shutil.copytree(tiny_model_dir, root / "checkpoints" / "comm-stage1" / "final")
    trained = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        trained.clip_merger.layer_scale.copy_(torch.tensor([0.1, 0.2, 0.3, 0.45]))
        trained.dino_merger.layer_scale.copy_(torch.tensor([0.9, 0.05]))
    stage2 = root / "checkpoints" / "comm-stage2" / "final"
    trained.save_pretrained(stage2)
    CommProcessor.from_pretrained(tiny_model_dir).save_pretrained(stage2)

    hub = root / "hub"
    for name, component in HUB_NAMES.items():
        shutil.copytree(tiny_components[component], hub / name)
    _llama_tokenizer_cached.save_pretrained(hub / "lmsys/vicuna-7b-v1.5")
    return root


def readme_commands(prefix: str) -> list[list[str]]:
    """The README's command lines (in its bash blocks) that start with ``prefix``, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(prefix) and "ROOT" not in line and "[" not in line]


def run_readme_line(argv: list[str], project: Path, extra: list[str] = ()) -> int:
    """Run one README line of ``comm`` in ``project`` with the hub names pointing at the tiny stand-ins."""
    assert argv[0] == "comm"
    return main([str(project / "hub" / arg) if arg in HUB_NAMES else arg for arg in argv[1:]] + list(extra))


def tiny_model_options() -> list[str]:
    """comm-train's CommConfig options that make the tiny towers what the tiny model folder has."""
    options = []
    for name, value in tiny_config().tower_reading_fields().items():
        options += [f"--{name}", *map(str, value)] if isinstance(value, list) else [f"--{name}", str(value)]
    return options


def test_readme_data_and_inspect_commands_run(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    refer, checks = readme_commands("comm data refer"), readme_commands("comm data check")
    inspects = readme_commands("comm inspect")
    assert len(refer) == 1 and len(checks) == 2 and len(inspects) == 1

    assert run_readme_line(refer[0], project) == 0
    assert "wrote 4 expressions of refcoco train" in capsys.readouterr().out
    stage1, stage2 = checks
    # stage 1 builds the processor from the towers' and LLM's configs: the tiny ones need their layer options
    assert run_readme_line(stage1, project, tiny_model_options()) == 0
    out = capsys.readouterr().out
    assert re.search(r"data/stage1/refcoco_rec.jsonl +1 +4 +4 +0 +4", out), out
    assert "steps per epoch at a global batch of 64: 1 (7 samples)" in out
    assert run_readme_line(stage2, project) == 0
    out = capsys.readouterr().out
    assert "bad records: 3:" in out and "missing image files: 1" in out

    out_dir = project / inspects[0][inspects[0].index("--out") + 1]
    assert run_readme_line(inspects[0], project) == 0
    out = capsys.readouterr().out
    assert "layer   4    0.4500  (+0.2000)" in out and (out_dir / LAYER_WEIGHTS_PLOT).is_file()


def test_refer_lines_are_what_training_reads(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    out = tmp_path / "refcoco_train.jsonl"
    assert main(["data", "refer", "data/refer", "--dataset", "refcoco", "--split", "train", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["expression"] for r in records] == ["left dog", "dog", "tall thing", "the left half"]
    assert records[2] == {
        "id": "refcoco_2_0",
        "image": "COCO_train2014_000000000002.jpg",
        "expression": "tall thing",
        "bbox": [5, 40, 20, 30.5],
        "width": 50,
        "height": 90,
    }
    # the training reader takes the file as it is: boxes normalised on the padded square of each image
    processor = CommProcessor.from_pretrained(project / "checkpoints" / "comm-stage1" / "final")
    log = IssueLog(strict=True)
    dataset = build_dataset([DataSpec(out)], processor, log, image_folder=project / "data" / "coco" / "train2014")
    assert len(dataset) == 4
    for position, record in enumerate(records):
        box = normalize_box(xywh_to_xyxy(record["bbox"]), record["width"], record["height"])
        assert dataset.sample(position).turns[0][1] == format_box(box)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "refcoco", "--split", "testB2", "--out", "x.jsonl"], "unknown split 'testB2' for refcoco"),
        (["--dataset", "refcocog", "--split", "val", "--out", "x.jsonl"], "refcocog/refs(umd).p"),
        (["--dataset", "refcoco", "--split", "testA", "--out", "x.jsonl"], "no refs in split 'testA'"),
        (["--dataset", "refcoco", "--split", "train", "--out", "x.jsonl", "--image-dir", "nowhere"], "--image-dir"),
    ],
)
def test_refer_errors_are_one_line(project, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "refer", str(project / "data" / "refer"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "x.jsonl").exists()


def test_check_reports_the_mixture_as_training_reads_it(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    data = "data/stage2/llava_instruct_150k.json:2,data/stage2/shikra_rd.json"
    argv = ["data", "check", "--model_name_or_path", "checkpoints/comm-stage1/final", "--data", data]
    assert main([*argv, "--global_batch_size", "3", "--model_max_length", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    instruct, rd = "data/stage2/llava_instruct_150k.json", "data/stage2/shikra_rd.json"
    assert report["files"][instruct] == {"loaded": 4, "kept": 2, "used": 4, "skipped": 2}  # ratio 2: twice
    assert report["files"][rd] == {"loaded": 2, "kept": 1, "used": 1, "skipped": 1}
    assert (report["records"], report["valid"], report["bad"], report["samples_per_epoch"]) == (6, 3, 3, 5)
    assert report["bad_by_kind"]["missing_image"]["count"] == 1 and report["missing_image_files"] == 1
    assert report["bad_by_kind"]["missing_image"]["examples"][0].startswith(f"{instruct}:")
    assert "000000099999.jpg" in report["bad_by_kind"]["missing_image"]["examples"][0]
    assert report["bad_by_kind"]["bad_conversation"]["examples"][0].startswith(f"{instruct}:")
    assert report["bad_by_kind"]["bad_box"]["examples"][0].startswith(f"{rd}:")
    assert report["steps_per_epoch"] == math.ceil(5 / 3)

    # the same numbers straight from the training's dataset
    processor = CommProcessor.from_pretrained("checkpoints/comm-stage1/final", model_max_length=200)
    specs = [DataSpec(Path(instruct), 2.0), DataSpec(Path(rd))]
    dataset = build_dataset(specs, processor, IssueLog(), seed=42, model_max_length=200)
    lengths = np.asarray(dataset.lengths)
    labelled = sum(e - s for i in range(len(dataset)) for s, e in dataset.encoded(i).target_ranges)
    tokens = report["tokens"]
    assert (tokens["min"], tokens["max"], tokens["p50"]) == (
        lengths.min(),
        lengths.max(),
        int(np.percentile(lengths, 50)),
    )
    assert tokens["loss_share"] == round(labelled / lengths.sum(), 4) and 0 < tokens["loss_share"] < 0.5
    assert tokens["model_max_length"] == 200 and tokens["max"] <= 200

    assert main([*argv, "--model_max_length", "20", "--examples", "1"]) == 2  # every sample is too long
    captured = capsys.readouterr()
    assert "too_long: 3" in captured.out  # each of the 3 valid records once (a ratio draws only what trains)
    assert captured.err.strip() == "error: no sample would train: every record is bad (see the report above)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "data/nowhere.json", "--model_name_or_path", "checkpoints/comm-stage1/final"], "no such file"),
        (["--data", "data/stage1/llava_pretrain.json", "--model_name_or_path", "nowhere"], "nowhere"),
        (["--data", "data/stage1/llava_pretrain.json", "--clip", "x"], "missing --dino, --llm"),
        (
            ["--data", "data/stage1/llava_pretrain.json", "--model_name_or_path", "checkpoints/comm-stage1/final",
             "--global_batch_size", "0"],
            "--global_batch_size must be >= 1",
        ),
        (["--model_name_or_path", "checkpoints/comm-stage1/final"], "--data"),
    ],
)  # fmt: skip
def test_check_errors_are_one_line(project, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(project)
    try:
        status = main(["data", "check", *argv])
    except SystemExit as usage_error:  # argparse's own errors exit from the parser, as for every command
        status = usage_error.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "error: " in err and message in err


def test_inspect_reads_the_merger_weights_only(project, tmp_path, capsys):
    folder = project / "checkpoints" / "comm-stage2" / "final"
    model = CommForConditionalGeneration.from_pretrained(folder)
    expected = {"clip": [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.45)], "dino": [(3, 0.9), (4, 0.05)]}
    for weights in (layer_weights(model), layer_weights(load_for_inspection(folder))):
        assert {t: [(layer, pytest.approx(w)) for layer, w in pairs] for t, pairs in weights.items()} == expected
    assert next(load_for_inspection(folder).language_model.parameters()).is_meta  # the LLM is not loaded

    assert main(["inspect", str(folder), "--json", "--out", str(tmp_path / "pictures")]) == 0
    summary = json.loads(capsys.readouterr().out)
    parts = {row["part"]: row for row in summary["parts"]}
    assert parts["clip_tower"]["trainable"] == 0 and parts["dino_tower"]["trainable"] == 0
    assert parts["clip_merger"]["trainable"] == parts["clip_merger"]["parameters"] > 0
    assert parts["language_model"]["parameters"] == sum(p.numel() for p in model.language_model.parameters())
    assert summary["image_tokens"] == 16 and summary["towers"]["dino"]["merged_layers"] == [3, 4]
    assert summary["towers"]["clip"]["initial_layer_weight"] == pytest.approx(0.25)
    with Image.open(tmp_path / "pictures" / LAYER_WEIGHTS_PLOT) as picture:
        assert picture.size[0] > picture.size[1] > 100

    # a sharded checkpoint: only the shards holding the mergers are opened
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    CommProcessor.from_pretrained(folder).save_pretrained(sharded)
    shards = list(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 3
    with mock.patch("safetensors.safe_open", wraps=safetensors.safe_open) as opened:
        assert layer_weights(load_for_inspection(sharded)) == layer_weights(load_for_inspection(folder))
    assert 2 <= opened.call_count < len(shards) + 1  # the one unsharded file + the mergers' shards
    assert save_layer_weights_plot(model, tmp_path / "direct.png").is_file()

    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "model folder not found" in capsys.readouterr().err
