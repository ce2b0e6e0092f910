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

from collections.abc import Sequence

from comm.evaluation.commands import eval_script_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the caption evaluation (or ``--score`` a predictions file); returns the exit code."""
    return eval_script_main("caption", argv, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
