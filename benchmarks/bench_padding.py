"""Benchmark: fraction of padding tokens per training batch, random batches vs the Trainer's ``group_by_length``.

A synthetic LLaVA-1.5-like mixture (REC boxes, short VQA answers, short captions, long multi-turn conversations,
text-only chats; 196 image tokens per image sample, Vicuna v1.1 template, the LLaMA tokenizer fixture) is written as
data files and loaded by the training path itself (`comm.data.build_dataset`, whose ``lengths`` feed the sampler).
The batches are the ones `CommTrainer` would draw: its ``_get_train_sampler`` (a `RandomSampler`, or
`LengthGroupedSampler` under ``--group_by_length``) cut into consecutive per-device batches, as the DataLoader does.
Padding fraction = padded slots / (rows x longest row), summed over the batches of an epoch (the share of the
LLM's token compute spent on padding, right padding as `CommDataCollator` does).

Prints ONE JSON line: ``{"benchmark": "padding", "value": <group_by_length padding fraction>, "unit": "fraction",
"random": ..., "group_by_length": ..., "sorted_lower_bound": ...}``.

    python -m benchmarks.bench_padding            # 8000 samples, 3 epochs
    python -m benchmarks.bench_padding --quick    # 2000 samples, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler

from benchmarks.common import finish, llama_tokenizer, stdout_to_stderr
from comm import CommConfig, CommForConditionalGeneration, add_image_tokens, build_processor
from comm.data import DataSpec, IssueLog, build_dataset
from comm.demo.tiny import tiny_config

# Shares of the LLaVA-1.5 665k instruction mixture, grouped by answer shape: RefCOCO/VG (REC, box answers), VQAv2/GQA/
# OKVQA/OCRVQA/A-OKVQA (short answers), TextCaps (short captions), LLaVA-Instruct-158k (long conversations),
# ShareGPT (text-only chats).
MIXTURE = {"rec": 0.20, "vqa": 0.35, "caption": 0.15, "conversation": 0.24, "text_only": 0.06}
WORDS = (
    "the a an of in on at to with from by for and or but is are was were be been has have had this that these those "
    "man woman person child dog cat car bus truck bicycle table chair cup bottle plate window door tree sky road "
    "street building wall floor water grass field ball shirt hat bag phone screen sign light picture image photo "
    "left right top bottom middle front behind near next large small red blue green white black yellow brown "
    "wooden metal open closed sitting standing walking holding wearing looking playing eating riding parked "
    "several two three many some other each because while when where which what how why there here also very "
    "scene appears shows seems likely probably possibly suggests indicates area background foreground people group"
).split()
IMAGE_SIZE = (640, 480)


def words(rng: np.random.Generator, count: int) -> str:
    """``count`` random English words as a sentence."""
    return " ".join(rng.choice(WORDS, size=max(1, count))).capitalize() + "."


def lognormal_words(rng: np.random.Generator, median_words: float, low: int, high: int) -> int:
    """A word count drawn around ``median_words`` with a long tail, clipped to ``[low, high]``."""
    return int(np.clip(rng.lognormal(np.log(median_words), 0.6), low, high))


def message(role: str, text: str) -> dict[str, str]:
    """One LLaVA conversation message."""
    return {"from": role, "value": text}


def make_record(kind: str, rng: np.random.Generator, image: str) -> dict[str, Any]:
    """One synthetic training record of ``kind`` (a key of `MIXTURE`)."""
    if kind == "rec":
        width, height = IMAGE_SIZE
        x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        w, h = int(rng.integers(10, width - x)), int(rng.integers(10, height - y))
        return {"image": image, "expression": words(rng, int(rng.integers(2, 9)))[:-1].lower(), "bbox": [x, y, w, h]}
    if kind == "vqa":
        question = words(rng, int(rng.integers(5, 13)))[:-1] + "? Answer the question using a single word or phrase."
        answer = words(rng, int(rng.integers(1, 4)))
        return {"image": image, "conversations": [message("human", "<image>\n" + question), message("gpt", answer)]}
    if kind == "caption":
        return {
            "image": image,
            "conversations": [
                message("human", "<image>\nProvide a one-sentence caption for the provided image."),
                message("gpt", words(rng, int(rng.integers(8, 21)))),
            ],
        }
    if kind == "conversation":
        turns = []
        for turn in range(int(rng.integers(1, 7))):
            question = words(rng, int(rng.integers(6, 21)))[:-1] + "?"
            turns += [
                message("human", ("<image>\n" if turn == 0 else "") + question),
                message("gpt", words(rng, lognormal_words(rng, 55, 8, 260))),
            ]
        return {"image": image, "conversations": turns}
    if kind == "text_only":
        turns = []
        for _ in range(int(rng.integers(1, 5))):
            turns += [
                message("human", words(rng, lognormal_words(rng, 25, 5, 120))),
                message("gpt", words(rng, lognormal_words(rng, 120, 10, 320))),
            ]
        return {"conversations": turns}
    raise ValueError(f"unknown sample kind {kind!r}")


def write_mixture(folder: Path, total: int, seed: int) -> tuple[list[DataSpec], dict[str, int]]:
    """One jsonl file per kind in ``folder`` (with one shared image); the specs and the counts written."""
    rng = np.random.default_rng(seed)
    Image.new("RGB", IMAGE_SIZE, (120, 130, 140)).save(folder / "image.jpg")
    specs, counts = [], {}
    for kind, share in MIXTURE.items():
        count = max(1, int(round(share * total)))
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(make_record(kind, rng, "image.jpg")) + "\n" for _ in range(count)))
        specs.append(DataSpec(path))
        counts[kind] = count
    return specs, counts


def padding_stats(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> dict[str, float]:
    """Padding fraction over all batches (padded slots / all slots) and the mean of the per-batch fractions."""
    padded = slots = 0
    per_batch = []
    for batch in batches:
        rows = [lengths[i] for i in batch]
        width = max(rows) * len(rows)
        padded += width - sum(rows)
        slots += width
        per_batch.append((width - sum(rows)) / width)
    return {"fraction": padded / slots, "mean_per_batch": float(np.mean(per_batch)), "batches": len(per_batch)}


def trainer_batches(trainer: Any, dataset: Any, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of per-device batches as `CommTrainer`'s sampler orders them (seeded like a run's epoch)."""
    torch.manual_seed(seed)
    sampler = trainer._get_train_sampler(dataset)
    return [list(batch) for batch in BatchSampler(sampler, batch_size, drop_last=trainer.args.dataloader_drop_last)]


