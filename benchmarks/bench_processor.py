"""Benchmark: image preprocessing throughput (images/s) for training, in one process and through a DataLoader.

Real-size image processors (`build_processor` for `CommConfig()`: CLIP at 336 px, DINOv2 at 224 px, pad-to-square
first) on 640x480 RGB images:

* ``preprocess_images`` alone, one image per call (as the training dataset calls it) on decoded PIL images, with a
  per-stage breakdown (JPEG decode, pad to square, CLIP processor, DINOv2 processor);
* the training path end to end: `comm.data.build_dataset` over REC records whose images are JPEG files on disk,
  read by a `torch.utils.data.DataLoader` with `CommDataCollator` (decode + preprocess + collate), at
  ``num_workers`` 0 and 2 (persistent workers, the second pass timed, so worker start-up is not counted).

Prints ONE JSON line: ``{"benchmark": "processor", "value": <DataLoader images/s, 2 workers>, "unit": "images/s"}``.
Compare with the training step's samples/s (bench_train_gpu.py): workers keep up when images/s >= samples/s.

    python -m benchmarks.bench_processor            # 128 images
    python -m benchmarks.bench_processor --quick    # 64 images
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common import fastest, finish, llama_tokenizer, median, set_threads, stdout_to_stderr
from comm import CommConfig, CommProcessor, add_image_tokens, build_processor
from comm.data import CommDataCollator, DataSpec, IssueLog, SupervisedDataset, build_dataset
from comm.model.modeling import PIXEL_VALUES_CLIP
from comm.processing import expand_to_square, load_image

IMAGE_SIZE = (640, 480)
_PROBE: tuple[CommProcessor, list[Image.Image]] | None = None  # what forked probe processes preprocess


def real_processor() -> CommProcessor:
    """The processor of the paper's model: CLIP 336 px, DINOv2 224 px, 196 image tokens, LLaMA tokenizer fixture."""
    config = CommConfig()
    tokenizer = llama_tokenizer()
    config.update(add_image_tokens(tokenizer))
    return build_processor(tokenizer, config, model_max_length=2048)


def write_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` 640x480 JPEG files (smooth random colour fields plus noise, quality 90, like photos on disk)."""
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
        noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"image_{index:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def rate(fn: Callable[[], object], items: int, repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` calls of ``fn`` (each handling ``items`` items)."""
    _, seconds = fastest(fn, repeats)
    return items / seconds


def stage_breakdown(processor: CommProcessor, paths: Sequence[Path]) -> dict[str, float]:
    """Median milliseconds per image of each preprocessing stage."""
    stages: dict[str, list[float]] = {"decode_ms": [], "pad_square_ms": [], "clip_ms": [], "dino_ms": []}
    for path in paths:
        start = time.perf_counter()
        image = load_image(path)
        decoded = time.perf_counter()
        square = expand_to_square(image, processor.pad_color)
        padded = time.perf_counter()
        processor.clip_image_processor(images=[square], return_tensors="pt")
        clip = time.perf_counter()
        processor.dino_image_processor(images=[square], return_tensors="pt")
        dino = time.perf_counter()
        stages["decode_ms"].append(decoded - start)
        stages["pad_square_ms"].append(padded - decoded)
        stages["clip_ms"].append(clip - padded)
        stages["dino_ms"].append(dino - clip)
    return {name: round(1000 * median(values), 3) for name, values in stages.items()}


def _probe_work(count: int) -> int:
    """Preprocess ``count`` of the probe's images (run in forked processes)."""
    assert _PROBE is not None
    processor, images = _PROBE
    for index in range(count):
        processor.preprocess_images([images[index % len(images)]])
    return count


