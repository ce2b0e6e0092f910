#!/usr/bin/env python
"""Evaluate a COMM model on referring expression comprehension (RefCOCO/+/g, Acc@0.5), or re-score predictions.

    python eval/eval_rec.py --model MODEL --refer-root data/refer --dataset refcoco --split val \\
        --image-dir data/coco/train2014 --output-dir results/refcoco_val
    torchrun --nproc_per_node 8 eval/eval_rec.py ...   # same options, sharded over 8 processes
    python eval/eval_rec.py --jsonl rec.jsonl --image-root images --model MODEL --output-dir results/rec
    python eval/eval_rec.py --score results/refcoco_val/predictions.jsonl
"""

from __future__ import annotations

from collections.abc import Sequence

from comm.evaluation.commands import eval_script_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the REC evaluation (or ``--score`` a predictions file); returns the exit code."""
    return eval_script_main("rec", argv, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
