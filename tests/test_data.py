"""Training data: assistant-only labels, bad-input reports, mixtures, grounding boxes and collation."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import single_torch_thread, write_huge_png
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from comm import add_image_tokens, build_processor
from comm.boxes import parse_box
from comm.conversation import VICUNA_V1, ConversationTemplate, rec_prompt
from comm.data import (
    IGNORE_INDEX,
    CommDataCollator,
    DataError,
    DataSpec,
    ImageDecodeError,
    IssueKind,
    IssueLog,
    Sample,
    SampleEncoder,
    build_dataset,
    load_samples,
    mixture_indices,
    parse_data_specs,
)
from comm.demo.tiny import tiny_config
from comm.demo.tokenizer import train_demo_tokenizer

TURNS = (
    ("<image>\nWhat is in the picture?", "A red circle on grey."),
    ("Where is it?", "Near the top left corner [0.120,0.050,0.400,0.375], sized 3 x 4."),
    ("Thanks. Anything else?", "No."),
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread_per_module():
    """Tiny models run fastest on one thread: two OpenMP threads on a busy 2-core machine can be ~50x slower."""
    with single_torch_thread():
        yield


def processor_for(tokenizer, model_max_length: int = 2048):
    """A CommProcessor of the tiny config around ``tokenizer`` (image tokens added)."""
    add_image_tokens(tokenizer)
    return build_processor(tokenizer, tiny_config(vocab_size=len(tokenizer)), model_max_length=model_max_length)


def demo_tokenizer():
    """The demo BPE tokenizer trained on the test texts."""
    return train_demo_tokenizer([answer for _, answer in TURNS] + [question for question, _ in TURNS])


def image_sample(tmp_path: Path, turns=TURNS, size=(48, 32)) -> Sample:
    """A `Sample` with an image file on disk."""
    path = tmp_path / "image.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    return Sample(file="x.json", line=1, index=0, turns=tuple(turns), image=path)


def decoded_targets(tokenizer, encoded) -> list[str]:
    """Decode each contiguous run of unmasked labels."""
    labels = encoded.labels()
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(int(label))
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("kind", ["llama", "demo"])
def test_labels_decode_to_exactly_the_assistant_replies(kind, llama_tokenizer, tmp_path):
    tokenizer = llama_tokenizer if kind == "llama" else demo_tokenizer()
    processor = processor_for(tokenizer)
    encoder = SampleEncoder(processor)
    encoded = encoder.encode(image_sample(tmp_path))

    replies = [text.strip() for text in decoded_targets(tokenizer, encoded)]
    assert replies == [f"{answer}</s>" for _, answer in TURNS]
    labels = encoded.labels()
    ids = encoded.input_ids.astype(np.int64)
    image_ids = set(tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"]))
    assert all(labels[i] == IGNORE_INDEX for i in range(len(ids)) if ids[i] in image_ids)
    assert sum(ids == processor.image_token_id) == processor.num_image_tokens
    # the system prompt and the questions carry no loss
    unmasked = labels != IGNORE_INDEX
    assert 0 < unmasked.sum() < len(labels) / 2
    assert (labels[unmasked] == ids[unmasked]).all()


def test_label_masking_on_text_only_and_rec_samples(llama_tokenizer, tmp_path):
    processor = processor_for(llama_tokenizer)
    encoder = SampleEncoder(processor)
    text_only = Sample("x.json", 1, 0, (("Say yes.", "Yes"),))
    assert [t.strip() for t in decoded_targets(llama_tokenizer, encoder.encode(text_only))] == ["Yes</s>"]
    (tmp_path / "img.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (40, 80)).save(tmp_path / "img.png")
    (tmp_path / "rec.jsonl").write_text(json.dumps({"image": "img.png", "expression": "it", "bbox": [0, 0, 40, 80]}))
    log = IssueLog(strict=True)
    dataset = build_dataset([DataSpec(tmp_path / "rec.jsonl")], processor, log)
    answer = decoded_targets(llama_tokenizer, dataset.encoded(0))
    assert [a.strip() for a in answer] == ["[0.250,0.000,0.750,1.000]</s>"]


def test_the_processor_template_and_box_decimals_make_the_targets(llama_tokenizer, tmp_path):
    add_image_tokens(llama_tokenizer)
    processor = build_processor(
        llama_tokenizer,
        tiny_config(vocab_size=len(llama_tokenizer)),
        template=ConversationTemplate(system=""),
        box_decimals=2,
    )
    Image.new("RGB", (40, 80)).save(tmp_path / "img.png")
    rec = {"image": "img.png", "expression": "it", "bbox": [0, 0, 40, 80]}
    shikra = {
        "image": "img.png",
        "boxes": [[10, 20, 30, 40]],
        "conversations": [message("human", "<image>\nWhat is at <box>?"), message("gpt", "A square.")],
    }
    (tmp_path / "data.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(shikra) + "\n")
    dataset = build_dataset([DataSpec(tmp_path / "data.jsonl")], processor, IssueLog(strict=True))
    assert [a.strip() for a in decoded_targets(llama_tokenizer, dataset.encoded(0))] == ["[0.25,0.00,0.75,1.00]</s>"]
    assert dataset.sample(1).turns[0][0] == "<image>\nWhat is at [0.38,0.25,0.62,0.50]?"
    text = llama_tokenizer.decode(dataset.encoded(0).input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("USER: Can you point out it in the image <im_start>")  # the system prompt is empty


def test_llava_665k_boxes_written_as_text_are_kept_as_written(llama_tokenizer, tmp_path):
    # LLaVA-1.5's grounding samples carry their boxes as 2-decimal text (normalised to its padded square) inside
    # the conversation, with no 'boxes' list: training keeps that text as it is.
    Image.new("RGB", (64, 48)).save(tmp_path / "coco.jpg")
    llava = {
        "id": "000000123",
        "image": "coco.jpg",
        "conversations": [
            message(
                "human",
                "<image>\nPlease provide the bounding box coordinate of the region this sentence "
                "describes: woman in white.",
            ),
            message("gpt", "[0.24, 0.13, 0.61, 0.98]"),
            message("human", "Please provide a short description for this region: [0.57, 0.55, 0.75, 0.79]"),
            message("gpt", "Kitchen counter."),
        ],
    }
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps([llava]))
    processor = processor_for(llama_tokenizer)
    dataset = build_dataset([DataSpec(tmp_path / "llava_v1_5_mix665k.json")], processor, IssueLog(strict=True))
    replies = [a.strip() for a in decoded_targets(llama_tokenizer, dataset.encoded(0))]
    assert replies == ["[0.24, 0.13, 0.61, 0.98]</s>", "Kitchen counter.</s>"]
    assert "region: [0.57, 0.55, 0.75, 0.79]" in dataset.sample(0).turns[1][0]
    assert parse_box(replies[0]) == pytest.approx((0.24, 0.13, 0.61, 0.98))


def test_boxes_are_normalised_against_the_padded_square(tmp_path):
    # 100x50 image: the padded square is 100x100 with the image 25 px down.
    Image.new("RGB", (100, 50), (0, 0, 255)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 80), (0, 0, 255)).save(tmp_path / "tall.png")
    rec = {"image": "wide.png", "expression": "the blue thing", "bbox": [10, 5, 20, 10]}  # x, y, w, h
    shikra = {
        "image": "tall.png",
        "boxes": [[0, 0, 40, 80], [10, 20, 30, 40]],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is at <box>?"},
            {"from": "gpt", "value": "A square at <box>."},
        ],
    }
    (tmp_path / "data.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(shikra) + "\n")
    samples = load_samples(DataSpec(tmp_path / "data.jsonl"), IssueLog(strict=True))
    # x: (10 + 0) / 100 .. (30 + 0) / 100; y: (5 + 25) / 100 .. (15 + 25) / 100
    assert samples[0].turns == ((rec_prompt("the blue thing"), "[0.100,0.300,0.300,0.400]"),)
    # 40x80: the square is 80x80 with the image 20 px right
    assert samples[1].turns == (
        ("<image>\nWhat is at [0.250,0.000,0.750,1.000]?", "A square at [0.375,0.250,0.625,0.500]."),
    )


def test_boxes_follow_a_processor_that_crops_the_centre(tmp_path):
    # 200x100 image without padding: the towers see the centre 100x100 square, from x = 50.
    Image.new("RGB", (200, 100), (0, 0, 255)).save(tmp_path / "wide.png")
    boxes = {"inside": [60, 10, 60, 50], "partly": [30, 10, 60, 50], "outside": [0, 0, 40, 100]}  # x, y, w, h
    records = [{"id": name, "image": "wide.png", "expression": name, "bbox": bbox} for name, bbox in boxes.items()]
    (tmp_path / "rec.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    log = IssueLog()
    samples = load_samples(DataSpec(tmp_path / "rec.jsonl"), log, pad_to_square=False)
    assert [sample.turns[0][1] for sample in samples] == ["[0.100,0.100,0.700,0.600]", "[0.000,0.100,0.400,0.600]"]
    assert [(issue.line, issue.kind) for issue in log.issues] == [(3, IssueKind.BAD_BOX)]
    assert "outside the centre square the towers see" in log.issues[0].message
    padded = load_samples(DataSpec(tmp_path / "rec.jsonl"), IssueLog(strict=True))
    assert [sample.turns[0][1] for sample in padded][0] == "[0.300,0.300,0.600,0.550]"


def message(role: str, value: str) -> dict:
    """One LLaVA conversation message."""
    return {"from": role, "value": value}


def write_bad_inputs(folder: Path) -> dict[str, tuple[str, int, IssueKind]]:
    """A JSON list and a jsonl file with one sample of each bad kind; returns id -> (file, line, kind)."""
    Image.new("RGB", (64, 32), (1, 2, 3)).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not a png at all")

    def conv(sample_id, image="ok.png", question="<image>\nWhat?", answer="That.", **extra):
        turns = [message("human", question), message("gpt", answer)]
        return {"id": sample_id, "image": image, "conversations": turns, **extra}

    samples = [
        conv("good"),
        conv("missing", image="nowhere.png"),
        conv("broken", image="broken.png"),
        {"id": "empty", "image": "ok.png", "conversations": []},
        {"id": "order", "image": "ok.png", "conversations": [message("gpt", "a"), message("human", "b")]},
        conv("blank", answer="  "),
        {"id": "nokeys", "image": "ok.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
        conv("outside", question="<image>\nWhere is <box>?", answer="There.", boxes=[[0, 0, 80, 10]]),
        conv("inverted", question="<image>\nWhere is <box>?", answer="There.", boxes=[[30, 0, 10, 10]]),
        conv("long", answer="word " * 300),
        conv("good2", answer="Yes."),
    ]
    text = json.dumps(samples, indent=2)
    (folder / "conv.json").write_text(text)
    lines = text.splitlines()
    expected = {}
    kinds = {
        "missing": IssueKind.MISSING_IMAGE,
        "broken": IssueKind.UNREADABLE_IMAGE,
        "empty": IssueKind.BAD_CONVERSATION,
        "order": IssueKind.BAD_CONVERSATION,
        "blank": IssueKind.BAD_CONVERSATION,
        "nokeys": IssueKind.BAD_CONVERSATION,
        "outside": IssueKind.BAD_BOX,
        "inverted": IssueKind.BAD_BOX,
        "long": IssueKind.TOO_LONG,
    }
    for sample_id, kind in kinds.items():
        id_line = next(i for i, line in enumerate(lines, start=1) if f'"id": "{sample_id}"' in line)
        expected[sample_id] = (str(folder / "conv.json"), id_line - 1, kind)  # the object's "{" is one line up
    rec_lines = [
        json.dumps({"image": "ok.png", "expression": "the thing", "bbox": [1, 1, 10, 10]}),
        "{this is not json",
        json.dumps({"image": "ok.png", "expression": "the thing", "bbox": [60, 0, 10, 10]}),
        "",
        json.dumps({"image": "ok.png", "bbox": [1, 1, 10, 10]}),
    ]
    (folder / "rec.jsonl").write_text("\n".join(rec_lines) + "\n")
    rec_file = str(folder / "rec.jsonl")
    expected["rec-json"] = (rec_file, 2, IssueKind.BAD_JSON)
    expected["rec-box"] = (rec_file, 3, IssueKind.BAD_BOX)
    expected["rec-keys"] = (rec_file, 5, IssueKind.BAD_CONVERSATION)
    return expected


def test_each_bad_input_is_reported_with_file_and_line_and_counted(llama_tokenizer, tmp_path):
    expected = write_bad_inputs(tmp_path)
    processor = processor_for(llama_tokenizer, model_max_length=200)
    log = IssueLog()
    specs = parse_data_specs([f"{tmp_path / 'conv.json'},{tmp_path / 'rec.jsonl'}"])
    dataset = build_dataset(specs, processor, log, seed=0)

    found = {(issue.file, issue.line, issue.kind) for issue in log.issues}
    assert found == set(expected.values())
    assert len(log.issues) == len(expected)
    assert len(dataset) == 3  # good, good2 and the first REC line
    assert {dataset.sample(i).sample_id for i in range(len(dataset))} == {"good", "good2", None}
    by_id = {issue.sample_id: issue for issue in log.issues if issue.sample_id}
    assert by_id["long"].index == 9 and "model_max_length=200" in by_id["long"].message
    assert "x1 < x0" in by_id["inverted"].message
    summary = log.summary()
    assert summary["skipped_by_kind"] == dict(Counter(kind.value for _, _, kind in expected.values()))
    assert summary["samples_loaded"] == 11 + 4 and summary["samples_used"] == 3
    log.write(tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text())["samples_skipped"] == len(expected)
    text = log.format_summary()
    assert f"{tmp_path / 'conv.json'}:{expected['missing'][1]} (sample 1, id 'missing')" in text


def test_strict_mode_raises_at_the_first_bad_sample(llama_tokenizer, tmp_path):
    expected = write_bad_inputs(tmp_path)
    processor = processor_for(llama_tokenizer)
    with pytest.raises(DataError) as error:
        build_dataset([DataSpec(tmp_path / "conv.json")], processor, IssueLog(strict=True))
    file, line, kind = expected["missing"]
    assert f"{file}:{line}" in str(error.value) and kind.value in str(error.value)
    assert error.value.issue.kind is IssueKind.MISSING_IMAGE


@pytest.mark.parametrize("verify_images", [False, True])
def test_decompression_bombs_are_skipped_and_counted_as_image_too_large(llama_tokenizer, tmp_path, verify_images):
    Image.new("RGB", (32, 24), (9, 9, 9)).save(tmp_path / "ok.png")
    write_huge_png(tmp_path / "bomb.png")  # over twice PIL's limit: PIL itself refuses it
    write_huge_png(tmp_path / "big.png", 10_000, 10_000)  # over the limit, under twice it: PIL only warns
    lines = [
        json.dumps({"image": name, "expression": "the thing", "bbox": [0, 0, 10, 10]})
        for name in ("ok.png", "bomb.png", "big.png", "ok.png")
    ]
    (tmp_path / "rec.jsonl").write_text("\n".join(lines) + "\n")
    log = IssueLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        dataset = build_dataset(
            [DataSpec(tmp_path / "rec.jsonl")], processor_for(llama_tokenizer), log, verify_images=verify_images
        )
    assert len(dataset) == 2 and all("pixel_values_clip" in dataset[i] for i in range(2))
    found = [(issue.file, issue.line, issue.kind) for issue in log.issues]
    file = str(tmp_path / "rec.jsonl")
    assert found == [(file, 2, IssueKind.IMAGE_TOO_LARGE), (file, 3, IssueKind.IMAGE_TOO_LARGE)]
    assert "bomb.png" in log.issues[0].message and "10000x10000 is too large" in log.issues[1].message
    assert log.summary()["skipped_by_kind"] == {"image_too_large": 2}

    with pytest.raises(DataError, match=rf"{file}:2 \(sample 1\): image_too_large: .*bomb.png"):
        build_dataset([DataSpec(tmp_path / "rec.jsonl")], processor_for(llama_tokenizer), IssueLog(strict=True))


@pytest.mark.parametrize("kind", ["llama", "demo"])
def test_special_token_text_in_data_is_skipped_and_counted(kind, llama_tokenizer, tmp_path):
    tokenizer = llama_tokenizer if kind == "llama" else demo_tokenizer()
    processor = processor_for(tokenizer)
    # What would happen: the tokenizer reads the literal text as its end-of-sequence token, mid-reply.
    assert tokenizer.eos_token_id in tokenizer("Type </s> to stop.", add_special_tokens=False)["input_ids"]
    records = [
        {"conversations": [message("human", "How do I stop?"), message("gpt", "Type </s> to stop.")]},
        {"conversations": [message("human", "What is <s> in HTML?"), message("gpt", "Struck-out text.")]},
        {"conversations": [message("human", "How do I stop?"), message("gpt", "Type stop.")]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    log = IssueLog()
    dataset = build_dataset([DataSpec(tmp_path / "d.jsonl")], processor, log)
    file = str(tmp_path / "d.jsonl")
    kind_ = IssueKind.SPECIAL_TOKEN_IN_TEXT
    assert [(issue.file, issue.line, issue.kind) for issue in log.issues] == [(file, 1, kind_), (file, 2, kind_)]
    assert "reply of turn 1 holds the text '</s>'" in log.issues[0].message
    assert "question of turn 1 holds the text '<s>'" in log.issues[1].message
    assert log.summary()["skipped_by_kind"] == {"special_token_in_text": 2} and len(dataset) == 1
    # the template's own end of turn is still the real end-of-sequence token, and the last supervised one
    encoded = dataset.encoded(0)
    ((start, end),) = encoded.target_ranges
    assert int(encoded.input_ids[end - 1]) == tokenizer.eos_token_id
    assert [t.strip() for t in decoded_targets(tokenizer, encoded)] == ["Type stop.</s>"]


def straddling_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token "ASSISTANT: <word>" that crosses the start of the reply."""
    pre = pre_tokenizers.Split(Regex(r"ASSISTANT: \w+|\w+|[^\w\s]|\s+"), behavior="isolated")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece, _ in pre.pre_tokenize_str(text):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def test_tokenization_mismatch_is_detected(tmp_path):
    turns = (("What is it?", "Yes"),)
    tokenizer = straddling_tokenizer(VICUNA_V1.render(turns).text)
    encoder = SampleEncoder(processor_for(tokenizer))
    results = encoder.encode_many([Sample("a.json", 7, 3, turns)])
    assert results[0].kind is IssueKind.LABEL_MISMATCH
    assert "across the boundary" in results[0].message

    # the demo tokenizer spells non-ASCII characters as <unk>: the reply tokens do not decode to the reply
    encoder = SampleEncoder(processor_for(demo_tokenizer()))
    (result,) = encoder.encode_many([Sample("a.json", 1, 0, (("Where?", "Caf\u00e9 Nord."),))])
    assert result.kind is IssueKind.LABEL_MISMATCH and "tokenization mismatch" in result.message

    # through build_dataset the sample is reported with its file and line
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Caf\u00e9."}]})
    )
    log = IssueLog()
    assert len(build_dataset([DataSpec(tmp_path / "d.jsonl")], encoder.processor, log)) == 0
    assert [(i.file, i.line, i.kind) for i in log.issues] == [(str(tmp_path / "d.jsonl"), 1, IssueKind.LABEL_MISMATCH)]


