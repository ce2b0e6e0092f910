"""No deprecated transformers, peft or torch API is called from comm: a forward, generation (both paths), a
checkpointed LoRA training step and its export run with such warnings turned into errors when comm made the call."""

from __future__ import annotations

import contextlib
import json
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

import comm
from comm import CommForConditionalGeneration, CommProcessor
from comm.conversation import VICUNA_V1
from comm.generation import generate_answers
from comm.training.arguments import parse_arguments
from comm.training.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMM_PACKAGE = str(Path(comm.__file__).parent) + "/"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class DeprecatedCallFromComm(Exception):
    """A deprecation warning raised while a call made from the comm package ran."""


def comm_frames() -> list[str]:
    """The comm package's frames in the current stack, innermost last."""
    return [
        f"{frame.filename}:{frame.lineno}"
        for frame in traceback.extract_stack()
        if frame.filename.startswith(COMM_PACKAGE)
    ]


@contextlib.contextmanager
def deprecations_from_comm_are_errors() -> Iterator[list[str]]:
    """Raise `DeprecatedCallFromComm` for any deprecation warning emitted while comm code is on the stack (also
    listed in the yielded list, in case a library swallows the exception); other warnings pass."""
    caught: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        frames = comm_frames()
        if issubclass(category, DEPRECATIONS) and frames:
            caught.append(f"{category.__name__}: {message} ({filename}:{lineno}, called from {frames[-1]})")
            raise DeprecatedCallFromComm(caught[-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield caught
    assert not caught, caught


def test_the_check_catches_a_deprecated_call_made_through_comm(tmp_path):
    """The check itself: transformers' deprecated ``--gradient_checkpointing`` alias, parsed by comm's parser."""
    argv = ["--model_name_or_path", "m", "--data", "d.json", "--output_dir", str(tmp_path), "--report_to", "none"]
    with pytest.raises(DeprecatedCallFromComm, match="gradient_checkpointing"):
        with deprecations_from_comm_are_errors():
            parse_arguments([*argv, "--gradient_checkpointing", "True"])
    with deprecations_from_comm_are_errors():
        assert parse_arguments([*argv, "--activation_checkpointing", "True"])[2].activation_checkpointing


def test_forward_and_generation_call_nothing_deprecated(tiny_model_dir):
    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = CommProcessor.from_pretrained(tiny_model_dir)
    images = [Image.new("RGB", (60, 40), (200, 30, 30)), Image.new("RGB", (30, 50), (30, 30, 200))]
    questions = ["<image>\nWhat colour is it?", "Describe the picture. <image>"]
    inputs = processor(text=[VICUNA_V1.prompt(q) for q in questions], images=images, padding_side="left")
    with deprecations_from_comm_are_errors():
        with torch.no_grad():
            model(**inputs)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        generate_answers(model, processor, images, questions, max_new_tokens=3)
        # the CUDA default path (a static cache), here on the CPU
        generate_answers(model, processor, images, questions, max_new_tokens=3, cache_implementation="static")


def test_checkpointed_lora_training_and_export_call_nothing_deprecated(tiny_model_dir, tmp_path):
    Image.new("RGB", (48, 48), (20, 200, 20)).save(tmp_path / "green.png")
    conversation = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Green."}]
    (tmp_path / "data.json").write_text(json.dumps([{"image": "green.png", "conversations": conversation}] * 2))
    with deprecations_from_comm_are_errors():
        result = train(
            *parse_arguments(["--model_name_or_path", str(tiny_model_dir), "--data", str(tmp_path / "data.json"),
             "--lora_r", "4", "--activation_checkpointing", "True", "--max_steps", "1",
             "--per_device_train_batch_size", "2", "--model_max_length", "256", "--output_dir", str(tmp_path / "out"),
             "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"])
        )  # fmt: skip
    assert [entry["step"] for entry in result.log_history if "loss" in entry] == [1]
    assert (result.export_dir / "model.safetensors").is_file()
