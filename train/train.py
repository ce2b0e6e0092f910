"""Training entry point for launchers: ``deepspeed --num_gpus 8 train/train.py --stage 1 ...`` (see comm-train)."""

import sys

from comm.training.train import main

if __name__ == "__main__":
    sys.exit(main())