def test_mixture_ratios_are_respected_and_seeded():
    sizes, ratios = [1000, 400, 50], [0.5, 1.0, 2.5]
    chosen = mixture_indices(sizes, ratios, seed=3)
    assert [len(c) for c in chosen] == [500, 400, 125]
    assert len(np.unique(chosen[0])) == 500  # a ratio below 1 never repeats a sample
    assert np.array_equal(np.sort(chosen[1]), np.arange(400))
    repeats = Counter(chosen[2].tolist())
    assert set(repeats.values()) == {2, 3} and sum(v == 3 for v in repeats.values()) == 25
    again = mixture_indices(sizes, ratios, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(chosen, again))
    other = mixture_indices(sizes, ratios, seed=4)
    assert not np.array_equal(chosen[0], other[0])


def test_mixture_dataset_over_files(llama_tokenizer, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")

    def write(name, count):
        records = [{"image": "a.png", "expression": f"{name} {i}", "bbox": [1, 1, 4, 4]} for i in range(count)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    write("big.jsonl", 40)
    write("small.jsonl", 10)
    processor = processor_for(llama_tokenizer)
    specs = parse_data_specs([str(tmp_path / "big.jsonl:0.25"), str(tmp_path / "small.jsonl:2")])
    assert [s.ratio for s in specs] == [0.25, 2.0]

    def files(seed):
        log = IssueLog(strict=True)
        dataset = build_dataset(specs, processor, log, seed=seed)
        return dataset, [Path(dataset.sample(i).file).name for i in range(len(dataset))], log

    dataset, names, log = files(0)
    assert Counter(names) == {"big.jsonl": 10, "small.jsonl": 20}
    assert log.summary()["files"][str(tmp_path / "big.jsonl")]["used"] == 10
    assert len(dataset.lengths) == len(dataset) and all(n > 0 for n in dataset.lengths)
    expressions = [dataset.sample(i).turns[0][0] for i in range(len(dataset))]
    assert expressions == [files(0)[0].sample(i).turns[0][0] for i in range(len(dataset))]
    assert expressions != [files(1)[0].sample(i).turns[0][0] for i in range(len(dataset))]


def test_data_specs():
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_data_specs(["/does/not/exist.json:0.5"])
    with pytest.raises(ValueError, match="ratio must be > 0"):
        DataSpec.parse("a.json:0")
    assert DataSpec.parse("dir/a.json:0.5") == DataSpec(Path("dir/a.json"), 0.5)
    assert DataSpec.parse("a.jsonl") == DataSpec(Path("a.jsonl"), 1.0)
    assert DataSpec.parse("dir/a.json:0.5:3") == DataSpec(Path("dir/a.json"), 0.5, 3.0)
    with pytest.raises(ValueError, match="loss weight must be > 0"):
        DataSpec.parse("a.json:1:0")


def test_a_files_loss_weight_reaches_its_items_and_the_batch(llama_tokenizer, tmp_path):
    processor = processor_for(llama_tokenizer)
    for name, answer in (("a.json", "Yes."), ("b.json", "No.")):
        records = [{"conversations": [message("human", f"Q{i}?"), message("gpt", answer)]} for i in range(2)]
        (tmp_path / name).write_text(json.dumps(records))
    plain = build_dataset([DataSpec(tmp_path / "a.json"), DataSpec(tmp_path / "b.json")], processor, IssueLog())
    assert "loss_weight" not in plain[0]
    specs = [DataSpec(tmp_path / "a.json", 1.0, 3.0), DataSpec(tmp_path / "b.json")]
    dataset = build_dataset(specs, processor, IssueLog())
    weights = [float(dataset[i]["loss_weight"]) for i in range(len(dataset))]
    assert weights == [3.0, 3.0, 1.0, 1.0]
    batch = CommDataCollator(processor.tokenizer)([dataset[i] for i in range(4)])
    assert batch["loss_weight"].tolist() == weights


def test_dataset_items_and_collator(llama_tokenizer, tmp_path):
    processor = processor_for(llama_tokenizer)
    Image.new("RGB", (20, 30)).save(tmp_path / "a.png")
    records = [
        {"image": "a.png", "conversations": [message("human", "<image>\nHi"), message("gpt", "Hello there.")]},
        {"conversations": [message("human", "Say a long sentence please"), message("gpt", "No.")]},
        {"image": "a.png", "conversations": [message("human", "Describe."), message("gpt", "Dark.")]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = build_dataset([DataSpec(tmp_path / "d.json")], processor, IssueLog(strict=True))
    items = [dataset[i] for i in range(3)]
    assert items[0]["pixel_values_clip"].shape == (1, 3, 64, 64) and "pixel_values_clip" not in items[1]
    assert dataset.lengths == [len(item["input_ids"]) for item in items]
    # the missing <image> placeholder is added in front of the first question (LLaVA's convention)
    assert dataset.sample(2).turns[0][0] == "<image>\nDescribe."

    batch = CommDataCollator(processor.tokenizer)(items)
    longest = max(dataset.lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["pixel_values_clip"].shape == (2, 3, 64, 64) and batch["pixel_values_dino"].shape == (2, 3, 64, 64)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])  # right padding
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == processor.pad_token_id).all()


def test_blank_image_leaves_a_text_only_batch_loss_unchanged(tiny_model_dir):
    from comm import CommForConditionalGeneration, CommProcessor

    model = CommForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = CommProcessor.from_pretrained(tiny_model_dir)
    encoder = SampleEncoder(processor)
    items = []
    for turns in ((("Hello?", "Hi there, how are you today?"),), (("Count.", "One two."),)):
        encoded = encoder.encode(Sample("t.jsonl", 1, 0, turns))
        items.append({"input_ids": torch.from_numpy(encoded.input_ids.astype(np.int64)),
                      "labels": torch.from_numpy(encoded.labels())})  # fmt: skip
    plain = CommDataCollator(processor.tokenizer)(items)
    padded = CommDataCollator.for_processor(processor)(items)
    assert "pixel_values_clip" not in plain and padded["pixel_values_clip"].shape[0] == 1
    blank = padded["input_ids"] == processor.image_token_id
    assert blank.sum() == processor.num_image_tokens
    assert blank[1].any() and not blank[0].any()  # the block went to the shorter second row
    assert not padded["attention_mask"][blank].any() and (padded["labels"][blank] == IGNORE_INDEX).all()

    loss_plain = model(**plain).loss
    loss_padded = model(**padded).loss
    torch.testing.assert_close(loss_padded, loss_plain, rtol=1e-5, atol=1e-6)
    loss_padded.backward()
    assert model.projector.weight.grad is not None and not model.projector.weight.grad.any()


def test_cached_images_are_preprocessed_once_and_give_the_same_items(llama_tokenizer, tmp_path, monkeypatch):
    processor = processor_for(llama_tokenizer)
    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 20), (10, 10, 200)).save(tmp_path / "b.png")
    records = [
        {"image": image, "conversations": [message("human", f"<image>\nQ{i}"), message("gpt", "A.")]}
        for i, image in enumerate(["a.png", "b.png", "a.png", "a.png"])
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    plain = build_dataset([DataSpec(tmp_path / "d.json")], processor, IssueLog(strict=True))
    cached = build_dataset([DataSpec(tmp_path / "d.json")], processor, IssueLog(strict=True), cache_images=True)
    calls = []
    preprocess = processor.preprocess_images
    monkeypatch.setattr(processor, "preprocess_images", lambda images: calls.append(images) or preprocess(images))
    for _epoch in range(2):
        for i in range(len(records)):
            expected, got = plain[i], cached[i]
            assert expected.keys() == got.keys()
            for key in expected:
                assert torch.equal(expected[key], got[key])
    assert len(calls) == 2 * len(records) + 2  # the plain dataset every time, the cached one once per image


def test_an_image_that_fails_to_decode_in_training_is_a_data_error_of_one_line(llama_tokenizer, tmp_path, capsys):
    """Data code raises its own error (no CLI error inside ``__getitem__``); the training command's wrapper prints it
    as one line, also when a DataLoader worker re-raises it."""
    from torch._utils import ExceptionWrapper

    from comm.errors import EXIT_USER_ERROR, run_command

    processor = processor_for(llama_tokenizer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    records = [{"image": "a.png", "conversations": [message("human", "<image>\nHi"), message("gpt", "Hello.")]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    dataset = build_dataset([DataSpec(tmp_path / "d.json")], processor, IssueLog(strict=True))
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(whole[: len(whole) // 2])  # the header stays, the pixels are cut short
    with pytest.raises(ImageDecodeError, match=r"d\.json:1 .*unreadable_image: decoding .*a\.png failed") as raised:
        dataset[0]
    assert isinstance(raised.value, ValueError) and "--verify_images" in str(raised.value)
    try:
        dataset[0]
    except ImageDecodeError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")  # what a worker sends back
    assert run_command(wrapped.reraise) == EXIT_USER_ERROR
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == 1 and printed[0].startswith("error: ") and "d.json:1 " in printed[0]
    assert "unreadable_image: decoding" in printed[0] and "Traceback" not in printed[0]
