#!/usr/bin/env python
"""Evaluate a COMM model on POPE (object hallucination, yes/no questions), or re-score answers files.

    python eval/eval_pope.py --model MODEL --image-dir data/coco/val2014 --output-dir results/pope \\
        --questions coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json
    python eval/eval_pope.py ... --answer-mode logits   # one forward pass a question: "Yes" vs "No" logits
    torchrun --nproc_per_node 8 eval/eval_pope.py ...   # same options, sharded over 8 processes
    python eval/eval_pope.py --score results/pope/answers_coco_pope_random.jsonl --questions coco_pope_random.json
"""

from __future__ import annotations

from collections.abc import Sequence

from comm.evaluation.commands import eval_script_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the POPE evaluation (or ``--score`` answers files); returns the exit code."""
    return eval_script_main("pope", argv, description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
