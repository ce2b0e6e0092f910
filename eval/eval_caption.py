#!/usr/bin/env python
"""Evaluate a COMM model on image captioning (COCO Karpathy test, Flickr30k test), or re-score predictions.

    python eval/eval_caption.py --model MODEL --annotations dataset_coco.json --split test \\
        --image-root data/coco --output-dir results/coco_karpathy_test
    python eval/eval_caption.py --model MODEL --annotations dataset_flickr30k.json --split test \\
        --image-root data/flickr30k/flickr30k-images --output-dir results/flickr30k_test
    torchrun --nproc_per_node 8 eval/eval_caption.py ...   # same options, sharded over 8 processes
    python eval/eval_caption.py --score results/coco_karpathy_test/predictions.jsonl --annotations dataset_coco.json

Official numbers need Java (a JRE 8 or newer on PATH): the PTB tokenizer and METEOR are Java programs, as is SPICE.
Without Java, `--tokenizer python` scores BLEU-4, ROUGE-L and CIDEr on a Python tokenization and skips METEOR.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.errors import ArgumentParser
from comm.evaluation.caption import CAPTION_TOKENIZERS, KARPATHY_SPLITS, CaptionSample, load_caption_file
from comm.evaluation.run_caption import CAPTION_MAX_NEW_TOKENS, evaluate_captions, rescore_caption_file
from comm.evaluation.scripts import add_run_arguments, print_json, run_evaluation, script_main


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the caption evaluation."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--spice", action="store_true", help="also compute SPICE (needs Java and Stanford CoreNLP)")
    parser.add_argument(
        "--tokenizer",
        default="ptb",
        choices=CAPTION_TOKENIZERS,
        help="ptb: the official PTB tokenizer and METEOR (both need Java); python: no Java, METEOR skipped",
    )
    parser.add_argument("--score", type=Path, metavar="PREDICTIONS.jsonl", help="re-score a predictions file, no model")
    add_run_arguments(parser, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
    return parser


def _score(args: argparse.Namespace) -> int:
    samples = load_caption_file(args.annotations, args.split, args.image_root)
    print_json(rescore_caption_file(args.score, samples, spice=args.spice, tokenizer=args.tokenizer))
    return 0


def _run(args: argparse.Namespace) -> int:
    def evaluate(model: Any, processor: Any, samples: list[CaptionSample], **options: Any) -> dict[str, Any]:
        return evaluate_captions(
            model, processor, samples, args.output_dir, spice=args.spice, tokenizer=args.tokenizer, **options
        )

    return run_evaluation(
        args,
        lambda: load_caption_file(args.annotations, args.split, args.image_root),
        lambda samples: (sample.image for sample in samples),
        evaluate,
        f"captions {args.annotations.name} {args.split}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the caption evaluation (or ``--score`` a predictions file); returns the exit code."""
    return script_main(build_parser(), argv, _score, _run)


if __name__ == "__main__":
    raise SystemExit(main())
