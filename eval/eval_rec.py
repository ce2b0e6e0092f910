#!/usr/bin/env python
"""Evaluate a COMM model on referring expression comprehension (RefCOCO/+/g, Acc@0.5), or re-score predictions.

    python eval/eval_rec.py --model MODEL --refer-root data/refer --dataset refcoco --split val \\
        --image-dir data/coco/train2014 --output-dir results/refcoco_val
    torchrun --nproc_per_node 8 eval/eval_rec.py ...   # same options, sharded over 8 processes
    python eval/eval_rec.py --jsonl rec.jsonl --image-root images --model MODEL --output-dir results/rec
    python eval/eval_rec.py --score results/refcoco_val/predictions.jsonl
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comm.errors import ArgumentParser
from comm.evaluation.rec import RecSample, load_rec_jsonl, load_refer, rescore_predictions_file
from comm.evaluation.run_rec import REC_MAX_NEW_TOKENS, evaluate_rec
from comm.evaluation.scripts import add_run_arguments, print_json, run_evaluation, script_main
from comm.refer import REFER_SPLITS


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the REC evaluation."""
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--score", type=Path, metavar="PREDICTIONS.jsonl", help="re-score a predictions file, no model")
    refer = parser.add_argument_group("REFER data (refcoco, refcoco+, refcocog)")
    refer.add_argument("--refer-root", type=Path, help="folder holding refcoco/, refcoco+/, refcocog/")
    refer.add_argument("--dataset", choices=sorted(REFER_SPLITS), help="REFER dataset")
    refer.add_argument("--split", help="val, testA, testB (refcoco, refcoco+) or val, test (refcocog)")
    refer.add_argument("--split-by", default=None, help="unc / google / umd (default: unc, umd for refcocog)")
    refer.add_argument("--image-dir", type=Path, help="COCO train2014 images folder")
    jsonl = parser.add_argument_group("JSON-lines data")
    jsonl.add_argument("--jsonl", type=Path, help='samples {"image", "expression", "bbox": [x, y, w, h], "id"?}')
    jsonl.add_argument("--image-root", type=Path, default=None, help="folder the jsonl's image paths are relative to")
    parser.add_argument(
        "--visualize", type=int, default=0, metavar="N", help="draw N examples (gt green, prediction red) into a PNG"
    )
    add_run_arguments(parser, max_new_tokens=REC_MAX_NEW_TOKENS)
    return parser


def _check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.refer_root is None) == (args.jsonl is None):
        parser.error("give the data as --refer-root (with --dataset, --split, --image-dir) or as --jsonl")
    if args.refer_root is not None:
        missing = [
            f"--{name.replace('_', '-')}" for name in ("dataset", "split", "image_dir") if not getattr(args, name)
        ]
        if missing:
            parser.error(f"--refer-root needs {', '.join(missing)}")
    if args.visualize < 0:
        parser.error(f"--visualize must be >= 0, got {args.visualize}")


def load_samples(args: argparse.Namespace) -> list[RecSample]:
    """The REC samples named by the parsed arguments (REFER split or JSON lines)."""
    if args.jsonl is not None:
        return load_rec_jsonl(args.jsonl, args.image_root)
    return load_refer(args.refer_root, args.dataset, args.split_by, args.split, args.image_dir)


def _title(args: argparse.Namespace) -> str:
    if args.jsonl is not None:
        return f"REC {args.jsonl.name}"
    return f"REC {args.dataset} {args.split}"


def _run(args: argparse.Namespace) -> int:
    def evaluate(model: Any, processor: Any, samples: list[RecSample], **options: Any) -> dict[str, Any]:
        return evaluate_rec(model, processor, samples, args.output_dir, visualize=args.visualize, **options)

    return run_evaluation(
        args, lambda: load_samples(args), lambda samples: (sample.image for sample in samples), evaluate, _title(args)
    )


def _score(args: argparse.Namespace) -> int:
    print_json(rescore_predictions_file(args.score))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the REC evaluation (or ``--score`` a predictions file); returns the exit code."""
    return script_main(build_parser(), argv, _score, _run, check=_check_data_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
