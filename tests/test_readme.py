"""The README says what the code does: script defaults, file names, flags, extras, ignored outputs, its examples."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from comm.cli import main
from comm.demo.config import DemoConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def script_default(script: str, variable: str) -> str:
    """The default of ``VARIABLE=${VARIABLE:-default}`` in a training script."""
    match = re.search(rf"^{variable}=\$\{{{variable}:-(.*)\}}$", (REPO / "train" / script).read_text(), re.MULTILINE)
    assert match, f"train/{script} sets no default for {variable}"
    return match.group(1)


def code_blocks() -> list[tuple[str, str]]:
    """The README's fenced code blocks as ``(language, text)``."""
    blocks, language, lines = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def readme_block(language: str, holding: str) -> str:
    """The README's one ``language`` code block that holds ``holding``."""
    blocks = [text for kind, text in code_blocks() if kind == language and holding in text]
    assert len(blocks) == 1, f"expected one {language!r} block holding {holding!r}, found {len(blocks)}"
    return blocks[0]


@pytest.mark.parametrize(
    ("script", "source"),
    [("stage1.sh", "--clip openai/clip-vit-large-patch14-336"), ("stage2.sh", "--model_name_or_path")],
)
def test_the_training_example_runs_what_the_script_runs(script, source):
    data, output = script_default(script, "DATA"), script_default(script, "OUTPUT_DIR")
    example = readme_block("bash", "what the scripts run").replace("\\\n", " ")
    command = next(line for line in example.splitlines() if f"--stage {script[5]}" in line)
    assert source in command and f"--data {data} " in command and f"--output_dir {output} " in command
    if script == "stage2.sh":
        assert f"--model_name_or_path {script_default(script, 'STAGE1')} " in command
    for file in re.sub(r":[0-9.]+", "", data).split(","):  # every default file is in the data layout
        assert re.search(rf"^{re.escape(file)} ", readme_block("", "data/stage1/llava_pretrain.json"), re.MULTILINE)
    assert f"--data {data}" in readme_block("bash", "comm data refer data/refer")  # and checked as it is trained


def test_comm_data_refer_writes_the_stage1_default_file():
    refer = next(
        line for line in readme_block("bash", "comm data refer data/refer").splitlines() if "comm data refer" in line
    )
    out = refer.split("--out ")[1].split()[0]
    assert out in script_default("stage1.sh", "DATA").split(",")


def test_every_demo_flag_is_documented():
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        main(["demo", "--help"])
    flags = set(re.findall(r"(--[a-z][a-z-]+)", help_text.getvalue())) - {"--help"}
    documented = README.split("Flags: ")[1].split("\n\n")[0]
    assert flags and all(f"`{flag}" in documented or f"/{flag}" in documented for flag in flags), flags


def test_the_demo_output_folder_is_ignored():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert f"/{DemoConfig().out}/" in ignored
    assert f"checkpoint: {DemoConfig().out}/stage2/final" in README  # the report shown is the default run's


def test_the_documented_extras_are_the_package_extras():
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]\n")[1].split("\n[")[0]
    extras = set(re.findall(r"^([a-z-]+) = ", section, flags=re.MULTILINE)) - {"test"}  # (no tomllib on 3.10)
    documented = README.split("Extras: ")[1].split("The core imports none")[0]
    assert set(re.findall(r"`([a-z-]+)`", documented)) == extras


def test_the_transformers_example_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), (200, 30, 30)).save("photo.jpg")
    code = readme_block("python", "AutoProcessor").replace("runs/stage2/final", str(tiny_model_dir))
    code = code.replace("max_new_tokens=32", "max_new_tokens=3")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    from comm.conversation import VICUNA_V1, with_image

    assert namespace["prompt"] == VICUNA_V1.prompt(with_image("What is in the photo?"))
    printed = capsys.readouterr().out
    assert printed.startswith("['") and printed.rstrip().endswith("']")
