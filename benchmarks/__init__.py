"""COMM benchmarks: each ``bench_*`` module prints one JSON line; run one with ``python -m benchmarks.bench_padding``
from the repository root, or all of them with ``python -m benchmarks.run_all``.

This runs before any benchmark module imports torch or transformers: the benchmarks never reach the Hugging Face Hub
and keep transformers' chatter to errors (override either by setting the variable yourself).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