def make_trainer(output_dir: str, batch_size: int, group_by_length: bool, accumulation: int) -> Any:
    """A `CommTrainer` (tiny random model: the sampler does not depend on it) with the given batching settings."""
    from comm.training.arguments import CommTrainingArguments
    from comm.training.trainer import CommTrainer

    args = CommTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        group_by_length=group_by_length,
        report_to="none",
        disable_tqdm=True,
    )
    return CommTrainer(model=CommForConditionalGeneration(tiny_config(vocab_size=32000)), args=args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2000 samples, 2 epochs")
    parser.add_argument("--samples", type=int, default=None, help="samples in the mixture (default 8000, 2000 quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of batches averaged (default 3, 2 quick)")
    parser.add_argument("--batch-size", type=int, default=16, help="per-device batch size (LLaVA-1.5: 16)")
    parser.add_argument("--gradient-accumulation", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--model-max-length", type=int, default=2048, help="longer samples are dropped (default 2048)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    samples = args.samples or (2000 if args.quick else 8000)
    epochs = args.epochs or (2 if args.quick else 3)
    if samples < args.batch_size or epochs < 1 or args.batch_size < 1 or args.gradient_accumulation < 1:
        parser.error("need --samples >= --batch-size >= 1, --epochs >= 1, --gradient-accumulation >= 1")
    torch.set_num_threads(1)

    config = CommConfig()  # real 14x14 grid: 196 image tokens per image
    tokenizer = llama_tokenizer()
    config.update(add_image_tokens(tokenizer))
    processor = build_processor(tokenizer, config, model_max_length=args.model_max_length)
    with tempfile.TemporaryDirectory(prefix="bench_padding_") as folder, stdout_to_stderr():
        specs, counts = write_mixture(Path(folder), samples, args.seed)
        issues = IssueLog()
        dataset = build_dataset(specs, processor, issues, seed=args.seed, model_max_length=args.model_max_length)
        results = {}
        for name, grouped in (("random", False), ("group_by_length", True)):
            trainer = make_trainer(folder, args.batch_size, grouped, args.gradient_accumulation)
            runs = [
                padding_stats(trainer_batches(trainer, dataset, args.batch_size, args.seed + epoch), dataset.lengths)
                for epoch in range(epochs)
            ]
            results[name] = {
                "fraction": round(float(np.mean([r["fraction"] for r in runs])), 4),
                "mean_per_batch": round(float(np.mean([r["mean_per_batch"] for r in runs])), 4),
                "sampler": type(trainer._get_train_sampler(dataset)).__name__,
            }
        ordered = np.argsort(dataset.lengths, kind="stable").tolist()
        sorted_batches = [ordered[i : i + args.batch_size] for i in range(0, len(ordered), args.batch_size)]
        lower_bound = padding_stats(sorted_batches, dataset.lengths)
    lengths = np.asarray(dataset.lengths)
    loss_tokens = sum(end - start for i in range(len(dataset)) for start, end in dataset.encoded(i).target_ranges)
    grouped, random = results["group_by_length"]["fraction"], results["random"]["fraction"]
    result = {
        "benchmark": "padding",
        "value": grouped,
        "unit": "fraction",
        "random": results["random"],
        "group_by_length": results["group_by_length"],
        "sorted_lower_bound": round(lower_bound["fraction"], 4),
        "padding_reduction": round(1 - grouped / random, 4) if random else None,
        "llm_tokens_per_useful_token": {
            "random": round(1 / (1 - random), 3),
            "group_by_length": round(1 / (1 - grouped), 3),
        },
        "samples": len(dataset),
        "samples_written": counts,
        "samples_dropped": samples - len(dataset),
        "mixture": MIXTURE,
        "length_tokens": {
            "mean": round(float(lengths.mean()), 1),
            "p10": int(np.percentile(lengths, 10)),
            "median": int(np.median(lengths)),
            "p90": int(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
        },
        "loss_token_fraction": round(loss_tokens / int(lengths.sum()), 4),
        "image_tokens": config.num_image_tokens,
        "batch_size": args.batch_size,
        "gradient_accumulation": args.gradient_accumulation,
        "epochs": epochs,
        "method": "CommTrainer._get_train_sampler batches over build_dataset lengths; padded slots / slots",
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
