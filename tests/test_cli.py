"""Tests of the ``comm`` command line (`comm.cli.main`, run in-process on the tiny model) and ``python -m comm``."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path
from unittest import mock

import huggingface_hub.constants
import numpy as np
import pytest
from conftest import write_huge_png
from PIL import Image

from comm.cli import main
from comm.demo.config import DemoConfig
from comm.demo.run import set_hub_access
from comm.model.modeling import CommForConditionalGeneration
from comm.training.arguments import parse_arguments

TOKENS = "6"


@pytest.fixture(autouse=True)
def one_thread_no_env(monkeypatch, one_torch_thread):
    """One CPU thread (a shared, busy machine makes OpenMP crawl) and no COMM_MODEL from the environment."""
    monkeypatch.delenv("COMM_MODEL", raising=False)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("cli_images")
    paths = []
    for seed, (width, height) in enumerate([(200, 100), (80, 120)]):
        rng = np.random.default_rng(seed)
        path = folder / f"photo_{seed}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_caption_json_matches_the_pipeline(pipe, tiny_model_dir, image_files, capsys):
    status = main(["caption", *image_files, "--model", str(tiny_model_dir), "--json", "--max-new-tokens", TOKENS])
    assert status == 0
    records = json.loads(capsys.readouterr().out)
    assert [record["image"] for record in records] == image_files
    assert [record["caption"] for record in records] == pipe.caption(image_files, max_new_tokens=int(TOKENS))


def test_caption_plain_text_and_model_from_environment(pipe, tiny_model_dir, image_files, capsys, monkeypatch):
    monkeypatch.setenv("COMM_MODEL", str(tiny_model_dir))
    assert main(["caption", image_files[0], "--max-new-tokens", TOKENS]) == 0
    assert capsys.readouterr().out == pipe.caption(image_files[0], max_new_tokens=int(TOKENS))[0] + "\n"
    assert main(["caption", *image_files, "--batch-size", "1", "--max-new-tokens", TOKENS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == image_files


def test_ground_json_and_draw(tiny_model_dir, image_files, tmp_path, capsys, monkeypatch):
    seen = []

    def fake_generate_answers(model, processor, images, questions, batch_size=8, **kwargs):
        seen.extend(questions)
        return ["[0.100,0.250,0.600,0.750]"]

    monkeypatch.setattr("comm.pipeline.generate_answers", fake_generate_answers)
    out = tmp_path / "drawn" / "box.png"
    argv = ["ground", image_files[0], "the red ball", "--model", str(tiny_model_dir), "--json", "--draw", str(out)]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    # 200x100 image: square side 200, 50 px top padding -> (0.1*200, 0.25*200-50, 0.6*200, 0.75*200-50).
    assert record["box"] == [20.0, 0.0, 120.0, 100.0]
    assert record["image_size"] == [200, 100] and record["expression"] == "the red ball"
    assert "the red ball" in seen[0]
    drawn = Image.open(out).convert("RGB")
    original = Image.open(image_files[0]).convert("RGB")
    assert drawn.size == original.size
    assert drawn.getpixel((20, 60)) == (255, 0, 0)  # left edge of the box (1 px wide at this size)
    assert drawn.getpixel((60, 60)) == original.getpixel((60, 60))  # inside untouched

    assert main(["ground", image_files[0], "the red ball", "--model", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.strip() == "[20.0, 0.0, 120.0, 100.0]"


def test_ground_without_box_exits_1(tiny_model_dir, image_files, capsys, monkeypatch):
    monkeypatch.setattr("comm.pipeline.generate_answers", lambda *args, **kwargs: ["there is no such thing"])
    assert main(["ground", image_files[1], "a unicorn", "--model", str(tiny_model_dir), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["box"] is None
    assert "no box in the answer" in captured.err


def test_ask_and_stream_print_the_same_answer(pipe, tiny_model_dir, image_files, capsys):
    expected = pipe.ask(image_files[1], "What is this?", max_new_tokens=int(TOKENS))
    base = ["ask", image_files[1], "What is this?", "--model", str(tiny_model_dir), "--max-new-tokens", TOKENS]
    assert main(base) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*base, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["caption", "{missing}"], "error: image 0: no such image file"),
        (["caption", "{image}", "{text_png}"], "error: image 1: .*notes.png is not a readable image"),
        (["caption", "{image}", "{bomb}"], "error: image 1: .*bomb.png: image too large"),
        (["ground", "{bomb}", "x"], "error: image 0: .*bomb.png: image too large"),
        (["ground", "{image}", "x", "--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1"),
        (["caption", "{image}", "--batch-size", "0"], "error: --batch-size must be >= 1"),
        (["ask", "{image}", "x", "--dtype", "float8"], "error: unknown dtype 'float8'"),
    ],
)
def test_bad_input_prints_error_and_exits_2(tiny_model_dir, image_files, tmp_path, capsys, argv, message):
    text_png = tmp_path / "notes.png"
    text_png.write_text("not an image")
    bomb = write_huge_png(tmp_path / "bomb.png")
    values = {"missing": str(tmp_path / "missing.png"), "image": image_files[0], "text_png": str(text_png)}
    values["bomb"] = str(bomb)
    argv = [arg.format(**values) for arg in argv] + ["--model", str(tiny_model_dir)]
    with (
        mock.patch.object(CommForConditionalGeneration, "from_pretrained") as load_model,
        mock.patch.object(CommForConditionalGeneration, "generate") as generate,
    ):
        assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err
    assert re.match(message, captured.err)
    load_model.assert_not_called()
    generate.assert_not_called()


def test_model_missing_or_incomplete(tiny_model_dir, image_files, tmp_path, capsys):
    assert main(["caption", image_files[0]]) == 2
    assert capsys.readouterr().err == "error: no model given: pass --model PATH or set COMM_MODEL\n"

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, copy_function=os.symlink)
    (folder / "processor_config.json").unlink()
    with mock.patch.object(CommForConditionalGeneration, "from_pretrained") as load_model:
        assert main(["ask", image_files[0], "hi", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder} is not a complete COMM model folder: missing processor_config.json")
    load_model.assert_not_called()


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as error:
        main(["ground", "only-an-image.png"])
    assert error.value.code == 2
    with pytest.raises(SystemExit) as error:
        main([])
    assert error.value.code == 2


def test_demo_forwards_every_argument(monkeypatch):
    calls = []
    monkeypatch.setattr("comm.demo.run.main", lambda config: calls.append(config) or 3)
    assert main(["demo", "--out", "runs/demo", "--steps", "100", "--seed", "0"]) == 3
    assert main(["demo"]) == 3
    assert calls == [DemoConfig(out=Path("runs/demo"), steps=100, seed=0), DemoConfig()]


def test_demo_options_are_the_config_fields_with_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0
    flags = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}
    assert flags == {
        "--out", "--seed", "--steps", "--batch-size", "--learning-rate", "--train-images", "--test-images",
        "--threads", "--random-towers", "--clip", "--dino", "--llm",
    }  # fmt: skip
    calls = []
    with mock.patch("comm.demo.run.main", lambda config: calls.append(config) or 0):
        main(["demo", "--random-towers", "--llm", "my-llm", "--learning-rate", "0.01", "--train-images", "20"])
    assert calls == [DemoConfig(random_towers=True, llm="my-llm", learning_rate=0.01, train_images=20)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "1"], "error: --steps must be at least 2 (one per stage)"),
        (["--test-images", "1"], "error: --train-images must be >= 10 and --test-images >= 2"),
        (["--random-towers", "--clip", "c"], "error: --random-towers and --clip/--dino exclude each other"),
    ],
)
def test_demo_refuses_impossible_settings_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--out", str(tmp_path / "demo"), *argv]) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not (tmp_path / "demo").exists()


def test_the_demo_is_offline_unless_a_component_checkpoint_is_given(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # restored after the test
    for config, offline in [(DemoConfig(), "1"), (DemoConfig(llm="HuggingFaceTB/SmolLM2-135M"), "0")]:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        set_hub_access(config)
        assert os.environ["HF_HUB_OFFLINE"] == offline
        assert huggingface_hub.constants.is_offline_mode() == (offline == "1")  # in this process too
    set_hub_access(DemoConfig())
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # a value already set wins


def test_train_takes_comm_train_options(tmp_path, monkeypatch, capsys):
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--model_name_or_path", "m", "--data", "a.json", "b.jsonl:0.5", "--output_dir", str(tmp_path / "o x"),
            "--report_to", "none", "--lora_r", "4", "--bf16", "False", "--warmup_ratio", "0.1"]  # fmt: skip
    calls = []
    monkeypatch.setattr("comm.training.train.run_training", lambda *args: calls.append(args) or 143)
    assert main(["train", *argv]) == 143
    ((arguments, continue_with),) = calls
    assert arguments == parse_arguments(argv)
    assert continue_with == shlex.join(["comm", "train", *argv, "--resume_from_checkpoint", "auto"])

    def help_options(run) -> str:
        with pytest.raises(SystemExit) as done:
            run()
        assert done.value.code == 0
        return capsys.readouterr().out.split("\noptions:\n")[1]

    monkeypatch.setattr(sys, "argv", ["comm-train"])
    assert help_options(lambda: main(["train", "--help"])) == help_options(lambda: parse_arguments(["--help"]))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model_name_or_path", "m", "--output_dir", "o"], "comm train: error: the following arguments"),
        (["train", "--data", "a.json", "--output_dir", "o", "--lora_r", "x"], "comm train: error: argument --lora_r"),
        (["data", "check", "--data", "a.json", "--examples", "x"], "comm data check: error: argument --examples"),
        (["demo", "--steps", "many"], "comm demo: error: argument --steps: invalid int value: 'many'"),
    ],
)
def test_usage_errors_of_the_option_commands_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(message), err


@pytest.mark.parametrize("command", [["train"], ["data", "check"], ["data", "refer"], ["demo"], ["inspect"], ["web"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: comm {' '.join(command)} ")


def test_python_dash_m_comm_runs_the_cli(monkeypatch, capsys):
    # What ``python -m comm caption --help`` runs, in-process (a subprocess would re-import torch: ~10 s).
    monkeypatch.setattr(sys, "argv", ["comm", "caption", "--help"])
    with pytest.raises(SystemExit) as error:
        runpy.run_module("comm", run_name="__main__", alter_sys=True)
    assert error.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: comm caption") and "--batch-size" in out and "COMM model folder" in out
