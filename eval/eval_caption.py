#!/usr/bin/env python
"""Evaluate a COMM model on image captioning (COCO Karpathy test, Flickr30k test), or re-score predictions.

    python eval/eval_caption.py --model MODEL --annotations dataset_coco.json --split test \\
        --image-root data/coco --output-dir results/coco_karpathy_test
    python eval/eval_caption.py --model MODEL --annotations dataset_flickr30k.json --split test \\
        --image-root data/flickr30k/flickr30k-images --output-dir results/flickr30k_test
    torchrun --nproc_per_node 8 eval/eval_caption.py ...   # same options, sharded over 8 processes
    python eval/eval_caption.py --score results/coco_karpathy_test/predictions.jsonl --annotations dataset_coco.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from comm.evaluation.caption import KARPATHY_SPLITS, load_caption_file
from comm.evaluation.run_caption import CAPTION_MAX_NEW_TOKENS, evaluate_captions, rescore_caption_file
from comm.evaluation.runner import (
    METRICS_FILE,
    add_run_arguments,
    check_files_exist,
    check_run_arguments,
    cli_main,
    finish_distributed,
    generation_options,
    init_distributed,
    load_model,
    print_json,
    print_metrics,
    seed_everything,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the caption evaluation."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--annotations",
        type=Path,
        required=True,
        help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json) or a COCO caption annotation file",
    )
    parser.add_argument(
        "--split", default="test", choices=KARPATHY_SPLITS, help="Karpathy split (default test; unused for COCO files)"
    )
    parser.add_argument("--image-root", type=Path, default=None, help="folder the annotation's image paths are in")
    parser.add_argument("--spice", action="store_true", help="also compute SPICE (needs Stanford CoreNLP; slow)")
    parser.add_argument("--score", type=Path, metavar="PREDICTIONS.jsonl", help="re-score a predictions file, no model")
    add_run_arguments(parser, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
    return parser


def _score(args: argparse.Namespace) -> int:
    samples = load_caption_file(args.annotations, args.split, args.image_root)
    print_json(rescore_caption_file(args.score, samples, spice=args.spice))
    return 0


def _run(args: argparse.Namespace) -> int:
    init_distributed()
    seed_everything(args.seed)
    samples = load_caption_file(args.annotations, args.split, args.image_root)
    check_files_exist((sample.image for sample in samples), "image")  # before the (slow) model load
    model, processor = load_model(args.model, args.device, args.dtype)
    metrics = evaluate_captions(
        model,
        processor,
        samples,
        args.output_dir,
        batch_size=args.batch_size,
        spice=args.spice,
        progress=not args.no_progress,
        **generation_options(args),
    )
    print_metrics(metrics, f"captions {args.annotations.name} {args.split}", args.output_dir / METRICS_FILE)
    finish_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the caption evaluation (or ``--score`` a predictions file); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.score is not None:
        if args.model:
            parser.error("--score re-scores a predictions file without a model: drop --model")
        return cli_main(lambda: _score(args))
    check_run_arguments(parser, args)
    return cli_main(lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