def parallel_speedup(processor: CommProcessor, images: list[Image.Image], count: int) -> float:
    """Speed-up of the same preprocessing split over 2 forked processes: the parallelism this machine really gives
    (below 2 when the cores are shared with other jobs), to read the DataLoader figures against."""
    global _PROBE
    _PROBE = (processor, images)
    start = time.perf_counter()
    _probe_work(count)
    serial = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_probe_work, [1, 1])
        start = time.perf_counter()
        pool.map(_probe_work, [count // 2, count - count // 2], chunksize=1)
        parallel = time.perf_counter() - start
    return serial / parallel


def loader_rate(
    dataset: SupervisedDataset, collator: CommDataCollator, workers: int, batch_size: int
) -> tuple[float, float]:
    """Images/s of the second full pass of a DataLoader (persistent workers) and the first pass's seconds."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collator,
        persistent_workers=workers > 0,
    )
    start = time.perf_counter()
    for batch in loader:
        batch[PIXEL_VALUES_CLIP].sum()
    first = time.perf_counter() - start
    start = time.perf_counter()
    images = 0
    for batch in loader:
        images += batch[PIXEL_VALUES_CLIP].shape[0]
    seconds = time.perf_counter() - start
    del loader  # stops the persistent workers
    return images / seconds, first


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 images instead of 128")
    parser.add_argument("--images", type=int, default=None, help="images (default 128, 64 with --quick)")
    parser.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size (default 16)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values (default 0 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of preprocess_images, best kept")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in the main process (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = args.images or (64 if args.quick else 128)
    if count < args.batch_size or args.repeats < 1 or any(w < 0 for w in args.workers):
        parser.error("need --images >= --batch-size, --repeats >= 1 and --workers >= 0")
    threads = set_threads(args.threads)

    processor = real_processor()
    with tempfile.TemporaryDirectory(prefix="bench_processor_") as folder, stdout_to_stderr():
        paths = write_images(Path(folder), count, args.seed)
        decoded = [load_image(path) for path in paths]
        processor.preprocess_images(decoded[:2])  # warm-up

        per_image = rate(lambda: [processor.preprocess_images([image]) for image in decoded], count, args.repeats)
        batched = rate(
            lambda: [
                processor.preprocess_images(decoded[i : i + args.batch_size]) for i in range(0, count, args.batch_size)
            ],
            count,
            args.repeats,
        )
        from_files = rate(lambda: [processor.preprocess_images([path]) for path in paths], count, args.repeats)
        breakdown = stage_breakdown(processor, paths)
        two_process_speedup = parallel_speedup(processor, decoded, count)

        records = [{"image": path.name, "expression": "the object", "bbox": [10, 10, 100, 80]} for path in paths]
        data_file = Path(folder) / "rec.jsonl"
        data_file.write_text("".join(json.dumps(record) + "\n" for record in records))
        dataset = build_dataset([DataSpec(data_file)], processor, IssueLog(strict=True))
        collator = CommDataCollator.for_processor(processor)
        loaders = {}
        for workers in args.workers:
            images_per_s, first_pass = loader_rate(dataset, collator, workers, args.batch_size)
            loaders[f"workers_{workers}"] = {
                "images_per_s": round(images_per_s, 2),
                "first_pass_s": round(first_pass, 2),
            }

    key = "workers_2" if "workers_2" in loaders else f"workers_{max(args.workers)}"
    single = loaders.get("workers_0", {}).get("images_per_s")
    result = {
        "benchmark": "processor",
        "value": loaders[key]["images_per_s"],
        "unit": "images/s",
        "value_is": f"DataLoader {key.replace('_', '=')}: decode + preprocess + collate, images/s",
        "preprocess_images_per_s": round(per_image, 2),
        "preprocess_images_batched_per_s": round(batched, 2),
        "preprocess_from_jpeg_per_s": round(from_files, 2),
        "stage_ms_per_image": breakdown,
        "dataloader": loaders,
        "workers_speedup": round(loaders[key]["images_per_s"] / single, 3) if single else None,
        "machine_2_process_speedup": round(two_process_speedup, 3),
        "image_size": list(IMAGE_SIZE),
        "clip_size": processor.clip_image_processor.size["height"],
        "dino_size": processor.dino_image_processor.size["height"],
        "images": count,
        "batch_size": args.batch_size,
        "threads": threads,
    }
    return finish(result, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
